//! Counters the server keeps, exposed in Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub request_errors: AtomicU64,
    /// Connections that went on inside TLS.
    pub tls_connections: AtomicU64,
    /// Options refused because TLS is required and was not started.
    pub tls_refusals: AtomicU64,
    /// TLS handshakes that failed (a bad or missing certificate, a client
    /// that is no TLS client).
    pub tls_failures: AtomicU64,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Prometheus text exposition, with `extra` rows (name, type, help, value).
    pub fn render(&self, extra: &[(&str, &str, &str, &AtomicU64)]) -> String {
        let mut out = String::new();
        let rows: [(&str, &str, &str, &AtomicU64); 10] = [
            (
                "vstream_nbd_connections_total",
                "counter",
                "NBD connections accepted",
                &self.connections_total,
            ),
            (
                "vstream_nbd_connections_open",
                "gauge",
                "NBD connections open now",
                &self.connections_open,
            ),
            (
                "vstream_nbd_handshake_failures_total",
                "counter",
                "handshakes that failed",
                &self.handshake_failures,
            ),
            (
                "vstream_nbd_requests_total",
                "counter",
                "NBD requests served",
                &self.requests,
            ),
            (
                "vstream_nbd_read_bytes_total",
                "counter",
                "bytes read by clients",
                &self.read_bytes,
            ),
            (
                "vstream_nbd_written_bytes_total",
                "counter",
                "bytes written by clients",
                &self.written_bytes,
            ),
            (
                "vstream_nbd_request_errors_total",
                "counter",
                "requests answered with an error",
                &self.request_errors,
            ),
            (
                "vstream_nbd_tls_connections_total",
                "counter",
                "NBD connections that went on inside TLS",
                &self.tls_connections,
            ),
            (
                "vstream_nbd_tls_required_refusals_total",
                "counter",
                "options refused because TLS is required and was not started",
                &self.tls_refusals,
            ),
            (
                "vstream_nbd_tls_handshake_failures_total",
                "counter",
                "TLS handshakes that failed (bad or missing certificate, not a TLS client)",
                &self.tls_failures,
            ),
        ];
        for &(name, kind, help, v) in rows.iter().chain(extra) {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out
    }
}
