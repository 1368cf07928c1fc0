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

/// hyper's pooled client over rustls (or plain TCP for an `http://` URL).
type Direct = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

/// How requests reach the Graph API.
enum Transport {
    /// HTTP/1.1 straight to the Graph API (the default). reqwest's own
    /// layers (redirects, retries, its URL type, a boxed body) were ~10 %
    /// of the router's CPU at 20,000 sends/s; on this client a reply took
    /// 5-15 % less CPU in the closed loop (BENCHMARKS.md).
    Direct {
        client: Box<Direct>,
        timeout: Duration,
    },
    /// reqwest: HTTP/2 (`graph_http = "2"`), or a proxy the environment
    /// names for the Graph URL (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`,
    /// `NO_PROXY`), which reqwest speaks and this module does not.
    Reqwest(reqwest::Client),
}

pub struct GraphClient {
    transport: Transport,
    base: String,
    version: String,
    /// Each number's `…/messages` URL, parsed once.
    uris: dashmap::DashMap<String, http::Uri>,
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
        let base = base.trim_end_matches('/').to_string();
        let proxied = base.parse::<http::Uri>().is_ok_and(|u| {
            hyper_util::client::proxy::matcher::Matcher::from_env()
                .intercept(&u)
                .is_some()
        });
        let transport = match http {
            // Not HTTP/2 even where Meta offers it: on one connection the
            // sends in flight would be capped by Meta's stream limit, not
            // by `max_in_flight` (README, `graph_http`).
            GraphHttp::Http1 if !proxied => Transport::Direct {
                client: Box::new(direct_client(timeout)?),
                timeout,
            },
            _ => Transport::Reqwest(reqwest_client(http, &base, timeout)?),
        };
        Ok(GraphClient {
            transport,
            base,
            version: version.to_string(),
            uris: dashmap::DashMap::new(),
            metrics,
        })
    }

    /// The number's `…/messages` URL.
    fn uri(&self, phone_number_id: &str) -> Result<http::Uri, GraphError> {
        if let Some(uri) = self.uris.get(phone_number_id) {
            return Ok(uri.clone());
        }
        let text = format!(
            "{}/{}/{}/messages",
            self.base, self.version, phone_number_id
        );
        let uri: http::Uri = text.parse().map_err(|e| GraphError::Transport {
            message: format!("invalid Graph URL: {e}"),
        })?;
        self.uris.insert(phone_number_id.to_string(), uri.clone());
        Ok(uri)
    }

    /// POST `body`; a 2xx answer's body, or the error Meta named.
    async fn post(
        &self,
        phone_number_id: &str,
        token: &Secret,
        body: &impl Serialize,
    ) -> Result<bytes::Bytes, GraphError> {
        let started = Instant::now();
        let uri = self.uri(phone_number_id)?;
        let json = serde_json::to_vec(body).map_err(|e| GraphError::BadAnswer {
            message: format!("cannot encode the request: {e}"),
        })?;
        let answer = match &self.transport {
            Transport::Direct { client, timeout } => {
                post_direct(client, *timeout, uri, token, json).await
            }
            Transport::Reqwest(client) => post_reqwest(client, uri, token, json).await,
        };
        self.metrics.graph_request(started.elapsed().as_secs_f64());
        let (status, retry_after, bytes) = answer?;
        if (200..300).contains(&status) {
            Ok(bytes)
        } else {
            Err(status_error(status, retry_after, &bytes))
        }
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
        serde_json::from_slice::<SendAnswer>(&answer)
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

/// An answer: HTTP status, `Retry-After` (seconds), body.
type Answer = (u16, Option<Duration>, bytes::Bytes);

/// How long a connection may take to open: the request's timeout, at
/// most 5 s (both transports).
fn connect_timeout(timeout: Duration) -> Duration {
    timeout.min(Duration::from_secs(5))
}

const USER_AGENT: &str = concat!("wa-router/", env!("CARGO_PKG_VERSION"));

fn direct_client(timeout: Duration) -> Result<Direct, String> {
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(connect_timeout(timeout)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        // The system's roots, as reqwest's rustls setup uses.
        .with_provider_and_platform_verifier(rustls::crypto::ring::default_provider())
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            // A spike of sends opens up to `max_in_flight` connections,
            // each with its buffers; the pool's timer drops those idle for
            // 30 s (which outlasts the default pace of 10 s between two
            // sends). Without it they stayed: +25-30 MB idle after the
            // benchmark's million messages.
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector),
    )
}

fn reqwest_client(
    http: GraphHttp,
    base: &str,
    timeout: Duration,
) -> Result<reqwest::Client, String> {
    let builder = match http {
        GraphHttp::Http1 => reqwest::Client::builder()
            .http1_only()
            // reqwest retries only HTTP/2's refused streams; for HTTP/1.1
            // its retry layer would copy every request in case.
            .retry(reqwest::retry::never().max_retries_per_request(0)),
        // https: offered in TLS (HTTP/1.1 if the server declines);
        // plain http (a proxy, a mock) has no negotiation.
        GraphHttp::Http2 if base.starts_with("http://") => {
            reqwest::Client::builder().http2_prior_knowledge()
        }
        GraphHttp::Http2 => reqwest::Client::builder(),
    };
    builder
        // A send is a POST to one URL: a redirect answer is an error, not
        // a GET elsewhere (as on the direct transport).
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(connect_timeout(timeout))
        .pool_idle_timeout(POOL_IDLE)
        .user_agent(USER_AGENT)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// `Authorization: Bearer …`, kept out of debug output.
fn bearer(token: &Secret) -> Result<http::HeaderValue, GraphError> {
    let mut value =
        http::HeaderValue::try_from(format!("Bearer {}", token.expose())).map_err(|_| {
            GraphError::Transport {
                message: "the access token is not a valid header value".into(),
            }
        })?;
    value.set_sensitive(true);
    Ok(value)
}

async fn post_direct(
    client: &Direct,
    timeout: Duration,
    uri: http::Uri,
    token: &Secret,
    json: Vec<u8>,
) -> Result<Answer, GraphError> {
    use http::header;
    use http_body_util::BodyExt;
    let mut req = http::Request::post(uri)
        .body(http_body_util::Full::new(bytes::Bytes::from(json)))
        .map_err(|e| GraphError::Transport {
            message: e.to_string(),
        })?;
    let headers = req.headers_mut();
    headers.insert(header::AUTHORIZATION, bearer(token)?);
    headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    );
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| GraphError::Transport {
                message: if e.is_connect() {
                    "connection failed".into()
                } else {
                    error_chain(&e)
                },
            })?;
        let status = resp.status().as_u16();
        let retry_after = retry_after(resp.headers());
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| GraphError::Transport {
                message: error_chain(&e),
            })?
            .to_bytes();
        Ok((status, retry_after, body))
    };
    // The whole exchange, answer's body included (as reqwest's timeout).
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(GraphError::Transport {
                message: "timed out".into(),
            })
        })
}

async fn post_reqwest(
    client: &reqwest::Client,
    uri: http::Uri,
    token: &Secret,
    json: Vec<u8>,
) -> Result<Answer, GraphError> {
    let transport = |e: reqwest::Error| GraphError::Transport {
        message: transport_message(e),
    };
    let resp = client
        .post(uri.to_string())
        .header(reqwest::header::AUTHORIZATION, bearer(token)?)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(json)
        .send()
        .await
        .map_err(transport)?;
    let status = resp.status().as_u16();
    let retry_after = retry_after(resp.headers());
    let body = resp.bytes().await.map_err(transport)?;
    Ok((status, retry_after, body))
}

fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// An error and its causes, one line (no URL in it: the direct client
/// does not name one).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
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
