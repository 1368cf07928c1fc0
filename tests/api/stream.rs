//! Issue #11: `GET /v1/stream`, the live events the console shows.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

/// An open stream and what it sent so far.
pub(crate) struct Stream {
    resp: reqwest::Response,
    buffered: String,
}

impl Stream {
    pub(crate) async fn open(app: &TestApp) -> Stream {
        let resp = app
            .http
            .get(app.url("/v1/stream"))
            .header("X-API-Key", API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let mut s = Stream {
            resp,
            buffered: String::new(),
        };
        s.next_where(|e, _| e == "ready").await;
        s
    }

    /// The next event whose name and JSON body satisfy `want`, skipping others.
    pub(crate) async fn next_where(
        &mut self,
        want: impl Fn(&str, &Value) -> bool,
    ) -> (String, Value) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            while let Some(end) = self.buffered.find("\n\n") {
                let frame: String = self.buffered.drain(..end + 2).collect();
                let field = |name: &str| {
                    frame
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(str::to_string)
                };
                let (Some(event), Some(data)) = (field("event: "), field("data: ")) else {
                    continue;
                };
                let body: Value = serde_json::from_str(&data).expect("data is JSON");
                if want(&event, &body) {
                    return (event, body);
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .expect("an event within 10 s")
                .unwrap()
                .expect("the stream stays open");
            self.buffered.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

#[tokio::test]
async fn the_stream_needs_the_api_key() {
    let app = spawn_app(GREETING).await;
    for key in [None, Some("wrong-key")] {
        let mut req = app.http.get(app.url("/v1/stream"));
        if let Some(k) = key {
            req = req.header("X-API-Key", k);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401);
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "unauthorized");
    }
}

#[tokio::test]
async fn every_inbound_message_and_status_arrives_in_order() {
    let app = spawn_app(GREETING).await;
    let mut stream = Stream::open(&app).await;
    // No rule forwards these: the stream still shows them, in order.
    for text in ["one", "two", "three"] {
        app.say(ANA, text).await;
    }
    for want in ["one", "two", "three"] {
        let (_, e) = stream.next_where(|ev, _| ev == "message.received").await;
        assert_eq!(e["message"]["text"], want, "{e}");
        assert_eq!(e["contact"]["wa_id"], ANA);
        assert_eq!(e["conversation"]["wa_id"], ANA);
    }
    let (status, sent) = app
        .send(json!({ "to": ANA, "type": "text", "text": "an answer" }))
        .await;
    assert_eq!(status, 202, "{sent}");
    let (_, e) = stream
        .next_where(|ev, b| ev == "message.status" && b["message_id"] == sent["id"])
        .await;
    assert_eq!(e["status"], "sent");
}
