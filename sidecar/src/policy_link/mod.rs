//! The sidecar's link to the operator: who this pod is and what its policy allows it.
//!
//! - [`identity`]: the pod and policy names the operator injects as environment variables.
//! - [`view`]: this pod's allocation and the policy's TTC limits ([`PolicyView`]), pure.
//! - [`watch`]: a read-only, self-healing watch of the one policy, published on a
//!   `tokio::sync::watch` channel.
//!
//! What the sidecar spends reaches the operator through the OTLP metrics export (`ttc-telemetry`),
//! whose endpoint the operator injects.
//!
//! ```no_run
//! # async fn wire(client: kube::Client) -> Result<(), ttc_sidecar::policy_link::LinkError> {
//! use ttc_sidecar::policy_link::{PodIdentity, watch_policy};
//!
//! let identity = PodIdentity::from_env()?;
//! let mut policy = watch_policy(client, identity);
//! // Read policy.borrow() for the TTC limits and this pod's allocation.
//! # let _ = policy.changed().await;
//! # Ok(()) }
//! ```

pub mod error;
pub mod identity;
pub mod view;
pub mod watch;

pub use error::LinkError;
pub use identity::PodIdentity;
pub use view::PolicyView;
pub use watch::watch_policy;
