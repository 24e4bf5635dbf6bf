//! Where a connection's replies go, and the two ways around the copy: a
//! READ whose bytes lie whole in one layer file that its disk does not
//! write (a sealed version, a read-only view) goes from that file straight
//! to the socket, never through a buffer of ours: a large one with
//! `sendfile(2)`, a shorter one from the file's shared mapping, handed to
//! `sendmsg` among the other replies of its batch.
//!
//! ```text
//!   copy path:     page cache --preadv2--> reply buffer --write--> socket   (two copies)
//!   mapping path:  header, page cache (mapped), other replies --sendmsg--> socket
//!                                                                           (the socket's one)
//!   file path:     header --sendmsg(MSG_MORE)--> socket
//!                  page cache --sendfile--> socket                          (the socket's one)
//! ```
//!
//! Only the kernel reads the mapping: a file cut short under it makes the
//! `sendmsg` fail (`EFAULT`), where a read in user space would be a SIGBUS.
//!
//! Only a plain socket (TCP or unix) can take it: inside TLS the bytes must
//! be encrypted in user space, so a TLS writer has no [`Sink::socket`] and
//! every reply goes the copy path. The socket is non-blocking under tokio:
//! each call runs in the socket's `try_io` and a full socket waits for its
//! readiness, so partial writes resume where they stopped. A failure after
//! some of a reply left cannot be taken back: it fails the connection,
//! which is then closed (the client sees the connection end, not a
//! corrupted stream).

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};

use tokio::io::{AsyncWrite, Interest};
use vstream_pipeline::FileSpan;

/// A connection's reply side.
pub trait Sink: AsyncWrite + Unpin + Send {
    /// The plain socket under this writer, when bytes written to the
    /// socket directly arrive as if written here (no TLS, no buffer in
    /// between); `None` otherwise.
    fn socket(&self) -> Option<Socket<'_>> {
        None
    }
}

impl Sink for tokio::net::tcp::OwnedWriteHalf {
    fn socket(&self) -> Option<Socket<'_>> {
        Some(Socket::Tcp(self.as_ref()))
    }
}

impl Sink for tokio::net::unix::OwnedWriteHalf {
    fn socket(&self) -> Option<Socket<'_>> {
        Some(Socket::Unix(self.as_ref()))
    }
}

/// Inside TLS: the copy path.
impl<T: tokio::io::AsyncRead + AsyncWrite + Send> Sink for tokio::io::WriteHalf<T> {}

impl Sink for tokio::io::DuplexStream {}

impl<S: Sink + ?Sized> Sink for Box<S> {
    fn socket(&self) -> Option<Socket<'_>> {
        (**self).socket()
    }
}

/// A plain socket under tokio, borrowed from its writer.
#[derive(Clone, Copy)]
pub enum Socket<'a> {
    Tcp(&'a tokio::net::TcpStream),
    Unix(&'a tokio::net::UnixStream),
}

impl Socket<'_> {
    fn fd(&self) -> RawFd {
        match self {
            Socket::Tcp(s) => s.as_raw_fd(),
            Socket::Unix(s) => s.as_raw_fd(),
        }
    }

    async fn writable(&self) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.writable().await,
            Socket::Unix(s) => s.writable().await,
        }
    }

    /// Runs `f` once the socket is writable, again after each `WouldBlock`.
    async fn try_io<R>(&self, mut f: impl FnMut() -> io::Result<R>) -> io::Result<R> {
        loop {
            self.writable().await?;
            let r = match self {
                Socket::Tcp(s) => s.try_io(Interest::WRITABLE, &mut f),
                Socket::Unix(s) => s.try_io(Interest::WRITABLE, &mut f),
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    /// Sends every byte of `bufs`; with `more`, tells the kernel more
    /// follows (`MSG_MORE`), so a reply header leaves in one segment with
    /// the first of its data.
    pub(crate) async fn send_all(&self, bufs: &[&[u8]], more: bool) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = bufs
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| IoSlice::new(b))
            .collect();
        let mut rest = &mut slices[..];
        let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
        while !rest.is_empty() {
            let n = self.try_io(|| sendmsg(self.fd(), rest, flags)).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        Ok(())
    }

    /// Sends `span`'s bytes from its file, however many calls that takes.
    pub(crate) async fn send_file(&self, span: &FileSpan) -> io::Result<()> {
        let fd = span.fd().as_raw_fd();
        let mut pos = span.pos() as libc::off_t;
        let mut left = span.len as usize;
        while left > 0 {
            let n = self
                .try_io(|| sendfile(self.fd(), fd, &mut pos, left))
                .await?;
            if n == 0 {
                // The file ended before the span: nothing can be sent in its place.
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the layer file ended in the middle of a reply",
                ));
            }
            left -= n;
        }
        Ok(())
    }
}

fn sendmsg(fd: RawFd, bufs: &[IoSlice<'_>], flags: i32) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no address, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with iovec; the kernel only reads them.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len().min(1024) as _;
    // SAFETY: `msg` points at `bufs`, alive for the call; `fd` is open.
    let n = unsafe { libc::sendmsg(fd, &msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn sendfile(out: RawFd, input: RawFd, pos: &mut libc::off_t, len: usize) -> io::Result<usize> {
    // At most 0x7ffff000 bytes go per call whatever is asked.
    // SAFETY: both descriptors are open for the call; the kernel reads and
    // advances `pos`, a valid off_t.
    let n = unsafe { libc::sendfile(out, input, pos, len) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
