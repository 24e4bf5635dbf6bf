//! Handshake: the server greeting, client flags, options and option replies,
//! for both ends: the server decodes options and encodes replies, the client
//! (the agent) decodes the greeting and replies and encodes options.

use crate::consts::*;

/// Options longer than this are refused by dropping the connection: no valid
/// option comes near it (names are at most 4096 bytes).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// An option the client sent, decoded and checked for internal consistency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    /// `NBD_OPT_INFO` (`go == false`) or `NBD_OPT_GO`.
    Info {
        go: bool,
        name: String,
        requests: Vec<u16>,
    },
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT` (`set == false`) or `NBD_OPT_SET_META_CONTEXT`.
    MetaContext {
        set: bool,
        export: String,
        queries: Vec<String>,
    },
    ExtendedHeaders,
    /// An option we do not implement; its data has been skipped.
    Unknown(u32),
    /// A known option whose data lies about its own lengths. The framing is
    /// intact, so the server answers `NBD_REP_ERR_INVALID` and goes on.
    Malformed {
        option: u32,
        reason: &'static str,
    },
}

impl ClientOption {
    /// The option number, for the reply header.
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => OPT_EXPORT_NAME,
            ClientOption::Abort => OPT_ABORT,
            ClientOption::List => OPT_LIST,
            ClientOption::StartTls => OPT_STARTTLS,
            ClientOption::Info { go: false, .. } => OPT_INFO,
            ClientOption::Info { go: true, .. } => OPT_GO,
            ClientOption::StructuredReply => OPT_STRUCTURED_REPLY,
            ClientOption::MetaContext { set: false, .. } => OPT_LIST_META_CONTEXT,
            ClientOption::MetaContext { set: true, .. } => OPT_SET_META_CONTEXT,
            ClientOption::ExtendedHeaders => OPT_EXTENDED_HEADERS,
            ClientOption::Unknown(code) => *code,
            ClientOption::Malformed { option, .. } => *option,
        }
    }
}

/// Errors after which the byte stream cannot be trusted: drop the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("option does not start with IHAVEOPT (got {0:#018x})")]
    BadMagic(u64),
    #[error(
        "option {option} claims {length} bytes of data, more than the {MAX_OPTION_LEN} allowed"
    )]
    TooLong { option: u32, length: u32 },
    #[error("client flags {0:#x} include flags the server did not offer")]
    BadClientFlags(u32),
}

/// Appends the server greeting.
pub fn encode_greeting(out: &mut Vec<u8>) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
}

/// Decodes the client's 32-bit flags; returns whether it asked for NO_ZEROES.
pub fn decode_client_flags(buf: [u8; 4]) -> Result<bool, OptionError> {
    let flags = u32::from_be_bytes(buf);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(OptionError::BadClientFlags(flags));
    }
    Ok(flags & FLAG_C_NO_ZEROES != 0)
}

/// Decodes one option from the front of `buf`.
pub fn decode_option(buf: &[u8]) -> Result<Option<(ClientOption, usize)>, OptionError> {
    if buf.len() < OPTION_HEADER_LEN {
        return Ok(None);
    }
    let magic = be_u64(&buf[0..8]);
    if magic != IHAVEOPT {
        return Err(OptionError::BadMagic(magic));
    }
    let option = be_u32(&buf[8..12]);
    let length = be_u32(&buf[12..16]);
    if length > MAX_OPTION_LEN {
        return Err(OptionError::TooLong { option, length });
    }
    let total = OPTION_HEADER_LEN + length as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let data = &buf[OPTION_HEADER_LEN..total];
    let parsed = parse_option_data(option, data)
        .unwrap_or_else(|reason| ClientOption::Malformed { option, reason });
    Ok(Some((parsed, total)))
}

fn parse_option_data(option: u32, data: &[u8]) -> Result<ClientOption, &'static str> {
    let no_data = |o: ClientOption| {
        if data.is_empty() {
            Ok(o)
        } else {
            Err("option takes no data")
        }
    };
    match option {
        OPT_EXPORT_NAME => Ok(ClientOption::ExportName(utf8(data)?)),
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => no_data(ClientOption::List),
        OPT_STARTTLS => no_data(ClientOption::StartTls),
        OPT_STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
        OPT_EXTENDED_HEADERS => no_data(ClientOption::ExtendedHeaders),
        OPT_INFO | OPT_GO => {
            let mut r = Reader(data);
            let name = r.string()?;
            let count = r.u16()? as usize;
            let mut requests = Vec::with_capacity(count.min(16));
            for _ in 0..count {
                requests.push(r.u16()?);
            }
            r.end()?;
            Ok(ClientOption::Info {
                go: option == OPT_GO,
                name,
                requests,
            })
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let mut r = Reader(data);
            let export = r.string()?;
            let count = r.u32()? as usize;
            let mut queries = Vec::with_capacity(count.min(16));
            for _ in 0..count {
                queries.push(r.string()?);
            }
            r.end()?;
            Ok(ClientOption::MetaContext {
                set: option == OPT_SET_META_CONTEXT,
                export,
                queries,
            })
        }
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// A bounds-checked big-endian reader over option data.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], &'static str> {
        if self.0.len() < n {
            return Err("option data is shorter than its own lengths say");
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(be_u32(self.take(4)?))
    }
    fn string(&mut self) -> Result<String, &'static str> {
        let len = self.u32()? as usize;
        if len > 4096 {
            return Err("string longer than 4096 bytes");
        }
        utf8(self.take(len)?)
    }
    fn rest(&mut self) -> &[u8] {
        let all = self.0;
        self.0 = &[];
        all
    }
    fn end(&self) -> Result<(), &'static str> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err("option data is longer than its own lengths say")
        }
    }
}

fn utf8(b: &[u8]) -> Result<String, &'static str> {
    String::from_utf8(b.to_vec()).map_err(|_| "name is not UTF-8")
}

pub(crate) fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

pub(crate) fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// Appends an option reply with `data` as its payload.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC_OPTION.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an error reply carrying a human-readable message.
pub fn encode_option_error(out: &mut Vec<u8>, option: u32, reply: u32, message: &str) {
    encode_option_reply(out, option, reply, message.as_bytes());
}

/// Appends one `NBD_REP_SERVER` entry of an `NBD_OPT_LIST` answer.
pub fn encode_rep_server(out: &mut Vec<u8>, name: &str, description: &str) {
    let mut data = Vec::with_capacity(4 + name.len() + description.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(description.as_bytes());
    encode_option_reply(out, OPT_LIST, REP_SERVER, &data);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn encode_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut data = [0u8; 12];
    data[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    data[2..10].copy_from_slice(&size.to_be_bytes());
    data[10..12].copy_from_slice(&flags.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &data);
}

/// Appends `NBD_REP_INFO` carrying a name or a description.
pub fn encode_info_text(out: &mut Vec<u8>, option: u32, info: u16, text: &str) {
    let mut data = Vec::with_capacity(2 + text.len());
    data.extend_from_slice(&info.to_be_bytes());
    data.extend_from_slice(text.as_bytes());
    encode_option_reply(out, option, REP_INFO, &data);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(out: &mut Vec<u8>, option: u32, min: u32, preferred: u32, max: u32) {
    let mut data = [0u8; 14];
    data[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    data[2..6].copy_from_slice(&min.to_be_bytes());
    data[6..10].copy_from_slice(&preferred.to_be_bytes());
    data[10..14].copy_from_slice(&max.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &data);
}

/// Appends `NBD_REP_META_CONTEXT`.
pub fn encode_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&id.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(out, option, REP_META_CONTEXT, &data);
}

/// Appends the answer to `NBD_OPT_EXPORT_NAME`, which has no option header.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

// ---- The client's half: the greeting in, client flags and options out,
// ---- option replies in.

/// What the server's greeting offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// Handshake flags (`FLAG_FIXED_NEWSTYLE`, `FLAG_NO_ZEROES`).
    pub flags: u16,
}

impl Greeting {
    /// The client flags to answer with: fixed newstyle, and no zeroes when
    /// the server offers it.
    pub fn client_flags(&self) -> u32 {
        let mut flags = FLAG_C_FIXED_NEWSTYLE;
        if self.flags & FLAG_NO_ZEROES != 0 {
            flags |= FLAG_C_NO_ZEROES;
        }
        flags
    }
}

/// Errors after which a client cannot trust the server's byte stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("greeting does not start with NBDMAGIC (got {0:#018x})")]
    BadGreetingMagic(u64),
    #[error("the server speaks the oldstyle handshake, not newstyle")]
    Oldstyle,
    #[error("greeting has {0:#018x} where IHAVEOPT belongs")]
    NotNewstyle(u64),
    #[error("option reply does not start with the option reply magic (got {0:#018x})")]
    BadReplyMagic(u64),
    #[error(
        "reply to option {option} claims {length} bytes of data, more than the {MAX_OPTION_LEN} allowed"
    )]
    ReplyTooLong { option: u32, length: u32 },
}

/// Decodes the server greeting from the front of `buf`.
pub fn decode_greeting(buf: &[u8]) -> Result<Option<(Greeting, usize)>, HandshakeError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let magic = be_u64(&buf[0..8]);
    if magic != NBDMAGIC {
        return Err(HandshakeError::BadGreetingMagic(magic));
    }
    if buf.len() < 16 {
        return Ok(None);
    }
    match be_u64(&buf[8..16]) {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => return Err(HandshakeError::Oldstyle),
        other => return Err(HandshakeError::NotNewstyle(other)),
    }
    if buf.len() < GREETING_LEN {
        return Ok(None);
    }
    let flags = u16::from_be_bytes([buf[16], buf[17]]);
    Ok(Some((Greeting { flags }, GREETING_LEN)))
}

/// Appends the client's 32-bit flags (see [`Greeting::client_flags`]).
pub fn encode_client_flags(out: &mut Vec<u8>, flags: u32) {
    out.extend_from_slice(&flags.to_be_bytes());
}

/// Appends one option: the inverse of [`decode_option`].
///
/// `Unknown` and `Malformed` exist for the decoding side; they encode as
/// their option number with no data.
pub fn encode_option(out: &mut Vec<u8>, option: &ClientOption) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.code().to_be_bytes());
    let length_at = out.len();
    out.extend_from_slice(&0u32.to_be_bytes());
    match option {
        ClientOption::ExportName(name) => out.extend_from_slice(name.as_bytes()),
        ClientOption::Info { name, requests, .. } => {
            put_string(out, name);
            out.extend_from_slice(&(requests.len() as u16).to_be_bytes());
            for r in requests {
                out.extend_from_slice(&r.to_be_bytes());
            }
        }
        ClientOption::MetaContext {
            export, queries, ..
        } => {
            put_string(out, export);
            out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
            for q in queries {
                put_string(out, q);
            }
        }
        ClientOption::Abort
        | ClientOption::List
        | ClientOption::StartTls
        | ClientOption::StructuredReply
        | ClientOption::ExtendedHeaders
        | ClientOption::Unknown(_)
        | ClientOption::Malformed { .. } => {}
    }
    let length = (out.len() - length_at - 4) as u32;
    out[length_at..length_at + 4].copy_from_slice(&length.to_be_bytes());
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The header of an option reply; `length` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers.
    pub option: u32,
    /// The reply type (`REP_*`).
    pub reply: u32,
    pub length: u32,
}

/// What an `NBD_REP_INFO` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        /// Transmission flags (`TFLAG_*`).
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// An information type we do not know; the reply is skipped whole.
    Unknown(u16),
}

/// An option reply's data, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerReply {
    Ack,
    /// One export of an `NBD_OPT_LIST` answer.
    Server {
        name: String,
        description: String,
    },
    Info(Info),
    MetaContext {
        id: u32,
        name: String,
    },
    /// An `NBD_REP_ERR_*` (`code` has the high bit set), with its message.
    Error {
        code: u32,
        message: String,
    },
    /// A reply type we do not know (without the error bit).
    Unknown(u32),
    /// A known reply type whose data lies about its own lengths; the framing
    /// is intact, so the caller may go on.
    Malformed {
        reply: u32,
        reason: &'static str,
    },
}

impl ServerReply {
    /// The reply type (`REP_*`) on the wire.
    pub fn code(&self) -> u32 {
        match self {
            ServerReply::Ack => REP_ACK,
            ServerReply::Server { .. } => REP_SERVER,
            ServerReply::Info(_) => REP_INFO,
            ServerReply::MetaContext { .. } => REP_META_CONTEXT,
            ServerReply::Error { code, .. } => *code,
            ServerReply::Unknown(code) => *code,
            ServerReply::Malformed { reply, .. } => *reply,
        }
    }
}

/// A whole option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    /// The option this answers.
    pub option: u32,
    pub reply: ServerReply,
}

/// Decodes an option reply header from the front of `buf`: for a client
/// that reads the header, then exactly its data.
pub fn decode_option_reply_header(
    buf: &[u8],
) -> Result<Option<(OptionReplyHeader, usize)>, HandshakeError> {
    if buf.len() < OPTION_REPLY_HEADER_LEN {
        return Ok(None);
    }
    let magic = be_u64(&buf[0..8]);
    if magic != REPLY_MAGIC_OPTION {
        return Err(HandshakeError::BadReplyMagic(magic));
    }
    let header = OptionReplyHeader {
        option: be_u32(&buf[8..12]),
        reply: be_u32(&buf[12..16]),
        length: be_u32(&buf[16..20]),
    };
    if header.length > MAX_OPTION_LEN {
        return Err(HandshakeError::ReplyTooLong {
            option: header.option,
            length: header.length,
        });
    }
    Ok(Some((header, OPTION_REPLY_HEADER_LEN)))
}

/// Decodes the `header.length` bytes of data after an option reply header.
pub fn decode_option_reply_data(header: &OptionReplyHeader, data: &[u8]) -> ServerReply {
    let reply = header.reply;
    parse_reply_data(reply, data).unwrap_or_else(|reason| ServerReply::Malformed { reply, reason })
}

/// Decodes one whole option reply (header and data) from the front of `buf`.
pub fn decode_option_reply(buf: &[u8]) -> Result<Option<(OptionReply, usize)>, HandshakeError> {
    let Some((header, used)) = decode_option_reply_header(buf)? else {
        return Ok(None);
    };
    let total = used + header.length as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let reply = decode_option_reply_data(&header, &buf[used..total]);
    Ok(Some((
        OptionReply {
            option: header.option,
            reply,
        },
        total,
    )))
}

fn parse_reply_data(reply: u32, data: &[u8]) -> Result<ServerReply, &'static str> {
    let mut r = Reader(data);
    let parsed = match reply {
        REP_ACK => ServerReply::Ack,
        REP_SERVER => {
            let name = r.string()?;
            let description = utf8(r.rest())?;
            ServerReply::Server { name, description }
        }
        REP_INFO => ServerReply::Info(match r.u16()? {
            INFO_EXPORT => Info::Export {
                size: be_u64(r.take(8)?),
                flags: r.u16()?,
            },
            INFO_NAME => Info::Name(utf8(r.rest())?),
            INFO_DESCRIPTION => Info::Description(utf8(r.rest())?),
            INFO_BLOCK_SIZE => Info::BlockSize {
                min: r.u32()?,
                preferred: r.u32()?,
                max: r.u32()?,
            },
            other => {
                r.rest();
                Info::Unknown(other)
            }
        }),
        REP_META_CONTEXT => ServerReply::MetaContext {
            id: r.u32()?,
            name: utf8(r.rest())?,
        },
        code if code & (1 << 31) != 0 => ServerReply::Error {
            code,
            message: String::from_utf8_lossy(r.rest()).into_owned(),
        },
        other => {
            r.rest();
            ServerReply::Unknown(other)
        }
    };
    r.end()?;
    Ok(parsed)
}

/// Decodes the answer to `NBD_OPT_EXPORT_NAME` (size, transmission flags),
/// followed by 124 zero bytes unless the client flags asked for no zeroes.
pub fn decode_export_name_reply(buf: &[u8], no_zeroes: bool) -> Option<((u64, u16), usize)> {
    let total = if no_zeroes { 10 } else { 134 };
    if buf.len() < total {
        return None;
    }
    Some((
        (be_u64(&buf[0..8]), u16::from_be_bytes([buf[8], buf[9]])),
        total,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn go_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    #[test]
    fn go_decodes_and_reports_need_more() {
        let bytes = option(OPT_GO, &go_data("disk", &[INFO_BLOCK_SIZE, INFO_NAME]));
        for cut in 0..bytes.len() {
            assert_eq!(decode_option(&bytes[..cut]).unwrap(), None, "cut at {cut}");
        }
        let (opt, used) = decode_option(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(
            opt,
            ClientOption::Info {
                go: true,
                name: "disk".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            }
        );
    }

    #[test]
    fn lying_lengths_are_malformed_not_fatal() {
        let mut d = go_data("disk", &[1, 2]);
        d.truncate(d.len() - 1);
        let bytes = option(OPT_GO, &d);
        let (opt, used) = decode_option(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert!(matches!(
            opt,
            ClientOption::Malformed { option: OPT_GO, .. }
        ));
        // A name length past the data.
        let bytes = option(OPT_INFO, &[0, 0, 0xff, 0xff]);
        assert!(matches!(
            decode_option(&bytes).unwrap().unwrap().0,
            ClientOption::Malformed { .. }
        ));
        // LIST with data.
        let bytes = option(OPT_LIST, &[1]);
        assert!(matches!(
            decode_option(&bytes).unwrap().unwrap().0,
            ClientOption::Malformed { .. }
        ));
    }

    #[test]
    fn unknown_options_are_skipped_whole() {
        let mut bytes = option(OPT_EXTENDED_HEADERS + 100, b"whatever");
        bytes.extend(option(OPT_ABORT, &[]));
        let (opt, used) = decode_option(&bytes).unwrap().unwrap();
        assert_eq!(opt, ClientOption::Unknown(OPT_EXTENDED_HEADERS + 100));
        assert_eq!(
            decode_option(&bytes[used..]).unwrap().unwrap().0,
            ClientOption::Abort
        );
    }

    #[test]
    fn garbage_and_huge_options_are_fatal() {
        assert!(matches!(
            decode_option(b"GET / HTTP/1.1\r\n\r\n"),
            Err(OptionError::BadMagic(_))
        ));
        let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
        bytes.extend_from_slice(&OPT_GO.to_be_bytes());
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_option(&bytes),
            Err(OptionError::TooLong { .. })
        ));
        assert!(decode_client_flags([0, 0, 0, 4]).is_err());
        assert!(decode_client_flags([0, 0, 0, 3]).unwrap());
    }

    #[test]
    fn meta_context_decodes() {
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let (opt, _) = decode_option(&option(OPT_SET_META_CONTEXT, &d))
            .unwrap()
            .unwrap();
        assert_eq!(
            opt,
            ClientOption::MetaContext {
                set: true,
                export: "disk".into(),
                queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()]
            }
        );
    }

    #[test]
    fn greeting_round_trips_and_needs_all_its_bytes() {
        let mut out = Vec::new();
        encode_greeting(&mut out);
        for cut in 0..out.len() {
            assert_eq!(decode_greeting(&out[..cut]).unwrap(), None, "cut at {cut}");
        }
        let (g, used) = decode_greeting(&out).unwrap().unwrap();
        assert_eq!(used, GREETING_LEN);
        assert_eq!(g.flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        // The client's answer is what the server decodes.
        let mut flags = Vec::new();
        encode_client_flags(&mut flags, g.client_flags());
        let flags: [u8; 4] = flags.try_into().unwrap();
        assert!(decode_client_flags(flags).unwrap(), "no zeroes was offered");
        let plain = Greeting {
            flags: FLAG_FIXED_NEWSTYLE,
        };
        assert_eq!(plain.client_flags(), FLAG_C_FIXED_NEWSTYLE);
    }

    #[test]
    fn bad_greetings_are_fatal() {
        let mut out = Vec::new();
        encode_greeting(&mut out);
        let mut bad = out.clone();
        bad[0] ^= 1;
        assert!(matches!(
            decode_greeting(&bad[..8]),
            Err(HandshakeError::BadGreetingMagic(_))
        ));
        let mut old = out.clone();
        old[8..16].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        assert_eq!(decode_greeting(&old), Err(HandshakeError::Oldstyle));
        let mut other = out;
        other[15] ^= 1;
        assert!(matches!(
            decode_greeting(&other[..16]),
            Err(HandshakeError::NotNewstyle(_))
        ));
    }

    #[test]
    fn every_option_round_trips() {
        let options = [
            ClientOption::ExportName("base/dev@3/abc".into()),
            ClientOption::ExportName(String::new()),
            ClientOption::Abort,
            ClientOption::List,
            ClientOption::StartTls,
            ClientOption::Info {
                go: false,
                name: "disk".into(),
                requests: vec![INFO_EXPORT, INFO_BLOCK_SIZE],
            },
            ClientOption::Info {
                go: true,
                name: String::new(),
                requests: vec![],
            },
            ClientOption::StructuredReply,
            ClientOption::MetaContext {
                set: false,
                export: "disk".into(),
                queries: vec![],
            },
            ClientOption::MetaContext {
                set: true,
                export: "disk".into(),
                queries: vec![BASE_ALLOCATION.into(), "qemu:".into()],
            },
            ClientOption::ExtendedHeaders,
            ClientOption::Unknown(OPT_EXTENDED_HEADERS + 100),
        ];
        let mut stream = Vec::new();
        for opt in &options {
            let mut out = Vec::new();
            encode_option(&mut out, opt);
            for cut in 0..out.len() {
                assert_eq!(
                    decode_option(&out[..cut]).unwrap(),
                    None,
                    "{opt:?} cut at {cut}"
                );
            }
            assert_eq!(decode_option(&out).unwrap(), Some((opt.clone(), out.len())));
            stream.extend_from_slice(&out);
        }
        // Back to back, each consumes exactly its own bytes.
        let mut rest = &stream[..];
        for opt in &options {
            let (got, used) = decode_option(rest).unwrap().unwrap();
            assert_eq!(&got, opt);
            rest = &rest[used..];
        }
        assert!(rest.is_empty());
    }

    fn reply_of(encode: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out);
        out
    }

    #[test]
    fn every_option_reply_round_trips() {
        let cases: Vec<(Vec<u8>, OptionReply)> = vec![
            (
                reply_of(|o| encode_option_reply(o, OPT_GO, REP_ACK, &[])),
                OptionReply {
                    option: OPT_GO,
                    reply: ServerReply::Ack,
                },
            ),
            (
                reply_of(|o| encode_rep_server(o, "disk", "the disk")),
                OptionReply {
                    option: OPT_LIST,
                    reply: ServerReply::Server {
                        name: "disk".into(),
                        description: "the disk".into(),
                    },
                },
            ),
            (
                reply_of(|o| encode_info_export(o, OPT_GO, 1 << 40, TFLAG_HAS_FLAGS)),
                OptionReply {
                    option: OPT_GO,
                    reply: ServerReply::Info(Info::Export {
                        size: 1 << 40,
                        flags: TFLAG_HAS_FLAGS,
                    }),
                },
            ),
            (
                reply_of(|o| encode_info_text(o, OPT_INFO, INFO_NAME, "disk")),
                OptionReply {
                    option: OPT_INFO,
                    reply: ServerReply::Info(Info::Name("disk".into())),
                },
            ),
            (
                reply_of(|o| encode_info_text(o, OPT_INFO, INFO_DESCRIPTION, "a disk")),
                OptionReply {
                    option: OPT_INFO,
                    reply: ServerReply::Info(Info::Description("a disk".into())),
                },
            ),
            (
                reply_of(|o| encode_info_block_size(o, OPT_GO, 512, 4096, 32 << 20)),
                OptionReply {
                    option: OPT_GO,
                    reply: ServerReply::Info(Info::BlockSize {
                        min: 512,
                        preferred: 4096,
                        max: 32 << 20,
                    }),
                },
            ),
            (
                reply_of(|o| encode_info_text(o, OPT_GO, 77, "future")),
                OptionReply {
                    option: OPT_GO,
                    reply: ServerReply::Info(Info::Unknown(77)),
                },
            ),
            (
                reply_of(|o| encode_meta_context(o, OPT_SET_META_CONTEXT, 1, BASE_ALLOCATION)),
                OptionReply {
                    option: OPT_SET_META_CONTEXT,
                    reply: ServerReply::MetaContext {
                        id: 1,
                        name: BASE_ALLOCATION.into(),
                    },
                },
            ),
            (
                reply_of(|o| encode_option_error(o, OPT_GO, REP_ERR_UNKNOWN, "no such export")),
                OptionReply {
                    option: OPT_GO,
                    reply: ServerReply::Error {
                        code: REP_ERR_UNKNOWN,
                        message: "no such export".into(),
                    },
                },
            ),
            (
                reply_of(|o| encode_option_reply(o, OPT_GO, 99, b"?")),
                OptionReply {
                    option: OPT_GO,
                    reply: ServerReply::Unknown(99),
                },
            ),
        ];
        for (bytes, want) in cases {
            for cut in 0..bytes.len() {
                assert_eq!(
                    decode_option_reply(&bytes[..cut]).unwrap(),
                    None,
                    "{want:?} cut at {cut}"
                );
            }
            let (got, used) = decode_option_reply(&bytes).unwrap().unwrap();
            assert_eq!(got, want);
            assert_eq!(got.reply.code(), be_u32(&bytes[12..16]));
            assert_eq!(used, bytes.len());
            // Header first, then exactly its data: the same reply.
            let (header, n) = decode_option_reply_header(&bytes).unwrap().unwrap();
            assert_eq!(n + header.length as usize, bytes.len());
            assert_eq!(decode_option_reply_data(&header, &bytes[n..]), want.reply);
        }
    }

    #[test]
    fn lying_option_replies_are_malformed_not_fatal() {
        // An export size without its flags.
        let mut bytes = reply_of(|o| encode_info_export(o, OPT_GO, 4096, 0));
        bytes.truncate(bytes.len() - 1);
        bytes[19] -= 1;
        let (got, used) = decode_option_reply(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert!(matches!(
            got.reply,
            ServerReply::Malformed {
                reply: REP_INFO,
                ..
            }
        ));
        // An ACK with data, an INFO without its type.
        for (reply, data) in [(REP_ACK, &b"x"[..]), (REP_INFO, &b"\0"[..])] {
            let bytes = reply_of(|o| encode_option_reply(o, OPT_GO, reply, data));
            let (got, _) = decode_option_reply(&bytes).unwrap().unwrap();
            assert!(
                matches!(got.reply, ServerReply::Malformed { .. }),
                "{got:?}"
            );
        }
    }

    #[test]
    fn bad_option_replies_are_fatal() {
        let mut bytes = reply_of(|o| encode_option_reply(o, OPT_GO, REP_ACK, &[]));
        bytes[3] ^= 1;
        assert!(matches!(
            decode_option_reply(&bytes),
            Err(HandshakeError::BadReplyMagic(_))
        ));
        let mut huge = reply_of(|o| encode_option_reply(o, OPT_GO, REP_INFO, &[]));
        huge[16..20].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(
            decode_option_reply(&huge),
            Err(HandshakeError::ReplyTooLong { .. })
        ));
    }

    #[test]
    fn export_name_replies_round_trip() {
        for no_zeroes in [false, true] {
            let bytes = reply_of(|o| encode_export_name_reply(o, 1 << 30, 3, no_zeroes));
            for cut in 0..bytes.len() {
                assert_eq!(decode_export_name_reply(&bytes[..cut], no_zeroes), None);
            }
            assert_eq!(
                decode_export_name_reply(&bytes, no_zeroes),
                Some(((1 << 30, 3), bytes.len()))
            );
        }
    }
}
