//! Throughput with a data_dir against memory only, and restart time
//! (issue #4). Prints figures; run with `cargo bench --bench durability`
//! (`-- restart` for the restart alone).
//!
//! - webhook acks/s: signed text notifications (no rule matches), 64 at once
//!   (Meta delivers concurrently);
//! - outbound sends/s: 32 sandbox accounts (no network), pace 0, no rate
//!   limit (`rate` would cap each at 80/s), messages
//!   spread over them. Each send waits for `sending` to be on disk (one
//!   fdatasync, shared by every account sending at that moment).
//! - restart: a data_dir holding 1,000,000 conversations (each contact's
//!   BSUID linked to its phone number) and 100,000 queued messages, from
//!   process start of `App::build` to ready.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use wa_router::app::{App, Shared};
use wa_router::domain::now_ms;
use wa_router::journal::install_snapshot;
use wa_router::outbound::ops::OutboxOp;
use wa_router::outbound::{Content, OutboundRecord, Status};
use wa_router::persist::{Owner, encode};
use wa_router::state::Conversation;
use wa_router::state::ops::{ConversationWire, StateOp, WindowWire};

/// The binary's allocator (`src/main.rs`): what a restart costs users.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const SECRET: &str = "bench-secret";
const ACCOUNT_COUNT: usize = 32;
const CONCURRENCY: usize = 64;

fn account(i: usize) -> String {
    format!("1000000000000{:02}", i % ACCOUNT_COUNT)
}

fn config(dir: &Path, data_dir: &str) -> wa_router::config::Settings {
    std::fs::write(dir.join("routes.toml"), "").unwrap();
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{data_dir}\"\n[meta]\napp_secret = \"{SECRET}\"\nverify_token = \"bench\"\n[api]\nkeys = [\"k\"]\nrate = 1000000\nburst = 1000000\n"
    );
    for pnid in (0..ACCOUNT_COUNT).map(account) {
        text.push_str(&format!("[[accounts]]\nname = \"{pnid}\"\nphone_number_id = \"{pnid}\"\npace = \"0ms\"\nrate = 1000000\nmax_in_flight = 1024\nmax_queue = 1000000\n"));
    }
    let path = dir.join("wa-router.toml");
    std::fs::write(&path, &text).unwrap();
    wa_router::config::from_str(&text, &path).unwrap()
}

fn notification(i: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "1", "changes": [{ "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": { "display_phone_number": "15550000000", "phone_number_id": account(i) },
            "contacts": [{ "profile": { "name": "Bench" }, "wa_id": format!("1631{:07}", i) }],
            "messages": [{ "from": format!("1631{:07}", i), "id": format!("wamid.bench.{i}"), "timestamp": (now_ms() / 1000).to_string(), "type": "text", "text": { "body": "hello" } }]
        } }] }]
    }))
    .unwrap()
}

async fn webhook_rate(addr: &str, n: usize) -> f64 {
    let http = reqwest::Client::new();
    let bodies: Vec<Vec<u8>> = (0..n).map(notification).collect();
    let bodies = Arc::new(bodies);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENCY {
        let (http, bodies, url) = (http.clone(), bodies.clone(), format!("{addr}/webhook"));
        tasks.push(tokio::spawn(async move {
            let mut i = worker;
            while i < bodies.len() {
                let sig = wa_router::crypto::sign(SECRET.as_bytes(), &bodies[i]);
                let resp = http
                    .post(&url)
                    .header("X-Hub-Signature-256", sig)
                    .body(bodies[i].clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                i += CONCURRENCY;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn send_rate(shared: &Shared, addr: &str, n: usize) -> f64 {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENCY {
        let (http, url) = (http.clone(), format!("{addr}/v1/messages"));
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut i = worker;
            while i < n {
                let body = json!({ "account": account(i), "to": format!("+1631{:07}", i), "type": "template", "template": { "name": "bench", "language": { "code": "en" } } });
                let resp = http.post(&url).header("X-API-Key", "k").json(&body).send().await.unwrap();
                assert_eq!(resp.status(), 202);
                ids.push(resp.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_string());
                i += CONCURRENCY;
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    // Each id is checked until it is sent, once: a sent record may have
    // moved to the archive, where a look costs more than in memory.
    let mut sent = 0;
    while sent < ids.len() {
        while sent < ids.len()
            && shared
                .outbox
                .record(&ids[sent])
                .is_some_and(|r| r.status == Status::Sent)
        {
            sent += 1;
        }
        if sent < ids.len() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn throughput(durable: bool) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::build(config(dir.path(), if durable { "data" } else { "" }))
        .await
        .unwrap();
    let addr = format!("http://127.0.0.1:{}", app.port());
    let shared = app.spawn();
    let acks = webhook_rate(&addr, 4000).await;
    let sends = send_rate(&shared, &addr, 4000).await;
    (acks, sends)
}

fn restart_fixture(dir: &Path, conversations: usize, queued: usize) {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let now = now_ms();
    let conv_ops = (0..conversations).flat_map(move |i| {
        let account = account(i);
        let contact = format!("44{:010}", i);
        // Each contact with a BSUID as long as Meta's, linked to its phone.
        let user_id = format!("GB.{i:020}");
        [
            StateOp::Window {
                account: account.clone(),
                contact: contact.clone(),
                window: WindowWire {
                    last_inbound: now,
                    expires: now + 86_400_000,
                },
            },
            StateOp::Conversation {
                account: account.clone(),
                contact: contact.clone(),
                conversation: Box::new(ConversationWire::new(
                    &Conversation {
                        name: Some("Name".into()),
                        state: "menu".into(),
                        last_activity: now,
                        user_id: Some(user_id.clone()),
                        ..Conversation::default()
                    },
                    true,
                )),
            },
            StateOp::Link {
                account,
                user_id,
                wa_id: contact,
            },
        ]
        .map(|op| encode(Owner::State, &op))
    });
    let record_ops = (0..queued).map(move |i| {
        let record = OutboundRecord {
            id: wa_router::ids::MessageId::generate(),
            account: account(i).into(),
            to: format!("44{:010}", i).into(),
            content: Content {
                kind: wa_router::message::MessageType::Template,
                object: json!({ "name": "t", "language": { "code": "en" } }).into(),
                context_id: None,
            },
            status: Status::Queued,
            wamid: None,
            source: "api".into(),
            tags: vec![],
            metadata: None,
            attempts: 0,
            error: None,
            history: vec![(Status::Queued, now)],
            created_at: now,
            send_at: None,
            expires_at: now + 36 * 3_600_000,
            bypass_consent: false,
            typing: None,
            pricing: None,
            conversation: None,
        };
        encode(Owner::Outbox, &OutboxOp::Record(Box::new((&record).into())))
    });
    install_snapshot(&data, 0, conv_ops.chain(record_ops)).unwrap();
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs nothing here.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    // `cargo bench --bench durability -- restart`: the restart alone.
    let restart_only = std::env::args().any(|a| a == "restart");
    rt.block_on(async {
        if !restart_only {
            let (m_acks, m_sends) = throughput(false).await;
            let (d_acks, d_sends) = throughput(true).await;
            println!("webhook acks/s: memory {m_acks:.0}, durable {d_acks:.0} ({:.0} %)", 100.0 * d_acks / m_acks);
            println!("outbound sends/s: memory {m_sends:.0}, durable {d_sends:.0} ({:.0} %)", 100.0 * d_sends / m_sends);
        }

        let (conversations, queued) = (1_000_000, 100_000);
        let dir = tempfile::tempdir().unwrap();
        let made = Instant::now();
        restart_fixture(dir.path(), conversations, queued);
        let bytes = std::fs::metadata(dir.path().join("data/snapshot.log")).unwrap().len();
        println!("fixture: {conversations} conversations + {queued} queued messages, {} MB snapshot, written in {:.1} s", bytes / 1_000_000, made.elapsed().as_secs_f64());
        // Accounts with a pace that keeps the queues still while we measure.
        let mut settings = config(dir.path(), "data");
        for a in &mut settings.accounts {
            a.pace = Duration::from_secs(3600);
        }
        let started = Instant::now();
        let app = App::build(settings).await.unwrap();
        let ready = started.elapsed();
        let shared = app.spawn();
        let depth: usize = shared.state.accounts().iter().map(|a| shared.outbox.queue(a).stats().depth).sum();
        println!("restart to ready: {:.2} s ({} queued restored, {} open windows)", ready.as_secs_f64(), depth, shared.state.open_windows(now_ms()));
    });
}
