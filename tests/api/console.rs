//! Issue #11: the console at `GET /console`, in a real browser (Debian's
//! `chromium`, driven over the DevTools protocol by tests/console/drive.py).

use std::process::Command;

use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn the_page_is_public_and_holds_no_data_but_every_data_call_needs_the_key() {
    let app = spawn_app(GREETING).await;
    app.say(ANA, "hi").await;
    let resp = app.http.get(app.url("/console")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("connect-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    let page = resp.text().await.unwrap();
    assert!(page.contains("X-API-Key") && !page.contains(ANA) && !page.contains(API_KEY));
    for path in [
        "/v1/conversations",
        "/v1/queues",
        "/v1/stream",
        "/v1/messages",
    ] {
        let resp = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{path}");
    }
}

#[tokio::test]
async fn an_agent_logs_in_sees_a_hi_with_its_countdown_replies_and_sees_it_sent() {
    let chromium = ["chromium", "chromium-browser"].iter().any(|c| {
        Command::new("which")
            .arg(c)
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !chromium {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have Debian's chromium (.ci/run installs it)"
        );
        eprintln!("SKIPPED: no chromium on this machine (apt-get install chromium)");
        return;
    }
    let app = spawn_with(Options {
        routes: String::new(),
        live: false,
        ..Options::default()
    })
    .await;
    app.say(ANA, "hi").await;
    let mut old = text(BOB, "are you there?");
    old["timestamp"] = (now_s() - 2 * 86_400).to_string().into();
    app.inbound(old).await;
    app.rules_idle().await;
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/drive.py");
    let base = app.url("");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .args([base.as_str(), API_KEY, APP_SECRET, PNID, ANA, BOB])
            .arg(&out)
            .output()
            .expect("python3")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "the browser run failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).expect("the driver's JSON");
    assert!(
        seen["wrong_key"].as_str().unwrap().contains("not one of"),
        "{seen}"
    );
    assert!(
        seen["countdown"].as_str().unwrap().starts_with("23h"),
        "{seen}"
    );
    assert_eq!(seen["list_order"][0], ANA, "open windows first: {seen}");
    assert_eq!(seen["live"], true);
    assert!(
        seen["reply_status"].as_str().unwrap().ends_with("sent"),
        "{seen}"
    );
    assert!(
        seen["closed"].as_str().unwrap().contains("template"),
        "{seen}"
    );
    assert!(
        seen["error_shown"]
            .as_str()
            .unwrap()
            .starts_with("opted_out: "),
        "{seen}"
    );
    assert_eq!(app.conversation(BOB).await.unwrap()["opted_out"], true);
    assert_eq!(seen["handoff"], "Give back to the bot", "{seen}");
    assert_eq!(seen["queues"], serde_json::json!(["main"]), "{seen}");
    let conv = app.conversation(ANA).await.unwrap();
    assert_eq!(
        conv["handoff"]["active"], true,
        "the page's take-over reached the router"
    );
    assert_eq!(seen["narrow_overflow"], false, "nothing wider than 375 px");
    // The server agrees: the reply the page sent is a sent record to Ana.
    let record = app.record(seen["reply_id"].as_str().unwrap()).await;
    assert_eq!(
        (record["to"].as_str(), record["status"].as_str()),
        (Some(ANA), Some("sent"))
    );
    for name in [
        "console-1440-list.png",
        "console-1440-conversation.png",
        "console-375-conversation.png",
        "console-375-template.png",
    ] {
        let png = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target/console-screenshots")
                .join(name),
        )
        .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{name}");
    }
}
