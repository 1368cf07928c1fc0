//! Security review as tests (issue #4): no secret in logs at any level,
//! errors never echo secrets, limits everywhere.

use std::process::{Command, Stdio};
use std::sync::atomic::AtomicUsize;

use serde_json::{Value, json};
use wiremock::matchers::{body_partial_json, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_wa-router");
const SECRETS: [&str; 5] = [
    "APPSECRET-do-not-log-7f3a",
    "EAAG-TOKEN-do-not-log-91bc",
    "APIKEY-do-not-log-55e1",
    "TARGETSECRET-do-not-log-0d2f",
    "VERIFYTOKEN-do-not-log-aa10",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_at_trace_level_or_the_answers() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let [app_secret, token, api_key, target_secret, verify_token] = SECRETS;
    let graph = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_partial_json(
            json!({ "template": { "name": "bad_token" } }),
        ))
        .respond_with(graph_error(401, 190))
        .with_priority(1)
        .mount(&graph)
        .await;
    Mock::given(method("POST"))
        .respond_with(GraphOk::new(AtomicUsize::new(0), Arrivals::default()))
        .mount(&graph)
        .await;
    let target = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&target)
        .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), "[[rule]]\nname = \"all\"\nforward = \"agents\"\nsend = [ { type = \"text\", body = \"hi\" } ]\n").unwrap();
    std::fs::write(
        dir.path().join("wa-router.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n[meta]\napp_secret = \"${{T_APP}}\"\nverify_token = \"{verify_token}\"\ngraph_url = \"{}\"\n\
             [[accounts]]\nname = \"main\"\nphone_number_id = \"{PNID}\"\naccess_token = \"${{T_TOKEN}}\"\npace = \"10ms\"\n\
             [api]\nkeys = [\"{api_key}\"]\n[targets.agents]\nurl = \"{}/e\"\nsecret = \"{target_secret}\"\n",
            graph.uri(),
            target.uri()
        ),
    )
    .unwrap();
    let log_path = dir.path().join("router.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "-c", "wa-router.toml"])
        .current_dir(dir.path())
        .env("RUST_LOG", "trace")
        .env("NO_COLOR", "1")
        .env("T_APP", app_secret)
        .env("T_TOKEN", token)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let port = port_from_log(&log_path).await;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    wait_for(20, "readyz", || async {
        (http.get(url("/readyz")).send().await.ok()?.status() == 200).then_some(())
    })
    .await;

    let mut answers = Vec::new();
    // Handshake right and wrong, webhook signed right and wrong.
    for token_try in [verify_token, "wrong"] {
        let r = http
            .get(url(&format!(
                "/webhook?hub.mode=subscribe&hub.verify_token={token_try}&hub.challenge=1"
            )))
            .send()
            .await
            .unwrap();
        answers.push(r.text().await.unwrap());
    }
    let body = serde_json::to_vec(&notification(vec![text(ANA, "hello")], vec![])).unwrap();
    for secret in [app_secret, "wrong"] {
        let r = http
            .post(url("/webhook"))
            .header("X-Hub-Signature-256", sign(&body, secret))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        answers.push(r.text().await.unwrap());
    }
    // API with the right key, a wrong key, a bearer token; a send Meta refuses with 190.
    for key in [api_key, "wrong-key"] {
        let r = http.post(url("/v1/messages")).header("X-API-Key", key).json(&json!({ "to": format!("+{ANA}"), "type": "template", "template": { "name": "bad_token", "language": { "code": "en" } } })).send().await.unwrap();
        answers.push(r.text().await.unwrap());
    }
    let r = http
        .get(url("/v1/queues"))
        .bearer_auth(api_key)
        .send()
        .await
        .unwrap();
    answers.push(r.text().await.unwrap());
    // Wait until the send was refused by Meta and the event delivery failed.
    wait_for(15, "the 190 failure and an event retry", || async {
        let m = http
            .get(url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (m.contains("wa_router_outbound_messages_total{status=\"failed\"}")
            && m.contains("result=\"retry\""))
        .then_some(())
    })
    .await;
    answers.push(
        http.get(url("/healthz"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    answers.push(
        http.get(url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().unwrap();

    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(logged.len() > 1000, "trace logging produced output");
    for secret in SECRETS {
        assert!(
            !logged.contains(secret),
            "secret {secret} appears in the log"
        );
        for a in &answers {
            assert!(
                !a.contains(secret),
                "secret {secret} echoed in an answer: {a}"
            );
        }
    }
    // The journal holds no secrets either (it stores messages, not settings).
    for entry in std::fs::read_dir(dir.path().join("data")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for secret in SECRETS {
            assert!(!text.contains(secret), "secret {secret} stored in data_dir");
        }
    }
}

#[tokio::test]
async fn the_api_refuses_unknown_accounts_everywhere() {
    let app = spawn_app(GREETING).await;
    for (method, path) in [
        (
            reqwest::Method::GET,
            format!("/v1/conversations/ghost/{ANA}"),
        ),
        (
            reqwest::Method::POST,
            format!("/v1/conversations/ghost/{ANA}/opt-out"),
        ),
        (
            reqwest::Method::POST,
            format!("/v1/conversations/ghost/{ANA}/handoff"),
        ),
        (
            reqwest::Method::GET,
            "/v1/messages?account=ghost".to_string(),
        ),
        (
            reqwest::Method::GET,
            "/v1/conversations?account=ghost".to_string(),
        ),
    ] {
        let (status, body) = app.api(method.clone(), &path, None).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("unknown_account")),
            "{method} {path}"
        );
    }
    let (status, body): (u16, Value) = app
        .send(json!({ "account": "ghost", "to": format!("+{ANA}"), "type": "text", "text": "x" }))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("unknown_account"))
    );
}
