//! EDGE: the agent API (SPEC §7). Handlers extract, call one function and
//! map the result; sends go through `outbound::enqueue` like rule sends.

pub mod auth;
pub mod conversations;
pub mod dto;
pub mod messages;
pub mod openapi;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use actix_web::{HttpRequest, web};

use crate::body::BodyLimits;
use crate::domain::Secret;
use crate::error::{ApiError, ErrorCode};
use crate::outbound::Outbox;
use crate::state::State;

/// What the agent API uses.
pub struct Ctx {
    /// `[api] keys`, each with its own GCRA limiter (`[api] rate`/`burst`).
    pub keys: Vec<(Secret, governor::DefaultDirectRateLimiter)>,
    pub bodies: Arc<BodyLimits>,
    pub state: Arc<State>,
    pub outbox: Arc<Outbox>,
    /// `[sender] validity` of sends that name none.
    pub validity: Duration,
    /// `[conversations] handoff_ttl` of a handoff that names no `ttl`.
    pub handoff_ttl: Duration,
    /// The live stream's source (`GET /v1/stream`).
    pub events: Arc<crate::events::Events>,
    /// `[api] rate` and `burst` (the cluster's shared limit uses them).
    pub rate_burst: (u32, u32),
    /// `[cluster]`: each request first reads the cluster's log to its end.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Ctx {
    /// One limiter per key: `rate` a second, bursts of `burst`.
    pub fn limiters(
        keys: &[Secret],
        rate: u32,
        burst: u32,
    ) -> Vec<(Secret, governor::DefaultDirectRateLimiter)> {
        use std::num::NonZeroU32;
        let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        keys.iter()
            .map(|k| {
                let quota = governor::Quota::per_second(rate).allow_burst(burst);
                (k.clone(), governor::RateLimiter::direct(quota))
            })
            .collect()
    }
}

pub use crate::body::API_MAX_BODY as MAX_BODY;

/// Read a JSON request body of at most [`MAX_BODY`] bytes, under the
/// router's body deadline and budget ([`crate::body`]); `None` when empty.
pub async fn optional_json_body(
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<Option<serde_json::Value>, ApiError> {
    let Some(ctx) = req.app_data::<web::Data<Ctx>>() else {
        return Err(ApiError::new(ErrorCode::Internal, "server state missing"));
    };
    let body = ctx
        .bodies
        .read(req, payload, MAX_BODY)
        .await
        .map_err(|e| e.into_api_error("request body over 1 MB", ErrorCode::InvalidRequest))?;
    if body.bytes.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(&body.bytes)
        .map(Some)
        .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("malformed JSON: {e}")))
}

/// Like [`optional_json_body`], but a body is required.
pub async fn json_body(
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<serde_json::Value, ApiError> {
    optional_json_body(req, payload)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidRequest, "a JSON body is required"))
}

/// The query string as a map; repeated keys keep the last value.
pub fn query(req: &HttpRequest) -> Result<std::collections::HashMap<String, String>, ApiError> {
    web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
        .map(|q| q.into_inner())
        .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("bad query string: {e}")))
}

/// `limit` of a list request: default 50, 1 to 200.
pub fn limit(q: &std::collections::HashMap<String, String>) -> Result<usize, ApiError> {
    match q.get("limit") {
        None => Ok(50),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=200).contains(n))
            .ok_or_else(|| ApiError::invalid("limit", "limit is a number from 1 to 200")),
    }
}

/// Wait until the change just made is on disk (SPEC §9); 503 if it cannot be.
pub async fn durable(ctx: &Ctx) -> Result<(), ApiError> {
    if ctx.state.sync().await {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::StorageUnavailable,
            "the router cannot record changes now (storage failed); retry later",
        )
        .with_retry_after(std::time::Duration::from_secs(5)))
    }
}
