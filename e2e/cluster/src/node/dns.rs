//! The cluster's DNS for pods on the real node: `<service>.<namespace>.svc.<domain>` resolves to
//! the Service's cluster IP (which kube-proxy routes), every other name is answered NXDOMAIN.
//! Nothing is forwarded anywhere: pods have no way to names outside the cluster.
//!
//! A small UDP responder stands in for CoreDNS (which is not built here): it answers A queries
//! from a watch of the Services, as CoreDNS's `kubernetes` plugin does for cluster IPs.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// The cluster domain the kubelet writes into pods' search path.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const RCODE_NXDOMAIN: u16 = 3;
const RCODE_FORMERR: u16 = 1;
const TTL_SECONDS: u32 = 5;

/// A running responder; stopped when dropped.
#[derive(Debug)]
pub struct ClusterDns {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ClusterDns {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl ClusterDns {
    /// Answers on `addr` (UDP) from the Services `client` sees.
    pub async fn start(client: Client, addr: SocketAddr) -> Result<Self> {
        let socket = UdpSocket::bind(addr)
            .await
            .map_err(|e| Error::Node(format!("binding the cluster DNS to {addr}: {e}")))?;
        let (store, writer) = reflector::store::<Service>();
        let services: Api<Service> = Api::all(client);
        let watch = tokio::spawn(async move {
            let stream =
                reflector::reflector(writer, watcher(services, watcher::Config::default()))
                    .default_backoff()
                    .touched_objects();
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    tracing::debug!("cluster DNS: watching Services: {e}");
                }
            }
        });
        let socket = Arc::new(socket);
        let serve = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let reply = answer(&buf[..len], |name| lookup(&store, name));
                if let Some(reply) = reply {
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        Ok(ClusterDns {
            tasks: vec![watch, serve],
        })
    }
}

/// What a name is in the cluster: a Service's cluster IP, a Service without one (headless), or
/// nothing.
#[derive(Debug, PartialEq)]
pub(crate) enum Found {
    Address(Ipv4Addr),
    NoAddress,
    Nothing,
}

fn lookup(store: &Store<Service>, name: &str) -> Found {
    let suffix = format!(".svc.{CLUSTER_DOMAIN}");
    let Some(rest) = name.strip_suffix(&suffix) else {
        return Found::Nothing;
    };
    let Some((service, namespace)) = rest.split_once('.') else {
        return Found::Nothing;
    };
    if namespace.contains('.') {
        return Found::Nothing;
    }
    let Some(found) = store.get(&ObjectRef::new(service).within(namespace)) else {
        return Found::Nothing;
    };
    let ip = found.spec.as_ref().and_then(|s| s.cluster_ip.as_deref());
    match ip.and_then(|ip| ip.parse().ok()) {
        Some(address) => Found::Address(address),
        None => Found::NoAddress,
    }
}

/// The reply to `query`, or `None` for a packet that is no query at all.
pub(crate) fn answer(query: &[u8], lookup: impl Fn(&str) -> Found) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let id = &query[..2];
    let recursion_desired = u16::from(query[2] & 0x01);
    let questions = u16::from_be_bytes([query[4], query[5]]);
    let reply = |rcode: u16, question: &[u8], answer: Option<Ipv4Addr>| {
        // QR, AA, RD copied, RA clear: authoritative for the cluster domain, recursive for none.
        let flags: u16 = 0x8000 | 0x0400 | (recursion_desired << 8) | rcode;
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(id);
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&u16::from(!question.is_empty()).to_be_bytes());
        out.extend_from_slice(&u16::from(answer.is_some()).to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(question);
        if let Some(ip) = answer {
            out.extend_from_slice(&[0xc0, 12]); // the name: a pointer to the question's
            out.extend_from_slice(&TYPE_A.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
            out.extend_from_slice(&TTL_SECONDS.to_be_bytes());
            out.extend_from_slice(&4u16.to_be_bytes());
            out.extend_from_slice(&ip.octets());
        }
        out
    };
    if questions != 1 {
        return Some(reply(RCODE_FORMERR, &[], None));
    }
    let Some((name, end)) = read_name(query, 12) else {
        return Some(reply(RCODE_FORMERR, &[], None));
    };
    if query.len() < end + 4 {
        return Some(reply(RCODE_FORMERR, &[], None));
    }
    let question = &query[12..end + 4];
    let qtype = u16::from_be_bytes([query[end], query[end + 1]]);
    let qclass = u16::from_be_bytes([query[end + 2], query[end + 3]]);
    match lookup(&name) {
        Found::Address(ip) if qtype == TYPE_A && qclass == CLASS_IN => {
            Some(reply(0, question, Some(ip)))
        }
        // The name exists, with no record of the type asked (AAAA, say): NODATA.
        Found::Address(_) | Found::NoAddress => Some(reply(0, question, None)),
        Found::Nothing => Some(reply(RCODE_NXDOMAIN, question, None)),
    }
}

/// The lowercase dotted name at `at` (no compression: queries carry none) and the offset after
/// it.
fn read_name(packet: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*packet.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        let label = packet.get(at..at + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        at += len;
    }
    Some((labels.join("."), at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    fn cluster(name: &str) -> Found {
        match name {
            "ttc-operator.ttc-system.svc.cluster.local" => {
                Found::Address(Ipv4Addr::new(10, 0, 0, 7))
            }
            "headless.ns.svc.cluster.local" => Found::NoAddress,
            _ => Found::Nothing,
        }
    }

    #[test]
    fn a_service_name_resolves_to_its_cluster_ip() {
        let q = query("TTC-operator.ttc-system.svc.cluster.local", TYPE_A);
        let r = answer(&q, cluster).unwrap();
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[3] & 0x0f, 0, "rcode");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one answer");
        assert_eq!(&r[r.len() - 4..], &[10, 0, 0, 7]);
        assert_eq!(&r[12..q.len()], &q[12..], "the question is echoed");
    }

    #[test]
    fn other_names_are_nxdomain_and_other_types_nodata() {
        let r = answer(&query("example.com", TYPE_A), cluster).unwrap();
        assert_eq!(r[3] & 0x0f, 3);
        let r = answer(
            &query("ttc-operator.ttc-system.svc.cluster.local", 28),
            cluster,
        )
        .unwrap();
        assert_eq!((r[3] & 0x0f, r[7]), (0, 0));
        let r = answer(&query("headless.ns.svc.cluster.local", TYPE_A), cluster).unwrap();
        assert_eq!((r[3] & 0x0f, r[7]), (0, 0));
    }

    #[test]
    fn malformed_packets_get_formerr_or_nothing() {
        assert!(answer(&[1, 2, 3], cluster).is_none());
        let mut truncated = query("a.b", TYPE_A);
        truncated.truncate(16);
        assert_eq!(answer(&truncated, cluster).unwrap()[3] & 0x0f, 1);
        let mut response = query("a.b", TYPE_A);
        response[2] |= 0x80;
        assert!(answer(&response, cluster).is_none());
    }
}
