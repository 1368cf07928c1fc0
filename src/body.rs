//! Reading request bodies without letting clients hold the router's memory.
//!
//! A webhook's body must be read whole before its signature can be checked,
//! so an unauthenticated client could otherwise open many connections,
//! declare large bodies and trickle them in. Every body read here:
//! - must arrive within a deadline (`[http] body_timeout`) → `408`;
//! - counts against one budget of bytes buffered at once across all
//!   requests (`[http] max_buffered`); a body that would go over it is
//!   refused at once with `503 overloaded` and `Retry-After`;
//! - grows its buffer as bytes arrive, never from the declared length.
//!
//! The budget is held until the request's answer is built (the permit is
//! returned with the bytes).

use std::sync::Arc;
use std::time::Duration;

use actix_web::{HttpRequest, web};
use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{ApiError, ErrorCode};

/// Largest API request body (SPEC §7: over 1 MB → 413).
pub const API_MAX_BODY: usize = 1024 * 1024;

/// Shared limits for reading bodies.
#[derive(Debug, Clone)]
pub struct BodyLimits {
    pub timeout: Duration,
    budget: Arc<Semaphore>,
    max_buffered: usize,
}

/// Why a body was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Over the endpoint's size limit (declared or actual).
    TooLarge,
    /// Not complete within the deadline.
    Timeout,
    /// The router buffers as many bytes as it allows right now.
    Busy,
    /// The connection failed mid-body.
    Broken,
}

impl BodyError {
    /// The metric label of a refused webhook body.
    pub fn label(self) -> &'static str {
        match self {
            BodyError::TooLarge => "too_large",
            BodyError::Timeout => "body_timeout",
            BodyError::Busy => "overloaded",
            BodyError::Broken => "body_unreadable",
        }
    }

    /// The HTTP error; `too_large` names the limit.
    pub fn into_api_error(self, too_large: &str, broken: ErrorCode) -> ApiError {
        match self {
            BodyError::TooLarge => ApiError::new(ErrorCode::PayloadTooLarge, too_large),
            BodyError::Timeout => ApiError::new(
                ErrorCode::RequestTimeout,
                "the request body did not arrive in time",
            ),
            BodyError::Busy => ApiError::new(
                ErrorCode::Overloaded,
                "the router is reading as many request bodies as it allows; retry shortly",
            )
            .with_retry_after(Duration::from_secs(1)),
            BodyError::Broken => ApiError::new(broken, "the request body could not be read"),
        }
    }
}

/// A body read whole, with its share of the budget.
#[derive(Debug)]
pub struct Body {
    pub bytes: web::Bytes,
    _permit: Option<OwnedSemaphorePermit>,
}

impl BodyLimits {
    pub fn new(timeout: Duration, max_buffered: usize) -> Self {
        // Semaphore permits count bytes; u32 caps one acquisition, the
        // total fits in usize.
        BodyLimits {
            timeout,
            budget: Arc::new(Semaphore::new(max_buffered.min(Semaphore::MAX_PERMITS))),
            max_buffered,
        }
    }

    /// Bytes that may be buffered at once.
    pub fn max_buffered(&self) -> usize {
        self.max_buffered
    }

    /// Bytes buffered right now.
    pub fn buffered(&self) -> usize {
        self.max_buffered
            .min(Semaphore::MAX_PERMITS)
            .saturating_sub(self.budget.available_permits())
    }

    /// Read the body of `req` (at most `max` bytes) under these limits.
    pub async fn read(
        &self,
        req: &HttpRequest,
        mut payload: web::Payload,
        max: usize,
    ) -> Result<Body, BodyError> {
        let declared = req
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(BodyError::TooLarge);
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut permit: Option<OwnedSemaphorePermit> = None;
        let mut body = web::BytesMut::new();
        loop {
            let next = tokio::time::timeout_at(deadline, payload.next())
                .await
                .map_err(|_| BodyError::Timeout)?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|_| BodyError::Broken)?;
            if body.len() + chunk.len() > max {
                return Err(BodyError::TooLarge);
            }
            let want = u32::try_from(chunk.len()).map_err(|_| BodyError::TooLarge)?;
            let more = self
                .budget
                .clone()
                .try_acquire_many_owned(want)
                .map_err(|_| BodyError::Busy)?;
            match &mut permit {
                Some(p) => p.merge(more),
                None => permit = Some(more),
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Body {
            bytes: body.freeze(),
            _permit: permit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_counts_what_is_held() {
        let limits = BodyLimits::new(Duration::from_secs(1), 100);
        let a = limits.budget.clone().try_acquire_many_owned(60).unwrap();
        assert_eq!(limits.buffered(), 60);
        assert!(limits.budget.clone().try_acquire_many_owned(50).is_err());
        drop(a);
        assert_eq!(limits.buffered(), 0);
    }
}
