//! Makes a boot trace (the format of `vstream_storm::trace`) from nbdkit's log filter
//! output, and prints what the trace holds.
//!
//! ```text
//! storm-trace LOG OUT.trace "how it was recorded"
//! ```

use vstream_storm::trace::{Op, Trace};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [log, out, comment] = &args[..] else {
        eprintln!("usage: storm-trace NBDKIT-LOG OUT.trace COMMENT");
        std::process::exit(2);
    };
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| {
        eprintln!("storm-trace: {log}: {e}");
        std::process::exit(1);
    });
    let trace = Trace::from_nbdkit_log(&text).unwrap_or_else(|e| {
        eprintln!("storm-trace: {log}: {e}");
        std::process::exit(1);
    });
    if let Err(e) = std::fs::write(out, trace.render(comment)) {
        eprintln!("storm-trace: {out}: {e}");
        std::process::exit(1);
    }
    let count = |op| trace.steps.iter().filter(|s| s.op == op).count();
    eprintln!(
        "storm-trace: {} requests over {:.2} s: {} reads ({} bytes), {} writes ({} bytes), {} flushes",
        trace.steps.len(),
        trace.steps.last().map_or(0, |s| s.at_us) as f64 / 1e6,
        count(Op::Read),
        trace.bytes(Op::Read),
        count(Op::Write),
        trace.bytes(Op::Write),
        count(Op::Flush)
    );
}
