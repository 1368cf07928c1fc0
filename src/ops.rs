//! EDGE: operations endpoints (SPEC §10): `/healthz`, `/readyz`, `/metrics`.

use std::sync::atomic::Ordering;

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use crate::app::Shared;
use crate::domain::{now_ms, rfc3339};
use crate::error::{ApiError, ErrorCode};

/// With `[ops] key` set, `/metrics` and `/healthz` (which name accounts,
/// rules, targets and files) need it.
fn ops_authorized(req: &HttpRequest, shared: &Shared) -> Result<(), ApiError> {
    let Some(key) = &shared.settings.ops_key else {
        return Ok(());
    };
    let given = crate::api::auth::presented(req).unwrap_or_default();
    if crate::crypto::constant_time_eq(given.as_bytes(), key.expose().as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::Unauthorized,
            "missing or wrong [ops] key: send X-API-Key or Authorization: Bearer",
        ))
    }
}

/// `GET /healthz`: liveness, rule file state and mode.
pub async fn healthz(
    req: HttpRequest,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    ops_authorized(&req, &shared)?;
    let status = shared.rules.status();
    Ok(HttpResponse::Ok().json(json!({
        "status": "ok",
        "routes": {
            "rules": status.rules,
            "loaded_at": rfc3339(status.loaded_at),
            "last_error": status.last_error,
            "file": shared.rules.path().display().to_string(),
        },
        "mode": if shared.settings.sandbox { "sandbox" } else { "live" },
        "accounts": shared.state.accounts().len(),
    })))
}

/// `GET /readyz`: 200 once state is loaded.
pub async fn readyz(shared: web::Data<Shared>) -> Result<HttpResponse, ApiError> {
    if shared.state.storage_failed() {
        return Err(ApiError::new(
            ErrorCode::StorageUnavailable,
            "storage failed: the router cannot record changes",
        ));
    }
    if shared.ready.load(Ordering::Acquire) {
        Ok(HttpResponse::Ok().json(json!({ "status": "ready" })))
    } else {
        Err(ApiError::new(ErrorCode::NotReady, "state is still loading"))
    }
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(
    req: HttpRequest,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    ops_authorized(&req, &shared)?;
    let queues: Vec<(String, usize, usize)> = shared
        .state
        .accounts()
        .iter()
        .map(|a| {
            let s = shared.outbox.queue(a).stats();
            (a.name().to_string(), s.depth, s.scheduled)
        })
        .collect();
    let body = shared.metrics.render(&crate::telemetry::ScrapeGauges {
        open_windows: shared.state.open_windows(now_ms()),
        queues,
        backlog: shared.events.backlog(),
        body_buffered: shared.bodies.buffered(),
    });
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body))
}
