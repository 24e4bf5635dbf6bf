//! The transmission phase of one connection.
//!
//! ```text
//!   socket --read--> buffer --decode--> request --validate--+--> READ hit in page cache: answered inline
//!                                                           |     (within one layer it does not write: the bytes go
//!                                                           |      from the layer's mapping, a large read by sendfile)
//!                                                           +--> anything else: blocking pool --> reply
//!   inline replies of one batch leave in one write; replies that finish while
//!   another is being written leave together, in one vectored write
//! ```
//!
//! Reads are first offered to the backend's `try_read` on the connection's
//! task: a page-cache hit costs no thread hop. A miss, and every write, flush,
//! trim or zero, is awaited on a task of its own; the backend decides where
//! the work runs (the blocking pool, the network), so a slow disk or server
//! never stalls the runtime. Replies may leave out of order; every reply is
//! header and payload in one write, or, for a read sent from its layer file
//! (see [`crate::sink`]), header and file data back to back under the
//! connection's one writer.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use vstream_nbd::transmission::{
    encode_block_status, encode_offset_data_header, encode_simple_reply, encode_structured_error,
};
use vstream_nbd::*;
use vstream_pipeline::{Backend, FileSpan, WriteError};

use crate::handshake::{Negotiated, MAX_PAYLOAD};
use crate::metrics::Metrics;
use crate::sink::Sink;
use crate::Exports;

/// Most requests of one connection in flight at once.
const MAX_IN_FLIGHT: u32 = 64;
/// Inline replies are sent once a batch grows past this.
const BATCH_LIMIT: usize = 1 << 20;
/// A connection keeps its reply buffer between batches up to this size; a
/// larger one goes back to the allocator once sent, for the next batch of
/// any connection to reuse. Hundreds of devices in a boot storm, each just
/// answered a 128 KiB read, would otherwise each hold that much for as long
/// as they stay connected.
const OUT_KEEP: usize = 16 << 10;
/// On plain connections, a read that lies within one layer file the disk
/// does not write, all in the page cache, goes from the file to the socket
/// without a copy into a buffer of ours: at least this long by `sendfile`,
/// shorter from the file's shared mapping, handed to `sendmsg` with the
/// replies around it. `VSTREAM_NBD_SENDFILE_MIN` sets it (bytes; `off`:
/// neither way, every read is copied). A boot storm's 128 KiB reads,
/// hundreds of connections sending the same cached pages, cost the server
/// 11 % and the clients 17 % more CPU by sendfile than by copy, while
/// sequential 256 KiB reads cost the server less by sendfile
/// (bench/notes/datapath.md); from the mapping, the storm costs the server
/// less than by copy (bench/notes/storm.md).
const SENDFILE_MIN: u32 = 256 << 10;

/// The smallest read sent from its file; `None`: none is.
fn sendfile_min() -> Option<u32> {
    static MIN: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| match std::env::var("VSTREAM_NBD_SENDFILE_MIN") {
        Ok(v) if v == "off" => None,
        Ok(v) => match v.parse() {
            Ok(n) => Some(n),
            Err(_) => {
                tracing::warn!(value = %v, "VSTREAM_NBD_SENDFILE_MIN is not a number of bytes or `off`; using {SENDFILE_MIN}");
                Some(SENDFILE_MIN)
            }
        },
        Err(_) => Some(SENDFILE_MIN),
    })
}

/// How the connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// NBD_CMD_DISC after all requests were answered.
    Disconnect,
    /// The client went away (EOF or reset).
    Dropped,
    /// The server is shutting down.
    Shutdown,
    /// The server let the device go (a rebalance, or `device reset --force`):
    /// in-flight requests were answered first; an agent replays anything else
    /// on its next server.
    Released,
    /// Not a device session, and no request for the idle limit.
    Idle(std::time::Duration),
}

#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    #[error("socket error")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] RequestError),
    #[error("the client sent a {0}-byte write, more than the {MAX_PAYLOAD} allowed")]
    TooLarge(u32),
    #[error("the client disconnected in the middle of a request")]
    Truncated,
}

/// What the request loop needs to know about the negotiated export.
struct Conn {
    backend: Arc<dyn Backend>,
    structured: bool,
    base_allocation: bool,
    exports: Arc<dyn Exports>,
    /// Reads at least this long may be sent from their file, shorter ones
    /// from its mapping: a plain socket; `None`: every read is copied.
    sendfile_min: Option<u32>,
}

/// Replies ready to leave, in order: bytes, and file data to send between
/// them.
#[derive(Default)]
struct Out {
    bytes: Vec<u8>,
    /// `(at, span, via)`: `span`'s bytes follow `bytes[..at]`; `at` never falls.
    files: Vec<(usize, FileSpan, Via)>,
    /// What the spans hold, for the batch limit.
    file_bytes: usize,
}

/// How a file span's bytes reach the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// `sendfile` from the file.
    File,
    /// `sendmsg` from the file's shared mapping, with the bytes around it.
    Mapping,
}

impl Out {
    fn len(&self) -> usize {
        self.bytes.len() + self.file_bytes
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn clear(&mut self) {
        self.bytes.clear();
        self.files.clear();
        self.file_bytes = 0;
    }
}

impl From<Vec<u8>> for Out {
    fn from(bytes: Vec<u8>) -> Out {
        Out {
            bytes,
            ..Out::default()
        }
    }
}

/// Serves requests until the client disconnects or `shutdown` fires.
pub async fn serve<R, W>(
    mut reader: R,
    writer: W,
    neg: &Negotiated,
    exports: Arc<dyn Exports>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<Ending, TransmissionError>
where
    R: AsyncRead + Unpin + Send,
    W: Sink + 'static,
{
    let conn = Arc::new(Conn {
        backend: neg.export.backend.clone(),
        structured: neg.structured,
        base_allocation: neg.base_allocation,
        exports,
        sendfile_min: sendfile_min().filter(|_| writer.socket().is_some()),
    });
    let mut release = neg.export.session.as_ref().and_then(|s| s.released());
    let idle = conn.exports.idle_timeout(&neg.export);
    let replies = Arc::new(Replies::new(writer));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize));
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut out = Out::default();
    let ending = 'conn: loop {
        // Answer every complete request in the buffer.
        while let Some(req) = decode_request(&buf)? {
            let payload = req.payload_len();
            if payload > MAX_PAYLOAD as usize {
                return Err(TransmissionError::TooLarge(req.length));
            }
            let need = REQUEST_HEADER_LEN + payload;
            if buf.len() < need {
                buf.reserve(need - buf.len());
                break;
            }
            let data = buf.split_to(need).split_off(REQUEST_HEADER_LEN).freeze();
            Metrics::add(&conn.exports.metrics().requests, 1);
            if req.command == Command::Disc {
                break 'conn Ending::Disconnect;
            }
            if !conn.try_inline(&req, &mut out) {
                let permit = in_flight
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore never closed");
                let (conn, replies) = (conn.clone(), replies.clone());
                tokio::spawn(async move {
                    let reply = conn.awaited(&req, data).await;
                    // A failed write means the client is gone; the reader sees it too.
                    let _ = replies.send(reply, permit).await;
                });
            }
            if out.len() >= BATCH_LIMIT {
                replies.send_batch(&mut out).await?;
            }
        }
        if !out.is_empty() {
            replies.send_batch(&mut out).await?;
            if out.bytes.capacity() > OUT_KEEP {
                out = Out::default();
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        tokio::select! {
            n = reader.read_buf(&mut buf) => {
                if n? == 0 {
                    if !buf.is_empty() {
                        return Err(TransmissionError::Truncated);
                    }
                    break 'conn Ending::Dropped;
                }
            }
            _ = shutdown.changed() => break 'conn Ending::Shutdown,
            _ = released(&mut release) => break 'conn Ending::Released,
            // Measured from the last bytes read: each turn of the loop starts it again.
            _ = idle_for(idle) => {
                if in_flight.available_permits() == MAX_IN_FLIGHT as usize {
                    break 'conn Ending::Idle(idle.unwrap_or_default());
                }
            }
        }
        if buf.is_empty() && buf.capacity() > 256 * 1024 {
            buf = BytesMut::with_capacity(16 * 1024);
        }
    };
    // Let every request already taken finish and reply before closing (a
    // queued reply holds its permit until it is written).
    let _all = in_flight.acquire_many(MAX_IN_FLIGHT).await;
    if ending != Ending::Dropped {
        let _ = replies.writer.lock().await.flush().await;
    }
    Ok(ending)
}

/// Never ends for `None`.
async fn idle_for(limit: Option<std::time::Duration>) {
    match limit {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// The connection's reply side. Whoever has a reply queues it; the first to
/// find nobody writing writes everything queued, its own and what others
/// queue meanwhile, in vectored writes, and leaves once the queue is empty.
/// Replies that finish together (a batch of upstream answers in the agent)
/// thus leave in one system call and wake the client once, with no copy.
/// A queued reply keeps its request's permit until it is written, and the
/// connection loop waits for its own batch: a client that stops reading
/// stops the server taking its requests.
struct Replies<W> {
    queue: parking_lot::Mutex<Queued>,
    /// How many queued replies have been written; `u64::MAX` once a write failed.
    written: tokio::sync::watch::Sender<u64>,
    writer: Mutex<W>,
}

/// A reply, and the permit of its request while it waits to be written.
type Reply = (Out, Option<OwnedSemaphorePermit>);

#[derive(Default)]
struct Queued {
    replies: Vec<Reply>,
    /// Replies ever queued: a reply's ticket is the count after it.
    queued: u64,
    writing: bool,
    failed: bool,
}

fn client_gone() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "an earlier reply could not be written",
    )
}

impl<W: Sink> Replies<W> {
    fn new(writer: W) -> Self {
        Replies {
            queue: parking_lot::Mutex::new(Queued::default()),
            written: tokio::sync::watch::channel(0).0,
            writer: Mutex::new(writer),
        }
    }

    /// Queues `reply`, holding `permit` until it is written. The first to
    /// find nobody writing writes the queue, after the other tasks ready to
    /// run (replies woken together by one upstream read) have queued theirs.
    async fn send(&self, reply: Vec<u8>, permit: OwnedSemaphorePermit) -> std::io::Result<()> {
        {
            let mut q = self.queue.lock();
            if q.failed {
                return Err(client_gone());
            }
            q.replies.push((Out::from(reply), Some(permit)));
            q.queued += 1;
            if q.writing {
                return Ok(());
            }
            q.writing = true;
        }
        tokio::task::yield_now().await;
        let mut w = self.writer.lock().await;
        self.drain(&mut w, Ok(())).await
    }

    /// Sends the connection loop's batch of inline replies and waits until
    /// it is written, keeping the buffer (emptied) for the next batch when
    /// nobody else is writing.
    async fn send_batch(&self, batch: &mut Out) -> std::io::Result<()> {
        let ticket = {
            let mut q = self.queue.lock();
            if q.failed {
                return Err(client_gone());
            }
            if q.writing {
                q.replies.push((std::mem::take(batch), None));
                q.queued += 1;
                Some(q.queued)
            } else {
                q.writing = true;
                None
            }
        };
        if let Some(ticket) = ticket {
            let mut written = self.written.subscribe();
            let _ = written.wait_for(|w| *w >= ticket).await;
            return match self.queue.lock().failed {
                true => Err(client_gone()),
                false => Ok(()),
            };
        }
        let mut w = self.writer.lock().await;
        let first = write_out(&mut *w, std::slice::from_ref(batch)).await;
        batch.clear();
        self.drain(&mut w, first).await
    }

    /// Writes what is queued until the queue is empty or a write fails.
    async fn drain(&self, w: &mut W, first: std::io::Result<()>) -> std::io::Result<()> {
        let mut result = first;
        loop {
            let batch = {
                let mut q = self.queue.lock();
                if result.is_err() {
                    q.replies.clear();
                    q.writing = false;
                    q.failed = true;
                    self.written.send_replace(u64::MAX);
                    return result;
                }
                if q.replies.is_empty() {
                    q.writing = false;
                    return result;
                }
                std::mem::take(&mut q.replies)
            };
            let outs: Vec<&Out> = batch.iter().map(|(r, _)| r).collect();
            result = write_outs(w, &outs).await;
            if result.is_ok() {
                self.written.send_modify(|n| *n += batch.len() as u64);
            }
            // The batch's permits go with it.
        }
    }
}

/// Writes `outs` in order: in as few calls as the socket allows when they
/// are all bytes; their file spans from the files (see [`crate::sink`]).
async fn write_outs<W: Sink>(w: &mut W, outs: &[&Out]) -> std::io::Result<()> {
    if outs.iter().all(|o| o.files.is_empty()) {
        return write_all_vectored(w, outs.iter().map(|o| &o.bytes[..])).await;
    }
    let Some(socket) = w.socket() else {
        // Never: spans are only made for a writer with a socket.
        return Err(std::io::Error::other(
            "file data for a connection without a plain socket",
        ));
    };
    let mut bytes: Vec<&[u8]> = Vec::new();
    for out in outs {
        let mut from = 0;
        for (at, span, via) in &out.files {
            bytes.push(&out.bytes[from..*at]);
            let mapped = match via {
                Via::Mapping => span.mapped(),
                Via::File => None,
            };
            match mapped {
                Some(mapped) => bytes.push(mapped),
                None => {
                    socket.send_all(&bytes, true).await?;
                    bytes.clear();
                    socket.send_file(span).await?;
                }
            }
            from = *at;
        }
        bytes.push(&out.bytes[from..]);
    }
    socket.send_all(&bytes, false).await
}

/// [`write_outs`] of one.
async fn write_out<W: Sink>(w: &mut W, outs: &[Out]) -> std::io::Result<()> {
    let outs: Vec<&Out> = outs.iter().collect();
    write_outs(w, &outs).await
}

/// Writes every buffer of `bufs`, in order, in as few calls as the socket
/// allows, and flushes (what TLS buffers goes out too).
async fn write_all_vectored<'a, W: AsyncWrite + Unpin>(
    w: &mut W,
    bufs: impl Iterator<Item = &'a [u8]>,
) -> std::io::Result<()> {
    let mut slices: Vec<std::io::IoSlice<'_>> = bufs.map(std::io::IoSlice::new).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut rest, n);
    }
    w.flush().await
}

/// Resolves once `release` turns true; never without one.
pub(crate) async fn released(release: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    match release {
        Some(rx) => {
            if rx.wait_for(|r| *r).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

impl Conn {
    /// Checks a request against the export; `Err` is the NBD error to answer.
    fn validate(&self, req: &Request) -> Result<(), u32> {
        let writable = self.backend.is_writable();
        let allowed = match req.command {
            Command::Read => {
                if self.structured {
                    CMD_FLAG_DF
                } else {
                    0
                }
            }
            Command::Write | Command::Trim => CMD_FLAG_FUA,
            Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            Command::BlockStatus => CMD_FLAG_REQ_ONE,
            Command::Flush | Command::Cache | Command::Disc => 0,
            Command::Unknown(_) => return Err(EINVAL),
        };
        if req.flags & !allowed != 0 {
            return Err(EINVAL);
        }
        match req.command {
            Command::Write | Command::Trim | Command::WriteZeroes if !writable => {
                return Err(EPERM)
            }
            Command::Flush => {
                return if req.offset == 0 && req.length == 0 {
                    Ok(())
                } else {
                    Err(EINVAL)
                }
            }
            Command::BlockStatus if !self.base_allocation => return Err(EINVAL),
            Command::Read if req.length > MAX_PAYLOAD => return Err(EINVAL),
            _ => {}
        }
        if !self.backend.in_range(req.offset, u64::from(req.length)) {
            return Err(EINVAL);
        }
        Ok(())
    }

    /// Answers `req` on the spot if it needs no blocking work; returns false otherwise.
    fn try_inline(&self, req: &Request, out: &mut Out) -> bool {
        if let Err(errno) = self.validate(req) {
            Metrics::add(&self.exports.metrics().request_errors, 1);
            out.bytes
                .extend_from_slice(&self.error_reply(req, errno, "invalid request"));
            return true;
        }
        let bytes = &mut out.bytes;
        match req.command {
            Command::Read => {
                let m = self.exports.metrics();
                if let Some((span, via)) = self.file_span(req) {
                    self.read_reply_header(req, bytes);
                    out.files.push((bytes.len(), span, via));
                    out.file_bytes += req.length as usize;
                    match via {
                        Via::File => Metrics::add(&m.sendfile_reads, 1),
                        Via::Mapping => Metrics::add(&m.mapped_reads, 1),
                    }
                } else {
                    let start = bytes.len();
                    self.read_reply_header(req, bytes);
                    let len = req.length as usize;
                    if !read_into(&*self.backend, bytes, req.offset, len).is_ok_and(|done| done) {
                        bytes.truncate(start);
                        return false;
                    }
                }
                Metrics::add(&m.read_bytes, u64::from(req.length));
                Metrics::add(&m.reads, 1);
                Metrics::add(&m.inline_reads, 1);
                true
            }
            Command::Cache => {
                encode_simple_reply(bytes, req.cookie, 0);
                true
            }
            // Nothing written since the last flush (a booting OS flushes
            // often, most often with nothing new): durable already.
            Command::Flush if self.backend.is_flushed() => {
                Metrics::add(&self.exports.metrics().inline_flushes, 1);
                encode_simple_reply(bytes, req.cookie, 0);
                true
            }
            Command::BlockStatus => {
                let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
                    1
                } else {
                    1 << 16
                };
                let extents: Vec<(u32, u32)> = self
                    .backend
                    .extents(req.offset, u64::from(req.length), max)
                    .iter()
                    .map(|e| {
                        (
                            e.length as u32,
                            if e.zero { STATE_HOLE | STATE_ZERO } else { 0 },
                        )
                    })
                    .collect();
                encode_block_status(
                    bytes,
                    req.cookie,
                    crate::handshake::BASE_ALLOCATION_ID,
                    &extents,
                );
                true
            }
            _ => false,
        }
    }

    /// Where READ `req`'s data may be sent from, and how: its file, if the
    /// connection takes that and the data lies cached within one layer
    /// file the disk does not write; by `sendfile` if the read is long
    /// enough, else from the file's mapping (if it has one).
    fn file_span(&self, req: &Request) -> Option<(FileSpan, Via)> {
        let min = self.sendfile_min?;
        let span = self.backend.file_span(req.offset, u64::from(req.length))?;
        if req.length >= min {
            Some((span, Via::File))
        } else {
            span.mapped().is_some().then_some((span, Via::Mapping))
        }
    }

    fn read_reply_header(&self, req: &Request, out: &mut Vec<u8>) {
        if self.structured && req.length > 0 {
            encode_offset_data_header(out, req.cookie, req.offset, req.length);
        } else if self.structured {
            vstream_nbd::transmission::encode_structured_done(out, req.cookie);
        } else {
            encode_simple_reply(out, req.cookie, 0);
        }
    }

    /// Serves `req` by awaiting the backend; returns the whole reply.
    async fn awaited(&self, req: &Request, data: Bytes) -> Vec<u8> {
        let backend = self.backend.clone();
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let (offset, len) = (req.offset, u64::from(req.length));
        let result: Result<(), WriteError> = match req.command {
            Command::Read => {
                let mut header = Vec::with_capacity(32);
                self.read_reply_header(req, &mut header);
                return match backend.read(offset, req.length, header.len()).await {
                    Ok(mut out) if out.len() == header.len() + req.length as usize => {
                        out[..header.len()].copy_from_slice(&header);
                        Metrics::add(&self.exports.metrics().read_bytes, len);
                        Metrics::add(&self.exports.metrics().reads, 1);
                        out
                    }
                    Ok(_) => self.error_reply(req, EIO, "short read"),
                    Err(e) => {
                        tracing::error!(error = %e, offset, "read failed");
                        self.error_reply(req, EIO, &format!("read failed: {e}"))
                    }
                };
            }
            Command::Write => {
                Metrics::add(&self.exports.metrics().written_bytes, data.len() as u64);
                backend.write(data, offset, fua).await
            }
            Command::Flush => backend.flush().await.map_err(WriteError::from),
            Command::Trim => backend.trim(offset, len, fua).await,
            Command::WriteZeroes => {
                let punch = req.flags & CMD_FLAG_NO_HOLE == 0;
                backend.write_zeroes(offset, len, fua, punch).await
            }
            _ => Ok(()),
        };
        match result {
            Ok(()) => {
                let mut out = Vec::with_capacity(16);
                encode_simple_reply(&mut out, req.cookie, 0);
                out
            }
            Err(e) => {
                let errno = errno_of(&e);
                if errno == EIO {
                    tracing::error!(error = %e, command = ?req.command, offset = req.offset, "request failed");
                }
                self.error_reply(req, errno, &e.to_string())
            }
        }
    }

    /// The error reply for `req`: structured where the protocol demands it.
    fn error_reply(&self, req: &Request, errno: u32, message: &str) -> Vec<u8> {
        self.exports
            .metrics()
            .request_errors
            .fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::with_capacity(64);
        if self.structured && matches!(req.command, Command::Read | Command::BlockStatus) {
            encode_structured_error(&mut out, req.cookie, errno, message);
        } else {
            encode_simple_reply(&mut out, req.cookie, errno);
        }
        out
    }
}

/// Appends the data of READ `req` to `out` without zero-filling it first, if
/// the backend has it at hand; `Ok(false)` leaves `out` as it was.
/// Appends `len` bytes read at `offset` to `out` if the backend has them
/// without waiting (the page cache): `Ok(false)` leaves `out` as it was, and
/// the caller awaits [`Backend::read`] instead.
pub(crate) fn read_into(
    backend: &dyn Backend,
    out: &mut Vec<u8>,
    offset: u64,
    len: usize,
) -> std::io::Result<bool> {
    out.reserve(len);
    let at = out.len();
    let done = backend.try_read(&mut out.spare_capacity_mut()[..len], offset)?;
    if done {
        // SAFETY: `try_read` answered true, so it wrote all `len` bytes.
        unsafe { out.set_len(at + len) };
    }
    Ok(done)
}

/// The one place a storage error becomes an NBD error.
pub fn errno_of(e: &WriteError) -> u32 {
    match e {
        WriteError::CacheFull { .. } | WriteError::NoSpace => ENOSPC,
        WriteError::ReadOnly => EPERM,
        WriteError::OutOfRange => EINVAL,
        WriteError::Io(_) => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Reply `i`: its number, then `i * 37 % 5000` bytes of `i as u8`.
    fn reply(i: u32) -> Vec<u8> {
        let mut r = i.to_be_bytes().to_vec();
        r.extend(std::iter::repeat_n(i as u8, (i * 37 % 5000) as usize));
        r
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replies_written_by_many_tasks_arrive_whole_and_unmixed() {
        // A small pipe: writes are partial and writers find each other busy.
        let (w, mut r) = tokio::io::duplex(257);
        let replies = Arc::new(Replies::new(w));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            let replies = replies.clone();
            tasks.spawn(async move {
                if i % 10 == 0 {
                    let mut batch = Out::from(reply(i));
                    replies.send_batch(&mut batch).await.unwrap();
                    assert!(batch.is_empty(), "the batch buffer comes back empty");
                } else {
                    let permit = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
                    replies.send(reply(i), permit).await.unwrap();
                }
            });
        }
        let expected: usize = (0..200).map(|i| reply(i).len()).sum();
        let mut got = vec![0u8; expected];
        r.read_exact(&mut got).await.unwrap();
        while tasks.join_next().await.is_some() {}
        let mut seen = [false; 200];
        let mut rest = &got[..];
        while !rest.is_empty() {
            let i = u32::from_be_bytes(rest[..4].try_into().unwrap());
            let want = reply(i);
            assert_eq!(&rest[..want.len()], &want[..], "reply {i} arrived whole");
            assert!(!seen[i as usize], "reply {i} arrived once");
            seen[i as usize] = true;
            rest = &rest[want.len()..];
        }
        assert!(seen.iter().all(|s| *s), "every reply arrived");
    }

    /// `len` bytes at `off` of a sealed one-layer disk of known bytes.
    fn sealed_backend(dir: &std::path::Path, size: usize) -> (Arc<dyn Backend>, Vec<u8>) {
        use vstream_image::{Disk, Layer};
        let layer = Arc::new(Layer::create(&dir.join("sealed.layer"), size as u64).unwrap());
        let disk = Disk::writable(vec![layer.clone()], None).unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        disk.write(&data, 0, false).unwrap();
        disk.flush().unwrap();
        let hashes = vstream_image::hash::hash_disk(&disk).unwrap();
        layer.store_hashes(&hashes, true).unwrap();
        drop(disk);
        let local = vstream_pipeline::Local::new(Arc::new(Disk::read_only(vec![layer])));
        (local, data)
    }

    /// Replies with file data (sent by `sendfile`, or from the file's
    /// mapping) and replies of bytes, from many tasks, through a small
    /// socket buffer: each arrives whole, its file data right after its
    /// header.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn file_data_leaves_whole_between_other_replies() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 << 20;
        let (backend, data) = sealed_backend(dir.path(), size);
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let (_ar, aw) = a.into_split();
        assert!(aw.socket().is_some(), "a plain socket takes file data");
        let replies = Arc::new(Replies::new(aw));
        // Reply i: its number and length, then its data.
        let span_of = move |i: u32| {
            let off = (i as u64 * 40_961) % (size as u64 - 300_000);
            let len = 65_536 + (i as u64 * 3_331) % 200_000;
            (off, len)
        };
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..60u32 {
            let (replies, backend) = (replies.clone(), backend.clone());
            tasks.spawn(async move {
                if i % 3 == 0 {
                    let permit = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
                    let r = reply(i);
                    let mut framed = i.to_be_bytes().to_vec();
                    framed.extend((r.len() as u32).to_be_bytes());
                    framed.extend(r);
                    replies.send(framed, permit).await.unwrap();
                } else {
                    let (off, len) = span_of(i);
                    let span = backend
                        .file_span(off, len)
                        .expect("cached in a sealed layer");
                    let mut out = Out::default();
                    out.bytes.extend(i.to_be_bytes());
                    out.bytes.extend((len as u32).to_be_bytes());
                    // From the mapping, or by sendfile.
                    let via = if i % 3 == 1 { Via::Mapping } else { Via::File };
                    assert!(span.mapped().is_some(), "a layer file maps");
                    out.files.push((out.bytes.len(), span, via));
                    out.file_bytes = len as usize;
                    replies.send_batch(&mut out).await.unwrap();
                    assert!(out.is_empty(), "the batch comes back empty");
                }
            });
        }
        let mut seen = 0;
        while seen < 60 {
            let mut head = [0u8; 8];
            b.read_exact(&mut head).await.unwrap();
            let i = u32::from_be_bytes(head[..4].try_into().unwrap());
            let len = u32::from_be_bytes(head[4..].try_into().unwrap()) as usize;
            let mut got = vec![0u8; len];
            b.read_exact(&mut got).await.unwrap();
            if i % 3 == 0 {
                assert_eq!(got, reply(i), "reply {i} arrived whole");
            } else {
                let (off, len) = span_of(i);
                assert_eq!(len as usize, got.len());
                assert!(
                    got == data[off as usize..(off + len) as usize],
                    "the file data of reply {i}"
                );
            }
            seen += 1;
        }
        while let Some(t) = tasks.join_next().await {
            t.unwrap();
        }
    }

    /// The client goes away while file data is being sent: the send fails,
    /// and so does every later one, rather than hang or go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn file_data_to_a_gone_client_fails_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, _) = sealed_backend(dir.path(), 4 << 20);
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (_ar, aw) = a.into_split();
        let replies = Replies::new(aw);
        let closer = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            drop(b);
        });
        let mut out = Out::default();
        for _ in 0..8 {
            out.bytes.extend([0u8; 16]);
            let span = backend.file_span(0, 4 << 20).unwrap();
            out.files.push((out.bytes.len(), span, Via::File));
            out.file_bytes += 4 << 20;
        }
        assert!(replies.send_batch(&mut out).await.is_err());
        closer.await.unwrap();
        let permit = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
        assert!(replies.send(reply(1), permit).await.is_err());
    }

    /// A layer file cut short by hand while its mapping is in use: the
    /// reply that needs the pages it lost fails with an error in the
    /// kernel's copy (not a SIGBUS that would end the server), and the
    /// connection with it; the bytes that did leave are the file's.
    #[tokio::test]
    async fn a_mapped_file_cut_short_fails_the_reply_not_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 << 20;
        let (backend, data) = sealed_backend(dir.path(), size);
        let span = backend.file_span(0, size as u64).expect("cached");
        assert!(span.mapped().is_some(), "a layer file maps");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("sealed.layer"))
            .unwrap();
        // Keep the header and 1 MiB of data.
        file.set_len(span.pos() + (1 << 20)).unwrap();
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let (_ar, aw) = a.into_split();
        let replies = Replies::new(aw);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let _ = b.read_to_end(&mut got).await;
            got
        });
        let mut out = Out::default();
        out.files.push((0, span, Via::Mapping));
        out.file_bytes = size;
        let sent = replies.send_batch(&mut out).await;
        let err = sent.expect_err("the lost pages cannot be sent");
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{err}");
        drop(replies);
        let got = reader.await.unwrap();
        assert!(got.len() < size, "the reply stopped short");
        assert_eq!(got[..], data[..got.len()], "what left is the file's");
    }

    #[tokio::test]
    async fn a_gone_client_fails_the_writer_and_later_replies() {
        let (w, r) = tokio::io::duplex(64);
        drop(r);
        let replies = Replies::new(w);
        let permits = Arc::new(Semaphore::new(2));
        let permit = || permits.clone().try_acquire_owned().unwrap();
        assert!(replies.send(reply(1), permit()).await.is_err());
        let mut batch = Out::from(reply(2));
        assert!(replies.send_batch(&mut batch).await.is_err());
        assert!(
            replies.send(reply(3), permit()).await.is_err(),
            "nothing waits forever"
        );
        assert_eq!(permits.available_permits(), 2, "no permit stays taken");
    }

    /// A client that stops reading keeps its requests' permits taken:
    /// replies do not pile up while the server goes on taking requests.
    #[tokio::test]
    async fn a_client_that_does_not_read_keeps_the_permits_taken() {
        let (w, mut r) = tokio::io::duplex(1024);
        let replies = Arc::new(Replies::new(w));
        let permits = Arc::new(Semaphore::new(8));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..8u32 {
            let (replies, permit) = (
                replies.clone(),
                permits.clone().try_acquire_owned().unwrap(),
            );
            tasks.spawn(async move { replies.send(vec![i as u8; 4096], permit).await });
        }
        // The writer is stuck on the full pipe; the others have queued.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(
            permits.available_permits(),
            0,
            "every unwritten reply holds its permit"
        );
        let mut got = vec![0u8; 8 * 4096];
        r.read_exact(&mut got).await.unwrap();
        while let Some(done) = tasks.join_next().await {
            done.unwrap().unwrap();
        }
        assert_eq!(
            permits.available_permits(),
            8,
            "written replies give theirs back"
        );
    }
}
