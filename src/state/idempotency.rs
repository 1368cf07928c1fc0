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
