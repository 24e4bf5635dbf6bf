//! Logging to stderr, as every vstream program does it.

use std::io::IsTerminal;

use anyhow::{anyhow, Context, Result};
use tracing_subscriber::EnvFilter;

/// Logs to stderr at `RUST_LOG` (default `info`): escaped text, or one
/// JSON object a line.
pub fn init_logging(json: bool) -> Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::try_new(&spec)
            .with_context(|| format!("RUST_LOG={spec:?} is not a valid log filter"))?,
        _ => EnvFilter::new("info"),
    };
    // Colours only for a person watching, not in a journal or a file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match json {
        false => builder
            // Fields from outside (export names, MACs) cannot break a line.
            .fmt_fields(crate::log_fields::EscapedFields)
            .try_init(),
        true => builder.json().try_init(),
    };
    installed.map_err(|e| anyhow!("setting up logging: {e}"))
}
