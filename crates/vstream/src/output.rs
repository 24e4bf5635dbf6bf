//! How the admin commands show things: human sizes, aligned tables,
//! `key: value` blocks, UTC times, pretty JSON and progress bars.
//!
//! Everything here but [`print()`], [`print_json`] and [`progress_bar`] is pure
//! and returns strings, so it is tested without a terminal.

use std::io::{self, IsTerminal, Write};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

/// Writes `text` to stdout. A closed pipe (`vstream vdisk list | head -1`)
/// is not an error.
pub fn print(text: &str) -> Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to standard output"),
    }
}

/// Prints `value` as pretty JSON, as the API sent it: sizes in exact bytes.
pub fn print_json(value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).context("formatting JSON")?;
    text.push('\n');
    print(&text)
}

/// A size for people: `512 B`, `1.5 MiB`, `8 GiB` (binary units, at most one
/// decimal, rounded to nearest).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    // The largest unit not above the size, in exact integer arithmetic.
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >> (10 * (unit + 2)) > 0 {
        unit += 1;
    }
    let tenths = |unit: usize| {
        let div = 1u128 << (10 * (unit + 1));
        (u128::from(bytes) * 10 + div / 2) / div
    };
    let mut t = tenths(unit);
    // 1023.96 KiB rounds to 1024.0 KiB: say 1 MiB instead.
    if t >= 10240 && unit + 1 < UNITS.len() {
        unit += 1;
        t = tenths(unit);
    }
    if t % 10 == 0 {
        format!("{} {}", t / 10, UNITS[unit])
    } else {
        format!("{}.{} {}", t / 10, t % 10, UNITS[unit])
    }
}

/// Left-aligned columns two spaces apart, a header line first, no trailing
/// blanks. Rows shorter than the header leave their last cells empty.
pub fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, w) in widths.iter().enumerate() {
            let cell = row.get(i).map(String::as_str).unwrap_or("");
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `key: value` lines with the values aligned.
pub fn render_fields(fields: &[(&str, String)]) -> String {
    let width = fields
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (k, v) in fields {
        let pad = width - k.chars().count();
        out.push_str(&format!("{k}:{:pad$} {v}\n", "", pad = pad));
    }
    out
}

/// Seconds since the Unix epoch as `2024-05-01 12:34:56 UTC`.
pub fn format_unix_time(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// The first 12 characters of a content hash, or `-` when there is none.
/// A server's boot set of a version, for a table cell: its size, and
/// whether it was all in the page cache at the server's last check, or over
/// its budget (not read ahead); empty if it reads none ahead.
pub fn boot_set_cell(set: &vstream_api::BootSetState) -> String {
    match (set.bytes, set.uncached) {
        (0, _) => String::new(),
        (all, _) if set.over_budget => {
            format!("{}, over budget: not read ahead", human_size(all))
        }
        (all, 0) => format!("{} cached", human_size(all)),
        (all, out) => format!("{}, {} not cached", human_size(all), human_size(out)),
    }
}

pub fn short_hash(hash: &str) -> String {
    if hash.is_empty() {
        "-".to_string()
    } else {
        hash.chars().take(12).collect()
    }
}

/// A bar over `total` bytes on stderr when stderr is a terminal, and a hidden
/// one (every call a no-op) otherwise, so scripts and logs stay clean.
pub fn progress_bar(total: u64) -> ProgressBar {
    if !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(
        "{wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = ProgressBar::new(total);
    bar.set_style(style);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1024), "1 KiB");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(3 << 19), "1.5 MiB");
        assert_eq!(human_size(8 << 30), "8 GiB");
        assert_eq!(human_size((8 << 30) + 1), "8 GiB");
        assert_eq!(human_size(1_288_490_189), "1.2 GiB");
        assert_eq!(human_size((1 << 20) - 1), "1 MiB");
        assert_eq!(human_size((1 << 20) - 51), "1 MiB");
        assert_eq!(human_size((1 << 20) - 60), "1023.9 KiB");
        assert_eq!(human_size(5 << 40), "5 TiB");
        assert_eq!(human_size(u64::MAX), "16 EiB");
    }

    #[test]
    fn human_sizes_round_trip_through_parse_size() {
        for s in ["1.5 MiB", "8 GiB", "512 B", "3 TiB", "2.5 KiB"] {
            let bytes = vstream_api::parse_size(s).unwrap();
            assert_eq!(human_size(bytes), s);
        }
    }

    #[test]
    fn tables_align_without_trailing_blanks() {
        let rows = vec![
            vec!["win10".to_string(), "8 GiB".to_string(), "".to_string()],
            vec!["a".to_string(), "512 MiB".to_string(), "pc1".to_string()],
            vec!["short".to_string()],
        ];
        let t = render_table(&["NAME", "SIZE", "DEVICES"], &rows);
        assert_eq!(
            t,
            "NAME   SIZE     DEVICES\n\
             win10  8 GiB\n\
             a      512 MiB  pc1\n\
             short\n"
        );
    }

    #[test]
    fn tables_count_characters_not_bytes() {
        let t = render_table(&["N", "X"], &[vec!["äö".into(), "1".into()]]);
        assert_eq!(t, "N   X\näö  1\n");
    }

    #[test]
    fn empty_table_is_its_header() {
        assert_eq!(render_table(&["NAME", "MAC"], &[]), "NAME  MAC\n");
    }

    #[test]
    fn fields_align() {
        let f = render_fields(&[("size", "8 GiB".into()), ("content hash", "ab".into())]);
        assert_eq!(f, "size:         8 GiB\ncontent hash: ab\n");
    }

    #[test]
    fn unix_times() {
        assert_eq!(format_unix_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_unix_time(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(format_unix_time(4_107_542_399), "2100-02-28 23:59:59 UTC");
    }

    #[test]
    fn short_hashes() {
        assert_eq!(short_hash(&"ab".repeat(32)), "abababababab");
        assert_eq!(short_hash("abc"), "abc");
        assert_eq!(short_hash(""), "-");
    }
}
