//! Certificates and keys for the local control plane, generated fresh for every cluster.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use crate::error::{Error, Result};

/// The common name of the API server's front-proxy client certificate.
pub const FRONT_PROXY_CLIENT: &str = "front-proxy-client";

/// The files of a generated PKI, all PEM encoded.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA that signs the serving and client certificates (also the client CA).
    pub ca_cert: PathBuf,
    /// The CA's private key (the controller-manager signs CSRs with it).
    pub ca_key: PathBuf,
    /// The API server's serving certificate (127.0.0.1, ::1, localhost).
    pub serving_cert: PathBuf,
    /// Its private key.
    pub serving_key: PathBuf,
    /// The admin client certificate (CN=admin, O=system:masters).
    pub admin_cert: PathBuf,
    /// Its private key.
    pub admin_key: PathBuf,
    /// The client certificate the API server proxies to aggregated API servers with.
    pub front_proxy_cert: PathBuf,
    /// Its private key.
    pub front_proxy_key: PathBuf,
    /// The service-account token signing key.
    pub sa_key: PathBuf,
    /// Its public half, which the API server verifies tokens with.
    pub sa_pub: PathBuf,
    /// PEM text of the CA certificate, for kubeconfigs.
    pub ca_pem: String,
    /// The node's certificates (kubelet, kube-proxy, and the API server's client for kubelets).
    pub node: NodePki,
    /// PEM text of the admin certificate, for kubeconfigs.
    pub admin_cert_pem: String,
    /// PEM text of the admin key, for kubeconfigs.
    pub admin_key_pem: String,
}

/// Certificates of the real node (see [`crate::node`]), signed by the cluster's CA.
#[derive(Debug, Clone)]
pub struct NodePki {
    /// The kubelet's client certificate: `system:node:<name>` in `system:nodes`, as the Node
    /// authorizer and the NodeRestriction admission plugin expect.
    pub kubelet_client: (PathBuf, PathBuf),
    /// The kubelet's serving certificate, for the node's name and address.
    pub kubelet_serving: (PathBuf, PathBuf),
    /// kube-proxy's client certificate: `system:kube-proxy`, bound to `system:node-proxier`.
    pub kube_proxy_client: (PathBuf, PathBuf),
    /// The API server's client certificate for kubelets (logs, exec).
    pub apiserver_kubelet_client: (PathBuf, PathBuf),
}

/// The name of the real node, and so of its kubelet's identity.
pub const NODE_NAME: &str = "ttc-node";
/// The address of the real node: the gateway of its pod bridge (see [`crate::node`]).
pub const NODE_IP: &str = "10.244.0.1";
/// The `kubernetes` Service's address, the first of the service range.
pub const KUBERNETES_SERVICE_IP: &str = "10.0.0.1";

impl Pki {
    /// Generates a CA, a serving certificate, an admin client certificate and a service-account
    /// key pair, and writes them to `dir`.
    pub fn generate(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating directory", dir, e))?;

        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name = name("ttc-e2e-ca", None);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let ca_key_pem = ca_key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

        let mut serving = CertificateParams::new(
            [
                "localhost",
                "127.0.0.1",
                "::1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                KUBERNETES_SERVICE_IP,
                NODE_IP,
            ]
            .map(String::from)
            .to_vec(),
        )?;
        serving.distinguished_name = name("kube-apiserver", None);
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_key = KeyPair::generate()?;
        let serving_cert = serving.signed_by(&serving_key, &*ca)?;

        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin.distinguished_name = name("admin", Some("system:masters"));
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_key = KeyPair::generate()?;
        let admin_cert = admin.signed_by(&admin_key, &*ca)?;

        let mut front_proxy = CertificateParams::new(Vec::<String>::new())?;
        front_proxy.distinguished_name = name(FRONT_PROXY_CLIENT, None);
        front_proxy.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let front_proxy_key = KeyPair::generate()?;
        let front_proxy_cert = front_proxy.signed_by(&front_proxy_key, &*ca)?;

        let sa = KeyPair::generate()?;

        let node_name = format!("system:node:{NODE_NAME}");
        let node = NodePki {
            kubelet_client: (
                dir.join("kubelet-client.crt"),
                dir.join("kubelet-client.key"),
            ),
            kubelet_serving: (dir.join("kubelet.crt"), dir.join("kubelet.key")),
            kube_proxy_client: (dir.join("kube-proxy.crt"), dir.join("kube-proxy.key")),
            apiserver_kubelet_client: (
                dir.join("apiserver-kubelet-client.crt"),
                dir.join("apiserver-kubelet-client.key"),
            ),
        };
        let client = ExtendedKeyUsagePurpose::ClientAuth;
        let server = ExtendedKeyUsagePurpose::ServerAuth;
        for (files, common_name, organization, sans, usage) in [
            (
                &node.kubelet_client,
                node_name.as_str(),
                Some("system:nodes"),
                vec![],
                &client,
            ),
            (
                &node.kubelet_serving,
                NODE_NAME,
                None,
                vec![NODE_NAME.to_string(), NODE_IP.to_string()],
                &server,
            ),
            (
                &node.kube_proxy_client,
                "system:kube-proxy",
                None,
                vec![],
                &client,
            ),
            (
                &node.apiserver_kubelet_client,
                "kube-apiserver-kubelet-client",
                Some("system:masters"),
                vec![],
                &client,
            ),
        ] {
            let mut params = CertificateParams::new(sans)?;
            params.distinguished_name = name(common_name, organization);
            params.extended_key_usages = vec![usage.clone()];
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &*ca)?;
            write(&files.0, &cert.pem())?;
            write(&files.1, &key.serialize_pem())?;
        }

        let pki = Pki {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            serving_cert: dir.join("apiserver.crt"),
            serving_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            front_proxy_cert: dir.join("front-proxy-client.crt"),
            front_proxy_key: dir.join("front-proxy-client.key"),
            sa_key: dir.join("sa.key"),
            sa_pub: dir.join("sa.pub"),
            node,
            ca_pem: ca.pem(),
            admin_cert_pem: admin_cert.pem(),
            admin_key_pem: admin_key.serialize_pem(),
        };
        write(&pki.ca_cert, &pki.ca_pem)?;
        write(&pki.ca_key, &ca_key_pem)?;
        write(&pki.serving_cert, &serving_cert.pem())?;
        write(&pki.serving_key, &serving_key.serialize_pem())?;
        write(&pki.admin_cert, &pki.admin_cert_pem)?;
        write(&pki.admin_key, &pki.admin_key_pem)?;
        write(&pki.front_proxy_cert, &front_proxy_cert.pem())?;
        write(&pki.front_proxy_key, &front_proxy_key.serialize_pem())?;
        write(&pki.sa_key, &sa.serialize_pem())?;
        write(&pki.sa_pub, &sa.public_key_pem())?;
        Ok(pki)
    }
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(o) = organization {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|e| Error::io("writing", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_file_as_pem() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("creating temp dir", "/tmp", e))?;
        let pki = Pki::generate(dir.path())?;
        for path in [
            &pki.ca_cert,
            &pki.ca_key,
            &pki.serving_cert,
            &pki.serving_key,
            &pki.admin_cert,
            &pki.admin_key,
            &pki.front_proxy_cert,
            &pki.front_proxy_key,
            &pki.sa_key,
            &pki.sa_pub,
        ] {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
            assert!(
                text.starts_with("-----BEGIN "),
                "{} is not PEM",
                path.display()
            );
        }
        Ok(())
    }
}
