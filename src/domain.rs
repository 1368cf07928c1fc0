//! Small domain types and parsers shared by every module: contact numbers,
//! ids with visible prefixes, durations, sizes, time stamps and source
//! positions. Nothing here does I/O.

use std::fmt;
use std::time::Duration;

/// Unix time in milliseconds.
pub type Millis = i64;

/// The current unix time in milliseconds.
pub fn now_ms() -> Millis {
    jiff::Timestamp::now().as_millisecond()
}

/// RFC 3339 (UTC, `Z`) rendering of a unix time in milliseconds.
pub fn rfc3339(ms: Millis) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => t.to_string(),
        Err(_) => String::new(),
    }
}

/// Parse an RFC 3339 time stamp into unix milliseconds.
pub fn parse_rfc3339(text: &str) -> Option<Millis> {
    text.parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
}

/// A secret string (token, app secret, API key) whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Parse a phone number given as E.164 (`+` optional; spaces, `-`, `.`, `(`,
/// `)` allowed as separators) into WhatsApp's digits-only form.
///
/// E.164 allows at most 15 digits and no leading zero; we require at least 7.
pub fn parse_phone(input: &str) -> Option<String> {
    let trimmed = input.trim();
    let rest = trimmed.strip_prefix('+').unwrap_or(trimmed);
    let mut digits = String::with_capacity(rest.len());
    for c in rest.chars() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' | '-' | '.' | '(' | ')' => {}
            _ => return None,
        }
    }
    if !(7..=15).contains(&digits.len()) || digits.starts_with('0') {
        return None;
    }
    Some(digits)
}

/// Largest `metadata` of an API send (its JSON text), kept on the record
/// for the whole retention and carried by every status event.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Largest total of a conversation's `vars` (names and values).
pub const MAX_VARS_BYTES: usize = 16 * 1024;

/// Bytes `vars` take for [`MAX_VARS_BYTES`].
pub fn vars_bytes<'a>(vars: impl IntoIterator<Item = (&'a String, &'a String)>) -> usize {
    vars.into_iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// An id `PREFIX_<UUID v7>` derived from `key`: the same key always gives
/// the same id, and its time part is `ms`, so ids still sort by time (rule
/// replies, [`crate::ids::MessageId::derived`]; event ids).
pub fn derived_id(prefix: &str, ms: Millis, key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let mut bytes = [0u8; 10];
    bytes.copy_from_slice(&digest[..10]);
    let id = uuid::Builder::from_unix_timestamp_millis(ms.max(0) as u64, &bytes).into_uuid();
    format!("{prefix}_{}", id.simple())
}

/// Where intake waits while the router is behind, in arrival order: the
/// first waiter polls `busy()` every 2 ms and the others queue behind it
/// (a fair lock), so a request is never passed by later ones, and the
/// machine polls once, not once per waiting request.
#[derive(Debug, Default)]
pub struct Gate {
    turn: tokio::sync::Mutex<()>,
    /// Requests in the queue (the one polling included).
    waiting: std::sync::atomic::AtomicUsize,
}

impl Gate {
    /// Wait, at most `limit`, while `busy()` holds or earlier requests
    /// wait: how intake slows down to what the router behind it can take.
    /// Whether it had to wait at all.
    pub async fn wait_while(&self, limit: Duration, busy: impl Fn() -> bool) -> bool {
        use std::sync::atomic::Ordering;
        if self.waiting.load(Ordering::Acquire) == 0 && !busy() {
            return false;
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        // Leaves the count on every way out (a dropped request included).
        struct Queued<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Queued<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _queued = Queued(&self.waiting);
        let deadline = tokio::time::Instant::now() + limit;
        // Out of time in the queue: taken anyway, as after polling.
        let Ok(_turn) = tokio::time::timeout_at(deadline, self.turn.lock()).await else {
            return true;
        };
        while busy() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Parse a duration such as `"200ms"`, `"10s"`, `"5m"`, `"36h"`, `"7d"`.
/// Several parts may be joined (`"1h30m"`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let bad = || {
        format!("invalid duration {text:?}: use a number and a unit (ms, s, m, h, d), e.g. \"10s\"")
    };
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let number: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = rest[..unit_len].trim();
        rest = &rest[unit_len..];
        let seconds = match unit {
            "ms" => number / 1000.0,
            "s" => number,
            "m" => number * 60.0,
            "h" => number * 3600.0,
            "d" => number * 86400.0,
            _ => return Err(bad()),
        };
        let part = Duration::try_from_secs_f64(seconds).map_err(|_| bad())?;
        total = total.checked_add(part).ok_or_else(bad)?;
    }
    Ok(total)
}

/// Render a duration the way configuration files write it (`"10s"`, `"200ms"`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(86_400_000) && ms > 0 {
        format!("{}d", ms / 86_400_000)
    } else if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Parse a size such as `"3MB"`, `"512KB"` or a plain byte count
/// (KB = 1024 bytes, MB = 1024 KB).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let s = text.trim();
    let bad =
        || format!("invalid size {text:?}: use a number and a unit (B, KB, MB), e.g. \"3MB\"");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let number: usize = s[..split].parse().map_err(|_| bad())?;
    let factor = match s[split..].trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" | "K" | "KIB" => 1024,
        "MB" | "M" | "MIB" => 1024 * 1024,
        _ => return Err(bad()),
    };
    number.checked_mul(factor).ok_or_else(bad)
}

/// 1-based line and column (in characters) of a byte offset in `source`.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..floor_char_boundary(source, offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// An error located in a file: printed as `FILE:LINE:COL: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{col}: {message}")]
pub struct Located {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl Located {
    /// Locate `message` at byte `offset` of `source` (the text of `file`).
    pub fn at(file: &str, source: &str, offset: usize, message: impl Into<String>) -> Self {
        let (line, col) = line_col(source, offset);
        Located {
            file: file.to_string(),
            line,
            col,
            message: message.into(),
        }
    }
}

/// Text as the rules compare it: trimmed, lower-cased, inner white space
/// collapsed to one space.
pub fn normalize_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        for c in word.chars() {
            out.extend(c.to_lowercase());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_gate_lets_waiters_through_in_arrival_order() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let gate = Arc::new(Gate::default());
        let busy = Arc::new(AtomicBool::new(true));
        let passed = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let arrive = |i: usize| {
            let (gate, busy, passed) = (gate.clone(), busy.clone(), passed.clone());
            tokio::spawn(async move {
                let waited = gate
                    .wait_while(Duration::from_secs(30), || busy.load(Ordering::SeqCst))
                    .await;
                passed.lock().push((i, waited));
            })
        };
        let mut requests = Vec::new();
        for i in 0..4 {
            requests.push(arrive(i));
            while gate.waiting() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        // The router caught up; one more arrives before the queue moved:
        // it goes behind the four, not ahead of them.
        busy.store(false, Ordering::SeqCst);
        requests.push(arrive(4));
        for r in requests {
            r.await.unwrap();
        }
        assert_eq!(
            *passed.lock(),
            vec![(0, true), (1, true), (2, true), (3, true), (4, true)]
        );
        assert_eq!(gate.waiting(), 0);
        // Nobody waiting and not behind: straight through.
        assert!(!gate.wait_while(Duration::from_secs(30), || false).await);
    }

    #[tokio::test]
    async fn the_gate_lets_everyone_through_after_the_limit() {
        let gate = std::sync::Arc::new(Gate::default());
        let limit = Duration::from_millis(30);
        let started = tokio::time::Instant::now();
        let second = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.wait_while(limit, || true).await })
        };
        // The first polls; the second waits its turn and gives up in the queue.
        assert!(gate.wait_while(limit, || true).await);
        assert!(second.await.unwrap());
        assert!(started.elapsed() >= limit);
        assert_eq!(gate.waiting(), 0);
    }

    #[test]
    fn phones_parse_to_digits() {
        assert_eq!(
            parse_phone("+1 (631) 555-1181").as_deref(),
            Some("16315551181")
        );
        assert_eq!(parse_phone("447700900123").as_deref(), Some("447700900123"));
        assert_eq!(parse_phone("not-a-phone"), None);
        assert_eq!(parse_phone("+1-631-CALL-NOW"), None);
        assert_eq!(parse_phone("+0123456789"), None);
        assert_eq!(parse_phone("+12345"), None);
        assert_eq!(parse_phone("+1234567890123456"), None);
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(
            parse_duration("36h").unwrap(),
            Duration::from_secs(36 * 3600)
        );
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        // Found by fuzzing (fuzz/regressions/api_body/parse_duration_sum_overflow):
        // parts that overflow when added used to panic.
        let overflow = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fuzz/regressions/api_body/parse_duration_sum_overflow"
        ))
        .unwrap();
        assert!(parse_duration(&overflow).is_err());
        for bad in [
            "",
            "10",
            "s",
            "10x",
            "-1s",
            "ten seconds",
            "18000000000000000000s18000000000000000000s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should not parse");
        }
        assert_eq!(format_duration(Duration::from_millis(200)), "200ms");
        assert_eq!(format_duration(Duration::from_secs(10)), "10s");
        assert_eq!(format_duration(Duration::from_secs(86400)), "1d");
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("3MB").unwrap(), 3 * 1024 * 1024);
        assert_eq!(parse_size("512KB").unwrap(), 512 * 1024);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("3GB").is_err());
        assert!(parse_size("MB").is_err());
    }

    #[test]
    fn line_col_counts_characters() {
        let src = "a = 1\nbé = 'x'\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        assert_eq!(line_col(src, src.find('\'').unwrap()), (2, 6));
    }

    #[test]
    fn text_is_normalized() {
        assert_eq!(normalize_text("  Hello \t  World "), "hello world");
        assert_eq!(normalize_text("STOP"), "stop");
    }

    #[test]
    fn rfc3339_round_trips() {
        let ms = 1_795_000_000_123;
        assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
    }
}

/// A rule-file value that may be written as one string or a list of strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Strings(pub Vec<String>);

impl<'de> serde::Deserialize<'de> for Strings {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Strings;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Strings, E> {
                Ok(Strings(vec![v.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Strings, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(Strings(out))
            }
        }
        d.deserialize_any(V)
    }
}
