//! The iSCSI front door: a target over the same device storage pipeline as
//! the NBD service, on [`vstream_iscsi`]'s codec. One connection per
//! session, ErrorRecoveryLevel 0, one LUN (0) per target.
//!
//! ```text
//!   accept --> limits --> login (security: None or CHAP-MD5; operational
//!          keys; timeout) --> Targets::open --> full feature phase:
//!          SCSI commands (Data-In with status, immediate and unsolicited
//!          data, R2T), NOP, task management, SendTargets, logout
//! ```
//!
//! The farm's side (which initiator is which device, its CHAP secrets, its
//! disk) is a [`Targets`]: this module knows none of it. It never pings an
//! initiator (iPXE does not answer pings); TCP keepalive finds a vanished
//! one, as for NBD.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use vstream_iscsi::login::{status, LoginFailure, Negotiation, Params, TargetLimits};
use vstream_iscsi::pdu::{
    DataIn, DataOut, LoginRequest, LoginResponse, LogoutResponse, NopIn, R2t, Reject, ScsiCommand,
    ScsiResponse, TaskMgmtResponse, TextRequest, TextResponse,
};
use vstream_iscsi::scsi::{self, status as scsi_status, Command, Extent, Sense};
use vstream_iscsi::text::{self, Accumulator};
use vstream_iscsi::{chap, Pairs, Pdu, PduError, Request, Response, Stage, TargetSn};
use vstream_iscsi::{BHS_LEN, RESERVED_TAG};

use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::{Client, Export};

/// The iSCSI port.
pub const DEFAULT_PORT: u16 = 3260;
/// The logical block size of every target.
pub const BLOCK: u32 = 512;
/// Commands an initiator may have outstanding (MaxCmdSN - ExpCmdSN + 1).
const WINDOW: u32 = 64;
/// The portal group of every target.
pub const TPGT: u16 = 1;
/// Most blocks in one READ or WRITE (8 MiB), said in VPD page 0xB0.
const MAX_TRANSFER_BLOCKS: u32 = 16384;
/// Most bytes of writes waiting for their data in one session.
const MAX_PENDING_BYTES: usize = 32 << 20;

/// The CHAP secrets an initiator must prove it holds, and the target's own
/// for mutual CHAP.
#[derive(Clone)]
pub struct Chap {
    pub user: String,
    pub secret: Vec<u8>,
    /// The name and secret the target answers an initiator's challenge with.
    pub target: Option<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chap")
            .field("user", &self.user)
            .field("mutual", &self.target.is_some())
            .finish_non_exhaustive()
    }
}

/// A target opened for one session: the device's disk and what it says of
/// itself.
pub struct Target {
    pub export: Export,
    pub identity: scsi::Identity,
    /// Logical blocks per physical sector, as a power of 2: 0 (512n) or 3
    /// (512e).
    pub physical_exponent: u8,
    /// The logical unit's state shared by every session on it: the same
    /// `Arc` for every session of this target.
    pub lu: Arc<Lu>,
}

mod lu;
pub use lu::{Lu, Nexus};

/// What an iSCSI service serves: the provisioning server's device targets.
pub trait Targets: Send + Sync + 'static {
    /// Whether `initiator`, at `client`, may log in to `target`; the CHAP
    /// secrets it must prove, if any.
    fn authorize<'a>(
        &'a self,
        initiator: &'a str,
        target: &'a str,
        client: &'a Client,
    ) -> BoxFuture<'a, Result<Option<Chap>, LoginFailure>>;
    /// Whether `initiator`, at `client`, may open a discovery session; the
    /// CHAP secrets it must prove, if any.
    fn discovery_chap<'a>(
        &'a self,
        _initiator: &'a str,
        _client: &'a Client,
    ) -> BoxFuture<'a, Result<Option<Chap>, LoginFailure>> {
        Box::pin(async { Ok(None) })
    }
    /// Opens `target` for `initiator`, once it has authenticated.
    fn open<'a>(
        self: Arc<Self>,
        initiator: &'a str,
        target: &'a str,
        client: &'a Client,
    ) -> BoxFuture<'a, Result<Target, LoginFailure>>;
    /// The targets `initiator` may see (SendTargets), with the addresses
    /// (`IP:PORT,TPGT`) to reach each; `local` is the portal it asked.
    fn discover<'a>(
        &'a self,
        initiator: &'a str,
        client: &'a Client,
        local: &'a str,
    ) -> BoxFuture<'a, Vec<(String, Vec<String>)>>;
    fn stats(&self) -> &Stats;
    fn keepalive(&self) -> crate::tcp::Keepalive {
        crate::tcp::Keepalive::default()
    }
    /// How long a login may take.
    fn login_timeout(&self) -> Duration {
        Duration::from_secs(30)
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub logins: AtomicU64,
    pub login_failures: AtomicU64,
    pub redirects: AtomicU64,
    pub commands: AtomicU64,
    pub command_errors: AtomicU64,
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub rejects: AtomicU64,
}

impl Stats {
    pub fn rows(&self) -> Vec<(&'static str, &'static str, &'static str, &AtomicU64)> {
        vec![
            (
                "vstream_iscsi_connections_total",
                "counter",
                "iSCSI connections accepted",
                &self.connections,
            ),
            (
                "vstream_iscsi_logins_total",
                "counter",
                "iSCSI logins that reached full feature phase",
                &self.logins,
            ),
            (
                "vstream_iscsi_login_failures_total",
                "counter",
                "iSCSI logins refused (reason in the log)",
                &self.login_failures,
            ),
            (
                "vstream_iscsi_redirects_total",
                "counter",
                "iSCSI logins sent to the server the farm places the device on",
                &self.redirects,
            ),
            (
                "vstream_iscsi_commands_total",
                "counter",
                "SCSI commands executed",
                &self.commands,
            ),
            (
                "vstream_iscsi_command_errors_total",
                "counter",
                "SCSI commands answered CHECK CONDITION",
                &self.command_errors,
            ),
            (
                "vstream_iscsi_read_bytes_total",
                "counter",
                "bytes read by initiators",
                &self.read_bytes,
            ),
            (
                "vstream_iscsi_written_bytes_total",
                "counter",
                "bytes written by initiators",
                &self.written_bytes,
            ),
            (
                "vstream_iscsi_rejects_total",
                "counter",
                "PDUs rejected (malformed, unknown, out of place)",
                &self.rejects,
            ),
        ]
    }
}

/// Serves iSCSI on `listener` until `shutdown` turns true, then waits for
/// every session to end.
pub async fn serve(
    listener: crate::Listener,
    targets: Arc<dyn Targets>,
    limits: Arc<Limits>,
    shutdown: watch::Receiver<bool>,
) {
    let keepalive = targets.keepalive();
    crate::accept_loop(listener, keepalive, limits, shutdown, move |c, shutdown| {
        let targets = targets.clone();
        Box::pin(async move {
            Metrics::add(&targets.stats().connections, 1);
            let client = Client::plain(&c.peer);
            connection(c.reader, c.writer, client, c.local, targets, shutdown).await;
        })
    })
    .await
}

/// Why a connection ends.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("closed by the initiator")]
    Closed,
    #[error("logged out")]
    LoggedOut,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Protocol(String),
    #[error("login refused: {}", .0.why)]
    Login(LoginFailure),
    #[error("the server is stopping")]
    Shutdown,
    #[error("the server let the device go (device reset --force, or it was removed)")]
    Released,
}

/// One connection's wire: PDUs in, PDUs out.
struct Wire<R, W> {
    reader: R,
    writer: W,
    buf: Vec<u8>,
    /// The most data this side takes in one PDU.
    max_recv: usize,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Wire<R, W> {
    async fn read(&mut self) -> Result<Pdu, End> {
        loop {
            match Pdu::decode(&self.buf, self.max_recv) {
                Ok(Some((pdu, used))) => {
                    self.buf.drain(..used);
                    return Ok(pdu);
                }
                Ok(None) => {}
                Err(e) => return Err(End::Protocol(e.to_string())),
            }
            // Read into the buffer itself: a chunk on the stack would live
            // in the connection's future, 64 KiB per idle session. A
            // session waiting for its next PDU gets a small buffer; one in
            // the middle of a PDU, room for its data (the buffer keeps
            // what it grew to).
            let room = if self.buf.is_empty() {
                8 * 1024
            } else {
                64 * 1024
            };
            self.buf.reserve(room);
            let n = self.reader.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(End::Closed);
            }
        }
    }

    async fn send(&mut self, out: &[u8]) -> Result<(), End> {
        self.writer.write_all(out).await?;
        self.writer.flush().await?;
        Ok(())
    }
}

async fn connection<R, W>(
    reader: R,
    writer: W,
    client: Client,
    local: String,
    targets: Arc<dyn Targets>,
    mut shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut wire = Wire {
        reader,
        writer,
        buf: Vec::new(),
        // The login phase: 8192 bytes, until the keys say more.
        max_recv: 8192,
    };
    let timeout = targets.login_timeout();
    let login = tokio::time::timeout(timeout, login(&mut wire, &client, &targets));
    let session = tokio::select! {
        r = login => match r {
            Ok(r) => r,
            Err(_) => Err(End::Protocol(format!("no login within {timeout:?}"))),
        },
        _ = shutdown.changed() => Err(End::Shutdown),
    };
    let mut session = match session {
        Ok(s) => s,
        Err(End::Login(f)) if f.redirect.is_some() => {
            Metrics::add(&targets.stats().redirects, 1);
            tracing::info!(peer = %client.addr, to = f.redirect.as_deref().unwrap_or_default(), reason = %f.why, "iSCSI login redirected");
            return;
        }
        Err(e) => {
            if !matches!(e, End::Closed) {
                Metrics::add(&targets.stats().login_failures, 1);
                tracing::info!(peer = %client.addr, reason = %e, "iSCSI login refused");
            }
            return;
        }
    };
    Metrics::add(&targets.stats().logins, 1);
    tracing::info!(
        peer = %client.addr,
        initiator = %session.initiator,
        target = session.target_name.as_deref().unwrap_or("(discovery)"),
        "iSCSI login"
    );
    wire.max_recv = TargetLimits::default().max_recv_data as usize;
    let mut release = session
        .target
        .as_ref()
        .and_then(|t| t.export.session.as_ref())
        .and_then(|s| s.released());
    let end = tokio::select! {
        e = session.run(&mut wire, &client, &local, &targets) => e,
        _ = shutdown.changed() => End::Shutdown,
        _ = crate::transmission::released(&mut release) => End::Released,
    };
    let level = matches!(
        end,
        End::Closed | End::LoggedOut | End::Shutdown | End::Released
    );
    if level {
        tracing::info!(peer = %client.addr, initiator = %session.initiator, reason = %end, "iSCSI session ended");
    } else {
        tracing::warn!(peer = %client.addr, initiator = %session.initiator, reason = %end, "iSCSI session ended");
    }
    let _ = wire.writer.shutdown().await;
}

/// Where CHAP stands in the security stage.
enum Auth {
    /// Nothing asked yet.
    Start,
    /// AuthMethod=CHAP answered: CHAP_A is next.
    AwaitAlgorithm,
    /// CHAP_C sent with identifier `id`.
    AwaitResponse {
        id: u8,
        challenge: Vec<u8>,
    },
    Done,
}

/// The login phase: returns the session in full feature phase.
async fn login<R, W>(
    wire: &mut Wire<R, W>,
    client: &Client,
    targets: &Arc<dyn Targets>,
) -> Result<Session, End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut neg = Negotiation::new(TargetLimits::default());
    let mut auth = Auth::Start;
    let mut chap: Option<Chap> = None;
    // Who logs in to what, as the first complete text said: later
    // PDUs may not change it (it is what was authorized).
    let mut identified: Option<(Option<String>, Option<String>, bool)> = None;
    let mut stat_sn: u32 = 1;
    let mut text = Accumulator::default();
    let mut first = true;
    loop {
        let pdu = wire.read().await?;
        let req = match Request::parse(pdu) {
            Ok(Request::Login(l)) => l,
            // Anything else before full feature phase ends the connection
            // (RFC 7143 §6.1: a target receiving it drops the connection).
            Ok(other) => {
                return Err(End::Protocol(format!(
                    "{} before the login was complete",
                    request_name(&other)
                )))
            }
            Err(e) => return Err(End::Protocol(e.to_string())),
        };
        let respond = |res: &LoginRequest,
                       answers: Pairs,
                       transit: bool,
                       nsg: Stage,
                       tsih: u16,
                       st: (u8, u8),
                       stat_sn: u32| {
            Response::Login(LoginResponse {
                transit,
                cont: false,
                csg: res.csg,
                nsg: if transit { nsg } else { res.csg },
                version_max: 0,
                version_active: 0,
                isid: res.isid,
                tsih,
                itt: res.itt,
                sn: TargetSn {
                    stat_sn,
                    exp_cmd_sn: res.cmd_sn,
                    max_cmd_sn: res.cmd_sn.wrapping_add(WINDOW - 1),
                },
                status_class: st.0,
                status_detail: st.1,
                data: answers.to_bytes(),
            })
        };
        let fail = |wire_req: &LoginRequest, f: LoginFailure, stat_sn: u32| {
            let mut answers = Pairs::default();
            if let Some(address) = &f.redirect {
                answers.push("TargetAddress", address.clone());
            }
            (
                respond(wire_req, answers, false, wire_req.csg, 0, f.status, stat_sn),
                f,
            )
        };
        let outcome: Result<(Pairs, bool), LoginFailure> = async {
            if first && req.tsih != 0 {
                return Err(LoginFailure::new(
                    status::SESSION_DOES_NOT_EXIST,
                    "adding a connection to a session (MaxConnections=1)",
                ));
            }
            if req.version_min > 0 {
                return Err(LoginFailure::new(
                    status::UNSUPPORTED_VERSION,
                    format!("version {} and up", req.version_min),
                ));
            }
            text.add(&req.data)
                .map_err(|e| LoginFailure::new(status::INITIATOR_ERROR, e.to_string()))?;
            if req.cont {
                // More text follows: an empty answer asks for it.
                return Ok((Pairs::default(), false));
            }
            let pairs = Pairs::parse(&text.take())
                .map_err(|e| LoginFailure::new(status::INITIATOR_ERROR, e.to_string()))?;
            let mut answers = neg.offer(&pairs)?;
            let now = (
                neg.initiator_name.clone(),
                neg.target_name.clone(),
                neg.discovery(),
            );
            if let Some(was) = &identified {
                if *was != now {
                    return Err(LoginFailure::new(
                        status::INITIATOR_ERROR,
                        "the initiator, target or session type changed during the login",
                    ));
                }
            } else {
                let initiator = neg.initiator_name.clone().ok_or_else(|| {
                    LoginFailure::new(
                        status::MISSING_PARAMETER,
                        "no InitiatorName in the first login",
                    )
                })?;
                if neg.discovery() {
                    chap = targets.discovery_chap(&initiator, client).await?;
                } else {
                    let target = neg.target_name.clone().ok_or_else(|| {
                        LoginFailure::new(
                            status::MISSING_PARAMETER,
                            "a Normal session without TargetName",
                        )
                    })?;
                    chap = targets.authorize(&initiator, &target, client).await?;
                    answers.push("TargetPortalGroupTag", TPGT.to_string());
                }
                identified = Some(now);
            }
            match req.csg {
                Stage::Security => security(&pairs, &mut answers, &neg, &mut auth, chap.as_ref())?,
                Stage::Operational | Stage::FullFeature => {
                    if chap.is_some() && !matches!(auth, Auth::Done) {
                        return Err(LoginFailure::new(
                            status::AUTHENTICATION_FAILURE,
                            "this target needs CHAP: the login skipped the security stage",
                        ));
                    }
                    if req.csg == Stage::FullFeature {
                        return Err(LoginFailure::new(
                            status::INITIATOR_ERROR,
                            "a login in stage 3",
                        ));
                    }
                }
            }
            // Transit is granted when the stage's work is done.
            // (A target without CHAP lets an initiator that asks for no
            // method through.)
            let done = match req.csg {
                Stage::Security => {
                    matches!(auth, Auth::Done) || (chap.is_none() && matches!(auth, Auth::Start))
                }
                _ => true,
            };
            Ok((answers, req.transit && done))
        }
        .await;
        first = false;
        let (answers, transit) = match outcome {
            Ok(o) => o,
            Err(f) => {
                let (resp, f) = fail(&req, f, stat_sn);
                let mut out = Vec::new();
                resp.encode(&mut out);
                let _ = wire.send(&out).await;
                return Err(End::Login(f));
            }
        };
        let full = transit && req.nsg == Stage::FullFeature;
        let mut opened = None;
        if full {
            let initiator = neg.initiator_name.clone().unwrap_or_default();
            let result = match neg.check_complete() {
                Err(f) => Err(f),
                Ok(()) if neg.discovery() => Ok(None),
                Ok(()) => {
                    let target = neg.target_name.clone().unwrap_or_default();
                    targets
                        .clone()
                        .open(&initiator, &target, client)
                        .await
                        .map(Some)
                }
            };
            match result {
                Ok(t) => opened = Some(t),
                Err(f) => {
                    let (resp, f) = fail(&req, f, stat_sn);
                    let mut out = Vec::new();
                    resp.encode(&mut out);
                    let _ = wire.send(&out).await;
                    return Err(End::Login(f));
                }
            }
        }
        let tsih = if full { next_tsih() } else { 0 };
        let resp = respond(
            &req,
            answers,
            transit,
            req.nsg,
            tsih,
            status::SUCCESS,
            stat_sn,
        );
        stat_sn = stat_sn.wrapping_add(1);
        let mut out = Vec::new();
        resp.encode(&mut out);
        wire.send(&out).await?;
        if let Some(target) = opened {
            let blocks = target
                .as_ref()
                .map_or(0, |t| t.export.backend.size() / BLOCK as u64);
            return Ok(Session {
                params: neg.params.clone(),
                initiator: neg.initiator_name.clone().unwrap_or_default(),
                nexus: (
                    neg.initiator_name
                        .clone()
                        .unwrap_or_default()
                        .to_lowercase(),
                    req.isid,
                ),
                target_name: neg.target_name.clone().filter(|_| !neg.discovery()),
                target,
                blocks,
                stat_sn,
                exp_cmd_sn: req.cmd_sn,
                pending: HashMap::new(),
                next_ttt: 1,
                residual: None,
            });
        }
    }
}

/// A session number for the initiator (never 0).
fn next_tsih() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (n % 0xffff + 1) as u16
}

/// The security stage's keys: the method, then CHAP.
fn security(
    pairs: &Pairs,
    answers: &mut Pairs,
    neg: &Negotiation,
    auth: &mut Auth,
    chap: Option<&Chap>,
) -> Result<(), LoginFailure> {
    let failed = |why: &str| LoginFailure::new(status::AUTHENTICATION_FAILURE, why);
    if pairs.get("AuthMethod").is_some() {
        let method = neg.choose_auth(chap.is_some())?;
        answers.push("AuthMethod", method);
        *auth = if method == "None" {
            Auth::Done
        } else {
            Auth::AwaitAlgorithm
        };
        if chap.is_none() && method == "CHAP" {
            return Err(failed(
                "the initiator offered only CHAP, and this target has no secret for it",
            ));
        }
        return Ok(());
    }
    match std::mem::replace(auth, Auth::Start) {
        Auth::AwaitAlgorithm => {
            let list = pairs.get("CHAP_A").ok_or_else(|| failed("no CHAP_A"))?;
            if !chap::offers_md5(list) {
                answers.push("CHAP_A", "Reject");
                return Err(failed("CHAP without MD5"));
            }
            let id: u8 = rand::random();
            let challenge: Vec<u8> = (0..chap::CHALLENGE_LEN).map(|_| rand::random()).collect();
            answers.push("CHAP_A", "5");
            answers.push("CHAP_I", id.to_string());
            answers.push("CHAP_C", text::hex(&challenge));
            *auth = Auth::AwaitResponse { id, challenge };
            Ok(())
        }
        Auth::AwaitResponse { id, challenge } => {
            let chap = chap.ok_or_else(|| failed("no CHAP secret"))?;
            let name = pairs.get("CHAP_N").ok_or_else(|| failed("no CHAP_N"))?;
            let response = pairs
                .get("CHAP_R")
                .and_then(text::binary)
                .ok_or_else(|| failed("no readable CHAP_R"))?;
            // The same answer for a wrong name and a wrong secret.
            let name_ok = chap::constant_time_eq(name.as_bytes(), chap.user.as_bytes());
            if !(chap::verify(id, &chap.secret, &challenge, &response) && name_ok) {
                return Err(failed("wrong CHAP name or response"));
            }
            match (pairs.get("CHAP_I"), pairs.get("CHAP_C")) {
                (Some(i), Some(c)) => {
                    let (tname, tsecret) = chap.target.as_ref().ok_or_else(|| {
                        failed("mutual CHAP asked, and this target has no secret of its own")
                    })?;
                    let i: u8 = text::number(i)
                        .and_then(|n| u8::try_from(n).ok())
                        .ok_or_else(|| failed("a CHAP_I that is not 0 to 255"))?;
                    let c = text::binary(c).ok_or_else(|| failed("an unreadable CHAP_C"))?;
                    chap::check_initiator_challenge(&challenge, &c).map_err(failed)?;
                    answers.push("CHAP_N", tname.clone());
                    answers.push("CHAP_R", text::hex(&chap::response(i, tsecret, &c)));
                }
                (None, None) => {}
                _ => return Err(failed("CHAP_I without CHAP_C, or the reverse")),
            }
            *auth = Auth::Done;
            Ok(())
        }
        other => {
            *auth = other;
            Ok(())
        }
    }
}

fn request_name(r: &Request) -> &'static str {
    match r {
        Request::NopOut(_) => "NOP-Out",
        Request::ScsiCommand(_) => "a SCSI command",
        Request::TaskMgmt(_) => "a task management request",
        Request::Login(_) => "a login",
        Request::Text(_) => "a text request",
        Request::DataOut(_) => "Data-Out",
        Request::Logout(_) => "a logout",
        Request::Snack(_) => "SNACK",
    }
}

/// A WRITE-type command waiting for its data.
struct Pending {
    cmd: ScsiCommand,
    parsed: Command,
    data: Vec<u8>,
    received: usize,
    /// Unsolicited Data-Out may still come.
    unsolicited: bool,
    /// The R2T outstanding: its tag, and the end of the data it asked for.
    r2t: Option<(u32, usize)>,
    r2t_sn: u32,
    /// The DataSN the next Data-Out of the current sequence must carry.
    next_data_sn: u32,
}

/// A session in full feature phase.
struct Session {
    params: Params,
    initiator: String,
    /// The I_T nexus this session is, for the logical unit's
    /// reservations.
    nexus: Nexus,
    target_name: Option<String>,
    /// None in a discovery session.
    target: Option<Target>,
    blocks: u64,
    stat_sn: u32,
    exp_cmd_sn: u32,
    pending: HashMap<u32, Pending>,
    next_ttt: u32,
    /// The residual of the command being answered (a write whose SCSI
    /// length and iSCSI expected length differ): overflow, underflow, count.
    residual: Option<(bool, bool, u32)>,
}

impl Drop for Session {
    /// A session gone, by logout or a lost connection, takes its nexus's
    /// RESERVE(6) with it (its persistent registrations stay).
    fn drop(&mut self) {
        if let Some(t) = &self.target {
            t.lu.lost(&self.nexus);
        }
    }
}

/// Reject reasons (RFC 7143 §11.17.1).
mod reject {
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
}

impl Session {
    fn sn(&self) -> TargetSn {
        TargetSn {
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.exp_cmd_sn.wrapping_add(WINDOW - 1),
        }
    }

    /// The StatSN for a response that carries status, advancing it.
    fn take_sn(&mut self) -> TargetSn {
        let sn = self.sn();
        self.stat_sn = self.stat_sn.wrapping_add(1);
        sn
    }

    /// Whether a non-immediate command with `cmd_sn` is to be run (in
    /// order), advancing ExpCmdSN; commands outside the window, or already
    /// seen, are ignored (RFC 7143 §4.2.2.1).
    fn accept_cmd_sn(&mut self, immediate: bool, cmd_sn: u32) -> bool {
        if immediate {
            return true;
        }
        if cmd_sn == self.exp_cmd_sn {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            return true;
        }
        tracing::debug!(
            cmd_sn,
            exp = self.exp_cmd_sn,
            "a command outside the CmdSN window ignored"
        );
        false
    }

    fn reject(&mut self, reason: u8, header: &[u8], out: &mut Vec<u8>, stats: &Stats) {
        Metrics::add(&stats.rejects, 1);
        let sn = self.take_sn();
        Response::Reject(Reject {
            reason,
            sn,
            data_sn: 0,
            header: header[..BHS_LEN.min(header.len())].to_vec(),
        })
        .encode(out);
    }

    async fn run<R, W>(
        &mut self,
        wire: &mut Wire<R, W>,
        client: &Client,
        local: &str,
        targets: &Arc<dyn Targets>,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let stats = targets.stats();
        loop {
            let pdu = match wire.read().await {
                Ok(p) => p,
                Err(e) => return e,
            };
            let header = pdu.bhs.0;
            let mut out = Vec::new();
            let req = match Request::parse(pdu) {
                Ok(r) => r,
                Err(PduError::UnknownOpcode(op)) => {
                    tracing::info!(initiator = %self.initiator, opcode = op, "an unknown PDU rejected");
                    self.reject(reject::COMMAND_NOT_SUPPORTED, &header, &mut out, stats);
                    if let Err(e) = wire.send(&out).await {
                        return e;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::info!(initiator = %self.initiator, error = %e, "a malformed PDU rejected");
                    self.reject(reject::INVALID_PDU_FIELD, &header, &mut out, stats);
                    if let Err(e) = wire.send(&out).await {
                        return e;
                    }
                    continue;
                }
            };
            let step = match req {
                Request::NopOut(n) => {
                    if self.accept_cmd_sn(n.immediate, n.cmd_sn) && n.itt != RESERVED_TAG {
                        let sn = self.take_sn();
                        Response::NopIn(NopIn {
                            lun: n.lun,
                            itt: n.itt,
                            ttt: RESERVED_TAG,
                            sn,
                            data: n.data,
                        })
                        .encode(&mut out);
                    }
                    Ok(())
                }
                Request::ScsiCommand(c) => {
                    if self.target.is_none() {
                        self.reject(reject::PROTOCOL_ERROR, &header, &mut out, stats);
                        Ok(())
                    } else if self.accept_cmd_sn(c.immediate, c.cmd_sn) {
                        self.command(c, &mut out, stats).await
                    } else {
                        Ok(())
                    }
                }
                Request::DataOut(d) => self.data_out(d, &header, &mut out, stats).await,
                Request::TaskMgmt(t) => {
                    if self.accept_cmd_sn(t.immediate, t.cmd_sn) {
                        let response = match t.function {
                            // ABORT TASK: gone if it waited for data.
                            1 => {
                                // Only a write waiting for its data can
                                // still be aborted; anything else is done.
                                if self.pending.remove(&t.referenced_itt).is_some() {
                                    0
                                } else {
                                    1 // task does not exist
                                }
                            }
                            // ABORT TASK SET, CLEAR TASK SET, LUN RESET,
                            // TARGET WARM RESET: nothing runs but writes
                            // waiting for their data.
                            2 | 3 | 5 | 6 => {
                                self.pending.clear();
                                // LUN RESET and TARGET WARM RESET end a
                                // RESERVE(6) too (not persistent ones).
                                if matches!(t.function, 5 | 6) {
                                    if let Some(target) = &self.target {
                                        target.lu.reset();
                                    }
                                }
                                0
                            }
                            4 => 0, // CLEAR ACA
                            _ => 5, // not supported
                        };
                        let sn = self.take_sn();
                        Response::TaskMgmt(TaskMgmtResponse {
                            response,
                            itt: t.itt,
                            sn,
                        })
                        .encode(&mut out);
                    }
                    Ok(())
                }
                Request::Text(t) => {
                    if self.accept_cmd_sn(t.immediate, t.cmd_sn) {
                        self.text(t, client, local, targets, &mut out).await;
                    }
                    Ok(())
                }
                Request::Logout(l) => {
                    self.accept_cmd_sn(l.immediate, l.cmd_sn);
                    self.pending.clear();
                    // Closing the session (or its one connection) is the
                    // initiator's shutdown, as NBD_CMD_DISC is: the session
                    // ends cleanly. Removing the connection for recovery
                    // (reason 2) is not.
                    if l.reason <= 1 {
                        if let Some(end) =
                            self.target.as_mut().and_then(|t| t.export.session.as_mut())
                        {
                            end.ended_cleanly();
                        }
                    }
                    let sn = self.take_sn();
                    Response::Logout(LogoutResponse {
                        response: 0,
                        itt: l.itt,
                        sn,
                        time2wait: 0,
                        time2retain: 0,
                    })
                    .encode(&mut out);
                    if let Err(e) = wire.send(&out).await {
                        return e;
                    }
                    return End::LoggedOut;
                }
                Request::Login(_) => Err(End::Protocol("a login in full feature phase".into())),
                Request::Snack(_) => {
                    // ErrorRecoveryLevel 0: no SNACK.
                    self.reject(reject::COMMAND_NOT_SUPPORTED, &header, &mut out, stats);
                    Ok(())
                }
            };
            if let Err(e) = step {
                return e;
            }
            if !out.is_empty() {
                if let Err(e) = wire.send(&out).await {
                    return e;
                }
            }
        }
    }

    async fn text(
        &mut self,
        t: TextRequest,
        client: &Client,
        local: &str,
        targets: &Arc<dyn Targets>,
        out: &mut Vec<u8>,
    ) {
        let mut answers = Pairs::default();
        match Pairs::parse(&t.data) {
            Ok(pairs) => {
                for (k, v) in &pairs.0 {
                    if k == "SendTargets" {
                        let all = targets.discover(&self.initiator, client, local).await;
                        for (name, addrs) in all {
                            // "All" in a discovery session; in a normal
                            // one, the session's own target or the one named.
                            let wanted = match v.as_str() {
                                "All" => true,
                                "" => Some(&name) == self.target_name.as_ref(),
                                one => one == name,
                            };
                            if wanted {
                                answers.push("TargetName", name);
                                for a in addrs {
                                    answers.push("TargetAddress", a);
                                }
                            }
                        }
                    } else {
                        answers.push(k, "NotUnderstood");
                    }
                }
            }
            Err(e) => {
                tracing::info!(initiator = %self.initiator, error = %e, "a text request refused");
                answers.push("X-vstream-error", "Reject");
            }
        }
        let sn = self.take_sn();
        // (A SendTargets answer repeats TargetName and TargetAddress.)
        let data = answers.to_bytes();
        Response::Text(TextResponse {
            final_bit: true,
            cont: false,
            lun: t.lun,
            itt: t.itt,
            ttt: RESERVED_TAG,
            sn,
            data,
        })
        .encode(out);
    }

    /// Answers `c` with status: a SCSI Response.
    fn status(
        &mut self,
        c: &ScsiCommand,
        result: Result<(), Sense>,
        out: &mut Vec<u8>,
        stats: &Stats,
    ) {
        match result {
            Ok(()) => self.respond(c, scsi_status::GOOD, Vec::new(), out),
            Err(s) => {
                Metrics::add(&stats.command_errors, 1);
                self.respond(c, scsi_status::CHECK_CONDITION, s.fixed(), out)
            }
        }
    }

    /// A SCSI Response for `c` with `status` and `sense`, and the residual
    /// the command left, if any.
    fn respond(&mut self, c: &ScsiCommand, status: u8, sense: Vec<u8>, out: &mut Vec<u8>) {
        let sn = self.take_sn();
        let (overflow, underflow, residual) = self.residual.take().unwrap_or_default();
        Response::ScsiResponse(ScsiResponse {
            status,
            itt: c.itt,
            sn,
            sense,
            overflow,
            underflow,
            residual,
            ..Default::default()
        })
        .encode(out);
    }

    /// Whether the logical unit's reservations (or a unit attention
    /// waiting for this nexus) keep `parsed` from running; if so, `c` is
    /// answered.
    fn refused(
        &mut self,
        c: &ScsiCommand,
        parsed: &Command,
        out: &mut Vec<u8>,
        stats: &Stats,
    ) -> bool {
        let Some(t) = &self.target else {
            return false;
        };
        let r = t.lu.check(&self.nexus, parsed);
        self.refusal(c, r, out, stats).is_none()
    }

    /// Answers `c` if `r` refused it (and returns None, as `execute`
    /// does when it answered); GOOD to be sent otherwise.
    fn refusal(
        &mut self,
        c: &ScsiCommand,
        r: Result<(), lu::Refused>,
        out: &mut Vec<u8>,
        stats: &Stats,
    ) -> Option<Result<(), Sense>> {
        match r {
            Ok(()) => Some(Ok(())),
            Err(lu::Refused::Conflict) => {
                self.respond(c, scsi_status::RESERVATION_CONFLICT, Vec::new(), out);
                None
            }
            Err(lu::Refused::Sense(s)) => {
                self.status(c, Err(s), out, stats);
                None
            }
        }
    }

    /// Sends `data` for `c`: Data-In PDUs, the last with GOOD status and
    /// the residual against the expected length.
    fn data_in(&mut self, c: &ScsiCommand, data: &[u8], out: &mut Vec<u8>) {
        let expected = c.expected_len as usize;
        let send = &data[..data.len().min(expected)];
        self.residual = residual(data.len(), expected);
        if send.is_empty() {
            self.respond(c, scsi_status::GOOD, Vec::new(), out);
            return;
        }
        let (overflow, underflow, residual) = self.residual.take().unwrap_or_default();
        let max = self.params.max_send_data as usize;
        let chunks = send.len().div_ceil(max);
        for (i, chunk) in send.chunks(max).enumerate() {
            let last = i + 1 == chunks;
            let sn = if last { self.take_sn() } else { self.sn() };
            // The data goes from `send` to `out` once, behind its header.
            Response::DataIn(DataIn {
                final_bit: last,
                status: last.then_some(scsi_status::GOOD),
                overflow: last && overflow,
                underflow: last && underflow,
                lun: c.lun,
                itt: c.itt,
                ttt: RESERVED_TAG,
                sn,
                data_sn: i as u32,
                offset: (i * max) as u32,
                residual: if last { residual } else { 0 },
                ..Default::default()
            })
            .to_pdu()
            .encode_with(chunk, out);
        }
    }

    async fn command(
        &mut self,
        c: ScsiCommand,
        out: &mut Vec<u8>,
        stats: &Stats,
    ) -> Result<(), End> {
        Metrics::add(&stats.commands, 1);
        if c.lun != 0 {
            self.status(&c, Err(Sense::LUN_NOT_SUPPORTED), out, stats);
            return Ok(());
        }
        let parsed = match Command::parse(&c.cdb) {
            Ok(p) => p,
            Err(sense) => {
                self.status(&c, Err(sense), out, stats);
                return Ok(());
            }
        };
        // Reservations, and a unit attention waiting for this nexus.
        if self.refused(&c, &parsed, out, stats) {
            return Ok(());
        }
        // Commands that carry data to the target wait for all of it.
        let takes_data = matches!(
            parsed,
            Command::Write { .. }
                | Command::OrWrite { .. }
                | Command::Unmap { .. }
                | Command::ModeSelect { .. }
                | Command::WriteSame { ndob: false, .. }
                | Command::Verify { bytchk: 1 | 3, .. }
                | Command::PersistentReserveOut { .. }
        );
        if takes_data && c.write && c.expected_len > 0 {
            if c.data.len() > c.expected_len as usize
                || (!c.data.is_empty() && !self.params.immediate_data)
                || c.data.len() > self.params.first_burst as usize
            {
                return Err(End::Protocol(
                    "immediate data beyond what was negotiated".into(),
                ));
            }
            // The data is held until all of it is there: one command may
            // not ask for more than a WRITE may carry, nor the session
            // hold more than MAX_PENDING_BYTES (TASK SET FULL: try later).
            if c.expected_len as usize > MAX_TRANSFER_BLOCKS as usize * BLOCK as usize {
                self.status(&c, Err(Sense::INVALID_FIELD_IN_CDB), out, stats);
                return Ok(());
            }
            let held: usize = self.pending.values().map(|p| p.data.len()).sum();
            if held + c.expected_len as usize > MAX_PENDING_BYTES {
                self.respond(&c, scsi_status::TASK_SET_FULL, Vec::new(), out);
                return Ok(());
            }
            let received = c.data.len();
            let mut c = c;
            // All the data came with the command (open-iscsi's small
            // writes): kept as it came.
            let mut data = std::mem::take(&mut c.data);
            data.resize(c.expected_len as usize, 0);
            let unsolicited = !self.params.initial_r2t
                && !c.final_bit
                && received < (self.params.first_burst as usize).min(data.len());
            let itt = c.itt;
            let pending = Pending {
                cmd: c,
                parsed,
                data,
                received,
                unsolicited,
                r2t: None,
                r2t_sn: 0,
                next_data_sn: 0,
            };
            self.pending.insert(itt, pending);
            return self.advance(itt, out, stats).await;
        }
        let result = self.execute(&c, parsed, Vec::new(), out, stats).await;
        if let Some(r) = result {
            self.status(&c, r, out, stats);
        }
        Ok(())
    }

    /// Sends the next R2T of a pending write, or runs it once all is there.
    async fn advance(&mut self, itt: u32, out: &mut Vec<u8>, stats: &Stats) -> Result<(), End> {
        let Some(p) = self.pending.get_mut(&itt) else {
            return Ok(());
        };
        if p.unsolicited || p.r2t.is_some() {
            return Ok(());
        }
        if p.received >= p.data.len() {
            let p = self.pending.remove(&itt).expect("pending");
            // A reservation made while the data came in counts.
            if self.refused(&p.cmd, &p.parsed, out, stats) {
                return Ok(());
            }
            let result = self.execute(&p.cmd, p.parsed, p.data, out, stats).await;
            if let Some(r) = result {
                self.status(&p.cmd, r, out, stats);
            }
            return Ok(());
        }
        let len = (p.data.len() - p.received).min(self.params.max_burst as usize);
        let ttt = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1).max(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        let p = self.pending.get_mut(&itt).expect("pending");
        p.r2t = Some((ttt, p.received + len));
        p.next_data_sn = 0;
        let (lun, r2t_sn, offset) = (p.cmd.lun, p.r2t_sn, p.received as u32);
        p.r2t_sn += 1;
        let sn = self.sn();
        Response::R2t(R2t {
            lun,
            itt,
            ttt,
            sn,
            r2t_sn,
            offset,
            len: len as u32,
        })
        .encode(out);
        Ok(())
    }

    async fn data_out(
        &mut self,
        d: DataOut,
        header: &[u8],
        out: &mut Vec<u8>,
        stats: &Stats,
    ) -> Result<(), End> {
        let Some(p) = self.pending.get_mut(&d.itt) else {
            // Data for no command (aborted, or never sent): dropped.
            tracing::debug!(itt = d.itt, "Data-Out for no pending command ignored");
            return Ok(());
        };
        let offset = d.offset as usize;
        let end = offset
            .checked_add(d.data.len())
            .filter(|&e| e <= p.data.len());
        let Some(end) = end else {
            self.reject(reject::PROTOCOL_ERROR, header, out, stats);
            return Ok(());
        };
        let solicited = d.ttt != RESERVED_TAG;
        // ErrorRecoveryLevel 0: a DataSN out of sequence cannot be
        // recovered from; the connection ends.
        if d.data_sn != p.next_data_sn {
            return Err(End::Protocol(format!(
                "Data-Out with DataSN {} where {} was due",
                d.data_sn, p.next_data_sn
            )));
        }
        // DataPDUInOrder and DataSequenceInOrder are Yes: the data comes
        // in order, without gaps.
        if offset != p.received {
            return Err(End::Protocol(format!(
                "Data-Out at offset {offset} where {} was due",
                p.received
            )));
        }
        match (solicited, p.r2t) {
            (true, Some((ttt, limit))) if ttt == d.ttt && end <= limit => {}
            (false, _) if p.unsolicited && end <= self.params.first_burst as usize => {}
            _ => {
                self.reject(reject::PROTOCOL_ERROR, header, out, stats);
                return Ok(());
            }
        }
        p.data[offset..end].copy_from_slice(&d.data);
        p.next_data_sn = p.next_data_sn.wrapping_add(1);
        p.received = end;
        if d.final_bit {
            if solicited {
                p.r2t = None;
            } else {
                p.unsolicited = false;
            }
            p.next_data_sn = 0;
            return self.advance(d.itt, out, stats).await;
        }
        Ok(())
    }

    /// Runs `parsed` with its `data`; answers Data-In itself when it
    /// returns data (and then `None`), else the status to send.
    async fn execute(
        &mut self,
        c: &ScsiCommand,
        parsed: Command,
        data: Vec<u8>,
        out: &mut Vec<u8>,
        stats: &Stats,
    ) -> Option<Result<(), Sense>> {
        let target = self.target.as_ref()?;
        let backend = target.export.backend.clone();
        let blocks = self.blocks;
        let limits = scsi::Limits {
            max_transfer: MAX_TRANSFER_BLOCKS,
            optimal_transfer: 2048,
            unmap: backend.is_writable(),
            // libiscsi holds a target to at most 1 Mi blocks per UNMAP.
            max_unmap_blocks: 1 << 20,
            max_unmap_descriptors: 256,
            unmap_granularity: 8,
            // Write Same of more blocks than one WRITE may carry is refused.
            max_write_same: MAX_TRANSFER_BLOCKS as u64,
            unmapped_read_zero: true,
            // The vDisk's: 512n by default (docs/iscsi.md, "Thin
            // provisioning", says why).
            physical_exponent: target.physical_exponent,
        };
        let reply = |s: &mut Session, out: &mut Vec<u8>, bytes: Vec<u8>, alloc: u32| {
            s.data_in(c, &scsi::truncate(bytes, alloc), out);
            None
        };
        match parsed {
            Command::TestUnitReady
            | Command::StartStopUnit
            | Command::PreventAllowMediumRemoval => Some(Ok(())),
            Command::RequestSense { descriptor, alloc } => {
                let pending = target.lu.take_attention(&self.nexus).unwrap_or(Sense::NONE);
                let sense = if descriptor {
                    pending.descriptor()
                } else {
                    pending.fixed()
                };
                reply(self, out, sense, alloc)
            }
            Command::Inquiry { evpd, page, alloc } => {
                let id = &target.identity;
                let bytes = if evpd {
                    match scsi::vpd_page(page, id, &limits) {
                        Ok(b) => b,
                        Err(s) => return Some(Err(s)),
                    }
                } else {
                    scsi::inquiry(id)
                };
                reply(self, out, bytes, alloc)
            }
            Command::ReadCapacity10 => {
                reply(self, out, scsi::read_capacity10(blocks, BLOCK), u32::MAX)
            }
            Command::ReadCapacity16 { alloc } => reply(
                self,
                out,
                scsi::read_capacity16(blocks, BLOCK, &limits),
                alloc,
            ),
            Command::ReportLuns { alloc } => {
                if alloc < 16 {
                    return Some(Err(Sense::INVALID_FIELD_IN_CDB));
                }
                reply(self, out, scsi::report_luns(&[0]), alloc)
            }
            Command::ModeSense { alloc, .. } => {
                let info = scsi::ModeInfo {
                    blocks,
                    block_len: BLOCK,
                    read_only: !backend.is_writable(),
                    write_cache: true,
                };
                match scsi::mode_sense(&parsed, &info) {
                    Ok(b) => reply(self, out, b, alloc),
                    Err(s) => Some(Err(s)),
                }
            }
            Command::ModeSelect { .. } => Some(Err(Sense::INVALID_FIELD_IN_PARAMETERS)),
            Command::Read { at, .. } => {
                if let Err(s) = check(at, blocks) {
                    return Some(Err(s));
                }
                let len = at.blocks as u64 * BLOCK as u64;
                match read_blocks(&backend, at.lba * BLOCK as u64, len as usize).await {
                    Ok(bytes) => {
                        Metrics::add(&stats.read_bytes, bytes.len() as u64);
                        self.data_in(c, &bytes, out);
                        None
                    }
                    Err(e) => {
                        tracing::warn!(initiator = %self.initiator, error = %e, "a read failed");
                        Some(Err(Sense::MEDIUM_READ_ERROR))
                    }
                }
            }
            Command::Write { at, fua, verify } => {
                if let Err(s) = check(at, blocks) {
                    return Some(Err(s));
                }
                // The SCSI length and the iSCSI expected length may differ:
                // the whole blocks both cover are written, and the
                // difference is the residual (RFC 7143 §11.4.5).
                let want = at.blocks as usize * BLOCK as usize;
                self.residual = residual(want, c.expected_len as usize);
                let len = want.min(data.len()) / BLOCK as usize * BLOCK as usize;
                if len == 0 {
                    return Some(Ok(()));
                }
                let mut data = data;
                data.truncate(len);
                let bytes = Bytes::from(data);
                let r = backend
                    .write(bytes, at.lba * BLOCK as u64, fua || verify)
                    .await
                    .map_err(write_sense);
                if r.is_ok() {
                    Metrics::add(&stats.written_bytes, len as u64);
                }
                Some(r)
            }
            Command::OrWrite { at, fua } => {
                if let Err(s) = check(at, blocks) {
                    return Some(Err(s));
                }
                let len = at.blocks as usize * BLOCK as usize;
                if len == 0 {
                    return Some(Ok(()));
                }
                if data.len() < len {
                    return Some(Err(Sense::INVALID_FIELD_IN_CDB));
                }
                let offset = at.lba * BLOCK as u64;
                let mut bytes = match read_blocks(&backend, offset, len).await {
                    Ok(b) => b,
                    Err(_) => return Some(Err(Sense::MEDIUM_READ_ERROR)),
                };
                for (b, d) in bytes.iter_mut().zip(data) {
                    *b |= d;
                }
                let r = backend
                    .write(Bytes::from(bytes), offset, fua)
                    .await
                    .map_err(write_sense);
                if r.is_ok() {
                    Metrics::add(&stats.written_bytes, len as u64);
                }
                Some(r)
            }
            Command::WriteSame {
                at, unmap, ndob, ..
            } => {
                if let Err(s) = check(at, blocks) {
                    return Some(Err(s));
                }
                if at.blocks as u64 > limits.max_write_same {
                    return Some(Err(Sense::INVALID_FIELD_IN_CDB));
                }
                // 0 blocks means to the end of the disk.
                let count = if at.blocks == 0 {
                    blocks - at.lba
                } else {
                    at.blocks as u64
                };
                if count > limits.max_write_same {
                    return Some(Err(Sense::INVALID_FIELD_IN_CDB));
                }
                // Without NDOB, exactly one block comes with it: a half or
                // a double block is refused, not guessed.
                if !ndob && data.len() != BLOCK as usize {
                    return Some(Err(Sense::INVALID_FIELD_IN_CDB));
                }
                let offset = at.lba * BLOCK as u64;
                let len = count * BLOCK as u64;
                // With UNMAP the blocks are unmapped whatever the data
                // (and read as zeros: LBPRZ), as LIO does.
                let zero = ndob || unmap || data.iter().all(|&b| b == 0);
                if zero {
                    // Unmapped blocks read as zeros (LBPRZ): zero the
                    // partial chunks, punch the whole ones.
                    let r = backend.write_zeroes(offset, len, false, unmap).await;
                    return Some(r.map_err(write_sense));
                }
                let block = &data[..BLOCK as usize];
                let mut buf = Vec::with_capacity(len as usize);
                for _ in 0..count {
                    buf.extend_from_slice(block);
                }
                Some(
                    backend
                        .write(Bytes::from(buf), offset, false)
                        .await
                        .map_err(write_sense),
                )
            }
            Command::Unmap { .. } => {
                if !backend.is_writable() {
                    return Some(Err(Sense::WRITE_PROTECTED));
                }
                let runs = match scsi::unmap_descriptors(&data, blocks, &limits) {
                    Ok(r) => r,
                    Err(s) => return Some(Err(s)),
                };
                for r in runs {
                    // LBPRZ: what is unmapped reads as zeros, so partial
                    // chunks are zeroed and whole ones punched.
                    let res = backend
                        .clone()
                        .write_zeroes(
                            r.lba * BLOCK as u64,
                            r.blocks as u64 * BLOCK as u64,
                            false,
                            true,
                        )
                        .await;
                    if let Err(e) = res {
                        return Some(Err(write_sense(e)));
                    }
                }
                Some(Ok(()))
            }
            Command::SynchronizeCache { at, .. } => {
                if at.blocks != 0 || at.lba != 0 {
                    if let Err(s) = check(at, blocks) {
                        return Some(Err(s));
                    }
                }
                Some(backend.flush().await.map_err(|e| {
                    tracing::warn!(error = %e, "a flush failed");
                    Sense::WRITE_ERROR
                }))
            }
            Command::Verify { at, bytchk } => {
                if let Err(s) = check(at, blocks) {
                    return Some(Err(s));
                }
                if bytchk == 0 {
                    return Some(Ok(()));
                }
                let len = at.blocks as u64 * BLOCK as u64;
                match read_blocks(&backend, at.lba * BLOCK as u64, len as usize).await {
                    Ok(bytes) => {
                        let same = if bytchk == 3 {
                            data.len() >= BLOCK as usize
                                && bytes
                                    .chunks(BLOCK as usize)
                                    .all(|b| b == &data[..BLOCK as usize])
                        } else {
                            bytes.len() <= data.len() && bytes[..] == data[..bytes.len()]
                        };
                        Some(if same {
                            Ok(())
                        } else {
                            // MISCOMPARE during verify operation.
                            Err(Sense {
                                key: 0x0e,
                                asc: 0x1d,
                                ascq: 0x00,
                            })
                        })
                    }
                    Err(_) => Some(Err(Sense::MEDIUM_READ_ERROR)),
                }
            }
            Command::PreFetch { at } => Some(check(at, blocks)),
            Command::GetLbaStatus { lba, alloc } => {
                if lba >= blocks {
                    return Some(Err(Sense::LBA_OUT_OF_RANGE));
                }
                let offset = lba * BLOCK as u64;
                let span = ((blocks - lba) * BLOCK as u64).min(1 << 30);
                let runs: Vec<scsi::LbaStatus> = backend
                    .extents(offset, span, 64)
                    .into_iter()
                    .scan(lba, |at, e| {
                        let n = e.length / BLOCK as u64;
                        let run = scsi::LbaStatus {
                            at: Extent {
                                lba: *at,
                                blocks: n.min(u32::MAX as u64) as u32,
                            },
                            deallocated: e.zero,
                        };
                        *at += n;
                        Some(run)
                    })
                    .filter(|r| r.at.blocks > 0)
                    .collect();
                reply(self, out, scsi::lba_status(&runs), alloc)
            }
            Command::Reserve6 => {
                let r = target.lu.reserve6(&self.nexus);
                self.refusal(c, r, out, stats)
            }
            Command::Release6 => {
                let r = target.lu.release6(&self.nexus);
                self.refusal(c, r, out, stats)
            }
            Command::PersistentReserveIn { action, alloc } => {
                let bytes = target.lu.persistent_in(action);
                reply(self, out, bytes, alloc)
            }
            Command::PersistentReserveOut {
                action,
                scope,
                ty,
                len,
            } => {
                let r = match vstream_iscsi::pr::out_params(&data, len) {
                    Ok(p) => target.lu.persistent_out(&self.nexus, action, scope, ty, &p),
                    Err(s) => Err(lu::Refused::Sense(s)),
                };
                self.refusal(c, r, out, stats)
            }
            Command::ReportSupportedOpcodes { alloc, .. } => match scsi::supported_opcodes(&parsed)
            {
                Ok(b) => reply(self, out, b, alloc),
                Err(s) => Some(Err(s)),
            },
            Command::Unsupported(op) => {
                tracing::debug!(initiator = %self.initiator, opcode = op, "an unsupported SCSI command");
                Some(Err(Sense::INVALID_OPCODE))
            }
        }
    }
}

/// The residual of a command that moves `done` bytes where the initiator
/// expected `expected` (RFC 7143 §11.4.5): overflow, underflow, count.
/// `len` bytes at `offset`: from the page cache on the spot when they are
/// there (as the NBD door answers inline), else by a blocking read. A READ
/// that waits for nothing then costs no trip to the blocking pool.
async fn read_blocks(
    backend: &Arc<dyn vstream_pipeline::Backend>,
    offset: u64,
    len: usize,
) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    if crate::transmission::read_into(&**backend, &mut out, offset, len).unwrap_or(false) {
        return Ok(out);
    }
    backend.clone().read(offset, len as u32, 0).await
}

fn residual(done: usize, expected: usize) -> Option<(bool, bool, u32)> {
    match done.cmp(&expected) {
        std::cmp::Ordering::Greater => Some((true, false, (done - expected) as u32)),
        std::cmp::Ordering::Less => Some((false, true, (expected - done) as u32)),
        std::cmp::Ordering::Equal => None,
    }
}

fn check(at: Extent, blocks: u64) -> Result<(), Sense> {
    if at.blocks > MAX_TRANSFER_BLOCKS {
        // More than VPD 0xB0 allows in one command.
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    scsi::check_range(at, blocks)
}

fn write_sense(e: vstream_pipeline::WriteError) -> Sense {
    use vstream_pipeline::WriteError;
    match e {
        WriteError::ReadOnly => Sense::WRITE_PROTECTED,
        WriteError::OutOfRange => Sense::LBA_OUT_OF_RANGE,
        WriteError::CacheFull { .. } | WriteError::NoSpace => Sense::SPACE_EXHAUSTED,
        WriteError::Io(e) => {
            tracing::warn!(error = %e, "a write failed");
            Sense::WRITE_ERROR
        }
    }
}
