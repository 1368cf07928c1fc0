//! SPEC §4–§5: rules, state, consent, handoff, reload.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn hi_sends_interactive_buttons_to_the_graph_api() {
    let app = spawn_app(GREETING).await;
    app.say(ANA, "  HI ").await;
    let reqs = wait_for(10, "the greeting", || async {
        let r = app.graph.received_requests().await.unwrap_or_default();
        (!r.is_empty()).then_some(r)
    })
    .await;
    let req = &reqs[0];
    assert_eq!(req.url.path(), format!("/v25.0/{PNID}/messages"));
    assert_eq!(
        req.headers.get("authorization").unwrap().to_str().unwrap(),
        format!("Bearer {TOKEN}")
    );
    let body: Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(body["messaging_product"], "whatsapp");
    assert_eq!(body["to"], ANA);
    assert_eq!(body["type"], "interactive");
    assert_eq!(body["interactive"]["type"], "button");
    assert_eq!(
        body["interactive"]["body"]["text"],
        "Hi Ana! How can we help?"
    );
    assert_eq!(
        body["interactive"]["action"]["buttons"],
        json!([{ "type": "reply", "reply": { "id": "sales", "title": "Talk to sales" } }, { "type": "reply", "reply": { "id": "support", "title": "Support" } }])
    );
}

const CHOICES: &str = r#"
[[rule]]
name = "sales"
when = { button = "sales" }
send = [ { type = "text", body = "Sales here" } ]

[[rule]]
name = "plans"
when = { list = "plan_*" }
send = [ { type = "text", body = "Plan {{ reply.id }}: {{ reply.title }}" } ]

[[rule]]
name = "other rows"
when = { type = "list" }
send = [ { type = "text", body = "Other row {{ reply.id }}" } ]
"#;

#[tokio::test]
async fn button_and_list_answers_route_by_id_and_prefix() {
    let app = spawn_app(CHOICES).await;
    app.inbound(button(ANA, "sales", "Talk to sales")).await;
    app.wait_texts(ANA, 1).await;
    let quick_reply = message(
        ANA,
        "button",
        json!({ "payload": "sales", "text": "Talk to sales" }),
    );
    app.inbound(quick_reply).await;
    app.wait_texts(ANA, 2).await;
    app.inbound(list_reply(ANA, "plan_pro", "Pro")).await;
    app.wait_texts(ANA, 3).await;
    app.inbound(list_reply(ANA, "addon_backup", "Backup")).await;
    let texts = app.wait_texts(ANA, 4).await;
    assert_eq!(
        texts,
        vec![
            "Sales here",
            "Sales here",
            "Plan plan_pro: Pro",
            "Other row addon_backup"
        ]
    );
}

#[tokio::test]
async fn regex_groups_render_and_quote_replies_to_the_inbound_message() {
    let app = spawn_app(
        r#"
[[rule]]
name = "order status"
when = { regex = '(?i)^order\s+(?P<order>\d+)$' }
send = [ { type = "text", body = "Looking up order {{ match.order }}", quote = true } ]
"#,
    )
    .await;
    let wamid = app.say(ANA, "Order 12345").await;
    wait_for(10, "the reply", || async {
        (!app.sends().await.is_empty()).then_some(())
    })
    .await;
    let body = &app.sends().await[0];
    assert_eq!(body["text"]["body"], "Looking up order 12345");
    assert_eq!(body["context"]["message_id"], wamid.as_str());
}

#[tokio::test]
async fn state_and_vars_drive_a_multi_step_flow() {
    let app = spawn_app(
        r#"
[[rule]]
name = "start"
when = { text = "book" }
set_state = "party"
send = [ { type = "text", body = "How many? (state {{ state }})" } ]

[[rule]]
name = "party"
when = { state = "party", regex = '^(?P<n>\d+)$' }
set_state = ""
set = { party = "{{ match.n }}" }
send = [ { type = "text", body = "Table for {{ vars.party }} booked, {{ contact.name }}." } ]

[[rule]]
name = "stray"
when = { state = "" }
send = [ { type = "text", body = "Say book" } ]
"#,
    )
    .await;
    app.say(ANA, "4").await;
    app.wait_texts(ANA, 1).await;
    app.say(ANA, "book").await;
    app.wait_texts(ANA, 2).await;
    let conv = app.conversation(ANA).await.unwrap();
    assert_eq!(conv["state"], "party");
    app.say(ANA, "4").await;
    let texts = app.wait_texts(ANA, 3).await;
    assert_eq!(
        texts,
        vec![
            "Say book",
            "How many? (state party)",
            "Table for 4 booked, Ana."
        ]
    );
    let conv = app.conversation(ANA).await.unwrap();
    assert_eq!(conv["state"], "");
    assert_eq!(conv["vars"]["party"], "4");
}

#[tokio::test]
async fn stop_opts_out_with_a_reply_and_start_opts_back_in() {
    let app = spawn_app(&format!("[consent]\nopt_out_reply = \"Bye {{{{ contact.name }}}}\"\nopt_in_reply = \"Welcome back\"\n{GREETING}")).await;
    app.say(ANA, "hi").await;
    app.wait_texts(ANA, 1).await;
    app.say(ANA, "  STOP ").await;
    app.wait_texts(ANA, 2).await;
    let conv = app.conversation(ANA).await.unwrap();
    assert_eq!(conv["opted_out"], true);
    let (status, err) = app.send_text(ANA, "promo").await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (403, Some("opted_out"))
    );
    let (status, _) = app.send_template(ANA, "hello_world").await;
    assert_eq!(status, 403);
    app.say(ANA, "hi").await; // rules run, but their sends are refused and recorded
    app.say(ANA, "Start").await;
    let texts = app.wait_texts(ANA, 3).await;
    assert_eq!(
        texts,
        vec!["Hi Ana! How can we help?", "Bye Ana", "Welcome back"]
    );
    assert_eq!(app.conversation(ANA).await.unwrap()["opted_out"], false);
    let (status, _) = app.send_template(ANA, "hello_world").await;
    assert_eq!(status, 202);
    let (_, messages) = app
        .api(
            reqwest::Method::GET,
            &format!("/v1/conversations/main/{ANA}/messages"),
            None,
        )
        .await;
    let refused: Vec<&Value> = messages["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["status"] == "failed")
        .collect();
    assert_eq!(
        refused.len(),
        1,
        "the greeting while opted out is a failed record: {messages}"
    );
}

#[tokio::test]
async fn handoff_stops_the_rules_until_it_ends() {
    let app = spawn_with(Options {
        routes: r#"
[[rule]]
name = "human"
when = { text = "agent" }
handoff = true
send = [ { type = "text", body = "A person will answer" } ]

[[rule]]
name = "fallback"
send = [ { type = "text", body = "bot: {{ message.text }}" } ]
"#
        .into(),
        extra: "[conversations]\nhandoff_ttl = \"1s\"\n".into(),
        ..Options::default()
    })
    .await;
    app.say(ANA, "agent").await;
    app.wait_texts(ANA, 1).await;
    let conv = app.conversation(ANA).await.unwrap();
    assert_eq!(conv["handoff"]["active"], true);
    app.say(ANA, "are you there?").await;
    app.flush().await;
    assert_eq!(app.texts_to(ANA).await, vec!["A person will answer"]);
    // After handoff_ttl the bot answers again.
    wait_for(5, "the handoff to end", || async {
        (app.conversation(ANA).await.unwrap()["handoff"]["active"] == false).then_some(())
    })
    .await;
    app.say(ANA, "back").await;
    let texts = app.wait_texts(ANA, 2).await;
    assert_eq!(texts[1], "bot: back");
}

#[tokio::test]
async fn reply_to_tag_routes_answers_to_tagged_messages() {
    let app = spawn_app(
        r#"
[[rule]]
name = "nps"
when = { reply_to_tag = "nps" }
send = [ { type = "text", body = "Thanks for rating us {{ message.text }}" } ]

[[rule]]
name = "fallback"
send = [ { type = "text", body = "fallback" } ]
"#,
    )
    .await;
    let (status, sent) = app
        .send(json!({ "to": format!("+{ANA}"), "type": "template", "template": { "name": "nps_survey", "language": { "code": "en" } }, "tags": ["NPS"] }))
        .await;
    assert_eq!(status, 202);
    let wamid = app.wait_status(sent["id"].as_str().unwrap(), "sent").await["wamid"]
        .as_str()
        .unwrap()
        .to_string();
    let mut answer = text(ANA, "9");
    answer["context"] = json!({ "from": "15550783881", "id": wamid });
    app.inbound(answer).await;
    app.say(ANA, "9").await;
    let texts = app.wait_texts(ANA, 3).await;
    assert_eq!(
        texts[1..],
        ["Thanks for rating us 9".to_string(), "fallback".to_string()]
    );
}

#[tokio::test]
async fn a_changed_rule_file_is_reloaded_and_a_broken_one_keeps_the_old_rules() {
    let app = spawn_app(GREETING).await;
    let health = |app: &TestApp| {
        let url = app.url("/healthz");
        let http = app.http.clone();
        async move {
            http.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    assert_eq!(health(&app).await["routes"]["rules"], 1);
    std::fs::write(&app.routes_path, format!("{GREETING}\n[[rule]]\nname = \"fallback\"\nsend = [ {{ type = \"text\", body = \"v2\" }} ]\n")).unwrap();
    wait_for(10, "the reload", || async {
        (health(&app).await["routes"]["rules"] == 2).then_some(())
    })
    .await;
    app.say(ANA, "anything").await;
    assert_eq!(app.wait_texts(ANA, 1).await, vec!["v2"]);

    std::fs::write(
        &app.routes_path,
        "[[rule]]\nname = \"broken\"\nwhen = { regex = '(' }\n",
    )
    .unwrap();
    let h = wait_for(10, "the reload error", || async {
        let h = health(&app).await;
        (!h["routes"]["last_error"].is_null()).then_some(h)
    })
    .await;
    assert_eq!(h["routes"]["rules"], 2);
    let error = h["routes"]["last_error"].as_str().unwrap();
    assert!(
        error.contains("routes.toml:3:") && error.contains("broken"),
        "{error}"
    );
    app.say(ANA, "still there?").await;
    assert_eq!(app.wait_texts(ANA, 2).await[1], "v2");
    tokio::time::sleep(Duration::from_millis(0)).await;
}

#[tokio::test]
async fn a_rule_send_to_a_closed_window_is_recorded_failed_without_calling_meta() {
    let app = spawn_app(
        r#"
[[rule]]
name = "react"
when = { type = "reaction" }
send = [ { type = "text", body = "thanks for the reaction" } ]
"#,
    )
    .await;
    // Reactions do not open a window (CLOUD_API.md §11): the reply is refused.
    app.inbound(message(
        ANA,
        "reaction",
        json!({ "message_id": "wamid.x", "emoji": "👍" }),
    ))
    .await;
    let messages = wait_for(10, "the refused record", || async {
        let (_, m) = app
            .api(
                reqwest::Method::GET,
                &format!("/v1/conversations/main/{ANA}/messages"),
                None,
            )
            .await;
        m["messages"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["direction"] == "out").cloned())
    })
    .await;
    assert_eq!(messages["status"], "failed");
    let record = app.record(messages["id"].as_str().unwrap()).await;
    assert_eq!(record["error"]["code"], "window_closed");
    assert_eq!(record["source"], "rule:react");
    app.flush().await;
    assert!(app.texts_to(ANA).await.is_empty());
}
