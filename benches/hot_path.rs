//! Benchmarks of the hot paths (issue #2 targets on a 2-core machine):
//! - verify → parse → route of a ~1 KB text notification: under 10 µs;
//! - rule matching with 10 and 10,000 exact-text rules: flat;
//! - the heap bytes one open window costs in the router's state (printed
//!   first; issue #9: a million open windows in 150 MB).
//!
//! `cargo bench --bench hot_path` runs them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use wa_router::archive::Archive;
use wa_router::config::AccountSettings;
use wa_router::crypto;
use wa_router::domain::Secret;
use wa_router::rules::Facts;
use wa_router::rules::compile::compile;
use wa_router::state::State;
use wa_router::telemetry::Metrics;
use wa_router::webhook::payload;

/// Counts live heap bytes, to measure what a window entry costs.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const NOW: i64 = 1_795_000_000_000;

fn text_notification(body: &str) -> Vec<u8> {
    let n = serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "310298475561023", "changes": [{ "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": { "display_phone_number": "15550783881", "phone_number_id": "106540352242922" },
            "contacts": [{ "profile": { "name": "Ana Souza" }, "wa_id": "16315551181", "user_id": "US.13491208655302741918" }],
            "messages": [{ "from": "16315551181", "from_user_id": "US.13491208655302741918",
                           "id": "wamid.HBgLMTYzMTU1NTExODEVAgASGBQzQTdCNUQ2RjE4QjY0OEM1QTlFNQA=",
                           "timestamp": "1795000000", "type": "text", "text": { "body": body } }]
        } }] }]
    });
    serde_json::to_vec(&n).unwrap()
}

fn keyword_rules(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&format!("[[rule]]\nname = \"r{i}\"\nwhen = {{ text = \"keyword {i}\" }}\nsend = [ {{ type = \"text\", body = \"answer {i}\" }} ]\n\n"));
    }
    s.push_str("[[rule]]\nname = \"fallback\"\nsend = [ { type = \"text\", body = \"?\" } ]\n");
    s
}

fn webhook_path(c: &mut Criterion) {
    let rules = compile("bench.toml", &keyword_rules(100), &[]).unwrap();
    let padding = "x".repeat(1024 - text_notification("").len());
    let body = text_notification(&format!(
        "keyword 99{}",
        &padding[..padding.len().saturating_sub(10)]
    ));
    assert!((1000..=1100).contains(&body.len()), "{} bytes", body.len());
    let hit_body = text_notification("keyword 99");
    let secrets = [Secret::new("app-secret")];
    let sig = crypto::sign(b"app-secret", &body);
    let hit_sig = crypto::sign(b"app-secret", &hit_body);
    let route = |body: &[u8], sig: &str| {
        assert!(crypto::verify_any(body, Some(sig), &secrets));
        let n = payload::parse(body).unwrap();
        let msg = &n.batches[0].messages[0];
        let facts = Facts {
            account: "main",
            state: "",
            new_conversation: false,
            reply_tags: &[],
        };
        rules.first_match(msg, facts).map(|h| h.rule)
    };
    assert_eq!(route(&hit_body, &hit_sig), Some(99));
    c.bench_function("webhook/verify+parse+route 1KB text", |b| {
        b.iter(|| black_box(route(black_box(&body), &sig)))
    });
    c.bench_function("webhook/verify only 1KB", |b| {
        b.iter(|| black_box(crypto::verify_any(black_box(&body), Some(&sig), &secrets)))
    });
    c.bench_function("webhook/parse only 1KB", |b| {
        b.iter(|| black_box(payload::parse(black_box(&body)).unwrap().batches.len()))
    });
}

fn rule_matching(c: &mut Criterion) {
    let body = text_notification("Keyword  9");
    let n = payload::parse(&body).unwrap();
    let base = n.batches[0].messages[0].clone();
    for count in [10usize, 10_000] {
        let rules = compile("bench.toml", &keyword_rules(count), &[]).unwrap();
        let mut last = base.clone();
        last.text = Some(format!("keyword {}", count - 1));
        let mut miss = base.clone();
        miss.text = Some("nothing matches this".into());
        let facts = || Facts {
            account: "main",
            state: "",
            new_conversation: false,
            reply_tags: &[],
        };
        assert_eq!(
            rules.first_match(&last, facts()).map(|h| h.rule),
            Some(count - 1)
        );
        assert_eq!(
            rules.first_match(&miss, facts()).map(|h| h.rule),
            Some(count)
        );
        c.bench_function(&format!("rules/exact match, last of {count}"), |b| {
            b.iter(|| black_box(rules.first_match(black_box(&last), facts())))
        });
        c.bench_function(&format!("rules/no match, fallback after {count}"), |b| {
            b.iter(|| black_box(rules.first_match(black_box(&miss), facts())))
        });
    }
}

/// What a reply of a template costs the router: the plan of a rule whose
/// reply names a field of the message (the context is built, the template
/// rendered, the message checked).
fn template_reply(c: &mut Criterion) {
    let rules = compile(
        "bench.toml",
        "[[rule]]\nname = \"echo\"\nsend = [ { type = \"text\", body = \"{{ message.text }}\" } ]\n",
        &[],
    )
    .unwrap();
    let body = text_notification("Hello there");
    let msg = payload::parse(&body).unwrap().batches[0].messages[0].clone();
    let vars = std::collections::BTreeMap::new();
    let facts = || Facts {
        account: "main",
        state: "",
        new_conversation: false,
        reply_tags: &[],
    };
    let hit = rules.first_match(&msg, facts()).unwrap();
    let plan = rules.plan(&hit, &msg, "main", "", &vars);
    assert_eq!(
        plan.sends[0].as_ref().unwrap().object.to_value()["body"],
        "Hello there"
    );
    c.bench_function("rules/plan of a template reply", |b| {
        b.iter(|| black_box(rules.plan(black_box(&hit), &msg, "main", "", &vars)))
    });
}

/// A notification from contact `from` (with a BSUID when `bsuid`).
fn contact_notification(from: &str, wamid: &str, bsuid: bool) -> Vec<u8> {
    let mut contact = serde_json::json!({ "profile": { "name": "Bench" }, "wa_id": from });
    if bsuid {
        contact["user_id"] = format!("US.{from:0>20}").into();
    }
    let n = serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "310298475561023", "changes": [{ "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": { "display_phone_number": "15550783881", "phone_number_id": "106540352242922" },
            "contacts": [contact],
            "messages": [{ "from": from, "id": wamid, "timestamp": (NOW / 1000).to_string(),
                           "type": "text", "text": { "body": "hi" } }]
        } }] }]
    });
    serde_json::to_vec(&n).unwrap()
}

/// Heap bytes one open window costs in `State` (conversation, dedupe
/// digest, BSUID link, their share of the hash tables), measured: the
/// heap's growth for `n` inbound messages from as many contacts, with
/// their history archived (the archive's SQLite cache included).
fn bytes_per_open_window(n: u64, bsuid: bool) -> f64 {
    let archive = Arc::new(Archive::open(None).unwrap());
    let (state, _accounts) = State::new(
        &[AccountSettings::sandbox("106540352242922")],
        Arc::new(Metrics::new()),
        archive.clone(),
    );
    let state = Arc::new(state);
    state.start_archiving();
    let account = state.account_by_pnid("106540352242922").unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..n {
        let from = format!("1631{i:07}");
        let body = contact_notification(&from, &format!("wamid.bench{i:012}"), bsuid);
        for batch in payload::parse(&body).unwrap().batches {
            for mut msg in batch.messages {
                assert!(state.first_time(&msg.wamid, NOW));
                state.identify(&account, &mut msg, NOW);
                state.inbound(&account, &msg, NOW);
            }
        }
    }
    archive.sync_blocking().unwrap();
    let bytes = (LIVE.load(Ordering::Relaxed) - before) as f64 / n as f64;
    assert_eq!(state.conversations(None).len() as u64, n);
    archive.close();
    bytes
}

fn open_windows(_: &mut Criterion) {
    // Issue #9: 1,000,000 open windows in <= 150 MB of the whole process.
    let n = 1_000_000;
    for bsuid in [false, true] {
        println!(
            "state: {:.0} bytes per open window ({n} contacts{})",
            bytes_per_open_window(n, bsuid),
            if bsuid { ", each with a BSUID" } else { "" }
        );
    }
}

/// Heap bytes `make` leaves allocated (what it returns, kept).
fn heap_of<T>(make: impl Fn() -> T) -> isize {
    let before = LIVE.load(Ordering::Relaxed);
    let kept: Vec<T> = (0..1000).map(|_| make()).collect();
    let bytes = LIVE.load(Ordering::Relaxed) - before - (1000 * std::mem::size_of::<T>()) as isize;
    drop(kept);
    bytes / 1000
}

/// What a queued message's content holds on the heap: the object as a
/// JSON tree (before) and as its text (`message::Object`).
fn queued_content(_: &mut Criterion) {
    let buttons = serde_json::json!({
        "type": "button",
        "body": { "text": "Hi Ana! What do you need?" },
        "action": { "buttons": [
            { "type": "reply", "reply": { "id": "sales", "title": "Sales" } },
            { "type": "reply", "reply": { "id": "support", "title": "Support" } },
            { "type": "reply", "reply": { "id": "other", "title": "Something else" } },
        ] }
    });
    let text = serde_json::json!({ "body": "You picked Sales." });
    for (name, object) in [("3 reply buttons", buttons), ("short text", text)] {
        println!(
            "content of {name}: {} heap bytes as a tree, {} as text",
            heap_of(|| object.clone()),
            heap_of(|| wa_router::message::Object::new(&object)),
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = open_windows, queued_content, webhook_path, rule_matching, template_reply
}
criterion_main!(benches);
