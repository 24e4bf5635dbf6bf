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
    /// READ requests answered, and those of them answered inline from the page
    /// cache by the connection's own task (the rest wait for a blocking read).
    pub reads: AtomicU64,
    pub inline_reads: AtomicU64,
    /// Inline READs whose data went from a layer file its disk does not write straight to
    /// the socket (`sendfile`), with no copy through user space.
    pub sendfile_reads: AtomicU64,
    /// Inline READs whose data went from a layer file's shared mapping to
    /// the socket, copied once, by the kernel (`sendmsg`).
    pub mapped_reads: AtomicU64,
    /// FLUSH requests answered on the spot: nothing written since the last.
    pub inline_flushes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub request_errors: AtomicU64,
    /// Connections that went on inside TLS.
    pub tls_connections: AtomicU64,
    /// Refusals, by [`Refusal`].
    refusals: [AtomicU64; Refusal::ALL.len()],
}

/// Why a client was refused, as the logs and `vstream_nbd_refusals_total`
/// name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An option before STARTTLS on a server that requires TLS.
    NoTls,
    /// A TLS handshake that failed: a certificate of another CA, none where
    /// one is required, an expired or revoked (CRL) one, or no TLS client.
    BadCertificate,
    /// No client certificate, and the export is not open to anonymous
    /// readers.
    Anonymous,
    /// A certificate that names no device of the farm.
    UnknownDevice,
    /// A device's certificate on an export that is not the device's own.
    WrongExport,
    /// A certificate issued before its device's credentials were revoked.
    Revoked,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::NoTls,
        Refusal::BadCertificate,
        Refusal::Anonymous,
        Refusal::UnknownDevice,
        Refusal::WrongExport,
        Refusal::Revoked,
    ];

    /// The metric label and log word.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NoTls => "no_tls",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::Anonymous => "anonymous",
            Refusal::UnknownDevice => "unknown_device",
            Refusal::WrongExport => "wrong_export",
            Refusal::Revoked => "revoked",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one refusal.
    pub fn refused(&self, why: Refusal) {
        Metrics::add(&self.refusals[why as usize], 1);
    }

    /// Refusals for `why` so far.
    pub fn refusals(&self, why: Refusal) -> u64 {
        self.refusals[why as usize].load(Ordering::Relaxed)
    }

    /// Prometheus text exposition, with `extra` rows (name, type, help, value).
    pub fn render(&self, extra: &[(&str, &str, &str, &AtomicU64)]) -> String {
        let mut out = String::new();
        let rows: [(&str, &str, &str, &AtomicU64); 13] = [
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
                "vstream_nbd_reads_total",
                "counter",
                "READ requests answered",
                &self.reads,
            ),
            (
                "vstream_nbd_inline_reads_total",
                "counter",
                "READ requests answered inline from the page cache",
                &self.inline_reads,
            ),
            (
                "vstream_nbd_sendfile_reads_total",
                "counter",
                "READ requests whose data went from the layer file to the socket with no copy",
                &self.sendfile_reads,
            ),
            (
                "vstream_nbd_mapped_reads_total",
                "counter",
                "READ requests whose data went from the layer file's mapping to the socket, copied only by the kernel",
                &self.mapped_reads,
            ),
            (
                "vstream_nbd_inline_flushes_total",
                "counter",
                "FLUSH requests answered at once, nothing having been written since the last",
                &self.inline_flushes,
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
        ];
        for &(name, kind, help, v) in rows.iter().chain(extra) {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let name = "vstream_nbd_refusals_total";
        let _ = writeln!(
            out,
            "# HELP {name} clients refused, by reason\n# TYPE {name} counter"
        );
        for why in Refusal::ALL {
            let _ = writeln!(out, "{name}{{reason=\"{why}\"}} {}", self.refusals(why));
        }
        out
    }
}
