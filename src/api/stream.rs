//! `GET /v1/stream`: the events the targets get, live, as Server-Sent
//! Events — every inbound message (`message.received`, also those no rule
//! forwarded), every status change (`message.status`) and account-level
//! change (`account.update`) — for the console and anything else that
//! wants to watch. Authenticated like the rest of the API (the key in a
//! header: browsers read it with `fetch`, not `EventSource`, so the key
//! never sits in a URL or an access log).

use std::time::Duration;

use actix_web::HttpResponse;
use actix_web::web::{self, Bytes};
use tokio::sync::broadcast::error::RecvError;

use super::Ctx;
use super::auth::ApiKey;

/// A comment line this often keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// `GET /v1/stream`.
#[utoipa::path(get, path = "/v1/stream", tag = "stream",
    responses((status = 200, description = "text/event-stream: `event: ready` first, then `message.received`, `message.status` and `account.update` events (`id:` is the event id, `data:` its JSON body, as the targets get it); `event: lagged` with `{\"missed\": N}` when the reader fell more than 4,096 events behind (reload what you show)", content_type = "text/event-stream"),
        (status = 401, description = "No or wrong API key", body = super::dto::ErrorEnvelope), (status = 429, description = "Rate limited; Retry-After set", body = super::dto::ErrorEnvelope)))]
pub async fn stream(_key: ApiKey, ctx: web::Data<Ctx>) -> HttpResponse {
    let rx = ctx.events.subscribe();
    let end = ctx.events.stream_end();
    let first = Bytes::from_static(b"event: ready\ndata: {}\n\n");
    let frames = futures_util::stream::unfold(
        (Some(first), rx, end),
        |(first, mut rx, mut end)| async move {
            if let Some(f) = first {
                return Some((Ok::<_, actix_web::Error>(f), (None, rx, end)));
            }
            if *end.borrow() {
                return None;
            }
            let next = tokio::select! {
                r = tokio::time::timeout(KEEP_ALIVE, rx.recv()) => r,
                _ = end.changed() => return None,
            };
            let frame = match next {
                Ok(Ok(frame)) => Bytes::from(frame.to_string()),
                Ok(Err(RecvError::Lagged(n))) => {
                    Bytes::from(format!("event: lagged\ndata: {{\"missed\":{n}}}\n\n"))
                }
                Ok(Err(RecvError::Closed)) => return None,
                Err(_) => Bytes::from_static(b": keep-alive\n\n"),
            };
            Some((Ok(frame), (None, rx, end)))
        },
    );
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(frames)
}
