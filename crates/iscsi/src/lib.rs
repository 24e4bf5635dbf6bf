//! The iSCSI wire protocol (RFC 7143), without sockets or storage.
//!
//! The target (`vstream server --iscsi`) decodes what initiators send and
//! encodes its answers with it; tests and tools use the other direction.
//! Like `crates/nbd`, decoders answer `Ok(None)` when they need more bytes
//! and an error when the bytes can never form a valid message.
//!
//! ```text
//!   pdu    the 48-byte header, AHS and data segment; a typed message per opcode
//!   text   key=value\0 pairs of Login and Text PDUs; numbers and binary values
//!   login  the target's side of key negotiation, login status codes
//!   chap   CHAP with MD5 (RFC 1994), one-way and mutual
//!   scsi   the block commands a boot disk needs: CDBs, sense, INQUIRY and VPD,
//!          READ CAPACITY, MODE SENSE, REPORT LUNS, UNMAP, GET LBA STATUS
//!   pr     persistent reservations: PERSISTENT RESERVE IN/OUT data and the
//!          table of what a reservation lets through
//! ```

pub mod chap;
pub mod login;
pub mod pdu;
pub mod pr;
pub mod scsi;
pub mod text;

pub use pdu::{Bhs, Opcode, Pdu, Request, Response, Stage, TargetSn, BHS_LEN, RESERVED_TAG};
pub use text::Pairs;

/// Why bytes are not a PDU this side accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// The data segment is longer than the MaxRecvDataSegmentLength this
    /// side declared: the connection cannot be framed past it.
    #[error("a data segment of {len} bytes, over the {max} bytes declared")]
    DataTooLong { len: usize, max: usize },
    /// An opcode this side never receives: rejected, the session goes on.
    #[error("opcode {0:#04x} is not one this side receives")]
    UnknownOpcode(u8),
    /// A field holds a value the RFC reserves.
    #[error("malformed PDU: {0}")]
    Malformed(&'static str),
}

/// Why the text of a Login or Text exchange is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("{0} bytes of text in one exchange, over the {max} accepted", max = text::MAX_TEXT)]
    TooLong(usize),
    #[error("more than {max} keys in one exchange", max = text::MAX_PAIRS)]
    TooManyPairs,
    #[error("text that is not UTF-8")]
    NotUtf8,
    #[error("{0:?} has no '='")]
    NoValue(String),
    #[error("{0:?} is not a key (1 to 63 of letters, digits, '.', '-', '+', '@', '_')")]
    BadKey(String),
    #[error("the value of {0} is over {max} bytes", max = text::MAX_VALUE)]
    ValueTooLong(String),
    #[error("{0} is sent twice")]
    Repeated(String),
}
