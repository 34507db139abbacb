//! The OTLP exporter's HTTP client with `Authorization: Bearer <token>` read from a file on
//! every export: the operator's receiver authenticates sidecars by their pod's projected
//! service-account token, which the kubelet rotates in place, so the token is never cached.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{AUTHORIZATION, HeaderValue};
use http::{Request, Response};
use opentelemetry_http::{HttpClient, HttpError};

/// A blocking HTTP client that adds the bearer token in `token_file` to every request.
#[derive(Debug)]
pub(crate) struct BearerTokenClient {
    inner: reqwest_blocking::blocking::Client,
    token_file: PathBuf,
}

impl BearerTokenClient {
    /// A client whose requests time out after `timeout`. The blocking client is built on a
    /// thread of its own: building one inside an async runtime panics.
    pub(crate) fn new(token_file: PathBuf, timeout: Duration) -> Result<Self, String> {
        let inner = std::thread::spawn(move || {
            reqwest_blocking::blocking::Client::builder()
                .timeout(timeout)
                .build()
        })
        .join()
        .map_err(|_| "the thread building the HTTP client panicked".to_owned())?
        .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(Self { inner, token_file })
    }
}

#[async_trait]
impl HttpClient for BearerTokenClient {
    async fn send_bytes(&self, mut request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let token = std::fs::read_to_string(&self.token_file).map_err(|e| {
            format!(
                "reading the receiver token {}: {e}",
                self.token_file.display()
            )
        })?;
        let value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))?;
        request.headers_mut().insert(AUTHORIZATION, value);
        self.inner.send_bytes(request).await
    }
}
