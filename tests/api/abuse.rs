//! Issue #7: fault and abuse probes, each as a test that failed before the
//! fix. Slow bodies, empty secrets, growth caps, consent order, early
//! statuses.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// How a raw connection ended.
#[derive(Debug)]
enum Ended {
    /// The server answered (status code) and/or closed.
    Answered(u16),
    Closed,
}

/// Open a raw connection to `addr`, send a request head declaring
/// `declared` body bytes, then `first` bytes of body, then (if `trickle`)
/// one byte every 200 ms. Returns how the server ended it, or `None` if it
/// kept the connection open for `patience`.
async fn slow_body(
    addr: &str,
    path: &str,
    declared: usize,
    first: usize,
    trickle: bool,
    patience: Duration,
) -> Option<Ended> {
    let host = addr.trim_start_matches("http://");
    let mut s = TcpStream::connect(host).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nX-Hub-Signature-256: sha256=00\r\nContent-Length: {declared}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    while sent < first {
        let n = chunk.len().min(first - sent);
        if s.write_all(&chunk[..n]).await.is_err() {
            break;
        }
        sent += n;
    }
    let deadline = Instant::now() + patience;
    let mut buf = vec![0u8; 4096];
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        if Instant::now() > deadline {
            return None;
        }
        tokio::select! {
            read = s.read(&mut buf) => {
                return Some(match read {
                    Ok(n) if n >= 12 && buf.starts_with(b"HTTP/1.1 ") => {
                        let code = std::str::from_utf8(&buf[9..12]).unwrap().parse().unwrap();
                        Ended::Answered(code)
                    }
                    _ => Ended::Closed,
                });
            }
            _ = tick.tick() => {
                if trickle && s.write_all(b"x").await.is_err() {
                    return Some(Ended::Closed);
                }
            }
        }
    }
}

async fn metric(app: &TestApp, line_start: &str) -> f64 {
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// #7.2: slow and stalled bodies are cut off at `body_timeout`, and the
/// router keeps answering signed webhooks meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_stalled_webhook_bodies_are_cut_off() {
    let app = spawn_with(Options {
        extra: "[http]\nbody_timeout = \"1s\"\n".into(),
        ..Options::default()
    })
    .await;
    let trickles: Vec<_> = (0..20)
        .map(|_| {
            let addr = app.addr.clone();
            tokio::spawn(async move {
                slow_body(
                    &addr,
                    "/webhook",
                    3_000_000,
                    10,
                    true,
                    Duration::from_secs(15),
                )
                .await
            })
        })
        .collect();
    let stalled: Vec<_> = (0..20)
        .map(|_| {
            let addr = app.addr.clone();
            tokio::spawn(async move {
                slow_body(
                    &addr,
                    "/webhook",
                    3_000_000,
                    100_000,
                    false,
                    Duration::from_secs(15),
                )
                .await
            })
        })
        .collect();
    // Meanwhile a real webhook is answered.
    app.say(ANA, "hi").await;
    for t in trickles.into_iter().chain(stalled) {
        let ended = t.await.unwrap();
        assert!(
            matches!(ended, Some(Ended::Answered(408) | Ended::Closed)),
            "a slow body must be cut off, got {ended:?}"
        );
    }
    assert!(metric(&app, "wa_router_webhooks_total{result=\"body_timeout\"}").await >= 1.0);
    app.say(BOB, "hi").await;
}

/// #7.2: unverified bytes buffered at once are bounded; a body over the
/// budget is refused at once (503 overloaded), not buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_unverified_bytes_are_bounded() {
    let app = spawn_with(Options {
        extra: "[http]\nbody_timeout = \"30s\"\nmax_buffered = \"4MB\"\n".into(),
        ..Options::default()
    })
    .await;
    let holder = {
        let addr = app.addr.clone();
        tokio::spawn(async move {
            slow_body(
                &addr,
                "/webhook",
                3_000_000,
                2_600_000,
                false,
                Duration::from_secs(40),
            )
            .await
        })
    };
    // Wait until the first body holds its share of the budget.
    wait_for(10, "the first body to be buffered", || async {
        (metric(&app, "wa_router_request_body_buffered_bytes").await >= 2_000_000.0).then_some(())
    })
    .await;
    let started = Instant::now();
    let second = slow_body(
        &app.addr,
        "/webhook",
        3_000_000,
        3_000_000,
        false,
        Duration::from_secs(20),
    )
    .await;
    assert!(
        matches!(second, Some(Ended::Answered(503) | Ended::Closed)),
        "{second:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refused, not held until the body deadline"
    );
    assert!(metric(&app, "wa_router_webhooks_total{result=\"overloaded\"}").await >= 1.0);
    // Small signed webhooks still fit.
    app.say(ANA, "hi").await;
    holder.abort();
}
