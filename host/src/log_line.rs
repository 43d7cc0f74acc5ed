//! The format of one log line: `<RFC 3339 time> <LEVEL> <target>: <message> key=value ...`,
//! the layout of tracing-subscriber's default format, written with one escape rule of our own.
//!
//! Log text is not ours: a filter's `proxy_log` messages, error texts quoting a peer. So every
//! control character but tab (C0, DEL, C1) is written escaped (`\n`, `\x1b`, `\u{85}`): no
//! message can move the terminal's cursor or colours, nor start a line of its own that a log
//! reader would take for another event. tracing-subscriber's own guard covers fewer characters
//! (not CR and LF) and writes every message one `char` at a time through a `dyn Write`; here a
//! clean message, which is nearly every one (an audit line is JSON), is checked in one pass over
//! its bytes and written whole.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter of every `azgate` command (see the module doc).
#[derive(Clone, Copy, Debug, Default)]
pub struct LineFormat;

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let ansi = writer.has_ansi_escapes();
        if ansi {
            writer.write_str("\x1b[2m")?;
        }
        SystemTime.format_time(&mut writer)?;
        if ansi {
            let colour = match *metadata.level() {
                Level::TRACE => "35",
                Level::DEBUG => "34",
                Level::INFO => "32",
                Level::WARN => "33",
                Level::ERROR => "31",
            };
            write!(
                writer,
                "\x1b[0m \x1b[{colour}m{:>5}\x1b[0m ",
                metadata.level()
            )?;
        } else {
            write!(writer, " {:>5} ", metadata.level())?;
        }
        write_escaped(&mut writer, metadata.target())?;
        writer.write_str(":")?;
        let mut fields = Fields {
            writer: &mut writer,
            scratch: String::new(),
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_char('\n')
    }
}

/// Writes an event's fields: the message as it is, the others as ` key=value` (strings in
/// their `Debug` form, quoted), all escaped.
struct Fields<'w, 'a> {
    writer: &'w mut Writer<'a>,
    /// Where a non-string value is formatted before it is escaped (reused across fields).
    scratch: String,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn field(&mut self, field: &Field, value: &str) -> fmt::Result {
        if field.name() == "message" {
            self.writer.write_char(' ')?;
        } else {
            write!(self.writer, " {}=", field.name())?;
        }
        write_escaped(self.writer, value)
    }

    /// `value` formatted into the scratch buffer, then written as [`Fields::field`] does.
    fn record_formatted(&mut self, field: &Field, value: fmt::Arguments<'_>) -> fmt::Result {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let formatted = scratch.write_fmt(value);
        let written = formatted.and_then(|()| self.field(field, &scratch));
        self.scratch = scratch;
        written
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        self.result = if field.name() == "message" {
            self.field(field, value)
        } else {
            self.record_formatted(field, format_args!("{value:?}"))
        };
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        self.result = self.record_formatted(field, format_args!("{value:?}"));
    }
}

/// Whether `text` has a character [`write_escaped`] escapes: C0 but tab, DEL, or C1 (in UTF-8,
/// 0xC2 followed by 0x80..=0x9F).
fn needs_escaping(text: &str) -> bool {
    let mut previous = 0u8;
    for &byte in text.as_bytes() {
        if (byte < 0x20 && byte != b'\t') || byte == 0x7f || (previous == 0xc2 && byte < 0xa0) {
            return true;
        }
        previous = byte;
    }
    false
}

/// Writes `text` with every control character but tab escaped: `\n`, `\r` and `\\x..` for C0
/// and DEL, `\u{..}` for C1 (as tracing-subscriber writes those).
fn write_escaped(writer: &mut impl fmt::Write, text: &str) -> fmt::Result {
    if !needs_escaping(text) {
        return writer.write_str(text);
    }
    let mut clean_from = 0;
    for (at, ch) in text.char_indices() {
        let escaped = match ch {
            '\t' => continue,
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            '\0'..='\x1f' | '\x7f' | '\u{80}'..='\u{9f}' => None,
            _ => continue,
        };
        writer.write_str(&text[clean_from..at])?;
        match escaped {
            Some(escape) => writer.write_str(escape)?,
            None if ch <= '\x7f' => write!(writer, "\\x{:02x}", ch as u32)?,
            None => write!(writer, "\\u{{{:x}}}", ch as u32)?,
        }
        clean_from = at + ch.len_utf8();
    }
    writer.write_str(&text[clean_from..])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::sync::{Arc, Mutex};

    use super::*;

    fn escaped(text: &str) -> String {
        let mut out = String::new();
        write_escaped(&mut out, text).unwrap();
        out
    }

    #[test]
    fn clean_text_is_written_as_it_is() {
        for text in [
            "",
            "{\"event\":\"azgate.request\",\"user\":\"al\\u001bice\"}",
            "tab\there, é, ü, 漢字, U+00A0:\u{a0}, U+2028:\u{2028}",
        ] {
            assert!(!needs_escaping(text), "{text:?}");
            assert_eq!(escaped(text), text);
        }
    }

    #[test]
    fn every_control_character_but_tab_is_escaped() {
        assert_eq!(escaped("a\nb\rc"), "a\\nb\\rc");
        assert_eq!(escaped("\x1b[31mred\x1b[0m"), "\\x1b[31mred\\x1b[0m");
        assert_eq!(escaped("\x00\x07\x08\x0c\x7f"), "\\x00\\x07\\x08\\x0c\\x7f");
        assert_eq!(
            escaped("c1:\u{85}\u{9b}\u{9f}."),
            "c1:\\u{85}\\u{9b}\\u{9f}."
        );
        // The neighbours of C1 in UTF-8 (0xC2 0xA0 is U+00A0; 0xC3 0x80 is U+00C0) stay.
        assert_eq!(escaped("\u{a0}\u{c0}\u{7e}"), "\u{a0}\u{c0}~");
        // Every character: the fast check agrees with the escaping.
        for code in (0u32..0x3000).chain([0xfeff, 0x10ffff]) {
            let Some(ch) = char::from_u32(code) else {
                continue;
            };
            let text = format!("x{ch}y");
            let control = (ch < ' ' && ch != '\t') || ('\x7f'..='\u{9f}').contains(&ch);
            assert_eq!(needs_escaping(&text), control, "{code:#x}");
            assert_eq!(escaped(&text) != text, control, "{code:#x}");
        }
    }

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(ansi: bool, log: impl FnOnce()) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(ansi)
            .with_max_level(Level::TRACE)
            .with_writer(move || writer.clone())
            .event_format(LineFormat)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn a_line_has_time_level_target_message_and_fields() {
        let line = logged(false, || {
            tracing::info!(target: "wasm", plugin = "azgate", "{}", "{\"event\":\"x\"}");
        });
        let (time, rest) = line.split_once(' ').unwrap();
        assert!(time.ends_with('Z') && time.contains('T'), "{line:?}");
        assert_eq!(rest, " INFO wasm: {\"event\":\"x\"} plugin=\"azgate\"\n");
        let line = logged(false, || {
            tracing::warn!(error = %"bad\nline", code = 7, ok = true, "it failed");
        });
        assert!(
            line.ends_with(
                " WARN azgate::log_line::tests: it failed error=bad\\nline code=7 ok=true\n"
            ),
            "{line:?}"
        );
    }

    #[test]
    fn a_message_cannot_forge_a_line_or_drive_the_terminal() {
        let line = logged(false, || {
            tracing::info!(target: "wasm", "{}", "ok\n2026-01-01T00:00:00Z  INFO forged\x1b]0;title\x07");
        });
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
        assert!(!line.contains('\x1b') && !line.contains('\x07'), "{line:?}");
        assert!(line.contains("ok\\n2026-01-01T00:00:00Z  INFO forged\\x1b]0;title\\x07"));
        let value = logged(false, || tracing::info!(peer = "\u{9b}31m", "x"));
        assert!(value.contains("peer=\"\\u{9b}31m\""), "{value:?}");
    }

    #[test]
    fn on_a_terminal_only_the_level_and_time_are_coloured() {
        let line = logged(true, || tracing::error!("\x1b[2J"));
        assert!(line.contains("\x1b[31mERROR\x1b[0m"), "{line:?}");
        assert!(line.ends_with(": \\x1b[2J\n"), "{line:?}");
    }
}
