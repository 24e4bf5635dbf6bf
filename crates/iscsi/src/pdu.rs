//! iSCSI PDUs (RFC 7143 §11): the 48-byte Basic Header Segment, the
//! additional header segments and the data segment, framed and unframed;
//! and the typed messages of each opcode, for both directions.
//!
//! ```text
//!   0      1      2      3      4      5..7        8..15        16..19  20..47
//!   I|op   flags  ....opcode.... AHSlen DataSegLen  LUN/ISID...  ITT     ...opcode...
//!   [AHS: AHSlen × 4 bytes] [data: DataSegLen bytes, padded to 4]
//! ```
//!
//! No digests: a target of vstream answers `HeaderDigest=None` and
//! `DataDigest=None`, which every initiator accepts.

use crate::PduError;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// The Initiator Task Tag (and Target Transfer Tag) that means "none".
pub const RESERVED_TAG: u32 = 0xffff_ffff;
/// Most AHS bytes accepted (the field counts 4-byte words in one byte).
const MAX_AHS: usize = 255 * 4;

/// The opcodes, without the immediate bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    NopOut = 0x00,
    ScsiCommand = 0x01,
    TaskMgmtRequest = 0x02,
    LoginRequest = 0x03,
    TextRequest = 0x04,
    DataOut = 0x05,
    LogoutRequest = 0x06,
    SnackRequest = 0x10,
    NopIn = 0x20,
    ScsiResponse = 0x21,
    TaskMgmtResponse = 0x22,
    LoginResponse = 0x23,
    TextResponse = 0x24,
    DataIn = 0x25,
    LogoutResponse = 0x26,
    R2t = 0x31,
    AsyncMessage = 0x32,
    Reject = 0x3f,
}

impl Opcode {
    pub fn from_u8(v: u8) -> Option<Opcode> {
        use Opcode::*;
        Some(match v & 0x3f {
            0x00 => NopOut,
            0x01 => ScsiCommand,
            0x02 => TaskMgmtRequest,
            0x03 => LoginRequest,
            0x04 => TextRequest,
            0x05 => DataOut,
            0x06 => LogoutRequest,
            0x10 => SnackRequest,
            0x20 => NopIn,
            0x21 => ScsiResponse,
            0x22 => TaskMgmtResponse,
            0x23 => LoginResponse,
            0x24 => TextResponse,
            0x25 => DataIn,
            0x26 => LogoutResponse,
            0x31 => R2t,
            0x32 => AsyncMessage,
            0x3f => Reject,
            _ => return None,
        })
    }
}

/// A Basic Header Segment, read and written by field.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bhs")
            .field("opcode", &format_args!("{:#04x}", self.0[0] & 0x3f))
            .field("itt", &format_args!("{:#x}", self.itt()))
            .finish_non_exhaustive()
    }
}

impl Default for Bhs {
    fn default() -> Bhs {
        Bhs([0; BHS_LEN])
    }
}

impl Bhs {
    fn new(op: Opcode, immediate: bool, flags: u8) -> Bhs {
        let mut b = Bhs::default();
        b.0[0] = op as u8 | if immediate { 0x40 } else { 0 };
        b.0[1] = flags;
        b
    }
    /// The opcode byte without the immediate bit.
    pub fn opcode_byte(&self) -> u8 {
        self.0[0] & 0x3f
    }
    pub fn opcode(&self) -> Option<Opcode> {
        Opcode::from_u8(self.0[0])
    }
    /// The I bit: a request for immediate delivery.
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    /// The F (final) bit, or T (transit) in login PDUs.
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }
    pub fn ahs_len(&self) -> usize {
        self.0[4] as usize * 4
    }
    pub fn data_len(&self) -> usize {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]]) as usize
    }
    fn set_data_len(&mut self, n: usize) {
        let n = (n as u32).to_be_bytes();
        self.0[5..8].copy_from_slice(&n[1..]);
    }
    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_be_bytes([self.0[off], self.0[off + 1]])
    }
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_be_bytes(self.0[off..off + 4].try_into().expect("4 bytes"))
    }
    pub fn u64_at(&self, off: usize) -> u64 {
        u64::from_be_bytes(self.0[off..off + 8].try_into().expect("8 bytes"))
    }
    fn set_u16(&mut self, off: usize, v: u16) {
        self.0[off..off + 2].copy_from_slice(&v.to_be_bytes());
    }
    fn set_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn set_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }
    /// The LUN field (bytes 8..16), as sent.
    pub fn lun(&self) -> u64 {
        self.u64_at(8)
    }
    /// The Initiator Task Tag.
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
}

/// A PDU as framed on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pdu {
    pub bhs: Bhs,
    /// Additional header segments, as sent (no vstream PDU carries one).
    pub ahs: Vec<u8>,
    pub data: Vec<u8>,
}

fn padded(n: usize) -> usize {
    n.div_ceil(4) * 4
}

impl Pdu {
    /// The PDU at the start of `buf`: `Ok(None)` while it is not all there;
    /// an error when it can never be one this side accepts (a data segment
    /// over `max_data`, its MaxRecvDataSegmentLength; an unknown opcode is
    /// left to the caller, which rejects it and goes on).
    pub fn decode(buf: &[u8], max_data: usize) -> Result<Option<(Pdu, usize)>, PduError> {
        if buf.len() < BHS_LEN {
            return Ok(None);
        }
        let bhs = Bhs(buf[..BHS_LEN].try_into().expect("48 bytes"));
        let (ahs_len, data_len) = (bhs.ahs_len(), bhs.data_len());
        if data_len > max_data {
            return Err(PduError::DataTooLong {
                len: data_len,
                max: max_data,
            });
        }
        let total = BHS_LEN + ahs_len + padded(data_len);
        if buf.len() < total {
            return Ok(None);
        }
        let ahs = buf[BHS_LEN..BHS_LEN + ahs_len].to_vec();
        let start = BHS_LEN + ahs_len;
        let data = buf[start..start + data_len].to_vec();
        Ok(Some((Pdu { bhs, ahs, data }, total)))
    }

    /// Appends the PDU, padded, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.encode_with(&self.data, out)
    }

    /// Appends the PDU with `data` as its data segment (in place of its
    /// own), padded, to `out`: a Data-In's data goes from the read buffer
    /// to the wire buffer with one copy.
    pub fn encode_with(&self, data: &[u8], out: &mut Vec<u8>) {
        let mut bhs = self.bhs;
        let ahs = &self.ahs[..self.ahs.len().min(MAX_AHS) / 4 * 4];
        bhs.0[4] = (ahs.len() / 4) as u8;
        bhs.set_data_len(data.len());
        out.reserve(BHS_LEN + ahs.len() + padded(data.len()));
        out.extend_from_slice(&bhs.0);
        out.extend_from_slice(ahs);
        out.extend_from_slice(data);
        out.resize(out.len() + padded(data.len()) - data.len(), 0);
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(BHS_LEN + padded(self.data.len()));
        self.encode(&mut out);
        out
    }
}

/// The sequence numbers every target PDU carries after its tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TargetSn {
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

impl TargetSn {
    fn write(&self, b: &mut Bhs) {
        b.set_u32(24, self.stat_sn);
        b.set_u32(28, self.exp_cmd_sn);
        b.set_u32(32, self.max_cmd_sn);
    }
    fn read(b: &Bhs) -> TargetSn {
        TargetSn {
            stat_sn: b.u32_at(24),
            exp_cmd_sn: b.u32_at(28),
            max_cmd_sn: b.u32_at(32),
        }
    }
}

/// The login stages (CSG, NSG).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Security = 0,
    Operational = 1,
    FullFeature = 3,
}

impl Stage {
    fn from_bits(v: u8) -> Result<Stage, PduError> {
        match v & 3 {
            0 => Ok(Stage::Security),
            1 => Ok(Stage::Operational),
            3 => Ok(Stage::FullFeature),
            _ => Err(PduError::Malformed("login stage 2 is reserved")),
        }
    }
}

// ---------------------------------------------------------------------------
// Initiator to target
// ---------------------------------------------------------------------------

/// NOP-Out: a ping (ITT set, answered by NOP-In) or the answer to a
/// target's ping (TTT set, ITT reserved).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: Vec<u8>,
}

/// SCSI Command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiCommand {
    pub immediate: bool,
    /// F: no unsolicited Data-Out follows.
    pub final_bit: bool,
    /// R: data flows to the initiator.
    pub read: bool,
    /// W: data flows to the target.
    pub write: bool,
    /// The task attribute (simple, ordered, head of queue, ACA).
    pub attr: u8,
    pub lun: u64,
    pub itt: u32,
    pub expected_len: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub cdb: [u8; 16],
    /// Immediate data.
    pub data: Vec<u8>,
}

/// Task Management Function Request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    pub function: u8,
    pub lun: u64,
    pub itt: u32,
    pub referenced_itt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

/// Login Request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub cont: bool,
    pub csg: Stage,
    pub nsg: Stage,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    /// Text keys, `key=value\0` each.
    pub data: Vec<u8>,
}

/// Text Request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_bit: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: Vec<u8>,
}

/// SCSI Data-Out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataOut {
    pub final_bit: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub offset: u32,
    pub data: Vec<u8>,
}

/// Logout Request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogoutRequest {
    pub immediate: bool,
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SNACK Request (only with ErrorRecoveryLevel > 0; rejected here).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnackRequest {
    pub kind: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

/// What an initiator sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmt(TaskMgmtRequest),
    Login(LoginRequest),
    Text(TextRequest),
    DataOut(DataOut),
    Logout(LogoutRequest),
    Snack(SnackRequest),
}

impl Request {
    /// The typed request of `pdu`; an opcode no initiator sends is
    /// [`PduError::UnknownOpcode`] (the target rejects it and goes on).
    pub fn parse(pdu: Pdu) -> Result<Request, PduError> {
        let b = &pdu.bhs;
        let op = match b.opcode() {
            Some(op) => op,
            None => return Err(PduError::UnknownOpcode(b.opcode_byte())),
        };
        let imm = b.immediate();
        Ok(match op {
            Opcode::NopOut => Request::NopOut(NopOut {
                immediate: imm,
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                cmd_sn: b.u32_at(24),
                exp_stat_sn: b.u32_at(28),
                data: pdu.data,
            }),
            Opcode::ScsiCommand => Request::ScsiCommand(ScsiCommand {
                immediate: imm,
                final_bit: b.final_bit(),
                read: b.flags() & 0x40 != 0,
                write: b.flags() & 0x20 != 0,
                attr: b.flags() & 0x07,
                lun: b.lun(),
                itt: b.itt(),
                expected_len: b.u32_at(20),
                cmd_sn: b.u32_at(24),
                exp_stat_sn: b.u32_at(28),
                cdb: b.0[32..48].try_into().expect("16 bytes"),
                data: pdu.data,
            }),
            Opcode::TaskMgmtRequest => Request::TaskMgmt(TaskMgmtRequest {
                immediate: imm,
                function: b.flags() & 0x7f,
                lun: b.lun(),
                itt: b.itt(),
                referenced_itt: b.u32_at(20),
                cmd_sn: b.u32_at(24),
                exp_stat_sn: b.u32_at(28),
                ref_cmd_sn: b.u32_at(32),
                exp_data_sn: b.u32_at(36),
            }),
            Opcode::LoginRequest => {
                let f = b.flags();
                Request::Login(LoginRequest {
                    transit: f & 0x80 != 0,
                    cont: f & 0x40 != 0,
                    csg: Stage::from_bits(f >> 2)?,
                    nsg: Stage::from_bits(f)?,
                    version_max: b.0[2],
                    version_min: b.0[3],
                    isid: b.0[8..14].try_into().expect("6 bytes"),
                    tsih: b.u16_at(14),
                    itt: b.itt(),
                    cid: b.u16_at(20),
                    cmd_sn: b.u32_at(24),
                    exp_stat_sn: b.u32_at(28),
                    data: pdu.data,
                })
            }
            Opcode::TextRequest => Request::Text(TextRequest {
                immediate: imm,
                final_bit: b.final_bit(),
                cont: b.flags() & 0x40 != 0,
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                cmd_sn: b.u32_at(24),
                exp_stat_sn: b.u32_at(28),
                data: pdu.data,
            }),
            Opcode::DataOut => Request::DataOut(DataOut {
                final_bit: b.final_bit(),
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                exp_stat_sn: b.u32_at(28),
                data_sn: b.u32_at(36),
                offset: b.u32_at(40),
                data: pdu.data,
            }),
            Opcode::LogoutRequest => Request::Logout(LogoutRequest {
                immediate: imm,
                reason: b.flags() & 0x7f,
                itt: b.itt(),
                cid: b.u16_at(20),
                cmd_sn: b.u32_at(24),
                exp_stat_sn: b.u32_at(28),
            }),
            Opcode::SnackRequest => Request::Snack(SnackRequest {
                kind: b.flags() & 0x0f,
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                exp_stat_sn: b.u32_at(28),
                beg_run: b.u32_at(40),
                run_length: b.u32_at(44),
            }),
            _ => return Err(PduError::UnknownOpcode(b.opcode_byte())),
        })
    }

    /// The PDU of this request (what an initiator sends: tests, tools).
    pub fn to_pdu(&self) -> Pdu {
        let (bhs, data) = match self {
            Request::NopOut(r) => {
                let mut b = Bhs::new(Opcode::NopOut, r.immediate, 0x80);
                b.set_u64(8, r.lun);
                b.set_u32(16, r.itt);
                b.set_u32(20, r.ttt);
                b.set_u32(24, r.cmd_sn);
                b.set_u32(28, r.exp_stat_sn);
                (b, r.data.clone())
            }
            Request::ScsiCommand(r) => {
                let flags = (r.final_bit as u8) << 7
                    | (r.read as u8) << 6
                    | (r.write as u8) << 5
                    | (r.attr & 7);
                let mut b = Bhs::new(Opcode::ScsiCommand, r.immediate, flags);
                b.set_u64(8, r.lun);
                b.set_u32(16, r.itt);
                b.set_u32(20, r.expected_len);
                b.set_u32(24, r.cmd_sn);
                b.set_u32(28, r.exp_stat_sn);
                b.0[32..48].copy_from_slice(&r.cdb);
                (b, r.data.clone())
            }
            Request::TaskMgmt(r) => {
                let mut b = Bhs::new(
                    Opcode::TaskMgmtRequest,
                    r.immediate,
                    0x80 | (r.function & 0x7f),
                );
                b.set_u64(8, r.lun);
                b.set_u32(16, r.itt);
                b.set_u32(20, r.referenced_itt);
                b.set_u32(24, r.cmd_sn);
                b.set_u32(28, r.exp_stat_sn);
                b.set_u32(32, r.ref_cmd_sn);
                b.set_u32(36, r.exp_data_sn);
                (b, Vec::new())
            }
            Request::Login(r) => {
                let flags =
                    (r.transit as u8) << 7 | (r.cont as u8) << 6 | (r.csg as u8) << 2 | r.nsg as u8;
                let mut b = Bhs::new(Opcode::LoginRequest, true, flags);
                b.0[2] = r.version_max;
                b.0[3] = r.version_min;
                b.0[8..14].copy_from_slice(&r.isid);
                b.set_u16(14, r.tsih);
                b.set_u32(16, r.itt);
                b.set_u16(20, r.cid);
                b.set_u32(24, r.cmd_sn);
                b.set_u32(28, r.exp_stat_sn);
                (b, r.data.clone())
            }
            Request::Text(r) => {
                let flags = (r.final_bit as u8) << 7 | (r.cont as u8) << 6;
                let mut b = Bhs::new(Opcode::TextRequest, r.immediate, flags);
                b.set_u64(8, r.lun);
                b.set_u32(16, r.itt);
                b.set_u32(20, r.ttt);
                b.set_u32(24, r.cmd_sn);
                b.set_u32(28, r.exp_stat_sn);
                (b, r.data.clone())
            }
            Request::DataOut(r) => {
                let mut b = Bhs::new(Opcode::DataOut, false, (r.final_bit as u8) << 7);
                b.set_u64(8, r.lun);
                b.set_u32(16, r.itt);
                b.set_u32(20, r.ttt);
                b.set_u32(28, r.exp_stat_sn);
                b.set_u32(36, r.data_sn);
                b.set_u32(40, r.offset);
                (b, r.data.clone())
            }
            Request::Logout(r) => {
                let mut b = Bhs::new(Opcode::LogoutRequest, r.immediate, 0x80 | (r.reason & 0x7f));
                b.set_u32(16, r.itt);
                b.set_u16(20, r.cid);
                b.set_u32(24, r.cmd_sn);
                b.set_u32(28, r.exp_stat_sn);
                (b, Vec::new())
            }
            Request::Snack(r) => {
                let mut b = Bhs::new(Opcode::SnackRequest, false, 0x80 | (r.kind & 0x0f));
                b.set_u64(8, r.lun);
                b.set_u32(16, r.itt);
                b.set_u32(20, r.ttt);
                b.set_u32(28, r.exp_stat_sn);
                b.set_u32(40, r.beg_run);
                b.set_u32(44, r.run_length);
                (b, Vec::new())
            }
        };
        Pdu {
            bhs,
            ahs: Vec::new(),
            data,
        }
    }
}

// ---------------------------------------------------------------------------
// Target to initiator
// ---------------------------------------------------------------------------

/// NOP-In: the answer to a ping (ITT set), or a ping of the target's own
/// (TTT set, ITT reserved), or a window update (both reserved).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NopIn {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub sn: TargetSn,
    pub data: Vec<u8>,
}

/// SCSI Response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiResponse {
    /// Residual overflow (O) and underflow (U).
    pub overflow: bool,
    pub underflow: bool,
    /// 0: command completed at target.
    pub response: u8,
    /// The SCSI status (GOOD 0, CHECK CONDITION 2, ...).
    pub status: u8,
    pub itt: u32,
    pub sn: TargetSn,
    pub exp_data_sn: u32,
    pub residual: u32,
    /// Sense data, sent as its 2-byte length then the bytes.
    pub sense: Vec<u8>,
}

/// Task Management Function Response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskMgmtResponse {
    pub response: u8,
    pub itt: u32,
    pub sn: TargetSn,
}

/// Login Response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: Stage,
    pub nsg: Stage,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub sn: TargetSn,
    pub status_class: u8,
    pub status_detail: u8,
    pub data: Vec<u8>,
}

/// Text Response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextResponse {
    pub final_bit: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub sn: TargetSn,
    pub data: Vec<u8>,
}

/// SCSI Data-In; with `status`, the command's status too (phase
/// collapse: no SCSI Response follows).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataIn {
    pub final_bit: bool,
    /// A: the initiator should acknowledge it (ERL > 0 only).
    pub ack: bool,
    pub overflow: bool,
    pub underflow: bool,
    pub status: Option<u8>,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    /// StatSN is meaningful only with `status`; ExpCmdSN and MaxCmdSN always.
    pub sn: TargetSn,
    pub data_sn: u32,
    pub offset: u32,
    pub residual: u32,
    pub data: Vec<u8>,
}

/// Ready To Transfer: asks for `len` bytes at `offset` of the command's data.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct R2t {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub sn: TargetSn,
    pub r2t_sn: u32,
    pub offset: u32,
    pub len: u32,
}

/// Logout Response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogoutResponse {
    pub response: u8,
    pub itt: u32,
    pub sn: TargetSn,
    pub time2wait: u16,
    pub time2retain: u16,
}

/// Asynchronous Message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AsyncMessage {
    pub lun: u64,
    pub sn: TargetSn,
    pub event: u8,
    pub vcode: u8,
    pub parameters: [u16; 3],
    pub data: Vec<u8>,
}

/// Reject: the reason, and the header of the PDU rejected.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reject {
    pub reason: u8,
    pub sn: TargetSn,
    pub data_sn: u32,
    pub header: Vec<u8>,
}

/// What a target sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmt(TaskMgmtResponse),
    Login(LoginResponse),
    Text(TextResponse),
    DataIn(DataIn),
    Logout(LogoutResponse),
    R2t(R2t),
    Async(AsyncMessage),
    Reject(Reject),
}

impl Response {
    /// Appends the PDU of this response to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.to_pdu().encode(out)
    }

    pub fn to_pdu(&self) -> Pdu {
        let (bhs, data) = match self {
            Response::NopIn(r) => {
                let mut b = Bhs::new(Opcode::NopIn, false, 0x80);
                b.set_u64(8, r.lun);
                b.set_u32(16, r.itt);
                b.set_u32(20, r.ttt);
                r.sn.write(&mut b);
                (b, r.data.clone())
            }
            Response::ScsiResponse(r) => {
                let flags = 0x80 | (r.overflow as u8) << 2 | (r.underflow as u8) << 1;
                let mut b = Bhs::new(Opcode::ScsiResponse, false, flags);
                b.0[2] = r.response;
                b.0[3] = r.status;
                b.set_u32(16, r.itt);
                r.sn.write(&mut b);
                b.set_u32(36, r.exp_data_sn);
                b.set_u32(44, r.residual);
                let data = if r.sense.is_empty() {
                    Vec::new()
                } else {
                    let mut d = (r.sense.len() as u16).to_be_bytes().to_vec();
                    d.extend_from_slice(&r.sense);
                    d
                };
                (b, data)
            }
            Response::TaskMgmt(r) => {
                let mut b = Bhs::new(Opcode::TaskMgmtResponse, false, 0x80);
                b.0[2] = r.response;
                b.set_u32(16, r.itt);
                r.sn.write(&mut b);
                (b, Vec::new())
            }
            Response::Login(r) => {
                let flags =
                    (r.transit as u8) << 7 | (r.cont as u8) << 6 | (r.csg as u8) << 2 | r.nsg as u8;
                let mut b = Bhs::new(Opcode::LoginResponse, false, flags);
                b.0[2] = r.version_max;
                b.0[3] = r.version_active;
                b.0[8..14].copy_from_slice(&r.isid);
                b.set_u16(14, r.tsih);
                b.set_u32(16, r.itt);
                r.sn.write(&mut b);
                b.0[36] = r.status_class;
                b.0[37] = r.status_detail;
                (b, r.data.clone())
            }
            Response::Text(r) => {
                let flags = (r.final_bit as u8) << 7 | (r.cont as u8) << 6;
                let mut b = Bhs::new(Opcode::TextResponse, false, flags);
                b.set_u64(8, r.lun);
                b.set_u32(16, r.itt);
                b.set_u32(20, r.ttt);
                r.sn.write(&mut b);
                (b, r.data.clone())
            }
            Response::DataIn(r) => {
                let flags = (r.final_bit as u8) << 7
                    | (r.ack as u8) << 6
                    | (r.overflow as u8) << 2
                    | (r.underflow as u8) << 1
                    | r.status.is_some() as u8;
                let mut b = Bhs::new(Opcode::DataIn, false, flags);
                b.0[3] = r.status.unwrap_or(0);
                b.set_u64(8, r.lun);
                b.set_u32(16, r.itt);
                b.set_u32(20, r.ttt);
                r.sn.write(&mut b);
                if r.status.is_none() {
                    b.set_u32(24, 0);
                }
                b.set_u32(36, r.data_sn);
                b.set_u32(40, r.offset);
                b.set_u32(44, r.residual);
                (b, r.data.clone())
            }
            Response::Logout(r) => {
                let mut b = Bhs::new(Opcode::LogoutResponse, false, 0x80);
                b.0[2] = r.response;
                b.set_u32(16, r.itt);
                r.sn.write(&mut b);
                b.set_u16(40, r.time2wait);
                b.set_u16(42, r.time2retain);
                (b, Vec::new())
            }
            Response::R2t(r) => {
                let mut b = Bhs::new(Opcode::R2t, false, 0x80);
                b.set_u64(8, r.lun);
                b.set_u32(16, r.itt);
                b.set_u32(20, r.ttt);
                r.sn.write(&mut b);
                b.set_u32(36, r.r2t_sn);
                b.set_u32(40, r.offset);
                b.set_u32(44, r.len);
                (b, Vec::new())
            }
            Response::Async(r) => {
                let mut b = Bhs::new(Opcode::AsyncMessage, false, 0x80);
                b.set_u64(8, r.lun);
                b.set_u32(16, RESERVED_TAG);
                r.sn.write(&mut b);
                b.0[36] = r.event;
                b.0[37] = r.vcode;
                for (i, p) in r.parameters.iter().enumerate() {
                    b.set_u16(38 + 2 * i, *p);
                }
                (b, r.data.clone())
            }
            Response::Reject(r) => {
                let mut b = Bhs::new(Opcode::Reject, false, 0x80);
                b.0[2] = r.reason;
                b.set_u32(16, RESERVED_TAG);
                r.sn.write(&mut b);
                b.set_u32(36, r.data_sn);
                (b, r.header.clone())
            }
        };
        Pdu {
            bhs,
            ahs: Vec::new(),
            data,
        }
    }

    /// The typed response of `pdu` (what an initiator reads: tests, tools).
    pub fn parse(pdu: Pdu) -> Result<Response, PduError> {
        let b = &pdu.bhs;
        let op = match b.opcode() {
            Some(op) => op,
            None => return Err(PduError::UnknownOpcode(b.opcode_byte())),
        };
        let sn = TargetSn::read(b);
        let f = b.flags();
        Ok(match op {
            Opcode::NopIn => Response::NopIn(NopIn {
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                sn,
                data: pdu.data,
            }),
            Opcode::ScsiResponse => {
                let sense = match pdu.data.len() {
                    0 => Vec::new(),
                    1 => return Err(PduError::Malformed("a sense segment of one byte")),
                    n => {
                        let len = u16::from_be_bytes([pdu.data[0], pdu.data[1]]) as usize;
                        if len > n - 2 {
                            return Err(PduError::Malformed("sense longer than its segment"));
                        }
                        pdu.data[2..2 + len].to_vec()
                    }
                };
                Response::ScsiResponse(ScsiResponse {
                    overflow: f & 0x04 != 0,
                    underflow: f & 0x02 != 0,
                    response: b.0[2],
                    status: b.0[3],
                    itt: b.itt(),
                    sn,
                    exp_data_sn: b.u32_at(36),
                    residual: b.u32_at(44),
                    sense,
                })
            }
            Opcode::TaskMgmtResponse => Response::TaskMgmt(TaskMgmtResponse {
                response: b.0[2],
                itt: b.itt(),
                sn,
            }),
            Opcode::LoginResponse => Response::Login(LoginResponse {
                transit: f & 0x80 != 0,
                cont: f & 0x40 != 0,
                csg: Stage::from_bits(f >> 2)?,
                nsg: Stage::from_bits(f)?,
                version_max: b.0[2],
                version_active: b.0[3],
                isid: b.0[8..14].try_into().expect("6 bytes"),
                tsih: b.u16_at(14),
                itt: b.itt(),
                sn,
                status_class: b.0[36],
                status_detail: b.0[37],
                data: pdu.data,
            }),
            Opcode::TextResponse => Response::Text(TextResponse {
                final_bit: f & 0x80 != 0,
                cont: f & 0x40 != 0,
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                sn,
                data: pdu.data,
            }),
            Opcode::DataIn => Response::DataIn(DataIn {
                final_bit: f & 0x80 != 0,
                ack: f & 0x40 != 0,
                overflow: f & 0x04 != 0,
                underflow: f & 0x02 != 0,
                status: (f & 0x01 != 0).then_some(b.0[3]),
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                sn,
                data_sn: b.u32_at(36),
                offset: b.u32_at(40),
                residual: b.u32_at(44),
                data: pdu.data,
            }),
            Opcode::LogoutResponse => Response::Logout(LogoutResponse {
                response: b.0[2],
                itt: b.itt(),
                sn,
                time2wait: b.u16_at(40),
                time2retain: b.u16_at(42),
            }),
            Opcode::R2t => Response::R2t(R2t {
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                sn,
                r2t_sn: b.u32_at(36),
                offset: b.u32_at(40),
                len: b.u32_at(44),
            }),
            Opcode::AsyncMessage => Response::Async(AsyncMessage {
                lun: b.lun(),
                sn,
                event: b.0[36],
                vcode: b.0[37],
                parameters: [b.u16_at(38), b.u16_at(40), b.u16_at(42)],
                data: pdu.data,
            }),
            Opcode::Reject => Response::Reject(Reject {
                reason: b.0[2],
                sn,
                data_sn: b.u32_at(36),
                header: pdu.data,
            }),
            _ => return Err(PduError::UnknownOpcode(b.opcode_byte())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip_request(r: Request) {
        let bytes = r.to_pdu().to_bytes();
        assert_eq!(bytes.len() % 4, 0);
        let (pdu, used) = Pdu::decode(&bytes, 1 << 20).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(Request::parse(pdu).unwrap(), r);
        // One byte short: not yet a PDU.
        assert_eq!(
            Pdu::decode(&bytes[..bytes.len() - 1], 1 << 20).unwrap(),
            None
        );
    }

    fn roundtrip_response(r: Response) {
        let mut bytes = Vec::new();
        r.encode(&mut bytes);
        let (pdu, used) = Pdu::decode(&bytes, 1 << 20).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(Response::parse(pdu).unwrap(), r);
    }

    #[test]
    fn every_request_survives_the_wire() {
        roundtrip_request(Request::ScsiCommand(ScsiCommand {
            immediate: false,
            final_bit: true,
            read: false,
            write: true,
            attr: 1,
            lun: 0,
            itt: 7,
            expected_len: 4096,
            cmd_sn: 3,
            exp_stat_sn: 2,
            cdb: [0x2a, 0, 0, 0, 0, 8, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0],
            data: vec![0xab; 4093],
        }));
        roundtrip_request(Request::Login(LoginRequest {
            transit: true,
            cont: false,
            csg: Stage::Security,
            nsg: Stage::Operational,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 1, 2, 3, 4, 5],
            tsih: 0,
            itt: 1,
            cid: 0,
            cmd_sn: 1,
            exp_stat_sn: 0,
            data: b"InitiatorName=iqn.x\0SessionType=Normal\0".to_vec(),
        }));
        roundtrip_request(Request::NopOut(NopOut {
            immediate: true,
            itt: 9,
            ttt: RESERVED_TAG,
            data: b"ping".to_vec(),
            ..Default::default()
        }));
        roundtrip_request(Request::TaskMgmt(TaskMgmtRequest {
            function: 1,
            referenced_itt: 5,
            ..Default::default()
        }));
        roundtrip_request(Request::Text(TextRequest {
            final_bit: true,
            ttt: RESERVED_TAG,
            data: b"SendTargets=All\0".to_vec(),
            ..Default::default()
        }));
        roundtrip_request(Request::DataOut(DataOut {
            final_bit: true,
            offset: 8192,
            data_sn: 1,
            data: vec![1; 8192],
            ..Default::default()
        }));
        roundtrip_request(Request::Logout(LogoutRequest {
            immediate: true,
            reason: 0,
            itt: 4,
            ..Default::default()
        }));
        roundtrip_request(Request::Snack(SnackRequest {
            kind: 1,
            beg_run: 3,
            run_length: 1,
            ..Default::default()
        }));
    }

    #[test]
    fn every_response_survives_the_wire() {
        let sn = TargetSn {
            stat_sn: 5,
            exp_cmd_sn: 6,
            max_cmd_sn: 37,
        };
        roundtrip_response(Response::ScsiResponse(ScsiResponse {
            status: 2,
            itt: 3,
            sn,
            sense: vec![0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0],
            underflow: true,
            residual: 512,
            ..Default::default()
        }));
        roundtrip_response(Response::DataIn(DataIn {
            final_bit: true,
            status: Some(0),
            itt: 3,
            ttt: RESERVED_TAG,
            sn,
            data: vec![7; 8191],
            ..Default::default()
        }));
        roundtrip_response(Response::R2t(R2t {
            itt: 3,
            ttt: 10,
            sn,
            r2t_sn: 0,
            offset: 0,
            len: 65536,
            ..Default::default()
        }));
        roundtrip_response(Response::Login(LoginResponse {
            transit: true,
            cont: false,
            csg: Stage::Operational,
            nsg: Stage::FullFeature,
            version_max: 0,
            version_active: 0,
            isid: [0x80, 1, 2, 3, 4, 5],
            tsih: 1,
            itt: 1,
            sn,
            status_class: 0,
            status_detail: 0,
            data: b"HeaderDigest=None\0".to_vec(),
        }));
        roundtrip_response(Response::NopIn(NopIn {
            itt: RESERVED_TAG,
            ttt: 1,
            sn,
            ..Default::default()
        }));
        roundtrip_response(Response::Text(TextResponse {
            final_bit: true,
            data: b"TargetName=iqn.x\0".to_vec(),
            ..Default::default()
        }));
        roundtrip_response(Response::TaskMgmt(TaskMgmtResponse {
            response: 0,
            itt: 2,
            sn,
        }));
        roundtrip_response(Response::Logout(LogoutResponse {
            itt: 2,
            sn,
            time2wait: 2,
            ..Default::default()
        }));
        roundtrip_response(Response::Async(AsyncMessage {
            sn,
            event: 1,
            parameters: [0, 2, 0],
            ..Default::default()
        }));
        roundtrip_response(Response::Reject(Reject {
            reason: 4,
            sn,
            header: vec![0x1f; BHS_LEN],
            ..Default::default()
        }));
    }

    #[test]
    fn a_data_segment_over_the_limit_is_refused_before_it_arrives() {
        let mut b = Bhs::new(Opcode::ScsiCommand, false, 0x80);
        b.set_data_len(9000);
        let e = Pdu::decode(&b.0, 8192).unwrap_err();
        assert_eq!(
            e,
            PduError::DataTooLong {
                len: 9000,
                max: 8192
            }
        );
        // A header alone, with its data to come: need more.
        b.set_data_len(100);
        assert_eq!(Pdu::decode(&b.0, 8192).unwrap(), None);
    }

    #[test]
    fn unknown_opcodes_and_reserved_stages_are_errors_not_panics() {
        let mut b = Bhs::default();
        b.0[0] = 0x1c;
        let pdu = Pdu {
            bhs: b,
            ..Default::default()
        };
        assert_eq!(
            Request::parse(pdu.clone()),
            Err(PduError::UnknownOpcode(0x1c))
        );
        assert_eq!(Response::parse(pdu), Err(PduError::UnknownOpcode(0x1c)));
        let mut b = Bhs::new(Opcode::LoginRequest, true, 0x80 | 0x08 | 0x02);
        b.set_u32(16, 1);
        let e = Request::parse(Pdu {
            bhs: b,
            ..Default::default()
        });
        assert!(matches!(e, Err(PduError::Malformed(_))), "{e:?}");
        // A target PDU where a request is due is an unknown request.
        let r = Response::NopIn(NopIn::default()).to_pdu();
        assert_eq!(Request::parse(r), Err(PduError::UnknownOpcode(0x20)));
    }

    #[test]
    fn padding_and_ahs_are_skipped() {
        let mut b = Bhs::new(Opcode::NopOut, true, 0x80);
        b.0[4] = 1; // one AHS word
        b.set_data_len(3);
        let mut bytes = b.0.to_vec();
        bytes.extend_from_slice(&[9, 9, 9, 9]); // AHS
        bytes.extend_from_slice(b"abc\0"); // data, padded
        bytes.extend_from_slice(b"next");
        let (pdu, used) = Pdu::decode(&bytes, 8192).unwrap().unwrap();
        assert_eq!(used, 56);
        assert_eq!(pdu.ahs, [9, 9, 9, 9]);
        assert_eq!(pdu.data, b"abc");
    }
}
