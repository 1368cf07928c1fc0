//! The HTTP error envelope (SPEC §7): `{"error": {"code", "message",
//! "field"}}`, one exhaustive table from code to status, `Retry-After` on
//! 429 and 503. Every HTTP error of the router goes through [`ApiError`].

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

use crate::message::validate::Invalid;
use crate::outbound::graph::GraphError;
use crate::outbound::policy::PolicyError;

/// The `error` object of the envelope.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    /// The field to blame, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Every HTTP error: `{"error": {"code", "message", "field"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    InvalidPhone,
    InvalidSignature,
    InvalidNotification,
    Unauthorized,
    Forbidden,
    OptedOut,
    UnknownAccount,
    NotFound,
    MethodNotAllowed,
    IdempotencyConflict,
    NotCancellable,
    NotRetryable,
    PayloadTooLarge,
    RequestTimeout,
    Overloaded,
    WindowClosed,
    TemplatePaused,
    TemplateUnavailable,
    MarketingOptedOut,
    RateLimited,
    QueueFull,
    NotReady,
    StorageUnavailable,
    Internal,
}

impl ErrorCode {
    /// HTTP status and wire string.
    pub fn describe(self) -> (StatusCode, &'static str) {
        use ErrorCode::*;
        match self {
            InvalidRequest => (StatusCode::BAD_REQUEST, "invalid_request"),
            InvalidPhone => (StatusCode::BAD_REQUEST, "invalid_phone"),
            InvalidNotification => (StatusCode::BAD_REQUEST, "invalid_notification"),
            InvalidSignature => (StatusCode::UNAUTHORIZED, "invalid_signature"),
            Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            OptedOut => (StatusCode::FORBIDDEN, "opted_out"),
            UnknownAccount => (StatusCode::NOT_FOUND, "unknown_account"),
            NotFound => (StatusCode::NOT_FOUND, "not_found"),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            IdempotencyConflict => (StatusCode::CONFLICT, "idempotency_conflict"),
            NotCancellable => (StatusCode::CONFLICT, "not_cancellable"),
            NotRetryable => (StatusCode::CONFLICT, "not_retryable"),
            PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            WindowClosed => (StatusCode::UNPROCESSABLE_ENTITY, "window_closed"),
            TemplatePaused => (StatusCode::UNPROCESSABLE_ENTITY, "template_paused"),
            TemplateUnavailable => (StatusCode::UNPROCESSABLE_ENTITY, "template_unavailable"),
            MarketingOptedOut => (StatusCode::FORBIDDEN, "marketing_opted_out"),
            RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            QueueFull => (StatusCode::SERVICE_UNAVAILABLE, "queue_full"),
            NotReady => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            StorageUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable"),
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// An error answered over HTTP.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub field: Option<String>,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    /// A 400 `invalid_request` blaming `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            code: ErrorCode::InvalidRequest,
            message: message.into(),
            field: Some(field.into()),
            retry_after: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}

/// A policy refusal at enqueue (SPEC §7 table).
impl From<PolicyError> for ApiError {
    fn from(refused: PolicyError) -> Self {
        let message = refused.to_string();
        match refused {
            PolicyError::WindowClosed => ApiError::new(ErrorCode::WindowClosed, message),
            PolicyError::OptedOut => ApiError::new(ErrorCode::OptedOut, message),
            PolicyError::Expired => ApiError::invalid("validity", message),
            PolicyError::QueueFull { retry_after } => {
                ApiError::new(ErrorCode::QueueFull, message).with_retry_after(retry_after)
            }
            PolicyError::TemplatePaused => ApiError::new(ErrorCode::TemplatePaused, message),
            PolicyError::TemplateUnavailable => {
                ApiError::new(ErrorCode::TemplateUnavailable, message)
            }
            PolicyError::MarketingOptedOut => ApiError::new(ErrorCode::MarketingOptedOut, message),
        }
    }
}

/// Content that breaks a WhatsApp limit: 400 blaming the field.
impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::invalid(e.field, e.message)
    }
}

/// A Graph error surfaced over HTTP (none is today: sends are queued).
impl From<GraphError> for ApiError {
    fn from(e: GraphError) -> Self {
        ApiError::new(ErrorCode::Internal, e.to_string())
    }
}

/// Redis did not answer (cluster mode): retry later. The cause is logged,
/// not shown.
impl From<crate::cluster::ClusterError> for ApiError {
    fn from(e: crate::cluster::ClusterError) -> Self {
        tracing::warn!(error = %e, "cannot reach the cluster's state");
        ApiError::new(
            ErrorCode::StorageUnavailable,
            "the router cannot reach the cluster's state now; retry later",
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.code.describe().0
    }

    fn error_response(&self) -> HttpResponse {
        let (status, code) = self.code.describe();
        let body = ErrorEnvelope {
            error: ErrorBody {
                code: code.into(),
                message: self.message.clone(),
                field: self.field.clone(),
            },
        };
        let mut resp = HttpResponse::build(status);
        if let Some(after) = self.retry_after {
            resp.insert_header(("Retry-After", after.as_secs().max(1).to_string()));
        }
        resp.json(body)
    }
}
