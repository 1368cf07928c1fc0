//! API idempotency keys (SPEC §7): the same key and body get the stored
//! answer for 24 hours; another body with the key is a conflict.

use std::sync::atomic::Ordering;

use super::State;
use super::ops::StateOp;
use crate::domain::Millis;

/// A stored answer to a request with an idempotency key.
#[derive(Debug, Clone)]
pub(super) struct Idempotent {
    pub(super) fingerprint: [u8; 32],
    pub(super) answer: serde_json::Value,
    pub(super) at: Millis,
}

/// How long idempotency keys are remembered.
pub const IDEMPOTENCY_TTL_MS: Millis = 24 * 3600 * 1000;

/// What an idempotent request came to.
#[derive(Debug)]
pub enum IdempotencyOutcome<E> {
    /// First time: the answer was produced and stored.
    Done(serde_json::Value),
    /// Same key, same body: the stored answer.
    Replayed(serde_json::Value),
    /// Same key, another body.
    Conflict,
    /// The request failed; nothing was stored, the key may be used again.
    Failed(E),
}

/// SHA-256 of a JSON value's canonical (sorted-key) serialisation.
pub fn fingerprint(v: &serde_json::Value) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(serde_json::to_vec(v).unwrap_or_default()).into()
}

impl State {
    /// Whether an answer is stored for idempotency `key`.
    pub fn knows_idempotency_key(&self, key: &str) -> bool {
        self.idempotency.contains_key(key)
    }

    /// Run `f` once per idempotency `key` (SPEC §7): a repeat with the same
    /// fingerprint gets the stored answer, another fingerprint a conflict.
    pub fn idempotent<E>(
        &self,
        key: &str,
        fp: [u8; 32],
        now: Millis,
        f: impl FnOnce() -> Result<serde_json::Value, E>,
    ) -> IdempotencyOutcome<E> {
        use dashmap::mapref::entry::Entry;
        let outcome = match self.idempotency.entry(key.to_string()) {
            Entry::Occupied(e) if now - e.get().at < IDEMPOTENCY_TTL_MS => {
                return if e.get().fingerprint == fp {
                    IdempotencyOutcome::Replayed(e.get().answer.clone())
                } else {
                    IdempotencyOutcome::Conflict
                };
            }
            entry => match f() {
                Ok(answer) => {
                    let stored = Idempotent {
                        fingerprint: fp,
                        answer: answer.clone(),
                        at: now,
                    };
                    self.log(|| StateOp::Idempotency {
                        key: key.to_string(),
                        fingerprint: hex::encode(fp),
                        answer: answer.clone(),
                        at: now,
                    });
                    match entry {
                        Entry::Occupied(mut e) => {
                            e.insert(stored);
                        }
                        Entry::Vacant(e) => {
                            e.insert(stored);
                        }
                    }
                    IdempotencyOutcome::Done(answer)
                }
                Err(e) => IdempotencyOutcome::Failed(e),
            },
        };
        if self.idempotency_inserts.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            self.idempotency
                .retain(|_, v| now - v.at < IDEMPOTENCY_TTL_MS);
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn same_key_same_body_replays_another_body_conflicts_and_failures_are_not_kept() {
        let s = State::for_test();
        let body = json!({ "to": "1", "text": "hi" });
        let fp = fingerprint(&body);
        let run = |n: u32| move || Ok::<_, ()>(json!({ "id": n }));
        assert!(
            matches!(s.idempotent("k", fp, 0, run(1)), IdempotencyOutcome::Done(v) if v["id"] == 1)
        );
        assert!(
            matches!(s.idempotent("k", fp, 5, run(2)), IdempotencyOutcome::Replayed(v) if v["id"] == 1)
        );
        let other = fingerprint(&json!({ "to": "2" }));
        assert!(matches!(
            s.idempotent("k", other, 5, run(3)),
            IdempotencyOutcome::Conflict
        ));
        // After the TTL the key is free again.
        assert!(matches!(
            s.idempotent("k", other, IDEMPOTENCY_TTL_MS + 1, run(4)),
            IdempotencyOutcome::Done(_)
        ));
        // A failed request stores nothing: the same key may be used again.
        assert!(matches!(
            s.idempotent("f", fp, 0, || Err::<serde_json::Value, _>("no")),
            IdempotencyOutcome::Failed("no")
        ));
        assert!(matches!(
            s.idempotent("f", fp, 0, run(5)),
            IdempotencyOutcome::Done(_)
        ));
    }
}
