//! `POST /v1/messages` and `GET /v1/messages/{id}` (SPEC §7).

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Value, json};

use super::auth::ApiKey;
use super::dto::{AcceptedOut, ErrorEnvelope, MessageIn, MessageListOut, RecordOut};
use super::{json_body, limit, query};
use crate::api::Ctx;
use crate::domain::{Millis, now_ms, parse_phone, parse_rfc3339, rfc3339};
use crate::error::{ApiError, ErrorCode};
use crate::ids::{ContactId, MessageId, Wamid};
use crate::message::MessageType;
use crate::message::validate::{TYPES, validate};
use crate::outbound::RecordFilter;
use crate::outbound::Status;
use crate::outbound::policy::NewMessage;
use crate::outbound::{Content, enqueue};
use crate::state::IdempotencyOutcome;
use crate::state::contacts::is_bsuid;

/// Router fields beside the message object (SPEC §7).
const ROUTER_FIELDS: &[&str] = &[
    "account",
    "to",
    "type",
    "reply_to",
    "typing",
    "tags",
    "metadata",
    "send_at",
    "validity",
    "idempotency_key",
    "messaging_product",
    "recipient_type",
    "recipient",
];
const MAX_TAGS: usize = 10;
const MAX_TAG_LEN: usize = 64;
/// `send_at` within this of now means now (SPEC §7).
const SEND_AT_NOW_MS: Millis = 10 * 60 * 1000;
/// `send_at` beyond this is refused (SPEC §7).
const SEND_AT_MAX_MS: Millis = 35 * 24 * 3600 * 1000;
const MAX_VALIDITY_S: u64 = 30 * 24 * 3600;

fn str_field<'a>(
    body: &'a serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(ApiError::invalid(key, format!("{key} must be a string"))),
    }
}

/// `POST /v1/messages`.
#[utoipa::path(post, path = "/v1/messages", tag = "messages", request_body = MessageIn,
    params(("Idempotency-Key" = Option<String>, Header, description = "Same key + same body → the original answer")),
    responses((status = 202, description = "Accepted", body = AcceptedOut),
        (status = 400, description = "invalid_request / invalid_phone, `field` names the culprit", body = ErrorEnvelope),
        (status = 403, description = "opted_out / marketing_opted_out (a marketing template to a contact who stopped marketing messages)", body = ErrorEnvelope), (status = 404, description = "unknown_account", body = ErrorEnvelope),
        (status = 409, description = "idempotency_conflict", body = ErrorEnvelope), (status = 413, description = "payload_too_large", body = ErrorEnvelope),
        (status = 422, description = "window_closed: send a template / template_paused / template_unavailable (Meta paused or disabled the template)", body = ErrorEnvelope),
        (status = 503, description = "queue_full; Retry-After set", body = ErrorEnvelope), (status = 401, description = "No or wrong API key", body = ErrorEnvelope), (status = 429, description = "Rate limited; Retry-After set", body = ErrorEnvelope)))]
pub async fn send(
    _key: ApiKey,
    req: HttpRequest,
    payload: web::Payload,
    ctx: web::Data<Ctx>,
) -> Result<HttpResponse, ApiError> {
    let body = json_body(&req, payload).await?;
    let header_key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // A flood of sends waits for the archive rather than filling memory.
    ctx.state
        .archive()
        .keep_up(
            crate::archive::MAX_BACKLOG_ROWS,
            std::time::Duration::from_secs(5),
        )
        .await;
    // Cluster: one request per idempotency key at a time, cluster-wide.
    let claimed = match (&ctx.cluster, idempotency_key(&body, header_key.as_deref())) {
        (Some(cluster), Some(key)) => {
            let state = ctx.state.clone();
            let known = || state.knows_idempotency_key(&key);
            cluster
                .claim_idempotency(&key, known)
                .await?
                .then(|| (cluster.clone(), key))
        }
        _ => None,
    };
    let sent = send_message(&ctx, body, header_key);
    if let (Err(_), Some((cluster, key))) = (&sent, &claimed) {
        cluster.release_idempotency(key).await;
    }
    let (status, answer) = sent?;
    super::durable(&ctx).await?;
    Ok(HttpResponse::build(status).json(answer))
}

/// The idempotency key a send request names (header or body), if any.
fn idempotency_key(body: &Value, header: Option<&str>) -> Option<String> {
    header
        .or_else(|| body.get("idempotency_key").and_then(Value::as_str))
        .filter(|k| !k.is_empty())
        .map(str::to_string)
}

/// Accept one send request; returns the HTTP status and body to answer
/// (the original answer again for a repeated idempotency key).
pub fn send_message(
    ctx: &Ctx,
    body: Value,
    header_key: Option<String>,
) -> Result<(actix_web::http::StatusCode, Value), ApiError> {
    let Value::Object(map) = &body else {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "the body must be a JSON object",
        ));
    };
    let body_key = str_field(map, "idempotency_key")?.map(str::to_string);
    let key = match (header_key, body_key) {
        (Some(h), Some(b)) if h != b => {
            return Err(ApiError::invalid(
                "idempotency_key",
                "the Idempotency-Key header and idempotency_key differ",
            ));
        }
        (h, b) => h.or(b),
    };
    let Some(key) = key else {
        return accept(ctx, map).map(|v| (actix_web::http::StatusCode::ACCEPTED, v));
    };
    if key.is_empty() || key.len() > 255 {
        return Err(ApiError::invalid(
            "idempotency_key",
            "idempotency_key must be 1 to 255 characters",
        ));
    }
    let mut fingerprint_body = map.clone();
    fingerprint_body.remove("idempotency_key");
    let fingerprint = crate::state::fingerprint(&Value::Object(fingerprint_body));
    match ctx
        .state
        .idempotent(&key, fingerprint, now_ms(), || accept(ctx, map))
    {
        IdempotencyOutcome::Done(v) | IdempotencyOutcome::Replayed(v) => {
            Ok((actix_web::http::StatusCode::ACCEPTED, v))
        }
        IdempotencyOutcome::Conflict => Err(ApiError::new(
            ErrorCode::IdempotencyConflict,
            "this idempotency key was used with a different body",
        )
        .with_field("idempotency_key")),
        IdempotencyOutcome::Failed(e) => Err(e),
    }
}

/// A send request checked field by field, before anything is looked up.
#[derive(Debug, Clone)]
pub struct SendRequest {
    pub account: Option<String>,
    /// Digits only.
    pub to: ContactId,
    pub kind: MessageType,
    pub object: Value,
    /// As given: a wamid or a router message id.
    pub reply_to: Option<String>,
    /// A typing indicator on `reply_to` (a customer's message) first.
    pub typing: bool,
    pub tags: Vec<String>,
    pub metadata: Option<Value>,
    pub send_at: Option<Millis>,
    /// `None`: the configured default.
    pub validity: Option<Duration>,
}

/// Check a `POST /v1/messages` body (SPEC §7) without touching state: every
/// invalid field → 400 naming it. Pure, so it can be fuzzed.
pub fn parse_send_request(
    map: &serde_json::Map<String, Value>,
    now: Millis,
) -> Result<SendRequest, ApiError> {
    let kind = str_field(map, "type")?.ok_or_else(|| {
        ApiError::invalid(
            "type",
            format!("type is required: one of {}", TYPES.join(", ")),
        )
    })?;
    let Some(message_type) = MessageType::parse(kind) else {
        return Err(ApiError::invalid(
            "type",
            format!("unknown type {kind:?}: use one of {}", TYPES.join(", ")),
        ));
    };
    if let Some(extra) = map
        .keys()
        .find(|k| k.as_str() != kind && !ROUTER_FIELDS.contains(&k.as_str()))
    {
        return Err(ApiError::invalid(
            extra.clone(),
            format!("unknown field {extra:?}; the message content goes under the key {kind:?}"),
        ));
    }
    if let Some(mp) = map.get("messaging_product")
        && mp != "whatsapp"
    {
        return Err(ApiError::invalid(
            "messaging_product",
            "messaging_product must be \"whatsapp\" if given",
        ));
    }
    if let Some(rt) = map.get("recipient_type")
        && rt != "individual"
    {
        return Err(ApiError::invalid(
            "recipient_type",
            "only \"individual\" recipients are supported",
        ));
    }
    let mut object = map
        .get(kind)
        .cloned()
        .ok_or_else(|| ApiError::invalid(kind, format!("the {kind:?} object is required")))?;
    if kind == "text"
        && let Value::String(s) = &object
    {
        object = json!({ "body": s });
    }
    validate(kind, &object)?;

    let account = str_field(map, "account")?.map(str::to_string);
    // `to`: a phone number; or `recipient`: a BSUID, for a contact whose
    // phone number Meta does not show (both: the phone number is used).
    let to = match (str_field(map, "to")?, str_field(map, "recipient")?) {
        (Some(to_raw), _) => parse_phone(to_raw).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidPhone,
                format!("{to_raw:?} is not a valid E.164 phone number"),
            )
            .with_field("to")
        })?,
        (None, Some(r)) if is_bsuid(r) => r.to_string(),
        (None, Some(r)) => {
            return Err(ApiError::invalid(
                "recipient",
                format!(
                    "{r:?} is not a business-scoped user id (BSUID) like \"US.13491208655302741918\""
                ),
            ));
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "to",
                "to (the contact's E.164 number) or recipient (their BSUID) is required",
            ));
        }
    };

    let reply_to = match str_field(map, "reply_to")? {
        None => None,
        Some(_) if kind == "reaction" => {
            return Err(ApiError::invalid(
                "reply_to",
                "a reaction cannot reply to a message; set reaction.message_id",
            ));
        }
        Some(r) if r.trim().is_empty() => {
            return Err(ApiError::invalid("reply_to", "reply_to must not be empty"));
        }
        Some(r) => Some(r.to_string()),
    };
    let typing = match map.get("typing") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(_) => return Err(ApiError::invalid("typing", "typing is true or false")),
    };
    if typing
        && reply_to
            .as_deref()
            .is_none_or(|r| MessageId::parse(r).is_some())
    {
        return Err(ApiError::invalid(
            "typing",
            "typing needs reply_to naming the customer's message (its wamid)",
        ));
    }
    let tags = match map.get("tags") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            if items.len() > MAX_TAGS {
                return Err(ApiError::invalid(
                    "tags",
                    format!("at most {MAX_TAGS} tags"),
                ));
            }
            let mut tags: Vec<String> = Vec::new();
            for (i, t) in items.iter().enumerate() {
                let t = t
                    .as_str()
                    .map(|s| s.trim().to_lowercase())
                    .filter(|s| !s.is_empty() && s.chars().count() <= MAX_TAG_LEN);
                let t = t.ok_or_else(|| {
                    ApiError::invalid(
                        format!("tags[{i}]"),
                        format!("a tag is a string of 1 to {MAX_TAG_LEN} characters"),
                    )
                })?;
                if !tags.contains(&t) {
                    tags.push(t);
                }
            }
            tags
        }
        Some(_) => return Err(ApiError::invalid("tags", "tags must be a list of strings")),
    };
    let metadata = match map.get("metadata") {
        None | Some(Value::Null) => None,
        Some(m @ Value::Object(_)) => {
            let size = serde_json::to_vec(m).map_or(usize::MAX, |b| b.len());
            if size > crate::domain::MAX_METADATA_BYTES {
                return Err(ApiError::invalid(
                    "metadata",
                    format!(
                        "metadata is {size} bytes of JSON; at most {} are kept",
                        crate::domain::MAX_METADATA_BYTES
                    ),
                ));
            }
            Some(m.clone())
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "metadata",
                "metadata must be a JSON object",
            ));
        }
    };
    let send_at = match str_field(map, "send_at")? {
        None => None,
        Some(s) => {
            let at = parse_rfc3339(s).ok_or_else(|| {
                ApiError::invalid("send_at", "send_at must be an RFC 3339 time stamp")
            })?;
            if at - now > SEND_AT_MAX_MS {
                return Err(ApiError::invalid(
                    "send_at",
                    "send_at may be at most 35 days ahead",
                ));
            }
            (at - now > SEND_AT_NOW_MS).then_some(at)
        }
    };
    let validity = match map.get("validity") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(s) if (1..=MAX_VALIDITY_S).contains(&s) => Some(Duration::from_secs(s)),
            _ => {
                return Err(ApiError::invalid(
                    "validity",
                    format!("validity is a whole number of seconds from 1 to {MAX_VALIDITY_S}"),
                ));
            }
        },
    };

    Ok(SendRequest {
        account,
        to: ContactId::from(to),
        kind: message_type,
        object,
        reply_to,
        typing,
        tags,
        metadata,
        send_at,
        validity,
    })
}

fn accept(ctx: &Ctx, map: &serde_json::Map<String, Value>) -> Result<Value, ApiError> {
    let now = now_ms();
    let SendRequest {
        account,
        to,
        kind,
        object,
        reply_to,
        typing,
        tags,
        metadata,
        send_at,
        validity,
    } = parse_send_request(map, now)?;
    let validity = validity.unwrap_or(ctx.validity);
    let account = match account.as_deref() {
        Some(name) => ctx.state.account_by_name(name).ok_or_else(|| {
            ApiError::new(
                ErrorCode::UnknownAccount,
                format!("no account named {name:?}"),
            )
            .with_field("account")
        })?,
        None => ctx.state.default_account().ok_or_else(|| {
            ApiError::new(
                ErrorCode::UnknownAccount,
                "no account is configured (sandbox: accounts appear with their first webhook)",
            )
            .with_field("account")
        })?,
    };
    // A BSUID linked to a phone number: that contact's conversation.
    let to = ContactId::from(ctx.state.resolve_contact(account.id, &to));
    // A router id stands for the wamid Meta gave that message.
    let context_id = match reply_to {
        Some(r) => match MessageId::parse(&r) {
            Some(id) => {
                let record = ctx
                    .outbox
                    .record(&id)
                    .ok_or_else(|| ApiError::invalid("reply_to", format!("no message {r:?}")))?;
                Some(record.wamid.ok_or_else(|| {
                    ApiError::invalid("reply_to", format!("message {r:?} has not been sent yet"))
                })?)
            }
            None => Some(Wamid::from(r)),
        },
        None => None,
    };
    let typing = context_id.clone().filter(|_| typing);
    let content = Content {
        kind,
        object: object.into(),
        context_id,
    };
    let new = NewMessage {
        account: account.clone(),
        to: to.clone(),
        content,
        source: "api".into(),
        tags,
        metadata: metadata.map(Into::into),
        send_at,
        validity,
        bypass_consent: false,
        keep_refused: false,
        may_exist: false,
        typing,
        id: None,
    };
    let accepted =
        enqueue(&ctx.outbox, new, now).map_err(|(refused, _)| ApiError::from(refused))?;
    let out = accepted_out(accepted, account.name(), to, None);
    Ok(serde_json::to_value(out).unwrap_or_default())
}

/// The record `id`, or 404.
fn find_record(ctx: &Ctx, id: &str) -> Result<crate::outbound::OutboundRecord, ApiError> {
    ctx.outbox
        .record(id)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no message {id:?}")))
}

/// The 202 answer of an accepted message.
fn accepted_out(
    accepted: crate::outbound::policy::Accepted,
    account: &str,
    to: ContactId,
    retry_of: Option<String>,
) -> AcceptedOut {
    AcceptedOut {
        id: accepted.id.into_string(),
        status: accepted.status.as_str().into(),
        account: account.into(),
        to: to.into_string(),
        queue_position: accepted.queue_position,
        send_after: rfc3339(accepted.send_after),
        retry_of,
    }
}

/// `GET /v1/messages/{id}`.
#[utoipa::path(get, path = "/v1/messages/{id}", tag = "messages", params(("id" = String, Path, description = "Router message id")),
    responses((status = 200, description = "The record", body = RecordOut), (status = 404, description = "not_found", body = ErrorEnvelope), (status = 401, description = "No or wrong API key", body = ErrorEnvelope), (status = 429, description = "Rate limited; Retry-After set", body = ErrorEnvelope)))]
pub async fn get(
    _key: ApiKey,
    path: web::Path<String>,
    ctx: web::Data<Ctx>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let record = find_record(&ctx, &id)?;
    Ok(HttpResponse::Ok().json(RecordOut::from(&record)))
}

/// `GET /v1/messages?account=&to=&status=&tag=&limit=&cursor=`: newest first.
#[utoipa::path(get, path = "/v1/messages", tag = "messages",
    params(("account" = Option<String>, Query, description = "Account name"), ("to" = Option<String>, Query, description = "Contact number"),
        ("status" = Option<String>, Query, description = "Record status"), ("tag" = Option<String>, Query, description = "A tag"),
        ("limit" = Option<usize>, Query, description = "1 to 200, default 50"), ("cursor" = Option<String>, Query, description = "next_cursor of the previous page")),
    responses((status = 200, description = "Newest first", body = MessageListOut), (status = 400, description = "invalid_request", body = ErrorEnvelope), (status = 401, description = "No or wrong API key", body = ErrorEnvelope), (status = 429, description = "Rate limited; Retry-After set", body = ErrorEnvelope)))]
pub async fn list(
    _key: ApiKey,
    req: HttpRequest,
    ctx: web::Data<Ctx>,
) -> Result<HttpResponse, ApiError> {
    let q = query(&req)?;
    let limit = limit(&q)?;
    let mut filter = RecordFilter::default();
    if let Some(a) = q.get("account") {
        if ctx.state.account_by_name(a).is_none() {
            return Err(ApiError::new(
                ErrorCode::UnknownAccount,
                format!("no account named {a:?}"),
            )
            .with_field("account"));
        }
        filter.account = Some(a.clone());
    }
    if let Some(t) = q.get("to") {
        // A phone number, or a BSUID (messages sent to it as `recipient`).
        let to = parse_phone(t)
            .or_else(|| is_bsuid(t).then(|| t.to_string()))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidPhone,
                    format!("{t:?} is not a valid E.164 phone number or BSUID"),
                )
                .with_field("to")
            })?;
        filter.to = Some(to);
    }
    if let Some(s) = q.get("status") {
        filter.status = Some(
            Status::parse(s)
                .ok_or_else(|| ApiError::invalid("status", format!("unknown status {s:?}")))?,
        );
    }
    filter.tag = q.get("tag").map(|t| t.trim().to_lowercase());
    let (page, next) = ctx
        .outbox
        .list_records(&filter, q.get("cursor").map(String::as_str), limit);
    let messages = page.iter().map(RecordOut::from).collect();
    Ok(HttpResponse::Ok().json(MessageListOut {
        messages,
        next_cursor: next.map(MessageId::into_string),
    }))
}

/// `DELETE /v1/messages/{id}`: cancel a queued or scheduled message.
#[utoipa::path(delete, path = "/v1/messages/{id}", tag = "messages", params(("id" = String, Path, description = "Router message id")),
    responses((status = 200, description = "Cancelled", body = RecordOut), (status = 404, description = "not_found", body = ErrorEnvelope),
        (status = 409, description = "not_cancellable", body = ErrorEnvelope), (status = 401, description = "No or wrong API key", body = ErrorEnvelope), (status = 429, description = "Rate limited; Retry-After set", body = ErrorEnvelope)))]
pub async fn cancel(
    _key: ApiKey,
    path: web::Path<String>,
    ctx: web::Data<Ctx>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    // Cluster: the router holding the account's lease cancels (it may be
    // starting the send); the result is read back here.
    if let Some(cluster) = &ctx.cluster
        && let Some(record) = ctx.outbox.record(&id)
        && let Some(account) = ctx.state.account_by_name(&record.account)
        && !cluster.owns(account.name())
        && matches!(record.status, Status::Queued | Status::Scheduled)
    {
        let command = crate::cluster::Command::Cancel {
            id: id.clone(),
            at: now_ms(),
        };
        super::conversations::apply(&ctx, &account, command).await?;
        let now = ctx
            .outbox
            .record(&id)
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no message {id:?}")))?;
        return if now.status == Status::Cancelled {
            Ok(HttpResponse::Ok().json(RecordOut::from(&now)))
        } else {
            Err(not_cancellable(&id, now.status))
        };
    }
    match ctx.outbox.cancel(&id, now_ms()) {
        Ok(record) => {
            super::durable(&ctx).await?;
            Ok(HttpResponse::Ok().json(RecordOut::from(&record)))
        }
        Err(None) => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no message {id:?}"),
        )),
        Err(Some(status)) => Err(not_cancellable(&id, status)),
    }
}

fn not_cancellable(id: &str, status: Status) -> ApiError {
    ApiError::new(
        ErrorCode::NotCancellable,
        format!(
            "message {id:?} is {}; only queued or scheduled messages can be cancelled",
            status.as_str()
        ),
    )
}

/// `POST /v1/messages/{id}/retry`: a failed or expired message again, as a
/// new record with the same content.
#[utoipa::path(post, path = "/v1/messages/{id}/retry", tag = "messages", params(("id" = String, Path, description = "A failed or expired message")),
    responses((status = 202, description = "Queued again as a new record", body = AcceptedOut), (status = 404, description = "not_found", body = ErrorEnvelope),
        (status = 409, description = "not_retryable", body = ErrorEnvelope), (status = 422, description = "window_closed", body = ErrorEnvelope), (status = 401, description = "No or wrong API key", body = ErrorEnvelope), (status = 429, description = "Rate limited; Retry-After set", body = ErrorEnvelope)))]
pub async fn retry(
    _key: ApiKey,
    path: web::Path<String>,
    ctx: web::Data<Ctx>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let old = find_record(&ctx, &id)?;
    if !matches!(old.status, Status::Failed | Status::Expired) {
        return Err(ApiError::new(
            ErrorCode::NotRetryable,
            format!(
                "message {id:?} is {}; only failed or expired messages can be retried",
                old.status.as_str()
            ),
        ));
    }
    let account = ctx.state.account_by_name(&old.account).ok_or_else(|| {
        ApiError::new(
            ErrorCode::UnknownAccount,
            format!("no account named {:?}", old.account),
        )
    })?;
    let new = NewMessage {
        account: account.clone(),
        to: old.to.clone(),
        content: old.content.clone(),
        source: old.source.clone(),
        tags: old.tags.clone(),
        metadata: old.metadata.clone(),
        send_at: None,
        validity: ctx.validity,
        bypass_consent: false,
        keep_refused: false,
        may_exist: false,
        typing: None,
        id: None,
    };
    let accepted =
        enqueue(&ctx.outbox, new, now_ms()).map_err(|(refused, _)| ApiError::from(refused))?;
    super::durable(&ctx).await?;
    Ok(HttpResponse::Accepted().json(accepted_out(accepted, account.name(), old.to, Some(id))))
}
