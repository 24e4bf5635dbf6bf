//! Rebalance: which servers carry more than their share of devices, and how
//! many each should let go.
//!
//! Every server computes the same plan from its farm view and acts on its own
//! line only: it releases that many of its devices (those keeping their write
//! cache on the device, which may move), and their agents log in again
//! elsewhere. A manual `vstream farm rebalance` writes a request into the
//! farm state that every server acts on once; with `--auto-rebalance`, each
//! server checks by itself every few seconds, skipping while more than 20 %
//! of its devices are still booting.

use vstream_api::ServerStatus;

/// Above this share of booting devices a server does not auto-rebalance.
pub const BOOTING_SHARE_LIMIT: f64 = 0.2;

/// For each server carrying more than the farm's average load (devices ÷
/// power) plus `trigger_pct` percent, how many devices it should release to
/// come down to the average.
pub fn plan(servers: &[ServerStatus], trigger_pct: f64) -> Vec<(String, u32)> {
    let devices: u32 = servers.iter().map(|s| s.devices).sum();
    let power: f64 = servers.iter().map(|s| s.power.max(0.1)).sum();
    if devices == 0 || servers.len() < 2 {
        return Vec::new();
    }
    let per_power = f64::from(devices) / power;
    let mut out: Vec<(String, u32)> = servers
        .iter()
        .filter_map(|s| {
            let share = per_power * s.power.max(0.1);
            if f64::from(s.devices) <= share * (1.0 + trigger_pct / 100.0) {
                return None;
            }
            let keep = share.ceil() as u32;
            (s.devices > keep).then(|| (s.name.clone(), s.devices - keep))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str, devices: u32, power: f64) -> ServerStatus {
        ServerStatus {
            devices,
            power,
            ..ServerStatus::idle(name, "", "")
        }
    }

    #[test]
    fn overloaded_servers_come_down_to_the_average() {
        // A server back from the dead has none; the other two carry 6 each.
        let p = plan(&[s("a", 6, 1.0), s("b", 6, 1.0), s("c", 0, 1.0)], 25.0);
        assert_eq!(p, [("a".into(), 2), ("b".into(), 2)]);
        // Within the trigger: nothing moves.
        assert!(plan(&[s("a", 5, 1.0), s("b", 4, 1.0)], 25.0).is_empty());
        // Power counts: 8 on a power-3 server and 0 on a power-1 one is fair.
        assert!(plan(&[s("a", 6, 3.0), s("b", 2, 1.0)], 0.0).is_empty());
        assert_eq!(
            plan(&[s("a", 2, 3.0), s("b", 6, 1.0)], 0.0),
            [("b".into(), 4)]
        );
        // An odd device never ping-pongs.
        assert!(plan(&[s("a", 2, 1.0), s("b", 1, 1.0)], 0.0).is_empty());
        assert!(plan(&[s("a", 3, 1.0)], 0.0).is_empty());
    }
}
