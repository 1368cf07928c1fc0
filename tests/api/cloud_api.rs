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

const CAROL_ID: &str = "US.13491208655302741918";
const CAROL_PHONE: &str = "16315551183";

const USERNAME_GREETING: &str = r#"
[[rule]]
name = "greet"
when = { text = "hi" }
set_state = "greeted"
forward = "agents"
[[rule.send]]
type = "text"
body = "Hi @{{ contact.username }}!"

[[rule]]
name = "again"
when = { text = "again" }
forward = "agents"
[[rule.send]]
type = "text"
body = "Again, {{ contact.name }}"
"#;

/// A notification from a contact given by `user_id` (and `wa_id` when
/// `phone` is set), with a username.
fn from_user(text: &str, phone: Option<&str>) -> Value {
    let mut contact = json!({ "profile": { "name": "Carol", "username": "carol.b" },
                              "user_id": CAROL_ID });
    let mut msg = json!({ "from_user_id": CAROL_ID, "id": new_wamid(),
                          "timestamp": now_s().to_string(), "type": "text",
                          "text": { "body": text } });
    if let Some(p) = phone {
        contact["wa_id"] = json!(p);
        msg["from"] = json!(p);
    }
    let mut n = notification(vec![], vec![]);
    let value = &mut n["entry"][0]["changes"][0]["value"];
    value["contacts"] = json!([contact]);
    value["messages"] = json!([msg]);
    n
}

/// Graph send bodies (with `to` or `recipient`), in arrival order.
async fn graph_sends(app: &TestApp) -> Vec<Value> {
    graph_bodies(app)
        .await
        .into_iter()
        .filter(|b| b.get("to").is_some() || b.get("recipient").is_some())
        .collect()
}

async fn wait_graph_sends(app: &TestApp, count: usize) -> Vec<Value> {
    wait_for(10, &format!("{count} Graph sends"), || async {
        let s = graph_sends(app).await;
        (s.len() >= count).then_some(s)
    })
    .await
}

/// Issue #10.1: a contact known only by BSUID is answered with
/// `recipient`, the username reaches templates and events, a status that
/// names only the BSUID finds its record; once a notification links the
/// BSUID to a phone number, the conversations merge and either id reaches it.
#[tokio::test]
async fn a_contact_known_only_by_bsuid_is_answered_by_recipient_and_merges_when_linked() {
    let app = spawn_greeting().await;
    app.deliver(&from_user("hi", None)).await;
    let sends = wait_graph_sends(&app, 1).await;
    assert_eq!(sends[0]["recipient"], CAROL_ID, "{sends:?}");
    assert!(
        sends[0].get("to").is_none(),
        "no `to` without a phone number"
    );
    assert_eq!(sends[0]["text"]["body"], "Hi @carol.b!");
    // The status names the contact by BSUID only.
    let (_, list) = app
        .api(reqwest::Method::GET, "/v1/messages?limit=1", None)
        .await;
    let id = list["messages"][0]["id"].as_str().unwrap().to_string();
    let record = app.wait_status(&id, "sent").await;
    let wamid = record["wamid"].as_str().unwrap();
    let status = json!({ "id": wamid, "status": "delivered",
                         "timestamp": now_s().to_string(), "recipient_user_id": CAROL_ID });
    app.deliver(&notification(vec![], vec![status])).await;
    app.wait_status(&id, "delivered").await;
    let conv = app
        .conversation(CAROL_ID)
        .await
        .expect("kept under the BSUID");
    assert_eq!(conv["state"], "greeted");
    assert_eq!(conv["contact"]["username"], "carol.b");
    // A notification with both ids links them: one conversation, under the
    // phone number, reached by either id, state and window kept.
    app.deliver(&from_user("again", Some(CAROL_PHONE))).await;
    let sends = wait_graph_sends(&app, 2).await;
    assert_eq!(sends[1]["to"], CAROL_PHONE, "{sends:?}");
    assert!(sends[1].get("recipient").is_none());
    for id in [CAROL_ID, CAROL_PHONE] {
        let c = app.conversation(id).await.expect("either id");
        assert_eq!(c["wa_id"], CAROL_PHONE, "{c}");
        assert_eq!(c["contact"]["user_id"], CAROL_ID);
        assert_eq!(
            c["state"], "greeted",
            "the BSUID conversation's state moved"
        );
        assert_eq!(c["window"]["open"], true);
    }
    // The history of both, through either id.
    let (status, msgs) = app
        .api(
            reqwest::Method::GET,
            &format!("/v1/conversations/main/{CAROL_ID}/messages"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{msgs}");
    let texts: Vec<&str> = msgs["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert!(texts.contains(&"hi") && texts.contains(&"again"), "{msgs}");
    // Later, the BSUID alone again: the phone number's conversation.
    app.deliver(&from_user("again", None)).await;
    let sends = wait_graph_sends(&app, 3).await;
    assert_eq!(sends[2]["to"], CAROL_PHONE, "{sends:?}");
    let events = app.wait_events("agents", "message.received", 3).await;
    let contact = &events[0].body["contact"];
    assert_eq!(contact["user_id"], CAROL_ID);
    assert_eq!(contact["username"], "carol.b");
}

const CAROL_NEW_PHONE: &str = "16315550147";
const CAROL_NEW_ID: &str = "US.77120394856601928374";

/// Meta's `system` message from `from` (no `contacts[]`, as Meta sends it).
fn system_message(from: &str, system: Value) -> Value {
    notification(
        vec![
            json!({ "from": from, "id": new_wamid(), "timestamp": now_s().to_string(),
                     "type": "system", "system": system }),
        ],
        vec![],
    )
}

async fn spawn_greeting() -> TestApp {
    spawn_with(Options {
        routes: USERNAME_GREETING.into(),
        targets: vec![("agents", r#"["message"]"#)],
        ..Options::default()
    })
    .await
}

/// A contact who changes their number (Meta's `system`
/// `user_changed_number`) keeps their conversation: window, state and new
/// BSUID are on the new number, where replies and API sends go; the old
/// number keeps only its history.
#[tokio::test]
async fn a_contact_who_changes_number_keeps_their_conversation_on_the_new_one() {
    let app = spawn_greeting().await;
    app.deliver(&from_user("hi", Some(CAROL_PHONE))).await;
    let sends = wait_graph_sends(&app, 1).await;
    assert_eq!(sends[0]["to"], CAROL_PHONE);
    app.deliver(&system_message(
        CAROL_PHONE,
        json!({ "body": "User Carol changed from 16315551183 to 16315550147",
                "wa_id": CAROL_NEW_PHONE, "user_id": CAROL_NEW_ID,
                "type": "user_changed_number" }),
    ))
    .await;
    for id in [CAROL_NEW_PHONE, CAROL_NEW_ID] {
        let c = app.conversation(id).await.expect("the new number's");
        assert_eq!(c["wa_id"], CAROL_NEW_PHONE, "{c}");
        assert_eq!(c["state"], "greeted", "{c}");
        assert_eq!(c["window"]["open"], true, "{c}");
        assert_eq!(c["contact"]["user_id"], CAROL_NEW_ID);
    }
    let old = app
        .conversation(CAROL_PHONE)
        .await
        .expect("its history stays");
    assert_eq!(
        (&old["state"], &old["window"]["open"]),
        (&json!(""), &json!(false)),
        "{old}"
    );
    // The window came along: a free-form send to the new number, which
    // has not written yet, goes out.
    let (status, sent) = app.send_text(CAROL_NEW_PHONE, "welcome back").await;
    assert_eq!(status, 202, "{sent}");
    let sends = wait_graph_sends(&app, 2).await;
    assert_eq!(sends[1]["to"], CAROL_NEW_PHONE, "{sends:?}");
    // The new BSUID alone reaches the new number.
    app.deliver(&from_bsuid(CAROL_NEW_ID, "again")).await;
    let sends = wait_graph_sends(&app, 3).await;
    assert_eq!(sends[2]["to"], CAROL_NEW_PHONE, "{sends:?}");
    // The system message itself is in the new number's history.
    let (status, msgs) = app
        .api(
            reqwest::Method::GET,
            &format!("/v1/conversations/main/{CAROL_NEW_PHONE}/messages"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{msgs}");
    assert!(
        msgs["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["type"] == "unsupported"),
        "{msgs}"
    );
}

/// A new BSUID (Meta's `user_id_update`, or a `system`
/// `user_changed_user_id`): a contact known by BSUID only keeps their
/// conversation under the new one; a contact with a number is reached by
/// the new one.
#[tokio::test]
async fn a_new_bsuid_keeps_the_contact_s_conversation() {
    let app = spawn_greeting().await;
    app.deliver(&from_user("hi", None)).await;
    let sends = wait_graph_sends(&app, 1).await;
    assert_eq!(sends[0]["recipient"], CAROL_ID);
    app.deliver(&user_id_update(CAROL_ID, CAROL_NEW_ID)).await;
    let c = app.conversation(CAROL_NEW_ID).await.expect("moved");
    assert_eq!(
        (&c["wa_id"], &c["state"]),
        (&json!(CAROL_NEW_ID), &json!("greeted")),
        "{c}"
    );
    app.deliver(&from_bsuid(CAROL_NEW_ID, "again")).await;
    let sends = wait_graph_sends(&app, 2).await;
    assert_eq!(sends[1]["recipient"], CAROL_NEW_ID, "{sends:?}");
    // A contact with a number: its new BSUID alone reaches it.
    let next = "US.5550001";
    app.say(ANA, "hi").await;
    let sends = wait_graph_sends(&app, 3).await;
    assert_eq!(sends[2]["to"], ANA);
    app.deliver(&system_message(
        ANA,
        json!({ "body": "User changed their user id", "user_id": next,
                "type": "user_changed_user_id" }),
    ))
    .await;
    app.deliver(&from_bsuid(next, "again")).await;
    let sends = wait_graph_sends(&app, 4).await;
    assert_eq!(sends[3]["to"], ANA, "{sends:?}");
    let c = app
        .conversation(next)
        .await
        .expect("reached by the new BSUID");
    assert_eq!(
        (&c["wa_id"], &c["contact"]["user_id"]),
        (&json!(ANA), &json!(next)),
        "{c}"
    );
}

#[tokio::test]
async fn the_api_sends_to_a_bsuid_as_recipient_and_refuses_other_recipients() {
    let app = spawn_app(GREETING).await;
    app.deliver(&from_user("hello there", None)).await;
    app.rules_idle().await;
    let (status, sent) = app
        .send(json!({ "recipient": CAROL_ID, "type": "text", "text": "by BSUID" }))
        .await;
    assert_eq!(status, 202, "{sent}");
    let sends = wait_graph_sends(&app, 1).await;
    assert_eq!(sends[0]["recipient"], CAROL_ID);
    assert_eq!(sends[0]["text"]["body"], "by BSUID");
    for bad in ["16315551181", "carol", "US."] {
        let (status, err) = app
            .send(json!({ "recipient": bad, "type": "text", "text": "x" }))
            .await;
        assert_eq!(status, 400, "{bad}: {err}");
        assert_eq!(err["error"]["field"], "recipient");
    }
    let (status, err) = app.send(json!({ "type": "text", "text": "x" })).await;
    assert_eq!(status, 400, "{err}");
}

fn template_status(name: &str, event: &str, category: &str) -> Value {
    account_change(
        "message_template_status_update",
        json!({ "event": event, "message_template_id": 1184736205519843_i64,
                "message_template_name": name, "message_template_language": "en_US",
                "reason": "NONE", "message_template_category": category }),
    )
}

/// Issue #10.4: a template Meta paused fails fast, without a Graph call,
/// until Meta reinstates it; the change reaches `account` targets.
#[tokio::test]
async fn a_template_paused_by_webhook_fails_the_next_send_without_a_graph_call() {
    let app = spawn_with(Options {
        targets: vec![
            ("ops", r#"["account"]"#),
            ("agents", r#"["message", "status"]"#),
        ],
        ..Options::default()
    })
    .await;
    app.deliver(&template_status("spring_sale", "PAUSED", "MARKETING"))
        .await;
    let (status, err) = app.send_template(ANA, "spring_sale").await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["error"]["code"], "template_paused");
    app.flush().await;
    let sent: Vec<Value> = graph_sends(&app)
        .await
        .into_iter()
        .filter(|b| b["template"]["name"] == "spring_sale")
        .collect();
    assert!(sent.is_empty(), "Meta was not called: {sent:?}");
    // The change went to the target subscribed to `account` only.
    let events = app.wait_events("ops", "account.update", 1).await;
    let e = &events[0].body;
    assert_eq!(e["field"], "message_template_status_update");
    assert_eq!(e["waba_id"], "310298475561023");
    assert_eq!(e["value"]["event"], "PAUSED");
    assert_eq!(e["value"]["message_template_name"], "spring_sale");
    assert!(
        app.deliveries("agents")
            .await
            .iter()
            .all(|d| d.body["event"] != "account.update")
    );
    // Reinstated: it goes out again.
    app.deliver(&template_status("spring_sale", "REINSTATED", "MARKETING"))
        .await;
    let (status, sent) = app.send_template(ANA, "spring_sale").await;
    assert_eq!(status, 202, "{sent}");
    app.wait_status(sent["id"].as_str().unwrap(), "sent").await;
}

async fn rate_and_in_flight(app: &TestApp) -> (Value, Value) {
    let (_, queues) = app.api(reqwest::Method::GET, "/v1/queues", None).await;
    let q = &queues["queues"][0];
    (q["rate"].clone(), q["max_in_flight"].clone())
}

/// Issue #9: Meta's throughput upgrade (announced by display number)
/// raises an account that sets no `rate` from 80 to 1,000 messages/s, and
/// its `max_in_flight` with it; the change still reaches `account` targets.
#[tokio::test]
async fn a_throughput_upgrade_raises_an_unset_rate_to_1000() {
    let app = spawn_with(Options {
        targets: vec![("ops", r#"["account"]"#)],
        ..Options::default()
    })
    .await;
    assert_eq!(rate_and_in_flight(&app).await, (json!(80), json!(64)));
    // No notification named the number yet: its display number is unknown.
    app.deliver(&throughput_upgrade("15550783881")).await;
    assert_eq!(rate_and_in_flight(&app).await, (json!(80), json!(64)));
    // A message for the number carries its display number; then the
    // upgrade finds it (and one for another number does not).
    app.say(ANA, "hi").await;
    app.deliver(&throughput_upgrade("15550000000")).await;
    assert_eq!(rate_and_in_flight(&app).await, (json!(80), json!(64)));
    app.deliver(&throughput_upgrade("15550783881")).await;
    assert_eq!(rate_and_in_flight(&app).await, (json!(1000), json!(500)));
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("wa_router_send_rate{account=\"main\"} 1000"),
        "{metrics}"
    );
    let events = app.wait_events("ops", "account.update", 3).await;
    assert!(
        events
            .iter()
            .all(|e| e.body["field"] == "phone_number_quality_update"),
        "{events:?}"
    );
}

/// A `rate` set in the file is the user's own limit: the upgrade leaves it.
#[tokio::test]
async fn a_throughput_upgrade_leaves_a_rate_set_in_the_file() {
    let app = spawn_with(Options {
        account_extra: "rate = 20\n".into(),
        ..Options::default()
    })
    .await;
    app.say(ANA, "hi").await;
    app.deliver(&throughput_upgrade("15550783881")).await;
    assert_eq!(rate_and_in_flight(&app).await, (json!(20), json!(64)));
}

/// Issue #10.4: a `stop` in the user's marketing preferences is an
/// opt-out of marketing templates only.
#[tokio::test]
async fn a_marketing_stop_refuses_marketing_templates_only() {
    let app = spawn_app(GREETING).await;
    app.deliver(&template_status("spring_sale", "APPROVED", "MARKETING"))
        .await;
    app.deliver(&template_status("receipt", "APPROVED", "UTILITY"))
        .await;
    let mut prefs = notification(vec![], vec![]);
    prefs["entry"][0]["changes"][0] = json!({ "field": "user_preferences", "value": {
        "messaging_product": "whatsapp",
        "metadata": { "display_phone_number": "15550783881", "phone_number_id": PNID },
        "user_preferences": [{ "wa_id": BOB, "category": "marketing_messages",
                               "value": "stop", "detail": "User requested to stop marketing messages",
                               "timestamp": now_s() }] } });
    app.deliver(&prefs).await;
    let (status, err) = app.send_template(BOB, "spring_sale").await;
    assert_eq!(status, 403, "{err}");
    assert_eq!(err["error"]["code"], "marketing_opted_out");
    let (status, sent) = app.send_template(BOB, "receipt").await;
    assert_eq!(status, 202, "{sent}");
    let (status, sent) = app.send_template(ANA, "spring_sale").await;
    assert_eq!(status, 202, "another contact: {sent}");
    // Resumed: marketing goes out again.
    prefs["entry"][0]["changes"][0]["value"]["user_preferences"][0]["value"] = json!("resume");
    app.deliver(&prefs).await;
    let (status, sent) = app.send_template(BOB, "spring_sale").await;
    assert_eq!(status, 202, "{sent}");
}
