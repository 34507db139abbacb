//! How the operator serves HTTP: the admin endpoints in plain HTTP, the webhook over TLS, the
//! report receiver in either (`--receiver-tls`), and the certificate they present.

use std::net::SocketAddr;

use crate::error::{Error, Result};

/// A certificate and key (PEM) for the webhook (and the report receiver, with
/// `--receiver-tls`), and the CA that the API server and the sidecars trust.
#[derive(Clone)]
pub struct TlsMaterial {
    /// Certificate chain, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
    /// CA certificate, PEM: the webhook configuration's caBundle, and what sidecars trust for the
    /// receiver.
    pub ca_pem: String,
}

impl TlsMaterial {
    /// A self-signed certificate for `names` (DNS names or IP addresses); it is its own CA.
    pub fn self_signed(names: Vec<String>) -> Result<Self> {
        let certified =
            rcgen::generate_simple_self_signed(names).map_err(|e| Error::Tls(e.to_string()))?;
        let cert_pem = certified.cert.pem();
        Ok(Self {
            ca_pem: cert_pem.clone(),
            cert_pem,
            key_pem: certified.signing_key.serialize_pem(),
        })
    }

    /// Certificate and key from files (for example a cert-manager Secret); the CA from a file or
    /// the certificate itself.
    pub fn from_files(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: Option<&std::path::Path>,
    ) -> Result<Self> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| Error::Tls(format!("{}: {e}", p.display())))
        };
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        let ca_pem = match ca {
            Some(ca) => read(ca)?,
            None => cert_pem.clone(),
        };
        Ok(Self {
            cert_pem,
            key_pem,
            ca_pem,
        })
    }
}

/// A listener on `addr`, ready for either server.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| Error::Serve(format!("bind {addr}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Serve(format!("bind {addr}: {e}")))?;
    Ok(listener)
}

/// Serves `router` in plain HTTP on `listener` until `shutdown` resolves.
pub async fn serve_plain(
    listener: std::net::TcpListener,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = listener.local_addr().ok();
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|e| Error::Serve(format!("listen {addr:?}: {e}")))?;
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Serve(format!("serve {addr:?}: {e}")))
}

/// Serves `router` over TLS with `tls` on `listener` until `shutdown` resolves (in-flight
/// requests get 10 s to finish).
pub async fn serve_tls(
    listener: std::net::TcpListener,
    tls: &TlsMaterial,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let config = axum_server::tls_rustls::RustlsConfig::from_pem(
        tls.cert_pem.clone().into_bytes(),
        tls.key_pem.clone().into_bytes(),
    )
    .await
    .map_err(|e| Error::Tls(e.to_string()))?;
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(listener, config)
        .map_err(|e| Error::Serve(e.to_string()))?
        .handle(handle.clone())
        .serve(router.into_make_service());
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result.map_err(|e| Error::Serve(e.to_string())),
        () = shutdown => {
            handle.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
            server.await.map_err(|e| Error::Serve(e.to_string()))
        }
    }
}
