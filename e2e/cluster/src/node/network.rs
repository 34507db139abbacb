//! The node's pod network: a bridge of its own with the gateway address, the CNI configuration
//! that puts every pod on it (bridge + host-local), and a guard that keeps pod traffic on this
//! machine.
//!
//! Pods live in network namespaces that containerd creates for them through CNI; the bridge and
//! the gateway address live in this machine's namespace, so the API server reaches webhooks at
//! pod addresses and pods reach the API server at the gateway. Pod traffic may be forwarded
//! (kube-proxy's Service rules route a Service address back onto the bridge), so forwarding is
//! switched on while the node runs, and a FORWARD rule drops whatever a pod sends towards any
//! other interface: nothing leaves this machine.

use std::path::Path;

use serde_json::json;

use crate::error::{Error, Result};
use crate::process::run;

/// The pod network of the node.
#[derive(Debug)]
pub struct PodNetwork {
    bridge: String,
    ip_forward_before: Option<String>,
    guard: Vec<String>,
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

impl PodNetwork {
    /// Creates bridge `bridge` holding `gateway` (an address with its prefix length, e.g.
    /// `10.244.0.1/24`) for the pods of `cidr`, and writes the CNI configuration into
    /// `cni_conf_dir` (host-local keeps its leases in `ipam_dir`). A bridge of that name left by
    /// a node that was killed is removed first.
    pub fn create(
        bridge: &str,
        gateway: &str,
        cidr: &str,
        cni_conf_dir: &Path,
        ipam_dir: &Path,
    ) -> Result<Self> {
        if Path::new("/sys/class/net").join(bridge).exists() {
            tracing::warn!("removing bridge {bridge} left by an earlier node");
            run("ip", &["link", "delete", bridge])?;
        }
        run("ip", &["link", "add", bridge, "type", "bridge"])?;
        let mut network = PodNetwork {
            bridge: bridge.into(),
            ip_forward_before: None,
            guard: Vec::new(),
        };
        run("ip", &["addr", "add", gateway, "dev", bridge])?;
        run("ip", &["link", "set", bridge, "up"])?;

        let guard = [
            "FORWARD",
            "-s",
            cidr,
            "!",
            "-o",
            bridge,
            "-m",
            "comment",
            "--comment",
            "ttc-node: pod traffic stays on this machine",
            "-j",
            "DROP",
        ]
        .map(String::from)
        .to_vec();
        let mut insert = vec!["-I".to_string()];
        insert.extend(guard.iter().cloned());
        run(
            "iptables",
            &insert.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        network.guard = guard;

        let before =
            std::fs::read_to_string(IP_FORWARD).map_err(|e| Error::io("reading", IP_FORWARD, e))?;
        std::fs::write(IP_FORWARD, "1").map_err(|e| Error::io("writing", IP_FORWARD, e))?;
        network.ip_forward_before = Some(before.trim().to_string());

        let gateway_ip = gateway.split('/').next().unwrap_or(gateway);
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "ttc-pods",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": true,
                    // No masquerading: pods have no way out of this machine.
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": cidr, "gateway": gateway_ip}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": ipam_dir,
                    }
                },
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        });
        std::fs::create_dir_all(cni_conf_dir)
            .map_err(|e| Error::io("creating directory", cni_conf_dir, e))?;
        let file = cni_conf_dir.join("10-ttc-pods.conflist");
        let text = serde_json::to_string_pretty(&conflist).map_err(|e| Error::Serialize {
            what: "the CNI configuration",
            reason: e.to_string(),
        })?;
        std::fs::write(&file, text).map_err(|e| Error::io("writing", &file, e))?;
        Ok(network)
    }
}

/// Removes the chains the kubelet creates and never removes (its canaries in every table, and
/// KUBE-FIREWALL, which drops packets to 127.0.0.0/8 from elsewhere), for both IP versions.
/// Best effort: what is not there is skipped.
pub(crate) fn remove_kubelet_rules() {
    for program in ["iptables", "ip6tables"] {
        for chain in ["INPUT", "OUTPUT"] {
            while run(program, &["-D", chain, "-j", "KUBE-FIREWALL"]).is_ok() {}
        }
        for table in ["filter", "nat", "mangle"] {
            for chain in ["KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"] {
                if run(program, &["-t", table, "-F", chain]).is_ok() {
                    let _ = run(program, &["-t", table, "-X", chain]);
                }
            }
        }
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        if let Some(before) = self.ip_forward_before.take()
            && let Err(e) = std::fs::write(IP_FORWARD, &before)
        {
            tracing::warn!("restoring {IP_FORWARD} to {before}: {e}");
        }
        if !self.guard.is_empty() {
            let mut delete = vec!["-D".to_string()];
            delete.extend(self.guard.iter().cloned());
            if let Err(e) = run(
                "iptables",
                &delete.iter().map(String::as_str).collect::<Vec<_>>(),
            ) {
                tracing::warn!("{e}");
            }
        }
        if let Err(e) = run("ip", &["link", "delete", &self.bridge]) {
            tracing::warn!("{e}");
        }
    }
}
