//! Errors in the OpenAI wire format: `{"error": {"message", "type", "param", "code"}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::admission::Refusal;
use crate::engine::EngineError;

/// An error answer: status plus OpenAI-style body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    /// Seconds after which a retry may succeed (`Retry-After`), for refusals under load.
    pub retry_after: Option<u64>,
    /// Why the request was refused under load, when it was: the reason it is counted under in
    /// the refusal metrics (`no_room`, `queue_full`, `too_large`, `deadline`).
    pub refusal: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// 400: the request is malformed or out of range; `param` names the offending field.
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
            retry_after: None,
            refusal: None,
        }
    }

    /// 429: the pod is at capacity; the client should retry after `retry_after` seconds.
    pub fn overloaded(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind: "requests",
            param: None,
            code: Some("rate_limit_exceeded"),
            retry_after: Some(retry_after),
            refusal: None,
        }
    }

    /// 504: the request's deadline passed before its answer was ready; its rows were cancelled.
    pub fn deadline(seconds: f64) -> Self {
        Self {
            status: StatusCode::GATEWAY_TIMEOUT,
            message: format!(
                "the request's deadline of {seconds:.1} s passed before its answer was ready; its samples were cancelled"
            ),
            kind: "server_error",
            param: None,
            code: Some("timeout"),
            retry_after: None,
            refusal: Some("deadline"),
        }
    }

    /// 404: the request names a model this sidecar does not serve.
    pub fn unknown_model(requested: &str, served: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{requested}` does not exist; this server serves `{served}`"
            ),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
            retry_after: None,
            refusal: None,
        }
    }

    /// 500: something failed inside the server.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
            refusal: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(Body {
            error: Detail {
                message: &self.message,
                kind: self.kind,
                param: self.param,
                code: self.code,
            },
        })
        .unwrap_or_default()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::ContextLength { .. } => Self {
                code: Some("context_length_exceeded"),
                ..Self::invalid(Some("messages"), e.to_string())
            },
            EngineError::EmptyPrompt => Self::invalid(Some("prompt"), e.to_string()),
            EngineError::Template(_) => Self::invalid(Some("messages"), e.to_string()),
            EngineError::Overloaded(refusal @ Refusal::TooLarge { .. }) => Self {
                code: Some("too_large_for_pod"),
                refusal: Some(refusal.reason()),
                ..Self::invalid(Some("n"), refusal.to_string())
            },
            EngineError::Overloaded(refusal) => Self {
                refusal: Some(refusal.reason()),
                ..Self::overloaded(refusal.to_string(), 1)
            },
            // The engine's worker has ended (`/healthz` fails with it): another replica may answer.
            EngineError::ShutDown => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: Some("engine_stopped"),
                retry_after: Some(1),
                ..Self::internal(e.to_string())
            },
            other => Self::internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refused under load: 429 with `Retry-After`, counted under its reason; a stopped engine:
    /// 503 with `Retry-After`, no refusal under load; a request past its deadline: 504.
    #[test]
    fn refusals_and_a_stopped_engine_say_when_to_retry() {
        let full = ApiError::from(EngineError::Overloaded(Refusal::QueueFull { waiting: 64 }));
        assert_eq!(full.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            (full.retry_after, full.refusal),
            (Some(1), Some("queue_full"))
        );
        let stopped = ApiError::from(EngineError::ShutDown);
        assert_eq!(stopped.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!((stopped.retry_after, stopped.refusal), (Some(1), None));
        assert_eq!(stopped.body()["error"]["code"], "engine_stopped");
        let late = ApiError::deadline(2.0);
        assert_eq!(
            (late.status, late.refusal),
            (StatusCode::GATEWAY_TIMEOUT, Some("deadline"))
        );
    }
}
