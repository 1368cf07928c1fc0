//! Conversations and queues over the API (SPEC §7).

use std::collections::BTreeMap;

use actix_web::{HttpRequest, HttpResponse, web};

use super::auth::ApiKey;
use super::dto::{
    ConversationListOut, ConversationOut, ErrorEnvelope, HandoffIn, QueueOut, QueuesOut,
    RecentListOut, RecentOut, StateIn,
};
use super::{json_body, limit, optional_json_body, query};
use crate::api::Ctx;
use crate::cluster::Command;
use crate::domain::{Millis, format_duration, now_ms, parse_duration, parse_phone, rfc3339};
use crate::error::{ApiError, ErrorCode};
use crate::outbound::Outbox;
use crate::state::{Account, ConversationView, State};

fn account(ctx: &Ctx, name: &str) -> Result<std::sync::Arc<Account>, ApiError> {
    ctx.state.account_by_name(name).ok_or_else(|| {
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
#[utoipa::path(get, path = "/v1/conversations/{account}/{wa_id}", tag = "conversations", params(("account" = String, Path, description = "Account name"), ("wa_id" = String, Path, description = "Contact number (digits, + optional) or BSUID")),
    responses((status = 200, description = "The conversation", body = ConversationOut), (status = 404, description = "unknown_account / not_found", body = ErrorEnvelope), (status = 401, description = "No or wrong API key", body = ErrorEnvelope), (status = 429, description = "Rate limited; Retry-After set", body = ErrorEnvelope)))]
pub async fn get(
    _key: ApiKey,
    path: web::Path<(String, String)>,
    ctx: web::Data<Ctx>,
) -> Result<HttpResponse, ApiError> {
    let (account, wa_id) = conversation_path(&ctx, path.into_inner())?;
    let view = ctx.state.conversation(&account, &wa_id).ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            format!("no conversation with {wa_id} on {:?}", account.name()),
        )
    })?;
    Ok(HttpResponse::Ok().json(ConversationOut::new(&view, now_ms())))
}

/// `GET /v1/conversations/{account}/{wa_id}/messages`: the last 50, both ways.
#[utoipa::path(get, path = "/v1/conversations/{account}/{wa_id}/messages", tag = "conversations", params(("account" = String, Path, description = "Account name"), ("wa_id" = String, Path, description = "Contact number (digits, + optional) or BSUID")),
    responses((status = 200, description = "The last 50 messages, both directions", body = RecentListOut), (status = 404, description = "not_found", body = ErrorEnvelope), (status = 401, description = "No or wrong API key", body = ErrorEnvelope), (status = 429, description = "Rate limited; Retry-After set", body = ErrorEnvelope)))]
pub async fn messages(
    _key: ApiKey,
    path: web::Path<(String, String)>,
    ctx: web::Data<Ctx>,
) -> Result<HttpResponse, ApiError> {
    let (account, wa_id) = conversation_path(&ctx, path.into_inner())?;
    if ctx.state.conversation(&account, &wa_id).is_none() {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no conversation with {wa_id} on {:?}", account.name()),
        ));
    }
    Ok(HttpResponse::Ok().json(RecentListOut {
        messages: ctx
            .outbox
            .recent_messages(&account, &wa_id)
            .iter()
            .map(|(m, s)| RecentOut::new(m, *s))
            .collect(),
    }))
}

/// `GET /v1/queues`: per account, depth, scheduled, next send time, pace.
#[utoipa::path(get, path = "/v1/queues", tag = "queues",
    responses((status = 200, description = "Per account: depth, scheduled, next send time, pace", body = QueuesOut), (status = 401, description = "No or wrong API key", body = ErrorEnvelope), (status = 429, description = "Rate limited; Retry-After set", body = ErrorEnvelope)))]
pub async fn queues(_key: ApiKey, ctx: web::Data<Ctx>) -> Result<HttpResponse, ApiError> {
    let now = now_ms();
    let queues: Vec<_> = ctx
        .state
        .accounts()
        .iter()
        .map(|a| {
            let stats = ctx.outbox.queue(a).stats();
            let pace_ms = a.settings.pace.as_millis() as i64;
            let spacing = a.spacing().as_millis() as i64;
            let paused_until = stats.paused_until.filter(|t| *t > now);
            let next_send = if stats.depth > stats.in_flight {
                let free = stats.last_send.map_or(now, |l| (l + spacing).max(now));
                Some(free.max(paused_until.unwrap_or(0)))
            } else {
                stats.next_scheduled
            };
            QueueOut {
                account: a.name().to_string(),
                depth: stats.depth,
                scheduled: stats.scheduled,
                next_send_at: next_send.map(rfc3339),
                pace: format_duration(a.settings.pace),
                pace_ms,
                rate: a.rate(),
                in_flight: stats.in_flight,
                max_in_flight: a.max_in_flight(),
                paused_until: paused_until.map(rfc3339),
                max_queue: a.settings.max_queue,
                sandbox: a.is_sandbox(),
            }
        })
        .collect();
    Ok(HttpResponse::Ok().json(QueuesOut { queues }))
}

/// The account and contact of a `/v1/conversations/{account}/{wa_id}` path.
fn conversation_path(
    ctx: &Ctx,
    (name, raw): (String, String),
) -> Result<(std::sync::Arc<Account>, String), ApiError> {
    let account = account(ctx, &name)?;
    // Either id of a contact whose BSUID was linked to their phone number.
    let contact = ctx.state.resolve_contact(account.id, &path_contact(&raw)?);
    Ok((account, contact))
}

/// Make a change to a conversation: here, or in a cluster by the holder
/// of the account's lease (the one writer of its conversations), waiting
/// until this router sees the result.
pub(super) async fn apply(ctx: &Ctx, account: &Account, command: Command) -> Result<(), ApiError> {
    if let Some(cluster) = &ctx.cluster
        && !cluster.owns(account.name())
    {
        return Ok(cluster
            .command(&account.settings.phone_number_id, &command)
            .await?);
    }
    execute(&ctx.state, &ctx.outbox, account, command);
    Ok(())
}

/// Carry out a change (on the router that writes the account's data).
pub fn execute(state: &State, outbox: &Outbox, account: &Account, command: Command) {
    match command {
        Command::PutState {
            contact,
            state: rule_state,
            vars,
            at,
        } => state.put_state(account.id, &contact, rule_state, vars, at),
        Command::Handoff { contact, until, at } => {
            state.set_handoff(account.id, &contact, until, at)
        }
        Command::Consent {
            contact,
            opted_out,
            at,
        } => {
            // By the request's time: a late-delivered older keyword cannot
            // undo it.
            state.set_opted_out(account.id, &contact, opted_out, at, now_ms());
        }
        Command::Cancel { id, at } => {
            let _ = outbox.cancel(&id, at);
        }
    }
}

/// The conversation as the API shows it, after a change.
async fn answer(ctx: &Ctx, account: &Account, wa_id: &str) -> Result<HttpResponse, ApiError> {
    super::durable(ctx).await?;
    let view = ctx.state.conversation(account, wa_id).ok_or_else(|| {
        ApiError::new(ErrorCode::NotFound, format!("no conversation with {wa_id}"))
    })?;
    Ok(HttpResponse::Ok().json(ConversationOut::new(&view, now_ms())))
}

/// A contact in a path must be a phone number or a BSUID (`CC.…`).
fn path_contact(raw: &str) -> Result<String, ApiError> {
    let c = contact(raw);
    let valid = c.chars().all(|ch| ch.is_ascii_digit()) || crate::state::contacts::is_bsuid(&c);
    if valid {
        Ok(c)
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidPhone,
            format!("{raw:?} is not a phone number or user id"),
        )
        .with_field("wa_id"))
    }
}

/// Sort key of the conversation list: open windows first, then the most
/// recent inbound message first; account and contact break ties.
fn sort_key(v: &ConversationView, now: Millis) -> (bool, Millis, String, String) {
    (
        !v.window_open(now),
        -v.window.map_or(0, |w| w.last_inbound),
        v.account.clone(),
        v.wa_id.clone(),
    )
}

/// `GET /v1/conversations?account=&open=true&limit=&cursor=`.
#[utoipa::path(get, path = "/v1/conversations", tag = "conversations",
    params(("account" = Option<String>, Query, description = "Account name"), ("open" = Option<bool>, Query, description = "Only open (true) or closed (false) windows"),
        ("limit" = Option<usize>, Query, description = "1 to 200, default 50"), ("cursor" = Option<String>, Query, description = "next_cursor of the previous page")),
    responses((status = 200, description = "Open windows first, most recent inbound first", body = ConversationListOut), (status = 404, description = "unknown_account", body = ErrorEnvelope), (status = 401, description = "No or wrong API key", body = ErrorEnvelope), (status = 429, description = "Rate limited; Retry-After set", body = ErrorEnvelope)))]
pub async fn list(
    _key: ApiKey,
    req: HttpRequest,
    ctx: web::Data<Ctx>,
) -> Result<HttpResponse, ApiError> {
    let q = query(&req)?;
    let limit = limit(&q)?;
    let now = now_ms();
    let account_id = match q.get("account") {
        Some(name) => Some(account(&ctx, name)?.id),
        None => None,
    };
    let open = match q.get("open").map(String::as_str) {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return Err(ApiError::invalid("open", "open is true or false")),
    };
    let after = match q.get("cursor") {
        None => None,
        Some(c) => Some(
            hex::decode(c)
                .ok()
                .and_then(|b| serde_json::from_slice::<(bool, Millis, String, String)>(&b).ok())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "cursor",
                        "unknown cursor; pass next_cursor from the previous page",
                    )
                })?,
        ),
    };
    let mut all: Vec<_> = ctx
        .state
        .conversations(account_id)
        .into_iter()
        .filter(|v| open.is_none_or(|o| v.window_open(now) == o))
        .map(|v| (sort_key(&v, now), v))
        .filter(|(k, _)| after.as_ref().is_none_or(|a| k > a))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let more = all.len() > limit;
    all.truncate(limit);
    let next = if more {
        all.last()
            .map(|(k, _)| hex::encode(serde_json::to_vec(k).unwrap_or_default()))
    } else {
        None
    };
    let conversations = all
        .iter()
        .map(|(_, v)| ConversationOut::new(v, now))
        .collect();
    Ok(HttpResponse::Ok().json(ConversationListOut {
        conversations,
        next_cursor: next,
    }))
}

/// `PUT /v1/conversations/{account}/{wa_id}/state`: `{"state": "…", "vars": {…}}`.
#[utoipa::path(put, path = "/v1/conversations/{account}/{wa_id}/state", tag = "conversations", params(("account" = String, Path, description = "Account name"), ("wa_id" = String, Path, description = "Contact number (digits, + optional) or BSUID")), request_body = StateIn,
    responses((status = 200, description = "The conversation", body = ConversationOut), (status = 400, description = "invalid_request", body = ErrorEnvelope), (status = 401, description = "No or wrong API key", body = ErrorEnvelope), (status = 429, description = "Rate limited; Retry-After set", body = ErrorEnvelope)))]
pub async fn put_state(
    _key: ApiKey,
    req: HttpRequest,
    payload: web::Payload,
    path: web::Path<(String, String)>,
    ctx: web::Data<Ctx>,
) -> Result<HttpResponse, ApiError> {
    let (account, wa_id) = conversation_path(&ctx, path.into_inner())?;
    let body = json_body(&req, payload).await?;
    let obj = body.as_object().ok_or_else(|| {
        ApiError::new(ErrorCode::InvalidRequest, "the body must be a JSON object")
    })?;
    if let Some(k) = obj.keys().find(|k| *k != "state" && *k != "vars") {
        return Err(ApiError::invalid(
            k.clone(),
            format!("unknown field {k:?}; use state and vars"),
        ));
    }
    let state = match obj.get("state") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if s.chars().count() <= 256 => Some(s.clone()),
        Some(_) => {
            return Err(ApiError::invalid(
                "state",
                "state is a string of at most 256 characters",
            ));
        }
    };
    let vars = match obj.get("vars") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Object(m)) => {
            let mut vars = BTreeMap::new();
            for (k, v) in m {
                if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(ApiError::invalid(
                        format!("vars.{k}"),
                        "variable names are letters, digits and _",
                    ));
                }
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => {
                        return Err(ApiError::invalid(
                            format!("vars.{k}"),
                            "a variable is a string, number or boolean",
                        ));
                    }
                };
                vars.insert(k.clone(), text);
            }
            let size = crate::domain::vars_bytes(&vars);
            if size > crate::domain::MAX_VARS_BYTES {
                return Err(ApiError::invalid(
                    "vars",
                    format!(
                        "vars take {size} bytes; at most {} are kept per conversation",
                        crate::domain::MAX_VARS_BYTES
                    ),
                ));
            }
            Some(vars)
        }
        Some(_) => return Err(ApiError::invalid("vars", "vars is an object")),
    };
    if state.is_none() && vars.is_none() {
        return Err(ApiError::invalid("state", "give state, vars or both"));
    }
    let now = now_ms();
    let command = Command::PutState {
        contact: wa_id.clone(),
        state,
        vars,
        at: now,
    };
    apply(&ctx, &account, command).await?;
    answer(&ctx, &account, &wa_id).await
}

/// `POST /v1/conversations/{account}/{wa_id}/handoff`: hand to humans,
/// optionally `{"ttl": "2h"}` (default `handoff_ttl`).
#[utoipa::path(post, path = "/v1/conversations/{account}/{wa_id}/handoff", tag = "conversations", params(("account" = String, Path, description = "Account name"), ("wa_id" = String, Path, description = "Contact number (digits, + optional) or BSUID")), request_body(content = Option<HandoffIn>),
    responses((status = 200, description = "Handed to humans", body = ConversationOut), (status = 400, description = "invalid_request", body = ErrorEnvelope), (status = 401, description = "No or wrong API key", body = ErrorEnvelope), (status = 429, description = "Rate limited; Retry-After set", body = ErrorEnvelope)))]
pub async fn handoff(
    _key: ApiKey,
    req: HttpRequest,
    payload: web::Payload,
    path: web::Path<(String, String)>,
    ctx: web::Data<Ctx>,
) -> Result<HttpResponse, ApiError> {
    let (account, wa_id) = conversation_path(&ctx, path.into_inner())?;
    let ttl = match optional_json_body(&req, payload)
        .await?
        .as_ref()
        .and_then(|b| b.get("ttl"))
    {
        None | Some(serde_json::Value::Null) => ctx.handoff_ttl,
        Some(serde_json::Value::String(s)) => {
            parse_duration(s).map_err(|e| ApiError::invalid("ttl", e))?
        }
        Some(serde_json::Value::Number(n)) => {
            std::time::Duration::from_secs(n.as_u64().ok_or_else(|| {
                ApiError::invalid("ttl", "ttl is a duration like \"2h\" or seconds")
            })?)
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "ttl",
                "ttl is a duration like \"2h\" or seconds",
            ));
        }
    };
    if ttl.is_zero() || ttl > std::time::Duration::from_secs(30 * 86400) {
        return Err(ApiError::invalid(
            "ttl",
            "ttl must be more than 0 and at most 30 days",
        ));
    }
    let now = now_ms();
    let command = Command::Handoff {
        contact: wa_id.clone(),
        until: Some(now + ttl.as_millis() as Millis),
        at: now,
    };
    apply(&ctx, &account, command).await?;
    answer(&ctx, &account, &wa_id).await
}

/// `DELETE /v1/conversations/{account}/{wa_id}/handoff`: back to the bot.
#[utoipa::path(delete, path = "/v1/conversations/{account}/{wa_id}/handoff", tag = "conversations", params(("account" = String, Path, description = "Account name"), ("wa_id" = String, Path, description = "Contact number (digits, + optional) or BSUID")),
    responses((status = 200, description = "Back to the bot", body = ConversationOut), (status = 401, description = "No or wrong API key", body = ErrorEnvelope), (status = 429, description = "Rate limited; Retry-After set", body = ErrorEnvelope)))]
pub async fn release(
    _key: ApiKey,
    path: web::Path<(String, String)>,
    ctx: web::Data<Ctx>,
) -> Result<HttpResponse, ApiError> {
    let (account, wa_id) = conversation_path(&ctx, path.into_inner())?;
    let command = Command::Handoff {
        contact: wa_id.clone(),
        until: None,
        at: now_ms(),
    };
    apply(&ctx, &account, command).await?;
    answer(&ctx, &account, &wa_id).await
}

/// `POST /v1/conversations/{account}/{wa_id}/opt-out`.
#[utoipa::path(post, path = "/v1/conversations/{account}/{wa_id}/opt-out", tag = "conversations", params(("account" = String, Path, description = "Account name"), ("wa_id" = String, Path, description = "Contact number (digits, + optional) or BSUID")),
    responses((status = 200, description = "Opted out", body = ConversationOut), (status = 401, description = "No or wrong API key", body = ErrorEnvelope), (status = 429, description = "Rate limited; Retry-After set", body = ErrorEnvelope)))]
pub async fn opt_out(
    _key: ApiKey,
    path: web::Path<(String, String)>,
    ctx: web::Data<Ctx>,
) -> Result<HttpResponse, ApiError> {
    set_consent(&ctx, path.into_inner(), true).await
}

/// `DELETE /v1/conversations/{account}/{wa_id}/opt-out`: an opt-in.
#[utoipa::path(delete, path = "/v1/conversations/{account}/{wa_id}/opt-out", tag = "conversations", params(("account" = String, Path, description = "Account name"), ("wa_id" = String, Path, description = "Contact number (digits, + optional) or BSUID")),
    responses((status = 200, description = "Opted in", body = ConversationOut), (status = 401, description = "No or wrong API key", body = ErrorEnvelope), (status = 429, description = "Rate limited; Retry-After set", body = ErrorEnvelope)))]
pub async fn opt_in(
    _key: ApiKey,
    path: web::Path<(String, String)>,
    ctx: web::Data<Ctx>,
) -> Result<HttpResponse, ApiError> {
    set_consent(&ctx, path.into_inner(), false).await
}

async fn set_consent(
    ctx: &Ctx,
    (name, raw): (String, String),
    opted_out: bool,
) -> Result<HttpResponse, ApiError> {
    let (account, wa_id) = conversation_path(ctx, (name, raw))?;
    let command = Command::Consent {
        contact: wa_id.clone(),
        opted_out,
        at: now_ms(),
    };
    apply(ctx, &account, command).await?;
    answer(ctx, &account, &wa_id).await
}
