//! Handshake: the server greeting, client flags, options and option replies.

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
}
