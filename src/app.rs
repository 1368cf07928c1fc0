//! Wiring: [`App::build`] loads the rules, builds the state, binds the
//! listener and starts the workers; [`App::run_until_stopped`] serves until
//! SIGTERM/SIGINT, then stops intake, finishes in-flight requests and
//! stops the workers.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::dev::Service as _;
use actix_web::{App as ActixApp, HttpResponse, HttpServer, web};
use tokio::sync::watch;

use crate::config::Settings;
use crate::domain::Located;
use crate::error::{ApiError, ErrorCode};
use crate::events::Events;
use crate::outbound::Outbox;
use crate::outbound::graph::GraphClient;
use crate::persist::Owner;
use crate::routing::Lanes;
use crate::rules::Rules;
use crate::state::State;
use crate::telemetry::Metrics;
use crate::{api, ops, outbound, routing, webhook};

/// What the app keeps of what it built: the stores and queues (for
/// upkeep, shutdown and tests). Edges and workers get their own narrow
/// contexts ([`webhook::Ctx`], [`api::Ctx`], [`ops::Ctx`],
/// [`routing::Router`], [`outbound::sender::Sender`]) and never this.
pub struct Shared {
    pub settings: Arc<Settings>,
    pub state: Arc<State>,
    pub outbox: Arc<Outbox>,
    pub events: Arc<Events>,
    pub lanes: Arc<Lanes>,
    pub ops: Arc<ops::Ctx>,
}

/// Why the app could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Rules(Vec<Located>),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("storage: {0}")]
    Storage(String),
    #[error("{0}")]
    Other(String),
}

pub struct App {
    port: u16,
    server: actix_web::dev::Server,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    /// Background upkeep; awaited at shutdown so that a compaction it is
    /// running ends before the final one starts.
    maintenance: tokio::task::JoinHandle<()>,
    cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl App {
    /// Build the app on the current tokio runtime; binds `settings.listen`.
    pub async fn build(settings: Settings) -> Result<App, StartError> {
        let settings = Arc::new(settings);
        let targets: Vec<String> = settings.targets.iter().map(|t| t.name.clone()).collect();
        let rules =
            Arc::new(Rules::load(&settings.routes_path, targets).map_err(StartError::Rules)?);
        let metrics = Arc::new(Metrics::new());
        let graph = Arc::new(
            GraphClient::new(
                &settings.meta.graph_url,
                &settings.meta.graph_version,
                settings.meta.graph_http,
                settings.sender.timeout,
                metrics.clone(),
            )
            .map_err(StartError::Other)?,
        );
        let events =
            Arc::new(Events::new(&settings.targets, metrics.clone()).map_err(StartError::Other)?);
        // Bind first: a second router on the same address stops here,
        // before it touches the data directory.
        let listener = TcpListener::bind(&settings.listen).map_err(|e| StartError::Listen {
            addr: settings.listen.clone(),
            reason: e.to_string(),
        })?;
        if let Some(dir) = &settings.data_dir {
            lock_data_dir(dir)?;
        }
        let archive = Arc::new(
            crate::archive::Archive::open(settings.data_dir.as_deref())
                .map_err(|e| StartError::Storage(format!("cannot open the archive: {e}")))?,
        );
        let (state, mut new_accounts) =
            State::new(&settings.accounts, metrics.clone(), archive.clone());
        let state = Arc::new(state);
        state.start_archiving();
        // Status changes go to targets subscribed to them and to the live
        // stream (`GET /v1/stream`) while anyone listens.
        let (outbox, mut status_changes) = Outbox::new(state.clone(), metrics.clone());
        let outbox = Arc::new(outbox);
        {
            let events = events.clone();
            outbox.report_statuses_when(move || events.wants_statuses() || events.streaming());
        }
        outbox.start_archiving();
        let cluster = match &settings.cluster {
            Some(c) => Some(
                crate::cluster::Cluster::connect(c)
                    .await
                    .map_err(|e| StartError::Storage(e.to_string()))?,
            ),
            None => None,
        };
        // SPEC §9: replay the journal (a cluster's log) before anything is
        // accepted.
        let restored = match (&cluster, &settings.data_dir) {
            (Some(cluster), _) => {
                Some(open_cluster(&state, &outbox, &events, cluster, settings.sandbox).await?)
            }
            (None, Some(dir)) => {
                Some(open_storage(&state, &outbox, &events, dir, settings.sandbox).await?)
            }
            (None, None) => None,
        };
        let (lanes, lane_receivers) = Lanes::new();
        let lanes = Arc::new(lanes);
        let port = listener
            .local_addr()
            .map_err(|e| StartError::Other(e.to_string()))?
            .port();
        let bodies = Arc::new(crate::body::BodyLimits::new(
            settings.http.body_timeout,
            settings.http.max_buffered,
        ));
        let webhook = Arc::new(webhook::Ctx {
            meta: settings.meta.clone(),
            sandbox: settings.sandbox,
            bodies: bodies.clone(),
            metrics: metrics.clone(),
            state: state.clone(),
            outbox: outbox.clone(),
            lanes: lanes.clone(),
            events: events.clone(),
            max_backlog: settings.http.max_backlog,
            gate: Default::default(),
            cluster: cluster.clone(),
        });
        let api = Arc::new(api::Ctx {
            keys: api::Ctx::limiters(&settings.api.keys, settings.api.rate, settings.api.burst),
            bodies: bodies.clone(),
            state: state.clone(),
            outbox: outbox.clone(),
            validity: settings.sender.validity,
            handoff_ttl: settings.conversations.handoff_ttl,
            events: events.clone(),
            rate_burst: (settings.api.rate, settings.api.burst),
            cluster: cluster.clone(),
        });
        let ops = Arc::new(ops::Ctx {
            key: settings.ops_key.clone(),
            sandbox: settings.sandbox,
            ready: AtomicBool::new(false),
            state: state.clone(),
            outbox: outbox.clone(),
            rules: rules.clone(),
            metrics: metrics.clone(),
            events: events.clone(),
            bodies,
            cluster: cluster.clone(),
        });
        let router = Arc::new(routing::Router {
            state: state.clone(),
            outbox: outbox.clone(),
            rules: rules.clone(),
            metrics,
            events: events.clone(),
            graph: graph.clone(),
            lanes: lanes.clone(),
            validity: settings.sender.validity,
            handoff_ttl: settings.conversations.handoff_ttl,
        });
        let sender = Arc::new(outbound::sender::Sender {
            outbox: outbox.clone(),
            graph,
            settings: settings.sender.clone(),
            owns: cluster
                .clone()
                .map(|c| Arc::new(move |account: &str| c.owns(account)) as outbound::sender::Owns),
        });
        let shared = Arc::new(Shared {
            settings: settings.clone(),
            state,
            outbox,
            events: events.clone(),
            lanes: lanes.clone(),
            ops: ops.clone(),
        });
        let (stop, stop_rx) = watch::channel(false);

        for receiver in lane_receivers {
            tokio::spawn(routing::run_lane(router.clone(), receiver));
        }
        if restored.is_some() {
            // History the replay put back in memory leaves it again, after
            // the start rather than before it.
            let state = shared.state.clone();
            tokio::task::spawn_blocking(move || state.archive_all_recent());
        }
        if let Some(restored) = restored {
            // Acknowledged before the stop, rules not yet run: run them now.
            for (account, msg, new_conversation) in restored.pending {
                lanes.push(routing::Job {
                    account,
                    msg,
                    new_conversation,
                    replayed: true,
                });
            }
        }
        if let Some(cluster) = &cluster {
            cluster.spawn_health();
            let delivers = cluster.clone();
            shared
                .events
                .deliver_when(Arc::new(move |target: &str| delivers.delivers(target)));
            cluster.spawn_leases(Arc::new(ClusterHooks {
                events: shared.events.clone(),
                state: shared.state.clone(),
                outbox: shared.outbox.clone(),
                lanes: lanes.clone(),
                webhook: webhook.clone(),
            }));
        }
        let maintenance = spawn_maintenance(shared.clone(), stop_rx.clone());
        {
            // One paced sender per account, including sandbox accounts that
            // appear later with their first webhook.
            let stop_rx = stop_rx.clone();
            tokio::spawn(async move {
                while let Some(account) = new_accounts.recv().await {
                    tokio::spawn(outbound::sender::run(
                        sender.clone(),
                        account,
                        stop_rx.clone(),
                    ));
                }
            });
        }
        {
            let events = events.clone();
            tokio::spawn(async move {
                while let Some(record) = status_changes.recv().await {
                    events.message_status(&record);
                }
            });
        }
        events.spawn_workers(stop_rx.clone());
        crate::rules::reload::spawn(rules, stop_rx);

        let (webhook, api, ops_data) = (
            web::Data::from(webhook),
            web::Data::from(api),
            web::Data::from(ops.clone()),
        );
        let workers = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(1, 8);
        let server = HttpServer::new(move || {
            // Runs on each HTTP worker's thread.
            crate::memory::collect_on_this_thread();
            ActixApp::new()
                .wrap_fn(|req, srv| {
                    crate::memory::busy();
                    srv.call(req)
                })
                .app_data(webhook.clone())
                .app_data(api.clone())
                .app_data(ops_data.clone())
                .configure(routes)
                .default_service(web::to(not_found))
        })
        .workers(workers)
        // actix counts connections per worker.
        .max_connections(settings.http.max_connections.div_ceil(workers))
        .client_request_timeout(Duration::from_secs(5))
        .client_disconnect_timeout(Duration::from_secs(1))
        .disable_signals()
        .shutdown_timeout(5)
        .listen(listener)
        .map_err(|e| StartError::Listen {
            addr: settings.listen.clone(),
            reason: e.to_string(),
        })?
        .run();

        ops.ready.store(true, Ordering::Release);
        Ok(App {
            port,
            server,
            shared,
            stop,
            maintenance,
            cluster,
        })
    }

    /// The port actually bound (tests bind port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serve until SIGTERM or SIGINT; then stop intake, finish in-flight
    /// requests (5 s at most) and stop the workers.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let handle = self.server.handle();
        let server = tokio::spawn(self.server);
        shutdown_signal().await;
        tracing::info!("shutting down: no new requests, finishing in-flight ones");
        self.shared.events.end_streams();
        handle.stop(true).await;
        let _ = self.stop.send(true);
        let _ = self.maintenance.await;
        if let Some(cluster) = &self.cluster {
            // What this router did is in the log; another router takes
            // its accounts over now rather than after the lease runs out.
            let synced = self.shared.state.sync().await;
            cluster.release().await;
            tracing::info!(synced, "leases given back");
        }
        if self
            .shared
            .state
            .journal()
            .is_some_and(|j| j.dir().is_some())
        {
            // Everything accepted is on disk; leave a snapshot for a fast start.
            let synced = self.shared.state.sync().await;
            match compact(&self.shared.outbox, &self.shared.events).await {
                Ok(n) => tracing::info!(synced, objects = n, "state saved"),
                Err(e) => {
                    tracing::error!(error = %e, "could not write the final snapshot; the journal still holds everything")
                }
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), server).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
            Err(_) => Ok(()),
        }
    }

    /// Serve in the background (tests); the server stops when the runtime ends.
    pub fn spawn(self) -> Arc<Shared> {
        let shared = self.shared.clone();
        tokio::spawn(self.server);
        std::mem::forget(self.stop);
        shared
    }
}

/// Create `data_dir` and take its lock: one router per data_dir, a second
/// one must not replay and compact under a running one. The lock is held
/// until the process ends.
fn lock_data_dir(dir: &std::path::Path) -> Result<(), StartError> {
    crate::journal::create_private_dir(dir).map_err(|e| {
        StartError::Storage(format!(
            "{}: cannot create the data directory: {e}",
            dir.display()
        ))
    })?;
    let lock = crate::journal::lock(dir).map_err(|e| StartError::Storage(e.to_string()))?;
    std::mem::forget(lock);
    Ok(())
}

/// A journal record decoded for the store that wrote it.
enum Replayed {
    State(crate::state::ops::StateOp),
    Outbox(crate::outbound::ops::OutboxOp<'static>),
    Events(crate::events::ops::EventOp),
}

fn decode_record(payload: &[u8]) -> Result<Replayed, String> {
    let (owner, json) = crate::persist::decode(payload)?;
    // UTF-8 checked once for the whole record, not string by string as
    // `from_slice` does (perf of a restart: 11 % of the reader thread).
    let json = std::str::from_utf8(json).map_err(|e| e.to_string())?;
    let error = |e: serde_json::Error| e.to_string();
    Ok(match owner {
        Owner::State => Replayed::State(serde_json::from_str(json).map_err(error)?),
        Owner::Outbox => Replayed::Outbox(serde_json::from_str(json).map_err(error)?),
        Owner::Events => Replayed::Events(serde_json::from_str(json).map_err(error)?),
    })
}

/// Hand a decoded record to its store (replay of the journal or, in a
/// cluster, of the shared log).
fn apply_record(state: &State, outbox: &Outbox, events: &Events, record: Replayed, sandbox: bool) {
    match record {
        Replayed::State(op) => state.restore_op(op, sandbox),
        Replayed::Outbox(op) => outbox.restore_op(op, sandbox),
        Replayed::Events(op) => events.restore_op(op),
    }
}

/// Open `data_dir`: replay the journal into `state`, attach the journal,
/// and write a fresh snapshot so the next start replays little.
async fn open_storage(
    state: &State,
    outbox: &Arc<Outbox>,
    events: &Arc<Events>,
    dir: &std::path::Path,
    sandbox: bool,
) -> Result<crate::state::restore::Restored, StartError> {
    let started = std::time::Instant::now();
    crate::journal::remove_stale_snapshots(dir);
    let log_bytes = crate::journal::log_bytes(dir);
    // Startup: nothing else runs yet, so replaying inline blocks no one.
    // Each record goes to the store that wrote it (crate::persist),
    // decoded on the replay's reader thread.
    let (ops, next) = crate::journal::replay_decoded(dir, decode_record, |record| {
        apply_record(state, outbox, events, record, sandbox)
    })
    .map_err(|e| StartError::Storage(format!("{e} (move the file aside to start without it)")))?;
    // Attach the journal first: settling interrupted sends is journaled too.
    let journal =
        crate::journal::Journal::open(dir, next).map_err(|e| StartError::Storage(e.to_string()))?;
    events.attach_journal(journal.clone());
    state.attach_journal(journal);
    let restored = state.finish_restore(sandbox);
    let restored_outbox = outbox.finish_restore(crate::domain::now_ms());
    let undelivered = events.finish_restore();
    // A fresh snapshot only when the logs grew large: replaying a snapshot
    // plus small logs is quicker than writing the snapshot again.
    if log_bytes > COMPACT_AT_BYTES {
        compact(outbox, events).await.map_err(|e| {
            StartError::Storage(format!("{}: cannot write a snapshot: {e}", dir.display()))
        })?;
    }
    tracing::info!(
        ops,
        records = restored_outbox.records,
        conversations = restored.conversations,
        pending_inbound = restored.pending.len(),
        interrupted_sends = restored_outbox.interrupted,
        undelivered_events = undelivered,
        ms = started.elapsed().as_millis() as u64,
        dir = %dir.display(),
        "state restored"
    );
    Ok(restored)
}

/// Cluster mode: replay the shared log, make it this router's journal and
/// follow what the other routers append. Nothing is settled or routed
/// here: that is for whoever takes each account's lease.
async fn open_cluster(
    state: &Arc<State>,
    outbox: &Arc<Outbox>,
    events: &Arc<Events>,
    cluster: &Arc<crate::cluster::Cluster>,
    sandbox: bool,
) -> Result<crate::state::restore::Restored, StartError> {
    let started = std::time::Instant::now();
    let (last, ops) = cluster
        .replay(|payload| {
            apply_record(state, outbox, events, decode_record(payload)?, sandbox);
            Ok(())
        })
        .await
        .map_err(|e| StartError::Storage(e.to_string()))?;
    let journal = cluster.journal();
    events.attach_journal(journal.clone());
    state.attach_journal(journal);
    let mut restored = state.finish_restore(sandbox);
    restored.pending.clear();
    let restored_outbox = outbox.finish_restore_shared(crate::domain::now_ms());
    let undelivered = events.finish_restore();
    {
        let (state, outbox, owner) = (state.clone(), outbox.clone(), cluster.clone());
        let events = events.clone();
        cluster.spawn_follow(last, move |payload| {
            let (kind, json) = crate::persist::decode(payload)?;
            // What the other routers did shows on this router's live
            // stream too (`GET /v1/stream`, the console).
            match kind {
                Owner::State => {
                    if let Some((account, msg)) = state.apply_remote(json, sandbox)?
                        && events.streaming()
                        && let Some(a) = state.account_by_name(&account)
                    {
                        let view = state.conversation(&a, msg.from.as_str());
                        events.stream_inbound(&account, &msg, view.as_ref());
                    }
                    Ok(())
                }
                Owner::Outbox => {
                    if let Some(record) = outbox.apply_remote(json, |a| owner.owns(a))? {
                        events.stream_status(&record);
                    }
                    Ok(())
                }
                Owner::Events => events.apply_remote(json),
            }
        });
    }
    tracing::info!(
        ops,
        node = %cluster.node,
        records = restored_outbox.records,
        conversations = restored.conversations,
        undelivered_events = undelivered,
        ms = started.elapsed().as_millis() as u64,
        "cluster log replayed"
    );
    Ok(restored)
}

/// What the holder of an account's lease does (cluster mode).
struct ClusterHooks {
    events: Arc<Events>,
    state: Arc<State>,
    outbox: Arc<Outbox>,
    lanes: Arc<Lanes>,
    webhook: Arc<webhook::Ctx>,
}

impl crate::cluster::LeaseHooks for ClusterHooks {
    fn accounts(&self) -> Vec<(String, String)> {
        self.state
            .accounts()
            .iter()
            .map(|a| (a.name().to_string(), a.settings.phone_number_id.clone()))
            .collect()
    }

    fn targets(&self) -> Vec<String> {
        self.events.target_names()
    }

    fn dump(&self) -> crate::cluster::Dump {
        let (state, outbox, events) =
            (self.state.clone(), self.outbox.clone(), self.events.clone());
        Box::new(move |emit| {
            state.dump(emit);
            outbox.dump(emit);
            events.dump(emit);
        })
    }

    fn deliver(&self, target: &str) {
        tracing::info!(target, "delivering the target's events");
        self.events.wake();
    }

    fn take_over(&self, account: &str) {
        let Some(account) = self.state.account_by_name(account) else {
            return;
        };
        let interrupted = self.outbox.take_over(&account, crate::domain::now_ms());
        let mut pending = self.state.pending_of(&account);
        pending.sort_by(|a, b| (a.0.timestamp, &a.0.wamid).cmp(&(b.0.timestamp, &b.0.wamid)));
        tracing::info!(
            account = account.name(),
            interrupted_sends = interrupted,
            pending_inbound = pending.len(),
            "took the account over"
        );
        for (msg, new_conversation) in pending {
            self.lanes.push(routing::Job {
                account: account.clone(),
                msg,
                new_conversation,
                replayed: true,
            });
        }
    }

    fn inbound<'a>(
        &'a self,
        phone_number_id: &'a str,
        body: &'a [u8],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(webhook::accept_shared(&self.webhook, phone_number_id, body))
    }

    fn command(&self, phone_number_id: &str, json: &[u8]) {
        use crate::cluster::Command;
        let Some(account) = self.state.account_by_pnid(phone_number_id) else {
            return;
        };
        let command: Command = match serde_json::from_slice(json) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "an unreadable command in an inbound stream");
                return;
            }
        };
        api::conversations::execute(&self.state, &self.outbox, &account, command);
    }

    fn drained(&self, account: &str) -> bool {
        self.state.account_by_name(account).is_none_or(|a| {
            self.outbox.queue(&a).in_flight() == 0 && self.state.pending_of(&a).is_empty()
        })
    }

    fn sync(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        Box::pin(self.state.sync())
    }
}

/// Log size that triggers a snapshot.
const COMPACT_AT_BYTES: u64 = 64 * 1024 * 1024;

/// Snapshot the whole state and drop the logs it covers. One compaction
/// runs at a time; none after the journal failed (the newest log must stay
/// the one that holds the last good records).
pub async fn compact(outbox: &Arc<Outbox>, events: &Arc<Events>) -> Result<usize, String> {
    let state = outbox.state().clone();
    let journal = state.journal().ok_or("memory mode")?.clone();
    let _one_at_a_time = journal.compaction().await;
    if journal.has_failed() {
        return Err("the journal failed; no snapshot until restart".into());
    }
    let next = journal.rotate().await?;
    let dir = journal.dir().ok_or("memory mode")?.to_path_buf();
    let (outbox, events) = (outbox.clone(), events.clone());
    // Written as it is read: a million conversations are never all
    // encoded in memory at once.
    tokio::task::spawn_blocking(move || {
        crate::journal::install_snapshot_with(
            &dir,
            next,
            |emit| {
                state.dump(emit);
                outbox.dump(emit);
                events.dump(emit);
            },
            // What left memory for the archive is in no snapshot: it must
            // be durable there before the logs that hold it go.
            || state.archive().sync_blocking(),
        )
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// Background upkeep: drop what is past `retention` (every minute) and,
/// with a data_dir, snapshot when the log grows large.
fn spawn_maintenance(
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = stop.changed() => break,
            }
            ticks += 1;
            // What grew with a spike gives its room back once it is gone.
            shared.outbox.shrink_if_sparse();
            shared.state.shrink_if_sparse();
            if ticks.is_multiple_of(12) {
                let now = crate::domain::now_ms();
                let records = shared.outbox.prune(now, shared.settings.retention);
                let conversations = shared.state.prune(now, shared.settings.retention);
                // The archive scans its history to prune it: once an hour
                // (and in the first minute).
                let mut archived = 0;
                if ticks % 720 == 12 {
                    let cutoff = now - shared.settings.retention.as_millis() as i64;
                    archived = shared
                        .state
                        .archive()
                        .prune(&crate::ids::MessageId::time_floor(cutoff), cutoff)
                        .await;
                }
                if archived > 0 {
                    shared.outbox.recount_held();
                }
                if records + conversations + archived > 0 {
                    tracing::info!(
                        records,
                        conversations,
                        archived,
                        "dropped data past retention"
                    );
                }
            }
            let big = shared
                .state
                .journal()
                .is_some_and(|j| !j.has_failed() && j.log_bytes() > COMPACT_AT_BYTES);
            if big && let Err(e) = compact(&shared.outbox, &shared.events).await {
                tracing::error!(error = %e, "compaction failed");
            }
        }
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Every endpoint; a known path with another method answers 405.
fn routes(cfg: &mut web::ServiceConfig) {
    use api::{conversations as c, messages as m};
    let resource =
        |path: &str| web::resource(path.to_string()).default_service(web::to(method_not_allowed));
    cfg.service(
        resource("/webhook")
            .route(web::get().to(webhook::handshake))
            .route(web::post().to(webhook::receive)),
    )
    .service(resource("/console").route(web::get().to(crate::console::page)))
    .service(resource("/healthz").route(web::get().to(ops::healthz)))
    .service(resource("/readyz").route(web::get().to(ops::readyz)))
    .service(resource("/metrics").route(web::get().to(ops::metrics)))
    .service(resource("/openapi.json").route(web::get().to(api::openapi::serve)))
    .service(
        resource("/v1/messages")
            .route(web::post().to(m::send))
            .route(web::get().to(m::list)),
    )
    .service(
        resource("/v1/messages/{id}")
            .route(web::get().to(m::get))
            .route(web::delete().to(m::cancel)),
    )
    .service(resource("/v1/messages/{id}/retry").route(web::post().to(m::retry)))
    .service(resource("/v1/conversations").route(web::get().to(c::list)))
    .service(resource("/v1/conversations/{account}/{wa_id}").route(web::get().to(c::get)))
    .service(
        resource("/v1/conversations/{account}/{wa_id}/messages").route(web::get().to(c::messages)),
    )
    .service(
        resource("/v1/conversations/{account}/{wa_id}/state").route(web::put().to(c::put_state)),
    )
    .service(
        resource("/v1/conversations/{account}/{wa_id}/handoff")
            .route(web::post().to(c::handoff))
            .route(web::delete().to(c::release)),
    )
    .service(
        resource("/v1/conversations/{account}/{wa_id}/opt-out")
            .route(web::post().to(c::opt_out))
            .route(web::delete().to(c::opt_in)),
    )
    .service(resource("/v1/queues").route(web::get().to(c::queues)))
    .service(resource("/v1/stream").route(web::get().to(api::stream::stream)));
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this endpoint does not take that method",
    ))
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(ErrorCode::NotFound, "no such endpoint"))
}
