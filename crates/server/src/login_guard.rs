//! Failed device logins, counted per client address and per MAC.
//!
//! ```text
//!   login / enroll / renew --admit(ip, mac)--> 429 + Retry-After when over
//!          |                                   a budget (nothing looked up)
//!          +-- refused (400, 403, 404) --failed(ip, mac)--> +1 to both
//! ```
//!
//! Each key has a leaky bucket of failures: a failure adds one, and the
//! bucket drains at its budget per minute; at the budget, the key is
//! refused until a failure has drained. Only refusals count: a fleet's
//! morning boot storm (hundreds of successful logins from their own
//! addresses) and a device retrying while no server can serve it yet
//! (503) never fill a bucket. A scan of MACs from one address fills its
//! address's bucket; guesses at one MAC from many addresses fill the
//! MAC's. A device that shows its own valid certificate is not held back
//! by its MAC's bucket, so nobody locks a device out by failing in its
//! name.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use vstream_service::metrics::Metrics;

/// Most keys remembered per kind; past it, drained buckets are forgotten
/// first, then the fullest are kept.
const MAX_KEYS: usize = 65_536;

/// Failures allowed per minute, per address and per MAC; 0: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    pub per_address: u32,
    pub per_mac: u32,
}

impl Default for Budgets {
    fn default() -> Budgets {
        Budgets {
            per_address: 30,
            per_mac: 10,
        }
    }
}

/// A refusal for too many failures: what to tell the client.
#[derive(Debug, Clone, PartialEq)]
pub struct Throttled {
    /// Whole seconds until one more attempt is allowed.
    pub retry_after: u64,
    /// "address 10.0.0.9" or "MAC 52:54:00:..".
    pub key: String,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    last: f64,
}

#[derive(Debug)]
struct Buckets<K> {
    per_minute: u32,
    map: Mutex<HashMap<K, Bucket>>,
}

impl<K: std::hash::Hash + Eq + Clone> Buckets<K> {
    fn new(per_minute: u32) -> Self {
        Buckets {
            per_minute,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn rate(&self) -> f64 {
        f64::from(self.per_minute) / 60.0
    }

    /// The level of `bucket` at `now`.
    fn level(&self, b: &Bucket, now: f64) -> f64 {
        (b.level - (now - b.last).max(0.0) * self.rate()).max(0.0)
    }

    /// Seconds until `key` may try again, if it may not now.
    fn wait(&self, key: &K, now: f64) -> Option<u64> {
        if self.per_minute == 0 {
            return None;
        }
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let level = self.level(map.get(key)?, now);
        let budget = f64::from(self.per_minute);
        (level > budget - 1.0)
            .then(|| ((level - (budget - 1.0)) / self.rate()).ceil().max(1.0) as u64)
    }

    /// Counts a failure of `key`; true if it is the one that fills the
    /// bucket (the key is held from now on).
    fn fail(&self, key: &K, now: f64) -> bool {
        if self.per_minute == 0 {
            return false;
        }
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_KEYS && !map.contains_key(key) {
            map.retain(|_, b| self.level(b, now) > 0.0);
            if map.len() >= MAX_KEYS {
                // Under a flood of keys: forget the emptiest half.
                let mut levels: Vec<f64> = map.values().map(|b| self.level(b, now)).collect();
                levels.sort_by(f64::total_cmp);
                let median = levels[levels.len() / 2];
                map.retain(|_, b| self.level(b, now) > median);
            }
        }
        let b = map.entry(key.clone()).or_insert(Bucket {
            level: 0.0,
            last: now,
        });
        // One over the budget at most (failures that raced past `wait`):
        // nobody waits much longer than a minute for the next attempt.
        let budget = f64::from(self.per_minute);
        let before = self.level(b, now);
        *b = Bucket {
            level: (before + 1.0).min(budget + 1.0),
            last: now,
        };
        before <= budget - 1.0 && b.level > budget - 1.0
    }
}

/// The failure budgets of one server's device routes.
#[derive(Debug)]
pub struct LoginGuard {
    by_address: Buckets<IpAddr>,
    by_mac: Buckets<String>,
    throttled: AtomicU64,
}

/// Seconds on the process's monotonic clock.
fn now() -> f64 {
    static ANCHOR: OnceLock<Instant> = OnceLock::new();
    ANCHOR.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// The one spelling of a MAC the buckets are keyed by, so that
/// `52-54-00-..` and `52:54:00:..` share one; an unreadable one as sent.
fn mac_key(mac: &str) -> String {
    vstream_api::parse_mac(mac)
        .map(|m| m.to_string())
        .unwrap_or_else(|_| mac.to_ascii_lowercase())
}

impl LoginGuard {
    pub fn new(budgets: Budgets) -> LoginGuard {
        LoginGuard {
            by_address: Buckets::new(budgets.per_address),
            by_mac: Buckets::new(budgets.per_mac),
            throttled: AtomicU64::new(0),
        }
    }

    /// Whether a device route may go on for `ip` asking about `mac` (the
    /// caller leaves `mac` out for a device that showed its certificate).
    pub fn admit(&self, ip: IpAddr, mac: Option<&str>) -> Result<(), Throttled> {
        self.admit_at(ip, mac, now())
    }

    fn admit_at(&self, ip: IpAddr, mac: Option<&str>, now: f64) -> Result<(), Throttled> {
        let throttled = |retry_after, key| {
            Metrics::add(&self.throttled, 1);
            Err(Throttled { retry_after, key })
        };
        if let Some(wait) = self.by_address.wait(&ip, now) {
            return throttled(wait, format!("address {ip}"));
        }
        if let Some(mac) = mac {
            let key = mac_key(mac);
            if let Some(wait) = self.by_mac.wait(&key, now) {
                return throttled(wait, format!("MAC {key}"));
            }
        }
        Ok(())
    }

    /// Counts a refused request from `ip` about `mac`.
    pub fn failed(&self, ip: IpAddr, mac: Option<&str>) {
        self.failed_at(ip, mac, now())
    }

    fn failed_at(&self, ip: IpAddr, mac: Option<&str>, now: f64) {
        let per_minute = |b: u32| format!("{b} refusals a minute");
        // This host's own tools and agents are the admin's.
        if !ip.is_loopback() && self.by_address.fail(&ip, now) {
            let budget = per_minute(self.by_address.per_minute);
            tracing::warn!(address = %ip, %budget, "device requests from this address held back (429)");
        }
        if let Some(mac) = mac {
            let key = mac_key(mac);
            if self.by_mac.fail(&key, now) {
                let budget = per_minute(self.by_mac.per_minute);
                tracing::warn!(mac = %key, %budget, "device requests for this MAC held back (429)");
            }
        }
    }

    pub fn metrics(&self) -> Vec<crate::enroll::Row<'_>> {
        vec![(
            "vstream_login_throttled_total",
            "counter",
            "device logins, enrollments and renewals refused with 429 for too many failures \
             from their address or for their MAC",
            &self.throttled,
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: &str = "52:54:00:12:34:56";

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn an_address_is_held_after_its_budget_of_failures_then_let_go() {
        let g = LoginGuard::new(Budgets {
            per_address: 6,
            per_mac: 0,
        });
        for i in 0..6 {
            assert_eq!(g.admit_at(ip(1), Some(MAC), 0.0), Ok(()), "{i}");
            g.failed_at(ip(1), Some(MAC), 0.0);
        }
        let held = g.admit_at(ip(1), None, 0.0).unwrap_err();
        assert_eq!(held.key, "address 10.0.0.1");
        // 6 a minute drain one in 10 s.
        assert_eq!(held.retry_after, 10);
        assert!(g.admit_at(ip(1), None, 9.0).is_err());
        assert_eq!(g.admit_at(ip(1), None, 10.0), Ok(()));
        // Other addresses never noticed.
        assert_eq!(g.admit_at(ip(2), Some(MAC), 0.0), Ok(()));
    }

    #[test]
    fn a_mac_is_held_whatever_the_address() {
        let g = LoginGuard::new(Budgets {
            per_address: 100,
            per_mac: 3,
        });
        for n in 0..3 {
            g.failed_at(ip(n), Some("52-54-00-12-34-56"), 1.0);
        }
        let held = g.admit_at(ip(9), Some(MAC), 1.0).unwrap_err();
        assert_eq!(held.key, format!("MAC {MAC}"));
        // Shown its certificate, the caller asks without the MAC.
        assert_eq!(g.admit_at(ip(9), None, 1.0), Ok(()));
        assert_eq!(g.admit_at(ip(9), Some("52:54:00:00:00:01"), 1.0), Ok(()));
    }

    #[test]
    fn successes_alone_never_hold_anyone_and_zero_means_no_limit() {
        let g = LoginGuard::new(Budgets::default());
        for _ in 0..10_000 {
            assert_eq!(g.admit_at(ip(1), Some(MAC), 0.0), Ok(()));
        }
        let off = LoginGuard::new(Budgets {
            per_address: 0,
            per_mac: 0,
        });
        for _ in 0..1000 {
            off.failed_at(ip(1), Some(MAC), 0.0);
        }
        assert_eq!(off.admit_at(ip(1), Some(MAC), 0.0), Ok(()));
    }

    #[test]
    fn loopback_is_never_held_by_address() {
        let g = LoginGuard::new(Budgets {
            per_address: 2,
            per_mac: 0,
        });
        let lo = IpAddr::from([127, 0, 0, 1]);
        for _ in 0..10 {
            g.failed_at(lo, Some(MAC), 0.0);
        }
        assert_eq!(g.admit_at(lo, Some(MAC), 0.0), Ok(()));
    }

    #[test]
    fn a_flood_of_keys_stays_bounded() {
        let g = LoginGuard::new(Budgets::default());
        for n in 0..(MAX_KEYS as u32 + 1000) {
            g.failed_at(IpAddr::from((n | 0x0a00_0000).to_be_bytes()), None, 0.0);
        }
        let len = g.by_address.map.lock().unwrap().len();
        assert!(len <= MAX_KEYS, "{len}");
    }
}
