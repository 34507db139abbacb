//! The policy a pod runs under: the bounds and strategy of test-time compute (from the
//! InferencePolicy's `spec.ttc`, mapped at the sidecar's one seam), and the sidecar's own
//! settings.
//!
//! Policies are validated where they enter, by the InferencePolicy's rules (the API server for
//! the cluster, the sidecar for a standalone policy file); the core does not repeat those rules.
//! It clamps what it reads so that an unchecked policy cannot break it: `maxSamples` 0 counts as
//! 1, a minimum above its maximum as the maximum, and BestOfN without a verifier votes instead.

use serde::{Deserialize, Serialize};

use crate::budget::BudgetConfig;
use crate::difficulty::DepthValueConfig;
use crate::verifier::{VerifierError, VerifierSpec};
use crate::vote::VoteWeighting;
use crate::windows::WindowConfig;

/// How a request's depth is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum TtcStrategy {
    /// Vote over samples, stopping early on agreement.
    MajorityVote,
    /// Sample until the verifier accepts an answer.
    BestOfN,
    /// One answer with a budget of reasoning tokens.
    ReasoningBudget,
    /// BestOfN with a verifier, else ReasoningBudget for a reasoning model, else MajorityVote.
    #[default]
    Adaptive,
}

/// The test-time compute limits and strategy of a pod's policy. Field for field the
/// InferencePolicy's `spec.ttc`, with the same defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct TtcPolicy {
    /// The strategy.
    pub strategy: TtcStrategy,
    /// Fewest samples per request.
    pub min_samples: u32,
    /// Most samples per request.
    pub max_samples: u32,
    /// Fewest reasoning tokens per sample under ReasoningBudget.
    pub min_reasoning_tokens: u32,
    /// Most reasoning tokens per sample under ReasoningBudget (0: Adaptive never picks it).
    pub max_reasoning_tokens: u32,
    /// Agreement at which a vote stops early.
    pub early_stop_agreement: f64,
    /// Confidence at which a vote stops early, even on its greedy sample (1: off).
    pub stop_confidence: f64,
    /// Whether depth follows estimated difficulty.
    pub difficulty_aware: bool,
    /// Share of answers extra depth must make right for a class to keep paying for it.
    pub min_depth_gain: f64,
    /// How candidates are checked.
    pub verifier: Option<VerifierSpec>,
}

impl Default for TtcPolicy {
    fn default() -> Self {
        Self {
            strategy: TtcStrategy::Adaptive,
            min_samples: 1,
            max_samples: 8,
            min_reasoning_tokens: 0,
            max_reasoning_tokens: 1024,
            early_stop_agreement: 0.75,
            stop_confidence: 0.95,
            difficulty_aware: true,
            min_depth_gain: 0.03,
            verifier: None,
        }
    }
}

impl TtcPolicy {
    /// Most samples, at least one.
    pub(crate) fn sample_limit(&self) -> usize {
        self.max_samples.max(1) as usize
    }

    /// Fewest samples, at least one and at most [`Self::sample_limit`].
    pub(crate) fn sample_floor(&self) -> usize {
        (self.min_samples.max(1) as usize).min(self.sample_limit())
    }

    /// Fewest reasoning tokens, at most the most.
    pub(crate) fn reasoning_floor(&self) -> usize {
        self.min_reasoning_tokens.min(self.max_reasoning_tokens) as usize
    }
}

/// Sidecar-side settings of test-time compute (not part of the policy).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TtcOptions {
    /// Samples per window (early stopping looks at the votes after each window).
    pub window: usize,
    /// How votes are weighted.
    pub weighting: VoteWeighting,
    /// The budget controller's settings.
    pub budget: BudgetConfig,
    /// The depth-value learner's settings.
    pub depth_value: DepthValueConfig,
    /// When to draw a request's samples as one batch instead of in windows.
    #[serde(default)]
    pub windows: WindowConfig,
}

impl Default for TtcOptions {
    fn default() -> Self {
        Self {
            window: 2,
            weighting: VoteWeighting::Uniform,
            budget: BudgetConfig::default(),
            depth_value: DepthValueConfig::default(),
            windows: WindowConfig::default(),
        }
    }
}

/// Why a policy cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum TtcError {
    /// The verifier cannot be built (a regex that does not compile, a schema that is not one,
    /// an HTTP verifier with no transport).
    #[error(transparent)]
    Verifier(#[from] VerifierError),
}
