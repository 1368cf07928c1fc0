//! Events to targets (SPEC §8): `message.received` and `message.status`
//! POSTed as signed JSON to each configured target.
//!
//! Delivery is asynchronous and at-least-once: every target has its own
//! queue and worker, so a slow or dead target never delays the webhook ack,
//! the rules, the sender or other targets. A failed delivery (non-2xx,
//! timeout, refused connection) is retried with the same event id, backing
//! off exponentially, for up to 24 hours. Each target's backlog is bounded
//! (oldest dropped first, counted) and visible in `/metrics`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, watch};

pub mod ops;

use crate::config::TargetSettings;
use crate::domain::{Millis, derived_id, now_ms, rfc3339};
use crate::inbound::InboundMessage;
use crate::outbound::OutboundRecord;
use crate::persist::{Owner, encode};
use crate::state::ConversationView;
use crate::telemetry::Metrics;
use ops::EventOp;

pub const SIGNATURE_HEADER: &str = "X-Router-Signature-256";
pub const EVENT_ID_HEADER: &str = "X-Router-Event-Id";
/// Unix seconds at which this delivery attempt was signed.
pub const TIMESTAMP_HEADER: &str = "X-Router-Timestamp";
/// `sha256=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`: lets a receiver
/// refuse replays of an old delivery (as Standard Webhooks does).
pub const TIMESTAMP_SIGNATURE_HEADER: &str = "X-Router-Timestamp-Signature";

/// How long an event is retried (SPEC §8).
pub const RETRY_FOR_MS: Millis = 24 * 3600 * 1000;
/// Events kept per target before the oldest are dropped; the bytes they
/// may hold are `[targets.NAME] max_backlog` (default 64 MB).
pub const MAX_BACKLOG: usize = 100_000;
/// Deliveries in flight per target.
const CONCURRENCY: usize = 8;
const TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_RETRY_MS: Millis = 1000;
const MAX_RETRY_MS: Millis = 10 * 60 * 1000;

/// One event on its way to one target.
#[derive(Debug, Clone)]
struct Pending {
    id: String,
    body: Arc<Vec<u8>>,
    created: Millis,
    attempts: u32,
}

struct Target {
    settings: TargetSettings,
    queue: Mutex<Backlog>,
    notify: Notify,
    slots: Arc<Semaphore>,
    /// Every event not yet delivered or given up (queued or in flight), by id.
    live: Mutex<std::collections::HashMap<String, Pending>>,
}

/// Events waiting for a target, by due time, and their size.
#[derive(Default)]
struct Backlog {
    due: BTreeMap<(Millis, u64), Pending>,
    bytes: usize,
}

impl Backlog {
    fn insert(&mut self, key: (Millis, u64), p: Pending) {
        self.bytes += p.body.len();
        if let Some(old) = self.due.insert(key, p) {
            self.bytes -= old.body.len();
        }
    }

    fn remove(&mut self, key: &(Millis, u64)) -> Option<Pending> {
        let p = self.due.remove(key)?;
        self.bytes -= p.body.len();
        Some(p)
    }

    fn first_key(&self) -> Option<(Millis, u64)> {
        self.due.keys().next().copied()
    }
}

/// All targets and their delivery workers.
pub struct Events {
    targets: Vec<Arc<Target>>,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
    seq: AtomicU64,
    journal: std::sync::OnceLock<crate::journal::Journal>,
    /// During replay: journaled events not yet delivered, by (target, id).
    restoring: Mutex<Restoring>,
    /// Live subscribers of `GET /v1/stream` (the console): SSE frames.
    stream: tokio::sync::broadcast::Sender<Arc<str>>,
    /// Set at shutdown: live streams end (they would hold it up).
    stream_end: watch::Sender<bool>,
    /// In a cluster: whether this router delivers a target's events now
    /// (it holds the target's lease). Unset: always.
    delivers: std::sync::OnceLock<crate::outbound::sender::Owns>,
}

/// Frames a slow stream subscriber may fall behind before it is told it
/// missed some (`event: lagged`).
const STREAM_BUFFER: usize = 4096;

type Restoring = BTreeMap<(String, String), (String, String, String, Millis)>;

/// Delay before the next attempt after `attempts` failed ones: 1 s doubling,
/// up to 25 % jitter, capped at 10 minutes.
pub fn retry_delay_ms(attempts: u32, jitter: f64) -> Millis {
    let base = FIRST_RETRY_MS.saturating_mul(1 << attempts.saturating_sub(1).min(20));
    ((base as f64 * (1.0 + 0.25 * jitter.clamp(0.0, 1.0))) as Millis).min(MAX_RETRY_MS)
}

impl Events {
    pub fn new(targets: &[TargetSettings], metrics: Arc<Metrics>) -> Result<Self, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("wa-router/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let targets = targets
            .iter()
            .map(|t| {
                Arc::new(Target {
                    settings: t.clone(),
                    queue: Mutex::new(Backlog::default()),
                    notify: Notify::new(),
                    slots: Arc::new(Semaphore::new(CONCURRENCY)),
                    live: Mutex::new(Default::default()),
                })
            })
            .collect();
        Ok(Events {
            targets,
            http,
            metrics,
            seq: AtomicU64::new(0),
            stream: tokio::sync::broadcast::channel(STREAM_BUFFER).0,
            stream_end: watch::channel(false).0,
            journal: std::sync::OnceLock::new(),
            restoring: Mutex::default(),
            delivers: std::sync::OnceLock::new(),
        })
    }

    /// Journal events from now on (data_dir mode).
    pub fn attach_journal(&self, journal: crate::journal::Journal) {
        let _ = self.journal.set(journal);
    }

    fn log(&self, op: impl FnOnce() -> EventOp) {
        if let Some(j) = self.journal.get() {
            j.append(&encode(Owner::Events, &op()));
        }
    }

    fn finished(&self, target: &Target, id: &str) {
        target.live.lock().remove(id);
        self.log(|| EventOp::EventDone {
            target: target.settings.name.clone(),
            id: id.to_string(),
        });
    }

    /// Cluster: deliver a target's events only while `delivers(target)`.
    pub fn deliver_when(&self, delivers: crate::outbound::sender::Owns) {
        let _ = self.delivers.set(delivers);
    }

    fn delivers(&self, target: &Target) -> bool {
        self.delivers.get().is_none_or(|d| d(&target.settings.name))
    }

    /// Wake the workers (a cluster router took a target's lease over).
    pub fn wake(&self) {
        for t in &self.targets {
            t.notify.notify_one();
        }
    }

    /// Apply a record another router of the cluster wrote: its events wait
    /// here too, and are delivered by whichever router holds the target's
    /// lease (again, if the one that held it died mid-delivery: at least
    /// once).
    pub fn apply_remote(&self, json: &[u8]) -> Result<(), String> {
        let op: EventOp = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        match op {
            EventOp::Event {
                target,
                id,
                body,
                created,
            } => {
                if let Some(t) = self.targets.iter().find(|t| t.settings.name == target)
                    && !t.live.lock().contains_key(&id)
                {
                    self.enqueue(
                        t,
                        Pending {
                            id,
                            body: Arc::new(body.into_bytes()),
                            created,
                            attempts: 0,
                        },
                        now_ms(),
                    );
                }
            }
            EventOp::EventDone { target, id } => {
                // Off the queue when a worker reaches it (not live any more).
                if let Some(t) = self.targets.iter().find(|t| t.settings.name == target) {
                    t.live.lock().remove(&id);
                }
            }
        }
        Ok(())
    }

    /// Apply one journaled record.
    pub(crate) fn restore_op(&self, op: EventOp) {
        let mut restoring = self.restoring.lock();
        match op {
            EventOp::Event {
                target,
                id,
                body,
                created,
            } => {
                restoring.insert((target.clone(), id.clone()), (target, id, body, created));
            }
            EventOp::EventDone { target, id } => {
                restoring.remove(&(target, id));
            }
        }
    }

    /// After the last record: queue the events not delivered before the
    /// stop. Returns how many.
    pub fn finish_restore(&self) -> usize {
        let events = std::mem::take(&mut *self.restoring.lock());
        let n = events.len();
        for (target, id, body, created) in events.into_values() {
            match self.targets.iter().find(|t| t.settings.name == target) {
                Some(t) => self.enqueue(
                    t,
                    Pending {
                        id,
                        body: Arc::new(body.into_bytes()),
                        created,
                        attempts: 0,
                    },
                    now_ms(),
                ),
                None => {
                    tracing::warn!(target = %target, event_id = %id, "journal holds an event for a target no longer configured; dropped")
                }
            }
        }
        n
    }

    /// Every undelivered event, for a snapshot.
    pub fn dump(&self, emit: &mut dyn FnMut(&[u8])) {
        for t in &self.targets {
            for p in t.live.lock().values() {
                emit(&encode(
                    Owner::Events,
                    &EventOp::Event {
                        target: t.settings.name.clone(),
                        id: p.id.clone(),
                        body: String::from_utf8_lossy(&p.body).into_owned(),
                        created: p.created,
                    },
                ));
            }
        }
    }

    /// The configured targets' names.
    pub fn target_names(&self) -> Vec<String> {
        self.targets
            .iter()
            .map(|t| t.settings.name.clone())
            .collect()
    }

    /// Whether any target wants status events.
    pub fn wants_statuses(&self) -> bool {
        self.targets.iter().any(|t| t.settings.statuses)
    }

    fn push(&self, target: &Target, id: &str, body: Arc<Vec<u8>>, now: Millis) {
        self.log(|| EventOp::Event {
            target: target.settings.name.clone(),
            id: id.to_string(),
            body: String::from_utf8_lossy(&body).into_owned(),
            created: now,
        });
        self.enqueue(
            target,
            Pending {
                id: id.to_string(),
                body,
                created: now,
                attempts: 0,
            },
            now,
        );
    }

    fn enqueue(&self, target: &Target, pending: Pending, now: Millis) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        target
            .live
            .lock()
            .insert(pending.id.clone(), pending.clone());
        self.insert_bounded(target, (now, seq), pending);
    }

    /// Queue `pending` at `key` (due time, sequence), keeping the backlog
    /// within its count and byte bounds: the oldest go first. New events and
    /// retries both come through here.
    fn insert_bounded(&self, target: &Target, key: (Millis, u64), pending: Pending) {
        let mut q = target.queue.lock();
        let mut dropped = Vec::new();
        while q.due.len() >= MAX_BACKLOG
            || (!q.due.is_empty()
                && q.bytes + pending.body.len() > target.settings.max_backlog_bytes)
        {
            let Some(k) = q.first_key() else { break };
            dropped.extend(q.remove(&k));
        }
        q.insert(key, pending);
        drop(q);
        for old in dropped {
            self.metrics.event_delivery("dropped");
            tracing::error!(target = %target.settings.name, event_id = %old.id, "event backlog full; the oldest event was dropped");
            self.finished(target, &old.id);
        }
        target.notify.notify_one();
    }

    fn emit(&self, body: Value, wants: impl Fn(&TargetSettings) -> bool) {
        let id = body["id"].as_str().unwrap_or_default().to_string();
        let bytes = Arc::new(serde_json::to_vec(&body).unwrap_or_default());
        let now = now_ms();
        for t in self.targets.iter().filter(|t| wants(&t.settings)) {
            self.push(t, &id, bytes.clone(), now);
        }
    }

    /// `message.received` to the named targets (`None`: every target
    /// subscribed to messages).
    pub fn message_received(
        &self,
        targets: Option<&[String]>,
        account: &str,
        msg: &InboundMessage,
        conv: Option<&ConversationView>,
        rule: Option<&str>,
    ) {
        let body = message_received_body(account, msg, conv, rule, now_ms());
        match targets {
            Some(names) => self.emit(body, |t| names.contains(&t.name)),
            None => self.emit(body, |t| t.messages),
        }
    }

    /// A subscription to the live stream: every event as an SSE frame.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.stream.subscribe()
    }

    /// Changes to `true` when live streams are to end (shutdown).
    pub fn stream_end(&self) -> watch::Receiver<bool> {
        self.stream_end.subscribe()
    }

    /// End every live stream (before the server stops: it waits for open
    /// connections).
    pub fn end_streams(&self) {
        self.stream_end.send_replace(true);
    }

    /// Whether anyone listens to the live stream (bodies are built only then).
    pub fn streaming(&self) -> bool {
        self.stream.receiver_count() > 0
    }

    /// Put an event on the live stream, if anyone listens.
    fn broadcast(&self, body: &Value) {
        if !self.streaming() {
            return;
        }
        let frame = format!(
            "id: {}\nevent: {}\ndata: {}\n\n",
            body["id"].as_str().unwrap_or_default(),
            body["event"].as_str().unwrap_or_default(),
            body
        );
        let _ = self.stream.send(frame.into());
    }

    /// Every inbound message, once its rules ran, to the live stream (the
    /// targets get `message.received` only for forwards and handoffs).
    pub fn stream_inbound(
        &self,
        account: &str,
        msg: &InboundMessage,
        conv: Option<&ConversationView>,
    ) {
        if self.streaming() {
            self.broadcast(&message_received_body(account, msg, conv, None, now_ms()));
        }
    }

    /// `account.update` (templates, quality, account and user preference
    /// changes Meta reported) to every target subscribed to `account`.
    pub fn account_update(
        &self,
        change: &crate::webhook::payload::AccountChange,
        account: Option<&str>,
    ) {
        let body = account_update_body(change, account, now_ms());
        self.broadcast(&body);
        self.emit(body, |t| t.account);
    }

    /// `message.status` to every target subscribed to statuses.
    /// A status change another router of the cluster made: to this
    /// router's live stream only (that router's events go to targets).
    pub fn stream_status(&self, record: &OutboundRecord) {
        if self.streaming() {
            self.broadcast(&message_status_body(record, now_ms()));
        }
    }

    pub fn message_status(&self, record: &OutboundRecord) {
        let body = message_status_body(record, now_ms());
        self.broadcast(&body);
        self.emit(body, |t| t.statuses);
    }

    /// Events and their bytes waiting per target (for `/metrics`).
    pub fn backlog(&self) -> Vec<(String, usize, usize)> {
        self.targets
            .iter()
            .map(|t| {
                let q = t.queue.lock();
                (t.settings.name.clone(), q.due.len(), q.bytes)
            })
            .collect()
    }

    /// Start one delivery worker per target.
    pub fn spawn_workers(self: &Arc<Self>, stop: watch::Receiver<bool>) {
        for t in &self.targets {
            tokio::spawn(run_target(self.clone(), t.clone(), stop.clone()));
        }
    }

    async fn deliver(&self, target: &Target, event: &Pending) -> Result<(), String> {
        let secret = target.settings.secret.expose().as_bytes();
        let signature = crate::crypto::sign(secret, &event.body);
        let timestamp = now_ms() / 1000;
        let resp = self
            .http
            .post(&target.settings.url)
            .header("content-type", "application/json")
            .header(SIGNATURE_HEADER, signature)
            .header(EVENT_ID_HEADER, &event.id)
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(
                TIMESTAMP_SIGNATURE_HEADER,
                crate::crypto::sign_timestamped(secret, timestamp, &event.body),
            )
            .body(event.body.as_ref().clone())
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    "timed out".to_string()
                } else {
                    "connection failed".to_string()
                }
            })?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", resp.status().as_u16()))
        }
    }
}

async fn run_target(events: Arc<Events>, target: Arc<Target>, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            break;
        }
        if !events.delivers(&target) {
            // Another router of the cluster delivers this target's events.
            tokio::select! {
                _ = target.notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                changed = stop.changed() => if changed.is_err() { break },
            }
            continue;
        }
        let now = now_ms();
        let due = {
            let mut q = target.queue.lock();
            match q.first_key() {
                Some(key) if key.0 <= now => q.remove(&key).map(Ok),
                Some(key) => Some(Err(key.0)),
                None => None,
            }
        };
        let event = match due {
            // Delivered by another router of the cluster meanwhile.
            Some(Ok(event)) if !target.live.lock().contains_key(&event.id) => continue,
            Some(Ok(event)) => event,
            other => {
                let wait = match other {
                    Some(Err(at)) => Duration::from_millis((at - now).max(1) as u64),
                    _ => Duration::from_secs(3600),
                };
                tokio::select! {
                    _ = target.notify.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    changed = stop.changed() => if changed.is_err() { break },
                }
                continue;
            }
        };
        let Ok(permit) = target.slots.clone().acquire_owned().await else {
            break;
        };
        let (events, target) = (events.clone(), target.clone());
        tokio::spawn(async move {
            let _permit = permit;
            attempt(&events, &target, event).await;
        });
    }
}

async fn attempt(events: &Events, target: &Target, mut event: Pending) {
    event.attempts += 1;
    match events.deliver(target, &event).await {
        Ok(()) => {
            events.metrics.event_delivery("ok");
            events.finished(target, &event.id);
            tracing::debug!(target = %target.settings.name, event_id = %event.id, attempts = event.attempts, "event delivered");
        }
        Err(reason) => {
            let now = now_ms();
            if now - event.created >= RETRY_FOR_MS {
                events.metrics.event_delivery("expired");
                tracing::error!(target = %target.settings.name, event_id = %event.id, %reason, "event given up after 24 h of retries");
                events.finished(target, &event.id);
                return;
            }
            events.metrics.event_delivery("retry");
            let next = now + retry_delay_ms(event.attempts, fastrand::f64());
            tracing::warn!(target = %target.settings.name, event_id = %event.id, %reason, attempts = event.attempts, "event delivery failed; will retry");
            let seq = events.seq.fetch_add(1, Ordering::Relaxed);
            events.insert_bounded(target, (next, seq), event);
        }
    }
}

/// The `message.received` body (SPEC §8).
pub fn message_received_body(
    account: &str,
    msg: &InboundMessage,
    conv: Option<&ConversationView>,
    rule: Option<&str>,
    now: Millis,
) -> Value {
    let raw: Value = serde_json::from_str(msg.raw.get()).unwrap_or(Value::Null);
    let c = conv.map(|c| &c.conversation);
    let handoff = c.and_then(|c| c.handoff_until).is_some_and(|u| u > now);
    // The same inbound message and rule give the same id however often the
    // event is built (re-run after a crash, Meta's retry after a 503), so
    // receivers can dedupe by it (SPEC §8).
    let id = derived_id(
        "evt",
        msg.timestamp,
        &format!(
            "message.received|{account}|{}|{}",
            msg.wamid,
            rule.unwrap_or("")
        ),
    );
    // SPEC §8's contact; the BSUID and username only when Meta gave them.
    let mut contact = json!({ "wa_id": msg.from, "name": msg.contact_name });
    if let Some(u) = &msg.user_id {
        contact["user_id"] = json!(u);
    }
    if let Some(u) = &msg.username {
        contact["username"] = json!(u);
    }
    json!({
        "id": id,
        "event": "message.received",
        "at": rfc3339(now),
        "account": account,
        "conversation": {
            "wa_id": msg.from,
            "window_expires_at": conv.and_then(|c| c.window).map(|w| rfc3339(w.expires)),
            "state": c.map(|c| c.state.clone()).unwrap_or_default(),
            "handoff": handoff,
        },
        "contact": contact,
        "message": {
            "id": msg.wamid,
            "type": msg.kind.as_str(),
            "timestamp": rfc3339(msg.timestamp),
            "text": msg.text,
            "reply": msg.reply.as_ref().map(|r| json!({ "id": r.id, "title": r.title })),
            "context": msg.context_id.as_ref().map(|id| json!({ "id": id })),
            "raw": raw,
        },
        "rule": rule,
    })
}

/// The `account.update` body: Meta's change as sent, with its field, the
/// business account and, where Meta names a number, the router's account.
pub fn account_update_body(
    change: &crate::webhook::payload::AccountChange,
    account: Option<&str>,
    now: Millis,
) -> Value {
    // Meta's retries of one change give the same id.
    let at = change.value["timestamp"]
        .as_i64()
        .or_else(|| change.value["timestamp"].as_str()?.parse().ok())
        .map_or(0, |s: i64| s.saturating_mul(1000));
    let id = derived_id(
        "evt",
        at,
        &format!(
            "account.update|{}|{}|{}",
            change.field,
            change.waba_id.as_deref().unwrap_or(""),
            change.value
        ),
    );
    json!({
        "id": id,
        "event": "account.update",
        "at": rfc3339(now),
        "field": change.field,
        "waba_id": change.waba_id,
        "account": account,
        "value": change.value,
    })
}

/// The `message.status` body (SPEC §8).
pub fn message_status_body(r: &OutboundRecord, now: Millis) -> Value {
    // One event per (message, status): stable across re-emission.
    let id = derived_id(
        "evt",
        r.created_at,
        &format!("message.status|{}|{}", r.id, r.status.as_str()),
    );
    json!({
        "id": id,
        "event": "message.status",
        "at": rfc3339(now),
        "account": r.account,
        "message_id": r.id,
        "wamid": r.wamid,
        "to": r.to,
        "status": r.status.as_str(),
        "tags": r.tags,
        "metadata": r.metadata,
        "error": r.error.as_ref().map(|e| json!({ "code": e.code, "graph_code": e.graph_code, "message": e.message })),
        "pricing": r.pricing,
        "conversation": r.conversation,
    })
}

#[cfg(test)]
mod tests {
    use super::retry_delay_ms;

    #[test]
    fn retries_back_off_and_cap() {
        assert_eq!(retry_delay_ms(1, 0.0), 1000);
        assert_eq!(retry_delay_ms(2, 0.0), 2000);
        assert_eq!(retry_delay_ms(4, 1.0), 10_000);
        assert_eq!(retry_delay_ms(40, 1.0), 600_000);
    }

    /// Issue #7.10: an event built again for the same message (after a
    /// crash or a 503 made the router process it again) keeps its id.
    #[test]
    fn event_ids_are_stable_across_rebuilds() {
        let raw = serde_json::value::RawValue::from_string("{}".into()).unwrap();
        let msg = crate::inbound::InboundMessage {
            wamid: "wamid.A".into(),
            from: "16315551181".into(),
            contact_name: None,
            user_id: None,
            username: None,
            timestamp: 1_700_000_000_000,
            kind: crate::inbound::InboundKind::Text,
            raw_type: "text".into(),
            text: Some("hi".into()),
            reply: None,
            context_id: None,
            opens_window: true,
            raw,
        };
        let a = super::message_received_body("main", &msg, None, Some("sales"), 1);
        let b = super::message_received_body("main", &msg, None, Some("sales"), 99_999);
        assert_eq!(a["id"], b["id"]);
        let other = super::message_received_body("main", &msg, None, None, 1);
        assert_ne!(a["id"], other["id"]);
        assert!(a["id"].as_str().unwrap().starts_with("evt_"));
    }
}
