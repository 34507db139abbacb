//! The OTLP exporter's HTTP client toward the operator's receiver. Where the receiver serves
//! TLS it trusts the receiver's CA (`TTC_REPORT_CA_PEM`, which the operator's webhook injects)
//! and, once the operator publishes a changed one in the policy's status, that CA besides
//! ([`ReportClient::trust_published`]); nothing else. Where the receiver authenticates sidecars
//! it sends `Authorization: Bearer <token>` read from a file on every export (the pod's
//! projected service-account token, which the kubelet rotates in place, so the token is never
//! cached). An operator replica without the lease refuses a report and closes the connection
//! ([`NOT_LEADER_HEADER`]); the client sends it again at once, on a new connection that the
//! Service may route to the leader, a few times.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{AUTHORIZATION, HeaderValue};
use http::{Request, Response};
use opentelemetry_http::{HttpClient, HttpError};
use reqwest_blocking::blocking::Client;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use ttc_api::report::NOT_LEADER_HEADER;

/// Attempts per export while operator replicas without the lease answer: with two replicas
/// behind the Service, all of them miss the leader once in 2^8 exports, and a missed export
/// only delays the cumulative counters to the next one.
const ATTEMPTS: usize = 8;

/// A blocking HTTP client that trusts the receiver's CA and adds the bearer token in
/// `token_file` to every request. Clones share the client, so a change of trust reaches the
/// exporter's copy.
#[derive(Debug, Clone)]
pub(crate) struct ReportClient {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    client: RwLock<Client>,
    token_file: Option<PathBuf>,
    /// The CA the sidecar was created with; `None`: the platform's roots (reports to a
    /// collector of the user's, which the operator publishes no CA for).
    created_with: Option<String>,
    /// The CA last published in the policy's status and trusted besides.
    published: Mutex<Option<String>>,
    timeout: Duration,
}

impl ReportClient {
    /// A client whose requests time out after `timeout`, trusting only the CA certificates in
    /// `ca_pem` when given.
    pub(crate) fn new(
        token_file: Option<PathBuf>,
        ca_pem: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let tls = ca_pem.map(trusting).transpose()?;
        Ok(Self {
            shared: Arc::new(Shared {
                client: RwLock::new(build(tls, timeout)?),
                token_file,
                created_with: ca_pem.map(str::to_owned),
                published: Mutex::new(None),
                timeout,
            }),
        })
    }

    /// Trusts `ca_pem`, the receiver's CA as the operator publishes it in the policy's status,
    /// besides the CA the sidecar was created with (replacing the one published before).
    /// `Ok(true)` when the trust changed; `Ok(false)` when `ca_pem` is already trusted, or when
    /// the reports do not go to the receiver over TLS (no CA at creation). A CA that does not
    /// parse is an error and changes nothing.
    pub(crate) fn trust_published(&self, ca_pem: &str) -> Result<bool, String> {
        let Some(created_with) = &self.shared.created_with else {
            return Ok(false);
        };
        let mut published = self
            .shared
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if published.as_deref() == Some(ca_pem) || created_with == ca_pem {
            return Ok(false);
        }
        trusting(ca_pem)?;
        let client = build(
            Some(trusting(&format!("{created_with}\n{ca_pem}"))?),
            self.shared.timeout,
        )?;
        *self
            .shared
            .client
            .write()
            .unwrap_or_else(|e| e.into_inner()) = client;
        *published = Some(ca_pem.to_owned());
        Ok(true)
    }

    /// The client requests go through now.
    fn client(&self) -> Client {
        self.shared
            .client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A blocking client trusting `tls` (the platform's roots when `None`), built on a thread of its
/// own: building one inside an async runtime panics.
fn build(tls: Option<rustls::ClientConfig>, timeout: Duration) -> Result<Client, String> {
    std::thread::spawn(move || {
        let mut builder = Client::builder().timeout(timeout);
        if let Some(tls) = tls {
            builder = builder.tls_backend_preconfigured(tls);
        }
        builder.build()
    })
    .join()
    .map_err(|_| "the thread building the HTTP client panicked".to_owned())?
    .map_err(|e| format!("building the HTTP client: {e}"))
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
        if let Some(file) = &self.shared.token_file {
            let token = std::fs::read_to_string(file)
                .map_err(|e| format!("reading the receiver token {}: {e}", file.display()))?;
            let value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))?;
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        let client = self.client();
        let (parts, body) = request.into_parts();
        let mut attempt = 1;
        loop {
            let mut again = Request::builder()
                .method(parts.method.clone())
                .uri(parts.uri.clone())
                .version(parts.version)
                .body(body.clone())?;
            *again.headers_mut() = parts.headers.clone();
            let response = client.send_bytes(again).await?;
            if attempt == ATTEMPTS || !response.headers().contains_key(NOT_LEADER_HEADER) {
                return Ok(response);
            }
            tracing::debug!(
                attempt,
                "an operator replica without the lease refused the report; sending it again"
            );
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::net::TcpListener;

    #[test]
    fn a_ca_without_certificates_is_refused_with_a_reason() {
        let err = trusting("not a certificate").expect_err("no certificate in it");
        assert!(err.contains("holds no certificate"), "{err}");
        let err = ReportClient::new(None, Some(""), Duration::from_secs(1))
            .expect_err("an empty CA is an error, not an empty trust store");
        assert!(err.contains("holds no certificate"), "{err}");
    }

    /// A self-signed certificate for 127.0.0.1 (its own CA), PEM, and an HTTPS server on a
    /// loopback port presenting it, answering every request with 200.
    fn https_server() -> Result<(String, String), Box<dyn std::error::Error>> {
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])?;
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der())?;
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)?,
        );
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("https://{}/", listener.local_addr()?);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let Ok(connection) = rustls::ServerConnection::new(config.clone()) else {
                    continue;
                };
                let mut tls = rustls::StreamOwned::new(connection, stream);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                // Up to the end of the request head (a handshake the client refused ends here).
                while !head.ends_with(b"\r\n\r\n") && tls.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let _ = tls.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                let _ = tls.flush();
            }
        });
        Ok((certified.cert.pem(), url))
    }

    #[test]
    fn a_published_ca_is_trusted_besides_the_one_at_creation()
    -> Result<(), Box<dyn std::error::Error>> {
        // The platform's roots need a process-wide provider (the pipeline installs ring).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (created_with, old_receiver) = https_server()?;
        let (published, new_receiver) = https_server()?;
        let (_, stranger) = https_server()?;
        let client = ReportClient::new(None, Some(&created_with), Duration::from_secs(5))?;
        let reaches = |url: &str| {
            client
                .client()
                .get(url)
                .send()
                .is_ok_and(|r| r.status() == 200)
        };
        assert!(reaches(&old_receiver));
        assert!(!reaches(&new_receiver), "the new CA is not trusted yet");

        let exporters_copy = client.clone();
        assert!(client.trust_published(&published)?);
        assert!(!client.trust_published(&published)?, "already trusted");
        assert!(
            !client.trust_published(&created_with)?,
            "trusted from the start"
        );
        assert!(exporters_copy.client().get(&new_receiver).send().is_ok());
        assert!(reaches(&old_receiver), "the CA at creation stays trusted");
        assert!(!reaches(&stranger), "nothing else is trusted");

        let err = client
            .trust_published("-----BEGIN CERTIFICATE-----\nnot base64")
            .expect_err("a broken CA");
        assert!(err.contains("CA"), "{err}");
        assert!(reaches(&new_receiver), "a broken CA changes nothing");

        // Reports to a collector of the user's (no CA at creation) take no published CA.
        let plain = ReportClient::new(None, None, Duration::from_secs(5))?;
        assert!(!plain.trust_published(&published)?);
        Ok(())
    }

    /// How many connections a test server took.
    type Connections = Arc<Mutex<usize>>;

    /// A plain HTTP server on a loopback port that answers its first `refusals` connections as
    /// an operator replica without the lease does (503, the header, connection closed), and
    /// later ones with 200; returns its URL and the count of connections it took.
    fn receiver_behind_a_service(
        refusals: usize,
    ) -> Result<(String, Connections), Box<dyn std::error::Error>> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}/v1/metrics", listener.local_addr()?);
        let connections = Arc::new(Mutex::new(0));
        let counted = connections.clone();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_lowercase();
                let length: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; length];
                let _ = stream.read_exact(&mut body);
                let seen = {
                    let mut n = counted.lock().unwrap_or_else(|e| e.into_inner());
                    *n += 1;
                    *n
                };
                let answer = if seen <= refusals {
                    format!(
                        "HTTP/1.1 503 Service Unavailable\r\n{NOT_LEADER_HEADER}: true\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    )
                } else {
                    "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into()
                };
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        Ok((url, connections))
    }

    fn export(client: &ReportClient, url: &str) -> Result<u16, Box<dyn std::error::Error>> {
        let request = Request::post(url).body(Bytes::from_static(b"report"))?;
        let response =
            futures::executor::block_on(client.send_bytes(request)).map_err(|e| e.to_string())?;
        Ok(response.status().as_u16())
    }

    #[test]
    fn a_report_refused_by_a_replica_without_the_lease_is_sent_again_on_a_new_connection()
    -> Result<(), Box<dyn std::error::Error>> {
        let client = ReportClient::new(None, None, Duration::from_secs(5))?;
        let (url, connections) = receiver_behind_a_service(3)?;
        assert_eq!(export(&client, &url)?, 200);
        assert_eq!(*connections.lock().unwrap_or_else(|e| e.into_inner()), 4);

        // Bounded: after ATTEMPTS refusals the exporter gets the refusal (and drops the export;
        // the next one carries the same cumulative counters).
        let (url, connections) = receiver_behind_a_service(usize::MAX)?;
        assert_eq!(export(&client, &url)?, 503);
        assert_eq!(
            *connections.lock().unwrap_or_else(|e| e.into_inner()),
            ATTEMPTS
        );
        Ok(())
    }
}
