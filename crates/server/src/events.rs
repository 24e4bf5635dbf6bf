//! Device events: connects, disconnects, failovers, retries, refusals,
//! full caches and moves. Each is logged as a structured line (target
//! `vstream::events`), counted for `/metrics`, and kept among the device's
//! recent events in the farm state (`events/DEVICE`, the newest
//! [`KEEP`]), for `vstream device events` and the console, and counted
//! there since the device was added (`eventcounts/DEVICE`), for the
//! device list.

use std::sync::atomic::{AtomicU64, Ordering};

use vstream_api::{DeviceEvent, EventKind};
use vstream_farm::FarmStore;

/// Events kept per device.
pub const KEEP: usize = 50;

/// This server's side of the device events.
pub struct Events {
    farm: FarmStore,
    server: String,
    counts: [AtomicU64; EventKind::ALL.len()],
}

impl Events {
    pub fn new(farm: FarmStore, server: String) -> Events {
        Events {
            farm,
            server,
            counts: Default::default(),
        }
    }

    /// Records `kind` for `device`: logged and counted now, written to the
    /// farm state in the background (a data path never waits for it).
    pub fn record(&self, device: &str, kind: EventKind, detail: impl Into<String>) {
        let detail = detail.into();
        tracing::info!(target: "vstream::events", device, event = %kind, detail = %detail, "device event");
        if let Some(i) = EventKind::ALL.iter().position(|k| *k == kind) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        let event = DeviceEvent {
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            kind,
            server: self.server.clone(),
            detail,
        };
        let (farm, device) = (self.farm.clone(), device.to_owned());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = farm.add_device_event(&device, &event, KEEP).await {
                    tracing::debug!(device, error = %e, "a device event was not kept in the farm state");
                }
            });
        }
    }

    /// `vstream_device_events_total{kind}`, in the exposition format.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# HELP vstream_device_events_total device events at this server, by kind\n\
             # TYPE vstream_device_events_total counter\n",
        );
        for (kind, n) in EventKind::ALL.iter().zip(&self.counts) {
            out.push_str(&format!(
                "vstream_device_events_total{{kind=\"{kind}\"}} {}\n",
                n.load(Ordering::Relaxed)
            ));
        }
        out
    }
}
