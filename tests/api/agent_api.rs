//! SPEC §7, second part: list, cancel, retry, conversations, protection.

use serde_json::{Value, json};
use wiremock::Mock;
use wiremock::matchers::{body_partial_json, method};

use crate::helpers::*;

#[tokio::test]
async fn cancel_takes_a_queued_message_out_and_refuses_sent_ones() {
    let app = spawn_with(Options {
        pace: "1s",
        ..Options::default()
    })
    .await;
    app.open_window(ANA).await;
    let (_, first) = app.send_text(ANA, "first").await;
    let (_, second) = app.send_text(ANA, "second").await;
    let (status, cancelled) = app
        .api(
            reqwest::Method::DELETE,
            &format!("/v1/messages/{}", second["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (200, Some("cancelled"))
    );
    let (_, third) = app.send_text(ANA, "third").await;
    app.wait_status(third["id"].as_str().unwrap(), "sent").await;
    assert_eq!(app.texts_to(ANA).await, vec!["first", "third"]);
    for id in [
        second["id"].as_str().unwrap(),
        first["id"].as_str().unwrap(),
    ] {
        let (status, err) = app
            .api(reqwest::Method::DELETE, &format!("/v1/messages/{id}"), None)
            .await;
        assert_eq!(
            (status, err["error"]["code"].as_str()),
            (409, Some("not_cancellable")),
            "{err}"
        );
    }
    let (status, _) = app
        .api(reqwest::Method::DELETE, "/v1/messages/msg_nope", None)
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_scheduled_message_can_be_cancelled() {
    let app = spawn_app(GREETING).await;
    let at = wa_router::domain::rfc3339(wa_router::domain::now_ms() + 3600 * 1000);
    let (_, body) = app.send(json!({ "to": format!("+{ANA}"), "type": "template", "template": { "name": "later", "language": { "code": "en" } }, "send_at": at })).await;
    let (status, rec) = app
        .api(
            reqwest::Method::DELETE,
            &format!("/v1/messages/{}", body["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!((status, rec["status"].as_str()), (200, Some("cancelled")));
    let (_, queues) = app.api(reqwest::Method::GET, "/v1/queues", None).await;
    assert_eq!(queues["queues"][0]["scheduled"], 0);
}

#[tokio::test]
async fn retry_requeues_a_failed_message_as_a_new_record() {
    let app = spawn_app(GREETING).await;
    Mock::given(method("POST"))
        .and(body_partial_json(
            json!({ "template": { "name": "flaky_once" } }),
        ))
        .respond_with(graph_error(400, 131026))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&app.graph)
        .await;
    let (_, sent) = app.send_template(ANA, "flaky_once").await;
    let id = sent["id"].as_str().unwrap();
    app.wait_status(id, "failed").await;
    let (status, again) = app
        .api(
            reqwest::Method::POST,
            &format!("/v1/messages/{id}/retry"),
            None,
        )
        .await;
    assert_eq!(status, 202, "{again}");
    assert_ne!(again["id"], sent["id"]);
    assert_eq!(again["retry_of"], id);
    let record = app.wait_status(again["id"].as_str().unwrap(), "sent").await;
    assert_eq!(record["type"], "template");
    let (status, err) = app
        .api(
            reqwest::Method::POST,
            &format!("/v1/messages/{}/retry", again["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (409, Some("not_retryable"))
    );
}

#[tokio::test]
async fn the_message_list_pages_newest_first_with_filters() {
    let app = spawn_app(GREETING).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (_, b) = app.send(json!({ "to": format!("+{ANA}"), "type": "template", "template": { "name": format!("t{i}"), "language": { "code": "en" } }, "tags": ["batch"] })).await;
        ids.push(b["id"].as_str().unwrap().to_string());
    }
    app.send_template(BOB, "other").await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/messages?tag=BATCH&limit=2&cursor={c}"),
            None => "/v1/messages?tag=batch&limit=2".to_string(),
        };
        let (status, page) = app.api(reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "{page}");
        let got: Vec<String> = page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        assert!(got.len() <= 2);
        seen.extend(got);
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "every tagged message once, newest first");
    let (_, by_to) = app
        .api(
            reqwest::Method::GET,
            &format!("/v1/messages?to=%2B{BOB}"),
            None,
        )
        .await;
    assert_eq!(by_to["messages"].as_array().unwrap().len(), 1);
    let (status, err) = app
        .api(reqwest::Method::GET, "/v1/messages?status=lost", None)
        .await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (400, Some("status"))
    );
    let (status, _) = app
        .api(reqwest::Method::GET, "/v1/messages?limit=0", None)
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn conversations_list_open_windows_first_and_page() {
    let app = spawn_app("").await;
    let mut old = text(BOB, "two days ago");
    old["timestamp"] = json!((now_s() - 2 * 86400).to_string());
    app.inbound(old).await;
    app.open_window(ANA).await;
    wait_for(10, "two conversations", || async {
        app.conversation(BOB).await.map(|_| ())
    })
    .await;
    let (_, page) = app
        .api(reqwest::Method::GET, "/v1/conversations?limit=1", None)
        .await;
    assert_eq!(page["conversations"][0]["wa_id"], ANA);
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let (_, next) = app
        .api(
            reqwest::Method::GET,
            &format!("/v1/conversations?limit=1&cursor={cursor}"),
            None,
        )
        .await;
    assert_eq!(next["conversations"][0]["wa_id"], BOB);
    assert!(next["next_cursor"].is_null());
    let (_, open) = app
        .api(
            reqwest::Method::GET,
            "/v1/conversations?account=main&open=true",
            None,
        )
        .await;
    assert_eq!(open["conversations"].as_array().unwrap().len(), 1);
    let (status, _) = app
        .api(reqwest::Method::GET, "/v1/conversations?account=nope", None)
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn state_put_drives_the_rules_and_opt_out_api_blocks_sends() {
    let app = spawn_app(
        r#"
[[rule]]
name = "vip"
when = { state = "vip" }
send = [ { type = "text", body = "Hello VIP {{ vars.tier }}" } ]
"#,
    )
    .await;
    let (status, conv) = app
        .api(
            reqwest::Method::PUT,
            &format!("/v1/conversations/main/{ANA}/state"),
            Some(json!({ "state": "vip", "vars": { "tier": "gold", "level": 3 } })),
        )
        .await;
    assert_eq!(status, 200, "{conv}");
    assert_eq!(conv["vars"], json!({ "tier": "gold", "level": "3" }));
    app.say(ANA, "hi").await;
    assert_eq!(app.wait_texts(ANA, 1).await, vec!["Hello VIP gold"]);
    let (status, err) = app
        .api(
            reqwest::Method::PUT,
            &format!("/v1/conversations/main/{ANA}/state"),
            Some(json!({ "vars": { "bad-name": "x" } })),
        )
        .await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (400, Some("vars.bad-name"))
    );
    let (status, conv) = app
        .api(
            reqwest::Method::POST,
            &format!("/v1/conversations/main/{ANA}/opt-out"),
            None,
        )
        .await;
    assert_eq!((status, &conv["opted_out"]), (200, &json!(true)));
    let (status, _) = app.send_template(ANA, "promo").await;
    assert_eq!(status, 403);
    app.api(
        reqwest::Method::DELETE,
        &format!("/v1/conversations/main/{ANA}/opt-out"),
        None,
    )
    .await;
    let (status, _) = app.send_template(ANA, "promo").await;
    assert_eq!(status, 202);
}

#[tokio::test]
async fn handoff_api_sets_an_expiry_and_validates_the_ttl() {
    let app = spawn_app(GREETING).await;
    let (status, conv) = app
        .api(
            reqwest::Method::POST,
            &format!("/v1/conversations/main/{ANA}/handoff"),
            Some(json!({ "ttl": "2h" })),
        )
        .await;
    assert_eq!(status, 200, "{conv}");
    assert_eq!(conv["handoff"]["active"], true);
    let until =
        wa_router::domain::parse_rfc3339(conv["handoff"]["until"].as_str().unwrap()).unwrap();
    let expected = wa_router::domain::now_ms() + 2 * 3600 * 1000;
    assert!((until - expected).abs() < 60_000, "{conv}");
    app.say(ANA, "hi").await;
    app.flush().await;
    assert!(
        app.texts_to(ANA).await.is_empty(),
        "no rules while handed off"
    );
    let (status, err) = app
        .api(
            reqwest::Method::POST,
            &format!("/v1/conversations/main/{ANA}/handoff"),
            Some(json!({ "ttl": "soon" })),
        )
        .await;
    assert_eq!((status, err["error"]["field"].as_str()), (400, Some("ttl")));
}

#[tokio::test]
async fn a_key_over_its_rate_gets_429_with_retry_after() {
    let app = spawn_with(Options {
        rate: 1,
        burst: 3,
        ..Options::default()
    })
    .await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..5 {
        let resp = app
            .http
            .get(app.url("/v1/queues"))
            .header("X-API-Key", API_KEY)
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status() == 429 {
            retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["code"], "rate_limited");
        }
    }
    assert_eq!(&statuses[..3], &[200, 200, 200]);
    assert_eq!(statuses[4], 429);
    assert!(retry_after.unwrap().parse::<u64>().unwrap() >= 1);
}

#[tokio::test]
async fn a_full_account_queue_answers_503_with_retry_after() {
    let app = spawn_with(Options {
        pace: "10s",
        account_extra: "max_queue = 2".into(),
        ..Options::default()
    })
    .await;
    let mut statuses = Vec::new();
    for i in 0..4 {
        let resp = app
            .http
            .post(app.url("/v1/messages"))
            .header("X-API-Key", API_KEY)
            .json(&json!({ "to": format!("+{ANA}"), "type": "template", "template": { "name": format!("q{i}"), "language": { "code": "en" } } }))
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status() == 503 {
            assert!(resp.headers().get("retry-after").is_some());
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["code"], "queue_full");
        }
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 503).count(),
        statuses.len() - statuses.iter().filter(|s| **s == 202).count()
    );
    assert!(statuses.contains(&503), "{statuses:?}");
}
