//! Finding dead peers: TCP keepalive and `TCP_USER_TIMEOUT` on every NBD
//! connection, the server's accepted ones and the agent's to its servers.
//!
//! A device that loses power sends no FIN: without these its connection stays
//! ESTABLISHED for ever, and its session with it. With them the kernel probes
//! an idle connection after `idle` seconds, every `interval` seconds, and ends
//! it once nothing has been acknowledged for `user_timeout` seconds (or, with
//! no user timeout, after `count` unanswered probes). A live peer answers the
//! probes, however long it stays idle, so it is never cut.

use std::os::fd::AsRawFd;
use std::time::Duration;

/// Default seconds of silence before the first probe.
pub const DEFAULT_KEEPALIVE_SECS: u64 = 10;
/// Default seconds a connection may go unacknowledged before it is ended.
pub const DEFAULT_USER_TIMEOUT_SECS: u64 = 30;
/// Unanswered probes that end a connection when there is no user timeout.
const KEEPALIVE_COUNT: u32 = 3;

/// How a connection finds out that its peer is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Seconds idle before the first probe; 0: no keepalive.
    pub idle_secs: u64,
    /// Seconds without an acknowledgement (of data or of a probe) that end
    /// the connection; 0: the kernel's default (about 15 minutes of
    /// retransmissions, or `count` probes).
    pub user_timeout_secs: u64,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            idle_secs: DEFAULT_KEEPALIVE_SECS,
            user_timeout_secs: DEFAULT_USER_TIMEOUT_SECS,
        }
    }
}

impl Keepalive {
    /// Seconds between probes: half the idle time, at least one.
    pub fn interval_secs(&self) -> u64 {
        (self.idle_secs / 2).max(1)
    }

    /// Checks values given by flag or config file.
    pub fn check(&self) -> Result<(), String> {
        // The kernel takes at most 32767 s for the keepalive times, and
        // milliseconds in an int for the user timeout.
        if self.idle_secs > 32_767 {
            return Err(format!(
                "tcp_keepalive_secs {} is more than 32767",
                self.idle_secs
            ));
        }
        if self.user_timeout_secs > (i32::MAX as u64) / 1000 {
            return Err(format!(
                "tcp_user_timeout_secs {} is too large",
                self.user_timeout_secs
            ));
        }
        Ok(())
    }

    /// About how long a vanished peer's connection lives on, at most.
    pub fn detection(&self) -> Option<Duration> {
        match (self.idle_secs, self.user_timeout_secs) {
            (0, 0) => None,
            (0, u) => Some(Duration::from_secs(u)),
            (i, 0) => Some(Duration::from_secs(
                i + self.interval_secs() * KEEPALIVE_COUNT as u64,
            )),
            (i, u) => Some(Duration::from_secs(u.max(i + self.interval_secs()))),
        }
    }
}

fn setsockopt(fd: i32, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: `fd` is an open socket borrowed from its owner for this call;
    // the value is a plain int whose size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets up a TCP connection to find a dead peer as `ka` says.
pub fn configure(socket: &impl AsRawFd, ka: &Keepalive) -> std::io::Result<()> {
    let fd = socket.as_raw_fd();
    if ka.idle_secs > 0 {
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
        setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPIDLE,
            ka.idle_secs as i32,
        )?;
        setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            ka.interval_secs() as i32,
        )?;
        setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPCNT,
            KEEPALIVE_COUNT as i32,
        )?;
    }
    if ka.user_timeout_secs > 0 {
        setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (ka.user_timeout_secs * 1000) as i32,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(fd: i32, level: i32, name: i32) -> i32 {
        let mut v: i32 = 0;
        let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
        // SAFETY: a valid socket and an int-sized buffer with its length.
        let r = unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut i32).cast(), &mut len) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        v
    }

    #[test]
    fn a_socket_gets_the_settings() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let fd = s.as_raw_fd();
        assert_eq!(get(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0);
        configure(&s, &Keepalive::default()).unwrap();
        assert_eq!(get(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 10);
        assert_eq!(get(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 5);
        assert_eq!(get(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 3);
        assert_eq!(get(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 30_000);
        assert_eq!(
            Keepalive::default().detection(),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn zero_turns_them_off() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let off = Keepalive {
            idle_secs: 0,
            user_timeout_secs: 0,
        };
        configure(&s, &off).unwrap();
        assert_eq!(get(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0);
        assert_eq!(off.detection(), None);
        assert!(Keepalive {
            idle_secs: 40_000,
            user_timeout_secs: 1
        }
        .check()
        .is_err());
    }
}
