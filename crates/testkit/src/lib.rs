//! Helpers shared by the integration tests of several crates.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port of the kernel's ephemeral range (32768 if unknown).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// `N` distinct ports free on 127.0.0.1 now, for a process the test starts.
///
/// They come from just below the kernel's ephemeral range, never from it: a
/// process restarted on its old port must find it free, and in the ephemeral
/// range any outgoing connection may take it as its source port meanwhile.
/// A counter shared by the tests of one binary, from a start that differs
/// between processes, hands each port out once.
pub fn free_ports<const N: usize>() -> [u16; N] {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = ephemeral_low();
    let span = 10_000.min(low.saturating_sub(1024)).max(1);
    let base = low - span;
    let _ = NEXT.compare_exchange(0, std::process::id(), Ordering::SeqCst, Ordering::SeqCst);
    // The listeners are held until all N are picked, so none repeats.
    let mut listeners = Vec::with_capacity(N);
    for _ in 0..span {
        if listeners.len() == N {
            break;
        }
        let port = base + NEXT.fetch_add(1, Ordering::SeqCst) % span;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            listeners.push(l);
        }
    }
    assert_eq!(listeners.len(), N, "no {N} free ports in {base}..{low}");
    std::array::from_fn(|i| listeners[i].local_addr().expect("local addr").port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let low = ephemeral_low();
        let a = free_ports::<3>();
        let b = free_ports::<3>();
        let all: std::collections::HashSet<u16> = a.iter().chain(&b).copied().collect();
        assert_eq!(all.len(), 6, "{a:?} {b:?}");
        for p in all {
            assert!(u32::from(p) < low, "{p} is in the ephemeral range");
            TcpListener::bind(("127.0.0.1", p)).expect("the port is free");
        }
    }
}
