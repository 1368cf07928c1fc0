//! SPEC §3: the Meta webhook edge.

use serde_json::{Value, json};

use crate::helpers::*;

async fn handshake(app: &TestApp, query: &str) -> reqwest::Response {
    app.http
        .get(app.url(&format!("/webhook?{query}")))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn handshake_with_the_right_token_echoes_the_challenge() {
    let app = spawn_app(GREETING).await;
    let resp = handshake(
        &app,
        &format!("hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}&hub.challenge=1158201444"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(resp.text().await.unwrap(), "1158201444");
}

#[tokio::test]
async fn handshake_with_a_wrong_or_missing_token_is_forbidden() {
    let app = spawn_app(GREETING).await;
    for query in [
        "hub.mode=subscribe&hub.verify_token=nope&hub.challenge=1",
        "hub.mode=subscribe&hub.challenge=1",
        "hub.mode=unsubscribe&hub.verify_token=test-verify-token&hub.challenge=1",
    ] {
        let resp = handshake(&app, query).await;
        assert_eq!(resp.status(), 403, "{query}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "forbidden");
    }
}

#[tokio::test]
async fn bad_signatures_are_rejected_with_401_and_nothing_is_processed() {
    let app = spawn_app(GREETING).await;
    let body = serde_json::to_vec(&notification(vec![text(ANA, "hi")], vec![])).unwrap();
    let good = sign(&body, APP_SECRET);
    let attempts = [
        None,
        Some(sign(&body, "wrong")),
        Some("sha256=zz".to_string()),
        Some(good[7..].to_string()),
        Some(sign(b"other", APP_SECRET)),
    ];
    for signature in attempts {
        let resp = app.post_webhook_signed(&body, signature.clone()).await;
        assert_eq!(resp.status(), 401, "{signature:?}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "invalid_signature");
    }
    // The message was not recorded as seen: signed correctly it is handled.
    assert_eq!(app.post_webhook(&body).await.status(), 200);
    let texts = app.wait_texts(ANA, 1).await;
    assert_eq!(texts, vec!["Hi Ana! How can we help?"]);
}

#[tokio::test]
async fn any_configured_app_secret_is_accepted_during_rotation() {
    let app = spawn_app(GREETING).await;
    let body = serde_json::to_vec(&notification(vec![text(ANA, "hi")], vec![])).unwrap();
    let resp = app
        .post_webhook_signed(&body, Some(sign(&body, "old-secret")))
        .await;
    assert_eq!(resp.status(), 200);
    app.wait_texts(ANA, 1).await;
}

#[tokio::test]
async fn a_body_over_max_body_is_413_even_when_signed() {
    let app = spawn_with(Options {
        extra: String::new(),
        ..Options::default()
    })
    .await;
    let huge = "x".repeat(4_000_000);
    let body = serde_json::to_vec(&notification(vec![text(ANA, &huge)], vec![])).unwrap();
    let resp = app.post_webhook(&body).await;
    assert_eq!(resp.status(), 413);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "payload_too_large");
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn signed_bodies_that_are_not_notifications_are_400_never_5xx() {
    let app = spawn_app(GREETING).await;
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let bodies: Vec<Vec<u8>> = vec![
        b"this is not json".to_vec(),
        br#"{"object": "whatsapp_business_account", "entry": ["#.to_vec(),
        b"[1, 2, 3]".to_vec(),
        br#"{"object": "page", "entry": []}"#.to_vec(),
        br#"{"object": "whatsapp_business_account"}"#.to_vec(),
        vec![0xff, 0xfe, 0x7b, 0x22],
        deep.into_bytes(),
        Vec::new(),
    ];
    for body in bodies {
        let resp = app.post_webhook(&body).await;
        assert_eq!(
            resp.status(),
            400,
            "{:?}",
            String::from_utf8_lossy(&body[..body.len().min(40)])
        );
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "invalid_notification");
    }
    assert_eq!(
        app.http
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// Issue #10.6: a body whose strings hold invalid UTF-8 is not JSON, even
/// where the bad bytes sit in a field the router ignores.
#[tokio::test]
async fn a_signed_hi_with_invalid_utf8_in_an_ignored_field_is_400_and_not_processed() {
    let app = spawn_app(GREETING).await;
    let mut n = notification(vec![text(ANA, "hi")], vec![]);
    n["entry"][0]["changes"][0]["value"]["ignored"] = Value::String("MARK".into());
    let text = serde_json::to_string(&n).unwrap();
    let at = text.find("MARK").unwrap();
    let mut body = text.as_bytes()[..at].to_vec();
    body.extend_from_slice(&[0xc3, 0x28, 0xff]);
    body.extend_from_slice(&text.as_bytes()[at + 4..]);
    let resp = app.post_webhook(&body).await;
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "invalid_notification");
    // Nothing of it was processed: no conversation, no reply (the flush
    // template is the only send).
    app.flush().await;
    assert!(app.conversation(ANA).await.is_none());
    assert!(app.texts_to(ANA).await.is_empty());
    // The same notification as valid UTF-8 is answered.
    let valid = text.replace("MARK", "é");
    assert_eq!(app.post_webhook(valid.as_bytes()).await.status(), 200);
    assert_eq!(app.wait_texts(ANA, 1).await.len(), 1);
}

#[tokio::test]
async fn odd_items_inside_a_notification_are_accepted_and_skipped() {
    let app = spawn_app(GREETING).await;
    let mut n = notification(vec![text(ANA, "hi")], vec![]);
    let value = &mut n["entry"][0]["changes"][0]["value"];
    value["messages"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "from": ANA, "type": "text" }));
    value["messages"].as_array_mut().unwrap().push(json!({ "id": new_wamid(), "from": ANA, "timestamp": "1", "type": "hologram", "hologram": { "x": 1 } }));
    value["statuses"] = json!([{ "id": 5 }]);
    app.deliver(&n).await;
    app.wait_texts(ANA, 1).await;
}

#[tokio::test]
async fn the_same_message_delivered_twice_runs_the_rules_once() {
    let app = spawn_app(GREETING).await;
    let msg = text(ANA, "hi");
    let n = notification(vec![msg], vec![]);
    app.deliver(&n).await;
    app.deliver(&n).await;
    app.flush().await;
    assert_eq!(app.texts_to(ANA).await, vec!["Hi Ana! How can we help?"]);
}

#[tokio::test]
async fn a_batch_of_messages_from_two_contacts_is_handled_whole() {
    let app = spawn_app(GREETING).await;
    app.deliver(&notification(
        vec![text(ANA, "hi"), text(BOB, "hello")],
        vec![],
    ))
    .await;
    assert_eq!(
        app.wait_texts(ANA, 1).await,
        vec!["Hi Ana! How can we help?"]
    );
    assert_eq!(
        app.wait_texts(BOB, 1).await,
        vec!["Hi Bob! How can we help?"]
    );
}

#[tokio::test]
async fn every_fixture_is_acknowledged() {
    let app = spawn_app(GREETING).await;
    let dir = format!(
        "{}/../shared/whatsapp/fixtures/webhooks",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    assert!(names.len() >= 20);
    for path in names {
        let body = std::fs::read(&path).unwrap();
        let resp = app.post_webhook(&body).await;
        assert_eq!(resp.status(), 200, "{}", path.display());
    }
}

#[tokio::test]
async fn an_unknown_phone_number_id_is_acknowledged_and_ignored_in_live_mode() {
    let app = spawn_app(GREETING).await;
    let mut n = notification(vec![text(ANA, "hi")], vec![]);
    n["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = json!("999999999");
    app.deliver(&n).await;
    app.flush().await;
    assert!(app.texts_to(ANA).await.is_empty());
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("result=\"unknown_account\""), "{metrics}");
}

#[tokio::test]
async fn messages_of_one_conversation_are_routed_in_arrival_order() {
    let app = spawn_app(
        r#"
[[rule]]
name = "echo"
send = [ { type = "text", body = "echo {{ message.text }}" } ]
"#,
    )
    .await;
    for i in 0..8 {
        app.say(ANA, &format!("m{i}")).await;
    }
    let texts = app.wait_texts(ANA, 8).await;
    let expected: Vec<String> = (0..8).map(|i| format!("echo m{i}")).collect();
    assert_eq!(texts, expected);
}

#[tokio::test]
async fn statuses_never_move_a_message_backwards() {
    let app = spawn_app(GREETING).await;
    app.open_window(ANA).await;
    let (_, first) = app.send_text(ANA, "first").await;
    let id = first["id"].as_str().unwrap();
    let record = app.wait_status(id, "sent").await;
    let wamid = record["wamid"].as_str().unwrap().to_string();
    app.deliver(&notification(vec![], vec![status(&wamid, "read", ANA)]))
        .await;
    app.wait_status(id, "read").await;
    app.deliver(&notification(
        vec![],
        vec![
            status(&wamid, "delivered", ANA),
            status(&wamid, "sent", ANA),
        ],
    ))
    .await;
    // A later status for another message is a barrier for the ones before it.
    let (_, second) = app.send_text(ANA, "second").await;
    let second_id = second["id"].as_str().unwrap();
    let second_wamid = app.wait_status(second_id, "sent").await["wamid"]
        .as_str()
        .unwrap()
        .to_string();
    app.deliver(&notification(
        vec![],
        vec![status(&second_wamid, "delivered", ANA)],
    ))
    .await;
    app.wait_status(second_id, "delivered").await;
    let record = app.record(id).await;
    assert_eq!(record["status"], "read");
    let history: Vec<&str> = record["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(history, vec!["queued", "sending", "sent", "read"]);
}

#[tokio::test]
async fn a_failed_status_131047_fails_the_message_and_closes_the_window() {
    let app = spawn_app(GREETING).await;
    app.open_window(ANA).await;
    let (_, sent) = app.send_text(ANA, "late failure").await;
    let id = sent["id"].as_str().unwrap();
    let wamid = app.wait_status(id, "sent").await["wamid"]
        .as_str()
        .unwrap()
        .to_string();
    let mut failed = status(&wamid, "failed", ANA);
    failed["errors"] = json!([{ "code": 131047, "title": "Re-engagement message", "message": "Re-engagement message" }]);
    app.deliver(&notification(vec![], vec![failed])).await;
    let record = app.wait_status(id, "failed").await;
    assert_eq!(record["error"]["graph_code"], 131047);
    let (status, err) = app.send_text(ANA, "after").await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["error"]["code"], "window_closed");
}

#[tokio::test]
async fn an_old_message_does_not_open_a_window_and_a_future_one_is_clamped() {
    let app = spawn_app("").await;
    let mut old = text(ANA, "from two days ago");
    old["timestamp"] = json!((now_s() - 2 * 86400).to_string());
    app.inbound(old).await;
    let conv = wait_for(10, "the conversation", || app.conversation(ANA)).await;
    assert_eq!(conv["window"]["open"], false);
    let mut future = text(BOB, "from the future");
    future["timestamp"] = json!((now_s() + 7 * 86400).to_string());
    app.inbound(future).await;
    let conv = wait_for(10, "the conversation", || app.conversation(BOB)).await;
    assert_eq!(conv["window"]["open"], true);
    let expires =
        wa_router::domain::parse_rfc3339(conv["window"]["expires_at"].as_str().unwrap()).unwrap();
    assert!(
        expires <= (now_s() + 86400 + 5) * 1000,
        "clamped to now + 24 h: {conv}"
    );
}
