//! What each configuration got: per-item records, accuracies with intervals, pass@k, and the
//! paired comparisons between configurations.

use serde::{Deserialize, Serialize};
use ttc_core::StopReason;
use ttc_energy::EnergySource;

use crate::configuration::Configuration;
use crate::settings::EvalSettings;
use crate::stats::{Proportion, mean, pass_at_k, wilson_95};
use crate::tasks::TaskFamily;

/// One item answered under one configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemRecord {
    /// The item's id (`family/index`).
    pub item_id: String,
    /// The expected answer.
    pub expected: String,
    /// The chosen answer (normalised), if any.
    pub answer: Option<String>,
    /// Whether the chosen answer is right.
    pub correct: bool,
    /// Samples drawn.
    pub samples: usize,
    /// Samples whose own answer is right.
    pub correct_samples: usize,
    /// Whether the verifier accepted the chosen sample (best-of-N only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// Joules of the request.
    pub joules: f64,
    /// Where the joules figure comes from.
    pub energy_source: EnergySource,
    /// Prompt tokens computed (once per request: later windows reuse the prefill).
    pub prompt_tokens: usize,
    /// Tokens generated over all samples.
    pub completion_tokens: usize,
    /// Wall-clock seconds of the request.
    pub latency_s: f64,
    /// Why sampling stopped (configurations that run through the TTC service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<StopReason>,
}

/// pass@k: the chance that at least one of `k` samples is right (an oracle verifier's ceiling).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PassAtK {
    /// Samples.
    pub k: usize,
    /// Mean over items of the unbiased estimate.
    pub value: f64,
    /// Samples per item it was estimated from.
    pub from_samples: usize,
}

/// One family under one configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigResult {
    /// The family.
    pub family: TaskFamily,
    /// The model, when not the report's (model-size points).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The configuration.
    pub configuration: Configuration,
    /// Its label.
    pub label: String,
    /// Accuracy with its 95% Wilson interval.
    pub accuracy: Proportion,
    /// pass@k for vote configurations (estimated from the deepest vote's samples).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_at_k: Option<PassAtK>,
    /// Mean joules per request.
    pub mean_joules: f64,
    /// Source of the joules (`estimate` if any request's figure was estimated).
    pub energy_source: EnergySource,
    /// Mean samples per request.
    pub mean_samples: f64,
    /// Mean generated tokens per request (all samples).
    pub mean_completion_tokens: f64,
    /// Mean prompt tokens computed per request.
    pub mean_prompt_tokens: f64,
    /// Mean wall-clock seconds per request.
    pub mean_latency_s: f64,
    /// Every item.
    pub items: Vec<ItemRecord>,
}

/// Everything one run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EvalReport {
    /// The model's name.
    pub model: String,
    /// The settings.
    pub settings: EvalSettings,
    /// Results, family by family, configuration by configuration.
    pub results: Vec<ConfigResult>,
    /// What the results show, in sentences.
    pub findings: Vec<String>,
    /// How the run was made (sources, caveats).
    pub notes: Vec<String>,
}

/// Accuracy, means and the energy source of one configuration's records.
pub fn summarise(
    family: TaskFamily,
    configuration: Configuration,
    items: Vec<ItemRecord>,
) -> ConfigResult {
    let correct = items.iter().filter(|i| i.correct).count() as u64;
    let energy_source = if items
        .iter()
        .any(|i| i.energy_source == EnergySource::Estimate)
    {
        EnergySource::Estimate
    } else {
        items
            .first()
            .map_or(EnergySource::Estimate, |i| i.energy_source)
    };
    ConfigResult {
        family,
        model: None,
        label: configuration.label(),
        configuration,
        accuracy: wilson_95(correct, items.len() as u64),
        pass_at_k: None,
        mean_joules: mean(items.iter().map(|i| i.joules)),
        energy_source,
        mean_samples: mean(items.iter().map(|i| i.samples as f64)),
        mean_completion_tokens: mean(items.iter().map(|i| i.completion_tokens as f64)),
        mean_prompt_tokens: mean(items.iter().map(|i| i.prompt_tokens as f64)),
        mean_latency_s: mean(items.iter().map(|i| i.latency_s)),
        items,
    }
}

/// pass@k of every vote row, estimated from the deepest vote's samples of the same items.
pub(crate) fn add_pass_at_k(results: &mut [ConfigResult], depths: &[usize]) {
    let Some(&deepest) = depths.last() else {
        return;
    };
    let counts: Vec<(u64, u64)> = results
        .iter()
        .find(|r| r.configuration == Configuration::Vote { k: deepest })
        .map(|r| {
            r.items
                .iter()
                .map(|i| (i.samples as u64, i.correct_samples as u64))
                .collect()
        })
        .unwrap_or_default();
    for r in results.iter_mut() {
        if let Configuration::Vote { k } = r.configuration {
            let values: Vec<f64> = counts
                .iter()
                .filter_map(|&(n, c)| pass_at_k(n, c, k as u64))
                .collect();
            if !values.is_empty() {
                r.pass_at_k = Some(PassAtK {
                    k,
                    value: mean(values.iter().copied()),
                    from_samples: deepest,
                });
            }
        }
    }
}

/// Two-sided exact sign test on paired outcomes: `wins` items right only under one
/// configuration, `losses` right only under the other. 1.0 when there is no discordant pair.
pub fn sign_test(wins: usize, losses: usize) -> f64 {
    let n = wins + losses;
    if n == 0 {
        return 1.0;
    }
    let tail = wins.min(losses);
    // Sum of C(n, i) / 2^n for i <= tail, in logs to stay finite for large n.
    let ln_choose =
        |n: usize, k: usize| -> f64 { (1..=k).map(|i| ((n - k + i) as f64 / i as f64).ln()).sum() };
    let p: f64 = (0..=tail)
        .map(|i| (ln_choose(n, i) - n as f64 * std::f64::consts::LN_2).exp())
        .sum();
    (2.0 * p).min(1.0)
}

/// Items right under `a` but not `b`, and right under `b` but not `a` (matched by item id).
pub fn discordant(a: &ConfigResult, b: &ConfigResult) -> (usize, usize) {
    let mut wins = 0;
    let mut losses = 0;
    for x in &a.items {
        if let Some(y) = b.items.iter().find(|y| y.item_id == x.item_id) {
            match (x.correct, y.correct) {
                (true, false) => wins += 1,
                (false, true) => losses += 1,
                _ => {}
            }
        }
    }
    (wins, losses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_test_reference_values() {
        // 8 wins, 0 losses: 2 / 256.
        assert!((sign_test(8, 0) - 2.0 / 256.0).abs() < 1e-12);
        assert_eq!(sign_test(0, 0), 1.0);
        assert_eq!(sign_test(3, 3), 1.0);
        // 9 vs 1: 2 * (1 + 10) / 1024.
        assert!((sign_test(9, 1) - 22.0 / 1024.0).abs() < 1e-12);
    }
}
