//! `--attach /dev/nbdN`: the agent connects the kernel's NBD device to its own
//! export, as `nbd-client` does through the ioctl interface, so that an
//! initramfs needs no nbd-client (Debian's is dynamically linked and exits
//! after setup, leaving nothing to fail over).
//!
//! ```text
//!   kernel /dev/nbdN <--socketpair--> nbd::connection (the agent's export)
//!        ^ NBD_SET_SOCK after our own client handshake on the kernel's end
//!        `-- NBD_DO_IT blocks in a thread of its own until the device is disconnected
//! ```

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::sync::watch;
use vstream_nbd::TFLAG_HAS_FLAGS;
use vstream_server::nbd::{self, Exports};

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
    file: Arc<File>,
    worker: Option<std::thread::JoinHandle<()>>,
    stop: watch::Sender<bool>,
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

/// Connects `device` to the agent's export `name`, served from `exports`.
pub async fn attach(device: &Path, name: &str, exports: Arc<dyn Exports>) -> Result<Attached> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .with_context(|| {
            format!(
                "opening {} (is the nbd module loaded? modprobe nbd)",
                device.display()
            )
        })?;
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
    let bs = BLOCK_SIZE;
    ioctl(&file, NBD_SET_BLKSIZE, bs as _, "NBD_SET_BLKSIZE")?;
    ioctl(
        &file,
        NBD_SET_SIZE_BLOCKS,
        (opened.size / bs) as _,
        "NBD_SET_SIZE_BLOCKS",
    )?;
    // The agent fails over on its own: the kernel must never time a request out.
    ioctl(&file, NBD_SET_TIMEOUT, 0, "NBD_SET_TIMEOUT")?;
    // A device left connected by an earlier agent refuses a new socket.
    let _ = ioctl(&file, NBD_CLEAR_SOCK, 0, "NBD_CLEAR_SOCK");
    ioctl(
        &file,
        NBD_SET_FLAGS,
        (opened.flags | TFLAG_HAS_FLAGS) as _,
        "NBD_SET_FLAGS",
    )?;
    ioctl(
        &file,
        NBD_SET_SOCK,
        theirs.as_raw_fd() as _,
        "NBD_SET_SOCK (is the device in use?)",
    )?;
    let file = Arc::new(file);
    let (f, dev) = (file.clone(), device.to_owned());
    let worker = std::thread::Builder::new()
        .name("nbd-do-it".into())
        .spawn(move || {
            // Blocks for as long as the device is connected; the kernel holds
            // its own reference to the socket.
            let r = ioctl(&f, NBD_DO_IT, 0, "NBD_DO_IT");
            drop(theirs);
            match r {
                Ok(()) => tracing::info!(device = %dev.display(), "kernel device disconnected"),
                Err(e) => tracing::warn!(device = %dev.display(), error = %format!("{e:#}"), "kernel device stopped"),
            }
            let _ = ioctl(&f, NBD_CLEAR_SOCK, 0, "NBD_CLEAR_SOCK");
        })
        .context("starting the NBD_DO_IT thread")?;
    tracing::info!(device = %device.display(), size = opened.size, block_size = bs, "kernel device attached");
    Ok(Attached {
        device: device.to_owned(),
        file,
        worker: Some(worker),
        stop,
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

    /// Disconnects the kernel device and waits for its thread.
    pub async fn detach(mut self) {
        if let Err(e) = ioctl(&self.file, NBD_DISCONNECT, 0, "NBD_DISCONNECT") {
            tracing::warn!(device = %self.device.display(), error = %format!("{e:#}"), "could not disconnect");
        }
        if let Some(w) = self.worker.take() {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
        let _ = self.stop.send(true);
    }
}
