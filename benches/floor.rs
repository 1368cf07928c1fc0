//! The floor: the least a webhook router can do for the benchmark's
//! scenario, on the same HTTP stack as wa-router (actix-web in, hyper's
//! HTTP/1.1 client out, jemalloc), run by `bench/run --floor` as a peer
//! of `benches/load.rs` against the same load generator and mock.
//!
//! Each webhook: the signature checked, the message read, `200`, and its
//! reply (`hi` → two buttons, button `sales` → a text, a list reply → a
//! text, other text → its echo) posted to the Graph API from the HTTP
//! worker that took the webhook. No dedupe, no window, no rules, no queue,
//! no retry, no record, no history, no order per contact: what wa-router
//! reaches above this is what its work costs, and what this reaches is
//! what two cores carry of the two HTTP exchanges a reply takes at all.
//!
//! `FLOOR=ack` answers `200` and sends nothing (the inbound exchange
//! alone). Environment as for any peer of `load`: `PORT`, `GRAPH_URL`,
//! `APP_SECRET`, `PHONE_ID`.

use std::borrow::Cow;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Deserialize)]
struct Note<'a> {
    #[serde(borrow)]
    entry: Vec<Entry<'a>>,
}

#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(borrow)]
    changes: Vec<Change<'a>>,
}

#[derive(Deserialize)]
struct Change<'a> {
    #[serde(borrow)]
    value: Value<'a>,
}

#[derive(Deserialize)]
struct Value<'a> {
    #[serde(default, borrow)]
    messages: Vec<Message<'a>>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    from: Cow<'a, str>,
    #[serde(default, borrow)]
    text: Option<Text<'a>>,
    #[serde(default, borrow)]
    interactive: Option<Interactive<'a>>,
}

#[derive(Deserialize)]
struct Text<'a> {
    #[serde(borrow)]
    body: Cow<'a, str>,
}

#[derive(Deserialize)]
struct Interactive<'a> {
    #[serde(default, borrow)]
    button_reply: Option<Choice<'a>>,
    #[serde(default, borrow)]
    list_reply: Option<Choice<'a>>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    title: Cow<'a, str>,
}

/// The Graph API request body of a message's reply, if it gets one.
fn reply(m: &Message) -> Option<String> {
    let to = serde_json::to_string(&m.from).ok()?;
    let text = |body: &str| {
        let body = serde_json::to_string(body).unwrap_or_default();
        format!(
            r#"{{"messaging_product":"whatsapp","to":{to},"type":"text","text":{{"body":{body}}}}}"#
        )
    };
    if let Some(t) = &m.text {
        if t.body == "hi" {
            return Some(format!(
                r#"{{"messaging_product":"whatsapp","to":{to},"type":"interactive","interactive":{{"type":"button","body":{{"text":"Hi Bench! What do you need?"}},"action":{{"buttons":[{{"type":"reply","reply":{{"id":"sales","title":"Sales"}}}},{{"type":"reply","reply":{{"id":"support","title":"Support"}}}}]}}}}}}"#
            ));
        }
        return Some(text(&t.body));
    }
    let i = m.interactive.as_ref()?;
    if let Some(b) = &i.button_reply {
        return (b.id == "sales").then(|| text("Sales will write to you shortly."));
    }
    let l = i.list_reply.as_ref()?;
    Some(text(&format!("You picked {}.", l.title)))
}

struct Floor {
    secret: wa_router::domain::Secret,
    messages_url: http::Uri,
    auth: http::HeaderValue,
    send: bool,
}

/// One client per HTTP worker (its own pool of keep-alive connections).
struct Graph(Client<HttpConnector, Full<Bytes>>);

async fn webhook(
    req: HttpRequest,
    body: web::Bytes,
    floor: web::Data<Floor>,
    graph: web::Data<Graph>,
) -> HttpResponse {
    let sig = req
        .headers()
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok());
    if !wa_router::crypto::verify_any(&body, sig, std::slice::from_ref(&floor.secret)) {
        return HttpResponse::Unauthorized().finish();
    }
    let Ok(note) = serde_json::from_slice::<Note>(&body) else {
        return HttpResponse::BadRequest().finish();
    };
    if floor.send {
        let replies = note
            .entry
            .iter()
            .flat_map(|e| &e.changes)
            .flat_map(|c| &c.value.messages)
            .filter_map(reply);
        for json in replies {
            let request = http::Request::post(floor.messages_url.clone())
                .header(http::header::AUTHORIZATION, floor.auth.clone())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(json)));
            let Ok(request) = request else { continue };
            let answer = graph.0.request(request);
            actix_web::rt::spawn(async move {
                if let Ok(res) = answer.await {
                    let _ = res.into_body().collect().await;
                }
            });
        }
    }
    HttpResponse::Ok().finish()
}

/// Meta's verification handshake (the load generator waits for it).
async fn verify(q: web::Query<std::collections::HashMap<String, String>>) -> HttpResponse {
    HttpResponse::Ok().body(q.get("hub.challenge").cloned().unwrap_or_default())
}

fn main() -> std::io::Result<()> {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let Ok(port) = env("PORT").parse::<u16>() else {
        // `cargo bench` runs every bench target: this one only as a peer.
        eprintln!("floor: a peer of the load generator; run it with bench/run --floor");
        return Ok(());
    };
    let floor = web::Data::new(Floor {
        secret: wa_router::domain::Secret::new(env("APP_SECRET")),
        messages_url: format!("{}/v25.0/{}/messages", env("GRAPH_URL"), env("PHONE_ID"))
            .parse()
            .expect("GRAPH_URL"),
        auth: http::HeaderValue::from_static("Bearer bench-token"),
        send: env("FLOOR") != "ack",
    });
    actix_web::rt::System::new().block_on(async move {
        HttpServer::new(move || {
            App::new()
                .app_data(floor.clone())
                .app_data(web::Data::new(Graph(
                    Client::builder(TokioExecutor::new()).build_http(),
                )))
                .route("/webhook", web::post().to(webhook))
                .route("/webhook", web::get().to(verify))
        })
        .workers(2)
        .bind(("127.0.0.1", port))?
        .run()
        .await
    })
}
