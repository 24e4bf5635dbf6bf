//! The NBD subset both ends of the storm speak: fixed newstyle negotiation with
//! `NBD_OPT_GO` (and `NBD_OPT_EXPORT_NAME` on the server side, for old clients), and
//! simple replies to READ, WRITE, FLUSH and DISC. Blocking I/O on any `Read + Write`.

use std::io::{self, Read, Write};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;

pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const INFO_EXPORT: u16 = 0;

pub const TFLAG_HAS_FLAGS: u16 = 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;

/// Largest request either end accepts (32 MiB, as nbdkit and qemu-nbd).
pub const MAX_LEN: u32 = 32 << 20;

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn u16_of<R: Read>(r: &mut R) -> io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn u32_of<R: Read>(r: &mut R) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn u64_of<R: Read>(r: &mut R) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// A request header, as the client sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Reads one header; `Ok(None)` at a clean end of stream.
    pub fn read_from<R: Read>(r: &mut R) -> io::Result<Option<Request>> {
        let mut b = [0u8; 28];
        match r.read_exact(&mut b) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let word = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        if word(0) != REQUEST_MAGIC {
            return Err(bad(format!("bad request magic {:#x}", word(0))));
        }
        let req = Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            command: u16::from_be_bytes([b[6], b[7]]),
            handle: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            length: word(24),
        };
        if req.length > MAX_LEN {
            return Err(bad(format!("request of {} bytes", req.length)));
        }
        Ok(Some(req))
    }
}

/// A simple reply header.
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// Reads a simple reply header: (error, handle).
pub fn read_simple_reply<R: Read>(r: &mut R) -> io::Result<(u32, u64)> {
    let magic = u32_of(r)?;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(bad(format!(
            "reply magic {magic:#x} (structured replies were not asked for)"
        )));
    }
    Ok((u32_of(r)?, u64_of(r)?))
}

/// Client side: fixed newstyle negotiation of `export` with `NBD_OPT_GO`. Returns the
/// export's size.
pub fn client_handshake<S: Read + Write>(s: &mut S, export: &str) -> io::Result<u64> {
    if u64_of(s)? != NBDMAGIC || u64_of(s)? != IHAVEOPT {
        return Err(bad("not a newstyle NBD server"));
    }
    let hflags = u16_of(s)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad("the server is not fixed newstyle"));
    }
    let cflags = u32::from(hflags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    let mut out = Vec::with_capacity(32 + export.len());
    out.extend_from_slice(&cflags.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&OPT_GO.to_be_bytes());
    out.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&out)?;
    let mut size = None;
    loop {
        if u64_of(s)? != REPLY_MAGIC {
            return Err(bad("bad option reply magic"));
        }
        let (_opt, kind, len) = (u32_of(s)?, u32_of(s)?, u32_of(s)?);
        if len > 64 << 10 {
            return Err(bad(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data)?;
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 12 && data[..2] == INFO_EXPORT.to_be_bytes() => {
                size = Some(u64::from_be_bytes(data[2..10].try_into().expect("8 bytes")));
            }
            REP_INFO => {}
            k if k & 0x8000_0000 != 0 => {
                return Err(bad(format!(
                    "export {export:?} refused ({k:#x}): {}",
                    String::from_utf8_lossy(&data)
                )))
            }
            k => return Err(bad(format!("unexpected option reply {k:#x}"))),
        }
    }
    size.ok_or_else(|| bad("NBD_OPT_GO ended without the export's size"))
}

/// Server side: fixed newstyle negotiation. Any export name is accepted; returns once
/// the client is in transmission.
pub fn server_handshake<S: Read + Write>(s: &mut S, size: u64, tflags: u16) -> io::Result<()> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let cflags = u32_of(s)?;
    loop {
        if u64_of(s)? != IHAVEOPT {
            return Err(bad("bad option magic"));
        }
        let (opt, len) = (u32_of(s)?, u32_of(s)?);
        if len > 64 << 10 {
            return Err(bad(format!("option of {len} bytes")));
        }
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&size.to_be_bytes());
                b.extend_from_slice(&tflags.to_be_bytes());
                if cflags & u32::from(FLAG_NO_ZEROES) == 0 {
                    b.extend_from_slice(&[0; 124]);
                }
                return s.write_all(&b);
            }
            OPT_GO => {
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&tflags.to_be_bytes());
                option_reply(s, opt, REP_INFO, &info)?;
                return option_reply(s, opt, REP_ACK, &[]);
            }
            OPT_ABORT => {
                option_reply(s, opt, REP_ACK, &[])?;
                return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "abort"));
            }
            _ => option_reply(s, opt, REP_ERR_UNSUP, &[])?,
        }
    }
}

fn option_reply<W: Write>(w: &mut W, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_client_and_the_floor_agree_on_go_and_requests() {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        let server = std::thread::spawn(move || {
            server_handshake(&mut b, 1 << 20, TFLAG_HAS_FLAGS).expect("server side");
            let req = Request::read_from(&mut b)
                .expect("read")
                .expect("a request");
            b.write_all(&simple_reply(0, req.handle)).expect("reply");
            req
        });
        assert_eq!(
            client_handshake(&mut a, "device/x").expect("client"),
            1 << 20
        );
        let sent = Request {
            flags: 0,
            command: CMD_FLUSH,
            handle: 7,
            offset: 4096,
            length: 0,
        };
        a.write_all(&sent.encode()).expect("send");
        assert_eq!(read_simple_reply(&mut a).expect("reply"), (0, 7));
        assert_eq!(server.join().expect("server"), sent);
    }

    #[test]
    fn a_lying_length_is_refused_not_allocated() {
        let mut req = Request {
            flags: 0,
            command: CMD_READ,
            handle: 1,
            offset: 0,
            length: MAX_LEN + 1,
        }
        .encode();
        let e = Request::read_from(&mut &req[..]).expect_err("too long");
        assert!(e.to_string().contains("request of"), "{e}");
        req[0] = 0;
        assert!(Request::read_from(&mut &req[..]).is_err());
    }
}
