//! Errors of the link to the operator.

/// What can go wrong setting up the link to the operator. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// An environment variable the operator injects is missing or empty.
    #[error(
        "environment variable {variable} is not set: the operator sets it on injected sidecars; \
         set it by hand when running the sidecar outside an injected pod"
    )]
    MissingEnv {
        /// The variable's name.
        variable: &'static str,
    },
}
