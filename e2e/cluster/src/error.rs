//! The one error type of the crate.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while starting, using or stopping the local control plane.
///
/// Errors about a component name it and the log file it writes, so that a failed start can be
/// diagnosed without rerunning it.
#[derive(thiserror::Error)]
pub enum Error {
    /// Neither a kubeconfig nor control-plane binaries were given to the test helper.
    #[error(
        "no Kubernetes control plane for the tests: set KUBECONFIG_FOR_TESTS to a kubeconfig, or \
         TTC_CONTROL_PLANE_BIN to the directory printed by e2e/controlplane/build.sh, or run the \
         tests through e2e/test.sh (which does both)"
    )]
    NoControlPlane,

    /// A binary the control plane needs is not in the binary directory.
    #[error(
        "{component} binary not found at {path}; run e2e/controlplane/build.sh and point \
         TTC_CONTROL_PLANE_BIN (or --bin-dir) at the directory it prints"
    )]
    MissingBinary {
        /// The component whose binary is missing.
        component: String,
        /// Where it was looked for.
        path: PathBuf,
    },

    /// A component could not be started at all.
    #[error("could not start {component} ({binary}): {source}; its log: {log}")]
    Spawn {
        /// The component that failed to start.
        component: String,
        /// The binary that was executed.
        binary: PathBuf,
        /// Its log file.
        log: PathBuf,
        /// Why the operating system refused.
        #[source]
        source: std::io::Error,
    },

    /// A component exited while it should have been running.
    #[error(
        "{component} exited unexpectedly ({status}); its log: {log}\n--- last lines ---\n{tail}"
    )]
    Exited {
        /// The component that exited.
        component: String,
        /// How it exited.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },

    /// A component did not become ready in time.
    #[error(
        "{component} was not ready after {waited:?} (last check: {last_check}); its log: {log}\n\
         --- last lines ---\n{tail}"
    )]
    NotReady {
        /// The component that is not ready.
        component: String,
        /// How long we waited.
        waited: Duration,
        /// What the last readiness check saw.
        last_check: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },

    /// A component did not stop when asked to.
    #[error("{component} (pid {pid}) did not stop: {reason}; its log: {log}")]
    Teardown {
        /// The component that would not stop.
        component: String,
        /// Its process id.
        pid: u32,
        /// What went wrong.
        reason: String,
        /// Its log file.
        log: PathBuf,
    },

    /// A file or directory could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("writing", "creating directory", ...).
        action: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// No free loopback port could be reserved.
    #[error("could not reserve a free port on 127.0.0.1: {0}")]
    Port(#[source] std::io::Error),

    /// Generating certificates or keys failed.
    #[error("generating the control plane's certificates: {0}")]
    Pki(#[from] rcgen::Error),

    /// A kubeconfig could not be loaded or turned into a client.
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig {
        /// The kubeconfig file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },

    /// A call to the Kubernetes API failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },

    /// A manifest could not be serialised.
    #[error("serialising {what}: {reason}")]
    Serialize {
        /// What was being serialised.
        what: &'static str,
        /// The serialiser's message.
        reason: String,
    },

    /// A cluster is already running in the state directory.
    #[error(
        "a cluster (pid {pid}) already runs in {state_dir}; stop it with `ttc-cluster down \
         --state-dir {state_dir}` or choose another --state-dir"
    )]
    AlreadyRunning {
        /// The state directory in use.
        state_dir: PathBuf,
        /// The process that holds it.
        pid: i32,
    },

    /// The state directory holds files that were not written by this tool.
    #[error(
        "{0} is not empty and was not created by ttc-cluster; refusing to wipe it (choose an \
         empty or new --state-dir)"
    )]
    ForeignStateDir(PathBuf),

    /// The shared test cluster failed to start earlier in this test process.
    #[error("the shared test cluster is unavailable: {0}")]
    SharedClusterUnavailable(String),

    /// A helper thread or runtime needed by the test helper could not be created.
    #[error("the real node: {0}")]
    Node(String),

    #[error("test helper: {0}")]
    Runtime(String),
}

/// Debug output is the message and its causes, because tests that return `Result` print errors
/// with `Debug`, and the multi-line messages (log tails) must stay readable there.
impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")?;
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            write!(f, "\ncaused by: {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// True when a component failed because its port was taken (by another process, between
    /// our picking the port and the component binding it).
    pub fn is_address_in_use(&self) -> bool {
        match self {
            Error::Exited { tail, .. } | Error::NotReady { tail, .. } => {
                tail.contains("address already in use")
            }
            _ => false,
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn kube(action: impl Into<String>, source: kube::Error) -> Self {
        Error::Kube {
            action: action.into(),
            source,
        }
    }
}
