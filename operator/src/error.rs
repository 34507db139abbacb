//! The operator's error type.

/// Everything that can go wrong while reconciling, admitting or receiving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API failed; usually transient.
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),

    /// The policy cannot be acted on until someone changes it.
    #[error("invalid InferencePolicy {policy}: {reason}")]
    InvalidPolicy {
        /// `namespace/name` of the policy.
        policy: String,
        /// What is wrong and what to change.
        reason: String,
    },

    /// An object lacks metadata the operator needs (name or namespace).
    #[error("object without {0}")]
    MissingMetadata(&'static str),

    /// A status or patch failed to serialize.
    #[error("serialization failed: {0}")]
    Serialization(#[from] serde_json::Error),

    /// A sidecar report could not be decoded.
    #[error("malformed energy report: {0}")]
    MalformedReport(String),

    /// TLS material could not be generated or loaded.
    #[error("TLS setup failed: {0}")]
    Tls(String),

    /// An HTTP server could not bind or failed.
    #[error("HTTP server failed: {0}")]
    Serve(String),

    /// Leader election could not start.
    #[error("leader election failed: {0}")]
    LeaderElection(String),

    /// The operator's configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    /// A short, bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::InvalidPolicy { .. } => "invalid_policy",
            Self::MissingMetadata(_) => "missing_metadata",
            Self::Serialization(_) => "serialization",
            Self::MalformedReport(_) => "malformed_report",
            Self::Tls(_) => "tls",
            Self::Serve(_) => "serve",
            Self::LeaderElection(_) => "leader_election",
            Self::Config(_) => "config",
        }
    }

    /// Whether retrying without a change to the object can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Kube(_))
    }
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
