//! The server as an NBD front door: what [`vstream_service`] serves of it.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
pub use vstream_service::*;

use crate::sessions::Sessions;

impl Exports for Sessions {
    fn open<'a>(
        self: Arc<Self>,
        name: &'a str,
        client: &'a Client,
        go: bool,
    ) -> BoxFuture<'a, Result<Export, OpenError>> {
        Box::pin(async move { self.open_export(name, client, go).await })
    }
    fn list<'a>(&'a self, client: &'a Client) -> BoxFuture<'a, Vec<(String, String)>> {
        Box::pin(self.listed(client))
    }
    fn structured_replies(&self) -> bool {
        self.config.structured_replies
    }
    fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.config.handshake_timeout_secs)
    }
    fn idle_timeout(&self, export: &Export) -> Option<Duration> {
        if is_device_session(&export.name) || self.config.idle_timeout_secs == 0 {
            return None;
        }
        Some(Duration::from_secs(self.config.idle_timeout_secs))
    }
    fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }
    fn keepalive(&self) -> tcp::Keepalive {
        self.config.keepalive
    }
    fn tls(&self) -> Tls {
        self.tls.clone()
    }
}
