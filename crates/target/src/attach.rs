//! `--attach /dev/nbdN`: the agent connects the kernel's NBD device to its own
//! export, as `nbd-client` does, so that an initramfs needs no nbd-client
//! (Debian's is dynamically linked and exits after setup, leaving nothing to
//! fail over).
//!
//! ```text
//!   kernel /dev/nbdN <--socketpair--> nbd::connection (the agent's export)
//!        ^ handed over after our own client handshake on the kernel's end:
//!          netlink NBD_CMD_CONNECT, or the ioctls on kernels without it
//! ```
//!
//! Netlink first: the ioctl interface needs a thread blocked in NBD_DO_IT,
//! and any signal that interrupts it, even the SIGSTOP/SIGCONT that
//! systemd's shutdown sends every process, makes the kernel shut the socket
//! down under a mounted root filesystem.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::sync::watch;
use vstream_nbd::TFLAG_HAS_FLAGS;
use vstream_service::{self as nbd, Exports};

// <linux/nbd.h>: _IO(0xab, n).
const NBD_SET_SOCK: libc::c_ulong = 0xab00;
const NBD_SET_BLKSIZE: libc::c_ulong = 0xab01;
const NBD_DO_IT: libc::c_ulong = 0xab03;
const NBD_CLEAR_SOCK: libc::c_ulong = 0xab04;
const NBD_SET_SIZE_BLOCKS: libc::c_ulong = 0xab07;
const NBD_DISCONNECT: libc::c_ulong = 0xab08;
const NBD_SET_TIMEOUT: libc::c_ulong = 0xab09;
const NBD_SET_FLAGS: libc::c_ulong = 0xab0a;

/// A kernel NBD device served by the agent.
pub struct Attached {
    device: PathBuf,
    link: Link,
    stop: watch::Sender<bool>,
}

/// How the kernel holds the socket.
enum Link {
    Netlink {
        index: u32,
    },
    Ioctl {
        file: Arc<File>,
        worker: Option<std::thread::JoinHandle<()>>,
    },
}

fn ioctl(file: &File, request: libc::c_ulong, arg: libc::c_ulong, what: &str) -> Result<()> {
    // SAFETY: an integer-argument ioctl on a file we own.
    if unsafe { libc::ioctl(file.as_raw_fd(), request as _, arg) } < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_owned());
    }
    Ok(())
}

/// The device's logical block size: 512, as nbd-client sets it. A larger
/// one would refuse filesystems made with smaller blocks (ext4 with 1 KiB
/// blocks, as mkfs makes on small images), and the kernel still sends large
/// requests.
const BLOCK_SIZE: u64 = 512;

/// The N of `/dev/nbdN`.
fn device_index(device: &Path) -> Option<u32> {
    device
        .file_name()?
        .to_str()?
        .strip_prefix("nbd")?
        .parse()
        .ok()
}

/// Connects `device` to the agent's export `name`, served from `exports`.
pub async fn attach(device: &Path, name: &str, exports: Arc<dyn Exports>) -> Result<Attached> {
    let index = device_index(device)
        .with_context(|| format!("{} is not an NBD device (/dev/nbdN)", device.display()))?;
    if !device.exists() {
        bail!(
            "{} does not exist (is the nbd module loaded? modprobe nbd)",
            device.display()
        );
    }
    let (ours, theirs) = StdUnixStream::pair().context("socketpair")?;
    ours.set_nonblocking(true)?;
    theirs.set_nonblocking(true)?;
    let ours = tokio::net::UnixStream::from_std(ours)?;
    // Its own stop signal: the agent's shutdown must not pull a root
    // filesystem out from under the OS (see `Attached::is_mounted`).
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        let (r, w) = ours.into_split();
        nbd::connection(r, w, "kernel", exports, shutdown).await;
    });
    let mut theirs = tokio::net::UnixStream::from_std(theirs)?;
    let opened = crate::upstream::handshake(&mut theirs, name)
        .await
        .context("handshake with the agent's own export")?;
    let theirs = theirs.into_std()?;
    theirs.set_nonblocking(false)?;
    if opened.size == 0 {
        bail!("the export is empty");
    }
    let flags = opened.flags | TFLAG_HAS_FLAGS;
    let link = match netlink::connect(index, opened.size, flags, theirs.as_raw_fd()) {
        Ok(()) => Link::Netlink { index },
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            tracing::warn!(device = %device.display(),
                "this kernel's nbd has no netlink interface: attaching by ioctl, which a SIGSTOP to the agent breaks");
            attach_ioctl(device, opened.size, flags, theirs)?
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "connecting {} through netlink (is it in use already?)",
                    device.display()
                )
            })
        }
    };
    tracing::info!(device = %device.display(), size = opened.size, block_size = BLOCK_SIZE, "kernel device attached");
    Ok(Attached {
        device: device.to_owned(),
        link,
        stop,
    })
}

/// The ioctl way: a thread blocks in NBD_DO_IT for as long as the device
/// is connected.
fn attach_ioctl(device: &Path, size: u64, flags: u16, sock: StdUnixStream) -> Result<Link> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .with_context(|| format!("opening {}", device.display()))?;
    ioctl(&file, NBD_SET_BLKSIZE, BLOCK_SIZE as _, "NBD_SET_BLKSIZE")?;
    ioctl(
        &file,
        NBD_SET_SIZE_BLOCKS,
        (size / BLOCK_SIZE) as _,
        "NBD_SET_SIZE_BLOCKS",
    )?;
    // The agent fails over on its own: the kernel must never time a request out.
    ioctl(&file, NBD_SET_TIMEOUT, 0, "NBD_SET_TIMEOUT")?;
    // A device left connected by an earlier agent refuses a new socket.
    let _ = ioctl(&file, NBD_CLEAR_SOCK, 0, "NBD_CLEAR_SOCK");
    ioctl(&file, NBD_SET_FLAGS, flags as _, "NBD_SET_FLAGS")?;
    ioctl(
        &file,
        NBD_SET_SOCK,
        sock.as_raw_fd() as _,
        "NBD_SET_SOCK (is the device in use?)",
    )?;
    let file = Arc::new(file);
    let (f, dev) = (file.clone(), device.to_owned());
    let worker = std::thread::Builder::new()
        .name("nbd-do-it".into())
        .spawn(move || {
            let r = ioctl(&f, NBD_DO_IT, 0, "NBD_DO_IT");
            drop(sock);
            match r {
                Ok(()) => tracing::info!(device = %dev.display(), "kernel device disconnected"),
                Err(e) => tracing::warn!(device = %dev.display(), error = %format!("{e:#}"), "kernel device stopped"),
            }
            let _ = ioctl(&f, NBD_CLEAR_SOCK, 0, "NBD_CLEAR_SOCK");
        })
        .context("starting the NBD_DO_IT thread")?;
    Ok(Link::Ioctl {
        file,
        worker: Some(worker),
    })
}

impl Attached {
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Whether a filesystem on the device is mounted: detaching it then
    /// would take the OS's disk away, so the agent keeps serving instead.
    pub fn is_mounted(&self) -> bool {
        let name = self.device.to_string_lossy();
        std::fs::read_to_string("/proc/self/mounts")
            .map(|m| {
                m.lines().any(|l| {
                    l.split_whitespace()
                        .next()
                        .is_some_and(|src| src == name || src.starts_with(&format!("{name}p")))
                })
            })
            .unwrap_or(true)
    }

    /// Disconnects the kernel device.
    pub async fn detach(self) {
        let Attached { device, link, stop } = self;
        let done = match link {
            Link::Netlink { index } => netlink::disconnect(index).map_err(anyhow::Error::from),
            Link::Ioctl { file, worker } => {
                let r = ioctl(&file, NBD_DISCONNECT, 0, "NBD_DISCONNECT");
                if let Some(w) = worker {
                    let _ = tokio::task::spawn_blocking(move || w.join()).await;
                }
                r
            }
        };
        if let Err(e) = done {
            tracing::warn!(device = %device.display(), error = %format!("{e:#}"), "could not disconnect");
        }
        let _ = stop.send(true);
    }
}

/// The kernel's generic-netlink NBD interface (<linux/nbd-netlink.h>), as
/// nbd-client uses it: the device keeps the socket without a process
/// blocked in the kernel.
mod netlink {
    use std::io;

    use super::*;

    const GENL_ID_CTRL: u16 = 0x10;
    const CTRL_CMD_GETFAMILY: u8 = 3;
    const CTRL_ATTR_FAMILY_ID: u16 = 1;
    const CTRL_ATTR_FAMILY_NAME: u16 = 2;
    const NBD_CMD_CONNECT: u8 = 1;
    const NBD_CMD_DISCONNECT: u8 = 2;
    const NBD_ATTR_INDEX: u16 = 1;
    const NBD_ATTR_SIZE_BYTES: u16 = 2;
    const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
    const NBD_ATTR_SERVER_FLAGS: u16 = 5;
    const NBD_ATTR_SOCKETS: u16 = 7;
    const NBD_SOCK_ITEM: u16 = 1;
    const NBD_SOCK_FD: u16 = 1;
    const NLA_F_NESTED: u16 = 1 << 15;
    const NLA_TYPE_MASK: u16 = 0x3fff;

    /// Appends one attribute, padded to 4 bytes.
    pub(super) fn attr(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
        out.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    }

    /// Appends a nested attribute holding what `fill` appends.
    pub(super) fn nested(out: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        fill(out);
        let len = (out.len() - start) as u16;
        out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        out[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }

    /// The attributes in `buf`, as (type, payload).
    pub(super) fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        while buf.len() >= 4 {
            let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
            let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
            if len < 4 || len > buf.len() {
                break;
            }
            out.push((kind, &buf[4..len]));
            buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        }
        out
    }

    struct Socket(OwnedFd);

    impl Socket {
        fn open() -> io::Result<Socket> {
            // SAFETY: plain socket(2); the result is checked before use.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::NETLINK_GENERIC,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd is a new descriptor that nothing else owns.
            Ok(Socket(unsafe { OwnedFd::from_raw_fd(fd) }))
        }

        /// Sends one request and gathers the attributes of its replies
        /// until the kernel's acknowledgement.
        fn request(&self, family: u16, cmd: u8, body: &[u8]) -> io::Result<Vec<u8>> {
            let mut msg = Vec::with_capacity(20 + body.len());
            msg.extend_from_slice(&((20 + body.len()) as u32).to_ne_bytes());
            msg.extend_from_slice(&family.to_ne_bytes());
            let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
            msg.extend_from_slice(&flags.to_ne_bytes());
            msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
            msg.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel
            msg.extend_from_slice(&[cmd, 1, 0, 0]); // genlmsghdr: cmd, version 1
            msg.extend_from_slice(body);
            let fd = self.0.as_raw_fd();
            // SAFETY: msg is a valid buffer of its length; the kernel is the
            // default destination of an unbound netlink socket.
            if unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut replies = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                // SAFETY: buf is a valid, writable buffer of its length.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                let mut rest = &buf[..n as usize];
                while rest.len() >= 16 {
                    let len =
                        u32::from_ne_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
                    let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                    if len < 16 || len > rest.len() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "malformed netlink reply",
                        ));
                    }
                    if kind == libc::NLMSG_ERROR as u16 {
                        let err = i32::from_ne_bytes(rest[16..20].try_into().unwrap_or_default());
                        return match err {
                            0 => Ok(replies),
                            e => Err(io::Error::from_raw_os_error(-e)),
                        };
                    }
                    if len > 20 {
                        replies.extend_from_slice(&rest[20..len]);
                    }
                    rest = &rest[len.next_multiple_of(4).min(rest.len())..];
                }
            }
        }

        /// The id of the generic-netlink family "nbd" (ENOENT: none here).
        fn nbd_family(&self) -> io::Result<u16> {
            let mut body = Vec::new();
            attr(&mut body, CTRL_ATTR_FAMILY_NAME, b"nbd\0");
            let reply = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, &body)?;
            attrs(&reply)
                .into_iter()
                .find(|(k, v)| *k == CTRL_ATTR_FAMILY_ID && v.len() >= 2)
                .map(|(_, v)| u16::from_ne_bytes([v[0], v[1]]))
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
        }
    }

    /// NBD_CMD_CONNECT of device `index` to the socket `fd`.
    pub fn connect(index: u32, size: u64, flags: u16, fd: i32) -> io::Result<()> {
        let sock = Socket::open()?;
        let family = sock.nbd_family()?;
        let mut body = Vec::new();
        attr(&mut body, NBD_ATTR_INDEX, &index.to_ne_bytes());
        attr(&mut body, NBD_ATTR_SIZE_BYTES, &size.to_ne_bytes());
        attr(
            &mut body,
            NBD_ATTR_BLOCK_SIZE_BYTES,
            &BLOCK_SIZE.to_ne_bytes(),
        );
        attr(
            &mut body,
            NBD_ATTR_SERVER_FLAGS,
            &u64::from(flags).to_ne_bytes(),
        );
        // No NBD_ATTR_TIMEOUT: the kernel then never times a request out;
        // the agent fails over on its own.
        nested(&mut body, NBD_ATTR_SOCKETS, |b| {
            nested(b, NBD_SOCK_ITEM, |b| {
                attr(b, NBD_SOCK_FD, &(fd as u32).to_ne_bytes())
            })
        });
        sock.request(family, NBD_CMD_CONNECT, &body).map(drop)
    }

    /// NBD_CMD_DISCONNECT of device `index`.
    pub fn disconnect(index: u32) -> io::Result<()> {
        let sock = Socket::open()?;
        let family = sock.nbd_family()?;
        let mut body = Vec::new();
        attr(&mut body, NBD_ATTR_INDEX, &index.to_ne_bytes());
        sock.request(family, NBD_CMD_DISCONNECT, &body).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::netlink::{attr, attrs, nested};
    use super::*;

    #[test]
    fn the_device_index_comes_from_its_name() {
        assert_eq!(device_index(Path::new("/dev/nbd0")), Some(0));
        assert_eq!(device_index(Path::new("/dev/nbd15")), Some(15));
        assert_eq!(device_index(Path::new("/dev/sda")), None);
        assert_eq!(device_index(Path::new("/dev/nbd0p1")), None);
    }

    #[test]
    fn netlink_attributes_are_padded_and_nest() {
        let mut b = Vec::new();
        attr(&mut b, 1, &[7, 7, 7]);
        assert_eq!(b.len(), 8, "4-byte header, 3 bytes, 1 of padding");
        nested(&mut b, 7, |b| {
            nested(b, 1, |b| attr(b, 1, &5u32.to_ne_bytes()))
        });
        let top = attrs(&b);
        assert_eq!(top.len(), 2);
        assert_eq!(top[0], (1, &[7u8, 7, 7][..]));
        assert_eq!(top[1].0, 7, "the nested flag is masked off");
        let item = attrs(top[1].1);
        assert_eq!(item[0].0, 1);
        assert_eq!(attrs(item[0].1), vec![(1, &5u32.to_ne_bytes()[..])]);
        // A truncated buffer yields what is whole, never a panic.
        assert!(attrs(&b[..6]).is_empty());
        assert_eq!(attrs(&b[..12]).len(), 1);
        assert!(attrs(&[0xff, 0xff, 0, 0]).is_empty());
    }
}
