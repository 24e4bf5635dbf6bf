//! The fields of text log lines, with control characters escaped.
//!
//! Many logged values come from outside: NBD export names, MAC addresses in
//! login requests, URLs, peer names, error texts quoting them. The default
//! text formatter writes a `%value` field and the message as they are, so a
//! client could put a newline in an export name and write a log line of its
//! own choosing. [`EscapedFields`] formats every field, the message included,
//! like the default formatter does, except that each control character (C0,
//! DEL, C1), the Unicode line and paragraph separators and the bidirectional
//! overrides are written as escapes: `\n`, `\r`, `\t`, else `\u{1b}` and so
//! on. One event is then always one line. The JSON format needs none of this:
//! serde_json escapes the control characters that could end a line.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::Writer;

/// The text format's [`FormatFields`](tracing_subscriber::fmt::FormatFields):
/// [`tracing_subscriber::fmt::format::DefaultFields`] with escaping.
#[derive(Debug, Default, Clone, Copy)]
pub struct EscapedFields;

impl<'a> MakeVisitor<Writer<'a>> for EscapedFields {
    type Visitor = EscapedVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> EscapedVisitor<'a> {
        EscapedVisitor {
            writer,
            empty: true,
            result: Ok(()),
        }
    }
}

/// True for a character that must not reach a log line as it is.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// A [`fmt::Write`] that escapes what [`needs_escape`] picks.
struct Escaping<'w>(&'w mut dyn Write);

impl Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(needs_escape) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// The visitor of [`EscapedFields`]: `message name=value name=value`.
pub struct EscapedVisitor<'a> {
    writer: Writer<'a>,
    empty: bool,
    result: fmt::Result,
}

impl EscapedVisitor<'_> {
    /// Writes one field: the message bare, others as `name=value`, the value
    /// rendered by `value` and escaped.
    fn field(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        // The `log` crate's metadata, already shown as the target.
        if name.starts_with("log.") {
            return;
        }
        let ansi = self.writer.has_ansi_escapes();
        self.result = (|| {
            if !std::mem::take(&mut self.empty) {
                self.writer.write_char(' ')?;
            }
            if name != "message" {
                let name = name.strip_prefix("r#").unwrap_or(name);
                if ansi {
                    write!(self.writer, "\x1b[3m{name}\x1b[0m\x1b[2m=\x1b[0m")?;
                } else {
                    write!(self.writer, "{name}=")?;
                }
            }
            Escaping(&mut self.writer).write_fmt(value)
        })();
    }
}

impl Visit for EscapedVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.field(field, format_args!("{value}"));
        } else {
            self.field(field, format_args!("{value:?}"));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        match value.source() {
            None => self.field(field, format_args!("{value}")),
            Some(first) => {
                let mut sources = vec![first.to_string()];
                let mut next = first.source();
                while let Some(e) = next {
                    sources.push(e.to_string());
                    next = e.source();
                }
                let name = field.name();
                self.field(
                    field,
                    format_args!("{value} {name}.sources=[{}]", sources.join(", ")),
                );
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, format_args!("{value:?}"));
    }
}

impl VisitOutput<fmt::Result> for EscapedVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for EscapedVisitor<'_> {
    fn writer(&mut self) -> &mut dyn Write {
        &mut self.writer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Everything logged inside `f`, in the text format with [`EscapedFields`].
    fn logged(ansi: bool, f: impl FnOnce()) -> String {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(EscapedFields)
            .with_ansi(ansi)
            .without_time()
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = out.lock().expect("log buffer").clone();
        String::from_utf8(bytes).expect("UTF-8 log")
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[derive(Debug)]
    struct Outer(String);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&Inner)
        }
    }
    #[derive(Debug)]
    struct Inner;
    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("inner\nFORGED")
        }
    }
    impl std::error::Error for Inner {}

    #[test]
    fn every_field_from_outside_stays_on_its_line() {
        let hostile = "x\nFORGED line\r\t\x1b[31m\x7f\u{9b}\u{2028}\u{202e}y";
        let err = Outer("outer\nFORGED".into());
        let text = logged(false, || {
            let span = tracing::info_span!("conn", peer = %hostile);
            let _in = span.enter();
            tracing::info!(
                display = %hostile,
                debug = ?hostile,
                plain = hostile,
                error = &err as &(dyn std::error::Error + 'static),
                r#type = 1,
                "message {hostile}"
            );
        });
        assert_eq!(text.lines().count(), 1, "one event, one line: {text:?}");
        assert!(
            !text.trim_end().contains(|c: char| needs_escape(c)),
            "{text:?}"
        );
        let line = text.trim_end();
        assert!(
            line.contains(r"message x\nFORGED line\r\t\u{1b}[31m\u{7f}\u{9b}\u{2028}\u{202e}y"),
            "{line}"
        );
        assert!(line.contains(r"display=x\nFORGED line\r\t\u{1b}"), "{line}");
        assert!(
            line.contains(r#"plain="x\nFORGED line\r\t\u{1b}"#),
            "{line}"
        );
        assert!(line.contains(r#"debug="x\nFORGED"#), "{line}");
        assert!(line.contains(r"conn{peer=x\nFORGED line"), "{line}");
        assert!(
            line.contains(r"error=outer\nFORGED error.sources=[inner\nFORGED]"),
            "{line}"
        );
        assert!(line.contains(" type=1"), "{line}");
    }

    #[test]
    fn plain_fields_look_as_before() {
        let text = logged(false, || {
            tracing::info!(peer = %"127.0.0.1:5", n = 3, name = "v", "export refused");
        });
        assert!(
            text.trim_end()
                .ends_with(r#"export refused peer=127.0.0.1:5 n=3 name="v""#),
            "{text:?}"
        );
        // With colours, the names are styled; values are still escaped.
        let text = logged(true, || tracing::info!(v = %"a\nb", "m"));
        assert_eq!(text.lines().count(), 1, "{text:?}");
        assert!(
            text.contains("\x1b[3mv\x1b[0m\x1b[2m=\x1b[0ma\\nb"),
            "{text:?}"
        );
    }
}
