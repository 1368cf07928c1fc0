//! The Graph API client: the only module that knows Graph URLs, bodies and
//! error shapes (CLOUD_API.md §7, §9). One shared reqwest client (rustls),
//! a timeout per request, tokens never logged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

use super::Content;
use crate::config::GraphHttp;
use crate::domain::Secret;
use crate::telemetry::Metrics;

/// A failed Graph request. Displayed without secrets or message content.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.describe())]
pub enum GraphError {
    /// Meta answered with an error status.
    Status {
        http: u16,
        code: Option<i64>,
        message: String,
        retry_after: Option<Duration>,
        transient_hint: bool,
    },
    /// No answer: connection refused, reset, timeout.
    Transport { message: String },
    /// A 2xx answer without a message id: the message may have been sent.
    BadAnswer { message: String },
}

impl GraphError {
    pub fn graph_code(&self) -> Option<i64> {
        match self {
            GraphError::Status { code, .. } => *code,
            _ => None,
        }
    }

    /// A short description without secrets or message content.
    pub fn describe(&self) -> String {
        match self {
            GraphError::Status {
                http,
                code,
                message,
                ..
            } => match code {
                Some(c) => format!("Graph API error {c} (HTTP {http}): {message}"),
                None => format!("Graph API answered HTTP {http}"),
            },
            GraphError::Transport { message } => format!("Graph API unreachable: {message}"),
            GraphError::BadAnswer { message } => format!("unexpected Graph API answer: {message}"),
        }
    }
}

/// The Graph API send body for `content` to `to` (CLOUD_API.md §7.1),
/// serialised straight from the record (nothing copied).
pub fn send_body<'a>(to: &'a str, content: &'a Content) -> SendBody<'a> {
    SendBody { to, content }
}

/// See [`send_body`].
pub struct SendBody<'a> {
    to: &'a str,
    content: &'a Content,
}

impl Serialize for SendBody<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let c = self.content;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("messaging_product", "whatsapp")?;
        map.serialize_entry("recipient_type", "individual")?;
        map.serialize_entry("type", &c.kind)?;
        // A contact known only by BSUID gets it as `recipient` (CLOUD_API.md §7).
        if crate::state::contacts::is_bsuid(self.to) {
            map.serialize_entry("recipient", self.to)?;
        } else {
            map.serialize_entry("to", self.to)?;
        }
        map.serialize_entry(c.kind.as_str(), &c.object)?;
        if let Some(id) = &c.context_id {
            map.serialize_entry("context", &json!({ "message_id": id }))?;
        }
        map.end()
    }
}

/// How long an idle connection to the Graph API stays pooled.
const POOL_IDLE: Duration = Duration::from_secs(30);

pub struct GraphClient {
    http: reqwest::Client,
    base: String,
    version: String,
    /// Each number's `…/messages` URL, parsed once: reqwest would parse a
    /// string URL again on every request (perf: 1.7 → 1.2 % of the
    /// router's samples).
    urls: dashmap::DashMap<String, reqwest::Url>,
    metrics: Arc<Metrics>,
}

impl GraphClient {
    pub fn new(
        base: &str,
        version: &str,
        http: GraphHttp,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        // One process-wide crypto provider for rustls (ring); a second
        // install attempt (tests build several apps) is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let builder = match http {
            // Not HTTP/2 even where Meta offers it: on one connection the
            // sends in flight would be capped by Meta's stream limit, not
            // by `max_in_flight` (README, `graph_http`).
            GraphHttp::Http1 => reqwest::Client::builder().http1_only(),
            // https: offered in TLS (HTTP/1.1 if the server declines);
            // plain http (a proxy, a mock) has no negotiation.
            GraphHttp::Http2 if base.starts_with("http://") => {
                reqwest::Client::builder().http2_prior_knowledge()
            }
            GraphHttp::Http2 => reqwest::Client::builder(),
        };
        let builder = match http {
            // reqwest retries only HTTP/2's refused streams; for HTTP/1.1
            // its retry layer would copy every request in case (perf: 0.3 %
            // of the router's samples). The sender retries what failed.
            GraphHttp::Http1 => {
                builder.retry(reqwest::retry::never().max_retries_per_request(0))
            }
            GraphHttp::Http2 => builder,
        };
        let http = builder
            // A send is a POST to one URL: a redirect answer is an error,
            // not a GET elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            // HTTP/1.1: a spike of sends opens up to `max_in_flight`
            // connections; each idle one keeps ~10 KB in the pool until it
            // is dropped, even after the peer closed it. 30 s outlasts the
            // default pace (10 s) between two sends.
            .pool_idle_timeout(POOL_IDLE)
            .user_agent(concat!("wa-router/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(GraphClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            version: version.to_string(),
            urls: dashmap::DashMap::new(),
            metrics,
        })
    }

    fn url(&self, phone_number_id: &str) -> String {
        format!(
            "{}/{}/{}/messages",
            self.base, self.version, phone_number_id
        )
    }

    /// A POST to the number's `…/messages`; an unparsable URL is left to
    /// reqwest, which reports it when the request is sent.
    fn request(&self, phone_number_id: &str) -> reqwest::RequestBuilder {
        if let Some(url) = self.urls.get(phone_number_id) {
            return self.http.post(url.clone());
        }
        let url = self.url(phone_number_id);
        match reqwest::Url::parse(&url) {
            Ok(parsed) => {
                self.urls
                    .insert(phone_number_id.to_string(), parsed.clone());
                self.http.post(parsed)
            }
            Err(_) => self.http.post(url),
        }
    }

    /// POST `body`; a 2xx answer's body, or the error Meta named.
    async fn post(
        &self,
        phone_number_id: &str,
        token: &Secret,
        body: &impl Serialize,
    ) -> Result<impl AsRef<[u8]>, GraphError> {
        let started = Instant::now();
        let result = self
            .request(phone_number_id)
            .bearer_auth(token.expose())
            .json(body)
            .send()
            .await;
        let outcome = match result {
            Err(e) => Err(GraphError::Transport {
                message: transport_message(e),
            }),
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                match resp.bytes().await {
                    Err(e) => Err(GraphError::Transport {
                        message: transport_message(e),
                    }),
                    Ok(bytes) if (200..300).contains(&status) => Ok(bytes),
                    Ok(bytes) => Err(status_error(status, retry_after, &bytes)),
                }
            }
        };
        self.metrics.graph_request(started.elapsed().as_secs_f64());
        outcome
    }

    /// Send a message; returns Meta's wamid.
    pub async fn send(
        &self,
        phone_number_id: &str,
        token: &Secret,
        body: &impl Serialize,
    ) -> Result<String, GraphError> {
        let answer = self.post(phone_number_id, token, body).await?;
        // Only `messages[0].id` is read: no tree of the whole answer is built.
        serde_json::from_slice::<SendAnswer>(answer.as_ref())
            .ok()
            .and_then(|a| a.messages.into_iter().next())
            .map(|m| m.id)
            .ok_or_else(|| GraphError::BadAnswer {
                message: "no messages[0].id in the answer".into(),
            })
    }

    /// Mark an inbound message read, `typing`: and show the contact a
    /// typing indicator (until the next message, or about 25 s) (CLOUD_API.md §7.5).
    pub async fn mark_read(
        &self,
        phone_number_id: &str,
        token: &Secret,
        wamid: &str,
        typing: bool,
    ) -> Result<(), GraphError> {
        let mut body =
            json!({ "messaging_product": "whatsapp", "status": "read", "message_id": wamid });
        if typing {
            body["typing_indicator"] = json!({ "type": "text" });
        }
        self.post(phone_number_id, token, &body).await.map(|_| ())
    }
}

/// The part of a send's answer the router reads (CLOUD_API.md §7.1).
#[derive(serde::Deserialize)]
struct SendAnswer {
    messages: Vec<SentMessage>,
}

#[derive(serde::Deserialize)]
struct SentMessage {
    id: String,
}

/// A non-2xx answer as a [`GraphError`] (CLOUD_API.md §9).
fn status_error(http: u16, retry_after: Option<Duration>, body: &[u8]) -> GraphError {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let err = value.get("error");
    GraphError::Status {
        http,
        code: err.and_then(|e| e.get("code")).and_then(Value::as_i64),
        message: err
            .and_then(|e| e.get("message"))
            .and_then(Value::as_str)
            .unwrap_or("no error message")
            .chars()
            .take(300)
            .collect(),
        retry_after,
        transient_hint: err
            .and_then(|e| e.get("is_transient"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
    }
}

fn transport_message(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else {
        // Without the URL: it holds nothing secret, but keep logs short.
        e.without_url().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageType;

    #[test]
    fn the_send_body_names_the_recipient_the_content_and_the_quote() {
        let content = Content {
            kind: MessageType::Interactive,
            object: json!({ "type": "button", "body": { "text": "Hi" } }).into(),
            context_id: Some("wamid.IN".into()),
        };
        assert_eq!(
            json!(send_body("16315551181", &content)),
            json!({
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "type": "interactive",
                "to": "16315551181",
                "interactive": { "type": "button", "body": { "text": "Hi" } },
                "context": { "message_id": "wamid.IN" },
            })
        );
        let content = Content {
            kind: MessageType::Text,
            object: json!({ "body": "x" }).into(),
            context_id: None,
        };
        assert_eq!(
            json!(send_body("US.20394857102938475610", &content)),
            json!({
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "type": "text",
                "recipient": "US.20394857102938475610",
                "text": { "body": "x" },
            })
        );
    }
}
