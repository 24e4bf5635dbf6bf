//! Transmission phase: request headers in, simple and structured replies out.

use crate::consts::*;
use crate::handshake::{be_u32, be_u64};

/// The commands of the compact request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    fn from_wire(v: u16) -> Command {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }
}

/// A request header. A WRITE's payload of `length` bytes follows it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Bytes of payload that follow the header.
    pub fn payload_len(&self) -> usize {
        if self.command == Command::Write {
            self.length as usize
        } else {
            0
        }
    }
}

/// Errors after which the stream cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request does not start with the request magic (got {0:#010x})")]
    BadMagic(u32),
}

/// Decodes one request header from the front of `buf` (the payload is the caller's).
pub fn decode_request(buf: &[u8]) -> Result<Option<Request>, RequestError> {
    if buf.len() < REQUEST_HEADER_LEN {
        return Ok(None);
    }
    let magic = be_u32(&buf[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(RequestError::BadMagic(magic));
    }
    Ok(Some(Request {
        flags: u16::from_be_bytes([buf[4], buf[5]]),
        command: Command::from_wire(u16::from_be_bytes([buf[6], buf[7]])),
        cookie: be_u64(&buf[8..16]),
        offset: be_u64(&buf[16..24]),
        length: be_u32(&buf[24..28]),
    }))
}

/// Appends a simple reply header; a successful READ's data follows it.
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured reply chunk header.
pub fn encode_chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, length: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Appends the header of a final `OFFSET_DATA` chunk; `data_len` bytes follow it.
pub fn encode_offset_data_header(out: &mut Vec<u8>, cookie: u64, offset: u64, data_len: u32) {
    encode_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        data_len + 8,
    );
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends a final `NONE` chunk (success without payload).
pub fn encode_structured_done(out: &mut Vec<u8>, cookie: u64) {
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
}

/// Appends a final `ERROR` chunk with a message.
pub fn encode_structured_error(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    encode_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// Appends a final `BLOCK_STATUS` chunk of (length, flags) extents.
pub fn encode_block_status(out: &mut Vec<u8>, cookie: u64, context: u32, extents: &[(u32, u32)]) {
    let len = 4 + 8 * extents.len() as u32;
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len);
    out.extend_from_slice(&context.to_be_bytes());
    for (length, flags) in extents {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    #[test]
    fn requests_decode() {
        let h = header(1, CMD_FLAG_FUA, 0xdead_beef, 4096, 512);
        assert_eq!(decode_request(&h[..27]).unwrap(), None);
        let r = decode_request(&h).unwrap().unwrap();
        assert_eq!(r.command, Command::Write);
        assert_eq!(r.flags, CMD_FLAG_FUA);
        assert_eq!((r.cookie, r.offset, r.length), (0xdead_beef, 4096, 512));
        assert_eq!(r.payload_len(), 512);
        let r = decode_request(&header(42, 0, 1, 0, 0)).unwrap().unwrap();
        assert_eq!(r.command, Command::Unknown(42));
        assert_eq!(r.payload_len(), 0);
    }

    #[test]
    fn bad_magic_is_fatal() {
        let mut h = header(0, 0, 1, 0, 512);
        h[0] ^= 1;
        assert!(decode_request(&h).is_err());
    }

    #[test]
    fn replies_encode() {
        let mut out = Vec::new();
        encode_simple_reply(&mut out, 7, EIO);
        assert_eq!(out.len(), 16);
        assert_eq!(&out[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..8], &EIO.to_be_bytes());
        out.clear();
        encode_offset_data_header(&mut out, 9, 512, 4096);
        assert_eq!(out.len(), 28);
        assert_eq!(be_u32(&out[16..20]), 4104);
        out.clear();
        encode_block_status(
            &mut out,
            3,
            1,
            &[(4096, 0), (8192, STATE_HOLE | STATE_ZERO)],
        );
        assert_eq!(out.len(), 20 + 4 + 16);
        assert_eq!(be_u32(&out[16..20]), 20);
        out.clear();
        encode_structured_error(&mut out, 3, ENOSPC, "write cache full");
        assert_eq!(be_u32(&out[20..24]), ENOSPC);
    }
}
