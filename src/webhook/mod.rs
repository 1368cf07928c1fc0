//! EDGE: Meta's webhook (SPEC §3). The signature is checked over the raw
//! bytes before anything is parsed; the body is read up to `max_body`.

pub mod ingest;
pub mod payload;

/// The header Meta signs notifications with (CLOUD_API.md §2).
pub const SIGNATURE_HEADER: &str = "X-Hub-Signature-256";

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};

use crate::body::BodyLimits;
use crate::config::MetaSettings;
use crate::error::{ApiError, ErrorCode};
use crate::outbound::Outbox;
use crate::routing::Lanes;
use crate::state::State;
use crate::telemetry::Metrics;

/// What the webhook edge uses.
pub struct Ctx {
    pub meta: MetaSettings,
    /// Sandbox mode: unknown numbers become accounts (SPEC §2).
    pub sandbox: bool,
    pub bodies: Arc<BodyLimits>,
    pub metrics: Arc<Metrics>,
    pub state: Arc<State>,
    pub outbox: Arc<Outbox>,
    pub lanes: Arc<Lanes>,
    /// Where `account.update` events go.
    pub events: Arc<crate::events::Events>,
    /// `[http] max_backlog`.
    pub max_backlog: usize,
    /// Where webhooks wait while the router is behind.
    pub gate: crate::domain::Gate,
    /// `[cluster]`: notifications go to Redis before the `200`, and the
    /// account's lease holder applies them.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// Longest a webhook waits for the router to catch up before it is taken
/// anyway (nothing is refused for being busy: Meta would only retry).
const BACKLOG_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Ctx {
    /// Work acknowledged or due and not done yet (see `[http] max_backlog`).
    fn backlog(&self) -> usize {
        self.lanes.pending() + self.outbox.due_backlog(crate::domain::now_ms())
    }

    /// Behind: more than `max_backlog` acknowledged or due and not done, or
    /// the archive more than [`crate::archive::MAX_BACKLOG_ROWS`] rows
    /// behind (finished work waits in memory until it is archived). Not a
    /// multiple of `max_backlog`: a small one (replies sooner under a
    /// spike) then made webhooks wait for each commit of the archive.
    fn behind(&self) -> bool {
        self.backlog() > self.max_backlog
            || self.state.archive().backlog() > crate::archive::MAX_BACKLOG_ROWS
    }

    /// Wait while the router runs more than `max_backlog` behind, so that
    /// acknowledging never outruns routing and sending: the answer to Meta
    /// slows down instead (up to [`BACKLOG_WAIT`]).
    async fn keep_up(&self) {
        if self.gate.wait_while(BACKLOG_WAIT, || self.behind()).await {
            self.metrics.webhook("backlog_wait");
        }
    }
}

/// `GET /webhook`: the subscription handshake.
pub async fn handshake(req: HttpRequest, ctx: web::Data<Ctx>) -> Result<HttpResponse, ApiError> {
    let query =
        web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
            .map_err(|_| ApiError::new(ErrorCode::Forbidden, "verification failed"))?;
    let mode_ok = query.get("hub.mode").map(String::as_str) == Some("subscribe");
    let token_ok = query.get("hub.verify_token").is_some_and(|t| {
        crate::crypto::constant_time_eq(t.as_bytes(), ctx.meta.verify_token.expose().as_bytes())
    });
    match (mode_ok && token_ok, query.get("hub.challenge")) {
        (true, Some(challenge)) => Ok(HttpResponse::Ok()
            .content_type("text/plain; charset=utf-8")
            .body(challenge.clone())),
        _ => {
            ctx.metrics.webhook("verify_rejected");
            Err(ApiError::new(
                ErrorCode::Forbidden,
                "verification failed: wrong hub.mode or hub.verify_token",
            ))
        }
    }
}

/// `POST /webhook`: verify, parse, accept, ack; a `200` is timed
/// (`wa_router_webhook_ack_duration_seconds`).
pub async fn receive(
    req: HttpRequest,
    payload: web::Payload,
    ctx: web::Data<Ctx>,
) -> Result<HttpResponse, ApiError> {
    let started = std::time::Instant::now();
    let answer = answer(req, payload, &ctx).await;
    if answer.is_ok() {
        ctx.metrics.webhook_ack(started.elapsed().as_secs_f64());
    }
    answer
}

async fn answer(
    req: HttpRequest,
    payload: web::Payload,
    ctx: &Ctx,
) -> Result<HttpResponse, ApiError> {
    let max = ctx.meta.max_body;
    // Unverified bytes: bounded in time and, across all requests, in size.
    let body = match ctx.bodies.read(&req, payload, max).await {
        Ok(body) => body,
        Err(e) => {
            ctx.metrics.webhook(e.label());
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
    if !crate::crypto::verify_any(body, signature, &ctx.meta.app_secrets) {
        ctx.metrics.webhook("bad_signature");
        return Err(ApiError::new(
            ErrorCode::InvalidSignature,
            "missing or invalid X-Hub-Signature-256",
        ));
    }
    let notification = payload::parse(body).map_err(|e| {
        ctx.metrics.webhook("invalid");
        ApiError::new(ErrorCode::InvalidNotification, e.to_string())
    })?;
    let malformed = notification.malformed;
    if let Some(cluster) = &ctx.cluster {
        return share(ctx, cluster, notification, body).await;
    }
    ctx.keep_up().await;
    ingest::rules_before_identity_changes(ctx, &notification).await;
    let accepted = ingest::accept(ctx, notification);
    // SPEC §9: a 200 means the effect is recorded; if it cannot be, Meta retries.
    if !ctx.state.sync().await {
        ctx.metrics.webhook("storage_failed");
        return Err(unavailable());
    }
    ctx.metrics.webhook("ok");
    if malformed > 0 {
        ctx.metrics.webhook("malformed_items");
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

fn unavailable() -> ApiError {
    ApiError::new(
        ErrorCode::StorageUnavailable,
        "the router cannot record this notification now; retry later",
    )
}

/// Cluster mode, before the `200`: each business number's messages and
/// statuses go to its inbound stream in Redis (message ids marked seen in
/// the same step); the lease holder of the account applies them
/// ([`accept_shared`]), and with them the account-level changes about the
/// number's contacts ([`payload::AccountChange::per_number`]), in order.
/// Other account-level changes are applied here.
async fn share(
    ctx: &Ctx,
    cluster: &crate::cluster::Cluster,
    mut notification: payload::Notification,
    body: &[u8],
) -> Result<HttpResponse, ApiError> {
    if !cluster.is_up() {
        ctx.metrics.webhook("storage_failed");
        return Err(unavailable());
    }
    let (per_number, here): (Vec<_>, Vec<_>) = std::mem::take(&mut notification.account_changes)
        .into_iter()
        .partition(|c| {
            c.per_number()
                && c.phone_number_id
                    .as_deref()
                    .is_some_and(|p| ctx.state.account_by_pnid(p).is_some())
        });
    if !here.is_empty() {
        let changes = payload::Notification {
            account_changes: here,
            ..Default::default()
        };
        ingest::accept(ctx, changes);
    }
    // One append per business number, whatever the number of entries.
    // (number, its message ids, whether to append without a new message:
    // statuses or contact changes to apply).
    let mut numbers: Vec<(&str, Vec<&str>, bool)> = Vec::new();
    for pnid in per_number
        .iter()
        .filter_map(|c| c.phone_number_id.as_deref())
    {
        if !numbers.iter().any(|(p, _, _)| *p == pnid) {
            numbers.push((pnid, Vec::new(), true));
        }
    }
    for batch in &notification.batches {
        if ingest::account_for(ctx, &batch.phone_number_id).is_none() {
            continue;
        }
        let wamids = batch.messages.iter().map(|m| m.wamid.as_str());
        match numbers
            .iter_mut()
            .find(|(p, _, _)| *p == batch.phone_number_id)
        {
            Some((_, w, statuses)) => {
                w.extend(wamids);
                *statuses |= !batch.statuses.is_empty();
            }
            None => numbers.push((
                &batch.phone_number_id,
                wamids.collect(),
                !batch.statuses.is_empty(),
            )),
        }
    }
    for (pnid, wamids, statuses) in &numbers {
        match cluster.inbound(pnid, wamids, body, *statuses).await {
            Ok(fresh) => {
                let duplicates = wamids.len() - fresh.min(wamids.len());
                for _ in 0..duplicates {
                    ctx.metrics.webhook("duplicate_message");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot hand a notification to the cluster");
                ctx.metrics.webhook("storage_failed");
                return Err(unavailable());
            }
        }
    }
    // Account changes and new sandbox accounts are in the log.
    if !ctx.state.sync().await {
        ctx.metrics.webhook("storage_failed");
        return Err(unavailable());
    }
    ctx.metrics.webhook("ok");
    Ok(HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body("ok"))
}

/// Cluster mode, on the lease holder of the account of `phone_number_id`:
/// apply that number's part of a notification read from its inbound stream
/// (verified by the router that answered it).
pub async fn accept_shared(ctx: &Ctx, phone_number_id: &str, body: &[u8]) {
    match payload::parse(body) {
        Ok(mut n) => {
            n.batches.retain(|b| b.phone_number_id == phone_number_id);
            n.account_changes.retain(|c| {
                c.per_number() && c.phone_number_id.as_deref() == Some(phone_number_id)
            });
            ingest::rules_before_identity_changes(ctx, &n).await;
            ingest::accept(ctx, n);
        }
        Err(e) => tracing::error!(error = %e, "an inbound stream entry is not a notification"),
    }
}
