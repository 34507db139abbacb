//! What to evaluate.

use serde::{Deserialize, Serialize};

use ttc_core::TtcOptions;

use crate::EvalError;
use crate::tasks::TaskFamily;

/// What to evaluate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EvalSettings {
    /// Task families, in report order.
    pub families: Vec<TaskFamily>,
    /// Items per family.
    pub items: usize,
    /// Fixed vote depths (samples per request).
    pub depths: Vec<usize>,
    /// Seed of the items and of the samples.
    pub seed: u64,
    /// Sampling temperature of every configuration but greedy.
    pub temperature: f32,
    /// Token limit per sample; `None`: 32, or 64 for JSON answers.
    pub max_tokens: Option<usize>,
    /// Most samples of the early-stop, adaptive and best-of-N configurations.
    pub max_samples: usize,
    /// Early-stop agreement threshold.
    pub early_stop_agreement: f64,
    /// Samples per window of the early-stop, adaptive and best-of-N configurations.
    #[serde(default = "default_window")]
    pub window: usize,
}

fn default_window() -> usize {
    TtcOptions::default().window
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            families: vec![
                TaskFamily::SingleDigitAddition,
                TaskFamily::LargerOfTwo,
                TaskFamily::StructuredOutput,
            ],
            items: 20,
            depths: vec![1, 4, 8],
            seed: 7,
            temperature: 0.7,
            max_tokens: None,
            max_samples: 8,
            early_stop_agreement: 0.75,
            window: default_window(),
        }
    }
}

impl EvalSettings {
    /// The depths, sorted and without repeats; an error when the settings cannot produce an
    /// evaluation.
    pub fn checked_depths(&self) -> Result<Vec<usize>, EvalError> {
        if self.families.is_empty() || self.items == 0 || self.depths.is_empty() {
            return Err(EvalError::Settings(
                "at least one family, one item and one depth are needed".into(),
            ));
        }
        if self.depths.contains(&0) || self.max_samples == 0 {
            return Err(EvalError::Settings(
                "depths and max samples must be at least 1".into(),
            ));
        }
        let mut depths = self.depths.clone();
        depths.sort_unstable();
        depths.dedup();
        Ok(depths)
    }
}
