//! When replication may run, and how fast.
//!
//! - [`Clock`]: the time source. [`SystemClock`] in production; [`FileClock`]
//!   (selected by `VSTREAM_CLOCK_FILE` in debug builds only, see
//!   [`clock_from_env`]) lets end-to-end tests set the wall-clock time;
//!   [`ManualClock`] drives unit tests, its `sleep` advancing time instead of
//!   blocking.
//! - [`Window`] and [`Schedule`]: weekly time windows such as
//!   `mon-fri 22:00-06:00`, evaluated at a fixed UTC offset. The server passes
//!   [`local_utc_offset_secs`], which is 0 (windows in UTC) unless
//!   `VSTREAM_UTC_OFFSET` is set; no time-zone database is consulted.
//! - [`Throttle`]: a token bucket shared by all replication streams, limiting
//!   their combined bandwidth.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// The environment variable naming a [`FileClock`] file (debug builds only).
pub const CLOCK_FILE_ENV: &str = "VSTREAM_CLOCK_FILE";

/// The environment variable giving the UTC offset of schedule windows.
pub const UTC_OFFSET_ENV: &str = "VSTREAM_UTC_OFFSET";

const SECS_PER_DAY: i64 = 86_400;
const MINS_PER_DAY: u32 = 1_440;

// ---------------------------------------------------------------------------
// Clocks
// ---------------------------------------------------------------------------

/// A source of wall-clock time, and a way to wait.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Seconds since the Unix epoch, fractional.
    fn now_unix(&self) -> f64;

    /// Blocks the calling thread for `d` (or, for a simulated clock, lets
    /// `d` pass).
    fn sleep(&self, d: Duration);

    /// Seconds on a time base that advances consistently with [`sleep`]
    /// (its origin is arbitrary); used to measure rates. Defaults to
    /// [`now_unix`]. Clocks whose wall time need not advance while sleeping
    /// ([`FileClock`]) measure real elapsed time instead.
    ///
    /// [`sleep`]: Clock::sleep
    /// [`now_unix`]: Clock::now_unix
    fn monotonic_secs(&self) -> f64 {
        self.now_unix()
    }
}

/// Seconds since the Unix epoch by the system clock (negative before it).
fn system_now_unix() -> f64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// Seconds since the first call in this process, by the monotonic clock.
fn process_monotonic_secs() -> f64 {
    static ANCHOR: OnceLock<Instant> = OnceLock::new();
    ANCHOR.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// Real time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> f64 {
        system_now_unix()
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }

    fn monotonic_secs(&self) -> f64 {
        process_monotonic_secs()
    }
}

/// Wall-clock time read from a file on every call: seconds since the epoch
/// in ASCII, integer or fractional, surrounding whitespace ignored. Used by
/// end-to-end tests through `VSTREAM_CLOCK_FILE`.
///
/// If the file cannot be read or parsed, the system time is used and a
/// warning logged (once until the file is readable again). Sleeping is real,
/// and so is the time base for rates ([`Clock::monotonic_secs`]): the file's
/// time need not advance.
#[derive(Debug)]
pub struct FileClock {
    path: PathBuf,
    warned: AtomicBool,
}

impl FileClock {
    /// A clock reading `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            warned: AtomicBool::new(false),
        }
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<f64, String> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| e.to_string())?;
        let text = text.trim();
        match text.parse::<f64>() {
            Ok(t) if t.is_finite() => Ok(t),
            _ => Err(format!(
                "{text:?} is not a number of seconds since the epoch"
            )),
        }
    }
}

impl Clock for FileClock {
    fn now_unix(&self) -> f64 {
        match self.read() {
            Ok(t) => {
                self.warned.store(false, Ordering::Relaxed);
                t
            }
            Err(e) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(path = %self.path.display(), error = %e, "clock file unreadable; using the system clock");
                }
                system_now_unix()
            }
        }
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }

    fn monotonic_secs(&self) -> f64 {
        process_monotonic_secs()
    }
}

/// A [`FileClock`] if `VSTREAM_CLOCK_FILE` is set (and not empty), else the
/// [`SystemClock`].
///
/// The variable is a test hook: it is read by debug builds only (the tests
/// run those). A release build always uses the [`SystemClock`].
pub fn clock_from_env() -> Arc<dyn Clock> {
    #[cfg(debug_assertions)]
    if let Some(path) = std::env::var_os(CLOCK_FILE_ENV).filter(|p| !p.is_empty()) {
        return Arc::new(FileClock::new(path));
    }
    Arc::new(SystemClock)
}

/// A simulated clock for tests: time moves only through [`advance`],
/// [`set`] and [`Clock::sleep`], which returns at once after advancing time
/// by the duration asked.
///
/// [`advance`]: ManualClock::advance
/// [`set`]: ManualClock::set
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<f64>,
}

impl ManualClock {
    /// A clock showing `unix` seconds since the epoch.
    pub fn new(unix: f64) -> Self {
        Self {
            now: Mutex::new(unix),
        }
    }

    /// Moves time forward by `secs`.
    pub fn advance(&self, secs: f64) {
        *self.now.lock() += secs;
    }

    /// Sets the time to `unix`.
    pub fn set(&self, unix: f64) {
        *self.now.lock() = unix;
    }
}

impl Clock for ManualClock {
    fn now_unix(&self) -> f64 {
        *self.now.lock()
    }

    fn sleep(&self, d: Duration) {
        self.advance(d.as_secs_f64());
    }
}

// ---------------------------------------------------------------------------
// UTC offset
// ---------------------------------------------------------------------------

/// The UTC offset at which schedule windows are evaluated: `VSTREAM_UTC_OFFSET`
/// (`+02:00`, `-05:30`, `+0530`, `-5`, `0`, `Z`) if set, else 0, i.e. windows
/// are in UTC. A fixed offset: daylight-saving changes are not followed. An
/// invalid value is logged and treated as 0.
pub fn local_utc_offset_secs() -> i32 {
    let Ok(value) = std::env::var(UTC_OFFSET_ENV) else {
        return 0;
    };
    if value.trim().is_empty() {
        return 0;
    }
    parse_utc_offset(&value).unwrap_or_else(|e| {
        tracing::warn!(variable = UTC_OFFSET_ENV, error = %e, "ignoring the UTC offset; schedule windows are in UTC");
        0
    })
}

/// Parses a UTC offset: `0`, `Z`, `UTC`, or `[+|-]HH[:MM]` / `[+|-]HHMM`,
/// at most 18 hours. Returns seconds east of UTC.
pub fn parse_utc_offset(s: &str) -> Result<i32, String> {
    let t = s.trim();
    if t == "0" || t.eq_ignore_ascii_case("z") || t.eq_ignore_ascii_case("utc") {
        return Ok(0);
    }
    let bad = |why: &str| {
        format!("invalid UTC offset {s:?}: {why}; expected e.g. \"+02:00\", \"-05:30\" or \"0\"")
    };
    let (sign, rest) = match t.as_bytes().first() {
        Some(b'+') => (1, &t[1..]),
        Some(b'-') => (-1, &t[1..]),
        _ => (1, t),
    };
    let (hh, mm) = match rest.split_once(':') {
        Some((h, m)) => (h, m),
        None if rest.len() == 4 => rest.split_at(2),
        None => (rest, "0"),
    };
    let digits = |p: &str| !p.is_empty() && p.len() <= 2 && p.bytes().all(|b| b.is_ascii_digit());
    if !digits(hh) || !digits(mm) {
        return Err(bad("not hours and minutes"));
    }
    let (h, m): (i32, i32) = (
        hh.parse().map_err(|_| bad("bad hours"))?,
        mm.parse().map_err(|_| bad("bad minutes"))?,
    );
    if m >= 60 {
        return Err(bad("minutes out of range"));
    }
    if h * 60 + m > 18 * 60 {
        return Err(bad("more than 18 hours"));
    }
    Ok(sign * (h * 3600 + m * 60))
}

/// Formats `unix` (truncated to the second) as RFC 3339 at `utc_offset_secs`,
/// e.g. `2024-01-05T22:00:00+02:00`, or `…Z` at offset 0.
pub fn format_rfc3339(unix: f64, utc_offset_secs: i32) -> String {
    let local = unix.floor() as i64 + i64::from(utc_offset_secs);
    let day = local.div_euclid(SECS_PER_DAY);
    let sec = local.rem_euclid(SECS_PER_DAY);
    let (y, mo, d) = civil_from_days(day);
    let offset = if utc_offset_secs == 0 {
        "Z".to_string()
    } else {
        let sign = if utc_offset_secs < 0 { '-' } else { '+' };
        let abs = utc_offset_secs.unsigned_abs();
        format!("{sign}{:02}:{:02}", abs / 3600, abs / 60 % 60)
    };
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}{offset}",
        sec / 3600,
        sec / 60 % 60,
        sec % 60
    )
}

/// The proleptic Gregorian (year, month, day) of a day number counted from
/// 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Splits a Unix time at `utc_offset_secs` into (day number since
/// 1970-01-01, weekday with Monday = 0, seconds into the day).
fn split_local(unix: f64, utc_offset_secs: i32) -> (i64, usize, f64) {
    let local = unix + f64::from(utc_offset_secs);
    let mut day = (local / SECS_PER_DAY as f64).floor() as i64;
    let mut sec = local - day as f64 * SECS_PER_DAY as f64;
    if sec >= SECS_PER_DAY as f64 {
        day += 1;
        sec -= SECS_PER_DAY as f64;
    }
    (day, weekday(day), sec.max(0.0))
}

/// The weekday (Monday = 0) of a day number; 1970-01-01 was a Thursday.
fn weekday(day: i64) -> usize {
    (day + 3).rem_euclid(7) as usize
}

// ---------------------------------------------------------------------------
// Windows and schedules
// ---------------------------------------------------------------------------

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

const WINDOW_SYNTAX: &str =
    "expected \"[DAYS ]HH:MM-HH:MM\", DAYS being a comma-separated list of \
     days (mon..sun), ranges (mon-fri, fri-mon) or weekdays/weekends/daily, \
     e.g. \"22:00-06:00\" or \"mon-fri 22:00-06:00\"";

/// A weekly time window: from `start` to `end` (minutes into the day) on each
/// of its days. A window whose end is before its start crosses midnight and
/// belongs to the day on which it starts: `fri 22:00-06:00` is open from
/// Friday 22:00 to Saturday 06:00.
///
/// Written `[DAYS ]HH:MM-HH:MM` (see [`FromStr`](Window::from_str)); `24:00`
/// may only end a window, and `00:00-24:00` is the whole day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    /// Monday to Sunday.
    days: [bool; 7],
    start_min: u32,
    end_min: u32,
}

impl Window {
    /// A window on `days` (Monday first) from `start_min` to `end_min`
    /// minutes into the day; `end_min` may be 1440 (24:00).
    pub fn new(days: [bool; 7], start_min: u32, end_min: u32) -> Result<Self, String> {
        check_window(&days, start_min, end_min)
            .map_err(|why| format!("invalid time window: {why}"))?;
        Ok(Self {
            days,
            start_min,
            end_min,
        })
    }

    /// The days it starts on, Monday first.
    pub fn days(&self) -> [bool; 7] {
        self.days
    }

    /// Minutes into the day at which it opens.
    pub fn start_min(&self) -> u32 {
        self.start_min
    }

    /// Minutes into the day at which it closes (1440 for 24:00).
    pub fn end_min(&self) -> u32 {
        self.end_min
    }

    /// Whether it closes on the day after it opens.
    pub fn crosses_midnight(&self) -> bool {
        self.end_min < self.start_min
    }

    /// Whether it is open `sec` seconds into a day of weekday `wd` (Monday =
    /// 0), counting the tail of a window begun the day before.
    fn contains(&self, wd: usize, sec: f64) -> bool {
        let start = f64::from(self.start_min * 60);
        let end = f64::from(self.end_min * 60);
        if self.crosses_midnight() {
            (self.days[wd] && sec >= start) || (self.days[(wd + 6) % 7] && sec < end)
        } else {
            self.days[wd] && sec >= start && sec < end
        }
    }
}

fn check_window(days: &[bool; 7], start_min: u32, end_min: u32) -> Result<(), String> {
    if !days.iter().any(|&d| d) {
        return Err("no days".into());
    }
    if start_min >= MINS_PER_DAY {
        return Err("24:00 may only end a window".into());
    }
    if end_min > MINS_PER_DAY {
        return Err("end after 24:00".into());
    }
    if start_min == end_min {
        return Err("empty window (start equals end)".into());
    }
    Ok(())
}

impl FromStr for Window {
    type Err = String;

    fn from_str(input: &str) -> Result<Self, String> {
        let bad = |why: String| format!("invalid time window {input:?}: {why}; {WINDOW_SYNTAX}");
        let tokens: Vec<&str> = input.split_whitespace().collect();
        let Some((times, day_tokens)) = tokens.split_last() else {
            return Err(bad("empty".into()));
        };
        let days = if day_tokens.is_empty() {
            [true; 7]
        } else {
            parse_days(&day_tokens.concat()).map_err(bad)?
        };
        let Some((start, end)) = times.split_once('-') else {
            return Err(bad(format!(
                "missing '-' between start and end in {times:?}"
            )));
        };
        let start_min = parse_hhmm(start).map_err(bad)?;
        let end_min = parse_hhmm(end).map_err(bad)?;
        check_window(&days, start_min, end_min).map_err(bad)?;
        Ok(Self {
            days,
            start_min,
            end_min,
        })
    }
}

/// `HH:MM` (or `H:MM`) to minutes into the day; `24:00` gives 1440.
fn parse_hhmm(s: &str) -> Result<u32, String> {
    let bad = |why: &str| format!("{why} in {s:?}");
    let (h, m) = s.split_once(':').ok_or_else(|| bad("not HH:MM"))?;
    let digits = |p: &str, max_len: usize| {
        !p.is_empty() && p.len() <= max_len && p.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(h, 2) || !digits(m, 2) || m.len() != 2 {
        return Err(bad("not HH:MM"));
    }
    let (h, m): (u32, u32) = (
        h.parse().map_err(|_| bad("bad hour"))?,
        m.parse().map_err(|_| bad("bad minute"))?,
    );
    if m >= 60 {
        return Err(bad("minute out of range"));
    }
    match h {
        0..=23 => Ok(h * 60 + m),
        24 if m == 0 => Ok(MINS_PER_DAY),
        _ => Err(bad("hour out of range")),
    }
}

/// A comma-separated list of days, ranges and keywords.
fn parse_days(s: &str) -> Result<[bool; 7], String> {
    let mut days = [false; 7];
    for item in s.split(',') {
        let item = item.to_ascii_lowercase();
        match item.as_str() {
            "" => return Err(format!("empty day in {s:?}")),
            "daily" => days = [true; 7],
            "weekdays" | "weekday" => days[..5].fill(true),
            "weekends" | "weekend" => days[5..].fill(true),
            _ => {
                let (first, last) = match item.split_once('-') {
                    Some((a, b)) => (parse_day(a)?, parse_day(b)?),
                    None => {
                        let d = parse_day(&item)?;
                        (d, d)
                    }
                };
                let mut d = first;
                loop {
                    days[d] = true;
                    if d == last {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
        }
    }
    Ok(days)
}

/// A day name, lower case, to its index (Monday = 0).
fn parse_day(s: &str) -> Result<usize, String> {
    const LONG: [&[&str]; 7] = [
        &["monday"],
        &["tues", "tuesday"],
        &["wednesday"],
        &["thur", "thurs", "thursday"],
        &["friday"],
        &["saturday"],
        &["sunday"],
    ];
    (0..7)
        .find(|&i| DAY_NAMES[i] == s || LONG[i].contains(&s))
        .ok_or_else(|| format!("unknown day {s:?}"))
}

/// The canonical day list, or `None` for every day: runs of three or more
/// days as ranges (wrapping past Sunday when that makes one), others listed.
fn format_days(days: &[bool; 7]) -> Option<String> {
    if days.iter().all(|&d| d) {
        return None;
    }
    // (first day, length) of each run, Monday to Sunday.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < 7 {
        if days[i] {
            let start = i;
            while i < 7 && days[i] {
                i += 1;
            }
            runs.push((start, i - start));
        } else {
            i += 1;
        }
    }
    if let (Some(&first), Some(&last)) = (runs.first(), runs.last()) {
        if runs.len() > 1 && first.0 == 0 && last.0 + last.1 == 7 && first.1 + last.1 >= 3 {
            runs.remove(0);
            if let Some(last) = runs.last_mut() {
                last.1 += first.1;
            }
        }
    }
    let parts: Vec<String> = runs
        .iter()
        .map(|&(start, len)| match len {
            1 => DAY_NAMES[start].to_string(),
            2 => format!("{},{}", DAY_NAMES[start], DAY_NAMES[(start + 1) % 7]),
            _ => format!("{}-{}", DAY_NAMES[start], DAY_NAMES[(start + len - 1) % 7]),
        })
        .collect();
    Some(parts.join(","))
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(days) = format_days(&self.days) {
            write!(f, "{days} ")?;
        }
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start_min / 60,
            self.start_min % 60,
            self.end_min / 60,
            self.end_min % 60
        )
    }
}

/// A set of weekly windows at a fixed UTC offset, open when any window is;
/// with no windows, always open.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Schedule {
    windows: Vec<Window>,
    utc_offset_secs: i32,
}

impl Schedule {
    /// Windows evaluated at `utc_offset_secs` seconds east of UTC.
    pub fn new(windows: Vec<Window>, utc_offset_secs: i32) -> Self {
        Self {
            windows,
            utc_offset_secs,
        }
    }

    /// A schedule that is always open.
    pub fn always() -> Self {
        Self::default()
    }

    /// Parses each of `specs` as a [`Window`].
    pub fn parse<I>(specs: I, utc_offset_secs: i32) -> Result<Self, String>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let windows = specs
            .into_iter()
            .map(|s| s.as_ref().parse())
            .collect::<Result<Vec<Window>, String>>()?;
        Ok(Self::new(windows, utc_offset_secs))
    }

    /// Its windows.
    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// The offset at which its windows are evaluated, in seconds east of UTC.
    pub fn utc_offset_secs(&self) -> i32 {
        self.utc_offset_secs
    }

    /// Whether it has no windows, i.e. is always open.
    pub fn is_always(&self) -> bool {
        self.windows.is_empty()
    }

    /// Whether it is open at `unix` seconds since the epoch.
    pub fn is_open(&self, unix: f64) -> bool {
        if self.windows.is_empty() {
            return true;
        }
        let (_, wd, sec) = split_local(unix, self.utc_offset_secs);
        self.windows.iter().any(|w| w.contains(wd, sec))
    }

    /// The first instant at or after `unix` at which it is open: `unix`
    /// itself if open now, else the nearest window start within the next
    /// eight days. `None` if there is none (or `unix` is not finite).
    pub fn next_open(&self, unix: f64) -> Option<f64> {
        if !unix.is_finite() {
            return None;
        }
        if self.is_open(unix) {
            return Some(unix);
        }
        // Closed now, so the next open instant is the start of some window;
        // any window begun before today would have to be open now.
        let (today, _, _) = split_local(unix, self.utc_offset_secs);
        let offset = f64::from(self.utc_offset_secs);
        (today..=today + 8)
            .flat_map(|day| {
                let wd = weekday(day);
                self.windows
                    .iter()
                    .filter(move |w| w.days[wd])
                    .map(move |w| {
                        (day * SECS_PER_DAY + i64::from(w.start_min) * 60) as f64 - offset
                    })
            })
            .filter(|&t| t >= unix)
            .min_by(f64::total_cmp)
    }

    /// Its windows in canonical form, comma-separated, or `always`.
    pub fn describe(&self) -> String {
        if self.windows.is_empty() {
            return "always".into();
        }
        self.windows
            .iter()
            .map(Window::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

// ---------------------------------------------------------------------------
// Throttle
// ---------------------------------------------------------------------------

/// The smallest bucket capacity, in bytes.
const MIN_BURST: u64 = 64 * 1024;

/// The bucket capacity for a rate: a tenth of a second's worth, at least
/// 64 KiB.
fn burst_for(rate: u64) -> f64 {
    (rate / 10).max(MIN_BURST) as f64
}

/// A token bucket limiting the bytes per second passed by all its callers
/// together.
///
/// The bucket holds up to [`burst`](Throttle::burst) tokens (a tenth of the
/// rate, at least 64 KiB) and refills at the rate. [`take`](Throttle::take)
/// reserves its bytes at once, letting the bucket go into debt, then sleeps
/// until the debt is paid: requests larger than the burst pass without
/// exceeding the rate, and concurrent callers are served in the order they
/// reserved. Over any interval of length T, at most `burst + rate × T` bytes
/// pass.
#[derive(Debug)]
pub struct Throttle {
    clock: Arc<dyn Clock>,
    bucket: Mutex<Bucket>,
    passed: AtomicU64,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes per second; `None` for unlimited.
    rate: Option<u64>,
    /// Tokens available; negative when in debt.
    tokens: f64,
    /// When `tokens` was last brought up to date, by the clock's
    /// [`monotonic_secs`](Clock::monotonic_secs).
    last: f64,
}

impl Bucket {
    /// Adds the tokens earned since the last update, up to the capacity.
    fn refill(&mut self, now: f64, rate: u64) {
        // A clock going backwards earns nothing; the next update counts from
        // the earlier time, which the capacity bounds.
        if now > self.last {
            self.tokens = (self.tokens + (now - self.last) * rate as f64).min(burst_for(rate));
        }
        self.last = now;
    }
}

impl Throttle {
    /// A throttle passing `rate` bytes per second, or unlimited for `None`
    /// (or `Some(0)`). It starts with a full bucket.
    pub fn new(rate: Option<u64>, clock: Arc<dyn Clock>) -> Self {
        let rate = rate.filter(|&r| r > 0);
        let bucket = Bucket {
            rate,
            tokens: rate.map_or(0.0, burst_for),
            last: clock.monotonic_secs(),
        };
        Self {
            clock,
            bucket: Mutex::new(bucket),
            passed: AtomicU64::new(0),
        }
    }

    /// Blocks until `n` more bytes may pass, then counts them as passed.
    pub fn take(&self, n: u64) {
        if n == 0 {
            return;
        }
        let wait = {
            let mut b = self.bucket.lock();
            match b.rate {
                None => 0.0,
                Some(rate) => {
                    b.refill(self.clock.monotonic_secs(), rate);
                    b.tokens -= n as f64;
                    if b.tokens < 0.0 {
                        -b.tokens / rate as f64
                    } else {
                        0.0
                    }
                }
            }
        };
        if wait > 0.0 {
            let d = Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX);
            self.clock.sleep(d);
        }
        self.passed.fetch_add(n, Ordering::Relaxed);
    }

    /// Changes the rate (`None` or `Some(0)`: unlimited). Tokens earned so
    /// far are kept up to the new capacity, and so is any debt; callers
    /// already sleeping finish their current wait.
    pub fn set_rate(&self, rate: Option<u64>) {
        let rate = rate.filter(|&r| r > 0);
        let mut b = self.bucket.lock();
        let now = self.clock.monotonic_secs();
        match (b.rate, rate) {
            (Some(old), Some(new)) => {
                b.refill(now, old);
                b.tokens = b.tokens.min(burst_for(new));
            }
            (None, Some(new)) => b.tokens = burst_for(new),
            (_, None) => b.tokens = 0.0,
        }
        b.last = now;
        b.rate = rate;
    }

    /// The rate in bytes per second; `None` for unlimited.
    pub fn rate(&self) -> Option<u64> {
        self.bucket.lock().rate
    }

    /// The bucket capacity in bytes; `None` for unlimited.
    pub fn burst(&self) -> Option<u64> {
        self.rate().map(|r| (r / 10).max(MIN_BURST))
    }

    /// Total bytes passed so far.
    pub fn passed(&self) -> u64 {
        self.passed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;
    /// 2024-01-01 00:00 UTC, a Monday.
    const MONDAY: f64 = 1_704_067_200.0;

    /// `day` days after Monday 2024-01-01 (0 = Monday), at `h:m` UTC.
    fn at(day: u32, h: u32, m: u32) -> f64 {
        MONDAY + f64::from(day * 86_400 + h * 3_600 + m * 60)
    }

    fn w(s: &str) -> Window {
        s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn sched(specs: &[&str], offset: i32) -> Schedule {
        Schedule::parse(specs, offset).unwrap()
    }

    #[test]
    fn weekdays_from_unix_time() {
        assert_eq!(split_local(0.0, 0), (0, 3, 0.0)); // Thursday
        assert_eq!(split_local(MONDAY, 0).1, 0);
        assert_eq!(split_local(at(6, 23, 59), 0).1, 6);
        // Before the epoch: 1969-12-31 23:00 was a Wednesday.
        assert_eq!(split_local(-3_600.0, 0), (-1, 2, 82_800.0));
        // A negative offset moves Monday 01:00 UTC back to Sunday 20:00.
        assert_eq!(split_local(at(0, 1, 0), -5 * 3_600).1, 6);
        assert_eq!(split_local(at(0, 1, 0), -5 * 3_600).2, 72_000.0);
    }

    #[test]
    fn parses_examples() {
        let x = w("22:00-06:00");
        assert_eq!(
            (x.days(), x.start_min(), x.end_min()),
            ([true; 7], 1_320, 360)
        );
        assert!(x.crosses_midnight());

        let x = w("mon-fri 22:00-06:00");
        assert_eq!(x.days(), [true, true, true, true, true, false, false]);

        let x = w("sat,sun 00:00-24:00");
        assert_eq!(
            (x.days(), x.start_min(), x.end_min()),
            ([false, false, false, false, false, true, true], 0, 1_440)
        );
        assert!(!x.crosses_midnight());

        let x = w("weekends 08:00-18:00");
        assert_eq!(
            (x.days(), x.start_min(), x.end_min()),
            ([false, false, false, false, false, true, true], 480, 1_080)
        );

        assert_eq!(
            w("FRI-Mon 1:30-2:45").days(),
            [true, false, false, false, true, true, true]
        );
        assert_eq!(
            w("Monday,wednesday 01:00-02:00").days(),
            [true, false, true, false, false, false, false]
        );
        assert_eq!(w("daily 01:00-02:00").days(), [true; 7]);
        assert_eq!(w("weekdays 01:00-02:00"), w("mon-fri 01:00-02:00"));
        assert_eq!(w("sat, sun 01:00-02:00"), w("weekends 01:00-02:00"));
        assert_eq!(
            w("  mon   01:00-02:00 ").days(),
            [true, false, false, false, false, false, false]
        );
    }

    #[test]
    fn display_is_canonical_and_round_trips() {
        for (input, canonical) in [
            ("22:00-06:00", "22:00-06:00"),
            ("daily 22:00-06:00", "22:00-06:00"),
            ("mon-fri 22:00-06:00", "mon-fri 22:00-06:00"),
            ("weekdays 9:00-17:30", "mon-fri 09:00-17:30"),
            ("sat,sun 00:00-24:00", "sat,sun 00:00-24:00"),
            ("weekends 08:00-18:00", "sat,sun 08:00-18:00"),
            ("fri-mon 01:00-02:00", "fri-mon 01:00-02:00"),
            ("sun,mon 01:00-02:00", "mon,sun 01:00-02:00"),
            ("mon,wed,thu,fri 01:00-02:00", "mon,wed-fri 01:00-02:00"),
            ("Thursday 23:59-24:00", "thu 23:59-24:00"),
        ] {
            let x = w(input);
            assert_eq!(x.to_string(), canonical, "{input:?}");
            assert_eq!(w(canonical), x, "{canonical:?}");
        }
        let s = sched(&["mon-fri 22:00-06:00", "sat,sun 00:00-24:00"], 0);
        assert_eq!(s.describe(), "mon-fri 22:00-06:00, sat,sun 00:00-24:00");
        assert_eq!(Schedule::always().describe(), "always");
    }

    #[test]
    fn parse_errors_quote_the_input_and_the_syntax() {
        for (input, why) in [
            ("25:00-01:00", "hour out of range"),
            ("mon-xyz 01:00-02:00", "unknown day \"xyz\""),
            ("10:00-10:00", "empty window"),
            ("10:00", "missing '-'"),
            ("", "empty"),
            ("24:00-01:00", "24:00 may only end a window"),
            ("10:60-11:00", "minute out of range"),
            ("10-11", "not HH:MM"),
            ("mon,,tue 01:00-02:00", "empty day"),
        ] {
            let e = input.parse::<Window>().unwrap_err();
            assert!(e.contains(&format!("{input:?}")), "{e}");
            assert!(e.contains(why), "{input:?}: {e}");
            assert!(e.contains("HH:MM-HH:MM"), "{e}");
        }
        assert!(Schedule::parse(["22:00-06:00", "bad"], 0).is_err());
        assert!(Window::new([false; 7], 0, 60).is_err());
        assert!(Window::new([true; 7], 0, 1_441).is_err());
        assert_eq!(Window::new([true; 7], 0, 1_440).unwrap(), w("00:00-24:00"));
    }

    #[test]
    fn is_open_across_midnight() {
        let s = sched(&["22:00-06:00"], 0);
        assert!(s.is_open(at(2, 23, 30)));
        assert!(s.is_open(at(2, 5, 59)));
        assert!(s.is_open(at(2, 22, 0)));
        assert!(!s.is_open(at(2, 6, 0)));
        assert!(!s.is_open(at(2, 12, 0)));
        assert!(!s.is_open(at(2, 21, 59) + 59.9));
    }

    #[test]
    fn a_window_crossing_midnight_belongs_to_its_first_day() {
        let s = sched(&["fri 22:00-06:00"], 0);
        assert!(s.is_open(at(5, 3, 0))); // Saturday 03:00
        assert!(!s.is_open(at(4, 3, 0))); // Friday 03:00
        assert!(s.is_open(at(4, 23, 0)));
        assert!(!s.is_open(at(5, 6, 0)));
        assert!(!s.is_open(at(5, 23, 0)));

        let s = sched(&["mon-fri 09:00-17:00"], 0);
        assert!(!s.is_open(at(5, 12, 0))); // Saturday noon
        assert!(s.is_open(at(4, 12, 0)));
        assert!(!s.is_open(at(4, 17, 0)));

        let s = sched(&["sat,sun 00:00-24:00"], 0);
        assert!(s.is_open(at(5, 0, 0)));
        assert!(s.is_open(at(6, 23, 59)));
        assert!(!s.is_open(at(7, 0, 0)));
        assert!(!s.is_open(at(4, 23, 59)));
    }

    #[test]
    fn offsets_shift_windows() {
        let plus2 = 2 * 3_600;
        let s = sched(&["22:00-06:00"], plus2);
        assert!(s.is_open(at(2, 20, 30))); // 22:30 local
        assert!(!s.is_open(at(2, 19, 59))); // 21:59 local
        assert!(s.is_open(at(2, 3, 59))); // 05:59 local
        assert!(!s.is_open(at(2, 4, 0))); // 06:00 local

        // At -05:00, Saturday 02:00 UTC is Friday 21:00 local.
        let minus5 = -5 * 3_600;
        let s = sched(&["fri 22:00-06:00"], minus5);
        assert!(!s.is_open(at(5, 2, 0)));
        assert!(s.is_open(at(5, 3, 30)));
        assert!(s.is_open(at(5, 10, 59))); // Saturday 05:59 local
        assert!(!s.is_open(at(5, 11, 0)));

        let s = sched(&["mon-fri 09:00-17:00"], minus5);
        assert!(!s.is_open(at(5, 1, 0))); // Friday 20:00 local
        assert!(s.is_open(at(0, 14, 0))); // Monday 09:00 local
        assert!(!s.is_open(at(0, 13, 59)));
    }

    #[test]
    fn always_is_always_open() {
        let s = Schedule::always();
        assert!(s.is_always());
        for t in [0.0, -1e9, MONDAY, at(5, 3, 0)] {
            assert!(s.is_open(t));
            assert_eq!(s.next_open(t), Some(t));
        }
    }

    #[test]
    fn next_open_finds_the_next_window_start() {
        let s = sched(&["22:00-06:00"], 0);
        assert_eq!(s.next_open(at(2, 12, 0)), Some(at(2, 22, 0)));
        assert_eq!(s.next_open(at(2, 23, 0)), Some(at(2, 23, 0)));
        assert_eq!(s.next_open(at(2, 6, 0)), Some(at(2, 22, 0)));

        let s = sched(&["sat,sun 00:00-24:00", "wed 10:00-11:00"], 0);
        assert_eq!(s.next_open(at(4, 12, 0)), Some(at(5, 0, 0)));
        assert_eq!(s.next_open(at(7, 0, 0)), Some(at(9, 10, 0)));
        assert_eq!(s.next_open(at(2, 11, 0)), Some(at(5, 0, 0)));

        // A week ahead, at an offset: Sunday 03:00 local at +02:00.
        let s = sched(&["sun 03:00-04:00"], 2 * 3_600);
        assert_eq!(s.next_open(at(6, 2, 0)), Some(at(13, 1, 0)));
        assert_eq!(s.next_open(at(6, 0, 59)), Some(at(6, 1, 0)));
        assert_eq!(s.next_open(f64::NAN), None);
    }

    #[test]
    fn utc_offsets_parse() {
        assert_eq!(parse_utc_offset("0"), Ok(0));
        assert_eq!(parse_utc_offset("Z"), Ok(0));
        assert_eq!(parse_utc_offset("+02:00"), Ok(7_200));
        assert_eq!(parse_utc_offset("-05:30"), Ok(-19_800));
        assert_eq!(parse_utc_offset("+0530"), Ok(19_800));
        assert_eq!(parse_utc_offset("-5"), Ok(-18_000));
        assert_eq!(parse_utc_offset(" 3 "), Ok(10_800));
        for bad in ["", "+", "+19:00", "+02:60", "two", "+02:00:00", "+123"] {
            let e = parse_utc_offset(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(format_rfc3339(0.0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(-1.0, 0), "1969-12-31T23:59:59Z");
        assert_eq!(format_rfc3339(MONDAY + 0.9, 0), "2024-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(MONDAY, 7_200), "2024-01-01T02:00:00+02:00");
        assert_eq!(format_rfc3339(MONDAY, -19_800), "2023-12-31T18:30:00-05:30");
        assert_eq!(format_rfc3339(951_782_400.0, 0), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(at(4, 22, 0), 0), "2024-01-05T22:00:00Z");
    }

    #[test]
    fn file_clock_reads_the_file_and_falls_back() {
        let path = std::env::temp_dir().join(format!("vstream-clock-{}", std::process::id()));
        std::fs::write(&path, " 1704067200.5\n").unwrap();
        let clock = FileClock::new(&path);
        assert_eq!(clock.now_unix(), 1_704_067_200.5);
        std::fs::write(&path, "86400").unwrap();
        assert_eq!(clock.now_unix(), 86_400.0);
        // Unparseable, then missing: the system time.
        std::fs::write(&path, "soon").unwrap();
        assert!((clock.now_unix() - system_now_unix()).abs() < 60.0);
        std::fs::remove_file(&path).unwrap();
        assert!((clock.now_unix() - system_now_unix()).abs() < 60.0);
        assert_eq!(clock.path(), path.as_path());
    }

    #[test]
    fn manual_clock_sleeps_by_advancing() {
        let clock = ManualClock::new(100.0);
        clock.sleep(Duration::from_millis(1_500));
        assert_eq!(clock.now_unix(), 101.5);
        clock.advance(0.5);
        assert_eq!(clock.monotonic_secs(), 102.0);
        clock.set(7.0);
        assert_eq!(clock.now_unix(), 7.0);
    }

    #[test]
    fn throttle_holds_the_rate_over_a_minute() {
        let clock = Arc::new(ManualClock::new(0.0));
        let rate = 10 * MIB;
        let t = Throttle::new(Some(rate), clock.clone());
        assert_eq!(t.burst(), Some(MIB));
        while clock.now_unix() < 60.0 {
            t.take(MIB);
            t.take(3 * MIB);
        }
        let elapsed = clock.now_unix();
        let expected = rate as f64 * 60.0;
        let passed = t.passed() as f64;
        assert!(
            (passed - expected).abs() <= expected * 0.01,
            "{passed} vs {expected}"
        );
        // Exactly: the rate over the time taken, plus the initial burst.
        assert!(
            (passed - (rate as f64 * elapsed + MIB as f64)).abs() < 1.0,
            "{passed} in {elapsed}s"
        );
    }

    #[test]
    fn throttle_lets_large_requests_through_in_debt() {
        let clock = Arc::new(ManualClock::new(0.0));
        let t = Throttle::new(Some(MIB), clock.clone());
        let burst = t.burst().unwrap();
        assert_eq!(burst, MIB / 10);
        t.take(10 * MIB);
        let want = (10 * MIB - burst) as f64 / MIB as f64;
        assert!(
            (clock.now_unix() - want).abs() < 1e-6,
            "{}",
            clock.now_unix()
        );
        // The bucket is now empty: the next byte waits.
        t.take(MIB);
        assert!((clock.now_unix() - want - 1.0).abs() < 1e-6);
        assert_eq!(t.passed(), 11 * MIB);
    }

    #[test]
    fn throttle_rate_changes() {
        let clock = Arc::new(ManualClock::new(0.0));
        let t = Throttle::new(None, clock.clone());
        assert_eq!((t.rate(), t.burst()), (None, None));
        t.take(u64::MAX / 2);
        assert_eq!(clock.now_unix(), 0.0);
        assert_eq!(t.passed(), u64::MAX / 2);

        let t = Throttle::new(Some(0), clock.clone());
        assert_eq!(t.rate(), None);
        t.set_rate(Some(MIB));
        assert_eq!(t.rate(), Some(MIB));
        t.take(MIB / 10 + MIB); // the burst, then a second's worth
        assert!((clock.now_unix() - 1.0).abs() < 1e-6);
        t.set_rate(Some(2 * MIB));
        t.take(2 * MIB);
        assert!((clock.now_unix() - 2.0).abs() < 1e-6);
        t.set_rate(None);
        t.take(100 * MIB);
        assert!((clock.now_unix() - 2.0).abs() < 1e-6);
    }

    #[test]
    fn unlimited_throttle_does_not_wait() {
        let t = Throttle::new(None, Arc::new(SystemClock));
        let start = Instant::now();
        for _ in 0..1_000 {
            t.take(1 << 30);
        }
        assert!(start.elapsed() < Duration::from_millis(500));
        assert_eq!(t.passed(), 1_000 << 30);
        t.take(0);
        assert_eq!(t.passed(), 1_000 << 30);
    }

    #[test]
    fn throttle_is_shared_fairly_by_threads_in_real_time() {
        let rate = 20 * MIB;
        let piece = 256 * 1024;
        let t = Arc::new(Throttle::new(Some(rate), Arc::new(SystemClock)));
        let start = Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    let mut mine = 0u64;
                    while start.elapsed() < Duration::from_millis(1_500) {
                        t.take(piece);
                        mine += piece;
                    }
                    mine
                })
            })
            .collect();
        let per_thread: Vec<u64> = threads.into_iter().map(|h| h.join().unwrap()).collect();
        let elapsed = start.elapsed().as_secs_f64();
        let total: u64 = per_thread.iter().sum();
        assert_eq!(total, t.passed());
        let expected = rate as f64 * elapsed + t.burst().unwrap() as f64;
        let total = total as f64;
        // Never faster than the rate; slower only by what a loaded machine
        // takes to run the threads (the simulated-clock test holds ±1%).
        assert!(
            total <= expected * 1.02 && total >= expected * 0.80,
            "{total} vs {expected} in {elapsed}s"
        );
        // Each thread got a fair share.
        for &mine in &per_thread {
            let share = mine as f64 / total;
            assert!((0.15..=0.35).contains(&share), "{per_thread:?}");
        }
    }
}
