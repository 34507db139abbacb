//! Which governed pods count as silent: their sidecar should be reporting energy and is not.

use std::time::Duration;

/// What the receiver has heard from one governed pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporting {
    /// Reports within the budget window.
    Fresh,
    /// Reports, but none within the staleness limit.
    Stale,
    /// Never a report.
    Never {
        /// Whether the pod was injected with this policy's sidecar (a pod injected for another
        /// policy, or not injected, is not expected to report to this one).
        injected_here: bool,
        /// How long ago the pod was created, when known.
        age: Option<Duration>,
    },
}

impl Reporting {
    /// Silent: its reports went stale, or it carries this policy's sidecar, is older than
    /// `stale_after` and has never reported. A young pod is given `stale_after` to start.
    pub fn is_silent(self, stale_after: Duration) -> bool {
        match self {
            Self::Fresh => false,
            Self::Stale => true,
            Self::Never { injected_here, age } => {
                injected_here && age.is_some_and(|a| a > stale_after)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_reports_and_old_injected_pods_that_never_reported_are_silent() {
        let limit = Duration::from_secs(60);
        let never = |injected_here, secs: Option<u64>| Reporting::Never {
            injected_here,
            age: secs.map(Duration::from_secs),
        };
        assert!(!Reporting::Fresh.is_silent(limit));
        assert!(Reporting::Stale.is_silent(limit));
        assert!(never(true, Some(61)).is_silent(limit));
        assert!(
            !never(true, Some(60)).is_silent(limit),
            "given the limit to start"
        );
        assert!(!never(true, None).is_silent(limit));
        assert!(
            !never(false, Some(3600)).is_silent(limit),
            "another policy's pod"
        );
    }
}
