//! Transmission phase: request headers in, simple and structured replies out
//! (the server's half), and the reverse (the client's half).

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
    /// The command of a wire `type`; numbers we do not know are kept.
    pub fn from_wire(v: u16) -> Command {
        match v {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// The wire `type` of this command.
    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Unknown(v) => v,
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

// ---- The client's half: requests out, replies in.

/// Appends a request header; a WRITE's `length` bytes of payload are the
/// caller's to append after it. The inverse of [`decode_request`].
pub fn encode_request(out: &mut Vec<u8>, req: &Request) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&req.flags.to_be_bytes());
    out.extend_from_slice(&req.command.to_wire().to_be_bytes());
    out.extend_from_slice(&req.cookie.to_be_bytes());
    out.extend_from_slice(&req.offset.to_be_bytes());
    out.extend_from_slice(&req.length.to_be_bytes());
}

/// A simple reply header; a successful READ's data follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0, or the errno the request failed with.
    pub error: u32,
    pub cookie: u64,
}

/// A structured reply chunk header; `length` bytes of payload follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    /// The chunk type (`REPLY_TYPE_*`).
    pub kind: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    /// The last chunk of its request's reply.
    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }

    /// An error chunk (`REPLY_TYPE_ERROR*`: the high bit of the type).
    pub fn is_error(&self) -> bool {
        self.kind & (1 << 15) != 0
    }
}

/// A reply header of either kind, told apart by its magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple(SimpleReply),
    Chunk(ChunkHeader),
}

/// Errors after which a client cannot trust the server's byte stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply does not start with the simple reply magic (got {0:#010x})")]
    NotSimple(u32),
    #[error("reply does not start with the structured reply magic (got {0:#010x})")]
    NotStructured(u32),
    #[error("reply does not start with a reply magic (got {0:#010x})")]
    BadMagic(u32),
    #[error("error chunk of {0} bytes is shorter than its own message length says")]
    ShortErrorChunk(usize),
}

/// Decodes a simple reply header from the front of `buf`.
pub fn decode_simple_reply(buf: &[u8]) -> Result<Option<(SimpleReply, usize)>, ReplyError> {
    if buf.len() < SIMPLE_REPLY_LEN {
        return Ok(None);
    }
    let magic = be_u32(&buf[0..4]);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ReplyError::NotSimple(magic));
    }
    let reply = SimpleReply {
        error: be_u32(&buf[4..8]),
        cookie: be_u64(&buf[8..16]),
    };
    Ok(Some((reply, SIMPLE_REPLY_LEN)))
}

/// Decodes a structured reply chunk header from the front of `buf`.
pub fn decode_chunk_header(buf: &[u8]) -> Result<Option<(ChunkHeader, usize)>, ReplyError> {
    if buf.len() < CHUNK_HEADER_LEN {
        return Ok(None);
    }
    let magic = be_u32(&buf[0..4]);
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(ReplyError::NotStructured(magic));
    }
    let chunk = ChunkHeader {
        flags: u16::from_be_bytes([buf[4], buf[5]]),
        kind: u16::from_be_bytes([buf[6], buf[7]]),
        cookie: be_u64(&buf[8..16]),
        length: be_u32(&buf[16..20]),
    };
    Ok(Some((chunk, CHUNK_HEADER_LEN)))
}

/// Decodes a reply header of either kind from the front of `buf` (a client
/// that negotiated structured replies may still get simple ones).
pub fn decode_reply_header(buf: &[u8]) -> Result<Option<(ReplyHeader, usize)>, ReplyError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    match be_u32(&buf[0..4]) {
        SIMPLE_REPLY_MAGIC => {
            Ok(decode_simple_reply(buf)?.map(|(r, n)| (ReplyHeader::Simple(r), n)))
        }
        STRUCTURED_REPLY_MAGIC => {
            Ok(decode_chunk_header(buf)?.map(|(c, n)| (ReplyHeader::Chunk(c), n)))
        }
        other => Err(ReplyError::BadMagic(other)),
    }
}

/// Decodes the payload of an `ERROR` chunk: the errno and its message. An
/// `ERROR_OFFSET` chunk's offset follows the message; it is left out.
pub fn decode_chunk_error(payload: &[u8]) -> Result<(u32, String), ReplyError> {
    if payload.len() < 6 {
        return Err(ReplyError::ShortErrorChunk(payload.len()));
    }
    let error = be_u32(&payload[0..4]);
    let len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
    let Some(message) = payload.get(6..6 + len) else {
        return Err(ReplyError::ShortErrorChunk(payload.len()));
    };
    Ok((error, String::from_utf8_lossy(message).into_owned()))
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

    #[test]
    fn every_request_round_trips() {
        let commands = [
            Command::Read,
            Command::Write,
            Command::Disc,
            Command::Flush,
            Command::Trim,
            Command::Cache,
            Command::WriteZeroes,
            Command::BlockStatus,
            Command::Unknown(42),
        ];
        for (i, &command) in commands.iter().enumerate() {
            let req = Request {
                flags: CMD_FLAG_FUA | (i as u16) << 1,
                command,
                cookie: 0x0102_0304_0506_0708 + i as u64,
                offset: (i as u64) << 33,
                length: 512 << i,
            };
            let mut out = Vec::new();
            encode_request(&mut out, &req);
            assert_eq!(out.len(), REQUEST_HEADER_LEN);
            for cut in 0..out.len() {
                assert_eq!(decode_request(&out[..cut]).unwrap(), None);
            }
            assert_eq!(decode_request(&out).unwrap(), Some(req));
            assert_eq!(Command::from_wire(command.to_wire()), command);
        }
    }

    #[test]
    fn simple_replies_round_trip() {
        for (cookie, error) in [(1, 0), (u64::MAX, EIO), (7, ENOSPC)] {
            let mut out = Vec::new();
            encode_simple_reply(&mut out, cookie, error);
            for cut in 0..out.len() {
                assert_eq!(decode_simple_reply(&out[..cut]).unwrap(), None);
                assert_eq!(decode_reply_header(&out[..cut]).unwrap(), None);
            }
            let want = SimpleReply { error, cookie };
            assert_eq!(
                decode_simple_reply(&out).unwrap(),
                Some((want, SIMPLE_REPLY_LEN))
            );
            assert_eq!(
                decode_reply_header(&out).unwrap(),
                Some((ReplyHeader::Simple(want), SIMPLE_REPLY_LEN))
            );
            assert!(matches!(
                decode_chunk_header(&[out.clone(), vec![0; 4]].concat()),
                Err(ReplyError::NotStructured(SIMPLE_REPLY_MAGIC))
            ));
        }
    }

    #[test]
    fn every_chunk_round_trips() {
        let mut cases: Vec<(Vec<u8>, ChunkHeader)> = Vec::new();
        let mut out = Vec::new();
        encode_structured_done(&mut out, 3);
        cases.push((
            out,
            ChunkHeader {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_NONE,
                cookie: 3,
                length: 0,
            },
        ));
        let mut out = Vec::new();
        encode_offset_data_header(&mut out, 4, 1 << 20, 4096);
        cases.push((
            out,
            ChunkHeader {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_OFFSET_DATA,
                cookie: 4,
                length: 4096 + 8,
            },
        ));
        let mut out = Vec::new();
        encode_block_status(&mut out, 5, 1, &[(4096, STATE_HOLE)]);
        cases.push((
            out,
            ChunkHeader {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_BLOCK_STATUS,
                cookie: 5,
                length: 12,
            },
        ));
        let mut out = Vec::new();
        encode_structured_error(&mut out, 6, ENOSPC, "write cache full");
        cases.push((
            out,
            ChunkHeader {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_ERROR,
                cookie: 6,
                length: 6 + 16,
            },
        ));
        let mut out = Vec::new();
        encode_chunk_header(&mut out, 0, REPLY_TYPE_OFFSET_HOLE, 7, 12);
        cases.push((
            out,
            ChunkHeader {
                flags: 0,
                kind: REPLY_TYPE_OFFSET_HOLE,
                cookie: 7,
                length: 12,
            },
        ));
        for (bytes, want) in cases {
            for cut in 0..CHUNK_HEADER_LEN {
                assert_eq!(decode_chunk_header(&bytes[..cut]).unwrap(), None);
                assert_eq!(decode_reply_header(&bytes[..cut]).unwrap(), None);
            }
            assert_eq!(
                decode_chunk_header(&bytes).unwrap(),
                Some((want, CHUNK_HEADER_LEN))
            );
            assert_eq!(
                decode_reply_header(&bytes).unwrap(),
                Some((ReplyHeader::Chunk(want), CHUNK_HEADER_LEN))
            );
            assert_eq!(want.is_done(), want.flags == REPLY_FLAG_DONE);
            assert_eq!(want.is_error(), want.kind == REPLY_TYPE_ERROR);
            if want.is_error() {
                assert_eq!(
                    decode_chunk_error(&bytes[CHUNK_HEADER_LEN..]).unwrap(),
                    (ENOSPC, "write cache full".into())
                );
            }
        }
    }

    #[test]
    fn bad_replies_are_fatal() {
        let mut out = Vec::new();
        encode_simple_reply(&mut out, 1, 0);
        out[0] ^= 1;
        assert!(matches!(
            decode_simple_reply(&out),
            Err(ReplyError::NotSimple(_))
        ));
        assert!(matches!(
            decode_reply_header(&out[..4]),
            Err(ReplyError::BadMagic(_))
        ));
        let mut chunk = Vec::new();
        encode_structured_done(&mut chunk, 1);
        assert!(matches!(
            decode_simple_reply(&chunk),
            Err(ReplyError::NotSimple(STRUCTURED_REPLY_MAGIC))
        ));
        // An error chunk whose message runs past its payload.
        let mut err = Vec::new();
        encode_structured_error(&mut err, 1, EIO, "abc");
        let payload = &err[CHUNK_HEADER_LEN..err.len() - 1];
        assert_eq!(
            decode_chunk_error(payload),
            Err(ReplyError::ShortErrorChunk(payload.len()))
        );
        assert!(decode_chunk_error(&[0; 5]).is_err());
    }
}
