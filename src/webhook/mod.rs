//! EDGE: Meta's webhook (SPEC §3). The signature is checked over the raw
//! bytes before anything is parsed; the body is read up to `max_body`.

pub mod ingest;
pub mod payload;

/// The header Meta signs notifications with (CLOUD_API.md §2).
pub const SIGNATURE_HEADER: &str = "X-Hub-Signature-256";

use actix_web::{HttpRequest, HttpResponse, web};

use crate::app::Shared;
use crate::error::{ApiError, ErrorCode};

/// `GET /webhook`: the subscription handshake.
pub async fn handshake(
    req: HttpRequest,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let query =
        web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
            .map_err(|_| ApiError::new(ErrorCode::Forbidden, "verification failed"))?;
    let mode_ok = query.get("hub.mode").map(String::as_str) == Some("subscribe");
    let token_ok = query.get("hub.verify_token").is_some_and(|t| {
        crate::crypto::constant_time_eq(
            t.as_bytes(),
            shared.settings.meta.verify_token.expose().as_bytes(),
        )
    });
    match (mode_ok && token_ok, query.get("hub.challenge")) {
        (true, Some(challenge)) => Ok(HttpResponse::Ok()
            .content_type("text/plain; charset=utf-8")
            .body(challenge.clone())),
        _ => {
            shared.metrics.webhook("verify_rejected");
            Err(ApiError::new(
                ErrorCode::Forbidden,
                "verification failed: wrong hub.mode or hub.verify_token",
            ))
        }
    }
}

/// `POST /webhook`: verify, parse, accept, ack.
pub async fn receive(
    req: HttpRequest,
    payload: web::Payload,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let max = shared.settings.meta.max_body;
    // Unverified bytes: bounded in time and, across all requests, in size.
    let body = match shared.bodies.read(&req, payload, max).await {
        Ok(body) => body,
        Err(e) => {
            shared.metrics.webhook(e.label());
            return Err(e.into_api_error(
                &format!("webhook body over max_body ({max} bytes)"),
                ErrorCode::InvalidNotification,
            ));
        }
    };
    let body = &body.bytes;
    let signature = req
        .headers()
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok());
    if !crate::crypto::verify_any(body, signature, &shared.settings.meta.app_secrets) {
        shared.metrics.webhook("bad_signature");
        return Err(ApiError::new(
            ErrorCode::InvalidSignature,
            "missing or invalid X-Hub-Signature-256",
        ));
    }
    let notification = payload::parse(body).map_err(|e| {
        shared.metrics.webhook("invalid");
        ApiError::new(ErrorCode::InvalidNotification, e.to_string())
    })?;
    let malformed = notification.malformed;
    let accepted = ingest::accept(&shared, notification);
    // SPEC §9: a 200 means the effect is recorded; if it cannot be, Meta retries.
    if !shared.state.sync().await {
        shared.metrics.webhook("storage_failed");
        return Err(ApiError::new(
            ErrorCode::StorageUnavailable,
            "the router cannot record this notification now; retry later",
        ));
    }
    shared.metrics.webhook("ok");
    if malformed > 0 {
        shared.metrics.webhook("malformed_items");
        tracing::warn!(
            malformed,
            "webhook items that could not be read were skipped"
        );
    }
    tracing::debug!(
        messages = accepted.messages,
        duplicates = accepted.duplicates,
        statuses = accepted.statuses,
        "webhook accepted"
    );
    Ok(HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body("ok"))
}
