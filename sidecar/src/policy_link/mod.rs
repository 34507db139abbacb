//! The sidecar's link to the operator: who this pod is, what its policy allows it, and what it
//! reports back.
//!
//! - [`identity`]: the pod and policy names the operator injects as environment variables.
//! - [`view`]: this pod's allocation and the policy's TTC limits ([`PolicyView`]), pure.
//! - [`watch`]: a read-only, self-healing watch of the one policy, published on a
//!   `tokio::sync::watch` channel.
//! - [`usage`]: lock-free cumulative counters of the energy, requests and samples spent.
//! - [`reporter`]: the loop that posts those counters to the operator's report receiver.
//!
//! Wiring, once per process:
//!
//! ```no_run
//! # async fn wire(client: kube::Client) -> Result<(), ttc_sidecar::policy_link::LinkError> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tokio_util::sync::CancellationToken;
//! use ttc_sidecar::policy_link::{
//!     PodIdentity, UsageCounters, report_endpoint_from_env, report_source, run_reporter,
//!     watch_policy,
//! };
//!
//! let identity = PodIdentity::from_env()?;
//! let policy = watch_policy(client, identity.clone());
//! let counters = Arc::new(UsageCounters::new());
//! let shutdown = CancellationToken::new();
//! let reporter = tokio::spawn(run_reporter(
//!     report_endpoint_from_env()?,
//!     identity,
//!     counters.clone(),
//!     report_source(ttc_energy::EnergySource::Estimate),
//!     Duration::from_secs(10),
//!     shutdown.clone(),
//! ));
//! // Per request: counters.record_request(joules, samples); read policy.borrow() for the budget.
//! shutdown.cancel();
//! let _delivery = reporter.await;
//! # Ok(()) }
//! ```

pub mod error;
pub mod identity;
pub mod reporter;
pub mod usage;
pub mod view;
pub mod watch;

pub use error::LinkError;
pub use identity::PodIdentity;
pub use reporter::{
    DEFAULT_REPORT_INTERVAL, DeliveryCounts, REPORT_TIMEOUT, report_endpoint_from_env,
    report_source, report_url, run_reporter,
};
pub use usage::{UsageCounters, UsageTotals};
pub use view::PolicyView;
pub use watch::watch_policy;
