//! The daemon's log on stderr, and the one place that makes client-supplied text safe in it.
//!
//! Paths, user names, agent strings and the error messages that echo them all come from the
//! network. Written raw, a path holding `\n` forges a whole log line (a fake `login failed`
//! that a fail2ban-style watcher acts on), an ESC sequence drives the admin's terminal, and a
//! 64 KiB path makes a 64 KiB line. Rather than trusting each of the daemon's log calls to
//! remember, the text format's field formatter ([`SafeFields`]) escapes and cuts every field
//! value and the message, and the JSON format ([`CappedJson`]) cuts every string value
//! (JSON escaping already keeps each event on one line).

use std::fmt::{self, Write as _};
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, format};
use tracing_subscriber::registry::LookupSpan;

/// Most bytes one field value (or the message) takes in a log line, escapes included; a
/// longer one is cut and ends with `…(N bytes)`, N being its original length. Every valid
/// user name fits; paths longer than this are rare, and the audit log keeps them whole.
pub const MAX_LOGGED_VALUE: usize = 512;

/// How `serve` writes its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (no colours or timestamps under the journal, which adds its own).
    Text,
    /// One JSON object per line.
    Json,
}

/// Sets up tracing to stderr; plain (no colour or time) under the journal, which adds its own.
/// The filter is `$XFERD_LOG` (default `info`).
pub fn init(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("XFERD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if format == LogFormat::Json {
        let _ = tracing_subscriber::fmt()
            .json()
            .event_format(CappedJson::default())
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
        return;
    }
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .fmt_fields(SafeFields)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!journal && std::io::stderr().is_terminal());
    let _ = if journal {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}

/// Characters that must never reach a text log raw: every control character (C0, DEL, C1:
/// newlines, ESC, ...), the Unicode line and paragraph separators, and the invisible format
/// characters that reorder or hide text on screen (bidi overrides, zero-width characters).
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// A `fmt::Write` sink that escapes unsafe characters as it goes and stops storing at a byte
/// budget, while still counting the input so the cut can say how long the value was.
struct Escaper {
    /// The escaped text so far.
    out: String,
    /// Most bytes `out` may hold (the cut marker comes on top).
    budget: usize,
    /// Bytes of input seen, kept or not.
    seen: usize,
    /// Whether something was left out.
    cut: bool,
    /// Escape `"` and `\` as well, for a value that will be quoted.
    quoting: bool,
}

impl Escaper {
    fn new(budget: usize, quoting: bool) -> Self {
        Escaper {
            out: String::new(),
            budget,
            seen: 0,
            cut: false,
            quoting,
        }
    }

    fn push(&mut self, c: char) {
        self.seen += c.len_utf8();
        if self.cut {
            return;
        }
        let mut buf = [0u8; 4];
        let escaped: std::borrow::Cow<'_, str> = match c {
            '\n' => "\\n".into(),
            '\r' => "\\r".into(),
            '\t' => "\\t".into(),
            '"' if self.quoting => "\\\"".into(),
            '\\' if self.quoting => "\\\\".into(),
            c if is_unsafe(c) => format!("\\u{{{:x}}}", c as u32).into(),
            c => (&*c.encode_utf8(&mut buf)).into(),
        };
        if self.out.len() + escaped.len() > self.budget {
            self.cut = true;
        } else {
            self.out.push_str(&escaped);
        }
    }

    /// The escaped text, with the cut marker if something was left out.
    fn finish(mut self) -> String {
        if self.cut {
            let _ = write!(self.out, "…({} bytes)", self.seen);
        }
        self.out
    }
}

impl fmt::Write for Escaper {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.chars().for_each(|c| self.push(c));
        Ok(())
    }
}

/// `value` made safe for a text log line: unsafe characters escaped, at most
/// [`MAX_LOGGED_VALUE`] bytes plus the cut marker.
pub fn escape(value: &str) -> String {
    let mut e = Escaper::new(MAX_LOGGED_VALUE, false);
    let _ = e.write_str(value);
    e.finish()
}

/// Formats a value for the text log: escaped and cut, and quoted (logfmt style) when it is
/// empty or holds a space or a quote, so a value can never pass for more `key=value` pairs.
fn text_value(value: &dyn fmt::Debug) -> String {
    let mut plain = Escaper::new(MAX_LOGGED_VALUE, false);
    let _ = write!(plain, "{value:?}");
    let plain = plain.finish();
    if !plain.is_empty() && !plain.contains([' ', '"']) {
        return plain;
    }
    let mut quoted = Escaper::new(MAX_LOGGED_VALUE, true);
    let _ = write!(quoted, "{value:?}");
    format!("\"{}\"", quoted.finish())
}

/// Whether `raw` can go into a text log line as it is, as a `key=value` value too: nothing
/// to escape, cut or quote (what nearly every value is).
fn plain_as_is(raw: &str, quotable: bool) -> bool {
    raw.len() <= MAX_LOGGED_VALUE
        && !raw.chars().any(is_unsafe)
        && !(quotable && (raw.is_empty() || raw.contains([' ', '"'])))
}

/// A `fmt::Write` sink that keeps what is written while it fits in [`MAX_LOGGED_VALUE`]
/// bytes, and past that only notes that it did not (the value then takes the escaper's way).
struct UpToCap<'a> {
    buf: &'a mut String,
    over: bool,
}

impl fmt::Write for UpToCap<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.buf.len() + s.len() > MAX_LOGGED_VALUE {
            self.over = true;
        }
        if !self.over {
            self.buf.push_str(s);
        }
        Ok(())
    }
}

/// The text log's field formatter: like tracing's default (`message key=value ...`), but every
/// value and the message go through [`Escaper`], so no caller can forget to.
#[derive(Debug, Clone, Copy, Default)]
pub struct SafeFields;

impl<'w> FormatFields<'w> for SafeFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = SafeVisitor {
            writer,
            first: true,
            result: Ok(()),
            scratch: String::new(),
        };
        fields.record(&mut v);
        v.result
    }
}

/// Writes one event's or span's fields through the escaper.
struct SafeVisitor<'w> {
    writer: Writer<'w>,
    /// No separating space before the first field.
    first: bool,
    /// The first write error, if any.
    result: fmt::Result,
    /// Where a value is formatted to see whether it can be written as it is; reused for every
    /// field of the event.
    scratch: String,
}

impl SafeVisitor<'_> {
    /// Writes `value`; `raw` is its text when that is already known and short, for the fast
    /// path (written as it is when nothing in it needs escaping, cutting or quoting).
    fn write(&mut self, field: &Field, raw: Option<&str>, value: &dyn fmt::Debug) {
        let name = field.name();
        // `log` crate records carry their metadata as fields; the formatter already shows it.
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let sep = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        let message = name == "message";
        if let Some(raw) = raw.filter(|r| plain_as_is(r, !message)) {
            self.result = if message {
                write!(self.writer, "{sep}{raw}")
            } else {
                let name = name.strip_prefix("r#").unwrap_or(name);
                write!(self.writer, "{sep}{name}={raw}")
            };
            return;
        }
        self.result = if message {
            let mut e = Escaper::new(MAX_LOGGED_VALUE, false);
            let _ = write!(e, "{value:?}");
            write!(self.writer, "{sep}{}", e.finish())
        } else {
            let name = name.strip_prefix("r#").unwrap_or(name);
            write!(self.writer, "{sep}{name}={}", text_value(value))
        };
    }
}

impl Visit for SafeVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // As a Display value: not wrapped in quotes and escaped twice.
        self.write(field, Some(value), &format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        let mut capped = UpToCap {
            buf: &mut buf,
            over: false,
        };
        let _ = write!(capped, "{value:?}");
        let raw = (!capped.over).then_some(buf.as_str());
        self.write(field, raw, value);
        self.scratch = buf;
    }
}

/// Cuts every string in a JSON value longer than [`MAX_LOGGED_VALUE`] bytes, with the same
/// marker as the text log.
fn cap_strings(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) if s.len() > MAX_LOGGED_VALUE => {
            let mut end = MAX_LOGGED_VALUE;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            *s = format!("{}…({} bytes)", &s[..end], s.len());
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(cap_strings),
        serde_json::Value::Object(o) => o.values_mut().for_each(cap_strings),
        _ => {}
    }
}

/// The JSON log's event format: tracing's own, except that a line long enough to hold an
/// over-long value is parsed back and every such string cut. Short lines (nearly all) pass
/// through untouched, so the cost is only paid where a client sent something huge.
#[derive(Debug)]
pub struct CappedJson {
    /// tracing's JSON format, which does the real work.
    inner: format::Format<format::Json>,
}

impl Default for CappedJson {
    fn default() -> Self {
        CappedJson {
            inner: format::format().json(),
        }
    }
}

impl<S, N> FormatEvent<S, N> for CappedJson
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        if line.len() > MAX_LOGGED_VALUE
            && let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&line)
        {
            cap_strings(&mut v);
            if let Ok(capped) = serde_json::to_string(&v) {
                return writeln!(writer, "{capped}");
            }
        }
        writer.write_str(&line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A log sink the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// What a hostile client would like the log to show: a second line that looks like a
    /// failed login from someone else, a terminal escape, and a lot of padding.
    fn hostile() -> String {
        format!(
            "x\n2026-01-01T00:00:00Z  WARN xferd::cmd::auth: login failed: wrong user name or password user=root peer=10.9.8.7:1\r\u{1b}[2J\u{2028}\u{202e}{}",
            "y".repeat(60_000)
        )
    }

    fn log_with(format: LogFormat, f: impl FnOnce()) -> String {
        let sink = Sink::default();
        let w = sink.clone();
        let make = move || w.clone();
        match format {
            LogFormat::Text => {
                let sub = tracing_subscriber::fmt()
                    .fmt_fields(SafeFields)
                    .with_ansi(false)
                    .with_writer(make)
                    .finish();
                tracing::subscriber::with_default(sub, f);
            }
            LogFormat::Json => {
                let sub = tracing_subscriber::fmt()
                    .json()
                    .event_format(CappedJson::default())
                    .with_writer(make)
                    .finish();
                tracing::subscriber::with_default(sub, f);
            }
        }
        sink.text()
    }

    #[test]
    fn text_log_values_cannot_forge_lines_or_escape_to_the_terminal() {
        let evil = hostile();
        let log = log_with(LogFormat::Text, || {
            let span = tracing::info_span!("conn", agent = %evil);
            let _g = span.enter();
            tracing::info!(path = %evil, user = evil.as_str(), debug = ?evil, "request failed: {evil}");
        });
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(!log.contains("\n2026"), "{log}");
        assert!(
            !log.contains(['\r', '\u{1b}', '\u{2028}', '\u{202e}']),
            "{log}"
        );
        // Each of the five copies is cut to the budget, and says how long it was.
        assert!(
            log.len() < 6 * (MAX_LOGGED_VALUE + 40),
            "{} bytes",
            log.len()
        );
        let marker = format!("…({} bytes)", evil.len());
        assert_eq!(log.matches(&marker).count(), 3, "{log}");
        assert_eq!(log.matches(" bytes)").count(), 5, "{log}");
        // Still readable: the escapes show what was sent.
        assert!(log.contains("x\\n2026-01-01"), "{log}");
        assert!(log.contains("\\u{1b}[2J"), "{log}");
    }

    #[test]
    fn text_log_values_with_spaces_are_quoted_so_they_cannot_pose_as_fields() {
        let log = log_with(LogFormat::Text, || {
            tracing::warn!(
                user = "x peer=10.9.8.7",
                peer = "127.0.0.1:5",
                empty = "",
                n = 3,
                "login failed"
            );
        });
        assert!(
            log.contains(r#"login failed user="x peer=10.9.8.7" peer=127.0.0.1:5 empty="" n=3"#),
            "{log}"
        );
        let log = log_with(LogFormat::Text, || {
            tracing::info!(path = %r#"a "b" \c"#, "done");
        });
        assert!(log.contains(r#"path="a \"b\" \\c""#), "{log}");
    }

    #[test]
    fn json_log_lines_are_valid_and_their_strings_cut() {
        let evil = hostile();
        let log = log_with(LogFormat::Json, || {
            tracing::info!(path = %evil, peer = "127.0.0.1:5", "request failed");
        });
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(log.len() < 2 * MAX_LOGGED_VALUE, "{} bytes", log.len());
        let v: serde_json::Value = serde_json::from_str(&log).unwrap();
        let path = v["fields"]["path"].as_str().unwrap();
        assert!(path.starts_with("x\n2026"), "{path}");
        assert!(
            path.ends_with(&format!("…({} bytes)", evil.len())),
            "{path}"
        );
        assert_eq!(v["fields"]["peer"], "127.0.0.1:5");
        assert_eq!(v["fields"]["message"], "request failed");
        // A short line is tracing's own, untouched.
        let log = log_with(LogFormat::Json, || tracing::info!(n = 1, "hi"));
        let v: serde_json::Value = serde_json::from_str(&log).unwrap();
        assert_eq!(v["fields"]["n"], 1);
    }

    #[test]
    fn escape_cuts_on_a_character_boundary() {
        let s = "é".repeat(MAX_LOGGED_VALUE);
        let e = escape(&s);
        assert!(e.len() <= MAX_LOGGED_VALUE + 20, "{}", e.len());
        assert!(e.ends_with(&format!("…({} bytes)", s.len())));
        assert_eq!(escape("plain/path.txt"), "plain/path.txt");
    }
}
