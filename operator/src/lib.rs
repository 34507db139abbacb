//! The ttc-operator: reconciles InferencePolicies, injects the TTC sidecar, receives the sidecars'
//! energy reports and splits budgets.
//!
//! Layers, from the inside out:
//! - [`domain`]: pure decisions on plain values (selection, allocation, cluster split, injection
//!   patch, status), unit-tested without an API server.
//! - [`reports`]: the per-pod history of energy reports, with staleness.
//! - [`controller`], [`webhook`], [`receiver`], [`admin`]: the Kubernetes and HTTP edges;
//!   [`serving`]: how they are served (plain HTTP or TLS).
//! - [`watches`]: how the API server is watched and what a watch triggers.
//! - [`run`]: wiring of caches, leader election and servers.

pub mod admin;
pub mod controller;
pub mod domain;
pub mod error;
pub mod metrics;
pub mod receiver;
pub mod report_auth;
pub mod reports;
pub mod run;
pub mod serving;
pub mod watches;
pub mod webhook;

pub use error::{Error, Result};
