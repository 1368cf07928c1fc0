//! API keys (SPEC §7): `X-API-Key: KEY` or `Authorization: Bearer KEY`,
//! compared in constant time on every `/v1` route.

use futures_util::future::{LocalBoxFuture, ready};

use actix_web::{FromRequest, HttpRequest, dev::Payload, web};

use crate::api::Ctx;
use crate::error::{ApiError, ErrorCode};

/// Proof that the request carried a configured API key; holds the key's
/// index in `[api] keys` (for per-key rate limits).
#[derive(Debug, Clone, Copy)]
pub struct ApiKey(pub usize);

/// The key a request presents (`X-API-Key` or `Authorization: Bearer`).
pub fn presented(req: &HttpRequest) -> Option<&str> {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    crate::crypto::presented_key(header("x-api-key"), header("authorization"))
}

impl FromRequest for ApiKey {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let checked = check(req);
        let checked = match (&checked, req.app_data::<web::Data<Ctx>>()) {
            // Cluster: the limit is shared (checked on Redis below).
            (Ok(_), Some(ctx)) if ctx.cluster.is_some() => checked,
            (Ok(ApiKey(index)), Some(ctx)) => local_limit(ctx, *index).map(|()| ApiKey(*index)),
            _ => checked,
        };
        let ctx = req.app_data::<web::Data<Ctx>>();
        let cluster = ctx.and_then(|c| c.cluster.clone());
        match (checked, cluster) {
            // Cluster: what any router acknowledged or did before this
            // request is seen.
            (Ok(key), Some(cluster)) => {
                let presented_key = presented(req).unwrap_or_default().to_string();
                let (rate, burst) = ctx.map_or((1, 1), |c| c.rate_burst);
                let numbers: Vec<String> = ctx
                    .map(|c| c.state.accounts())
                    .unwrap_or_default()
                    .iter()
                    .map(|a| a.settings.phone_number_id.clone())
                    .collect();
                Box::pin(async move {
                    if let Some(wait) = cluster.rate_limit(&presented_key, rate, burst).await? {
                        return Err(rate_limited(wait));
                    }
                    cluster.catch_up(&numbers).await?;
                    Ok(key)
                })
            }
            (checked, _) => Box::pin(ready(checked)),
        }
    }
}

/// The key check.
fn check(req: &HttpRequest) -> Result<ApiKey, ApiError> {
    let unauthorized = || {
        ApiError::new(
            ErrorCode::Unauthorized,
            "missing or wrong API key: send X-API-Key or Authorization: Bearer",
        )
    };
    let Some(ctx) = req.app_data::<web::Data<Ctx>>() else {
        return Err(ApiError::new(ErrorCode::Internal, "server state missing"));
    };
    let Some(key) = presented(req) else {
        return Err(unauthorized());
    };
    let mut found = None;
    for (i, (k, _)) in ctx.keys.iter().enumerate() {
        if crate::crypto::constant_time_eq(key.as_bytes(), k.expose().as_bytes()) && found.is_none()
        {
            found = Some(i);
        }
    }
    let Some(index) = found else {
        return Err(unauthorized());
    };
    Ok(ApiKey(index))
}

/// Per-key rate limit (SPEC §7): beyond rate/burst → 429 + Retry-After.
fn local_limit(ctx: &Ctx, index: usize) -> Result<(), ApiError> {
    if let Some((_, limiter)) = ctx.keys.get(index)
        && let Err(not_until) = limiter.check()
    {
        use governor::clock::{Clock, DefaultClock};
        return Err(rate_limited(
            not_until.wait_time_from(DefaultClock::default().now()),
        ));
    }
    Ok(())
}

fn rate_limited(wait: std::time::Duration) -> ApiError {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    ApiError::new(
        ErrorCode::RateLimited,
        "rate limit of this API key exceeded; retry after Retry-After seconds",
    )
    .with_retry_after(std::time::Duration::from_secs(secs.max(1)))
}
