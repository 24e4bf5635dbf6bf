//! Drives the server's option haggling (vstream-service's `handshake::greet`
//! and `handshake::options`, the code every NBD listener runs) through an
//! arbitrary sequence of client options, before STARTTLS and, once the server
//! has acknowledged STARTTLS, inside a simulated TLS session: the same byte
//! stream goes on in `Phase::Tls`, as it does in plaintext inside rustls.
//!
//! The first input byte picks the listener's mode (`require`, FORCEDTLS, three
//! times in four; `on` otherwise, where something can be negotiated before
//! STARTTLS and must then be forgotten), how the client's bytes arrive (each
//! option as one write or all at once, cut into reads of a few bytes), whether
//! structured replies are on, and NO_ZEROES. The rest is the client's options.
//!
//! Checked against a model of the spec, reply by reply:
//! - before STARTTLS under `require`: every option but STARTTLS and ABORT is
//!   answered NBD_REP_ERR_TLS_REQD and counted as a refusal, EXPORT_NAME
//!   closes the connection, and no export is opened or listed;
//! - after STARTTLS nothing negotiated before it counts: structured replies
//!   and meta contexts start off, and a GO or EXPORT_NAME gets the flags of
//!   what was negotiated inside TLS only;
//! - every reply is well formed, answers the option it follows, and nothing
//!   else is sent; nothing panics.
#![no_main]

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use vstream_nbd::handshake::{decode_export_name_reply, decode_greeting, decode_option_reply};
use vstream_nbd::*;
use vstream_pipeline::{Backend, Extent, WriteError};
use vstream_service::handshake::{self, HandshakeError, Outcome, Phase};
use vstream_service::metrics::Metrics;
use vstream_service::{Client, Export, Exports, OpenError, Refusal, TlsMode};

const SIZE: u64 = 1 << 20;
/// The exports the fake serves, in NBD_OPT_LIST order.
const EXPORTS: [&str; 2] = ["disk", "device/pc1"];
/// An export that exists but is not this client's (NBD_REP_ERR_POLICY).
const DENIED: &str = "device/pc2";

struct Disk;

impl Backend for Disk {
    fn size(&self) -> u64 {
        SIZE
    }
    fn is_writable(&self) -> bool {
        false
    }
    fn try_read(&self, _: &mut [std::mem::MaybeUninit<u8>], _: u64) -> std::io::Result<bool> {
        Ok(false)
    }
    fn read(
        self: Arc<Self>,
        _: u64,
        len: u32,
        headroom: usize,
    ) -> BoxFuture<'static, std::io::Result<Vec<u8>>> {
        Box::pin(async move { Ok(vec![0; headroom + len as usize]) })
    }
    fn write(
        self: Arc<Self>,
        _: bytes::Bytes,
        _: u64,
        _: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes(
        self: Arc<Self>,
        _: u64,
        _: u64,
        _: bool,
        _: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        Box::pin(async { Ok(()) })
    }
    fn trim(
        self: Arc<Self>,
        _: u64,
        _: u64,
        _: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        Box::pin(async { Ok(()) })
    }
    fn flush(self: Arc<Self>) -> BoxFuture<'static, std::io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn extents(&self, _: u64, _: u64, _: usize) -> Vec<Extent> {
        Vec::new()
    }
}

/// The exports a listener offers; counts what the handshake asked of them.
struct Fake {
    metrics: Metrics,
    structured: bool,
    /// The connection is inside (simulated) TLS.
    tls: AtomicBool,
    opened: AtomicUsize,
    listed: AtomicUsize,
}

impl Exports for Fake {
    fn open<'a>(
        self: Arc<Self>,
        name: &'a str,
        client: &'a Client,
        _go: bool,
    ) -> BoxFuture<'a, Result<Export, OpenError>> {
        assert_eq!(
            client.tls,
            self.tls.load(Ordering::Relaxed),
            "the handshake told the exports the wrong TLS state"
        );
        self.opened.fetch_add(1, Ordering::Relaxed);
        let name = name.to_owned();
        Box::pin(async move {
            if name == DENIED {
                return Err(OpenError::Denied(Refusal::WrongExport, "not yours".into()));
            }
            if !EXPORTS.contains(&name.as_str()) {
                return Err(OpenError::Unknown(name));
            }
            Ok(Export {
                description: format!("the {name}"),
                name,
                backend: Arc::new(Disk),
                session: None,
            })
        })
    }
    fn list<'a>(&'a self, client: &'a Client) -> BoxFuture<'a, Vec<(String, String)>> {
        assert_eq!(client.tls, self.tls.load(Ordering::Relaxed));
        self.listed.fetch_add(1, Ordering::Relaxed);
        Box::pin(async {
            EXPORTS
                .iter()
                .map(|n| (n.to_string(), format!("the {n}")))
                .collect()
        })
    }
    fn structured_replies(&self) -> bool {
        self.structured
    }
    fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(10)
    }
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// The client's end of the connection: its bytes arrive as the writes it
/// made (`segments`), each cut into reads of at most `chunk` bytes; what the
/// server writes is kept.
struct Wire {
    segments: std::collections::VecDeque<Vec<u8>>,
    chunk: usize,
    out: Vec<u8>,
}

impl AsyncRead for Wire {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let chunk = self.chunk;
        let Some(front) = self.segments.front_mut() else {
            return Poll::Ready(Ok(()));
        };
        let n = front.len().min(chunk).min(buf.remaining());
        buf.put_slice(&front[..n]);
        front.drain(..n);
        if front.is_empty() {
            self.segments.pop_front();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

/// The server's replies of one phase, read in order.
struct Replies<'a>(&'a [u8]);

impl Replies<'_> {
    fn next(&mut self, option: u32) -> ServerReply {
        let (reply, used) = decode_option_reply(self.0)
            .expect("a well-formed option reply")
            .expect("a reply to every option");
        assert_eq!(reply.option, option, "a reply to another option");
        assert!(
            !matches!(
                reply.reply,
                ServerReply::Malformed { .. } | ServerReply::Unknown(_)
            ),
            "{reply:?}"
        );
        self.0 = &self.0[used..];
        reply.reply
    }
    fn error(&mut self, option: u32) -> u32 {
        match self.next(option) {
            ServerReply::Error { code, .. } => code,
            other => panic!("option {option}: an error expected, got {other:?}"),
        }
    }
    fn ack(&mut self, option: u32) {
        assert_eq!(self.next(option), ServerReply::Ack, "option {option}");
    }
}

/// What the server returned, for a failed assertion's message.
fn describe(result: &Result<Outcome, HandshakeError>) -> String {
    match result {
        Ok(Outcome::Go(neg)) => format!(
            "Go({:?}, flags {:#x}, structured {}, base:allocation {})",
            neg.export.name, neg.flags, neg.structured, neg.base_allocation
        ),
        Ok(Outcome::Abort) => "Abort".into(),
        Ok(Outcome::StartTls) => "StartTls".into(),
        Err(e) => format!("Err({e:?})"),
    }
}

/// Bytes after the last whole option.
#[derive(Clone, Copy)]
struct Trailing {
    /// Some: the client sent more than its whole options.
    any: bool,
    /// They are no option (bad magic, too long): the server must drop the
    /// connection when it meets them.
    bad: bool,
}

/// How a phase ended, as the model sees it.
#[derive(Debug)]
enum End {
    Go {
        structured: bool,
        base_allocation: bool,
        flags: u16,
    },
    Abort,
    StartTls,
    /// The handshake failed; no more replies.
    Failed,
}

/// Walks the options the server met in one phase (`options`, from where the
/// last phase stopped) against its replies; returns how many options the
/// phase took and how it ended. `result` is what the server returned, for
/// the two places where the model cannot know the read pattern (data after
/// STARTTLS) or the error.
fn check_phase(
    phase: Phase,
    options: &[ClientOption],
    trailing: Trailing,
    out: &[u8],
    no_zeroes: bool,
    fake: &Fake,
    result: &Result<Outcome, HandshakeError>,
) -> usize {
    let mut replies = Replies(out);
    let mut structured = false;
    let mut base_allocation = false;
    let mut end = None;
    let mut taken = 0;
    for option in options.iter().take(1024) {
        taken += 1;
        let code = option.code();
        if phase == Phase::Plain(TlsMode::Require)
            && !matches!(option, ClientOption::StartTls | ClientOption::Abort)
        {
            if let ClientOption::ExportName(name) = option {
                assert!(
                    matches!(result, Err(HandshakeError::TlsRequired(n)) if n == name),
                    "{}",
                    describe(result)
                );
                end = Some(End::Failed);
                break;
            }
            assert_eq!(
                replies.error(code),
                REP_ERR_TLS_REQD,
                "{option:?} before STARTTLS"
            );
            continue;
        }
        match option {
            ClientOption::ExportName(name) => {
                if EXPORTS.contains(&name.as_str()) {
                    let ((size, flags), used) = decode_export_name_reply(replies.0, no_zeroes)
                        .expect("an EXPORT_NAME reply");
                    assert_eq!(size, SIZE);
                    if !no_zeroes {
                        assert!(replies.0[10..used].iter().all(|&b| b == 0));
                    }
                    replies.0 = &replies.0[used..];
                    end = Some(End::Go {
                        structured: false,
                        base_allocation: false,
                        flags,
                    });
                } else {
                    assert!(
                        matches!(result, Err(HandshakeError::ExportName { .. })),
                        "{}",
                        describe(result)
                    );
                    end = Some(End::Failed);
                }
                break;
            }
            ClientOption::Abort => {
                replies.ack(code);
                end = Some(End::Abort);
                break;
            }
            ClientOption::List => {
                for name in EXPORTS {
                    assert!(
                        matches!(replies.next(code), ServerReply::Server { name: n, .. } if n == name)
                    );
                }
                replies.ack(code);
            }
            ClientOption::StructuredReply => {
                if !fake.structured {
                    assert_eq!(replies.error(code), REP_ERR_UNSUP);
                } else if structured {
                    assert_eq!(replies.error(code), REP_ERR_INVALID);
                } else {
                    replies.ack(code);
                    structured = true;
                }
            }
            ClientOption::MetaContext {
                set,
                export,
                queries,
            } => {
                if *set && !structured {
                    assert_eq!(
                        replies.error(code),
                        REP_ERR_INVALID,
                        "SET_META_CONTEXT without structured replies in this phase"
                    );
                } else if !EXPORTS.contains(&export.as_str()) {
                    let want = if export == DENIED {
                        REP_ERR_POLICY
                    } else {
                        REP_ERR_UNKNOWN
                    };
                    assert_eq!(replies.error(code), want);
                } else {
                    let wanted = |q: &String| {
                        q == BASE_ALLOCATION || (!set && (q == "base:" || q.is_empty()))
                    };
                    let selected = if queries.is_empty() {
                        !set
                    } else {
                        queries.iter().any(wanted)
                    };
                    if selected {
                        let reply = replies.next(code);
                        assert_eq!(
                            reply,
                            ServerReply::MetaContext {
                                id: 1,
                                name: BASE_ALLOCATION.into()
                            }
                        );
                    }
                    replies.ack(code);
                    if *set {
                        base_allocation = selected;
                    }
                }
            }
            ClientOption::Info { go, name, requests } => {
                if !EXPORTS.contains(&name.as_str()) {
                    let want = if name == DENIED {
                        REP_ERR_POLICY
                    } else {
                        REP_ERR_UNKNOWN
                    };
                    assert_eq!(replies.error(code), want);
                    continue;
                }
                let ServerReply::Info(Info::Export { size, flags }) = replies.next(code) else {
                    panic!("NBD_INFO_EXPORT first");
                };
                assert_eq!(size, SIZE);
                assert_eq!(
                    flags & TFLAG_SEND_DF != 0,
                    structured,
                    "flags of another phase"
                );
                for want in [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE] {
                    if requests.contains(&want) {
                        let ServerReply::Info(info) = replies.next(code) else {
                            panic!("an info")
                        };
                        match (want, info) {
                            (INFO_NAME, Info::Name(n)) => assert_eq!(&n, name),
                            (INFO_DESCRIPTION, Info::Description(_)) => {}
                            (
                                INFO_BLOCK_SIZE,
                                Info::BlockSize {
                                    min,
                                    preferred,
                                    max,
                                },
                            ) => {
                                assert!(min <= preferred && preferred <= max)
                            }
                            (w, i) => panic!("info {w} asked, {i:?} sent"),
                        }
                    }
                }
                replies.ack(code);
                if *go {
                    end = Some(End::Go {
                        structured,
                        base_allocation,
                        flags,
                    });
                    break;
                }
            }
            ClientOption::StartTls => match phase {
                Phase::Tls => assert_eq!(replies.error(code), REP_ERR_INVALID),
                Phase::Plain(TlsMode::Off) => assert_eq!(replies.error(code), REP_ERR_POLICY),
                Phase::Plain(_) => {
                    if matches!(result, Err(HandshakeError::DataAfterStartTls)) {
                        assert!(
                            options.len() > taken || trailing.any,
                            "no data after STARTTLS"
                        );
                        end = Some(End::Failed);
                    } else {
                        replies.ack(code);
                        end = Some(End::StartTls);
                    }
                    break;
                }
            },
            ClientOption::ExtendedHeaders | ClientOption::Unknown(_) => {
                assert_eq!(replies.error(code), REP_ERR_UNSUP)
            }
            ClientOption::Malformed { .. } => assert_eq!(replies.error(code), REP_ERR_INVALID),
        }
    }
    let end = end.unwrap_or_else(|| {
        match result {
            Err(HandshakeError::TooManyOptions) => assert_eq!(taken, 1024),
            Err(HandshakeError::Protocol(_)) => assert!(trailing.bad && taken == options.len()),
            Err(HandshakeError::Closed) => assert!(!trailing.bad && taken == options.len()),
            other => panic!(
                "the options ran out, and the server said {}",
                describe(other)
            ),
        }
        End::Failed
    });
    match (&end, result) {
        (
            End::Go {
                structured,
                base_allocation,
                flags,
            },
            Ok(Outcome::Go(neg)),
        ) => {
            assert_eq!(
                neg.structured, *structured,
                "structured replies of another phase"
            );
            assert_eq!(
                neg.base_allocation, *base_allocation,
                "a meta context of another phase"
            );
            assert_eq!(neg.flags, *flags);
            assert_eq!(neg.flags & TFLAG_SEND_DF != 0, *structured);
            assert!(neg.flags & TFLAG_READ_ONLY != 0);
        }
        (End::Abort, Ok(Outcome::Abort))
        | (End::StartTls, Ok(Outcome::StartTls))
        | (End::Failed, Err(_)) => {}
        (end, result) => panic!(
            "the model ended with {end:?}, the server with {}",
            describe(result)
        ),
    }
    assert!(
        replies.0.is_empty(),
        "{} bytes sent beyond the replies",
        replies.0.len()
    );
    taken
}

fuzz_target!(|data: &[u8]| {
    let [cfg, rest @ ..] = data else { return };
    let mode = if cfg & 3 == 3 {
        TlsMode::On
    } else {
        TlsMode::Require
    };
    let coalesce = cfg & 4 != 0;
    let structured = cfg & 8 != 0;
    let no_zeroes = cfg & 16 != 0;
    let chunk = [usize::MAX, 1, 3, 7, 16, 17, 100, 1024][(cfg >> 5) as usize];

    // The options as the client wrote them: one write each, unless it
    // coalesced them; bytes that are no (whole) option go last.
    let mut options = Vec::new();
    let mut segments = std::collections::VecDeque::new();
    let mut flags = Vec::new();
    encode_client_flags(
        &mut flags,
        FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 },
    );
    segments.push_back(flags);
    let mut at = rest;
    let trailing_bad = loop {
        match decode_option(at) {
            Ok(Some((option, used))) => {
                options.push(option);
                segments.push_back(at[..used].to_vec());
                at = &at[used..];
            }
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    let trailing = Trailing {
        any: !at.is_empty(),
        bad: trailing_bad,
    };
    if trailing.any {
        segments.push_back(at.to_vec());
    }
    if coalesce {
        let all: Vec<u8> = segments.drain(1..).flatten().collect();
        segments.push_back(all);
    }

    let fake = Arc::new(Fake {
        metrics: Metrics::default(),
        structured,
        tls: AtomicBool::new(false),
        opened: AtomicUsize::new(0),
        listed: AtomicUsize::new(0),
    });
    let exports: Arc<dyn Exports> = fake.clone();
    let mut wire = Wire {
        segments,
        chunk,
        out: Vec::new(),
    };
    runtime().block_on(async {
        assert_eq!(
            handshake::greet(&mut wire)
                .await
                .expect("good client flags"),
            no_zeroes
        );
        let (greeting, used) = decode_greeting(&wire.out)
            .expect("a greeting")
            .expect("a whole greeting");
        assert_eq!(used, wire.out.len());
        assert!(greeting.flags & FLAG_FIXED_NEWSTYLE != 0);
        wire.out.clear();

        let client = Client::plain("fuzz");
        let result =
            handshake::options(&mut wire, &exports, &client, no_zeroes, Phase::Plain(mode)).await;
        let out = std::mem::take(&mut wire.out);
        let taken = check_phase(
            Phase::Plain(mode),
            &options,
            trailing,
            &out,
            no_zeroes,
            &fake,
            &result,
        );
        if mode == TlsMode::Require {
            assert_eq!(
                fake.opened.load(Ordering::Relaxed),
                0,
                "an export opened before STARTTLS"
            );
            assert_eq!(
                fake.listed.load(Ordering::Relaxed),
                0,
                "exports listed before STARTTLS"
            );
            let refused = options[..taken]
                .iter()
                .filter(|o| !matches!(o, ClientOption::StartTls | ClientOption::Abort))
                .count();
            assert_eq!(fake.metrics.refusals(Refusal::NoTls), refused as u64);
        }
        if !matches!(result, Ok(Outcome::StartTls)) {
            return;
        }
        drop(result);

        // The TLS handshake would run here; the options go on inside it.
        fake.tls.store(true, Ordering::Relaxed);
        let client = Client {
            addr: "fuzz".into(),
            tls: true,
            certificate: None,
        };
        let result = handshake::options(&mut wire, &exports, &client, no_zeroes, Phase::Tls).await;
        let out = std::mem::take(&mut wire.out);
        check_phase(
            Phase::Tls,
            &options[taken..],
            trailing,
            &out,
            no_zeroes,
            &fake,
            &result,
        );
    });
});
