//! EDGE: operations endpoints (SPEC §10): `/healthz`, `/readyz`, `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use crate::body::BodyLimits;
use crate::domain::{Secret, now_ms, rfc3339};
use crate::error::{ApiError, ErrorCode};
use crate::events::Events;
use crate::outbound::Outbox;
use crate::rules::Rules;
use crate::state::State;
use crate::telemetry::Metrics;

/// What the operations endpoints use.
pub struct Ctx {
    /// `[ops] key`.
    pub key: Option<Secret>,
    pub sandbox: bool,
    /// Set by the app once state is loaded and the listener serves.
    pub ready: AtomicBool,
    pub state: Arc<State>,
    pub outbox: Arc<Outbox>,
    pub rules: Arc<Rules>,
    pub metrics: Arc<Metrics>,
    pub events: Arc<Events>,
    pub bodies: Arc<BodyLimits>,
    /// `[cluster]`: not ready while Redis does not answer.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// With `[ops] key` set, `/metrics` and `/healthz` (which name accounts,
/// rules, targets and files) need it.
fn ops_authorized(req: &HttpRequest, ctx: &Ctx) -> Result<(), ApiError> {
    let Some(key) = &ctx.key else {
        return Ok(());
    };
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let given = crate::crypto::presented_key(header("x-api-key"), header("authorization"))
        .unwrap_or_default();
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
pub async fn healthz(req: HttpRequest, ctx: web::Data<Ctx>) -> Result<HttpResponse, ApiError> {
    ops_authorized(&req, &ctx)?;
    let status = ctx.rules.status();
    let mut body = json!({
        "status": "ok",
        "routes": {
            "rules": status.rules,
            "loaded_at": rfc3339(status.loaded_at),
            "last_error": status.last_error,
            "file": ctx.rules.path().display().to_string(),
        },
        "mode": if ctx.sandbox { "sandbox" } else { "live" },
        "accounts": ctx.state.accounts().len(),
    });
    if let Some(c) = &ctx.cluster {
        body["cluster"] = json!({
            "node": c.node,
            "redis": if c.is_up() { "up" } else { "down" },
            "leases": c.leases(),
        });
    }
    Ok(HttpResponse::Ok().json(body))
}

/// `GET /readyz`: 200 once state is loaded.
pub async fn readyz(ctx: web::Data<Ctx>) -> Result<HttpResponse, ApiError> {
    if ctx.state.storage_failed() {
        return Err(ApiError::new(
            ErrorCode::StorageUnavailable,
            "storage failed: the router cannot record changes",
        ));
    }
    if ctx.cluster.as_ref().is_some_and(|c| !c.is_up()) {
        return Err(ApiError::new(
            ErrorCode::StorageUnavailable,
            "redis does not answer: the router cannot record changes",
        ));
    }
    if ctx.ready.load(Ordering::Acquire) {
        Ok(HttpResponse::Ok().json(json!({ "status": "ready" })))
    } else {
        Err(ApiError::new(ErrorCode::NotReady, "state is still loading"))
    }
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(req: HttpRequest, ctx: web::Data<Ctx>) -> Result<HttpResponse, ApiError> {
    ops_authorized(&req, &ctx)?;
    let queues = ctx
        .state
        .accounts()
        .iter()
        .map(|a| {
            let s = ctx.outbox.queue(a).stats();
            crate::telemetry::QueueGauges {
                account: a.name().to_string(),
                queued: s.depth,
                scheduled: s.scheduled,
                in_flight: s.in_flight,
                rate: a.rate(),
            }
        })
        .collect();
    let body = ctx.metrics.render(&crate::telemetry::ScrapeGauges {
        open_windows: ctx.state.open_windows(now_ms()),
        queues,
        backlog: ctx.events.backlog(),
        body_buffered: ctx.bodies.buffered(),
        records_in_memory: ctx.outbox.record_count(),
        archive_backlog: ctx.state.archive().backlog(),
        journal_bytes: ctx
            .state
            .journal()
            .and_then(|j| j.dir())
            .map(crate::journal::disk_bytes),
        archive_bytes: ctx.state.archive().disk_bytes(),
        journal_syncs: ctx.state.journal().map_or(0, |j| j.syncs()),
    });
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body))
}
