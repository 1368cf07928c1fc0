//! SPEC §7: the agent API.

use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn every_v1_route_needs_a_key() {
    let app = spawn_app(GREETING).await;
    let template = json!({ "to": format!("+{ANA}"), "type": "template", "template": { "name": "hello_world", "language": { "code": "en_US" } } });
    let no_key = app
        .http
        .post(app.url("/v1/messages"))
        .json(&template)
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    let body: Value = no_key.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let wrong = app
        .http
        .get(app.url("/v1/queues"))
        .header("X-API-Key", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let wrong_bearer = app
        .http
        .get(app.url("/v1/queues"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_bearer.status(), 401);
    let bearer = app
        .http
        .get(app.url("/v1/queues"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 200);
    app.flush().await;
    assert!(app.texts_to(ANA).await.is_empty());
}

#[tokio::test]
async fn a_text_in_an_open_window_is_sent_and_its_record_reaches_sent() {
    let app = spawn_app(GREETING).await;
    app.open_window(ANA).await;
    let (status, body) = app
        .send(json!({ "to": "+1 (631) 555-1181", "type": "text", "text": "Your table is booked", "tags": ["Booking", "booking"], "metadata": { "crm_id": 42 } }))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap();
    assert!(id.starts_with("msg_"));
    let record = app.wait_status(id, "sent").await;
    assert_eq!(record["source"], "api");
    assert_eq!(record["to"], ANA);
    assert_eq!(record["type"], "text");
    assert_eq!(record["tags"], json!(["booking"]));
    assert_eq!(record["metadata"], json!({ "crm_id": 42 }));
    assert_eq!(record["attempts"], 1);
    assert!(record["wamid"].as_str().unwrap().starts_with("wamid.mock."));
    let sent = app.sends().await;
    assert_eq!(sent[0]["text"]["body"], "Your table is booked");
    assert_eq!(sent[0]["to"], ANA);
}

#[tokio::test]
async fn free_form_without_a_window_is_422_and_templates_pass() {
    let app = spawn_app(GREETING).await;
    let (status, err) = app.send_text(ANA, "out of the blue").await;
    assert_eq!(status, 422);
    assert_eq!(err["error"]["code"], "window_closed");
    let (status, body) = app.send_template(ANA, "order_update").await;
    assert_eq!(status, 202, "{body}");
    app.flush().await;
    assert_eq!(app.texts_to(ANA).await, vec!["order_update"]);
}

#[tokio::test]
async fn invalid_requests_name_the_field() {
    let app = spawn_app(GREETING).await;
    app.open_window(ANA).await;
    let four: Vec<Value> = (0..4).map(|i| json!({ "type": "reply", "reply": { "id": format!("b{i}"), "title": format!("B{i}") } })).collect();
    let to = format!("+{ANA}");
    let cases = vec![
        (
            json!({ "to": to, "type": "interactive", "interactive": { "type": "button", "body": { "text": "Pick" }, "action": { "buttons": four } } }),
            "invalid_request",
            "interactive.action.buttons",
        ),
        (
            json!({ "to": to, "type": "text", "text": { "body": "x".repeat(4097) } }),
            "invalid_request",
            "text.body",
        ),
        (
            json!({ "to": to, "type": "text" }),
            "invalid_request",
            "text",
        ),
        (
            json!({ "to": to, "type": "telegram" }),
            "invalid_request",
            "type",
        ),
        (
            json!({ "to": to, "type": "text", "text": "hi", "colour": "red" }),
            "invalid_request",
            "colour",
        ),
        (
            json!({ "to": "not-a-phone", "type": "text", "text": "hi" }),
            "invalid_phone",
            "to",
        ),
        (
            json!({ "to": "+1-631-CALL-NOW", "type": "text", "text": "hi" }),
            "invalid_phone",
            "to",
        ),
        (
            json!({ "type": "text", "text": "hi" }),
            "invalid_request",
            "to",
        ),
        (
            json!({ "to": to, "type": "text", "text": "hi", "tags": (0..11).map(|i| format!("t{i}")).collect::<Vec<_>>() }),
            "invalid_request",
            "tags",
        ),
        (
            json!({ "to": to, "type": "text", "text": "hi", "send_at": "tomorrow" }),
            "invalid_request",
            "send_at",
        ),
        (
            json!({ "to": to, "type": "text", "text": "hi", "send_at": "2099-01-01T00:00:00Z" }),
            "invalid_request",
            "send_at",
        ),
        (
            json!({ "to": to, "type": "text", "text": "hi", "validity": -5 }),
            "invalid_request",
            "validity",
        ),
        (
            json!({ "to": to, "type": "image", "image": {} }),
            "invalid_request",
            "image.link",
        ),
        (
            json!({ "to": to, "type": "template", "template": { "name": "Bad Name", "language": { "code": "en" } } }),
            "invalid_request",
            "template.name",
        ),
        (
            json!({ "to": to, "type": "reaction", "reaction": { "message_id": "wamid.x", "emoji": "👍" }, "reply_to": "wamid.y" }),
            "invalid_request",
            "reply_to",
        ),
    ];
    for (body, code, field) in cases {
        let (status, err) = app.send(body.clone()).await;
        assert_eq!(status, 400, "{body} → {err}");
        assert_eq!(err["error"]["code"], code, "{body} → {err}");
        let named = err["error"]["field"].as_str().unwrap_or_default();
        assert!(
            named.contains(field),
            "{body}: field {named:?} should name {field:?}"
        );
    }
    let (status, err) = app
        .send(json!({ "account": "nope", "to": to, "type": "text", "text": "hi" }))
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("unknown_account"))
    );
    app.flush().await;
    assert!(
        app.texts_to(ANA).await.is_empty(),
        "nothing invalid was sent"
    );
}

#[tokio::test]
async fn malformed_and_oversized_bodies_get_the_error_envelope() {
    let app = spawn_app(GREETING).await;
    let post = |body: Vec<u8>| {
        app.http
            .post(app.url("/v1/messages"))
            .header("X-API-Key", API_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let resp = post(b"{not json".to_vec()).await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_request"
    );
    let big = format!(
        "{{\"to\":\"+{ANA}\",\"type\":\"text\",\"text\":\"{}\"}}",
        "x".repeat(1_100_000)
    );
    let resp = post(big.into_bytes()).await.unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "payload_too_large"
    );
    let resp = app
        .http
        .get(app.url("/v1/nothing-here"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "not_found"
    );
    let (status, err) = app
        .api(reqwest::Method::GET, "/v1/messages/msg_unknown", None)
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
}

#[tokio::test]
async fn an_idempotency_key_returns_the_original_answer_and_sends_once() {
    let app = spawn_app(GREETING).await;
    let body = json!({ "to": format!("+{ANA}"), "type": "template", "template": { "name": "booking_confirm", "language": { "code": "en" } }, "idempotency_key": "booking-42" });
    let (s1, first) = app.send(body.clone()).await;
    let (s2, again) = app.send(body.clone()).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(first["id"], again["id"]);
    let mut other = body.clone();
    other["template"]["name"] = json!("booking_cancel");
    let (status, err) = app.send(other).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );
    // The header works the same way.
    let header_body = json!({ "to": format!("+{ANA}"), "type": "template", "template": { "name": "via_header", "language": { "code": "en" } } });
    let send = || {
        app.http
            .post(app.url("/v1/messages"))
            .header("X-API-Key", API_KEY)
            .header("Idempotency-Key", "h-1")
            .json(&header_body)
            .send()
    };
    let a: Value = send().await.unwrap().json().await.unwrap();
    let b: Value = send().await.unwrap().json().await.unwrap();
    assert_eq!(a["id"], b["id"]);
    app.flush().await;
    let texts = app.texts_to(ANA).await;
    assert_eq!(texts, vec!["booking_confirm", "via_header"]);
}

#[tokio::test]
async fn reply_to_a_router_id_quotes_its_wamid() {
    let app = spawn_app(GREETING).await;
    app.open_window(ANA).await;
    let (_, first) = app.send_text(ANA, "question").await;
    let wamid = app.wait_status(first["id"].as_str().unwrap(), "sent").await["wamid"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = app.send(json!({ "to": format!("+{ANA}"), "type": "text", "text": "follow-up", "reply_to": first["id"] })).await;
    assert_eq!(status, 202, "{body}");
    app.wait_status(body["id"].as_str().unwrap(), "sent").await;
    let sends = app.sends().await;
    let follow = sends.iter().find(|b| body_text(b) == "follow-up").unwrap();
    assert_eq!(follow["context"]["message_id"], wamid.as_str());
}

#[tokio::test]
async fn conversations_show_window_name_and_recent_messages() {
    let app = spawn_app(GREETING).await;
    let (status, _) = app
        .api(
            reqwest::Method::GET,
            &format!("/v1/conversations/main/{ANA}"),
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = app
        .api(
            reqwest::Method::GET,
            &format!("/v1/conversations/nope/{ANA}"),
            None,
        )
        .await;
    assert_eq!(status, 404);
    app.say(ANA, "hi").await;
    app.wait_texts(ANA, 1).await;
    let conv = app.conversation(&format!("+{ANA}")).await.unwrap();
    assert_eq!(conv["wa_id"], ANA);
    assert_eq!(conv["contact"]["name"], "Ana");
    assert_eq!(conv["window"]["open"], true);
    assert_eq!(conv["opted_out"], false);
    assert_eq!(conv["handoff"]["active"], false);
    let (_, messages) = app
        .api(
            reqwest::Method::GET,
            &format!("/v1/conversations/main/{ANA}/messages"),
            None,
        )
        .await;
    let dirs: Vec<&str> = messages["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["direction"].as_str().unwrap())
        .collect();
    assert_eq!(dirs, vec!["in", "out"]);
}
