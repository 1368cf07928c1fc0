//! Logs (tracing to stderr, text or JSON lines) and the metrics registry.
//!
//! Each app owns its own [`Metrics`], so test servers running side by side
//! never share counters. Log ids and codes; never tokens, secrets or
//! message text at info.

use parking_lot::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Install the global subscriber (`RUST_LOG` filter, default `info`).
pub fn init(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::env::var_os("NO_COLOR").is_none())
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabel {
    account: String,
}

/// One account's queue at scrape time.
#[derive(Debug, Default)]
pub struct QueueGauges {
    pub account: String,
    pub queued: usize,
    pub scheduled: usize,
    pub in_flight: usize,
    /// Send starts per second at most, now (Meta's upgrade raises it).
    pub rate: u32,
}

/// Values read at scrape time.
#[derive(Debug, Default)]
pub struct ScrapeGauges {
    pub open_windows: usize,
    pub queues: Vec<QueueGauges>,
    /// (target, events, bytes)
    pub backlog: Vec<(String, usize, usize)>,
    pub body_buffered: usize,
    /// Outbound records in memory (live and not yet archived).
    pub records_in_memory: usize,
    /// Rows handed to the archive and not yet committed.
    pub archive_backlog: u64,
    /// Bytes on disk of the journal (`None` without one: memory mode, or
    /// a cluster's journal on Redis) and of the archive.
    pub journal_bytes: Option<u64>,
    pub archive_bytes: u64,
    /// fdatasyncs of the journal so far (0 without a journal of files).
    pub journal_syncs: u64,
}

/// Upper bounds (s) of the webhook ack histogram: fine around the few
/// milliseconds a durable ack takes (an fdatasync), 5 ms among them.
const ACK_BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The `wa_router_*` metric families (SPEC §10).
pub struct Metrics {
    registry: Mutex<Registry>,
    webhooks: Family<ResultLabel, Counter>,
    inbound: Family<TypeLabel, Counter>,
    rule_matches: Family<RuleLabel, Counter>,
    outbound: Family<StatusLabel, Counter>,
    queue_depth: Family<AccountLabel, Gauge>,
    scheduled: Family<AccountLabel, Gauge>,
    in_flight: Family<AccountLabel, Gauge>,
    rate: Family<AccountLabel, Gauge>,
    open_windows: Gauge,
    graph_latency: Histogram,
    webhook_ack: Histogram,
    event_deliveries: Family<ResultLabel, Counter>,
    event_backlog: Family<TargetLabel, Gauge>,
    event_backlog_bytes: Family<TargetLabel, Gauge>,
    body_buffered: Gauge,
    records_in_memory: Gauge,
    archive_backlog: Gauge,
    storage_bytes: Family<StoreLabel, Gauge>,
    journal_syncs: Counter,
    records_evicted: Counter,
    priced: Family<PricingLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PricingLabel {
    category: String,
    r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabel {
    store: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabel {
    target: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("wa_router");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            webhooks: Family::default(),
            inbound: Family::default(),
            rule_matches: Family::default(),
            outbound: Family::default(),
            queue_depth: Family::default(),
            in_flight: Family::default(),
            rate: Family::default(),
            scheduled: Family::default(),
            open_windows: Gauge::default(),
            graph_latency: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            webhook_ack: Histogram::new(ACK_BUCKETS.iter().copied()),
            event_deliveries: Family::default(),
            event_backlog: Family::default(),
            event_backlog_bytes: Family::default(),
            body_buffered: Gauge::default(),
            records_in_memory: Gauge::default(),
            archive_backlog: Gauge::default(),
            storage_bytes: Family::default(),
            journal_syncs: Counter::default(),
            records_evicted: Counter::default(),
            priced: Family::default(),
        };
        r.register(
            "priced_messages",
            "Outbound messages Meta priced, by pricing category and type (regular = charged), counted once a message",
            m.priced.clone(),
        );
        r.register(
            "webhooks",
            "Webhook notifications received, by result",
            m.webhooks.clone(),
        );
        r.register(
            "inbound_messages",
            "Inbound messages processed, by type",
            m.inbound.clone(),
        );
        r.register(
            "rule_matches",
            "Inbound messages matched, by rule",
            m.rule_matches.clone(),
        );
        r.register(
            "outbound_messages",
            "Outbound message status changes, by status",
            m.outbound.clone(),
        );
        r.register(
            "queue_depth",
            "Messages queued per account",
            m.queue_depth.clone(),
        );
        r.register(
            "sends_in_flight",
            "Sends awaiting Meta's answer per account",
            m.in_flight.clone(),
        );
        r.register(
            "send_rate",
            "Send starts per second at most per account (rate; Meta's throughput upgrade raises an unset one)",
            m.rate.clone(),
        );
        r.register(
            "scheduled_messages",
            "Messages scheduled per account",
            m.scheduled.clone(),
        );
        r.register(
            "open_windows",
            "Conversations with an open 24 h window",
            m.open_windows.clone(),
        );
        r.register(
            "graph_request_duration_seconds",
            "Graph API request latency",
            m.graph_latency.clone(),
        );
        r.register(
            "webhook_ack_duration_seconds",
            "Webhook notifications answered 200: time from the handler's start to the answer (body read, signature checked, the router caught up, recorded)",
            m.webhook_ack.clone(),
        );
        r.register(
            "event_backlog",
            "Events waiting for delivery, per target",
            m.event_backlog.clone(),
        );
        r.register(
            "event_backlog_bytes",
            "Bytes of events waiting for delivery, per target",
            m.event_backlog_bytes.clone(),
        );
        r.register(
            "request_body_buffered_bytes",
            "Request body bytes buffered right now (all requests; [http] max_buffered)",
            m.body_buffered.clone(),
        );
        r.register(
            "records_in_memory",
            "Outbound records in memory: queued, scheduled, in flight, and settled ones not yet archived",
            m.records_in_memory.clone(),
        );
        r.register(
            "archive_backlog",
            "History entries and settled records handed to the archive and not yet committed",
            m.archive_backlog.clone(),
        );
        r.register(
            "storage_bytes",
            "Bytes on disk, by store: the journal (its logs and snapshot) and the archive (its database, write-ahead log and index; in memory mode a temporary file)",
            m.storage_bytes.clone(),
        );
        r.register(
            "journal_syncs",
            "fdatasyncs of the journal's log (each shared by every ack and send that waited for it: group commit); 0 in memory mode and in a cluster, whose journal is on Redis",
            m.journal_syncs.clone(),
        );
        r.register(
            "records_evicted",
            "Finished outbound records dropped before retention because an account held max_records",
            m.records_evicted.clone(),
        );
        r.register(
            "event_deliveries",
            "Event deliveries to targets, by result",
            m.event_deliveries.clone(),
        );
        *m.registry.lock() = r;
        m
    }

    pub fn webhook(&self, result: &'static str) {
        self.webhooks.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn inbound(&self, kind: &'static str) {
        self.inbound
            .get_or_create(&TypeLabel { r#type: kind })
            .inc();
    }

    pub fn rule_match(&self, rule: &str) {
        self.rule_matches
            .get_or_create(&RuleLabel { rule: rule.into() })
            .inc();
    }

    /// A message's first `pricing` object from Meta.
    pub fn priced(&self, pricing: &crate::message::Object) {
        #[derive(Default, serde::Deserialize)]
        struct Fields {
            category: Option<serde_json::Value>,
            r#type: Option<serde_json::Value>,
        }
        let f: Fields = pricing.read();
        let field = |v: Option<serde_json::Value>| {
            v.as_ref()
                .and_then(serde_json::Value::as_str)
                .filter(|v| !v.is_empty() && v.len() <= 64)
                .unwrap_or("unknown")
                .to_ascii_lowercase()
        };
        self.priced
            .get_or_create(&PricingLabel {
                category: field(f.category),
                r#type: field(f.r#type),
            })
            .inc();
    }

    pub fn outbound(&self, status: &'static str) {
        self.outbound.get_or_create(&StatusLabel { status }).inc();
    }

    pub fn records_evicted(&self, n: usize) {
        self.records_evicted.inc_by(n as u64);
    }

    pub fn graph_request(&self, seconds: f64) {
        self.graph_latency.observe(seconds);
    }

    /// A webhook answered `200`, `seconds` after its handler started.
    pub fn webhook_ack(&self, seconds: f64) {
        self.webhook_ack.observe(seconds);
    }

    pub fn event_delivery(&self, result: &'static str) {
        self.event_deliveries
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Prometheus text, after setting the gauges read at scrape time.
    pub fn render(&self, g: &ScrapeGauges) -> String {
        self.open_windows.set(g.open_windows as i64);
        self.body_buffered.set(g.body_buffered as i64);
        self.records_in_memory.set(g.records_in_memory as i64);
        self.archive_backlog.set(g.archive_backlog as i64);
        let stores = [
            ("journal", g.journal_bytes),
            ("archive", Some(g.archive_bytes)),
        ];
        for (store, bytes) in stores {
            if let Some(b) = bytes {
                self.storage_bytes
                    .get_or_create(&StoreLabel { store })
                    .set(b as i64);
            }
        }
        for (target, n, bytes) in &g.backlog {
            let label = TargetLabel {
                target: target.clone(),
            };
            self.event_backlog.get_or_create(&label).set(*n as i64);
            self.event_backlog_bytes
                .get_or_create(&label)
                .set(*bytes as i64);
        }
        let queues = &g.queues;
        for q in queues {
            let label = AccountLabel {
                account: q.account.clone(),
            };
            self.queue_depth.get_or_create(&label).set(q.queued as i64);
            self.scheduled.get_or_create(&label).set(q.scheduled as i64);
            self.in_flight.get_or_create(&label).set(q.in_flight as i64);
            self.rate.get_or_create(&label).set(i64::from(q.rate));
        }
        let mut out = String::new();
        let registry = self.registry.lock();
        // The journal counts its own syncs; the counter catches up with it
        // (under the registry's lock: one scrape at a time adds).
        let counted = self.journal_syncs.get();
        if g.journal_syncs > counted {
            self.journal_syncs.inc_by(g.journal_syncs - counted);
        }
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}
