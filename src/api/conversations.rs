//! Conversations and queues over the API (SPEC §7).

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::auth::ApiKey;
use crate::app::Shared;
use crate::domain::{format_duration, now_ms, parse_phone, rfc3339};
use crate::error::{ApiError, ErrorCode};
use crate::state::Account;

fn account(shared: &Shared, name: &str) -> Result<std::sync::Arc<Account>, ApiError> {
    shared.state.account_by_name(name).ok_or_else(|| {
        ApiError::new(
            ErrorCode::UnknownAccount,
            format!("no account named {name:?}"),
        )
    })
}

/// A contact in a path: a phone number (`+` and separators allowed) or a
/// business-scoped user id as Meta sent it.
fn contact(raw: &str) -> String {
    parse_phone(raw).unwrap_or_else(|| raw.to_string())
}

/// `GET /v1/conversations/{account}/{wa_id}`.
pub async fn get(
    _key: ApiKey,
    path: web::Path<(String, String)>,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let (name, wa_id) = path.into_inner();
    let account = account(&shared, &name)?;
    let wa_id = contact(&wa_id);
    let view = shared.state.conversation(&account, &wa_id).ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            format!("no conversation with {wa_id} on {name:?}"),
        )
    })?;
    Ok(HttpResponse::Ok().json(view.to_json(now_ms())))
}

/// `GET /v1/conversations/{account}/{wa_id}/messages`: the last 50, both ways.
pub async fn messages(
    _key: ApiKey,
    path: web::Path<(String, String)>,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let (name, wa_id) = path.into_inner();
    let account = account(&shared, &name)?;
    let wa_id = contact(&wa_id);
    if shared.state.conversation(&account, &wa_id).is_none() {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no conversation with {wa_id} on {name:?}"),
        ));
    }
    Ok(HttpResponse::Ok()
        .json(json!({ "messages": shared.state.recent_messages(&account, &wa_id) })))
}

/// `GET /v1/queues`: per account, depth, scheduled, next send time, pace.
pub async fn queues(_key: ApiKey, shared: web::Data<Shared>) -> Result<HttpResponse, ApiError> {
    let now = now_ms();
    let queues: Vec<_> = shared
        .state
        .accounts()
        .iter()
        .map(|a| {
            let stats = a.queue.stats();
            let pace_ms = a.settings.pace.as_millis() as i64;
            let next_send = if stats.depth > 0 {
                Some(stats.last_send.map_or(now, |l| (l + pace_ms).max(now)))
            } else {
                stats.next_scheduled
            };
            json!({
                "account": a.name(),
                "depth": stats.depth,
                "scheduled": stats.scheduled,
                "next_send_at": next_send.map(rfc3339),
                "pace": format_duration(a.settings.pace),
                "pace_ms": pace_ms,
                "max_queue": a.settings.max_queue,
                "sandbox": a.is_sandbox(),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "queues": queues })))
}
