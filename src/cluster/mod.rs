//! Several routers sharing one Redis (`[cluster]`, README "Running a
//! cluster").
//!
//! The model: one **log** (a Redis stream) replaces the journal files. Every
//! router appends the journal records of its changes to it (group commit:
//! one `XADD` for whatever waited, and [`crate::journal::Journal::sync`]
//! resolves once Redis answered), and every router applies the records the
//! others appended, in log order, to its own in-memory state: each router
//! holds the whole state, reads are local.
//!
//! Writes to an account's conversations and messages have one writer at a
//! time, the holder of the account's **lease** (`SET NX PX`, renewed at a
//! third of its time to live, fenced by a token from `INCR`): it runs the
//! rules of the account's inbound messages, applies their statuses and
//! sends its queue with `pace`/`rate`. A router that cannot renew stops
//! starting sends at its own deadline, before Redis lets another take the
//! lease; the one that takes it over first reads the log to its end, then
//! settles the sends that were in flight (as after a crash, SPEC §9), queues
//! what waits and runs the rules of what was acknowledged and not yet
//! routed.
//!
//! Webhooks: any router answers. Each business number has an **inbound
//! stream**; a script marks the message ids seen (`SET NX EX`) and appends
//! the notification in one step, before the `200`, so a notification
//! acknowledged anywhere is in Redis and runs the rules once. The lease
//! holder reads the stream from its cursor and moves the cursor (fenced)
//! once what it did is in the log.

mod lease;
mod log;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use redis::aio::ConnectionManager;

pub use lease::{Dump, LeaseHooks};

use crate::config::ClusterSettings;

/// How long a seen message id is remembered at the edge: Meta's quick
/// retries are refused there without touching a stream. Later ones reach
/// the lease holder, whose dedupe (7 days, in the log and snapshots) is the
/// one that counts; Redis does not keep an id for every message of a week.
pub const SEEN_TTL_SECS: u64 = 3600;

/// A router's handle on the cluster. Cheap to share.
pub struct Cluster {
    pub node: String,
    prefix: String,
    client: redis::Client,
    conn: ConnectionManager,
    up: AtomicBool,
    lease_ttl: Duration,
    /// `[cluster] snapshot_after`: log bytes that make a snapshot.
    snapshot_after: u64,
    /// When this router last wrote a snapshot.
    last_snapshot: parking_lot::Mutex<Option<Instant>>,
    /// Leases this router holds.
    owned: DashMap<String, Held>,
    /// Last log entry applied (own or others'), and a wake-up for waiters.
    applied: parking_lot::Mutex<String>,
    applied_changed: tokio::sync::Notify,
    inbound_script: redis::Script,
    catch_up_script: redis::Script,
    rate_script: redis::Script,
    install_script: redis::Script,
    scripts: lease::Scripts,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cluster({})", self.node)
    }
}

/// A lease held: its token, the local deadline after which its work
/// stops unless renewed, and whether it is being handed over (renewed
/// while the work drains, but no new work starts).
#[derive(Debug, Clone)]
pub(crate) struct Held {
    token: String,
    deadline: Instant,
    releasing: bool,
}

impl Held {
    fn active(&self) -> bool {
        !self.releasing && self.deadline > Instant::now()
    }
}

/// Why Redis could not be used (the message never holds the URL's password).
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct ClusterError(String);

impl From<redis::RedisError> for ClusterError {
    fn from(e: redis::RedisError) -> Self {
        ClusterError(e.to_string())
    }
}

/// The host part of a Redis URL, for messages (no user, no password).
fn redacted(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    host.split('/').next().unwrap_or(host).to_string()
}

/// Mark the ids seen and append the notification to the inbound stream,
/// in one step: `KEYS[1]` the stream, `KEYS[2..]` the seen keys; `ARGV[1]`
/// the body, `ARGV[2]` the time to live of a seen key, `ARGV[3]` "1" when
/// the notification carries something besides messages (statuses), which
/// is always appended (applying a status twice changes nothing).
const INBOUND_SCRIPT: &str = r"
local fresh = 0
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[2]) then fresh = fresh + 1 end
end
if fresh > 0 or ARGV[3] == '1' then
  redis.call('XADD', KEYS[1], '*', 'b', ARGV[1])
end
return fresh
";

/// How many inbound streams (`KEYS[2]`, `KEYS[4]`, …) hold entries past
/// their cursors (`KEYS[3]`, `KEYS[5]`, …), and the id of the log's
/// (`KEYS[1]`) last entry ("" when empty).
const CATCH_UP_SCRIPT: &str = r"
local function id(s)
  local ms, seq = string.match(s, '^(%d+)-(%d+)$')
  return tonumber(ms) or 0, tonumber(seq) or 0
end
local behind = 0
for i = 2, #KEYS, 2 do
  local last = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
  if #last > 0 then
    local lm, ls = id(last[1][1])
    local cm, cs = id(redis.call('GET', KEYS[i + 1]) or '0-0')
    if lm > cm or (lm == cm and ls > cs) then behind = behind + 1 end
  end
end
local l = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #l > 0 then return {behind, l[1][1]} end
return {behind, ''}
";

impl Cluster {
    /// Connect (waiting up to 10 s for Redis at startup).
    pub async fn connect(settings: &ClusterSettings) -> Result<Arc<Cluster>, ClusterError> {
        let url = settings.redis_url.expose();
        let client = redis::Client::open(url)
            .map_err(|e| ClusterError(format!("[cluster] redis_url {}: {e}", redacted(url))))?;
        let started = Instant::now();
        let conn = loop {
            match client
                .get_connection_manager_with_config(Self::config(Duration::from_secs(2)))
                .await
            {
                Ok(c) => break c,
                Err(e) if started.elapsed() < Duration::from_secs(10) => {
                    tracing::warn!(redis = %redacted(url), error = %e, "waiting for redis");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => {
                    return Err(ClusterError(format!(
                        "cannot reach redis at {}: {e}",
                        redacted(url)
                    )));
                }
            }
        };
        Ok(Arc::new(Cluster {
            node: settings.node_id.clone(),
            prefix: settings.prefix.clone(),
            client,
            conn,
            up: AtomicBool::new(true),
            lease_ttl: settings.lease_ttl,
            snapshot_after: settings.snapshot_after as u64,
            last_snapshot: Default::default(),
            owned: DashMap::new(),
            applied: parking_lot::Mutex::new("0-0".into()),
            applied_changed: tokio::sync::Notify::new(),
            inbound_script: redis::Script::new(INBOUND_SCRIPT),
            catch_up_script: redis::Script::new(CATCH_UP_SCRIPT),
            rate_script: redis::Script::new(RATE_SCRIPT),
            install_script: redis::Script::new(log::INSTALL),
            scripts: lease::Scripts::default(),
        }))
    }

    fn config(response_timeout: Duration) -> redis::aio::ConnectionManagerConfig {
        redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1))
    }

    /// A connection of its own, for blocking reads.
    async fn blocking_connection(&self) -> Result<ConnectionManager, ClusterError> {
        Ok(self
            .client
            .get_connection_manager_with_config(Self::config(Duration::from_secs(5)))
            .await?)
    }

    /// `conn`, connected first if it is not (a blocking reader's own);
    /// `None` after a failed attempt (logged, waited on: retry).
    async fn reconnect<'a>(
        &self,
        conn: &'a mut Option<ConnectionManager>,
        what: &str,
    ) -> Option<&'a mut ConnectionManager> {
        if conn.is_none() {
            match self.blocking_connection().await {
                Ok(c) => *conn = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot {what}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return None;
                }
            }
        }
        conn.as_mut()
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                k.push(':');
            }
            k.push_str(p);
        }
        k
    }

    /// Whether Redis answered lately. While not: `/readyz` is 503 and
    /// webhooks are answered 503 (Meta retries).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Ping Redis twice a second; `is_up` follows.
    pub fn spawn_health(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut conn = this.conn();
            loop {
                let ok = tokio::time::timeout(
                    Duration::from_secs(1),
                    redis::cmd("PING").query_async::<String>(&mut conn),
                )
                .await
                .is_ok_and(|r| r.is_ok());
                if ok != this.up.swap(ok, Ordering::AcqRel) {
                    if ok {
                        tracing::info!("redis reachable again");
                    } else {
                        tracing::error!("redis unreachable: not ready, webhooks answered 503");
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    /// Before the `200` of a webhook: mark `wamids` seen and append `body`
    /// to the inbound stream of `phone_number_id` if any is new or
    /// `always`. Returns how many were new.
    pub async fn inbound(
        &self,
        phone_number_id: &str,
        wamids: &[&str],
        body: &[u8],
        always: bool,
    ) -> Result<usize, ClusterError> {
        let mut call = self.inbound_script.prepare_invoke();
        call.key(self.key(&["in", phone_number_id]));
        for w in wamids {
            call.key(self.key(&["seen", w]));
        }
        call.arg(body)
            .arg(SEEN_TTL_SECS)
            .arg(if always { "1" } else { "0" });
        let mut conn = self.conn();
        let fresh: usize = call.invoke_async(&mut conn).await?;
        Ok(fresh)
    }

    /// Whether this router holds `account`'s lease now (and may start
    /// sends for it).
    pub fn owns(&self, account: &str) -> bool {
        self.holds(&lease::account_lease(account))
    }

    /// Whether this router delivers `target`'s events now.
    pub fn delivers(&self, target: &str) -> bool {
        self.holds(&lease::target_lease(target))
    }

    pub(super) fn holds(&self, lease: &str) -> bool {
        self.owned.get(lease).is_some_and(|e| e.value().active())
    }

    /// The leases this router holds now (`account/NAME`, `target/NAME`),
    /// sorted.
    pub fn leases(&self) -> Vec<String> {
        let mut held: Vec<String> = self
            .owned
            .iter()
            .filter(|e| e.value().active())
            .map(|e| e.key().clone())
            .collect();
        held.sort();
        held
    }

    fn note_applied(&self, id: &str) {
        *self.applied.lock() = id.to_string();
        self.applied_changed.notify_waiters();
    }

    /// Wait until every notification acknowledged so far (by any router)
    /// for the numbers `phone_number_ids` was applied by its lease holder,
    /// and this router applied the log up to its end: what any router did
    /// before is seen. Waits at most a lease's time to live and a second
    /// (a holder that died is replaced within it).
    pub async fn catch_up(&self, phone_number_ids: &[String]) -> Result<(), ClusterError> {
        let deadline = Instant::now() + self.lease_ttl + Duration::from_secs(1);
        let mut conn = self.conn();
        let end = loop {
            let mut call = self.catch_up_script.prepare_invoke();
            call.key(self.key(&["log"]));
            for p in phone_number_ids {
                call.key(self.key(&["in", p]));
                call.key(self.key(&["cursor", p]));
            }
            let (behind, end): (u64, String) = call.invoke_async(&mut conn).await?;
            if behind == 0 {
                break end;
            }
            if Instant::now() > deadline {
                return Err(ClusterError(
                    "acknowledged notifications are not applied yet (no lease holder?)".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        if end.is_empty() {
            return Ok(());
        }
        loop {
            let notified = self.applied_changed.notified();
            if log::id_le(&end, &self.applied.lock()) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return Err(ClusterError(format!(
                    "the log is not applied up to {end} in time"
                )));
            }
        }
    }
}

/// GCRA on Redis's clock: `KEYS[1]` the key's theoretical arrival time
/// (ms); `ARGV[1]` ms between requests at the rate, `ARGV[2]` the burst.
/// Returns 0 when allowed, else the ms to wait.
const RATE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now)
local new = tat + interval
if new - now > burst * interval then
  return math.ceil(new - now - burst * interval)
end
redis.call('SET', KEYS[1], tostring(new), 'PX', math.ceil(new - now) + 1000)
return 0
";

impl Cluster {
    /// The cluster-wide rate limit of one API key (`[api] rate`/`burst`,
    /// shared by every router): `None` if allowed, else how long to wait.
    /// The key is named in Redis by a hash, never as it is.
    pub async fn rate_limit(
        &self,
        api_key: &str,
        rate: u32,
        burst: u32,
    ) -> Result<Option<Duration>, ClusterError> {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(api_key.as_bytes());
        let name = hex::encode(&digest[..12]);
        let interval = 1000.0 / f64::from(rate.max(1));
        let mut conn = self.conn();
        let wait: u64 = self
            .rate_script
            .key(self.key(&["rate", &name]))
            .arg(interval)
            .arg(burst.max(1))
            .invoke_async(&mut conn)
            .await?;
        Ok((wait > 0).then(|| Duration::from_millis(wait)))
    }

    /// Before a request with an idempotency key runs: take the key for a
    /// while (`true`), or, when another request with it runs or ran
    /// anywhere, wait until this router knows its answer (`known`) and
    /// return `false` (the stored answer, or a conflict, follows).
    pub async fn claim_idempotency(
        &self,
        key: &str,
        known: impl Fn() -> bool,
    ) -> Result<bool, ClusterError> {
        let claim = self.idempotency_key(key);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut conn = self.conn();
        loop {
            if known() {
                return Ok(false);
            }
            let taken: Option<String> = redis::cmd("SET")
                .arg(&claim)
                .arg(&self.node)
                .arg("NX")
                .arg("PX")
                .arg(10_000)
                .query_async(&mut conn)
                .await?;
            if taken.is_some() {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Err(ClusterError(
                    "a request with this idempotency key is still running elsewhere".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.catch_up(&[]).await?;
        }
    }

    /// The request that claimed `key` failed: nothing was stored, the key
    /// is free again at once.
    pub async fn release_idempotency(&self, key: &str) {
        let mut conn = self.conn();
        let _: Result<i64, _> = redis::cmd("DEL")
            .arg(self.idempotency_key(key))
            .query_async(&mut conn)
            .await;
    }

    fn idempotency_key(&self, key: &str) -> String {
        use sha2::Digest;
        self.key(&["idem", &hex::encode(sha2::Sha256::digest(key.as_bytes()))])
    }
}

/// A change to an account's conversations or messages asked through the
/// API of a router that does not hold the account's lease: it goes through
/// the account's inbound stream to the holder (the one writer), in order
/// with the account's notifications.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    PutState {
        contact: String,
        state: Option<String>,
        vars: Option<std::collections::BTreeMap<String, String>>,
        at: i64,
    },
    Handoff {
        contact: String,
        until: Option<i64>,
        at: i64,
    },
    Consent {
        contact: String,
        opted_out: bool,
        at: i64,
    },
    Cancel {
        id: String,
        at: i64,
    },
}

impl Cluster {
    /// Hand `command` to the lease holder of the account of
    /// `phone_number_id` and wait until it was applied and this router
    /// applied the result.
    pub async fn command(
        &self,
        phone_number_id: &str,
        command: &Command,
    ) -> Result<(), ClusterError> {
        let json = serde_json::to_vec(command).map_err(|e| ClusterError(e.to_string()))?;
        let mut conn = self.conn();
        let _: String = redis::cmd("XADD")
            .arg(self.key(&["in", phone_number_id]))
            .arg("*")
            .arg("c")
            .arg(json)
            .query_async(&mut conn)
            .await?;
        self.catch_up(&[phone_number_id.to_string()]).await
    }
}
