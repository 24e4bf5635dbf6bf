//! Option haggling: from the greeting to the export a connection will use.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use vstream_nbd::handshake::{
    encode_export_name_reply, encode_info_block_size, encode_info_export, encode_info_text,
    encode_meta_context, encode_option_error, encode_option_reply, encode_rep_server,
};
use vstream_nbd::*;

use crate::metrics::Refusal;
use crate::tls::{Client, TlsMode};
use crate::{Export, Exports, OpenError};

/// Largest request payload we accept (READ length or WRITE data).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Context id we give `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;
const MAX_OPTIONS: usize = 1024;

/// How option haggling ended.
pub enum Outcome {
    /// An export, and transmission starts.
    Go(Negotiated),
    /// The client ended the handshake politely (NBD_OPT_ABORT).
    Abort,
    /// NBD_OPT_STARTTLS was acknowledged: the TLS handshake follows on the
    /// same stream, then the options start again inside TLS.
    StartTls,
}

/// Where a connection stands with TLS while it haggles over options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not yet TLS; the mode says whether it may or must become so (`Off`
    /// when this listener has no credentials).
    Plain(TlsMode),
    /// Inside TLS.
    Tls,
}

/// The outcome of a successful handshake.
pub struct Negotiated {
    pub export: Export,
    pub flags: u16,
    pub structured: bool,
    pub base_allocation: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("socket error during the handshake")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] OptionError),
    #[error("the client closed the connection during the handshake")]
    Closed,
    #[error("the client sent more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("export {name:?} cannot be used: {reason}")]
    ExportName { name: String, reason: String },
    #[error("the client asked for export {0:?} without TLS, which this server requires (NBD_OPT_EXPORT_NAME cannot be refused: connection closed)")]
    TlsRequired(String),
    #[error("the client sent more after NBD_OPT_STARTTLS before the TLS handshake")]
    DataAfterStartTls,
    #[error("{0}")]
    Certificate(String),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
}

/// Transmission flags of an export.
pub fn export_flags(export: &Export, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_CACHE | TFLAG_CAN_MULTI_CONN;
    if export.backend.is_writable() {
        f |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    } else {
        f |= TFLAG_READ_ONLY;
    }
    if structured {
        f |= TFLAG_SEND_DF;
    }
    f
}

/// Sends the greeting and reads the client's flags: whether it asked for no
/// zeroes after an NBD_OPT_EXPORT_NAME reply.
pub async fn greet<S>(stream: &mut S) -> Result<bool, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(32);
    encode_greeting(&mut out);
    stream.write_all(&out).await?;
    let mut flags = [0u8; 4];
    read_exact_or_closed(stream, &mut flags).await?;
    Ok(decode_client_flags(flags)?)
}

/// Haggles over options until one ends the handshake. In
/// `Phase::Plain(TlsMode::Require)`, every option but STARTTLS and ABORT is
/// refused with NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME closes the
/// connection. A new phase starts with nothing negotiated (structured
/// replies, meta contexts): what was asked before STARTTLS is forgotten.
pub async fn options<S>(
    stream: &mut S,
    exports: &Arc<dyn Exports>,
    client: &Client,
    no_zeroes: bool,
    phase: Phase,
) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let peer = client.addr.as_str();
    let mut out = Vec::with_capacity(256);
    let mut buf = BytesMut::with_capacity(1024);
    let mut structured = false;
    let mut base_allocation = false;
    for _ in 0..MAX_OPTIONS {
        let option = loop {
            if let Some((opt, used)) = decode_option(&buf)? {
                buf.advance(used);
                break opt;
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(HandshakeError::Closed);
            }
        };
        out.clear();
        let code = option.code();
        if phase == Phase::Plain(TlsMode::Require) {
            match option {
                ClientOption::StartTls | ClientOption::Abort => {}
                ClientOption::ExportName(name) => {
                    exports.metrics().refused(Refusal::NoTls);
                    return Err(HandshakeError::TlsRequired(name));
                }
                _ => {
                    exports.metrics().refused(Refusal::NoTls);
                    encode_option_error(
                        &mut out,
                        code,
                        REP_ERR_TLS_REQD,
                        "this server requires TLS: send NBD_OPT_STARTTLS first",
                    );
                    stream.write_all(&out).await?;
                    stream.flush().await?;
                    continue;
                }
            }
        }
        match option {
            ClientOption::ExportName(name) => {
                let opened = exports.clone().open(&name, client, true).await;
                let export = opened.map_err(|e| {
                    count_denial(exports, &e);
                    HandshakeError::ExportName {
                        name: name.clone(),
                        reason: e.to_string(),
                    }
                })?;
                let flags = export_flags(&export, false);
                encode_export_name_reply(&mut out, export.backend.size(), flags, no_zeroes);
                stream.write_all(&out).await?;
                stream.flush().await?;
                return Ok(Outcome::Go(Negotiated {
                    export,
                    flags,
                    structured: false,
                    base_allocation: false,
                }));
            }
            ClientOption::Abort => {
                encode_option_reply(&mut out, code, REP_ACK, &[]);
                let _ = stream.write_all(&out).await;
                return Ok(Outcome::Abort);
            }
            ClientOption::List => {
                for (name, description) in exports.list(client).await {
                    encode_rep_server(&mut out, &name, &description);
                }
                encode_option_reply(&mut out, code, REP_ACK, &[]);
            }
            ClientOption::StructuredReply => {
                if !exports.structured_replies() {
                    encode_option_error(
                        &mut out,
                        code,
                        REP_ERR_UNSUP,
                        "structured replies are turned off",
                    );
                } else if structured {
                    encode_option_error(
                        &mut out,
                        code,
                        REP_ERR_INVALID,
                        "structured replies are already on",
                    );
                } else {
                    structured = true;
                    encode_option_reply(&mut out, code, REP_ACK, &[]);
                }
            }
            ClientOption::MetaContext {
                set,
                export,
                queries,
            } => {
                if set && !structured {
                    encode_option_error(
                        &mut out,
                        code,
                        REP_ERR_INVALID,
                        "negotiate structured replies first",
                    );
                } else if let Err(e) = exports.clone().open(&export, client, false).await {
                    count_denial(exports, &e);
                    encode_option_error(&mut out, code, open_error_reply(&e), &e.to_string());
                } else {
                    let wanted =
                        |q: &str| q == BASE_ALLOCATION || (!set && (q == "base:" || q.is_empty()));
                    let selected = if queries.is_empty() {
                        !set
                    } else {
                        queries.iter().any(|q| wanted(q))
                    };
                    if selected {
                        encode_meta_context(&mut out, code, BASE_ALLOCATION_ID, BASE_ALLOCATION);
                    }
                    if set {
                        base_allocation = selected;
                    }
                    encode_option_reply(&mut out, code, REP_ACK, &[]);
                }
            }
            ClientOption::Info { go, name, requests } => {
                match exports.clone().open(&name, client, go).await {
                    Err(e) => {
                        count_denial(exports, &e);
                        tracing::info!(%peer, export = %name, reason = %e, "export refused");
                        encode_option_error(&mut out, code, open_error_reply(&e), &e.to_string());
                    }
                    Ok(export) => {
                        let flags = export_flags(&export, structured);
                        encode_info_export(&mut out, code, export.backend.size(), flags);
                        if requests.contains(&INFO_NAME) {
                            encode_info_text(&mut out, code, INFO_NAME, &export.name);
                        }
                        if requests.contains(&INFO_DESCRIPTION) {
                            encode_info_text(&mut out, code, INFO_DESCRIPTION, &export.description);
                        }
                        if requests.contains(&INFO_BLOCK_SIZE) {
                            encode_info_block_size(&mut out, code, 1, 4096, MAX_PAYLOAD);
                        }
                        encode_option_reply(&mut out, code, REP_ACK, &[]);
                        if go {
                            stream.write_all(&out).await?;
                            stream.flush().await?;
                            return Ok(Outcome::Go(Negotiated {
                                export,
                                flags,
                                structured,
                                base_allocation,
                            }));
                        }
                    }
                }
            }
            ClientOption::StartTls => match phase {
                Phase::Tls => {
                    encode_option_error(&mut out, code, REP_ERR_INVALID, "TLS is on already")
                }
                Phase::Plain(TlsMode::Off) => encode_option_error(
                    &mut out,
                    code,
                    REP_ERR_POLICY,
                    "TLS is not configured on this server",
                ),
                Phase::Plain(_) => {
                    if !buf.is_empty() {
                        // The TLS handshake must start right after the ACK.
                        return Err(HandshakeError::DataAfterStartTls);
                    }
                    encode_option_reply(&mut out, code, REP_ACK, &[]);
                    stream.write_all(&out).await?;
                    stream.flush().await?;
                    return Ok(Outcome::StartTls);
                }
            },
            ClientOption::ExtendedHeaders | ClientOption::Unknown(_) => {
                encode_option_error(&mut out, code, REP_ERR_UNSUP, "option not supported")
            }
            ClientOption::Malformed { reason, .. } => {
                tracing::debug!(%peer, option = code, reason, "malformed option");
                encode_option_error(&mut out, code, REP_ERR_INVALID, reason)
            }
        }
        stream.write_all(&out).await?;
        stream.flush().await?;
    }
    Err(HandshakeError::TooManyOptions)
}

/// Counts a refusal of policy by its reason.
fn count_denial(exports: &Arc<dyn Exports>, e: &OpenError) {
    if let OpenError::Denied(why, _) = e {
        exports.metrics().refused(*why);
    }
}

fn open_error_reply(e: &OpenError) -> u32 {
    match e {
        OpenError::Unknown(_) | OpenError::Invalid(..) => REP_ERR_UNKNOWN,
        OpenError::Refused(_) | OpenError::Denied(..) => REP_ERR_POLICY,
        OpenError::Failed(_) => REP_ERR_PLATFORM,
    }
}

async fn read_exact_or_closed<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut [u8],
) -> Result<(), HandshakeError> {
    match s.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(HandshakeError::Closed),
        Err(e) => Err(e.into()),
    }
}
