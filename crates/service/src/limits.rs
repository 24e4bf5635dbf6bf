//! How many connections a service holds, and how many open files the
//! server may use for them.
//!
//! ```text
//!   accept --> Limits::admit(peer ip) --> Admitted (given back on drop)
//!                 | all taken, or the peer's share taken
//!                 +--> closed at once (RefusalLog: one line a minute)
//!   start: soft RLIMIT_NOFILE raised to the hard one --> budget():
//!          NBD and API connections sized to fit, with room for the stores
//! ```

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How many connections the listeners of one service may hold: in all, and
/// from one peer address (a client opening thousands leaves room for the
/// others). Unix-socket clients are local and count only in all.
pub struct Limits {
    total: Arc<Semaphore>,
    max_total: usize,
    per_peer: usize,
    peers: parking_lot::Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in [`Limits`], given back on drop.
pub struct Admitted {
    _total: OwnedSemaphorePermit,
    peer: Option<(Arc<Limits>, IpAddr)>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some((limits, ip)) = self.peer.take() {
            let mut peers = limits.peers.lock();
            if let Some(n) = peers.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    peers.remove(&ip);
                }
            }
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Total(usize),
    PerPeer(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Total(n) => write!(f, "connection limit reached ({n} in all)"),
            Refusal::PerPeer(n) => write!(
                f,
                "per-peer connection limit reached ({n} from this address)"
            ),
        }
    }
}

impl Limits {
    pub fn new(total: usize, per_peer: usize) -> Arc<Limits> {
        Arc::new(Limits {
            total: Arc::new(Semaphore::new(total)),
            max_total: total,
            per_peer: per_peer.max(1),
            peers: parking_lot::Mutex::new(HashMap::new()),
        })
    }

    /// A place for a connection from `ip` (`None`: a Unix socket), if any.
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Admitted, Refusal> {
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Total(self.max_total))?;
        let peer = match ip {
            Some(ip) => {
                let mut peers = self.peers.lock();
                let n = peers.entry(ip).or_insert(0);
                if *n >= self.per_peer {
                    return Err(Refusal::PerPeer(self.per_peer));
                }
                *n += 1;
                Some((self.clone(), ip))
            }
            None => None,
        };
        Ok(Admitted {
            _total: total,
            peer,
        })
    }

    /// Connections held from `ip` now.
    pub fn from_peer(&self, ip: IpAddr) -> usize {
        self.peers.lock().get(&ip).copied().unwrap_or(0)
    }
}

/// Logs refused connections without flooding the log: the first at once,
/// then at most one line a minute saying how many more there were.
#[derive(Default)]
pub struct RefusalLog {
    last: Option<std::time::Instant>,
    since: u64,
}

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(60);

    pub fn note(&mut self, peer: &str, why: &Refusal) {
        if self.last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            self.since += 1;
            return;
        }
        let more = std::mem::take(&mut self.since);
        self.last = Some(std::time::Instant::now());
        if more == 0 {
            tracing::warn!(%peer, "connection refused: {why}");
        } else {
            tracing::warn!(%peer, refused_since_last_line = more, "connection refused: {why}");
        }
    }
}

/// Open files kept for everything but client connections: listeners, the
/// farm database, etcd and peer connections, the stores' layer files, logs.
pub const RESERVED_FILES: u64 = 256;

/// How many connections fit in the open-file limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// NBD connections in all (at most what was asked for).
    pub nbd: usize,
    /// API connections in all.
    pub api: usize,
    /// API connections from one address.
    pub api_per_peer: usize,
}

/// Sizes the services to `nofile` open files: the API gets an eighth (32 to
/// 1,024), [`RESERVED_FILES`] stay free, and each NBD connection counts two
/// (its socket, and a device's write cache file).
pub fn budget(nofile: u64, max_connections: usize, per_peer: usize) -> Budget {
    let api = (nofile / 8).clamp(32, 1024);
    let room = nofile.saturating_sub(RESERVED_FILES + api) / 2;
    let nbd = (max_connections as u64).min(room.max(16)) as usize;
    Budget {
        nbd,
        api: api as usize,
        api_per_peer: per_peer.min(api as usize / 2).max(1),
    }
}

/// Raises the soft open-file limit to the hard one (systemd starts services
/// at 1,024); returns the limit in force, and the one found.
pub fn raise_open_files() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(error = %e, "could not read the open-file limit; assuming 1024");
        return (1024, 1024);
    }
    let found = lim.rlim_cur;
    // An unlimited hard limit is still capped by the kernel's nr_open.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let want = lim.rlim_max.min(nr_open);
    if want > lim.rlim_cur {
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return (want, found);
        }
        let e = std::io::Error::last_os_error();
        tracing::warn!(error = %e, soft = found, hard = lim.rlim_max, "could not raise the open-file limit");
    }
    (found, found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_its_share_and_gives_it_back() {
        let limits = Limits::new(10, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| limits.admit(Some(a)).unwrap()).collect();
        assert_eq!(limits.admit(Some(a)).err(), Some(Refusal::PerPeer(3)));
        assert!(limits.admit(Some(b)).is_ok(), "another address is served");
        drop(held);
        assert_eq!(limits.from_peer(a), 0);
        let _again = limits.admit(Some(a)).unwrap();
        // Unix-socket clients count in all only.
        let local: Vec<_> = (0..9).map(|_| limits.admit(None).unwrap()).collect();
        assert_eq!(limits.admit(Some(b)).err(), Some(Refusal::Total(10)));
        assert_eq!(limits.from_peer(b), 0, "a refusal keeps no share");
        drop(local);
    }

    #[test]
    fn connections_fit_the_open_file_limit() {
        let b = budget(1024, 4096, 256);
        assert_eq!(b.api, 128);
        assert_eq!(b.nbd, (1024 - 256 - 128) / 2);
        assert_eq!(b.api_per_peer, 64);
        assert!(b.nbd as u64 * 2 + b.api as u64 + RESERVED_FILES <= 1024);
        let big = budget(524_288, 4096, 256);
        assert_eq!((big.nbd, big.api, big.api_per_peer), (4096, 1024, 256));
    }
}
