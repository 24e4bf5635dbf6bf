//! The device's base image, streamed from whichever server holds its version,
//! moving to another when that one fails.
//!
//! Every read runs on the current connection with a deadline. A reset
//! connection fails its reads at once; a silent server lets the deadline
//! pass. Either way the read that saw it starts the failover (one at a time):
//! log in again through the bootstrap list, avoiding the failed server and
//! pinned to the same version and content hash, connect, and make that the
//! current connection. Every read that failed meanwhile is then sent again on
//! it: base reads are idempotent, so replaying them is safe. Reads wait, and
//! never fail, while no server holds the version; once the farm has said
//! for [`GONE_AFTER`] that the version is gone (retired or deleted, no
//! version with its content), they fail with EIO, with the cause logged.

use std::io;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use vstream_api::{LoginReply, LoginRequest, Pin};
use vstream_nbd::{Command, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE};
use vstream_pipeline::{Backend, Extent, WriteError};

use crate::login::{login, LoginFailure};
use crate::upstream::{Connection, Failure};

/// First pause between attempts while no server can take the device.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Longest pause while I/O waits: the device is stalled meanwhile, so a
/// server that comes back is found within this.
const IO_RETRY_MAX: Duration = Duration::from_secs(2);

/// Pauses between retries: from 200 ms, doubling while the same reason
/// keeps coming back, up to `max`; a new reason starts again at 200 ms.
/// A server refusing a device is then asked a few times a minute, not five
/// times a second, and the agent logs once per reason.
pub(crate) struct Backoff {
    pause: Duration,
    max: Duration,
    reason: String,
}

impl Backoff {
    pub(crate) fn new(max: Duration) -> Backoff {
        Backoff {
            pause: RETRY_PAUSE,
            max,
            reason: String::new(),
        }
    }

    /// Notes why this attempt failed: true when the reason is new (log it).
    pub(crate) fn failed(&mut self, reason: &str) -> bool {
        if reason == self.reason {
            return false;
        }
        self.reason = reason.to_owned();
        self.pause = RETRY_PAUSE;
        true
    }

    /// The pause to sleep now; the next one is twice as long.
    fn next_pause(&mut self) -> Duration {
        let now = self.pause;
        self.pause = (self.pause * 2).min(self.max);
        now
    }

    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.next_pause()).await;
    }
}

/// How long the farm must keep saying the pinned version is gone before
/// reads fail with EIO (a farm view being repaired gets that long).
const GONE_AFTER: Duration = Duration::from_secs(10);

pub struct Remote {
    bootstrap: Vec<String>,
    mac: String,
    boot: String,
    pin: Pin,
    deadline: Duration,
    keepalive: vstream_service::tcp::Keepalive,
    tls: Option<vstream_service::ClientTls>,
    current: Mutex<Arc<Connection>>,
    switching: tokio::sync::Mutex<()>,
    /// Turns true when the agent stops: waiting reads then give up.
    closing: tokio::sync::watch::Receiver<bool>,
    /// Set when the device's writes belong to one server (Private mode, a
    /// server-side cache): it does not fail over, it waits for that server.
    stay: Option<LoginReply>,
    pub failovers: AtomicU64,
    /// Set once the pinned version is gone from the farm for good: every
    /// read fails with EIO from then on, with this reason logged.
    gone: Mutex<Option<String>>,
    /// The disk's size in bytes.
    size: u64,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("server", &self.current.lock().server)
            .field("pin", &self.pin)
            .finish()
    }
}

impl Remote {
    /// Streams a disk of `size` bytes through `first`, pinned to `pin`;
    /// `stay` for a device whose writes belong to its server.
    pub fn new(
        opts: &crate::Options,
        size: u64,
        pin: Pin,
        first: Connection,
        closing: tokio::sync::watch::Receiver<bool>,
        stay: Option<LoginReply>,
    ) -> Remote {
        Remote {
            bootstrap: opts.bootstrap.clone(),
            mac: opts.mac.clone(),
            boot: opts.boot.clone(),
            pin,
            deadline: opts.deadline,
            keepalive: opts.keepalive,
            tls: opts.tls.clone(),
            current: Mutex::new(Arc::new(first)),
            switching: tokio::sync::Mutex::new(()),
            closing,
            stay,
            failovers: AtomicU64::new(0),
            gone: Mutex::new(None),
            size,
        }
    }

    /// The server streaming now.
    pub fn server(&self) -> String {
        self.current.lock().server.clone()
    }

    /// The API URL of the server streaming now.
    pub fn api(&self) -> String {
        self.current.lock().api.clone()
    }

    /// Ends the stream politely (NBD_CMD_DISC), at the agent's exit.
    pub async fn disconnect(&self) {
        let conn = self.current.lock().clone();
        conn.disconnect().await;
    }

    /// Reads `len` bytes at `offset`, on whichever server can answer, after
    /// `headroom` zero bytes; fails only when the agent is stopping.
    pub async fn read_at(&self, offset: u64, len: u32, headroom: usize) -> io::Result<Vec<u8>> {
        self.send(Command::Read, 0, (offset, len), &[], headroom)
            .await
    }

    /// Sends one request until a server answers it: to another server
    /// holding the same bytes, or, for a device that stays, to its own server
    /// once it is back. Fails only with the server's own answer (for a device
    /// that stays) or when the agent is stopping.
    pub async fn request_at(
        &self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<Vec<u8>> {
        self.send(cmd, flags, (offset, len), payload, 0).await
    }

    async fn send(
        &self,
        cmd: Command,
        flags: u16,
        range: (u64, u32),
        payload: &[u8],
        headroom: usize,
    ) -> io::Result<Vec<u8>> {
        loop {
            if self.gone.lock().is_some() {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let conn = self.current.lock().clone();
            let sent = conn.request(cmd, flags, range, payload, headroom);
            let why = match tokio::time::timeout(self.deadline, sent).await {
                Ok(Ok(data)) => return Ok(data),
                // The server's own answer: the device's, unless another
                // server may hold good bytes (a base read).
                Ok(Err(Failure::Server(errno))) if self.stay.is_some() => {
                    return Err(io::Error::from_raw_os_error(errno as i32))
                }
                Ok(Err(Failure::Server(errno))) => {
                    format!(
                        "the server answered {}",
                        io::Error::from_raw_os_error(errno as i32)
                    )
                }
                Ok(Err(Failure::Connection(e))) => format!("request failed: {e}"),
                Err(_) => format!("no answer within {:?}", self.deadline),
            };
            let mut closing = self.closing.clone();
            tokio::select! {
                _ = self.recover(&conn, &why) => {}
                _ = closing.wait_for(|c| *c) => {
                    return Err(io::Error::other("the agent is stopping"));
                }
            }
        }
    }

    /// Fails over as soon as the server closes the connection (a move or a
    /// rebalance let the device go; the server stopped), not at the next
    /// read: an idle device moves too. A device that stays with its server
    /// reconnects at its next request, as before. Ends when the agent stops
    /// or the pinned version is gone.
    pub async fn follow(self: Arc<Self>) {
        if self.stay.is_some() {
            return;
        }
        let mut closing = self.closing.clone();
        loop {
            let conn = self.current.lock().clone();
            tokio::select! {
                _ = conn.closed() => {}
                _ = closing.wait_for(|c| *c) => return,
            }
            if *closing.borrow() || self.gone.lock().is_some() {
                return;
            }
            tokio::select! {
                _ = self.fail_over(&conn, "the server closed the connection") => {}
                _ = closing.wait_for(|c| *c) => return,
            }
            if self.gone.lock().is_some() {
                return;
            }
        }
    }

    async fn recover(&self, failed: &Arc<Connection>, why: &str) {
        match &self.stay {
            Some(reply) => self.reconnect(reply, failed, why).await,
            None => self.fail_over(failed, why).await,
        }
    }

    /// Connects again to the one server this device's writes belong to,
    /// waiting as long as it takes; unanswered requests are then sent again.
    async fn reconnect(&self, reply: &LoginReply, failed: &Arc<Connection>, why: &str) {
        let _one = self.switching.lock().await;
        if !Arc::ptr_eq(&self.current.lock(), failed) {
            return;
        }
        tracing::warn!(server = %reply.server, reason = why,
            "I/O waits for server {} to return: vDisk {} is {} mode{}, and such devices do not fail over",
            reply.server, reply.vdisk, reply.mode,
            if reply.cache_type == vstream_api::CacheType::Server { " with its write cache on the server" } else { "" });
        let started = Instant::now();
        let mut backoff = Backoff::new(IO_RETRY_MAX);
        loop {
            match Connection::open(reply, self.deadline, &self.keepalive, self.tls.as_ref()).await {
                Ok(c) => {
                    tracing::info!(server = %reply.server, waited_ms = started.elapsed().as_millis() as u64, "reconnected; unanswered requests are sent again");
                    *self.current.lock() = Arc::new(c);
                    return;
                }
                Err(e) => {
                    let why = e.to_string();
                    if backoff.failed(&why) {
                        tracing::debug!(error = %why, "server not back yet");
                    }
                }
            }
            backoff.wait().await;
        }
    }

    /// Replaces `failed` with a connection to another server holding the
    /// pinned version, unless another read has done so already.
    async fn fail_over(&self, failed: &Arc<Connection>, why: &str) {
        let _one = self.switching.lock().await;
        if !Arc::ptr_eq(&self.current.lock(), failed) {
            return;
        }
        let started = Instant::now();
        tracing::warn!(server = %failed.server, reason = why, "server failed; failing over");
        let mut avoid = vec![failed.server.clone()];
        let mut backoff = Backoff::new(IO_RETRY_MAX);
        let mut gone_since: Option<Instant> = None;
        loop {
            let req = LoginRequest {
                mac: self.mac.clone(),
                avoid: avoid.clone(),
                pin: Some(self.pin.clone()),
                boot: Some(self.boot.clone()),
            };
            // The failed server last: a silent one would hold up the login.
            let bootstrap = crate::login::failed_last(&self.bootstrap, &failed.api);
            let (deadline, tls) = (self.deadline, self.tls.clone());
            let answer = tokio::task::spawn_blocking(move || {
                login(&bootstrap, &req, deadline, tls.as_ref())
            })
            .await
            .unwrap_or_else(|e| Err(LoginFailure::NoAnswer(e.to_string())));
            let wait = match answer {
                Ok(reply) => match Connection::open(
                    &reply,
                    self.deadline,
                    &self.keepalive,
                    self.tls.as_ref(),
                )
                .await
                {
                    Ok(c) if c.size == failed.size => {
                        tracing::info!(from = %failed.server, to = %reply.server, stall_ms = started.elapsed().as_millis() as u64, "failed over");
                        *self.current.lock() = Arc::new(c);
                        self.failovers.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Ok(c) => format!(
                        "{} serves {} bytes, not {}",
                        reply.server, c.size, failed.size
                    ),
                    Err(e) => {
                        avoid.push(reply.server.clone());
                        format!(
                            "{} ({}) did not take the device: {e}",
                            reply.server, reply.nbd
                        )
                    }
                },
                Err(LoginFailure::Gone { message, .. }) => {
                    let since = *gone_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= GONE_AFTER {
                        tracing::error!(vdisk = %self.pin.vdisk, version = self.pin.version, reason = %message,
                            "the pinned version is gone from the farm: reads fail with I/O errors from now on; reboot the device");
                        *self.gone.lock() = Some(message);
                        return;
                    }
                    avoid.clear();
                    message
                }
                Err(e) => {
                    // Nobody else now: the failed server may come back too.
                    avoid.clear();
                    gone_since = None;
                    e.to_string()
                }
            };
            if backoff.failed(&wait) {
                tracing::warn!(reason = %wait, "I/O waits: no server can take the device yet; retrying");
            }
            backoff.wait().await;
        }
    }
}

/// The disk streamed from the farm as a backend: read-only for a device
/// that keeps its write cache itself (the lower disk of its
/// [`vstream_pipeline::Overlay`]); the whole disk, writes and all, for a
/// device whose writes belong to its server (Private mode, a server-side
/// cache). Every request is sent on the caller's task.
impl Backend for Remote {
    fn size(&self) -> u64 {
        self.size
    }
    fn is_writable(&self) -> bool {
        self.stay.is_some()
    }
    fn try_read(&self, _buf: &mut [MaybeUninit<u8>], _offset: u64) -> io::Result<bool> {
        // It waits on the network: never on the front door's inline path.
        Ok(false)
    }
    fn read(
        self: Arc<Self>,
        offset: u64,
        len: u32,
        headroom: usize,
    ) -> BoxFuture<'static, io::Result<Vec<u8>>> {
        Box::pin(async move { self.read_at(offset, len, headroom).await })
    }
    fn write(
        self: Arc<Self>,
        data: Bytes,
        offset: u64,
        fua: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        Box::pin(async move {
            self.check_write(offset, data.len() as u64)?;
            let written = self.write_at(&data, offset, fua).await;
            written.map_err(WriteError::from_answer)
        })
    }
    fn write_zeroes(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
        punch: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        Box::pin(async move {
            self.check_write(offset, len)?;
            let zeroed = self.zero_at(offset, len, fua, punch).await;
            zeroed.map_err(WriteError::from_answer)
        })
    }
    fn trim(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        Box::pin(async move {
            self.check_write(offset, len)?;
            let trimmed = self.trim_at(offset, len, fua).await;
            trimmed.map_err(WriteError::from_answer)
        })
    }
    fn flush(self: Arc<Self>) -> BoxFuture<'static, io::Result<()>> {
        Box::pin(async move {
            if !self.is_writable() {
                // Nothing written here: nothing to make durable.
                return Ok(());
            }
            self.flush_at().await
        })
    }
    fn extents(&self, offset: u64, len: u64, _max: usize) -> Vec<Extent> {
        // Its allocation is the server's: all of it is data to the device.
        let end = offset.saturating_add(len).min(self.size);
        vec![Extent {
            length: end.saturating_sub(offset),
            zero: false,
        }]
    }
}

/// A Private device's writes: to its server, on the agent's tasks.
impl Remote {
    /// The checks a write makes before it leaves for the server.
    fn check_write(&self, offset: u64, len: u64) -> Result<(), WriteError> {
        if !self.is_writable() {
            return Err(WriteError::ReadOnly);
        }
        if !self.in_range(offset, len) {
            return Err(WriteError::OutOfRange);
        }
        Ok(())
    }

    pub async fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let len =
            u32::try_from(data.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        self.request_at(Command::Write, flags, offset, len, data)
            .await
            .map(drop)
    }

    pub async fn zero_at(&self, offset: u64, len: u64, fua: bool, punch: bool) -> io::Result<()> {
        let mut flags = if fua { CMD_FLAG_FUA } else { 0 };
        if !punch {
            flags |= CMD_FLAG_NO_HOLE;
        }
        self.each_piece(Command::WriteZeroes, flags, offset, len)
            .await
    }

    pub async fn trim_at(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.each_piece(Command::Trim, flags, offset, len).await
    }

    pub async fn flush_at(&self) -> io::Result<()> {
        self.request_at(Command::Flush, 0, 0, 0, &[])
            .await
            .map(drop)
    }

    /// Sends `cmd` for `[offset, offset + len)` in pieces a request length can hold.
    async fn each_piece(&self, cmd: Command, flags: u16, offset: u64, len: u64) -> io::Result<()> {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(u64::from(u32::MAX) & !4095) as u32;
            self.request_at(cmd, flags, offset + done, n, &[]).await?;
            done += u64::from(n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    #[test]
    fn refusals_back_off_and_a_new_reason_starts_again() {
        let mut b = Backoff::new(Duration::from_secs(5));
        assert!(b.failed("503 no server"));
        let pauses: Vec<u64> = (0..8).map(|_| b.next_pause().as_millis() as u64).collect();
        assert_eq!(pauses, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert!(!b.failed("503 no server"), "the same reason is logged once");
        assert!(b.failed("connection refused"));
        assert_eq!(b.next_pause(), RETRY_PAUSE);
    }
}
