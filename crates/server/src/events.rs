//! Device events: connects, disconnects, failovers, retries, refusals,
//! full caches and moves. Each is logged as a structured line (target
//! `vstream::events`), counted for `/metrics`, and kept among the device's
//! recent events in the farm state (`events/DEVICE`, the newest
//! [`KEEP`]), for `vstream device events` and the console, and counted
//! there since the device was added (`eventcounts/DEVICE`), for the
//! device list.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use tokio::sync::mpsc;
use vstream_api::{DeviceEvent, EventKind};
use vstream_farm::FarmStore;

/// Events kept per device.
pub const KEEP: usize = 50;

/// Most events written to the farm state at once.
const BATCH: usize = 1024;

/// This server's side of the device events.
pub struct Events {
    farm: FarmStore,
    server: String,
    counts: [AtomicU64; EventKind::ALL.len()],
    /// The queue of events on their way to the farm state, and the one
    /// task that writes them, made at the first event.
    queue: OnceLock<mpsc::UnboundedSender<(String, DeviceEvent)>>,
}

impl Events {
    pub fn new(farm: FarmStore, server: String) -> Events {
        Events {
            farm,
            server,
            counts: Default::default(),
            queue: OnceLock::new(),
        }
    }

    /// Records `kind` for `device`: logged and counted now, written to the
    /// farm state in the background (a data path never waits for it), by
    /// one task that writes whatever has queued up meanwhile in one go: a
    /// boot storm's connects cost a handful of farm commits, not one each.
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
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            rt.spawn(write_events(self.farm.clone(), rx));
            tx
        });
        // A name the farm state cannot hold is not queued: it would cost
        // the whole batch it joined.
        if let Err(e) = vstream_farm::validate_name(device) {
            tracing::debug!(device, error = %e, "a device event was not kept in the farm state");
            return;
        }
        if queue.send((device.to_owned(), event)).is_err() {
            tracing::debug!(
                device,
                "a device event was not kept in the farm state: its writer has stopped"
            );
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

/// Writes queued events to the farm state, each time all that queued up
/// while the last write ran, until every sender is gone.
async fn write_events(farm: FarmStore, mut queue: mpsc::UnboundedReceiver<(String, DeviceEvent)>) {
    let mut batch = Vec::with_capacity(BATCH);
    while queue.recv_many(&mut batch, BATCH).await > 0 {
        if let Err(e) = farm.add_device_events(&batch, KEEP).await {
            tracing::debug!(events = batch.len(), error = %e, "device events were not kept in the farm state");
        }
        batch.clear();
    }
}
