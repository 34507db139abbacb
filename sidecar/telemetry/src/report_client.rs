//! The OTLP exporter's HTTP client toward the operator's receiver. Where the receiver serves
//! TLS it trusts the receiver's CA (`TTC_REPORT_CA_PEM`, which the operator's webhook injects)
//! and nothing else; where the receiver authenticates sidecars it sends
//! `Authorization: Bearer <token>` read from a file on every export (the pod's projected
//! service-account token, which the kubelet rotates in place, so the token is never cached).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{AUTHORIZATION, HeaderValue};
use http::{Request, Response};
use opentelemetry_http::{HttpClient, HttpError};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A blocking HTTP client that trusts `ca_pem` and adds the bearer token in `token_file` to
/// every request.
#[derive(Debug)]
pub(crate) struct ReportClient {
    inner: reqwest_blocking::blocking::Client,
    token_file: Option<PathBuf>,
}

impl ReportClient {
    /// A client whose requests time out after `timeout`, trusting only the CA certificates in
    /// `ca_pem` when given. The blocking client is built on a thread of its own: building one
    /// inside an async runtime panics.
    pub(crate) fn new(
        token_file: Option<PathBuf>,
        ca_pem: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let tls = ca_pem.map(trusting).transpose()?;
        let inner = std::thread::spawn(move || {
            let mut builder = reqwest_blocking::blocking::Client::builder().timeout(timeout);
            if let Some(tls) = tls {
                builder = builder.tls_backend_preconfigured(tls);
            }
            builder.build()
        })
        .join()
        .map_err(|_| "the thread building the HTTP client panicked".to_owned())?
        .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(Self { inner, token_file })
    }
}

/// A TLS client configuration that trusts exactly the certificates in `ca_pem`.
fn trusting(ca_pem: &str) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("reading the receiver's CA (PEM): {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the receiver's CA certificate is not usable: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the receiver's CA (PEM) holds no certificate".into());
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS client configuration: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

#[async_trait]
impl HttpClient for ReportClient {
    async fn send_bytes(&self, mut request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        if let Some(file) = &self.token_file {
            let token = std::fs::read_to_string(file)
                .map_err(|e| format!("reading the receiver token {}: {e}", file.display()))?;
            let value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))?;
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        self.inner.send_bytes(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_without_certificates_is_refused_with_a_reason() {
        let err = trusting("not a certificate").expect_err("no certificate in it");
        assert!(err.contains("holds no certificate"), "{err}");
        let err = ReportClient::new(None, Some(""), Duration::from_secs(1))
            .expect_err("an empty CA is an error, not an empty trust store");
        assert!(err.contains("holds no certificate"), "{err}");
    }
}
