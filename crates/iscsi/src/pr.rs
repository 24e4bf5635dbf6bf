//! Persistent reservations (SPC-4 §5.13, §6.15, §6.16): the PERSISTENT
//! RESERVE IN and OUT service actions, the OUT parameter list, the IN
//! parameter data, and the table of which commands a reservation lets
//! through from an I_T nexus that does not hold it. No state: the target
//! keeps the registrations of each logical unit and asks these.

use crate::scsi::{Command, Sense};

/// The six reservation types (the TYPE field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    WriteExclusive,
    ExclusiveAccess,
    WriteExclusiveRegistrantsOnly,
    ExclusiveAccessRegistrantsOnly,
    WriteExclusiveAllRegistrants,
    ExclusiveAccessAllRegistrants,
}

impl Type {
    pub fn from_code(code: u8) -> Option<Type> {
        Some(match code {
            1 => Type::WriteExclusive,
            3 => Type::ExclusiveAccess,
            5 => Type::WriteExclusiveRegistrantsOnly,
            6 => Type::ExclusiveAccessRegistrantsOnly,
            7 => Type::WriteExclusiveAllRegistrants,
            8 => Type::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    pub fn code(self) -> u8 {
        match self {
            Type::WriteExclusive => 1,
            Type::ExclusiveAccess => 3,
            Type::WriteExclusiveRegistrantsOnly => 5,
            Type::ExclusiveAccessRegistrantsOnly => 6,
            Type::WriteExclusiveAllRegistrants => 7,
            Type::ExclusiveAccessAllRegistrants => 8,
        }
    }

    /// Every registered I_T nexus holds the reservation.
    pub fn all_registrants(self) -> bool {
        matches!(
            self,
            Type::WriteExclusiveAllRegistrants | Type::ExclusiveAccessAllRegistrants
        )
    }

    /// Registered I_T nexuses other than the holder get access too (the
    /// "registrants only" and "all registrants" types).
    pub fn registrants_enter(self) -> bool {
        !matches!(self, Type::WriteExclusive | Type::ExclusiveAccess)
    }

    /// Others may still read.
    pub fn write_exclusive(self) -> bool {
        matches!(
            self,
            Type::WriteExclusive
                | Type::WriteExclusiveRegistrantsOnly
                | Type::WriteExclusiveAllRegistrants
        )
    }
}

/// The PERSISTENT RESERVE IN service actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum In {
    ReadKeys,
    ReadReservation,
    ReportCapabilities,
    ReadFullStatus,
}

impl In {
    pub fn from_code(code: u8) -> Option<In> {
        Some(match code {
            0 => In::ReadKeys,
            1 => In::ReadReservation,
            2 => In::ReportCapabilities,
            3 => In::ReadFullStatus,
            _ => return None,
        })
    }
}

/// The PERSISTENT RESERVE OUT service actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    Register,
    Reserve,
    Release,
    Clear,
    Preempt,
    PreemptAndAbort,
    RegisterAndIgnoreExistingKey,
    RegisterAndMove,
}

impl Out {
    pub fn from_code(code: u8) -> Option<Out> {
        Some(match code {
            0 => Out::Register,
            1 => Out::Reserve,
            2 => Out::Release,
            3 => Out::Clear,
            4 => Out::Preempt,
            5 => Out::PreemptAndAbort,
            6 => Out::RegisterAndIgnoreExistingKey,
            7 => Out::RegisterAndMove,
            _ => return None,
        })
    }
}

/// The PERSISTENT RESERVE OUT basic parameter list (24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutParams {
    /// RESERVATION KEY: the key the sender is registered with.
    pub key: u64,
    /// SERVICE ACTION RESERVATION KEY: the new key, or the one preempted.
    pub sa_key: u64,
    pub spec_i_pt: bool,
    pub all_tg_pt: bool,
    pub aptpl: bool,
}

/// The length of the basic parameter list.
pub const OUT_PARAMS_LEN: u32 = 24;

/// Decodes the parameter list of a PERSISTENT RESERVE OUT whose CDB said
/// `len` bytes. Only the basic list is taken: this target offers neither
/// SPEC_I_PT nor ALL_TG_PT nor APTPL (REPORT CAPABILITIES says so), so a
/// list asking for them is refused, as SPC-4 says.
pub fn out_params(data: &[u8], len: u32) -> Result<OutParams, Sense> {
    if len != OUT_PARAMS_LEN || data.len() < OUT_PARAMS_LEN as usize {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let u64at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&data[i..i + 8]);
        u64::from_be_bytes(b)
    };
    let p = OutParams {
        key: u64at(0),
        sa_key: u64at(8),
        spec_i_pt: data[20] & 0x08 != 0,
        all_tg_pt: data[20] & 0x04 != 0,
        aptpl: data[20] & 0x01 != 0,
    };
    if p.spec_i_pt || p.all_tg_pt || p.aptpl {
        return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
    }
    Ok(p)
}

/// The basic parameter list, as an initiator sends it (for tests and
/// tools).
pub fn encode_out_params(p: &OutParams) -> Vec<u8> {
    let mut d = vec![0u8; OUT_PARAMS_LEN as usize];
    d[0..8].copy_from_slice(&p.key.to_be_bytes());
    d[8..16].copy_from_slice(&p.sa_key.to_be_bytes());
    d[20] = (p.spec_i_pt as u8) << 3 | (p.all_tg_pt as u8) << 2 | p.aptpl as u8;
    d
}

/// READ KEYS data: the generation and every registered key. The
/// additional length is the whole list's, whatever the allocation length
/// cuts.
pub fn read_keys(generation: u32, keys: &[u64]) -> Vec<u8> {
    let mut d = generation.to_be_bytes().to_vec();
    d.extend_from_slice(&((keys.len() * 8) as u32).to_be_bytes());
    for k in keys {
        d.extend_from_slice(&k.to_be_bytes());
    }
    d
}

/// READ RESERVATION data: the generation and the reservation, if any,
/// with its key (0 for an all-registrants one) and type, LU scope.
pub fn read_reservation(generation: u32, reservation: Option<(u64, Type)>) -> Vec<u8> {
    let mut d = generation.to_be_bytes().to_vec();
    match reservation {
        None => d.extend_from_slice(&[0; 4]),
        Some((key, ty)) => {
            d.extend_from_slice(&16u32.to_be_bytes());
            d.extend_from_slice(&key.to_be_bytes());
            d.extend_from_slice(&[0; 4]); // obsolete
            d.push(0); // reserved
            d.push(ty.code()); // scope 0 (LU) in the high nibble
            d.extend_from_slice(&[0; 2]); // obsolete
        }
    }
    d
}

/// REPORT CAPABILITIES data: no compatible reservation handling, no
/// SPEC_I_PT, no ALL_TG_PT, no APTPL; the type mask valid with all six
/// types; ALLOW COMMANDS 0 (the table of SPC-4 is followed, see
/// [`conflicts`]).
pub fn report_capabilities() -> Vec<u8> {
    let mut d = vec![0u8; 8];
    d[0..2].copy_from_slice(&8u16.to_be_bytes());
    // CRH 0: RESERVE(6) and RELEASE(6) get RESERVATION CONFLICT while
    // any I_T nexus is registered (SPC-4 §5.13.1), without §5.13.3's
    // exceptions.
    // TMV: the type mask is valid.
    d[3] = 0x80;
    let mask: u16 = [
        Type::ExclusiveAccessAllRegistrants,
        Type::WriteExclusive,
        Type::ExclusiveAccess,
        Type::WriteExclusiveRegistrantsOnly,
        Type::ExclusiveAccessRegistrantsOnly,
        Type::WriteExclusiveAllRegistrants,
    ]
    .iter()
    .map(|t| type_mask_bit(*t))
    .fold(0, |a, b| a | b);
    d[4..6].copy_from_slice(&mask.to_be_bytes());
    d
}

/// The bit of a type in REPORT CAPABILITIES' type mask.
fn type_mask_bit(t: Type) -> u16 {
    match t {
        Type::WriteExclusiveAllRegistrants => 1 << 15,
        Type::ExclusiveAccessRegistrantsOnly => 1 << 14,
        Type::WriteExclusiveRegistrantsOnly => 1 << 13,
        Type::ExclusiveAccess => 1 << 11,
        Type::WriteExclusive => 1 << 9,
        Type::ExclusiveAccessAllRegistrants => 1,
    }
}

/// One registration, for READ FULL STATUS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registrant {
    pub key: u64,
    /// The reservation this I_T nexus holds, if it holds it.
    pub holds: Option<Type>,
    /// The iSCSI initiator name and ISID of its I_T nexus.
    pub initiator: String,
    pub isid: [u8; 6],
    /// RELATIVE TARGET PORT IDENTIFIER.
    pub target_port: u16,
}

/// An iSCSI TransportID (SPC-4 §7.6.4.6) for an initiator port: format
/// 01b, `NAME,i,0xISID`, NUL-terminated and padded to a multiple of 4.
pub fn transport_id(initiator: &str, isid: &[u8; 6]) -> Vec<u8> {
    let mut name = format!("{initiator},i,0x");
    for b in isid {
        name.push_str(&format!("{b:02x}"));
    }
    let mut body = name.into_bytes();
    body.push(0);
    while body.len() % 4 != 0 {
        body.push(0);
    }
    let mut d = vec![0x40 | 0x05, 0];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend(body);
    d
}

/// READ FULL STATUS data: a descriptor per registration.
pub fn read_full_status(generation: u32, registrants: &[Registrant]) -> Vec<u8> {
    let mut list = Vec::new();
    for r in registrants {
        let tid = transport_id(&r.initiator, &r.isid);
        list.extend_from_slice(&r.key.to_be_bytes());
        list.extend_from_slice(&[0; 4]);
        // ALL_TG_PT 0; R_HOLDER when it holds the reservation.
        list.push(if r.holds.is_some() { 0x01 } else { 0 });
        list.push(r.holds.map_or(0, |t| t.code()));
        list.extend_from_slice(&[0; 4]);
        list.extend_from_slice(&r.target_port.to_be_bytes());
        list.extend_from_slice(&(tid.len() as u32).to_be_bytes());
        list.extend(tid);
    }
    let mut d = generation.to_be_bytes().to_vec();
    d.extend_from_slice(&(list.len() as u32).to_be_bytes());
    d.extend(list);
    d
}

/// What a command does, as the reservation table sorts commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Allowed whatever the reservation: INQUIRY, REPORT LUNS, REQUEST
    /// SENSE, TEST UNIT READY, READ CAPACITY, PERSISTENT RESERVE IN, and
    /// PERSISTENT RESERVE OUT (its service actions decide for
    /// themselves).
    Any,
    /// Reads the medium or what the logical unit says of itself (READ,
    /// VERIFY, PRE-FETCH, GET LBA STATUS, MODE SENSE, REPORT SUPPORTED
    /// OPERATION CODES): allowed by the write-exclusive types.
    Read,
    /// Changes the medium or the logical unit (WRITE, WRITE SAME, UNMAP,
    /// ORWRITE, SYNCHRONIZE CACHE, MODE SELECT, START STOP UNIT, PREVENT
    /// ALLOW MEDIUM REMOVAL) and anything not named above.
    Write,
}

/// Where `cmd` sits in the reservation table.
pub fn access(cmd: &Command) -> Access {
    match cmd {
        Command::Inquiry { .. }
        | Command::ReportLuns { .. }
        | Command::RequestSense { .. }
        | Command::TestUnitReady
        | Command::ReadCapacity10
        | Command::ReadCapacity16 { .. }
        | Command::PersistentReserveIn { .. }
        | Command::PersistentReserveOut { .. } => Access::Any,
        Command::Read { .. }
        | Command::Verify { .. }
        | Command::PreFetch { .. }
        | Command::GetLbaStatus { .. }
        | Command::ModeSense { .. }
        | Command::ReportSupportedOpcodes { .. } => Access::Read,
        _ => Access::Write,
    }
}

/// Whether a command of `access`, from an I_T nexus that does not hold a
/// reservation of type `ty` (registered or not), gets RESERVATION
/// CONFLICT (SPC-4 table 66 and SBC-3 table 13, "commands that are allowed
/// in the presence of various reservations").
pub fn conflicts(access: Access, ty: Type, registered: bool) -> bool {
    if registered && ty.registrants_enter() {
        return false;
    }
    match access {
        Access::Any => false,
        Access::Read => !ty.write_exclusive(),
        Access::Write => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Type; 6] = [
        Type::WriteExclusive,
        Type::ExclusiveAccess,
        Type::WriteExclusiveRegistrantsOnly,
        Type::ExclusiveAccessRegistrantsOnly,
        Type::WriteExclusiveAllRegistrants,
        Type::ExclusiveAccessAllRegistrants,
    ];

    #[test]
    fn types_round_trip_and_others_are_none() {
        for t in ALL {
            assert_eq!(Type::from_code(t.code()), Some(t));
        }
        for c in [0, 2, 4, 9, 15] {
            assert_eq!(Type::from_code(c), None, "{c}");
        }
    }

    #[test]
    fn the_parameter_list_reads_keys_and_refuses_what_is_not_offered() {
        let p = OutParams {
            key: 0x1122_3344_5566_7788,
            sa_key: 0xdead_beef,
            ..Default::default()
        };
        let bytes = encode_out_params(&p);
        assert_eq!(out_params(&bytes, 24), Ok(p));
        assert_eq!(
            out_params(&bytes, 23),
            Err(Sense::PARAMETER_LIST_LENGTH_ERROR)
        );
        assert_eq!(
            out_params(&bytes[..20], 24),
            Err(Sense::PARAMETER_LIST_LENGTH_ERROR)
        );
        for bit in [0x01, 0x04, 0x08] {
            let mut b = bytes.clone();
            b[20] = bit;
            assert_eq!(
                out_params(&b, 24),
                Err(Sense::INVALID_FIELD_IN_PARAMETERS),
                "{bit:#x}"
            );
        }
    }

    #[test]
    fn read_keys_says_the_whole_length_and_each_key() {
        let d = read_keys(7, &[1, 0xabcd]);
        assert_eq!(&d[0..4], &7u32.to_be_bytes());
        assert_eq!(&d[4..8], &16u32.to_be_bytes());
        assert_eq!(&d[8..16], &1u64.to_be_bytes());
        assert_eq!(&d[16..24], &0xabcdu64.to_be_bytes());
        // Cut to 8 bytes, the length still tells the whole list.
        assert_eq!(&crate::scsi::truncate(d, 8)[4..8], &16u32.to_be_bytes());
        assert_eq!(read_keys(0, &[]), vec![0; 8]);
    }

    #[test]
    fn read_reservation_has_key_and_type_or_nothing() {
        assert_eq!(read_reservation(3, None), [0, 0, 0, 3, 0, 0, 0, 0]);
        let d = read_reservation(4, Some((0x55, Type::ExclusiveAccessRegistrantsOnly)));
        assert_eq!(d.len(), 24);
        assert_eq!(&d[4..8], &16u32.to_be_bytes());
        assert_eq!(&d[8..16], &0x55u64.to_be_bytes());
        assert_eq!(d[21], 0x06, "LU scope, type 6");
    }

    #[test]
    fn report_capabilities_offers_the_six_types_and_nothing_else() {
        let d = report_capabilities();
        assert_eq!(d.len(), 8);
        assert_eq!(u16::from_be_bytes([d[0], d[1]]), 8);
        assert_eq!(d[2] & 0x0d, 0, "no SIP_C, ATP_C, PTPL_C");
        assert_eq!(d[3] & 0x80, 0x80, "TMV");
        assert_eq!(d[3] & 0x70, 0, "ALLOW COMMANDS 0");
        let mask = u16::from_be_bytes([d[4], d[5]]);
        assert_eq!(mask, 0xea01);
    }

    #[test]
    fn a_transport_id_names_the_initiator_port() {
        let t = transport_id("iqn.x:a", &[0x80, 0, 0x12, 0x34, 0, 1]);
        assert_eq!(t[0], 0x45, "format 01b, iSCSI");
        let len = u16::from_be_bytes([t[2], t[3]]) as usize;
        assert_eq!(len % 4, 0);
        assert_eq!(t.len(), 4 + len);
        let name = std::str::from_utf8(&t[4..]).unwrap().trim_end_matches('\0');
        assert_eq!(name, "iqn.x:a,i,0x800012340001");
        let full = read_full_status(
            9,
            &[Registrant {
                key: 5,
                holds: Some(Type::WriteExclusive),
                initiator: "iqn.x:a".into(),
                isid: [0x80, 0, 0x12, 0x34, 0, 1],
                target_port: 1,
            }],
        );
        assert_eq!(&full[0..4], &9u32.to_be_bytes());
        assert_eq!(
            u32::from_be_bytes([full[4], full[5], full[6], full[7]]) as usize,
            full.len() - 8
        );
        assert_eq!(&full[8..16], &5u64.to_be_bytes());
        assert_eq!(full[20], 1, "R_HOLDER");
        assert_eq!(full[21], 1, "type");
        assert_eq!(&full[26..28], &1u16.to_be_bytes());
        assert_eq!(&full[32..], &t[..]);
    }

    #[test]
    fn commands_are_sorted_as_the_table_says() {
        let parse = |b: &[u8]| {
            let mut c = [0u8; 16];
            c[..b.len()].copy_from_slice(b);
            Command::parse(&c).unwrap()
        };
        assert_eq!(access(&parse(&[0x00])), Access::Any, "TUR");
        assert_eq!(access(&parse(&[0x12, 0, 0, 0, 36])), Access::Any);
        assert_eq!(access(&parse(&[0x25])), Access::Any, "READ CAPACITY");
        assert_eq!(access(&parse(&[0x5e, 0x00])), Access::Any, "PRIN");
        assert_eq!(access(&parse(&[0x5f, 0x01, 0x01])), Access::Any, "PROUT");
        assert_eq!(access(&parse(&[0x28])), Access::Read, "READ(10)");
        assert_eq!(access(&parse(&[0x1a, 0, 0x3f])), Access::Read);
        assert_eq!(access(&parse(&[0x2a])), Access::Write, "WRITE(10)");
        assert_eq!(access(&parse(&[0x35])), Access::Write, "SYNCHRONIZE CACHE");
        assert_eq!(access(&parse(&[0x42])), Access::Write, "UNMAP");
    }

    #[test]
    fn the_cdbs_decode_and_bad_service_actions_are_refused() {
        let mut c = [0u8; 16];
        c[0] = 0x5e;
        c[1] = 0x01;
        c[7..9].copy_from_slice(&300u16.to_be_bytes());
        assert_eq!(
            Command::parse(&c),
            Ok(Command::PersistentReserveIn {
                action: In::ReadReservation,
                alloc: 300
            })
        );
        for sa in 4..0x20 {
            c[1] = sa;
            assert_eq!(Command::parse(&c), Err(Sense::INVALID_FIELD_IN_CDB), "{sa}");
        }
        let mut c = [0u8; 16];
        c[0] = 0x5f;
        c[1] = 0x04;
        c[2] = 0x03;
        c[5..9].copy_from_slice(&24u32.to_be_bytes());
        assert_eq!(
            Command::parse(&c),
            Ok(Command::PersistentReserveOut {
                action: Out::Preempt,
                scope: 0,
                ty: 3,
                len: 24
            })
        );
        c[1] = 0x08;
        assert_eq!(Command::parse(&c), Err(Sense::INVALID_FIELD_IN_CDB));
    }

    #[test]
    fn the_conflict_table_follows_spc4() {
        // (type, registered reader, registered writer, unregistered
        // reader, unregistered writer) may go on: libiscsi's
        // ProutReserve.Access* expectations, which are SPC-4's.
        let table = [
            (Type::ExclusiveAccess, false, false, false, false),
            (Type::WriteExclusive, true, false, true, false),
            (
                Type::ExclusiveAccessRegistrantsOnly,
                true,
                true,
                false,
                false,
            ),
            (Type::WriteExclusiveRegistrantsOnly, true, true, true, false),
            (
                Type::ExclusiveAccessAllRegistrants,
                true,
                true,
                false,
                false,
            ),
            (Type::WriteExclusiveAllRegistrants, true, true, true, false),
        ];
        for (ty, rr, rw, ur, uw) in table {
            assert_eq!(!conflicts(Access::Read, ty, true), rr, "{ty:?}");
            assert_eq!(!conflicts(Access::Write, ty, true), rw, "{ty:?}");
            assert_eq!(!conflicts(Access::Read, ty, false), ur, "{ty:?}");
            assert_eq!(!conflicts(Access::Write, ty, false), uw, "{ty:?}");
            assert!(!conflicts(Access::Any, ty, false), "{ty:?}");
        }
    }
}
