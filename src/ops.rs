//! EDGE: operations endpoints (SPEC §10): `/healthz`, `/readyz`, `/metrics`.

use std::sync::atomic::Ordering;

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::app::Shared;
use crate::domain::{now_ms, rfc3339};
use crate::error::{ApiError, ErrorCode};

/// `GET /healthz`: liveness, rule file state and mode.
pub async fn healthz(shared: web::Data<Shared>) -> HttpResponse {
    let status = shared.rules.status();
    HttpResponse::Ok().json(json!({
        "status": "ok",
        "routes": {
            "rules": status.rules,
            "loaded_at": rfc3339(status.loaded_at),
            "last_error": status.last_error,
            "file": shared.rules.path().display().to_string(),
        },
        "mode": if shared.settings.sandbox { "sandbox" } else { "live" },
        "accounts": shared.state.accounts().len(),
    }))
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
pub async fn metrics(shared: web::Data<Shared>) -> HttpResponse {
    let queues: Vec<(String, usize, usize)> = shared
        .state
        .accounts()
        .iter()
        .map(|a| {
            let s = a.queue.stats();
            (a.name().to_string(), s.depth, s.scheduled)
        })
        .collect();
    let body = shared.metrics.render(&crate::telemetry::ScrapeGauges {
        open_windows: shared.state.open_windows(now_ms()),
        queues,
        backlog: shared.events.backlog(),
        body_buffered: shared.bodies.buffered(),
    });
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body)
}
