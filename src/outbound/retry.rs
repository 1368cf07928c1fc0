//! Retry decisions: a pure function of the Graph error (CLOUD_API.md §9.2,
//! SPEC §6), and the delay before the next attempt.

use std::time::Duration;

use super::graph::GraphError;

/// Whether an error may go away by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Transient,
    Permanent,
}

/// Graph codes that a later identical request may get past (RETRY in
/// CLOUD_API.md §9.2).
const TRANSIENT_CODES: &[i64] = &[
    1, 2, 4, 17, 341, 80007, 130429, 131000, 131016, 131056, 131057, 133004,
];

/// Graph codes that fail the message whatever the HTTP status says.
const PERMANENT_CODES: &[i64] = &[
    0, 3, 10, 100, 190, 368, 130472, 130497, 131005, 131008, 131009, 131021, 131026, 131031,
    131042, 131045, 131047, 131048, 131049, 131050, 131051, 131052, 131053, 131064, 132000, 132001,
    132005, 132007, 132012, 132015, 132016, 133010, 135000,
];

/// Classify by Graph code first (CLOUD_API.md: branch on `code`, not the
/// HTTP status); unknown codes fall back to HTTP: 408 (the server gave up
/// waiting for the request, so did not act on it), 429 and 5xx are
/// transient.
pub fn classify(e: &GraphError) -> Class {
    match e {
        GraphError::Transport { .. } => Class::Transient,
        GraphError::BadAnswer { .. } => Class::Permanent,
        GraphError::Status {
            http,
            code,
            transient_hint,
            ..
        } => {
            if let Some(code) = code {
                if TRANSIENT_CODES.contains(code) {
                    return Class::Transient;
                }
                if PERMANENT_CODES.contains(code) || (200..300).contains(code) {
                    return Class::Permanent;
                }
            }
            if *transient_hint || *http == 408 || *http == 429 || *http >= 500 {
                Class::Transient
            } else {
                Class::Permanent
            }
        }
    }
}

/// Graph codes by which Meta asks the whole number (or app) to slow down:
/// rate limits of the app (4), the WABA (80007) and the number's
/// throughput (130429). The pair rate limit (131056) slows one contact only.
const ACCOUNT_RATE_CODES: &[i64] = &[4, 80007, 130429];
const PAIR_RATE_CODE: i64 = 131056;
/// The number is in maintenance (e.g. its throughput upgrade), for up to a
/// minute by Meta's word: the whole account waits.
const MAINTENANCE_CODE: i64 = 131057;
/// The least wait after a maintenance answer, in `[sender] backoff`s (20 s
/// at the default 1 s): the default five attempts then span more than
/// Meta's minute of maintenance, and sends that had not started yet
/// spend none.
const MAINTENANCE_BACKOFFS: u32 = 20;

/// The least wait Meta asks for before the next attempt: its
/// `Retry-After`, or for a number in maintenance (131057)
/// [`MAINTENANCE_BACKOFFS`] × `backoff`.
pub fn least_wait(e: &GraphError, backoff: Duration) -> Option<Duration> {
    match e {
        GraphError::Status {
            retry_after: Some(ra),
            ..
        } => Some(*ra),
        GraphError::Status {
            code: Some(MAINTENANCE_CODE),
            ..
        } => Some(backoff.saturating_mul(MAINTENANCE_BACKOFFS)),
        _ => None,
    }
}

/// What a transient failure asks of the whole account (the failed message
/// itself always waits, first of its contact).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountLimit {
    /// Nothing: only that contact waits (server errors, timeouts, the pair
    /// rate limit 131056).
    None,
    /// Meta named a wait (`Retry-After`), or the number is in maintenance
    /// (131057): no send of the account starts before it ends.
    Pause,
    /// Meta's rate limit without a wait (HTTP 429, codes 4, 80007,
    /// 130429): the account's rate halves, then grows back.
    SlowDown,
}

/// How a transient failure limits the account (see [`AccountLimit`]).
pub fn account_limit(e: &GraphError) -> AccountLimit {
    match e {
        GraphError::Status {
            http,
            code,
            retry_after,
            ..
        } => match code {
            Some(PAIR_RATE_CODE) => AccountLimit::None,
            Some(MAINTENANCE_CODE) => AccountLimit::Pause,
            _ if retry_after.is_some() => AccountLimit::Pause,
            Some(c) if ACCOUNT_RATE_CODES.contains(c) => AccountLimit::SlowDown,
            _ if *http == 429 => AccountLimit::SlowDown,
            _ => AccountLimit::None,
        },
        _ => AccountLimit::None,
    }
}

/// The longest wait between attempts (SPEC §2: capped at 5 minutes).
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The longest `Retry-After` honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Delay before attempt `attempt + 1` after `attempt` failed: `base`
/// doubling per attempt plus up to 25 % jitter (`jitter` in 0..1), capped
/// at 5 minutes; never shorter than Meta's `Retry-After`.
pub fn delay(attempt: u32, base: Duration, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let jittered = exp
        .mul_f64(1.0 + 0.25 * jitter.clamp(0.0, 1.0))
        .min(MAX_BACKOFF);
    match retry_after {
        Some(ra) => jittered.max(ra.min(MAX_RETRY_AFTER)),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(http: u16, code: Option<i64>) -> GraphError {
        GraphError::Status {
            http,
            code,
            message: String::new(),
            retry_after: None,
            transient_hint: false,
        }
    }

    #[test]
    fn rate_limits_slow_the_account_a_named_wait_pauses_it_and_the_pair_limit_only_the_contact() {
        use AccountLimit as L;
        assert_eq!(account_limit(&status(400, Some(130429))), L::SlowDown);
        assert_eq!(account_limit(&status(429, None)), L::SlowDown);
        assert_eq!(account_limit(&status(400, Some(80007))), L::SlowDown);
        assert_eq!(account_limit(&status(400, Some(131056))), L::None);
        assert_eq!(account_limit(&status(429, Some(131056))), L::None);
        assert_eq!(account_limit(&status(503, None)), L::None);
        let with_retry_after = GraphError::Status {
            http: 503,
            code: None,
            message: String::new(),
            retry_after: Some(Duration::from_secs(2)),
            transient_hint: false,
        };
        assert_eq!(account_limit(&with_retry_after), L::Pause);
        let second = Duration::from_secs(1);
        assert_eq!(least_wait(&with_retry_after, second), Some(2 * second));
        // A number in maintenance: the account waits 20 backoffs.
        assert_eq!(account_limit(&status(500, Some(131057))), L::Pause);
        assert_eq!(
            least_wait(&status(500, Some(131057)), second),
            Some(20 * second)
        );
        assert_eq!(least_wait(&status(503, None), second), None);
        let transport = GraphError::Transport {
            message: "refused".into(),
        };
        assert_eq!(account_limit(&transport), L::None);
    }

    #[test]
    fn classification_table() {
        let table = [
            (status(429, None), Class::Transient),
            (status(500, None), Class::Transient),
            (status(408, None), Class::Transient),
            (status(503, Some(133004)), Class::Transient),
            (status(400, Some(130429)), Class::Transient),
            (status(400, Some(131056)), Class::Transient),
            (status(400, Some(4)), Class::Transient),
            (status(400, Some(80007)), Class::Transient),
            (status(500, Some(131000)), Class::Transient),
            (status(400, Some(131026)), Class::Permanent),
            (status(400, Some(131047)), Class::Permanent),
            (status(400, Some(100)), Class::Permanent),
            (status(401, Some(190)), Class::Permanent),
            (status(500, Some(131045)), Class::Permanent),
            (status(400, None), Class::Permanent),
            (status(502, Some(999_999)), Class::Transient),
            (
                GraphError::Transport {
                    message: "timed out".into(),
                },
                Class::Transient,
            ),
            (
                GraphError::BadAnswer {
                    message: String::new(),
                },
                Class::Permanent,
            ),
        ];
        for (err, want) in table {
            assert_eq!(classify(&err), want, "{err:?}");
        }
    }

    #[test]
    fn delays_double_with_jitter_and_cap() {
        let base = Duration::from_secs(1);
        assert_eq!(delay(1, base, None, 0.0), Duration::from_secs(1));
        assert_eq!(delay(2, base, None, 0.0), Duration::from_secs(2));
        assert_eq!(delay(3, base, None, 1.0), Duration::from_secs(5));
        assert_eq!(delay(30, base, None, 1.0), MAX_BACKOFF);
        assert_eq!(
            delay(1, base, Some(Duration::from_secs(7)), 0.0),
            Duration::from_secs(7)
        );
        assert_eq!(
            delay(1, base, Some(Duration::from_secs(99_999)), 0.0),
            MAX_RETRY_AFTER
        );
    }
}
