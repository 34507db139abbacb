//! The difficulty and value signal: how hard a query looks (prompt features, first-window
//! agreement, token log-probabilities), and an online learner of whether extra depth changes
//! answers for this workload at all.

use serde::{Deserialize, Serialize};

use super::vote::{Candidate, Vote};

/// Number of difficulty bins the value learner keeps apart.
pub const DIFFICULTY_BINS: usize = 3;

/// Cheap features of a prompt, known before any sampling.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PromptFeatures {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Digits in the prompt text.
    pub digits: usize,
    /// Arithmetic operator characters (`+ - * / = ^ %`) between digits or spaces.
    pub operators: usize,
    /// Words in the prompt text.
    pub words: usize,
}

impl PromptFeatures {
    /// Features of `text` with its token count.
    pub fn from_text(text: &str, prompt_tokens: usize) -> Self {
        let digits = text.chars().filter(char::is_ascii_digit).count();
        let operators = text
            .split_whitespace()
            .filter(|w| matches!(*w, "+" | "-" | "*" | "/" | "=" | "^" | "%" | "×" | "÷"))
            .count()
            + text
                .as_bytes()
                .windows(3)
                .filter(|w| {
                    w[0].is_ascii_digit() && b"+-*/^%".contains(&w[1]) && w[2].is_ascii_digit()
                })
                .count();
        Self {
            prompt_tokens,
            digits,
            operators,
            words: text.split_whitespace().count(),
        }
    }

    /// A prior difficulty in [0, 1] from the prompt alone: more digits and operators (multi-step
    /// arithmetic) and longer prompts look harder. A weak signal; the first window refines it.
    pub fn prior_difficulty(&self) -> f64 {
        let arithmetic = 1.0 - (-(self.digits as f64) / 8.0 - self.operators as f64 / 2.0).exp();
        let length = 1.0 - (-(self.words as f64) / 150.0).exp();
        (0.6 * arithmetic + 0.4 * length).clamp(0.0, 1.0)
    }

    /// The difficulty bin (0 = easy .. [`DIFFICULTY_BINS`]-1 = hard) of the prior.
    pub fn bin(&self) -> usize {
        difficulty_bin(self.prior_difficulty())
    }
}

/// The bin of a difficulty in [0, 1].
pub fn difficulty_bin(difficulty: f64) -> usize {
    let d = if difficulty.is_finite() {
        difficulty.clamp(0.0, 1.0)
    } else {
        0.5
    };
    ((d * DIFFICULTY_BINS as f64) as usize).min(DIFFICULTY_BINS - 1)
}

/// The difficulty of a query once its first window has been sampled.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DifficultySignal {
    /// From the prompt alone, in [0, 1].
    pub prior: f64,
    /// Share of the first window behind its leading answer (0 when no sample had an answer).
    pub first_window_agreement: Option<f64>,
    /// Mean per-token uncertainty of the first window: 1 - the geometric-mean token probability.
    pub token_uncertainty: Option<f64>,
}

impl DifficultySignal {
    /// The prior only.
    pub fn from_prompt(features: &PromptFeatures) -> Self {
        Self {
            prior: features.prior_difficulty(),
            first_window_agreement: None,
            token_uncertainty: None,
        }
    }

    /// Adds what the first window showed.
    pub fn with_first_window(mut self, vote: Option<&Vote>, window: &[Candidate]) -> Self {
        self.first_window_agreement = Some(vote.map_or(0.0, |v| v.agreement));
        if !window.is_empty() {
            let mean_probability = window
                .iter()
                .map(Candidate::mean_token_probability)
                .sum::<f64>()
                / window.len() as f64;
            self.token_uncertainty = Some((1.0 - mean_probability).clamp(0.0, 1.0));
        }
        self
    }

    /// The combined difficulty in [0, 1]. Disagreement in the first window is the strongest
    /// evidence (it is what ESC and Adaptive-Consistency stop on); token uncertainty and the
    /// prompt prior refine it.
    pub fn score(&self) -> f64 {
        let mut total = 0.2 * self.prior;
        let mut weights = 0.2;
        if let Some(agreement) = self.first_window_agreement {
            total += 0.6 * (1.0 - agreement);
            weights += 0.6;
        }
        if let Some(uncertainty) = self.token_uncertainty {
            total += 0.2 * uncertainty;
            weights += 0.2;
        }
        (total / weights).clamp(0.0, 1.0)
    }
}

/// Settings of the [`DepthValueLearner`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DepthValueConfig {
    /// Weight kept per observation (exponential forgetting), so the learner follows a workload
    /// that changes: 0.995 remembers about the last 200 observed requests.
    pub decay: f64,
    /// Below this upper bound on the flip rate, extra depth is judged worthless.
    pub worthless_flip_rate: f64,
    /// Observed requests (decayed) to see before judging.
    pub min_observations: f64,
    /// While depth is judged worthless, every `probe_every`-th request still gets extra depth so
    /// the learner notices when the workload changes.
    pub probe_every: u64,
}

impl Default for DepthValueConfig {
    fn default() -> Self {
        Self {
            decay: 0.995,
            worthless_flip_rate: 0.05,
            min_observations: 20.0,
            probe_every: 20,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct FlipCounts {
    observations: f64,
    flips: f64,
}

impl FlipCounts {
    fn record(&mut self, flipped: bool, decay: f64) {
        self.observations = self.observations * decay + 1.0;
        self.flips = self.flips * decay + f64::from(u8::from(flipped));
    }

    /// Posterior mean with a Beta(1, 1) prior.
    fn rate(&self) -> f64 {
        (self.flips + 1.0) / (self.observations + 2.0)
    }

    /// A one-sided upper bound (Wilson score, z = 1.64) on the flip rate.
    fn upper_bound(&self) -> f64 {
        let n = self.observations;
        if n <= 0.0 {
            return 1.0;
        }
        let z = 1.64_f64;
        let p = self.flips / n;
        let denominator = 1.0 + z * z / n;
        let centre = p + z * z / (2.0 * n);
        let spread = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
        ((centre + spread) / denominator).clamp(0.0, 1.0)
    }
}

/// Learns online whether samples beyond the first change the answer, per difficulty bin and
/// overall. Every request that drew two or more samples is an observation; it is a "flip" when
/// the final answer differs from the first sample's answer (or the first sample had none), i.e.
/// when one sample alone would have answered differently. Where extra depth never flips the
/// answer, it buys nothing but joules, and the controller falls back to minimum depth.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthValueLearner {
    config: DepthValueConfig,
    bins: [FlipCounts; DIFFICULTY_BINS],
    overall: FlipCounts,
    requests: u64,
    total_observed: u64,
    total_flips: u64,
}

/// What the [`DepthValueLearner`] believes, ready for metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DepthValueReport {
    /// Deep requests observed (all time).
    pub observed: u64,
    /// Of which the answer flipped (all time).
    pub flips: u64,
    /// Estimated probability that extra depth flips the answer (recent, smoothed).
    pub flip_rate: f64,
    /// Upper confidence bound on that probability.
    pub flip_rate_upper: f64,
    /// Estimated flip rate per difficulty bin (easy to hard).
    pub flip_rate_by_bin: Vec<f64>,
    /// Whether extra depth is currently judged to change answers.
    pub depth_pays: bool,
}

impl DepthValueLearner {
    /// A learner that assumes depth may pay until shown otherwise.
    pub fn new(config: DepthValueConfig) -> Self {
        Self {
            config,
            bins: [FlipCounts::default(); DIFFICULTY_BINS],
            overall: FlipCounts::default(),
            requests: 0,
            total_observed: 0,
            total_flips: 0,
        }
    }

    /// Records a request that drew two or more samples: its difficulty bin, the first sample's
    /// answer and the final answer.
    pub fn record(&mut self, bin: usize, first_answer: Option<&str>, final_answer: Option<&str>) {
        let flipped = first_answer.is_none() || first_answer != final_answer;
        let decay = self.config.decay.clamp(0.0, 1.0);
        self.bins[bin.min(DIFFICULTY_BINS - 1)].record(flipped, decay);
        self.overall.record(flipped, decay);
        self.total_observed += 1;
        self.total_flips += u64::from(flipped);
    }

    /// Estimated probability that extra depth flips the answer of a query in `bin`.
    pub fn flip_rate(&self, bin: usize) -> f64 {
        self.bins[bin.min(DIFFICULTY_BINS - 1)].rate()
    }

    /// Whether extra depth is still believed to change answers for this workload.
    pub fn depth_pays(&self) -> bool {
        self.overall.observations < self.config.min_observations
            || self.overall.upper_bound() >= self.config.worthless_flip_rate
    }

    /// Counts a request and says whether it is a probe: a request that gets extra depth while
    /// depth is judged worthless, to keep learning.
    pub fn next_request_is_probe(&mut self) -> bool {
        self.requests += 1;
        !self.depth_pays() && self.requests % self.config.probe_every.max(1) == 0
    }

    /// The learner's state for metrics.
    pub fn report(&self) -> DepthValueReport {
        DepthValueReport {
            observed: self.total_observed,
            flips: self.total_flips,
            flip_rate: self.overall.rate(),
            flip_rate_upper: self.overall.upper_bound(),
            flip_rate_by_bin: self.bins.iter().map(FlipCounts::rate).collect(),
            depth_pays: self.depth_pays(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ttc::vote::{VoteWeighting, majority_vote};

    #[test]
    fn arithmetic_prompts_look_harder_than_chat() {
        let easy = PromptFeatures::from_text("Is the sky blue?", 6);
        let hard = PromptFeatures::from_text("What is 4821 * 37 + 1290 - 77?", 15);
        assert_eq!(hard.digits, 12);
        assert_eq!(hard.operators, 3);
        assert!(hard.prior_difficulty() > easy.prior_difficulty() + 0.3);
        assert!(hard.bin() > easy.bin());
        assert_eq!(easy.bin(), 0);
        assert_eq!(difficulty_bin(f64::NAN), 1);
        assert_eq!(difficulty_bin(1.0), DIFFICULTY_BINS - 1);
    }

    #[test]
    fn first_window_disagreement_raises_difficulty() {
        let cand = |a: &str, lp: f64| Candidate {
            answer: Some(a.into()),
            logprob: lp,
            tokens: 2,
        };
        let prior = DifficultySignal::from_prompt(&PromptFeatures::from_text("2 + 2?", 4));
        let agree = [cand("4", -0.1), cand("4", -0.1)];
        let split = [cand("4", -1.5), cand("5", -1.5)];
        let easy = prior.with_first_window(
            majority_vote(&agree, VoteWeighting::Uniform).as_ref(),
            &agree,
        );
        let hard = prior.with_first_window(
            majority_vote(&split, VoteWeighting::Uniform).as_ref(),
            &split,
        );
        assert_eq!(easy.first_window_agreement, Some(1.0));
        assert_eq!(hard.first_window_agreement, Some(0.5));
        assert!(
            hard.score() > easy.score() + 0.3,
            "{} vs {}",
            hard.score(),
            easy.score()
        );
        assert!((0.0..=1.0).contains(&hard.score()));
    }

    #[test]
    fn learner_gives_up_on_depth_that_never_flips() {
        let mut learner = DepthValueLearner::new(DepthValueConfig::default());
        assert!(
            learner.depth_pays(),
            "assumes depth may pay before evidence"
        );
        for _ in 0..100 {
            learner.record(1, Some("no"), Some("no"));
        }
        let report = learner.report();
        assert!(!report.depth_pays, "{report:?}");
        assert_eq!(report.observed, 100);
        assert_eq!(report.flips, 0);
        assert!(report.flip_rate_upper < 0.05);
        // It still probes, one request in `probe_every`.
        let probes = (0..100).filter(|_| learner.next_request_is_probe()).count();
        assert_eq!(probes, 5);
    }

    #[test]
    fn learner_keeps_depth_where_answers_flip_and_tells_bins_apart() {
        let mut learner = DepthValueLearner::new(DepthValueConfig::default());
        for i in 0..200 {
            learner.record(0, Some("a"), Some("a"));
            let flipped = i % 3 == 0;
            learner.record(2, Some("a"), Some(if flipped { "b" } else { "a" }));
        }
        assert!(learner.depth_pays());
        assert!(learner.flip_rate(0) < 0.05, "{}", learner.flip_rate(0));
        assert!((learner.flip_rate(2) - 1.0 / 3.0).abs() < 0.1);
        assert!(!learner.next_request_is_probe());
        // An unanswered first window counts as a flip.
        let mut fresh = DepthValueLearner::new(DepthValueConfig::default());
        fresh.record(0, None, Some("a"));
        assert_eq!(fresh.report().flips, 1);
    }

    #[test]
    fn learner_forgets_and_notices_a_changed_workload() {
        let mut learner = DepthValueLearner::new(DepthValueConfig::default());
        for _ in 0..200 {
            learner.record(1, Some("x"), Some("x"));
        }
        assert!(!learner.depth_pays());
        for i in 0..30 {
            learner.record(1, Some("x"), Some(if i % 2 == 0 { "y" } else { "x" }));
        }
        assert!(learner.depth_pays(), "{:?}", learner.report());
    }
}
