//! The load harness of `bench/run` (issue #9): one case per run, on
//! loopback only, bounded in time, stopping only what it started.
//!
//! It starts a mock Graph API (counts and timestamps every send, can add
//! latency, jitter and 429/500 faults), the router under test as a child
//! process (wa-router in memory or durable mode, or any command given with
//! `--peer-cmd`, e.g. the pywa app), pre-generates distinct signed webhooks
//! of the reference bot scenario (`hi` → buttons, button `sales` → text,
//! list reply → text, other text → echo) and drives them closed-loop (N
//! connections) or at an offered rate. It prints one CSV line:
//! acks/s, ack p50/p99, Graph requests/s during the load, reply lag after
//! the load, replies lost, per-contact order violations, peak RSS and CPU
//! ms per reply.
//!
//! `cargo bench --bench load -- --help` lists the options.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix_web::{App, HttpResponse, HttpServer, web};
use parking_lot::Mutex;
use serde_json::json;

const SECRET: &str = "bench-secret";
const PNID: &str = "100000000000001";
const CONTACTS: usize = 10_000;

pub const ROUTES: &str = r#"
[[rule]]
name = "hi"
when = { text = "hi" }
[[rule.send]]
type = "buttons"
body = "Hi {{ contact.name }}! What do you need?"
buttons = [ { id = "sales", title = "Sales" }, { id = "support", title = "Support" } ]

[[rule]]
name = "sales"
when = { button = "sales" }
[[rule.send]]
type = "text"
body = "Sales will write to you shortly."

[[rule]]
name = "list"
when = { type = "list" }
[[rule.send]]
type = "text"
body = "You picked {{ reply.title }}."

[[rule]]
name = "echo"
when = { type = "text" }
[[rule.send]]
type = "text"
body = "{{ message.text }}"
"#;

#[derive(Debug, Clone)]
struct Args {
    target: String,
    peer_cmd: Option<String>,
    peer_port: u16,
    connections: usize,
    rate: Option<u64>,
    seconds: u64,
    latency_ms: u64,
    jitter_ms: u64,
    fault_429: f64,
    fault_500: f64,
    router_rate: u32,
    max_in_flight: usize,
    /// The router's `[http] max_backlog` (its default if not given).
    max_backlog: Option<usize>,
    messages: usize,
    label: String,
    wait_s: u64,
    /// How long after the last reply the idle RSS is read.
    settle_s: u64,
    contacts: usize,
    /// `--target cluster`: this many routers on the Redis at `redis_url`.
    routers: usize,
    redis_url: Option<String>,
    /// Counted with the routers' RSS and CPU.
    redis_pid: Option<u32>,
    /// After the replies: a `delivered` status for every send, posted
    /// closed-loop on the same connections (what a campaign gets back).
    statuses: bool,
    /// During the load: Meta's `sent` (a quarter of a second after the
    /// mock answered) and `delivered` (a second after) for every send, on
    /// the same connections (a live campaign: statuses interleaved with
    /// inbound messages).
    live_statuses: bool,
    /// The router's `[meta] graph_http` ("1.1" or "2"); the mock speaks both.
    graph_http: String,
    /// `--timeline FILE`: a CSV row every `timeline_every_s` while the load
    /// runs (a soak: does memory follow live work, and what the disk holds).
    timeline: Option<PathBuf>,
    timeline_every_s: u64,
}

fn parse_args() -> Args {
    let mut a = Args {
        target: "memory".into(),
        peer_cmd: None,
        peer_port: 0,
        connections: 64,
        rate: None,
        seconds: 10,
        latency_ms: 0,
        jitter_ms: 0,
        fault_429: 0.0,
        fault_500: 0.0,
        router_rate: 1_000_000,
        max_in_flight: 1024,
        max_backlog: None,
        messages: 400_000,
        label: String::new(),
        wait_s: 120,
        settle_s: 5,
        contacts: CONTACTS,
        routers: 1,
        redis_url: None,
        redis_pid: None,
        statuses: false,
        live_statuses: false,
        graph_http: "1.1".into(),
        timeline: None,
        timeline_every_s: 10,
    };
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|x| x != "--bench")
        .collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--target" => a.target = v,
            "--peer-cmd" => a.peer_cmd = Some(v),
            "--peer-port" => a.peer_port = v.parse().expect("--peer-port N"),
            "--connections" => a.connections = v.parse().expect("--connections N"),
            "--rate" => a.rate = Some(v.parse().expect("--rate N (msg/s)")),
            "--seconds" => a.seconds = v.parse().expect("--seconds N"),
            "--latency-ms" => a.latency_ms = v.parse().expect("--latency-ms N"),
            "--jitter-ms" => a.jitter_ms = v.parse().expect("--jitter-ms N"),
            "--fault-429" => a.fault_429 = v.parse().expect("--fault-429 F"),
            "--fault-500" => a.fault_500 = v.parse().expect("--fault-500 F"),
            "--router-rate" => a.router_rate = v.parse().expect("--router-rate N"),
            "--max-in-flight" => a.max_in_flight = v.parse().expect("--max-in-flight N"),
            "--max-backlog" => a.max_backlog = Some(v.parse().expect("--max-backlog N")),
            "--graph-http" => a.graph_http = v,
            "--timeline" => a.timeline = Some(PathBuf::from(v)),
            "--timeline-every" => a.timeline_every_s = v.parse().expect("--timeline-every SECONDS"),
            "--messages" => a.messages = v.parse().expect("--messages N"),
            "--label" => a.label = v,
            "--wait" => a.wait_s = v.parse().expect("--wait N"),
            "--settle" => a.settle_s = v.parse().expect("--settle SECONDS"),
            "--contacts" => a.contacts = v.parse().expect("--contacts N"),
            "--routers" => a.routers = v.parse().expect("--routers N"),
            "--redis-url" => a.redis_url = Some(v),
            "--redis-pid" => a.redis_pid = Some(v.parse().expect("--redis-pid PID")),
            "--statuses" => {
                a.statuses = true;
                i += 1;
                continue;
            }
            "--live-statuses" => {
                a.live_statuses = true;
                i += 1;
                continue;
            }
            "--help" | "-h" => {
                println!(
                    "options: --target memory|durable|cluster|peer [--peer-cmd CMD --peer-port N] \
                     [--routers N --redis-url URL --redis-pid PID] \
                     --connections N | --rate MSG_PER_S, --seconds N, --latency-ms N, \
                     --jitter-ms N, --fault-429 F, --fault-500 F, --router-rate N, --max-in-flight N, --max-backlog N, \
                     --messages N, --label TEXT, --wait SECONDS, --settle SECONDS, --contacts N, \
                     --statuses, --live-statuses, --graph-http 1.1|2, \
                     --timeline FILE, --timeline-every SECONDS"
                );
                std::process::exit(0);
            }
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    a
}

/// What the mock Graph API saw.
#[derive(Default)]
struct Seen {
    /// Successful sends: (time, contact, reply-of sequence number).
    sends: Mutex<Vec<(Instant, String, u64)>>,
    /// Echo replies as they reached the mock, before its latency: (time,
    /// the message number they answer), for inbound → Graph latency.
    arrivals: Mutex<Vec<(Instant, u64)>>,
    /// Each wamid the mock answered: (its number, the contact).
    wamids: Mutex<Vec<(Instant, usize, String)>>,
    requests: AtomicUsize,
}

struct Mock {
    seen: Arc<Seen>,
    latency: Duration,
    jitter_ms: u64,
    fault_429: f64,
    fault_500: f64,
    counter: AtomicUsize,
}

/// What the mock reads of a send: borrowed, the rest skipped (the mock
/// shares the two cores with the router under test).
#[derive(serde::Deserialize, Default)]
struct GraphSend<'a> {
    #[serde(default, borrow)]
    to: Option<std::borrow::Cow<'a, str>>,
    /// pywa 4 addresses a contact by its user id.
    #[serde(default, borrow)]
    recipient: Option<std::borrow::Cow<'a, str>>,
    /// Present on a mark-as-read.
    #[serde(default)]
    status: Option<serde::de::IgnoredAny>,
    #[serde(default, borrow)]
    text: Option<GraphText<'a>>,
}

#[derive(serde::Deserialize)]
struct GraphText<'a> {
    #[serde(borrow)]
    body: std::borrow::Cow<'a, str>,
}

async fn graph(body: web::Bytes, mock: web::Data<Mock>) -> HttpResponse {
    let v: GraphSend = serde_json::from_slice(&body).unwrap_or_default();
    if v.status.is_some() {
        return HttpResponse::Ok()
            .content_type("application/json")
            .body(r#"{"success":true}"#);
    }
    mock.seen.requests.fetch_add(1, Ordering::Relaxed);
    let arrived = Instant::now();
    let mut wait = mock.latency;
    if mock.jitter_ms > 0 {
        wait += Duration::from_millis(fastrand::u64(0..=mock.jitter_ms));
    }
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    let roll = fastrand::f64();
    if roll < mock.fault_429 {
        // Meta's throughput limit, as the Cloud API answers it (no
        // Retry-After header).
        return HttpResponse::TooManyRequests()
            .json(json!({ "error": { "message": "(#130429) rate limit", "code": 130429 } }));
    }
    if roll < mock.fault_429 + mock.fault_500 {
        return HttpResponse::InternalServerError()
            .json(json!({ "error": { "message": "(#1) unknown", "code": 1 } }));
    }
    let to = v.to.or(v.recipient).unwrap_or_default().into_owned();
    let seq = reply_seq(v.text.as_ref().map(|t| &*t.body));
    let quoted = serde_json::to_string(&to).expect("JSON");
    mock.seen
        .sends
        .lock()
        .push((Instant::now(), to.clone(), seq));
    if seq > 0 {
        mock.seen.arrivals.lock().push((arrived, seq));
    }
    let n = mock.counter.fetch_add(1, Ordering::Relaxed);
    let wamid = out_wamid(n, &to);
    mock.seen.wamids.lock().push((Instant::now(), n, to));
    HttpResponse::Ok().content_type("application/json").body(format!(
        r#"{{"messaging_product":"whatsapp","contacts":[{{"input":{quoted},"wa_id":{quoted},"user_id":{quoted}}}],"messages":[{{"id":"{wamid}"}}]}}"#
    ))
}

/// The wamid of the mock's send number `n` to `to`, shaped as Meta's
/// (`../shared/whatsapp/fixtures`): `wamid.` and the base64 of a small
/// protobuf holding the recipient's number and a random-looking hex id.
/// Some 60 characters; one contact's wamids share a prefix, and otherwise
/// they sort at random, not in the order they were sent.
fn out_wamid(n: usize, to: &str) -> String {
    use base64::Engine;
    // Random-looking, and the same for the same n (status webhooks).
    let x = fastrand::Rng::with_seed(n as u64).u64(..);
    let mut raw = vec![0x18, to.len() as u8];
    raw.extend_from_slice(to.as_bytes());
    raw.extend_from_slice(&[0x15, 0x02, 0x00, 0x12, 0x18, 0x14]);
    raw.extend_from_slice(format!("{x:016X}{:04X}", n & 0xFFFF).as_bytes());
    raw.push(0);
    format!(
        "wamid.{}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// The sequence number of the inbound message a reply answers: echo
/// replies carry it in their text (`m<seq>`); others count as 0.
fn reply_seq(text: Option<&str>) -> u64 {
    text.and_then(|t| t.strip_prefix('m'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Inbound message number `i`: a quarter each of `hi`, button `sales`,
/// list replies and echo texts, over `contacts` contacts (default
/// [`CONTACTS`]).
fn webhook(i: usize, ts: i64, contacts: usize) -> Vec<u8> {
    let from = format!("4477{:08}", i % contacts.max(1));
    let id = format!("wamid.bench.in.{i}");
    let msg = match i % 4 {
        0 => {
            json!({ "from": from, "id": id, "timestamp": ts.to_string(), "type": "text", "text": { "body": "hi" } })
        }
        // Button and list answers reply to the business message that
        // offered them (`context`), as Meta sends them.
        1 => json!({ "from": from, "id": id, "timestamp": ts.to_string(), "type": "interactive",
                     "context": { "from": "15550000000", "id": format!("wamid.bench.offer.{i}") },
                     "interactive": { "type": "button_reply", "button_reply": { "id": "sales", "title": "Sales" } } }),
        2 => json!({ "from": from, "id": id, "timestamp": ts.to_string(), "type": "interactive",
                     "context": { "from": "15550000000", "id": format!("wamid.bench.offer.{i}") },
                     "interactive": { "type": "list_reply", "list_reply": { "id": "latte", "title": "Latte" } } }),
        _ => {
            json!({ "from": from, "id": id, "timestamp": ts.to_string(), "type": "text", "text": { "body": format!("m{i}") } })
        }
    };
    serde_json::to_vec(&json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "1", "changes": [{ "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": { "display_phone_number": "15550000000", "phone_number_id": PNID },
            // As Meta sends it since 2026: with the business-scoped user id
            // (pywa 4 requires it).
            "contacts": [{ "profile": { "name": "Bench" }, "wa_id": from, "user_id": format!("US.{from:0>20}") }],
            "messages": [msg]
        } }] }]
    }))
    .expect("JSON")
}

/// A status (`sent`, `delivered`, …) for the mock's send number `n` to
/// `to`, as Meta sends it (with pricing).
fn status_webhook(n: usize, to: &str, ts: i64, status: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "1", "changes": [{ "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": { "display_phone_number": "15550000000", "phone_number_id": PNID },
            "statuses": [{
                "id": out_wamid(n, to),
                "status": status,
                "timestamp": ts.to_string(),
                "recipient_id": to,
                "pricing": { "billable": false, "pricing_model": "PMP",
                             "type": "free_customer_service", "category": "service" }
            }]
        } }] }]
    }))
    .expect("JSON")
}

struct Target {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Target {
    /// Stop what this run started, and only that: SIGTERM (uvicorn then
    /// stops its workers), and after 5 s SIGKILL to the whole process tree.
    fn drop(&mut self) {
        let pid = self.child.id();
        let tree = process_tree(pid);
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let alive = tree
                .iter()
                .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
            if matches!(self.child.try_wait(), Ok(Some(_))) && !alive {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for p in tree {
            let _ = Command::new("kill")
                .args(["-KILL", &p.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.wait();
    }
}

fn router_bin() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::var_os("WA_ROUTER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| here.join("target/release/wa-router"))
}

/// `cluster`: (Redis URL, key prefix, node id) of a cluster's router.
async fn start_router(
    args: &Args,
    graph_url: &str,
    cluster: Option<(&str, &str, usize)>,
) -> Target {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = if args.target == "memory" { "" } else { "data" };
    let cluster = cluster.map_or(String::new(), |(url, prefix, node)| {
        format!("[cluster]\nredis_url = \"{url}\"\nprefix = \"{prefix}\"\nnode_id = \"r{node}\"\n")
    });
    std::fs::write(dir.path().join("routes.toml"), ROUTES).expect("routes");
    let config = format!(
        "listen = \"127.0.0.1:0\"\nroutes = \"routes.toml\"\ndata_dir = \"{data_dir}\"\n\
         [meta]\napp_secret = \"{SECRET}\"\nverify_token = \"bench\"\ngraph_url = \"{graph_url}\"\ngraph_http = \"{}\"\n\
         [[accounts]]\nname = \"main\"\nphone_number_id = \"{PNID}\"\naccess_token = \"bench-token\"\n\
         pace = \"0s\"\nrate = {}\nmax_in_flight = {}\nmax_queue = 10000000\nmax_records = 10000000\n\
         [api]\nkeys = [\"bench-key\"]\n[sender]\ntimeout = \"10s\"\n{http}{cluster}",
        args.graph_http,
        args.router_rate,
        args.max_in_flight,
        http = args
            .max_backlog
            .map_or(String::new(), |n| format!("[http]\nmax_backlog = {n}\n"))
    );
    std::fs::write(dir.path().join("wa-router.toml"), config).expect("config");
    let log = dir.path().join("router.log");
    let mut child = Command::new(router_bin())
        .args(["serve", "-c"])
        .arg(dir.path().join("wa-router.toml"))
        .current_dir(dir.path())
        .env("RUST_LOG", "warn,wa_router::cli=info")
        .env("WA_ROUTER_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", router_bin().display()));
    let re = regex::Regex::new(r#"wa-router listening.*?port(?:=|":)(\d+)"#).expect("regex");
    let deadline = Instant::now() + Duration::from_secs(30);
    let port = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(p) = re.captures(&text).and_then(|c| c[1].parse().ok()) {
            break p;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the router did not start:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Target {
        child,
        port,
        _dir: dir,
    }
}

/// A peer (e.g. the pywa app): `cmd` runs with GRAPH_URL, APP_SECRET and
/// PORT in its environment and must answer webhooks on that port.
async fn start_peer(cmd: &str, port: u16, graph_url: &str) -> Target {
    let dir = tempfile::tempdir().expect("temp dir");
    let child = Command::new("bash")
        .args(["-c", &format!("exec {cmd}")])
        .env("GRAPH_URL", graph_url)
        .env("APP_SECRET", SECRET)
        .env("PHONE_ID", PNID)
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("peer.log")).expect("log"))
        .spawn()
        .expect("peer command");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http
        .get(format!("http://127.0.0.1:{port}/webhook?hub.mode=subscribe&hub.verify_token=bench&hub.challenge=1"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the peer did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Target {
        child,
        port,
        _dir: dir,
    }
}

/// `pid` and its descendants (uvicorn workers), from /proc.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|p| {
                    let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                    let rest = stat.rsplit_once(')')?.1;
                    let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
                    Some((p, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        all.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    all
}

/// (resident MB now, CPU ms used) of a process and its descendants.
fn proc_usage(pid: u32) -> (f64, f64) {
    let mut rss_kb = 0.0;
    let mut cpu_ticks = 0.0;
    for p in process_tree(pid) {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        rss_kb += status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces).
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // utime and stime are fields 14 and 15 (here 11 and 12).
        cpu_ticks += ticks(11) + ticks(12);
    }
    // Clock ticks are 10 ms on Linux (USER_HZ 100).
    (rss_kb / 1024.0, cpu_ticks * 10.0)
}

/// CPU ms this process (load generator and mock Graph API, not the
/// system under test, which is a child) has used so far.
fn harness_cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) * 10.0
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// The routers' histogram of webhook acks, summed over `ports`: (upper
/// bound in s, acks at most that long), `+Inf` last. `None` for a peer
/// (no such metric).
async fn router_acks(http: &reqwest::Client, ports: &[u16]) -> Option<Vec<(f64, f64)>> {
    const NAME: &str = "wa_router_webhook_ack_duration_seconds_bucket{le=\"";
    if ports.is_empty() {
        return None;
    }
    let mut sum: Vec<(f64, f64)> = Vec::new();
    for port in ports {
        let text = scrape(http, *port).await?;
        let buckets: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|l| {
                let (le, n) = l.strip_prefix(NAME)?.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, n.trim().parse().ok()?))
            })
            .collect();
        if buckets.is_empty() {
            return None;
        }
        if sum.is_empty() {
            sum = buckets;
        } else {
            for (s, b) in sum.iter_mut().zip(buckets) {
                s.1 += b.1;
            }
        }
    }
    Some(sum)
}

/// A router's `/metrics` text.
async fn scrape(http: &reqwest::Client, port: u16) -> Option<String> {
    http.get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// The routers' `wa_router_storage_bytes`: (journal, archive) in MB.
async fn router_storage(http: &reqwest::Client, ports: &[u16]) -> (f64, f64) {
    let (mut journal, mut archive) = (0.0, 0.0);
    for port in ports {
        let text = scrape(http, *port).await.unwrap_or_default();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("wa_router_storage_bytes{store=\"") else {
                continue;
            };
            let Some((store, n)) = rest.split_once("\"} ") else {
                continue;
            };
            let mb = n.trim().parse::<f64>().unwrap_or(0.0) / 1_048_576.0;
            match store {
                "journal" => journal += mb,
                "archive" => archive += mb,
                _ => {}
            }
        }
    }
    (journal, archive)
}

/// `--timeline FILE`: one row every `--timeline-every` seconds of the
/// load, what it did in that interval and what the routers held at its
/// end.
struct Timeline {
    out: std::io::BufWriter<std::fs::File>,
    every: Duration,
    last: Instant,
    started: Instant,
    acks: usize,
    replies: usize,
    latencies: usize,
    cpu_ms: f64,
}

impl Timeline {
    const HEADER: &str = "seconds,acks_per_s,replies_per_s,statuses_acked,ack_p99_ms,rss_mb,cpu_pct,journal_mb,archive_mb";

    fn create(path: &Path, every_s: u64, started: Instant, cpu_ms: f64) -> Self {
        use std::io::Write;
        let file = std::fs::File::create(path)
            .unwrap_or_else(|e| panic!("--timeline {}: {e}", path.display()));
        let mut out = std::io::BufWriter::new(file);
        writeln!(out, "{}", Self::HEADER).expect("timeline");
        Timeline {
            out,
            every: Duration::from_secs(every_s.max(1)),
            last: started,
            started,
            acks: 0,
            replies: 0,
            latencies: 0,
            cpu_ms,
        }
    }

    fn due(&self) -> bool {
        self.last.elapsed() >= self.every
    }

    /// Write the row of the interval that ends now.
    fn row(&mut self, load: &Load, seen: &Seen, usage: (f64, f64), storage: (f64, f64)) {
        use std::io::Write;
        let now = Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64().max(1e-3);
        let acks = load.acked.load(Ordering::Relaxed);
        let replies = seen.sends.lock().len();
        let mut lat: Vec<u32> = {
            let all = load.latencies.lock();
            let fresh = all.get(self.latencies..).unwrap_or_default().to_vec();
            self.latencies = all.len();
            fresh
        };
        lat.sort_unstable();
        let statuses = load
            .live
            .as_ref()
            .map_or(0, |l| l.acked.load(Ordering::Relaxed));
        let (rss, cpu_ms) = usage;
        writeln!(
            self.out,
            "{:.0},{:.0},{:.0},{statuses},{:.2},{rss:.0},{:.1},{:.1},{:.1}",
            now.duration_since(self.started).as_secs_f64(),
            (acks - self.acks) as f64 / secs,
            (replies - self.replies) as f64 / secs,
            percentile(&lat, 0.99),
            (cpu_ms - self.cpu_ms) / (secs * 10.0),
            storage.0,
            storage.1,
        )
        .and_then(|()| self.out.flush())
        .expect("timeline");
        (self.acks, self.replies, self.cpu_ms, self.last) = (acks, replies, cpu_ms, now);
    }
}

/// The quantile `q` of the acks between two snapshots of
/// [`router_acks`], as the upper bound (ms) of the bucket that holds it.
fn router_ack_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> String {
    let window: Vec<(f64, f64)> = after
        .iter()
        .zip(before)
        .map(|(a, b)| (a.0, a.1 - b.1))
        .collect();
    let total = window.last().map_or(0.0, |w| w.1);
    if total <= 0.0 {
        return String::new();
    }
    window
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map_or(String::new(), |(le, _)| format!("{:.1}", le * 1000.0))
}

/// A signed webhook POST, whole: head and body, written in one go.
fn webhook_request(body: &[u8]) -> Vec<u8> {
    let sig = wa_router::crypto::sign(SECRET.as_bytes(), body);
    let mut req = format!(
        "POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         X-Hub-Signature-256: {sig}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

/// One keep-alive HTTP/1.1 connection of the load generator. Requests go
/// out prebuilt and answers are read by their length, as wrk does: the
/// harness shares the two cores with the router under test, and every
/// microsecond it spends per message is one the router does not get
/// (reqwest took ≈ 48 µs a message here).
struct Conn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: std::net::SocketAddr) -> std::io::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(1024),
        })
    }

    /// Send one request and read its answer: the status, and whether the
    /// connection can take the next request.
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<(u16, bool)> {
        use tokio::io::AsyncWriteExt;
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        self.stream.write_all(request).await?;
        self.buf.clear();
        loop {
            self.read_more().await?;
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            let head = match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => continue,
                Err(_) => return Err(bad("unreadable answer")),
            };
            let status = resp.code.unwrap_or(0);
            let (mut length, mut chunked, mut close) = (None, false, false);
            for h in resp.headers.iter() {
                let value = std::str::from_utf8(h.value).unwrap_or("").trim();
                if h.name.eq_ignore_ascii_case("content-length") {
                    length = value.parse::<usize>().ok();
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.eq_ignore_ascii_case("chunked");
                } else if h.name.eq_ignore_ascii_case("connection") {
                    close = value.eq_ignore_ascii_case("close");
                }
            }
            // The body: by its length, or up to the last chunk (small
            // answers only; the router and uvicorn send lengths).
            loop {
                let have = &self.buf[head..];
                let done = match (length, chunked) {
                    (Some(n), _) => have.len() >= n,
                    (None, true) => have.ends_with(b"0\r\n\r\n"),
                    (None, false) => status == 204 || status == 304,
                };
                if done {
                    return Ok((status, !close));
                }
                self.read_more().await?;
            }
        }
    }

    /// Read what the server sent next; the end of the stream is an error.
    async fn read_more(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncReadExt;
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}

/// Idle connections to one router, shared by the load's tasks.
struct Pool {
    addr: std::net::SocketAddr,
    idle: Mutex<Vec<Conn>>,
}

/// The load generator's shared state: pre-signed requests, handed out
/// once each, and what came back.
struct Load {
    /// The routers, taken in turn.
    pools: Arc<Vec<Pool>>,
    requests: Vec<Vec<u8>>,
    next: AtomicUsize,
    acked: AtomicUsize,
    /// Ack latencies (µs) of the webhooks answered 200.
    latencies: Mutex<Vec<u32>>,
    /// When each message was posted (µs after `epoch`).
    posted: Vec<AtomicU64>,
    /// When each message was answered 200 (µs after `epoch`; 0: not).
    answered: Vec<AtomicU64>,
    epoch: Instant,
    live: Option<Live>,
}

/// `--live-statuses`: statuses posted as the sends they report come due.
struct Live {
    seen: Arc<Seen>,
    /// What Meta reports of every send, in order: each status, how long
    /// after the send it comes, and the next send (index into
    /// `Seen::wamids`) to report it for.
    reports: [(&'static str, Duration, AtomicUsize); 2],
    acked: AtomicUsize,
    latencies: Mutex<Vec<u32>>,
    ts: i64,
}

impl Live {
    /// Whether every send so far has all its statuses posted.
    fn caught_up(&self) -> bool {
        let sends = self.seen.wamids.lock().len();
        self.reports
            .iter()
            .all(|(_, _, cursor)| cursor.load(Ordering::Relaxed) >= sends)
    }
}

impl Load {
    /// Post the next status that is due: `Some(posted)`, or `None` when
    /// none is due.
    async fn post_due_status(&self) -> Option<bool> {
        let live = self.live.as_ref()?;
        for (status, after, cursor) in &live.reports {
            let i = cursor.load(Ordering::Relaxed);
            let Some((at, n, to)) = live.seen.wamids.lock().get(i).cloned() else {
                continue;
            };
            if at.elapsed() < *after {
                continue;
            }
            if cursor
                .compare_exchange(i, i + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
            {
                // Taken by another connection: look again.
                return Some(false);
            }
            let request = webhook_request(&status_webhook(n, &to, live.ts, status));
            let t = Instant::now();
            if self.post_signed(n, &request).await {
                live.acked.fetch_add(1, Ordering::Relaxed);
                live.latencies.lock().push(t.elapsed().as_micros() as u32);
            }
            return Some(true);
        }
        None
    }
}

impl Load {
    /// Post a signed webhook request (to the routers in turn, by `n`) on
    /// an idle connection or a new one; whether it was answered 200.
    async fn post_signed(&self, n: usize, request: &[u8]) -> bool {
        let pool = &self.pools[n % self.pools.len()];
        let mut idle = pool.idle.lock().pop();
        loop {
            let reused = idle.is_some();
            let mut conn = match idle.take() {
                Some(c) => c,
                None => match Conn::open(pool.addr).await {
                    Ok(c) => c,
                    Err(_) => return false,
                },
            };
            match conn.exchange(request).await {
                Ok((status, reusable)) => {
                    if reusable {
                        pool.idle.lock().push(conn);
                    }
                    return status == 200;
                }
                // An idle connection the server closed (its keep-alive
                // ran out) before answering anything: once more on a new
                // one, as HTTP clients do.
                Err(_) if reused && conn.buf.is_empty() => {}
                Err(_) => return false,
            }
        }
    }

    /// Post the next body; `false` when none is left.
    async fn post(self: Arc<Self>) -> bool {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let Some(request) = self.requests.get(i) else {
            return false;
        };
        let t = Instant::now();
        self.posted[i].store(
            t.duration_since(self.epoch).as_micros() as u64,
            Ordering::Relaxed,
        );
        if self.post_signed(i, request).await {
            self.acked.fetch_add(1, Ordering::Relaxed);
            self.latencies.lock().push(t.elapsed().as_micros() as u32);
            self.answered[i].store(self.epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        true
    }
}

fn main() {
    let args = parse_args();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(args));
}

async fn run(args: Args) {
    let seen = Arc::new(Seen::default());
    let mock = web::Data::new(Mock {
        seen: seen.clone(),
        latency: Duration::from_millis(args.latency_ms),
        jitter_ms: args.jitter_ms,
        fault_429: args.fault_429,
        fault_500: args.fault_500,
        counter: AtomicUsize::new(0),
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(mock.clone())
            .app_data(web::PayloadConfig::new(1 << 20))
            .default_service(web::to(graph))
    })
    .workers(1)
    .max_connection_rate(100_000)
    // HTTP/1.1, and HTTP/2 from the first byte (`--graph-http 2`).
    .bind_auto_h2c(("127.0.0.1", 0))
    .expect("bind the mock");
    let graph_port = server.addrs()[0].port();
    let server = server.run();
    let server_handle = server.handle();
    tokio::spawn(server);
    let graph_url = format!("http://127.0.0.1:{graph_port}");

    let targets = match (args.target.as_str(), &args.peer_cmd) {
        ("peer", Some(cmd)) => vec![start_peer(cmd, args.peer_port, &graph_url).await],
        ("memory" | "durable", _) => vec![start_router(&args, &graph_url, None).await],
        ("cluster", _) => {
            let url = args
                .redis_url
                .as_deref()
                .expect("--redis-url for a cluster");
            let prefix = format!("bench-{}-{}:", std::process::id(), args.label);
            let mut routers = Vec::new();
            for node in 0..args.routers.max(1) {
                routers.push(start_router(&args, &graph_url, Some((url, &prefix, node))).await);
            }
            // Every router ready (the first holds the account's lease).
            let http = reqwest::Client::new();
            for r in &routers {
                let ready = format!("http://127.0.0.1:{}/readyz", r.port);
                let deadline = Instant::now() + Duration::from_secs(30);
                while !http
                    .get(&ready)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
                {
                    assert!(Instant::now() < deadline, "a router is not ready");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            routers
        }
        _ => panic!("--target memory|durable|cluster, or peer with --peer-cmd"),
    };
    let mut pids: Vec<u32> = targets.iter().map(|t| t.child.id()).collect();
    pids.extend(args.redis_pid);
    let usage = || {
        pids.iter()
            .map(|p| proc_usage(*p))
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    let pools: Arc<Vec<Pool>> = Arc::new(
        targets
            .iter()
            .map(|t| Pool {
                addr: ([127, 0, 0, 1], t.port).into(),
                idle: Mutex::new(Vec::new()),
            })
            .collect(),
    );

    // Bodies: distinct messages, signed up front. Their timestamp (Meta's
    // whole seconds) is the second after the router started, and the load
    // waits for it: customers write during the load, not before the router
    // started (a message stamped before it is one an earlier process may
    // have answered, and the router looks for that answer in its archive).
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    let ts = since_epoch.as_secs() as i64 + 1;
    let next_second = Duration::from_secs(1)
        .saturating_sub(Duration::from_nanos(since_epoch.subsec_nanos().into()));
    let stamped = Instant::now() + next_second;
    let requests: Vec<Vec<u8>> = (0..args.messages)
        .map(|i| webhook_request(&webhook(i, ts, args.contacts)))
        .collect();
    tokio::time::sleep_until(stamped.into()).await;
    // The routers' own ack histograms (none for a peer: it has no such
    // metric, and an overloaded peer answers this GET only after its whole
    // backlog, which kept a case running for minutes). Bounded in time.
    let metrics_http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("metrics client");
    let ports: Vec<u16> = if args.target == "peer" {
        Vec::new()
    } else {
        targets.iter().map(|t| t.port).collect()
    };
    let acks_before = router_acks(&metrics_http, &ports).await;
    let (_, cpu_before) = usage();
    let harness_before = harness_cpu_ms();
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Load {
        pools: pools.clone(),
        requests,
        next: AtomicUsize::new(0),
        acked: AtomicUsize::new(0),
        latencies: Mutex::new(Vec::new()),
        posted: (0..args.messages).map(|_| AtomicU64::new(0)).collect(),
        answered: (0..args.messages).map(|_| AtomicU64::new(0)).collect(),
        epoch: Instant::now(),
        live: args.live_statuses.then(|| Live {
            seen: seen.clone(),
            // Meta's `sent` comes right after the send's answer (here a
            // quarter of a second), `delivered` once the phone has it.
            reports: [
                ("sent", Duration::from_millis(250), AtomicUsize::new(0)),
                ("delivered", Duration::from_secs(1), AtomicUsize::new(0)),
            ],
            acked: AtomicUsize::new(0),
            latencies: Mutex::new(Vec::new()),
            ts: ts + 1,
        }),
    });
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let mut timeline = args
        .timeline
        .as_deref()
        .map(|path| Timeline::create(path, args.timeline_every_s, started, cpu_before));
    let mut tasks = Vec::new();
    match args.rate {
        None => {
            for _ in 0..args.connections {
                let (load, stop) = (load.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        if load.post_due_status().await.is_some() {
                            continue;
                        }
                        if !load.clone().post().await {
                            break;
                        }
                    }
                }));
            }
        }
        Some(rate) => {
            let offered = load.clone();
            tasks.push(tokio::spawn(async move {
                let load = offered;
                let gap = Duration::from_secs_f64(1.0 / rate as f64);
                let mut tick = tokio::time::interval(gap);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut inflight = Vec::new();
                while Instant::now() < deadline {
                    tick.tick().await;
                    inflight.push(tokio::spawn(load.clone().post()));
                }
                // Requests still unanswered 30 s after the load count as
                // failed (a peer that cannot keep up).
                let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
                for t in inflight {
                    let _ = tokio::time::timeout_at(give_up, t).await;
                }
            }));
            // Statuses as they come due, beside the offered messages.
            if load.live.is_some() {
                for _ in 0..8 {
                    let load = load.clone();
                    tasks.push(tokio::spawn(async move {
                        while Instant::now() < deadline {
                            if load.post_due_status().await.is_none() {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                    }));
                }
            }
        }
    }
    let mut peak_rss = 0.0f64;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = usage();
        peak_rss = peak_rss.max(now.0);
        if let Some(t) = timeline.as_mut().filter(|t| t.due()) {
            let storage = router_storage(&metrics_http, &ports).await;
            t.row(&load, &seen, now, storage);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let load_secs = started.elapsed().as_secs_f64();
    let load_end = Instant::now();
    let acks_after = router_acks(&metrics_http, &ports).await;
    let acks = load.acked.load(Ordering::Relaxed);
    let live_during = load
        .live
        .as_ref()
        .map_or(0, |l| l.acked.load(Ordering::Relaxed));
    let during = seen
        .sends
        .lock()
        .iter()
        .filter(|(t, _, _)| *t <= load_end)
        .count();
    // Wait for the replies still trailing (one per acknowledged message).
    let wait_deadline = load_end + Duration::from_secs(args.wait_s);
    let mut last_progress = Instant::now();
    let mut last_count = 0;
    let mut sampled = Instant::now();
    loop {
        if sampled.elapsed() > Duration::from_millis(250) {
            peak_rss = peak_rss.max(usage().0);
            sampled = Instant::now();
        }
        let n = seen.sends.lock().len();
        if n >= acks || Instant::now() > wait_deadline {
            break;
        }
        if n != last_count {
            last_count = n;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(15) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if load.live.is_some() {
        // The statuses of the sends of the load's last second, and of
        // the trailing replies.
        let tasks: Vec<_> = (0..args.connections.max(1))
            .map(|_| {
                let load = load.clone();
                tokio::spawn(async move {
                    loop {
                        if load.post_due_status().await.is_some() {
                            continue;
                        }
                        if load.live.as_ref().is_none_or(Live::caught_up) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }
    let sends = seen.sends.lock().clone();
    let replies = sends.len();
    let lag = sends.last().map_or(0.0, |(t, _, _)| {
        t.saturating_duration_since(load_end).as_secs_f64()
    });
    let (rss_end, cpu_after) = usage();
    let harness_after = harness_cpu_ms();
    peak_rss = peak_rss.max(rss_end);
    // Statuses: `delivered` for every send, by then mostly archived.
    let (mut status_rate, mut status_p99, mut cpu_per_status) = (0.0, 0.0, 0.0);
    if let Some(live) = &load.live {
        let mut lat = live.latencies.lock().clone();
        lat.sort_unstable();
        status_rate = live_during as f64 / load_secs;
        status_p99 = percentile(&lat, 0.99);
        eprintln!(
            "live statuses: {} of {} acked",
            live.acked.load(Ordering::Relaxed),
            seen.wamids.lock().len() * live.reports.len()
        );
    }
    if args.statuses {
        let sent = seen.wamids.lock().clone();
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        let requests: Vec<Vec<u8>> = sent
            .iter()
            .map(|(_, n, to)| webhook_request(&status_webhook(*n, to, ts, "delivered")))
            .collect();
        let statuses = Arc::new(Load {
            pools: pools.clone(),
            posted: (0..requests.len()).map(|_| AtomicU64::new(0)).collect(),
            answered: (0..requests.len()).map(|_| AtomicU64::new(0)).collect(),
            requests,
            next: AtomicUsize::new(0),
            acked: AtomicUsize::new(0),
            latencies: Mutex::new(Vec::new()),
            epoch: Instant::now(),
            live: None,
        });
        let (_, cpu_before) = usage();
        let started = Instant::now();
        let tasks: Vec<_> = (0..args.connections.max(1))
            .map(|_| {
                let statuses = statuses.clone();
                tokio::spawn(async move { while statuses.clone().post().await {} })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        let secs = started.elapsed().as_secs_f64();
        let (rss, cpu_after) = usage();
        peak_rss = peak_rss.max(rss);
        let acked = statuses.acked.load(Ordering::Relaxed);
        let mut lat = statuses.latencies.lock().clone();
        lat.sort_unstable();
        status_rate = acked as f64 / secs;
        status_p99 = percentile(&lat, 0.99);
        cpu_per_status = (cpu_after - cpu_before) / acked.max(1) as f64;
        eprintln!(
            "statuses: {acked} of {} acked in {secs:.1} s",
            statuses.requests.len()
        );
    }
    // Steady state: what the process holds once the work is done (the
    // router archives what finished in the background).
    tokio::time::sleep(Duration::from_secs(args.settle_s)).await;
    let rss_idle = usage().0;
    if let Some(t) = timeline.as_mut() {
        // The last row: the trailing replies and statuses, then the
        // settle (what the routers hold once the work is done).
        let storage = router_storage(&metrics_http, &ports).await;
        t.row(&load, &seen, usage(), storage);
    }
    // Per-contact order of echo replies (their sequence is in the text):
    // a reply after one to a later message of the contact is out of order
    // when its own message was answered before that later one was posted.
    // Two messages of one contact in flight at once have no order the
    // router could keep (it keeps the order it accepts them in); counted
    // apart.
    let at =
        |v: &[AtomicU64], seq: u64| v.get(seq as usize).map_or(0, |t| t.load(Ordering::Relaxed));
    let mut last: std::collections::HashMap<&str, u64> = Default::default();
    let (mut out_of_order, mut overlapping) = (0, 0);
    for (_, to, seq) in &sends {
        if *seq == 0 {
            continue;
        }
        let prev = last.entry(to.as_str()).or_insert(0);
        if *seq < *prev {
            if at(&load.answered, *seq) > at(&load.posted, *prev) {
                overlapping += 1;
            } else {
                out_of_order += 1;
            }
        }
        *prev = (*prev).max(*seq);
    }
    if overlapping > 0 {
        eprintln!(
            "{overlapping} replies after one to a later message of the contact that was posted while theirs awaited its answer (not counted as out of order)"
        );
    }
    let mut lat = load.latencies.lock().clone();
    lat.sort_unstable();
    // Inbound → Graph: from posting a message to its echo reply reaching
    // the mock (the mock's own latency not included), in µs.
    let mut e2e: Vec<u32> = seen
        .arrivals
        .lock()
        .iter()
        .filter_map(|(at, seq)| {
            let posted = load.epoch
                + Duration::from_micros(load.posted.get(*seq as usize)?.load(Ordering::Relaxed));
            Some(at.saturating_duration_since(posted).as_micros() as u32)
        })
        .collect();
    e2e.sort_unstable();
    let per_reply = |ms: f64| {
        if replies > 0 {
            ms / replies as f64
        } else {
            0.0
        }
    };
    // The router's own view of the same acks: from its handler's start
    // to its answer (not the time in the kernel's queues, nor the load
    // generator's own wait for a core).
    let (router_p50, router_p99) = match (&acks_before, &acks_after) {
        (Some(b), Some(a)) => (
            router_ack_quantile(b, a, 0.5),
            router_ack_quantile(b, a, 0.99),
        ),
        _ => (String::new(), String::new()),
    };
    let cpu_per_reply = per_reply(cpu_after - cpu_before);
    let harness_per_reply = per_reply(harness_after - harness_before);
    let label = if args.label.is_empty() {
        args.target.clone()
    } else {
        args.label.clone()
    };
    let target_name = if args.target == "cluster" {
        format!("cluster-{}", args.routers)
    } else {
        args.target.clone()
    };
    println!(
        "case,target,connections,offered_rate,latency_ms,acks,acks_per_s,ack_p50_ms,ack_p99_ms,graph_per_s_during,reply_lag_s,replies,replies_lost,out_of_order,peak_rss_mb,cpu_ms_per_reply,graph_requests,failed_posts,idle_rss_mb,e2e_p50_ms,e2e_p99_ms,status_acks_per_s,status_p99_ms,cpu_ms_per_status,harness_cpu_ms_per_reply,router_ack_p50_ms,router_ack_p99_ms"
    );
    println!(
        "{label},{},{},{},{},{acks},{:.0},{:.2},{:.2},{:.0},{:.2},{replies},{},{out_of_order},{:.0},{:.3},{},{},{rss_idle:.0},{:.2},{:.2},{status_rate:.0},{status_p99:.2},{cpu_per_status:.3},{harness_per_reply:.3},{router_p50},{router_p99}",
        target_name,
        if args.rate.is_some() {
            0
        } else {
            args.connections
        },
        args.rate.unwrap_or(0),
        args.latency_ms,
        acks as f64 / load_secs,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        during as f64 / load_secs,
        lag,
        acks.saturating_sub(replies),
        peak_rss,
        cpu_per_reply,
        seen.requests.load(Ordering::Relaxed),
        // Refused, failed or never answered.
        load.next
            .load(Ordering::Relaxed)
            .min(args.messages)
            .saturating_sub(acks),
        percentile(&e2e, 0.5),
        percentile(&e2e, 0.99),
    );
    drop(targets);
    server_handle.stop(false).await;
}
