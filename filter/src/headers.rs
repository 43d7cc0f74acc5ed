//! The request headers the decision reads, taken from the host's header map as bytes.
//!
//! HTTP lets a header value carry any byte but CR, LF and NUL (obs-text), so the filter reads the
//! map through the SDK's bytes API: its string API unwraps `String::from_utf8` and one non-UTF-8
//! byte in any header would trap the VM. (The bytes API still decodes header *names* as UTF-8;
//! both hosts' HTTP codecs accept only token characters in names, which the hostile corpus
//! checks.) A header the filter reads must be UTF-8 without control characters, else the request
//! is refused with `InvalidHeader`; headers it does not read pass through untouched.
//!
//! An empty value counts as absent. Envoy merges repeated headers it keeps inline
//! (`x-forwarded-host`, `authorization`) into one comma-joined value and drops empty ones while
//! doing so, so treating empty values as absent is the only rule both hosts can apply alike;
//! non-empty repeats stay refused (in Envoy they arrive comma-joined, and a comma is refused).

use crate::error::Refusal;

/// The headers the decision reads, each validated before use.
const READ: [&str; 6] = [
    "x-forwarded-client-cert",
    "authorization",
    "x-forwarded-host",
    ":method",
    ":path",
    ":authority",
];

/// `value` without HTTP's optional whitespace (space and tab, RFC 9110 §5.6.3) at either end.
/// Only these: `str::trim` would also drop Unicode spaces such as U+00A0, which are part of
/// the value.
pub fn trim_ows(value: &str) -> &str {
    value.trim_matches([' ', '\t'])
}

/// The request headers the decision reads (all values of each).
#[derive(Debug, Default)]
pub struct RequestView<'a> {
    /// `x-forwarded-client-cert` values, as set by the host.
    pub xfcc: Vec<&'a str>,
    /// `authorization` values.
    pub authorization: Vec<&'a str>,
    /// `x-forwarded-host` values.
    pub forwarded_host: Vec<&'a str>,
    /// `:method`.
    pub method: &'a str,
    /// `:path`.
    pub path: &'a str,
}

/// Builds the decision's view of a request from the host's header pairs.
pub fn read(pairs: &[(String, Vec<u8>)]) -> Result<RequestView<'_>, Refusal> {
    let mut view = RequestView::default();
    for (name, value) in pairs {
        let Some(known) = READ.iter().find(|n| name.eq_ignore_ascii_case(n)) else {
            continue;
        };
        let value = text(known, value)?;
        if trim_ows(value).is_empty() {
            continue;
        }
        match *known {
            "x-forwarded-client-cert" => view.xfcc.push(value),
            "authorization" => view.authorization.push(value),
            "x-forwarded-host" => view.forwarded_host.push(value),
            ":method" if view.method.is_empty() => view.method = value,
            ":path" if view.path.is_empty() => view.path = value,
            _ => {}
        }
    }
    Ok(view)
}

/// The method and path of a request whose headers could not be read, lossily decoded, for its
/// audit line.
pub fn lossy_method_and_path(pairs: &[(String, Vec<u8>)]) -> (String, String) {
    let lossy = |wanted: &str| {
        pairs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(wanted))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    (lossy(":method"), lossy(":path"))
}

/// The value as text, or `InvalidHeader` naming the header (never its value: it may be a token).
fn text<'a>(name: &str, value: &'a [u8]) -> Result<&'a str, Refusal> {
    let value = std::str::from_utf8(value)
        .map_err(|_| Refusal::InvalidHeader(format!("the {name} header is not valid UTF-8")))?;
    if has_control(value.as_bytes()) {
        return Err(Refusal::InvalidHeader(format!(
            "the {name} header contains control characters"
        )));
    }
    Ok(value)
}

/// A control character: C0 but tab, and DEL. (C1 controls are two-byte UTF-8 sequences and
/// stay: HTTP allows obs-text, and no header the filter reads is parsed as such.)
fn is_control(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

/// Whether `bytes` has a [control character](is_control). Eight bytes at a time: the XFCC value
/// (~3 KB) is read on every request, and a byte-at-a-time scan was a visible share of it.
/// A word with no byte below 0x20 and none equal to 0x7f is skipped; any other word is checked
/// byte by byte (the word test may over-report, never under-report).
fn has_control(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const DELS: u64 = u64::from_ne_bytes([0x7f; 8]);
    // Some byte of `x` is below `n` (n <= 0x80): the classic "has less" word test.
    let has_below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGHS != 0;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(word);
        let x = u64::from_ne_bytes(eight);
        if (has_below(x, 0x20) || has_below(x ^ DELS, 1)) && word.iter().any(|&b| is_control(b)) {
            return true;
        }
    }
    words.remainder().iter().any(|&b| is_control(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    #[test]
    fn read_headers_are_collected_with_every_value() {
        let map = pairs(&[
            (":method", b"GET"),
            (":path", b"/x?y"),
            ("x-forwarded-host", b"management.azure.com"),
            ("Authorization", b"Bearer a"),
            ("authorization", b"Bearer b"),
            ("x-forwarded-client-cert", b"Cert=x"),
        ]);
        let view = read(&map).unwrap();
        assert_eq!(view.method, "GET");
        assert_eq!(view.path, "/x?y");
        assert_eq!(view.forwarded_host, ["management.azure.com"]);
        assert_eq!(view.authorization, ["Bearer a", "Bearer b"]);
        assert_eq!(view.xfcc, ["Cert=x"]);
    }

    #[test]
    fn non_utf8_or_control_bytes_in_a_read_header_are_refused_without_echoing_it() {
        for (name, value) in [
            ("authorization", &b"Bearer \xff"[..]),
            ("x-forwarded-host", b"management.azure.com\x01"),
            ("x-forwarded-client-cert", b"Cert=\x7f"),
            (":path", b"/\xc3("),
        ] {
            let err = read(&pairs(&[(name, value)])).unwrap_err();
            assert_eq!(err.code(), "InvalidHeader", "{name}");
            assert_eq!(err.status(), 400);
            assert!(err.message().contains(name));
            assert!(!err.message().contains("Bearer"));
        }
        // A tab is allowed (HTTP's whitespace).
        assert!(read(&pairs(&[("authorization", b"Bearer\ta")])).is_ok());
    }

    #[test]
    fn the_word_scan_finds_every_control_byte_at_every_place() {
        for len in [0usize, 1, 7, 8, 9, 15, 16, 17, 64, 3001] {
            let clean: Vec<u8> = (0..len).map(|i| b" a\t~\x80\xff"[i % 6]).collect();
            assert!(!has_control(&clean), "len {len}");
            let places: Vec<usize> = if len <= 64 {
                (0..len).collect()
            } else {
                vec![0, 1, 7, 8, len / 2, len - 9, len - 8, len - 2, len - 1]
            };
            for at in places {
                for byte in (0u8..=0xff).filter(|&b| is_control(b) || b == b'\t' || b >= 0x7e) {
                    let mut bytes = clean.clone();
                    bytes[at] = byte;
                    assert_eq!(
                        has_control(&bytes),
                        is_control(byte),
                        "len {len} at {at} byte {byte:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_bytes_in_headers_the_filter_does_not_read_are_ignored() {
        let map = pairs(&[("user-agent", b"\xff\x00\x01"), (":method", b"GET")]);
        assert_eq!(read(&map).unwrap().method, "GET");
    }

    #[test]
    fn empty_values_count_as_absent_as_envoy_merges_them() {
        let map = pairs(&[
            ("x-forwarded-host", b"management.azure.com"),
            ("x-forwarded-host", b""),
            ("authorization", b" "),
        ]);
        let view = read(&map).unwrap();
        assert_eq!(view.forwarded_host, ["management.azure.com"]);
        assert!(view.authorization.is_empty());
    }
}
