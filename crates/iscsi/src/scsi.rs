//! The SCSI block commands a network boot disk needs (SPC-4, SBC-3): the
//! CDB decoder, sense data, and the data of INQUIRY and its VPD pages,
//! READ CAPACITY, MODE SENSE, REPORT LUNS and GET LBA STATUS; the UNMAP
//! parameter list. No storage: the target asks its backend and answers
//! with these.

/// SCSI status codes.
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
}

/// Sense keys.
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xb;
}

/// A sense key with its additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    pub const INVALID_OPCODE: Sense = Sense::illegal(0x20, 0x00);
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::illegal(0x24, 0x00);
    pub const INVALID_FIELD_IN_PARAMETERS: Sense = Sense::illegal(0x26, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Sense = Sense::illegal(0x1a, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::illegal(0x21, 0x00);
    pub const LUN_NOT_SUPPORTED: Sense = Sense::illegal(0x25, 0x00);
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::illegal(0x39, 0x00);
    pub const WRITE_PROTECTED: Sense = Sense {
        key: key::DATA_PROTECT,
        asc: 0x27,
        ascq: 0x00,
    };
    pub const MEDIUM_READ_ERROR: Sense = Sense {
        key: key::MEDIUM_ERROR,
        asc: 0x11,
        ascq: 0x00,
    };
    pub const WRITE_ERROR: Sense = Sense {
        key: key::MEDIUM_ERROR,
        asc: 0x0c,
        ascq: 0x00,
    };
    /// No space left for the write cache.
    pub const SPACE_EXHAUSTED: Sense = Sense {
        key: key::DATA_PROTECT,
        asc: 0x27,
        ascq: 0x07,
    };
    pub const INTERNAL_FAILURE: Sense = Sense {
        key: key::HARDWARE_ERROR,
        asc: 0x44,
        ascq: 0x00,
    };
    pub const POWER_ON_RESET: Sense = Sense {
        key: key::UNIT_ATTENTION,
        asc: 0x29,
        ascq: 0x00,
    };
    pub const NONE: Sense = Sense {
        key: key::NO_SENSE,
        asc: 0,
        ascq: 0,
    };

    const fn illegal(asc: u8, ascq: u8) -> Sense {
        Sense {
            key: key::ILLEGAL_REQUEST,
            asc,
            ascq,
        }
    }

    /// Fixed-format sense data (response code 0x70), 18 bytes.
    pub fn fixed(&self) -> Vec<u8> {
        let mut s = vec![0u8; 18];
        s[0] = 0x70;
        s[2] = self.key & 0x0f;
        s[7] = 10;
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }

    /// Descriptor-format sense data (response code 0x72), 8 bytes.
    pub fn descriptor(&self) -> Vec<u8> {
        vec![0x72, self.key & 0x0f, self.asc, self.ascq, 0, 0, 0, 0]
    }
}

/// Where a command reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Extent {
    pub lba: u64,
    pub blocks: u32,
}

/// A decoded CDB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        descriptor: bool,
        alloc: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc: u32,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc: u32,
    },
    Read {
        at: Extent,
        fua: bool,
    },
    Write {
        at: Extent,
        fua: bool,
        /// WRITE AND VERIFY: the data is written as if with FUA.
        verify: bool,
    },
    /// ORWRITE: each byte sent is ORed into the block's.
    OrWrite {
        at: Extent,
        fua: bool,
    },
    Verify {
        at: Extent,
        /// BYTCHK: 0 no data; 1 compare the data sent; 3 one block for all.
        bytchk: u8,
    },
    SynchronizeCache {
        at: Extent,
        immed: bool,
    },
    ModeSense {
        ten: bool,
        dbd: bool,
        /// Page control: 0 current, 1 changeable, 2 default, 3 saved.
        pc: u8,
        page: u8,
        subpage: u8,
        alloc: u32,
    },
    ModeSelect {
        ten: bool,
        len: u32,
    },
    ReportLuns {
        alloc: u32,
    },
    Unmap {
        len: u32,
    },
    WriteSame {
        at: Extent,
        unmap: bool,
        anchor: bool,
        /// No data-out buffer: write zeros.
        ndob: bool,
    },
    GetLbaStatus {
        lba: u64,
        alloc: u32,
    },
    StartStopUnit,
    PreventAllowMediumRemoval,
    /// RESERVE(6) and RELEASE(6) of the whole logical unit (SPC-2).
    Reserve6,
    Release6,
    /// PERSISTENT RESERVE IN (SPC-4 §6.15).
    PersistentReserveIn {
        action: crate::pr::In,
        alloc: u32,
    },
    /// PERSISTENT RESERVE OUT (SPC-4 §6.16): `len` bytes of parameters
    /// follow. The type is checked by the service actions that use it.
    PersistentReserveOut {
        action: crate::pr::Out,
        scope: u8,
        ty: u8,
        len: u32,
    },
    PreFetch {
        at: Extent,
    },
    /// REPORT SUPPORTED OPERATION CODES.
    ReportSupportedOpcodes {
        /// Return the command timeouts descriptors too.
        rctd: bool,
        options: u8,
        opcode: u8,
        service_action: u16,
        alloc: u32,
    },
    /// An opcode (or service action) not served: ILLEGAL REQUEST.
    Unsupported(u8),
}

fn be(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |acc, &x| acc << 8 | x as u64)
}

impl Command {
    /// Decodes `cdb`. An opcode not served is [`Command::Unsupported`];
    /// a served one with a field it cannot honour is an error with the
    /// sense to answer.
    pub fn parse(cdb: &[u8; 16]) -> Result<Command, Sense> {
        let op = cdb[0];
        let u16at = |i: usize| be(&cdb[i..i + 2]) as u32;
        let u32at = |i: usize| be(&cdb[i..i + 4]) as u32;
        let u64at = |i: usize| be(&cdb[i..i + 8]);
        let fua = cdb[1] & 0x08 != 0;
        // RDPROTECT, WRPROTECT, VRPROTECT: these disks have no protection
        // information (INQUIRY says PROTECT=0), so any value but 0 is
        // invalid.
        let protects = matches!(
            op,
            0x28 | 0x2a
                | 0x2e
                | 0x2f
                | 0xa8
                | 0xaa
                | 0xae
                | 0xaf
                | 0x88
                | 0x8a
                | 0x8e
                | 0x8f
                | 0x8b
                | 0x41
                | 0x93
        );
        if protects && cdb[1] & 0xe0 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        // ANCHOR: no anchored state here (VPD 0xB2 says ANC_SUP=0).
        if (matches!(op, 0x41 | 0x93) && cdb[1] & 0x10 != 0) || (op == 0x42 && cdb[1] & 0x01 != 0) {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        Ok(match op {
            0x00 => Command::TestUnitReady,
            0x03 => Command::RequestSense {
                descriptor: cdb[1] & 0x01 != 0,
                alloc: cdb[4] as u32,
            },
            0x12 => {
                let evpd = cdb[1] & 0x01 != 0;
                // CMDDT is obsolete, and a page without EVPD is invalid.
                if cdb[1] & 0x02 != 0 || (!evpd && cdb[2] != 0) {
                    return Err(Sense::INVALID_FIELD_IN_CDB);
                }
                Command::Inquiry {
                    evpd,
                    page: cdb[2],
                    alloc: u16at(3),
                }
            }
            0x25 => Command::ReadCapacity10,
            0x08 | 0x0a => {
                let lba = be(&[cdb[1] & 0x1f, cdb[2], cdb[3]]);
                // A length of 0 means 256 blocks in the 6-byte commands.
                let blocks = if cdb[4] == 0 { 256 } else { cdb[4] as u32 };
                let at = Extent { lba, blocks };
                if op == 0x08 {
                    Command::Read { at, fua: false }
                } else {
                    Command::Write {
                        at,
                        fua: false,
                        verify: false,
                    }
                }
            }
            0x28 | 0x2a | 0x2e => rw(op, u32at(2) as u64, u16at(7), fua),
            0xa8 | 0xaa | 0xae => rw(op, u32at(2) as u64, u32at(6), fua),
            0x88 | 0x8a | 0x8e => rw(op, u64at(2), u32at(10), fua),
            0x8b => Command::OrWrite {
                at: Extent {
                    lba: u64at(2),
                    blocks: u32at(10),
                },
                fua,
            },
            0x2f => Command::Verify {
                at: Extent {
                    lba: u32at(2) as u64,
                    blocks: u16at(7),
                },
                bytchk: (cdb[1] >> 1) & 3,
            },
            0xaf => Command::Verify {
                at: Extent {
                    lba: u32at(2) as u64,
                    blocks: u32at(6),
                },
                bytchk: (cdb[1] >> 1) & 3,
            },
            0x8f => Command::Verify {
                at: Extent {
                    lba: u64at(2),
                    blocks: u32at(10),
                },
                bytchk: (cdb[1] >> 1) & 3,
            },
            0x35 => Command::SynchronizeCache {
                at: Extent {
                    lba: u32at(2) as u64,
                    blocks: u16at(7),
                },
                immed: cdb[1] & 0x02 != 0,
            },
            0x91 => Command::SynchronizeCache {
                at: Extent {
                    lba: u64at(2),
                    blocks: u32at(10),
                },
                immed: cdb[1] & 0x02 != 0,
            },
            0x1a | 0x5a => {
                let ten = op == 0x5a;
                Command::ModeSense {
                    ten,
                    dbd: cdb[1] & 0x08 != 0,
                    pc: cdb[2] >> 6,
                    page: cdb[2] & 0x3f,
                    subpage: cdb[3],
                    alloc: if ten { u16at(7) } else { cdb[4] as u32 },
                }
            }
            0x15 => Command::ModeSelect {
                ten: false,
                len: cdb[4] as u32,
            },
            0x55 => Command::ModeSelect {
                ten: true,
                len: u16at(7),
            },
            0xa0 => {
                // Select report 0 (all), 1 (well known), 2 (all) are fine.
                if cdb[2] > 2 {
                    return Err(Sense::INVALID_FIELD_IN_CDB);
                }
                Command::ReportLuns { alloc: u32at(6) }
            }
            0x42 => Command::Unmap { len: u16at(7) },
            0x41 => Command::WriteSame {
                at: Extent {
                    lba: u32at(2) as u64,
                    blocks: u16at(7),
                },
                unmap: cdb[1] & 0x08 != 0,
                anchor: cdb[1] & 0x10 != 0,
                ndob: false,
            },
            0x93 => Command::WriteSame {
                at: Extent {
                    lba: u64at(2),
                    blocks: u32at(10),
                },
                unmap: cdb[1] & 0x08 != 0,
                anchor: cdb[1] & 0x10 != 0,
                ndob: cdb[1] & 0x01 != 0,
            },
            0x9e => match cdb[1] & 0x1f {
                0x10 => Command::ReadCapacity16 { alloc: u32at(10) },
                0x12 => Command::GetLbaStatus {
                    lba: u64at(2),
                    alloc: u32at(10),
                },
                _ => Command::Unsupported(op),
            },
            0xa3 if cdb[1] & 0x1f == 0x0c => Command::ReportSupportedOpcodes {
                rctd: cdb[2] & 0x80 != 0,
                options: cdb[2] & 0x07,
                opcode: cdb[3],
                service_action: u16at(4) as u16,
                alloc: u32at(6),
            },
            // Third-party and element reservations are not served.
            0x16 | 0x17 if cdb[1] & 0x1f != 0 => return Err(Sense::INVALID_FIELD_IN_CDB),
            0x16 => Command::Reserve6,
            0x17 => Command::Release6,
            0x5e => Command::PersistentReserveIn {
                action: crate::pr::In::from_code(cdb[1] & 0x1f)
                    .ok_or(Sense::INVALID_FIELD_IN_CDB)?,
                alloc: u16at(7),
            },
            0x5f => Command::PersistentReserveOut {
                action: crate::pr::Out::from_code(cdb[1] & 0x1f)
                    .ok_or(Sense::INVALID_FIELD_IN_CDB)?,
                scope: cdb[2] >> 4,
                ty: cdb[2] & 0x0f,
                len: u32at(5),
            },
            0x1b => Command::StartStopUnit,
            0x1e => Command::PreventAllowMediumRemoval,
            0x34 => Command::PreFetch {
                at: Extent {
                    lba: u32at(2) as u64,
                    blocks: u16at(7),
                },
            },
            0x90 => Command::PreFetch {
                at: Extent {
                    lba: u64at(2),
                    blocks: u32at(10),
                },
            },
            _ => Command::Unsupported(op),
        })
    }
}

fn rw(op: u8, lba: u64, blocks: u32, fua: bool) -> Command {
    let at = Extent { lba, blocks };
    match op {
        0x28 | 0xa8 | 0x88 => Command::Read { at, fua },
        _ => Command::Write {
            at,
            fua,
            verify: matches!(op, 0x2e | 0xae | 0x8e),
        },
    }
}

/// Whether `at` lies within a disk of `blocks` blocks.
pub fn check_range(at: Extent, blocks: u64) -> Result<(), Sense> {
    match at.lba.checked_add(at.blocks as u64) {
        Some(end) if end <= blocks => Ok(()),
        _ => Err(Sense::LBA_OUT_OF_RANGE),
    }
}

/// `data` cut to the initiator's allocation length.
pub fn truncate(mut data: Vec<u8>, alloc: u32) -> Vec<u8> {
    data.truncate(alloc as usize);
    data
}

/// What a disk says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// INQUIRY vendor (8 characters) and product (16) and revision (4).
    pub vendor: String,
    pub product: String,
    pub revision: String,
    /// VPD 0x80: the unit serial number, printable ASCII.
    pub serial: String,
    /// VPD 0x83: the 16 bytes of an NAA IEEE Registered Extended name
    /// (its first nibble 6).
    pub naa: [u8; 16],
}

/// What the block limits and provisioning pages say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most blocks in one READ or WRITE (0: none said).
    pub max_transfer: u32,
    pub optimal_transfer: u32,
    /// UNMAP works (LBPME, LBPU, LBPWS).
    pub unmap: bool,
    pub max_unmap_blocks: u32,
    pub max_unmap_descriptors: u32,
    pub unmap_granularity: u32,
    pub max_write_same: u64,
    /// Unmapped blocks read as zeros (LBPRZ).
    pub unmapped_read_zero: bool,
    /// Logical blocks per physical block, as a power of 2 (READ CAPACITY
    /// 16's LBPPBE): 3 for 4 KiB chunks under 512-byte blocks.
    pub physical_exponent: u8,
}

/// An ASCII field of `n` bytes, space-padded.
fn ascii(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s
        .bytes()
        .filter(|b| (0x20..0x7f).contains(b))
        .take(n)
        .collect();
    v.resize(n, b' ');
    v
}

/// The VPD pages served, in order.
pub const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

/// Standard INQUIRY data: a direct-access block device, SPC-4, with
/// command queuing.
pub fn inquiry(id: &Identity) -> Vec<u8> {
    let mut d = vec![0u8; 36];
    d[0] = 0x00; // peripheral: connected, direct access
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HiSup, response data format 2
    d[4] = 96 - 5;
    d[5] = 0x00;
    d[6] = 0x00;
    d[7] = 0x02; // CmdQue
    d[8..16].copy_from_slice(&ascii(&id.vendor, 8));
    d[16..32].copy_from_slice(&ascii(&id.product, 16));
    d[32..36].copy_from_slice(&ascii(&id.revision, 4));
    d.resize(96, 0);
    // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
    for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

fn vpd(page: u8, body: Vec<u8>) -> Vec<u8> {
    let mut d = vec![0x00, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(&body);
    d
}

/// The VPD page `page`, or the sense for one not served.
pub fn vpd_page(page: u8, id: &Identity, limits: &Limits) -> Result<Vec<u8>, Sense> {
    Ok(match page {
        0x00 => vpd(page, VPD_PAGES.to_vec()),
        0x80 => vpd(page, ascii(&id.serial, id.serial.len().clamp(1, 250))),
        0x83 => {
            let mut body = vec![0x01, 0x03, 0x00, 16];
            body.extend_from_slice(&id.naa);
            // A T10 vendor identification: the vendor, then the serial.
            let mut t10 = ascii(&id.vendor, 8);
            t10.extend(ascii(&id.serial, id.serial.len().clamp(1, 200)));
            body.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
            body.extend(t10);
            vpd(page, body)
        }
        0xb0 => {
            let mut b = vec![0u8; 0x3c];
            b[4..8].copy_from_slice(&limits.max_transfer.to_be_bytes());
            b[8..12].copy_from_slice(&limits.optimal_transfer.to_be_bytes());
            if limits.unmap {
                b[16..20].copy_from_slice(&limits.max_unmap_blocks.to_be_bytes());
                b[20..24].copy_from_slice(&limits.max_unmap_descriptors.to_be_bytes());
                b[24..28].copy_from_slice(&limits.unmap_granularity.to_be_bytes());
            }
            b[32..40].copy_from_slice(&limits.max_write_same.to_be_bytes());
            vpd(page, b)
        }
        0xb1 => {
            let mut b = vec![0u8; 0x3c];
            b[0..2].copy_from_slice(&1u16.to_be_bytes()); // non-rotating
            vpd(page, b)
        }
        0xb2 => {
            let mut b = vec![0u8; 4];
            if limits.unmap {
                b[1] = 0x80 | 0x40 | 0x20; // LBPU, LBPWS, LBPWS10
                if limits.unmapped_read_zero {
                    b[1] |= 0x04; // LBPRZ
                }
                b[2] = 0x02; // thin provisioned
            }
            vpd(page, b)
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    })
}

/// READ CAPACITY (10): the last LBA (all ones past 32 bits) and the
/// block length.
pub fn read_capacity10(blocks: u64, block_len: u32) -> Vec<u8> {
    let last = blocks.saturating_sub(1).min(0xffff_ffff) as u32;
    let mut d = last.to_be_bytes().to_vec();
    d.extend_from_slice(&block_len.to_be_bytes());
    d
}

/// READ CAPACITY (16), 32 bytes.
pub fn read_capacity16(blocks: u64, block_len: u32, limits: &Limits) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&blocks.saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&block_len.to_be_bytes());
    d[13] = limits.physical_exponent & 0x0f;
    if limits.unmap {
        d[14] = 0x80 | if limits.unmapped_read_zero { 0x40 } else { 0 };
    }
    d
}

/// REPORT LUNS of `luns` (single-level LUN addressing).
pub fn report_luns(luns: &[u16]) -> Vec<u8> {
    let mut d = ((luns.len() * 8) as u32).to_be_bytes().to_vec();
    d.extend_from_slice(&[0; 4]);
    for &l in luns {
        let mut e = [0u8; 8];
        e[0..2].copy_from_slice(&(l & 0x3fff).to_be_bytes());
        d.extend_from_slice(&e);
    }
    d
}

/// The mode pages served: caching (0x08), control (0x0a), informational
/// exceptions (0x1c).
fn mode_page(page: u8, pc: u8, write_cache: bool) -> Option<Vec<u8>> {
    let changeable = pc == 1;
    Some(match page {
        0x08 => {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 0x12;
            if write_cache && !changeable {
                p[2] = 0x04; // WCE
            }
            p
        }
        0x0a => {
            let mut p = vec![0u8; 12];
            p[0] = 0x0a;
            p[1] = 0x0a;
            if !changeable {
                p[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: unrestricted
            }
            p
        }
        0x1c => {
            let mut p = vec![0u8; 12];
            p[0] = 0x1c;
            p[1] = 0x0a;
            p
        }
        _ => return None,
    })
}

/// What MODE SENSE describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeInfo {
    pub blocks: u64,
    pub block_len: u32,
    pub read_only: bool,
    pub write_cache: bool,
}

/// MODE SENSE (6) or (10) data for `cmd`.
pub fn mode_sense(cmd: &Command, info: &ModeInfo) -> Result<Vec<u8>, Sense> {
    let Command::ModeSense {
        ten,
        dbd,
        pc,
        page,
        subpage,
        ..
    } = *cmd
    else {
        return Err(Sense::INVALID_OPCODE);
    };
    if pc == 3 {
        return Err(Sense::SAVING_NOT_SUPPORTED);
    }
    // Subpages: none but "all subpages" (0xff) of "all pages".
    if subpage != 0 && !(page == 0x3f && subpage == 0xff) {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    let pages: Vec<u8> = if page == 0x3f {
        [0x08, 0x0a, 0x1c]
            .iter()
            .filter_map(|&p| mode_page(p, pc, info.write_cache))
            .flatten()
            .collect()
    } else {
        mode_page(page, pc, info.write_cache).ok_or(Sense::INVALID_FIELD_IN_CDB)?
    };
    let mut descriptor = Vec::new();
    if !dbd {
        let count = info.blocks.min(0xff_ffff) as u32;
        descriptor.push(0);
        descriptor.extend_from_slice(&count.to_be_bytes()[1..]);
        descriptor.push(0);
        descriptor.extend_from_slice(&info.block_len.to_be_bytes()[1..]);
    }
    let specific = if info.read_only { 0x80 } else { 0 } | 0x10; // WP, DPOFUA
    let mut d = if ten {
        let mut h = vec![0u8; 8];
        h[3] = specific;
        h[6..8].copy_from_slice(&(descriptor.len() as u16).to_be_bytes());
        h
    } else {
        vec![0, 0, specific, descriptor.len() as u8]
    };
    d.extend(descriptor);
    d.extend(pages);
    if ten {
        let n = (d.len() - 2) as u16;
        d[0..2].copy_from_slice(&n.to_be_bytes());
    } else {
        d[0] = (d.len() - 1).min(255) as u8;
    }
    Ok(d)
}

/// The block descriptors of an UNMAP parameter list, checked against a
/// disk of `blocks` blocks and the limits.
pub fn unmap_descriptors(data: &[u8], blocks: u64, limits: &Limits) -> Result<Vec<Extent>, Sense> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    if data.len() < 8 {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let desc_len = be(&data[2..4]) as usize;
    let body = &data[8..];
    if !desc_len.is_multiple_of(16) || desc_len > body.len() {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let count = desc_len / 16;
    if limits.max_unmap_descriptors != 0 && count > limits.max_unmap_descriptors as usize {
        return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
    }
    let mut out = Vec::with_capacity(count);
    for d in body[..desc_len].chunks_exact(16) {
        let at = Extent {
            lba: be(&d[0..8]),
            blocks: be(&d[8..12]) as u32,
        };
        if limits.max_unmap_blocks != 0 && at.blocks > limits.max_unmap_blocks {
            return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
        }
        check_range(at, blocks)?;
        out.push(at);
    }
    Ok(out)
}

/// Provisioning status of a run of blocks, for GET LBA STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbaStatus {
    pub at: Extent,
    /// Mapped (false) or deallocated (true).
    pub deallocated: bool,
}

/// GET LBA STATUS parameter data for `runs` (the first starting at the
/// LBA asked).
pub fn lba_status(runs: &[LbaStatus]) -> Vec<u8> {
    let mut d = ((runs.len() * 16 + 4) as u32).to_be_bytes().to_vec();
    d.extend_from_slice(&[0; 4]);
    for r in runs {
        d.extend_from_slice(&r.at.lba.to_be_bytes());
        d.extend_from_slice(&r.at.blocks.to_be_bytes());
        d.push(r.deallocated as u8);
        d.extend_from_slice(&[0; 3]);
    }
    d
}

/// The commands served, as REPORT SUPPORTED OPERATION CODES lists them:
/// opcode, service action, and the CDB usage data (its length is the
/// CDB's; a bit set is a bit the server looks at).
#[rustfmt::skip]
const SUPPORTED: &[(u8, Option<u16>, &[u8])] = &[
    (0x00, None, &[0x00, 0, 0, 0, 0, 0]),
    (0x03, None, &[0x03, 0x01, 0, 0, 0xff, 0]),
    (0x08, None, &[0x08, 0x1f, 0xff, 0xff, 0xff, 0]),
    (0x0a, None, &[0x0a, 0x1f, 0xff, 0xff, 0xff, 0]),
    (0x12, None, &[0x12, 0x01, 0xff, 0xff, 0xff, 0]),
    (0x16, None, &[0x16, 0, 0, 0, 0, 0]),
    (0x17, None, &[0x17, 0, 0, 0, 0, 0]),
    (0x1a, None, &[0x1a, 0x08, 0xff, 0xff, 0xff, 0]),
    (0x1b, None, &[0x1b, 0, 0, 0, 0, 0]),
    (0x1e, None, &[0x1e, 0, 0, 0, 0, 0]),
    (0x25, None, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    (0x28, None, &[0x28, 0x18, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0]),
    (0x2a, None, &[0x2a, 0x18, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0]),
    (0x2e, None, &[0x2e, 0x16, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0]),
    (0x2f, None, &[0x2f, 0x16, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0]),
    (0x34, None, &[0x34, 0, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0]),
    (0x35, None, &[0x35, 0x02, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0]),
    (0x41, None, &[0x41, 0x08, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0]),
    (0x42, None, &[0x42, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0]),
    (0x5a, None, &[0x5a, 0x08, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0]),
    (0x5e, Some(0x00), &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0]),
    (0x5e, Some(0x01), &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0]),
    (0x5e, Some(0x02), &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0]),
    (0x5e, Some(0x03), &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0]),
    (0x5f, Some(0x00), &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]),
    (0x5f, Some(0x01), &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]),
    (0x5f, Some(0x02), &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]),
    (0x5f, Some(0x03), &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]),
    (0x5f, Some(0x04), &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]),
    (0x5f, Some(0x05), &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]),
    (0x5f, Some(0x06), &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]),
    (0x88, None, &[0x88, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),
    (0x8a, None, &[0x8a, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),
    (0x8b, None, &[0x8b, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),
    (0x8e, None, &[0x8e, 0x16, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),
    (0x8f, None, &[0x8f, 0x16, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),
    (0x90, None, &[0x90, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),
    (0x91, None, &[0x91, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),
    (0x93, None, &[0x93, 0x09, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),
    (0x9e, Some(0x10), &[0x9e, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0]),
    (0x9e, Some(0x12), &[0x9e, 0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),
    (0xa0, None, &[0xa0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0]),
    (0xa3, Some(0x0c), &[0xa3, 0x1f, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),
    (0xa8, None, &[0xa8, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),
    (0xaa, None, &[0xaa, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),
    (0xae, None, &[0xae, 0x16, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),
    (0xaf, None, &[0xaf, 0x16, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),
];

/// A command timeouts descriptor: none said (0).
const TIMEOUTS: [u8; 12] = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// REPORT SUPPORTED OPERATION CODES data for `cmd`.
pub fn supported_opcodes(cmd: &Command) -> Result<Vec<u8>, Sense> {
    let Command::ReportSupportedOpcodes {
        rctd,
        options,
        opcode,
        service_action,
        ..
    } = *cmd
    else {
        return Err(Sense::INVALID_OPCODE);
    };
    if options == 0 {
        let mut list = Vec::new();
        for (op, sa, usage) in SUPPORTED {
            list.push(*op);
            list.push(0);
            list.extend_from_slice(&sa.unwrap_or(0).to_be_bytes());
            list.push(0);
            list.push(if rctd { 0x02 } else { 0 } | sa.is_some() as u8);
            list.extend_from_slice(&(usage.len() as u16).to_be_bytes());
            if rctd {
                list.extend_from_slice(&TIMEOUTS);
            }
        }
        let mut d = (list.len() as u32).to_be_bytes().to_vec();
        d.extend(list);
        return Ok(d);
    }
    let has_sa = SUPPORTED
        .iter()
        .any(|(op, sa, _)| *op == opcode && sa.is_some());
    let entry = match options {
        // One command without a service action: one that has them is an
        // error.
        1 if has_sa => return Err(Sense::INVALID_FIELD_IN_CDB),
        1 => SUPPORTED.iter().find(|(op, _, _)| *op == opcode),
        2 if !has_sa && SUPPORTED.iter().any(|(op, _, _)| *op == opcode) => {
            return Err(Sense::INVALID_FIELD_IN_CDB)
        }
        2 | 3 => SUPPORTED
            .iter()
            .find(|(op, sa, _)| *op == opcode && (sa.is_none() || *sa == Some(service_action))),
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    };
    let mut d = vec![0u8; 4];
    match entry {
        Some((_, _, usage)) => {
            d[1] = 0x03 | if rctd { 0x80 } else { 0 };
            d[2..4].copy_from_slice(&(usage.len() as u16).to_be_bytes());
            d.extend_from_slice(usage);
            if rctd {
                d.extend_from_slice(&TIMEOUTS);
            }
        }
        // Not supported: SUPPORT 1, no usage data.
        None => d[1] = 0x01,
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdb(bytes: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    fn id() -> Identity {
        Identity {
            vendor: "VSTREAM".into(),
            product: "vDisk golden".into(),
            revision: "0001".into(),
            serial: "d41d8cd98f00b204".into(),
            naa: [0x60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        }
    }

    const LIMITS: Limits = Limits {
        max_transfer: 2048,
        optimal_transfer: 256,
        unmap: true,
        max_unmap_blocks: 1 << 20,
        max_unmap_descriptors: 64,
        unmap_granularity: 8,
        max_write_same: 1 << 20,
        unmapped_read_zero: true,
        physical_exponent: 3,
    };

    #[test]
    fn reads_and_writes_of_every_size() {
        let at = |lba, blocks| Extent { lba, blocks };
        assert_eq!(
            Command::parse(&cdb(&[0x08, 0x1f, 0xff, 0xff, 0])),
            Ok(Command::Read {
                at: at(0x1f_ffff, 256),
                fua: false
            })
        );
        assert_eq!(
            Command::parse(&cdb(&[0x2a, 0x08, 0, 0, 1, 0, 0, 0, 8, 0])),
            Ok(Command::Write {
                at: at(256, 8),
                fua: true,
                verify: false
            })
        );
        assert_eq!(
            Command::parse(&cdb(&[0xa8, 0, 0, 0, 0, 9, 0, 1, 0, 0])),
            Ok(Command::Read {
                at: at(9, 65536),
                fua: false
            })
        );
        assert_eq!(
            Command::parse(&cdb(&[0x8a, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 16])),
            Ok(Command::Write {
                at: at(1 << 32, 16),
                fua: false,
                verify: false
            })
        );
        assert!(matches!(
            Command::parse(&cdb(&[0x8e, 0])),
            Ok(Command::Write { verify: true, .. })
        ));
        assert_eq!(
            Command::parse(&cdb(&[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0])),
            Err(Sense::INVALID_FIELD_IN_CDB),
            "RDPROTECT without protection information"
        );
        assert_eq!(check_range(at(10, 6), 16), Ok(()));
        assert_eq!(check_range(at(10, 7), 16), Err(Sense::LBA_OUT_OF_RANGE));
        assert_eq!(
            check_range(at(u64::MAX, 2), 16),
            Err(Sense::LBA_OUT_OF_RANGE)
        );
    }

    #[test]
    fn unknown_commands_and_bad_fields_get_sense() {
        assert_eq!(
            Command::parse(&cdb(&[0xc0])),
            Ok(Command::Unsupported(0xc0))
        );
        assert_eq!(
            Command::parse(&cdb(&[0x9e, 0x1f])),
            Ok(Command::Unsupported(0x9e))
        );
        assert_eq!(
            Command::parse(&cdb(&[0x12, 0x00, 0x80])),
            Err(Sense::INVALID_FIELD_IN_CDB)
        );
        let s = Sense::INVALID_OPCODE.fixed();
        assert_eq!((s[0], s[2], s[7], s[12], s[13]), (0x70, 5, 10, 0x20, 0));
    }

    #[test]
    fn inquiry_and_vpd_pages() {
        let d = inquiry(&id());
        assert_eq!(d.len(), 96);
        assert_eq!(&d[8..16], b"VSTREAM ");
        assert_eq!(&d[16..32], b"vDisk golden    ");
        assert_eq!(d[2], 6);
        let p0 = vpd_page(0, &id(), &LIMITS).unwrap();
        assert_eq!(&p0[4..], &VPD_PAGES);
        let p83 = vpd_page(0x83, &id(), &LIMITS).unwrap();
        assert_eq!(&p83[4..8], &[0x01, 0x03, 0x00, 16]);
        assert_eq!(p83[8] >> 4, 6, "NAA IEEE Registered Extended");
        assert_eq!(u16::from_be_bytes([p83[2], p83[3]]) as usize, p83.len() - 4);
        let p80 = vpd_page(0x80, &id(), &LIMITS).unwrap();
        assert_eq!(&p80[4..], b"d41d8cd98f00b204");
        let b2 = vpd_page(0xb2, &id(), &LIMITS).unwrap();
        assert_eq!(b2[5] & 0x80, 0x80, "LBPU");
        let b0 = vpd_page(0xb0, &id(), &LIMITS).unwrap();
        assert_eq!(b0.len(), 0x40);
        assert_eq!(
            vpd_page(0x99, &id(), &LIMITS),
            Err(Sense::INVALID_FIELD_IN_CDB)
        );
    }

    #[test]
    fn capacity_and_luns() {
        assert_eq!(read_capacity10(16, 512), [0, 0, 0, 15, 0, 0, 2, 0]);
        assert_eq!(&read_capacity10(1 << 33, 512)[..4], &[0xff; 4]);
        let rc16 = read_capacity16(1 << 33, 512, &LIMITS);
        assert_eq!(
            u64::from_be_bytes(rc16[..8].try_into().unwrap()),
            (1 << 33) - 1
        );
        assert_eq!(rc16[14], 0xc0, "LBPME and LBPRZ");
        assert_eq!(
            report_luns(&[0]),
            [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn mode_sense_six_and_ten() {
        let info = ModeInfo {
            blocks: 2048,
            block_len: 512,
            read_only: true,
            write_cache: true,
        };
        let cmd = Command::parse(&cdb(&[0x1a, 0, 0x3f, 0, 255])).unwrap();
        let d = mode_sense(&cmd, &info).unwrap();
        assert_eq!(d[0] as usize, d.len() - 1);
        assert_eq!(d[2], 0x90, "WP and DPOFUA");
        assert_eq!(d[3], 8);
        assert_eq!(d.len(), 4 + 8 + 20 + 12 + 12);
        let cmd = Command::parse(&cdb(&[0x5a, 0x08, 0x08, 0, 0, 0, 0, 0, 255])).unwrap();
        let d = mode_sense(&cmd, &info).unwrap();
        assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize, d.len() - 2);
        assert_eq!((d[8], d[10] & 0x04), (0x08, 0x04), "caching page, WCE");
        let saved = Command::parse(&cdb(&[0x1a, 0, 0xc8, 0, 255])).unwrap();
        assert_eq!(mode_sense(&saved, &info), Err(Sense::SAVING_NOT_SUPPORTED));
        let odd = Command::parse(&cdb(&[0x1a, 0, 0x19, 0, 255])).unwrap();
        assert_eq!(mode_sense(&odd, &info), Err(Sense::INVALID_FIELD_IN_CDB));
    }

    #[test]
    fn supported_opcodes_lists_and_single_commands() {
        let all = Command::parse(&cdb(&[0xa3, 0x0c, 0x00, 0, 0, 0, 0, 0, 0xff, 0xff])).unwrap();
        let d = supported_opcodes(&all).unwrap();
        let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
        assert_eq!(n, d.len() - 4);
        assert_eq!(n % 8, 0);
        let one = Command::parse(&cdb(&[0xa3, 0x0c, 0x01, 0x28, 0, 0, 0, 0, 0xff, 0xff])).unwrap();
        let d = supported_opcodes(&one).unwrap();
        assert_eq!(
            (d[1] & 7, d[3], d[5] & 0x18),
            (3, 10, 0x18),
            "READ10 with DPO and FUA"
        );
        let sa =
            Command::parse(&cdb(&[0xa3, 0x0c, 0x01, 0x9e, 0, 0x10, 0, 0, 0xff, 0xff])).unwrap();
        assert_eq!(supported_opcodes(&sa), Err(Sense::INVALID_FIELD_IN_CDB));
        let sa =
            Command::parse(&cdb(&[0xa3, 0x0c, 0x02, 0x9e, 0, 0x10, 0, 0, 0xff, 0xff])).unwrap();
        assert_eq!(supported_opcodes(&sa).unwrap()[1] & 7, 3);
        let none = Command::parse(&cdb(&[0xa3, 0x0c, 0x01, 0xc5, 0, 0, 0, 0, 0xff, 0xff])).unwrap();
        assert_eq!(supported_opcodes(&none).unwrap(), [0, 1, 0, 0]);
        let timeouts =
            Command::parse(&cdb(&[0xa3, 0x0c, 0x81, 0x28, 0, 0, 0, 0, 0xff, 0xff])).unwrap();
        assert_eq!(supported_opcodes(&timeouts).unwrap().len(), 4 + 10 + 12);
    }

    #[test]
    fn unmap_parameter_lists() {
        let mut p = vec![0, 22, 0, 16, 0, 0, 0, 0];
        p.extend_from_slice(&8u64.to_be_bytes());
        p.extend_from_slice(&8u32.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
        assert_eq!(
            unmap_descriptors(&p, 100, &LIMITS),
            Ok(vec![Extent { lba: 8, blocks: 8 }])
        );
        assert_eq!(
            unmap_descriptors(&p, 10, &LIMITS),
            Err(Sense::LBA_OUT_OF_RANGE)
        );
        p[3] = 32; // more descriptors than sent
        assert_eq!(
            unmap_descriptors(&p, 100, &LIMITS),
            Err(Sense::PARAMETER_LIST_LENGTH_ERROR)
        );
        assert_eq!(unmap_descriptors(&[], 100, &LIMITS), Ok(vec![]));
        assert_eq!(
            unmap_descriptors(&[0, 1], 100, &LIMITS),
            Err(Sense::PARAMETER_LIST_LENGTH_ERROR)
        );
        let s = lba_status(&[LbaStatus {
            at: Extent { lba: 0, blocks: 4 },
            deallocated: true,
        }]);
        assert_eq!(s.len(), 24);
        assert_eq!(u32::from_be_bytes(s[..4].try_into().unwrap()), 20);
        assert_eq!(s[20], 1);
    }
}
