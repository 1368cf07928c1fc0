//! A minimal agent for wa-router: receives the router's signed events and
//! answers inbound messages through the agent API.
//!
//!   cargo run --example agent -- --listen 127.0.0.1:9000 --secret agent-secret \
//!       --router http://127.0.0.1:8080 --api-key sandbox
//!
//! Pair it with `examples/sandbox-agent/wa-router.toml` (see README.md,
//! "Agent loop in sandbox mode"). Events are described in README.md,
//! "Events to targets".

use std::collections::HashSet;
use std::sync::Mutex;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use clap::Parser;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

#[derive(Debug, Parser)]
#[command(about = "Example wa-router agent: echoes every forwarded message back")]
struct Args {
    /// Address to listen on; events arrive at POST /whatsapp.
    #[arg(long, env = "AGENT_LISTEN", default_value = "127.0.0.1:9000")]
    listen: String,
    /// The target's `secret` in wa-router.toml (key of the event signatures).
    #[arg(
        long,
        env = "AGENTS_SECRET",
        default_value = "agent-secret",
        hide_env_values = true
    )]
    secret: String,
    /// Base URL of the router's API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    router: String,
    /// An API key of the router (`[api] keys`).
    #[arg(
        long,
        env = "WA_ROUTER_API_KEY",
        default_value = "sandbox",
        hide_env_values = true
    )]
    api_key: String,
}

struct Agent {
    args: Args,
    http: reqwest::Client,
    /// Event ids already handled: the router delivers at least once, so the
    /// same event may arrive again after a timeout. (A real agent would keep
    /// these for 24 h in a database.)
    seen: Mutex<HashSet<String>>,
}

/// `X-Router-Timestamp-Signature: sha256=<hex HMAC-SHA256(secret,
/// "{X-Router-Timestamp}.{raw body}")>`, compared in constant time, and the
/// timestamp within 5 minutes of now: a delivery recorded by someone on the
/// path cannot be replayed later. (`X-Router-Signature-256`, the body alone,
/// is the SPEC's signature and is sent too.)
fn signature_ok(secret: &str, body: &[u8], timestamp: Option<&str>, header: Option<&str>) -> bool {
    let Some(ts) = timestamp.and_then(|t| t.trim().parse::<i64>().ok()) else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if (now - ts).abs() > 300 {
        return false;
    }
    let Some(sig) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(sig) = hex::decode(sig) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(ts.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// POST /whatsapp: check, dedupe, answer 200 at once, work in the background.
async fn receive(req: HttpRequest, body: web::Bytes, agent: web::Data<Agent>) -> HttpResponse {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    // The signature covers the exact bytes: check it before parsing anything.
    if !signature_ok(
        &agent.args.secret,
        &body,
        header("x-router-timestamp"),
        header("x-router-timestamp-signature"),
    ) {
        tracing::warn!("bad, old or missing X-Router-Timestamp-Signature; event rejected");
        return HttpResponse::Unauthorized().body("bad signature");
    }
    let Ok(event) = serde_json::from_slice::<Value>(&body) else {
        return HttpResponse::BadRequest().body("not JSON");
    };
    let id = header("x-router-event-id").unwrap_or_default().to_string();
    // RUST_LOG=agent=debug prints every event as received.
    tracing::debug!(event_id = %id, body = %String::from_utf8_lossy(&body), "event");
    if !id.is_empty() && !agent.seen.lock().unwrap().insert(id.clone()) {
        tracing::info!(event_id = %id, "duplicate event; already handled");
        return HttpResponse::Ok().finish();
    }
    match event["event"].as_str() {
        Some("message.received") => {
            // Reply in a spawned task: a slow API call must not delay the
            // 200 (the router times deliveries out after 10 s and retries).
            let agent = agent.into_inner();
            tokio::spawn(async move { reply(&agent, &event).await });
        }
        Some("message.status") => tracing::info!(
            message_id = %event["message_id"].as_str().unwrap_or("?"),
            status = %event["status"].as_str().unwrap_or("?"),
            error = %event["error"]["code"].as_str().unwrap_or("-"),
            "status"
        ),
        other => tracing::info!(event = ?other, "event ignored"),
    }
    HttpResponse::Ok().finish()
}

/// Answer a `message.received` event with `POST {router}/v1/messages`.
async fn reply(agent: &Agent, event: &Value) {
    let msg = &event["message"];
    let wa_id = event["contact"]["wa_id"].as_str().unwrap_or_default();
    let said = match msg["text"].as_str() {
        Some(text) => format!("you said: {text}"),
        None => format!("you sent a {} message", msg["type"].as_str().unwrap_or("?")),
    };
    tracing::info!(from = %wa_id, rule = ?event["rule"].as_str(),
        handoff = %event["conversation"]["handoff"], "message received");
    let body = json!({
        "account": event["account"],
        "to": format!("+{wa_id}"),
        "type": "text",
        "text": { "body": format!("Agent here: {said}") },
        "reply_to": msg["id"],
    });
    let url = format!("{}/v1/messages", agent.args.router.trim_end_matches('/'));
    let sent = agent
        .http
        .post(&url)
        .header("X-API-Key", &agent.args.api_key)
        .json(&body)
        .send();
    match sent.await {
        Ok(resp) => {
            let status = resp.status();
            let answer = resp.text().await.unwrap_or_default();
            if status.is_success() {
                tracing::info!(%status, %answer, "reply accepted");
            } else {
                tracing::error!(%status, %answer, "reply refused");
            }
        }
        Err(e) => tracing::error!(error = %e, "router unreachable"),
    }
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    // reqwest is built without a default TLS provider in this crate.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let listen = args.listen.clone();
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(std::io::Error::other)?;
    let agent = web::Data::new(Agent {
        args,
        http,
        seen: Mutex::new(HashSet::new()),
    });
    tracing::info!(%listen, "agent listening on POST /whatsapp");
    HttpServer::new(move || {
        App::new()
            .app_data(agent.clone())
            // Events can carry the raw inbound notification: allow 3 MB.
            .app_data(web::PayloadConfig::new(3 * 1024 * 1024))
            .route("/whatsapp", web::post().to(receive))
    })
    .workers(2)
    .bind(&listen)?
    .run()
    .await
}
