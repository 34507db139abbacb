//! Who may report energy for which pod: sidecars present their pod's service-account token,
//! minted for the operator's audience; the API server says whose it is (TokenReview), and a
//! token may only report for the pod it is bound to.
//!
//! Without this, anything that reaches the receiver could report joules for any pod and move
//! every policy's allocations. Projected service-account tokens are bound to their pod
//! (`authentication.kubernetes.io/pod-name` in the review's `extra`), expire within the hour and
//! are rotated by the kubelet, so a leaked token is short-lived and speaks for one pod only.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};

/// How the receiver authenticates reports (`--report-auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ReportAuthMode {
    /// Take every report (a receiver only the sidecars can reach, or a trusted cluster).
    #[default]
    None,
    /// Sidecars send their pod's projected service-account token; the API server reviews it
    /// and a token reports only for its own pod.
    TokenReview,
}

/// The pod a report may speak for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportingPod {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
}

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("no bearer token: send the pod's service-account token for audience `{0}`")]
    Missing(&'static str),
    /// The API server did not authenticate the token.
    #[error("the token was not accepted: {0}")]
    Rejected(String),
    /// The token is valid but not bound to a pod (not a projected pod token).
    #[error("the token of {0} is not bound to a pod; mount a projected service-account token")]
    NotBound(String),
    /// The review itself failed (API server unreachable, no permission).
    #[error("could not review the token: {0}")]
    Review(String),
    /// A report names another pod than the token's.
    #[error("a token of {token} cannot report for {report}")]
    WrongPod {
        /// `namespace/pod` of the token.
        token: String,
        /// `namespace/pod` of the report.
        report: String,
    },
}

impl AuthError {
    /// Whether the sender is unknown (401) rather than known but not allowed (403); a failed
    /// review is the operator's problem (503).
    pub fn status(&self) -> http::StatusCode {
        match self {
            Self::Missing(_) | Self::Rejected(_) => http::StatusCode::UNAUTHORIZED,
            Self::NotBound(_) | Self::WrongPod { .. } => http::StatusCode::FORBIDDEN,
            Self::Review(_) => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Tells whose a bearer token is.
pub trait ReportAuthenticator: Send + Sync {
    /// The pod `token` speaks for.
    fn authenticate<'a>(&'a self, token: &'a str)
    -> BoxFuture<'a, Result<ReportingPod, AuthError>>;
}

/// The `extra` key under which the API server names the pod a token is bound to.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

/// Asks the API server (TokenReview, audience [`ttc_api::report::REPORT_TOKEN_AUDIENCE`]);
/// remembers accepted tokens for a minute, so a sidecar exporting every few seconds costs one
/// review a minute.
pub struct TokenReviewer {
    api: Api<TokenReview>,
    audience: String,
    remember: Duration,
    accepted: Mutex<HashMap<[u8; 32], (ReportingPod, Instant)>>,
}

impl TokenReviewer {
    /// Tokens kept at most (a cache full of them is cleared).
    const CAPACITY: usize = 4096;

    /// A reviewer using `client` (which needs `create` on `tokenreviews`).
    pub fn new(client: kube::Client) -> Self {
        Self {
            api: Api::all(client),
            audience: ttc_api::report::REPORT_TOKEN_AUDIENCE.to_owned(),
            remember: Duration::from_secs(60),
            accepted: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (ReportingPod, Instant)>> {
        self.accepted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn review(&self, token: &str) -> Result<ReportingPod, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let reviewed = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Review(e.to_string()))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(
                status
                    .error
                    .unwrap_or_else(|| "not authenticated".to_owned()),
            ));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let namespace = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split(':').next())
            .map(str::to_owned)
            .ok_or_else(|| AuthError::NotBound(username.clone()))?;
        let pod = user
            .extra
            .as_ref()
            .and_then(|extra| extra.get(POD_NAME_EXTRA))
            .and_then(|names| names.first())
            .cloned()
            .ok_or_else(|| AuthError::NotBound(username.clone()))?;
        Ok(ReportingPod { namespace, pod })
    }
}

impl ReportAuthenticator for TokenReviewer {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> BoxFuture<'a, Result<ReportingPod, AuthError>> {
        Box::pin(async move {
            let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            let now = Instant::now();
            if let Some((identity, at)) = self.lock().get(&key)
                && now.duration_since(*at) < self.remember
            {
                return Ok(identity.clone());
            }
            let identity = self.review(token).await?;
            let mut accepted = self.lock();
            if accepted.len() >= Self::CAPACITY {
                accepted.clear();
            }
            accepted.insert(key, (identity.clone(), now));
            Ok(identity)
        })
    }
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}
