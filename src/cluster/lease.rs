//! Account leases and the inbound streams their holders read.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;

use super::log::read_reply;
use super::{Cluster, ClusterError, Held};

/// Writes the whole state, a journal record at a time.
pub type Dump = Box<dyn FnOnce(&mut dyn FnMut(&[u8])) + Send>;

/// What the lease holder of an account does; implemented by the app.
pub trait LeaseHooks: Send + Sync + 'static {
    /// Every account to hold a lease for: (name, phone number id).
    fn accounts(&self) -> Vec<(String, String)>;
    /// Every event target to hold a lease for (its holder delivers).
    fn targets(&self) -> Vec<String>;
    /// This router just took the lease of `target` over.
    fn deliver(&self, target: &str);
    /// The whole state as journal records, for a snapshot of the log.
    fn dump(&self) -> Dump;
    /// This router just took the lease of `account` and applied the log to
    /// its end: settle interrupted sends, rebuild the queue, route what
    /// was acknowledged and not yet routed.
    fn take_over(&self, account: &str);
    /// One notification body from the inbound stream of `phone_number_id`
    /// (resolves once applied; rarely waits: see
    /// `webhook::ingest::rules_before_identity_changes`).
    fn inbound<'a>(
        &'a self,
        phone_number_id: &'a str,
        body: &'a [u8],
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
    /// One [`super::Command`] (JSON) from that stream.
    fn command(&self, phone_number_id: &str, json: &[u8]);
    /// Resolves once what `inbound` did is in the log.
    fn sync(&self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;
    /// Whether nothing of `account` is under way here any more (no send in
    /// flight, no acknowledged message waiting for its rules): its lease
    /// can be handed over.
    fn drained(&self, account: &str) -> bool;
}

/// Take the lease if free: the value is `node:token`, the token one more
/// than the last one of this account (the fence).
const ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local t = redis.call('INCR', KEYS[2])
  local v = ARGV[1] .. ':' .. t
  redis.call('SET', KEYS[1], v, 'PX', ARGV[2])
  return v
end
return false
";

/// Extend the lease if it is still ours.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Move the inbound cursor and drop what is before it, if the lease is
/// still ours (a router that lost it cannot move it back).
const ADVANCE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2])
  redis.call('XTRIM', KEYS[3], 'MINID', ARGV[2])
  return 1
end
return 0
";

/// Give the lease back at shutdown, if it is still ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// The lease scripts, hashed once (Redis runs them by their SHA).
pub(super) struct Scripts {
    acquire: redis::Script,
    renew: redis::Script,
    advance: redis::Script,
    release: redis::Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts {
            acquire: redis::Script::new(ACQUIRE),
            renew: redis::Script::new(RENEW),
            advance: redis::Script::new(ADVANCE),
            release: redis::Script::new(RELEASE),
        }
    }
}

const ACCOUNT: &str = "account/";
/// A router that reported its log position within this is alive (it
/// reports every 2 s).
const LIVE_MS: u64 = 10_000;

/// The lease loop's memory for balancing: how many routers there were and
/// since when, when the last lease was handed over, and since when each
/// lease not taken has been seen free.
#[derive(Default)]
struct Balance {
    routers: usize,
    since: Option<Instant>,
    last_move: Option<Instant>,
    free_since: HashMap<String, Instant>,
}

impl Balance {
    fn note_routers(&mut self, n: usize) {
        if n != self.routers {
            self.routers = n;
            self.since = Some(Instant::now());
        }
    }

    /// The routers have not changed for a while, nor was a lease handed
    /// over lately: time to hand one over if this router has too many.
    fn settled(&self, ttl: Duration) -> bool {
        let calm = |t: Option<Instant>| t.is_none_or(|t| t.elapsed() >= ttl * 2);
        calm(self.since) && calm(self.last_move)
    }

    fn moved(&mut self) {
        self.last_move = Some(Instant::now());
    }

    fn note_free(&mut self, lease: &str, free: bool) {
        if free {
            self.free_since
                .entry(lease.to_string())
                .or_insert_with(Instant::now);
        } else {
            self.free_since.remove(lease);
        }
    }

    /// Nobody took this lease for a while: whoever sees it takes it, fair
    /// share or not (a lease must not stay orphaned).
    fn free_for_long(&self, lease: &str) -> bool {
        self.free_since
            .get(lease)
            .is_some_and(|t| t.elapsed() >= Duration::from_secs(3))
    }
}
/// The lease of the router that writes the log's snapshots.
const SNAPSHOT: &str = "cluster/snapshot";
/// At most one snapshot in this time.
const MIN_SNAPSHOT_GAP: Duration = Duration::from_secs(10);
const TARGET: &str = "target/";

/// The lease (and `owned` entry) of an account.
pub(super) fn account_lease(account: &str) -> String {
    format!("{ACCOUNT}{account}")
}

/// The lease of an event target.
pub(super) fn target_lease(target: &str) -> String {
    format!("{TARGET}{target}")
}

impl Cluster {
    /// The part of the time to live after which a holder stops starting
    /// sends unless it renewed: 3/4, renewals come every 1/3.
    fn deadline(&self, sent: Instant) -> Instant {
        sent + self.lease_ttl * 3 / 4
    }

    /// Hold the leases of every account the hooks name, as far as they are
    /// free, and read the inbound streams of those held.
    pub fn spawn_leases(self: &Arc<Self>, hooks: Arc<dyn LeaseHooks>) {
        let this = self.clone();
        let h = hooks.clone();
        tokio::spawn(async move {
            let mut balance = Balance::default();
            loop {
                let routers = this.live_routers().await.unwrap_or(1).max(1);
                balance.note_routers(routers);
                let accounts: Vec<String> = h
                    .accounts()
                    .into_iter()
                    .map(|(a, _)| account_lease(&a))
                    .collect();
                let targets: Vec<String> =
                    h.targets().into_iter().map(|t| target_lease(&t)).collect();
                for kind in [&accounts, &targets] {
                    // A fair share: leases of a kind spread over the routers.
                    let fair = kind.len().div_ceil(routers);
                    for lease in kind {
                        let held = kind.iter().filter(|l| this.owned.contains_key(*l)).count();
                        let take = held < fair || balance.free_for_long(lease);
                        if let Err(e) = this.hold(lease, take, &mut balance, h.as_ref()).await {
                            tracing::warn!(%lease, error = %e, "lease");
                        }
                    }
                    let held: Vec<String> =
                        kind.iter().filter(|l| this.holds(l)).cloned().collect();
                    if held.len() > fair && balance.settled(this.lease_ttl) {
                        // More than a fair share since the routers changed:
                        // hand one over, once its work here is done.
                        balance.moved();
                        if let Some(lease) = held.last() {
                            this.clone().hand_over(lease.clone(), h.clone());
                        }
                    }
                }
                if let Err(e) = this.hold(SNAPSHOT, true, &mut balance, h.as_ref()).await {
                    tracing::warn!(lease = SNAPSHOT, error = %e, "lease");
                }
                if this.holds(SNAPSHOT) {
                    this.snapshot_if_long(h.as_ref()).await;
                }
                tokio::time::sleep(this.lease_ttl / 3).await;
            }
        });
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = this.report_applied().await {
                    tracing::warn!(error = %e, "reporting the log position");
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        let this = self.clone();
        tokio::spawn(async move { this.consume(hooks).await });
    }

    /// Renew `name` if held; else, if `take`, take it if free (otherwise
    /// note whether it is free).
    async fn hold(
        &self,
        name: &str,
        take: bool,
        balance: &mut Balance,
        hooks: &dyn LeaseHooks,
    ) -> Result<(), ClusterError> {
        let lease = self.key(&["lease", name]);
        let ttl = self.lease_ttl.as_millis() as u64;
        let mut conn = self.conn();
        let sent = Instant::now();
        let held = self.owned.get(name).map(|e| e.value().token.clone());
        if let Some(token) = held {
            let renewed: i64 = self
                .scripts
                .renew
                .key(&lease)
                .arg(&token)
                .arg(ttl)
                .invoke_async(&mut conn)
                // On an error the renewal is unknown: the deadline decides.
                .await?;
            if renewed == 1 {
                if let Some(mut e) = self.owned.get_mut(name) {
                    e.value_mut().deadline = self.deadline(sent);
                }
            } else {
                self.owned.remove(name);
                tracing::warn!(lease = %name, "lost a lease; its work stops here");
            }
            return Ok(());
        }
        if !take {
            let holder: Option<String> =
                redis::cmd("GET").arg(&lease).query_async(&mut conn).await?;
            balance.note_free(name, holder.is_none());
            return Ok(());
        }
        let got: Option<String> = self
            .scripts
            .acquire
            .key(&lease)
            .key(self.key(&["fence", name]))
            .arg(&self.node)
            .arg(ttl)
            .invoke_async(&mut conn)
            .await?;
        let Some(token) = got else {
            balance.note_free(name, false);
            return Ok(());
        };
        balance.note_free(name, false);
        tracing::info!(lease = %name, token = %token, "took a lease");
        self.catch_up(&[]).await?;
        self.owned.insert(
            name.to_string(),
            Held {
                token,
                deadline: self.deadline(sent),
                releasing: false,
            },
        );
        if let Some(account) = name.strip_prefix(ACCOUNT) {
            hooks.take_over(account);
        } else if let Some(target) = name.strip_prefix(TARGET) {
            hooks.deliver(target);
        }
        Ok(())
    }

    /// Give `lease` back gracefully: no new work starts here (the lease is
    /// still renewed), and once what is under way is done and in the log
    /// (at most a minute), the lease is released for another router.
    fn hand_over(self: Arc<Self>, lease: String, hooks: Arc<dyn LeaseHooks>) {
        let Some(mut held) = self.owned.get_mut(&lease) else {
            return;
        };
        if held.releasing {
            return;
        }
        held.releasing = true;
        drop(held);
        tracing::info!(%lease, "handing a lease over to balance the routers");
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            let account = lease.strip_prefix(ACCOUNT).map(str::to_string);
            while let Some(a) = &account
                && !hooks.drained(a)
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let synced = hooks.sync().await;
            let token = self.owned.get(&lease).map(|e| e.value().token.clone());
            if let (true, Some(token)) = (synced, token) {
                self.give_back(&mut self.conn(), &lease, token).await;
                self.owned.remove(&lease);
                tracing::info!(%lease, "lease handed over");
            } else if let Some(mut held) = self.owned.get_mut(&lease) {
                // Not in the log: keep the lease and its work.
                held.releasing = false;
            }
        });
    }

    /// Routers that reported their log position lately.
    async fn live_routers(&self) -> Result<usize, ClusterError> {
        let reports = self.reports().await?;
        Ok(reports.iter().filter(|(_, age)| *age < LIVE_MS).count())
    }

    /// The snapshot lease's work: trim the log up to the last snapshot
    /// as far as every live router applied it, and write a new snapshot
    /// once what is left takes `snapshot_after` bytes in Redis.
    async fn snapshot_if_long(&self, hooks: &dyn LeaseHooks) {
        let left = match self.trim().await {
            Ok(left) => left,
            Err(e) => {
                tracing::warn!(error = %e, "trimming the cluster log");
                return;
            }
        };
        // A router that lags holds the trimming back: no new snapshot every
        // round meanwhile.
        let recent = self
            .last_snapshot
            .lock()
            .is_some_and(|t| t.elapsed() < MIN_SNAPSHOT_GAP);
        if left < self.snapshot_after || recent {
            return;
        }
        *self.last_snapshot.lock() = Some(Instant::now());
        let started = Instant::now();
        match self.snapshot(hooks.dump()).await {
            Ok((records, trimmed)) => tracing::info!(
                records,
                trimmed,
                ms = started.elapsed().as_millis() as u64,
                "cluster snapshot written"
            ),
            Err(e) => tracing::error!(error = %e, "cluster snapshot failed"),
        }
    }

    /// Give back the leases held (shutdown): another router takes over at
    /// once instead of after the time to live.
    pub async fn release(&self) {
        self.forget_applied().await;
        let mut conn = self.conn();
        let held: Vec<(String, String)> = self
            .owned
            .iter()
            .map(|e| (e.key().clone(), e.value().token.clone()))
            .collect();
        self.owned.clear();
        for (name, token) in held {
            self.give_back(&mut conn, &name, token).await;
        }
    }

    /// Give lease `name` back if `token` still holds it. Best effort: with
    /// Redis away, the lease runs out by its time to live.
    async fn give_back(&self, conn: &mut redis::aio::ConnectionManager, name: &str, token: String) {
        let _: Result<i64, _> = self
            .scripts
            .release
            .key(self.key(&["lease", name]))
            .arg(token)
            .invoke_async(conn)
            .await;
    }

    /// Read the inbound streams of the accounts held, in order, from their
    /// cursors; move a cursor once what its entries did is in the log.
    async fn consume(&self, hooks: Arc<dyn LeaseHooks>) {
        let mut conn = None;
        // Stream cursor per phone number id, read from Redis at takeover.
        let mut cursors: HashMap<String, String> = HashMap::new();
        loop {
            let held: Vec<(String, String, String)> = hooks
                .accounts()
                .into_iter()
                .filter_map(|(a, p)| {
                    let token = self
                        .owned
                        .get(&account_lease(&a))
                        .map(|e| e.value().token.clone())?;
                    self.owns(&a).then_some((a, p, token))
                })
                .collect();
            cursors.retain(|p, _| held.iter().any(|h| &h.1 == p));
            if held.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let Some(c) = self.reconnect(&mut conn, "read inbound streams").await else {
                continue;
            };
            for (_, pnid, _) in &held {
                if !cursors.contains_key(pnid) {
                    let at: Result<Option<String>, _> = redis::cmd("GET")
                        .arg(self.key(&["cursor", pnid]))
                        .query_async(c)
                        .await;
                    match at {
                        Ok(at) => {
                            cursors.insert(pnid.clone(), at.unwrap_or_else(|| "0-0".into()));
                        }
                        Err(e) => tracing::warn!(error = %e, "reading an inbound cursor"),
                    }
                }
            }
            let reading: Vec<&(String, String, String)> =
                held.iter().filter(|h| cursors.contains_key(&h.1)).collect();
            if reading.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT")
                .arg(256)
                .arg("BLOCK")
                .arg(500)
                .arg("STREAMS");
            for (_, pnid, _) in &reading {
                cmd.arg(self.key(&["in", pnid]));
            }
            for (_, pnid, _) in &reading {
                cmd.arg(&cursors[pnid]);
            }
            let read: Value = match cmd.query_async(c).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "reading inbound streams failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let mut advanced = Vec::new();
            for (stream, page) in read_reply(&read) {
                let Some(h) = reading.iter().find(|h| self.key(&["in", &h.1]) == stream) else {
                    continue;
                };
                for e in &page {
                    if let Some(body) = e.field("b") {
                        hooks.inbound(&h.1, body).await;
                    } else if let Some(command) = e.field("c") {
                        hooks.command(&h.1, command);
                    }
                }
                if let Some(last) = page.last() {
                    advanced.push((h.0.clone(), h.1.clone(), h.2.clone(), last.id.clone()));
                }
            }
            if advanced.is_empty() {
                continue;
            }
            // Not in the log: the cursor stays, the entries are read again
            // (applying them twice changes nothing).
            if !hooks.sync().await {
                cursors.clear();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let mut w = self.conn();
            for (account, pnid, token, last) in advanced {
                let moved: Result<i64, _> = self
                    .scripts
                    .advance
                    .key(self.key(&["lease", &account_lease(&account)]))
                    .key(self.key(&["cursor", &pnid]))
                    .key(self.key(&["in", &pnid]))
                    .arg(&token)
                    .arg(&last)
                    .invoke_async(&mut w)
                    .await;
                match moved {
                    Ok(1) => {
                        cursors.insert(pnid, last);
                    }
                    _ => {
                        cursors.remove(&pnid);
                    }
                }
            }
        }
    }
}
