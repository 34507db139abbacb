//! Kubeconfig files: writing the admin kubeconfig of a local cluster, and turning any
//! kubeconfig into a [`kube::Client`].

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::error::{Error, Result};
use crate::pki::Pki;

/// The context (and cluster and user) name in kubeconfigs written by this crate.
pub const CONTEXT: &str = "ttc-e2e";

/// Writes an admin kubeconfig for the API server at `server` with the certificates of `pki`.
pub fn write_admin(path: &Path, server: &str, pki: &Pki) -> Result<()> {
    write(
        path,
        server,
        &pki.ca_pem,
        &pki.admin_cert_pem,
        &pki.admin_key_pem,
    )
}

/// Writes a kubeconfig for the API server at `server` (trusting `ca_pem`) that authenticates
/// with a client certificate and key read from `cert_and_key` (a node component's identity).
pub fn write_client(
    path: &Path,
    server: &str,
    pki: &Pki,
    cert_and_key: &(std::path::PathBuf, std::path::PathBuf),
) -> Result<()> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| Error::io("reading", p, e));
    write(
        path,
        server,
        &pki.ca_pem,
        &read(&cert_and_key.0)?,
        &read(&cert_and_key.1)?,
    )
}

fn write(path: &Path, server: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<()> {
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": CONTEXT,
            "cluster": {
                "server": server,
                "certificate-authority-data": base64(ca_pem),
            },
        }],
        "users": [{
            "name": CONTEXT,
            "user": {
                "client-certificate-data": base64(cert_pem),
                "client-key-data": base64(key_pem),
            },
        }],
        "contexts": [{
            "name": CONTEXT,
            "context": { "cluster": CONTEXT, "user": CONTEXT },
        }],
        "current-context": CONTEXT,
    });
    let text = serde_yaml::to_string(&kubeconfig).map_err(|e| Error::Serialize {
        what: "kubeconfig",
        reason: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(|e| Error::io("writing", path, e))
}

/// Builds a client from the kubeconfig file at `path` (its current context).
pub async fn client(path: &Path) -> Result<kube::Client> {
    install_crypto_provider();
    let bad = |reason: String| Error::Kubeconfig {
        path: path.into(),
        reason,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| bad(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| bad(e.to_string()))
}

/// rustls needs a process-wide crypto provider when more than one is compiled in.
fn install_crypto_provider() {
    // An error means one is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn base64(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}
