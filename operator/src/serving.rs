//! How the operator serves HTTP: the admin endpoints in plain HTTP, the webhook over TLS, the
//! report receiver in either (`--receiver-tls`), and the certificate they present, reloaded
//! when its files change (cert-manager renews it in place), with the CA that sidecars trust
//! followed the same way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::watch;
use tracing::{info, warn};

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
    /// The certificate and key files it was read from, which servers watch for renewals
    /// (`None`: generated, never renewed).
    pub files: Option<(PathBuf, PathBuf)>,
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
            files: None,
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
            files: Some((cert.to_path_buf(), key.to_path_buf())),
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
/// requests get 10 s to finish). A certificate read from files is reloaded when they change
/// (checked every `check_every`): new connections get the renewed one.
pub async fn serve_tls(
    listener: std::net::TcpListener,
    tls: &TlsMaterial,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
    check_every: Duration,
) -> Result<()> {
    let config = RustlsConfig::from_pem(
        tls.cert_pem.clone().into_bytes(),
        tls.key_pem.clone().into_bytes(),
    )
    .await
    .map_err(|e| Error::Tls(e.to_string()))?;
    let _reloader = tls.files.clone().map(|files| {
        AbortOnDrop(tokio::spawn(reload_on_change(
            config.clone(),
            files,
            (tls.cert_pem.clone(), tls.key_pem.clone()),
            check_every,
        )))
    });
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

/// Aborts its task when dropped: the reloader lives exactly as long as its server.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every `check_every`, reads the certificate and key `files` and, when they differ from what
/// `config` serves (`served`), loads them into it. A pair that does not load (read half-way
/// through a renewal, or broken) is warned about and the served one kept; the next check
/// tries again.
async fn reload_on_change(
    config: RustlsConfig,
    (cert, key): (PathBuf, PathBuf),
    mut served: (String, String),
    check_every: Duration,
) {
    let mut ticks = file_checks(check_every);
    loop {
        ticks.tick().await;
        let (Ok(cert_pem), Ok(key_pem)) = (
            tokio::fs::read_to_string(&cert).await,
            tokio::fs::read_to_string(&key).await,
        ) else {
            warn!(cert = %cert.display(), "cannot read the TLS certificate files; serving the loaded certificate");
            continue;
        };
        if (&cert_pem, &key_pem) == (&served.0, &served.1) {
            continue;
        }
        match config
            .reload_from_pem(cert_pem.clone().into_bytes(), key_pem.clone().into_bytes())
            .await
        {
            Ok(()) => {
                info!(cert = %cert.display(), "TLS certificate reloaded");
                served = (cert_pem, key_pem);
            }
            Err(e) => warn!(
                cert = %cert.display(),
                error = %e,
                "the changed TLS certificate does not load; serving the previous one"
            ),
        }
    }
}

/// The CA (PEM) in `file`, first `loaded`, read again every `check_every` for as long as a
/// receiver of it lives: the sidecars' trust follows a CA change without an operator restart
/// (new pods are injected with the current CA, running ones read it from their policy's
/// status). A file that cannot be read or holds no certificate is warned about and the CA
/// kept.
pub fn follow_ca_file(
    file: PathBuf,
    loaded: String,
    check_every: Duration,
) -> watch::Receiver<String> {
    let (current, followed) = watch::channel(loaded);
    tokio::spawn(async move {
        let mut ticks = file_checks(check_every);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = current.closed() => return,
            }
            let pem = match tokio::fs::read_to_string(&file).await {
                Ok(pem) => pem,
                Err(e) => {
                    warn!(file = %file.display(), error = %e, "cannot read the CA file; keeping the loaded CA");
                    continue;
                }
            };
            if pem == *current.borrow() {
                continue;
            }
            if !holds_certificates(&pem) {
                warn!(file = %file.display(), "the changed CA file holds no PEM certificate; keeping the loaded CA");
                continue;
            }
            info!(file = %file.display(), "CA reloaded; new sidecars get it, running ones through their policy's status");
            current.send_replace(pem);
        }
    });
    followed
}

/// Ticks every `period` for checks of files just read: the first one `period` from now, and a
/// late one delayed rather than made up.
fn file_checks(period: Duration) -> tokio::time::Interval {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

/// Whether `pem` holds at least one certificate and nothing unreadable.
fn holds_certificates(pem: &str) -> bool {
    let certificates: std::result::Result<Vec<_>, _> =
        CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    certificates.is_ok_and(|c| !c.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, tls: &TlsMaterial) -> std::io::Result<()> {
        std::fs::write(dir.join("tls.crt"), &tls.cert_pem)?;
        std::fs::write(dir.join("tls.key"), &tls.key_pem)
    }

    /// A client that trusts `ca` alone, with a new connection (handshake) per request.
    fn trusting(ca: &str) -> reqwest::Result<reqwest::Client> {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?)
            .build()
    }

    #[tokio::test]
    async fn a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_not()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir()?;
        let names = || vec!["127.0.0.1".to_string()];
        let (old, new) = (
            TlsMaterial::self_signed(names())?,
            TlsMaterial::self_signed(names())?,
        );
        write(dir.path(), &old)?;
        let tls = TlsMaterial::from_files(
            &dir.path().join("tls.crt"),
            &dir.path().join("tls.key"),
            None,
        )?;
        let listener = bind("127.0.0.1:0".parse()?)?;
        let url = format!("https://{}/", listener.local_addr()?);
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let server = tokio::spawn(async move {
            serve_tls(
                listener,
                &tls,
                router,
                std::future::pending(),
                Duration::from_millis(50),
            )
            .await
        });
        let (trusts_old, trusts_new) = (trusting(&old.ca_pem)?, trusting(&new.ca_pem)?);
        assert_eq!(trusts_old.get(&url).send().await?.text().await?, "ok");
        assert!(
            trusts_new.get(&url).send().await.is_err(),
            "not renewed yet"
        );

        // A half-written renewal does not load: the old certificate stays.
        std::fs::write(dir.path().join("tls.crt"), &new.cert_pem[..40])?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(trusts_old.get(&url).send().await?.text().await?, "ok");

        write(dir.path(), &new)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while trusts_new.get(&url).send().await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the renewed certificate was never served"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            trusts_old.get(&url).send().await.is_err(),
            "the old certificate is gone"
        );
        server.abort();
        Ok(())
    }

    #[tokio::test]
    async fn a_changed_ca_file_is_followed_and_a_broken_one_is_not()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("ca.crt");
        let names = || vec!["127.0.0.1".to_string()];
        let (old, new) = (
            TlsMaterial::self_signed(names())?,
            TlsMaterial::self_signed(names())?,
        );
        std::fs::write(&file, &old.ca_pem)?;
        let mut followed =
            follow_ca_file(file.clone(), old.ca_pem.clone(), Duration::from_millis(20));

        // Half a certificate, or none, is not taken.
        std::fs::write(&file, &new.ca_pem[..60])?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::fs::write(&file, "")?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*followed.borrow_and_update(), old.ca_pem);

        std::fs::write(&file, &new.ca_pem)?;
        tokio::time::timeout(Duration::from_secs(10), followed.changed()).await??;
        assert_eq!(*followed.borrow(), new.ca_pem);
        Ok(())
    }
}
