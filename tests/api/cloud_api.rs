//! Issue #10: today's Cloud API — typing indicators.

use serde_json::{Value, json};
use wiremock::Mock;
use wiremock::matchers::{body_partial_json, method};

use crate::helpers::*;

const TYPING: &str = r#"
[[rule]]
name = "greet"
when = { text = "hi" }
typing = true
[[rule.send]]
type = "text"
body = "Hello!"
[[rule.send]]
type = "text"
body = "How can we help?"
"#;

/// Every request body the Graph mock received, in arrival order.
async fn graph_bodies(app: &TestApp) -> Vec<Value> {
    app.graph
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter_map(|r| serde_json::from_slice(&r.body).ok())
        .collect()
}

fn is_typing(b: &Value) -> bool {
    b["typing_indicator"]["type"] == "text"
}

#[tokio::test]
async fn a_typing_rule_shows_the_indicator_before_its_first_reply() {
    let app = spawn_app(TYPING).await;
    let wamid = app.say(ANA, "hi").await;
    assert_eq!(app.wait_texts(ANA, 2).await, ["Hello!", "How can we help?"]);
    let bodies = graph_bodies(&app).await;
    let typing: Vec<usize> = (0..bodies.len())
        .filter(|&i| is_typing(&bodies[i]))
        .collect();
    assert_eq!(typing.len(), 1, "one indicator for the rule: {bodies:?}");
    let t = &bodies[typing[0]];
    assert_eq!(t["status"], "read");
    assert_eq!(t["message_id"], wamid.as_str());
    let first_send = bodies.iter().position(|b| b.get("to").is_some()).unwrap();
    assert!(
        typing[0] < first_send,
        "the indicator comes first: {bodies:?}"
    );
}

#[tokio::test]
async fn a_rule_without_typing_sends_no_indicator() {
    let app = spawn_app(GREETING).await;
    app.say(ANA, "hi").await;
    app.wait_texts(ANA, 1).await;
    app.flush().await;
    assert!(!graph_bodies(&app).await.iter().any(is_typing));
}

#[tokio::test]
async fn an_api_reply_with_typing_shows_it_once_even_when_the_send_is_retried() {
    let app = spawn_app(GREETING).await;
    app.open_window(BOB).await;
    let inbound = app.say(BOB, "a question").await;
    // The first attempt of the reply fails with a transient error.
    Mock::given(method("POST"))
        .and(body_partial_json(
            json!({ "text": { "body": "typed answer" } }),
        ))
        .respond_with(graph_error(500, 131000))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&app.graph)
        .await;
    let (status, sent) = app
        .send(json!({ "to": BOB, "type": "text", "text": "typed answer",
                      "reply_to": inbound, "typing": true }))
        .await;
    assert_eq!(status, 202, "{sent}");
    let record = app.wait_status(sent["id"].as_str().unwrap(), "sent").await;
    assert_eq!(record["attempts"], 2, "{record}");
    let bodies = graph_bodies(&app).await;
    let typing: Vec<&Value> = bodies.iter().filter(|b| is_typing(b)).collect();
    assert_eq!(typing.len(), 1, "not repeated with the retry: {bodies:?}");
    assert_eq!(typing[0]["message_id"], inbound.as_str());
    let typed = bodies.iter().position(is_typing).unwrap();
    let reply = bodies
        .iter()
        .position(|b| b["text"]["body"] == "typed answer")
        .unwrap();
    assert!(typed < reply);
}

#[tokio::test]
async fn typing_without_a_customer_message_to_reply_to_is_400() {
    let app = spawn_app(GREETING).await;
    app.open_window(ANA).await;
    for body in [
        json!({ "to": ANA, "type": "text", "text": "x", "typing": true }),
        json!({ "to": ANA, "type": "text", "text": "x", "typing": "yes" }),
    ] {
        let (status, err) = app.send(body).await;
        assert_eq!(status, 400, "{err}");
        assert_eq!(err["error"]["field"], "typing", "{err}");
    }
    app.flush().await;
    assert!(!graph_bodies(&app).await.iter().any(is_typing));
}

/// Issue #10.3: Meta's `pricing` and `conversation` objects on statuses
/// are kept on the record, shown by the API, passed on in status events
/// and counted once a message by category.
#[tokio::test]
async fn pricing_on_statuses_reaches_the_record_the_events_and_the_metrics() {
    let app = spawn_with(Options {
        routes: String::new(),
        targets: vec![("crm", r#"["status"]"#)],
        ..Options::default()
    })
    .await;
    let (_, sent) = app
        .send(json!({ "to": ANA, "type": "template",
                      "template": { "name": "receipt", "language": { "code": "en" } } }))
        .await;
    let id = sent["id"].as_str().unwrap().to_string();
    let wamid = app.wait_status(&id, "sent").await["wamid"]
        .as_str()
        .unwrap()
        .to_string();
    let pricing = json!({ "billable": true, "pricing_model": "PMP",
                          "type": "regular", "category": "utility" });
    let conversation = json!({ "id": "c41e8b27f09a5d6318be2f7740a9c5d1",
                               "expiration_timestamp": "1780171586",
                               "origin": { "type": "utility" } });
    // Meta's `sent` changes no status (the record is sent already) but
    // brings the pricing.
    let mut meta_sent = status(&wamid, "sent", ANA);
    meta_sent["pricing"] = pricing.clone();
    meta_sent["conversation"] = conversation.clone();
    app.deliver(&notification(vec![], vec![meta_sent])).await;
    wait_for(10, "the pricing on the record", || async {
        let r = app.record(&id).await;
        (r["pricing"] == pricing).then_some(())
    })
    .await;
    // `delivered` names the contact by BSUID only, and carries the pricing again.
    let delivered = json!({ "id": wamid, "status": "delivered",
                            "timestamp": now_s().to_string(),
                            "recipient_user_id": "US.13491208655302741918",
                            "pricing": pricing });
    app.deliver(&notification(vec![], vec![delivered])).await;
    let record = app.wait_status(&id, "delivered").await;
    assert_eq!(record["pricing"], pricing);
    assert_eq!(record["conversation"], conversation);
    let events = app.wait_events("crm", "message.status", 2).await;
    let last = &events.last().unwrap().body;
    assert_eq!(last["status"], "delivered");
    assert_eq!(last["pricing"], pricing);
    assert_eq!(last["conversation"], conversation);
    let metrics = app.metrics_text().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"wa_router_priced_messages_total{category="utility",type="regular"}"#
        ),
        Some(1.0),
        "counted once a message:\n{metrics}"
    );
}
