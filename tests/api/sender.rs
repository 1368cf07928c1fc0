//! SPEC §6: the paced sender, retries, policy at dispatch, sandbox sends.

use std::time::Duration;

use serde_json::json;
use wiremock::matchers::{body_partial_json, method};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

#[tokio::test]
async fn messages_leave_in_acceptance_order_at_least_pace_apart() {
    let app = spawn_with(Options {
        pace: "300ms",
        ..Options::default()
    })
    .await;
    app.open_window(ANA).await;
    let texts: Vec<String> = (1..=4).map(|i| format!("paced {i}")).collect();
    for t in &texts {
        let (status, body) = app.send_text(ANA, t).await;
        assert_eq!(status, 202, "{body}");
    }
    wait_for(15, "four sends", || async {
        (app.arrivals().len() >= 4).then_some(())
    })
    .await;
    let arrivals = app.arrivals();
    let order: Vec<String> = arrivals.iter().map(|(_, b)| body_text(b)).collect();
    assert_eq!(order, texts);
    for pair in arrivals.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap >= Duration::from_millis(250),
            "gap {gap:?} shorter than the pace"
        );
    }
}

#[tokio::test]
async fn the_202_answer_reports_queue_position_and_send_after() {
    let app = spawn_with(Options {
        pace: "10s",
        ..Options::default()
    })
    .await;
    app.open_window(ANA).await;
    let (_, first) = app.send_text(ANA, "one").await;
    let (_, second) = app.send_text(ANA, "two").await;
    assert_eq!(first["status"], "queued");
    assert_eq!(first["to"], ANA);
    assert_eq!(first["account"], "main");
    assert!(second["queue_position"].as_u64().unwrap() >= 1);
    let a = wa_router::domain::parse_rfc3339(first["send_after"].as_str().unwrap()).unwrap();
    let b = wa_router::domain::parse_rfc3339(second["send_after"].as_str().unwrap()).unwrap();
    if b - a < 9_000 {
        let r1 = app.record(first["id"].as_str().unwrap()).await;
        let r2 = app.record(second["id"].as_str().unwrap()).await;
        panic!("the second waits about a pace: {first} {second}\n{r1}\n{r2}");
    }
    let (_, queues) = app.api(reqwest::Method::GET, "/v1/queues", None).await;
    let q = &queues["queues"][0];
    assert_eq!(q["account"], "main");
    assert_eq!(q["pace"], "10s");
    assert!(q["depth"].as_u64().unwrap() >= 1, "{queues}");
}

#[tokio::test]
async fn a_429_with_retry_after_is_retried_and_order_holds() {
    let app = spawn_app(GREETING).await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({ "text": { "body": "first" } })))
        .respond_with(graph_error(429, 130429).insert_header("Retry-After", "1"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&app.graph)
        .await;
    app.open_window(ANA).await;
    let (_, first) = app.send_text(ANA, "first").await;
    let (_, second) = app.send_text(ANA, "second").await;
    let record = app.wait_status(first["id"].as_str().unwrap(), "sent").await;
    assert_eq!(record["attempts"], 2);
    app.wait_status(second["id"].as_str().unwrap(), "sent")
        .await;
    let order: Vec<String> = app.sends().await.iter().map(body_text).collect();
    assert_eq!(order, vec!["first", "first", "second"]);
    let history: Vec<&str> = record["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        history,
        vec!["queued", "sending", "queued", "sending", "sent"]
    );
}

#[tokio::test]
async fn server_errors_are_retried_up_to_max_attempts() {
    let app = spawn_app(GREETING).await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({ "text": { "body": "flaky" } })))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&app.graph)
        .await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({ "text": { "body": "doomed" } })))
        .respond_with(graph_error(500, 131000))
        .with_priority(1)
        .mount(&app.graph)
        .await;
    app.open_window(ANA).await;
    let (_, flaky) = app.send_text(ANA, "flaky").await;
    let (_, doomed) = app.send_text(ANA, "doomed").await;
    assert_eq!(
        app.wait_status(flaky["id"].as_str().unwrap(), "sent").await["attempts"],
        3
    );
    let record = app
        .wait_status(doomed["id"].as_str().unwrap(), "failed")
        .await;
    assert_eq!(record["attempts"], 4, "max_attempts = 4");
    assert_eq!(record["error"]["graph_code"], 131000);
    assert_eq!(
        app.sends()
            .await
            .iter()
            .filter(|b| body_text(b) == "doomed")
            .count(),
        4
    );
}

#[tokio::test]
async fn a_permanent_error_fails_at_once_with_the_graph_code() {
    let app = spawn_app(GREETING).await;
    Mock::given(method("POST"))
        .and(body_partial_json(
            json!({ "text": { "body": "undeliverable" } }),
        ))
        .respond_with(graph_error(400, 131026))
        .with_priority(1)
        .mount(&app.graph)
        .await;
    app.open_window(ANA).await;
    let (_, sent) = app.send_text(ANA, "undeliverable").await;
    let record = app
        .wait_status(sent["id"].as_str().unwrap(), "failed")
        .await;
    assert_eq!(record["attempts"], 1);
    assert_eq!(record["error"]["code"], "graph_error");
    assert_eq!(record["error"]["graph_code"], 131026);
    app.flush().await;
    assert_eq!(
        app.sends()
            .await
            .iter()
            .filter(|b| body_text(b) == "undeliverable")
            .count(),
        1
    );
}

/// A 2xx answer is read for `messages[0].id` only: Meta's extra fields
/// (`message_status`) are fine; an answer without the id fails the
/// message at once (it may have been sent: never retried) and says so.
#[tokio::test]
async fn a_send_is_sent_with_meta_s_wamid_and_an_answer_without_one_fails_it() {
    let app = spawn_app(GREETING).await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({ "text": { "body": "accepted" } })))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "messaging_product": "whatsapp",
            "contacts": [{ "input": ANA, "wa_id": ANA }],
            "messages": [{ "id": "wamid.HBgLMTYzMTU1NTExODEVAgARGBI", "message_status": "accepted" }]
        })))
        .with_priority(1)
        .mount(&app.graph)
        .await;
    for (text, answer) in [
        (
            "empty",
            json!({ "messaging_product": "whatsapp", "messages": [] }),
        ),
        ("numeric", json!({ "messages": [{ "id": 42 }] })),
        ("nothing", json!({})),
    ] {
        Mock::given(method("POST"))
            .and(body_partial_json(json!({ "text": { "body": text } })))
            .respond_with(ResponseTemplate::new(200).set_body_json(answer))
            .with_priority(1)
            .mount(&app.graph)
            .await;
    }
    app.open_window(ANA).await;
    let (_, sent) = app.send_text(ANA, "accepted").await;
    let record = app.wait_status(sent["id"].as_str().unwrap(), "sent").await;
    assert_eq!(record["wamid"], "wamid.HBgLMTYzMTU1NTExODEVAgARGBI");
    for text in ["empty", "numeric", "nothing"] {
        let (_, sent) = app.send_text(ANA, text).await;
        let record = app
            .wait_status(sent["id"].as_str().unwrap(), "failed")
            .await;
        assert_eq!(record["attempts"], 1, "{text}");
        assert_eq!(record["error"]["code"], "graph_error", "{text}");
        assert_eq!(
            record["error"]["message"],
            "unexpected Graph API answer: no messages[0].id in the answer",
            "{text}"
        );
    }
}

#[tokio::test]
async fn a_131047_answer_fails_the_message_and_closes_the_window() {
    let app = spawn_app(GREETING).await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({ "text": { "body": "too late" } })))
        .respond_with(graph_error(400, 131047))
        .with_priority(1)
        .mount(&app.graph)
        .await;
    app.open_window(ANA).await;
    let (_, sent) = app.send_text(ANA, "too late").await;
    app.wait_status(sent["id"].as_str().unwrap(), "failed")
        .await;
    let conv = app.conversation(ANA).await.unwrap();
    assert_eq!(conv["window"]["open"], false);
}

#[tokio::test]
async fn policy_is_checked_again_at_dispatch() {
    let app = spawn_with(Options {
        pace: "2s",
        ..Options::default()
    })
    .await;
    app.open_window(ANA).await;
    let (_, first) = app.send_text(ANA, "first").await;
    app.wait_status(first["id"].as_str().unwrap(), "sent").await;
    // The next send is a pace (2 s) away: the second outlives its validity (1 s)…
    let (_, second) = app
        .send(json!({ "to": format!("+{ANA}"), "type": "text", "text": "second", "validity": 1 }))
        .await;
    let (_, third) = app.send_text(ANA, "third").await;
    // …and the contact opts out before the third leaves.
    app.say(ANA, "stop").await;
    app.wait_status(second["id"].as_str().unwrap(), "expired")
        .await;
    let record = app
        .wait_status(third["id"].as_str().unwrap(), "failed")
        .await;
    assert_eq!(record["error"]["code"], "opted_out");
    assert_eq!(record["attempts"], 0);
    let sent: Vec<String> = app.sends().await.iter().map(body_text).collect();
    assert_eq!(sent, vec!["first"]);
}

#[tokio::test]
async fn scheduled_messages_wait_for_send_at() {
    let app = spawn_app(GREETING).await;
    let at = wa_router::domain::rfc3339(wa_router::domain::now_ms() + 3600 * 1000);
    let (status, body) = app
        .send(json!({ "to": format!("+{ANA}"), "type": "template", "template": { "name": "reminder", "language": { "code": "en" } }, "send_at": at }))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "scheduled");
    assert_eq!(body["send_after"], at.as_str());
    let (_, queues) = app.api(reqwest::Method::GET, "/v1/queues", None).await;
    assert_eq!(queues["queues"][0]["scheduled"], 1);
    assert_eq!(queues["queues"][0]["next_send_at"], at.as_str());
    app.flush().await;
    assert!(
        app.sends()
            .await
            .iter()
            .all(|b| b["template"]["name"] != "reminder")
    );
    // Within 10 minutes means now.
    let soon = wa_router::domain::rfc3339(wa_router::domain::now_ms() + 60 * 1000);
    let (_, body) = app
        .send(json!({ "to": format!("+{ANA}"), "type": "template", "template": { "name": "soon", "language": { "code": "en" } }, "send_at": soon }))
        .await;
    assert_eq!(body["status"], "queued");
}

#[tokio::test]
async fn sandbox_accounts_send_nothing_over_the_network() {
    let app = spawn_with(Options {
        live: false,
        ..Options::default()
    })
    .await;
    app.say(ANA, "hi").await;
    let (_, messages) = wait_for(10, "the greeting record", || async {
        let (s, m) = app
            .api(
                reqwest::Method::GET,
                &format!("/v1/conversations/main/{ANA}/messages"),
                None,
            )
            .await;
        m["messages"]
            .as_array()
            .is_some_and(|a| {
                a.iter()
                    .any(|x| x["direction"] == "out" && x["status"] == "sent")
            })
            .then_some((s, m))
    })
    .await;
    let out = messages["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["direction"] == "out")
        .unwrap()
        .clone();
    let record = app.record(out["id"].as_str().unwrap()).await;
    assert!(
        record["wamid"]
            .as_str()
            .unwrap()
            .starts_with("wamid.sandbox."),
        "{record}"
    );
    assert!(
        app.graph
            .received_requests()
            .await
            .unwrap_or_default()
            .is_empty()
    );
    // A second phone number id seen in a webhook becomes a sandbox account.
    let mut n = notification(vec![text(BOB, "hi")], vec![]);
    n["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = json!("107655329009876");
    app.deliver(&n).await;
    let conv = wait_for(10, "the sandbox account", || async {
        let (s, c) = app
            .api(
                reqwest::Method::GET,
                &format!("/v1/conversations/107655329009876/{BOB}"),
                None,
            )
            .await;
        (s == 200).then_some(c)
    })
    .await;
    assert_eq!(conv["account"], "107655329009876");
}

#[tokio::test]
async fn a_graph_timeout_is_transient() {
    let app = spawn_app(GREETING).await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({ "text": { "body": "slow" } })))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(3)))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&app.graph)
        .await;
    app.open_window(ANA).await;
    let (_, sent) = app.send_text(ANA, "slow").await;
    let record = app.wait_status(sent["id"].as_str().unwrap(), "sent").await;
    assert_eq!(record["attempts"], 2, "timeout 2s, then a retry: {record}");
}

#[tokio::test]
async fn a_graph_api_that_refuses_connections_is_retried_then_recorded_failed() {
    let app = spawn_with(Options {
        graph_url: Some("http://127.0.0.1:1".into()),
        ..Options::default()
    })
    .await;
    let (status, sent) = app.send_template(ANA, "unreachable").await;
    assert_eq!(status, 202);
    let record = app
        .wait_status(sent["id"].as_str().unwrap(), "failed")
        .await;
    assert_eq!(record["attempts"], 4, "max_attempts = 4: {record}");
    assert!(
        record["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{record}"
    );
    assert!(record["error"]["graph_code"].is_null());
}

/// The first bytes a router sends to a Graph API at `graph_url` that
/// accepts the connection and reads, with `[meta]` extra `meta`.
async fn first_bytes_to_graph(meta: &str) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let graph_url = format!("http://{}", listener.local_addr().unwrap());
    let app = spawn_with(Options {
        graph_url: Some(graph_url),
        meta_extra: meta.into(),
        ..Options::default()
    })
    .await;
    let (status, _) = app.send_template(ANA, "hello").await;
    assert_eq!(status, 202);
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("the router connects")
        .unwrap();
    let mut first = vec![0u8; 24];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut first))
        .await
        .expect("the router writes")
        .unwrap();
    first
}

#[tokio::test]
async fn sends_use_http_1_1_unless_graph_http_is_2() {
    // Default: HTTP/1.1 (sends in flight are not capped by a server's
    // stream limit on one connection).
    let first = first_bytes_to_graph("").await;
    assert!(
        first.starts_with(b"POST /v25.0/"),
        "{:?}",
        String::from_utf8_lossy(&first)
    );
    // "2" on plain http: HTTP/2 from the first byte (prior knowledge).
    let first = first_bytes_to_graph("graph_http = \"2\"").await;
    assert_eq!(&first, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    // And the mock, which speaks both, gets and answers the sends.
    let app = spawn_with(Options {
        meta_extra: "graph_http = \"2\"".into(),
        ..Options::default()
    })
    .await;
    app.open_window(ANA).await;
    let (status, sent) = app.send_text(ANA, "over h2").await;
    assert_eq!(status, 202);
    let record = app.wait_status(sent["id"].as_str().unwrap(), "sent").await;
    assert!(record["wamid"].is_string(), "{record}");
    assert_eq!(app.texts_to(ANA).await, ["over h2"]);
}

/// A proxy the environment names for the Graph URL carries the sends (and
/// their answers); the host behind it does not even resolve here.
#[tokio::test]
async fn graph_requests_go_through_the_proxy_the_environment_names() {
    let proxy = wiremock::MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "messaging_product": "whatsapp",
            "contacts": [{ "input": ANA, "wa_id": ANA }],
            "messages": [{ "id": "wamid.PROXIED" }],
        })))
        .mount(&proxy)
        .await;
    let dir = tempfile::tempdir().unwrap();
    crate::durability::write_config(
        dir.path(),
        "http://graph.example.invalid",
        "0s",
        STATEFUL,
        "",
    );
    let via = proxy.uri();
    let r = crate::durability::Router::spawn_env(
        dir.path(),
        &[
            ("HTTP_PROXY", &via),
            ("http_proxy", &via),
            ("NO_PROXY", ""),
            ("no_proxy", ""),
        ],
    )
    .await;
    assert_eq!(
        r.webhook(&notification(vec![text(ANA, "hi")], vec![]))
            .await,
        200
    );
    let sent = wait_for(10, "the send at the proxy", || async {
        proxy
            .received_requests()
            .await?
            .into_iter()
            .find(|q| q.method.as_str() == "POST")
    })
    .await;
    assert_eq!(
        sent.url.host_str(),
        Some("graph.example.invalid"),
        "asked of the proxy in absolute form"
    );
    assert!(sent.url.path().ends_with(&format!("/{PNID}/messages")));
    assert_eq!(
        sent.headers.get("authorization").unwrap(),
        &format!("Bearer {TOKEN}")
    );
    assert_eq!(body_text(&sent.body_json().unwrap()), "Hello");
    // The answer came back the same way.
    wait_for(10, "the message sent", || async {
        let (_, page) = r
            .api(
                reqwest::Method::GET,
                &format!("/v1/messages?to={ANA}"),
                None,
            )
            .await;
        (page["messages"][0]["status"] == "sent" && page["messages"][0]["wamid"] == "wamid.PROXIED")
            .then_some(())
    })
    .await;
}
