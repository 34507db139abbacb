//! The difficulty and value signal: how hard a query looks (prompt features, first-window
//! agreement, token log-probabilities), and an online learner of whether extra depth changes
//! answers for this workload at all.

use serde::{Deserialize, Serialize};

use crate::answer::AnswerType;
use crate::vote::{Candidate, Vote};

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
    /// Below this upper bound on the disagreement rate, extra depth is judged worthless.
    pub worthless_disagreement: f64,
    /// Observed requests (decayed) to see before judging.
    pub min_observations: f64,
    /// While depth is judged worthless, every `probe_every`-th request still gets extra depth so
    /// the learner notices when the workload changes.
    pub probe_every: u64,
    /// Feedback weight (decayed) a class needs before its gain is judged.
    #[serde(default = "default_min_feedback")]
    pub min_feedback: f64,
    /// Weight kept per feedback: 0.998 remembers about the last 500. Longer than `decay`
    /// because a gain is a noisier signal than a disagreement and labels come more sparsely.
    #[serde(default = "default_feedback_decay")]
    pub feedback_decay: f64,
}

fn default_feedback_decay() -> f64 {
    0.998
}

fn default_min_feedback() -> f64 {
    80.0
}

impl Default for DepthValueConfig {
    fn default() -> Self {
        Self {
            decay: 0.995,
            worthless_disagreement: 0.05,
            min_observations: 20.0,
            probe_every: 20,
            min_feedback: default_min_feedback(),
            feedback_decay: default_feedback_decay(),
        }
    }
}

/// Exponentially forgotten counts of a rate; an observation may count fractionally.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct RateCounts {
    observations: f64,
    hits: f64,
}

impl RateCounts {
    fn record(&mut self, hit: f64, decay: f64) {
        self.observations = self.observations * decay + 1.0;
        self.hits = self.hits * decay + hit.clamp(0.0, 1.0);
    }

    /// Posterior mean with a Beta(1, 1) prior.
    fn rate(&self) -> f64 {
        (self.hits + 1.0) / (self.observations + 2.0)
    }

    /// A one-sided upper bound (Wilson score, z = 1.64) on the rate.
    fn upper_bound(&self) -> f64 {
        let n = self.observations;
        if n <= 0.0 {
            return 1.0;
        }
        let z = 1.64_f64;
        let p = (self.hits / n).clamp(0.0, 1.0);
        let denominator = 1.0 + z * z / n;
        let centre = p + z * z / (2.0 * n);
        let spread = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
        ((centre + spread) / denominator).clamp(0.0, 1.0)
    }
}

/// Exponentially forgotten moments of a gain in [-1, 1].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct GainMoments {
    weight: f64,
    sum: f64,
    sum_squares: f64,
    /// Whether the gain has been judged too small to pay for depth. Judged with hysteresis:
    /// given up when the upper bound falls under the threshold, taken up again only when the
    /// lower bound rises above it, so a gain of zero does not flap between the two as its
    /// estimate wanders around the threshold.
    ruled_out: bool,
}

/// How many standard errors the gain's bounds lie from its mean (one-sided 84%). Probes keep
/// testing a give-up, so a lower confidence than the disagreement bound's trades a rare wrong
/// give-up (undone by the probes) for giving up on worthless depth within a few hundred
/// labelled requests.
const GAIN_BOUND_Z: f64 = 1.0;

impl GainMoments {
    fn record(&mut self, gain: f64, decay: f64) {
        let g = gain.clamp(-1.0, 1.0);
        self.weight = self.weight * decay + 1.0;
        self.sum = self.sum * decay + g;
        self.sum_squares = self.sum_squares * decay + g * g;
    }

    /// Updates the verdict after a record: judged once the weight reaches `min_weight`.
    fn judge(&mut self, min_weight: f64, worthless_gain: f64) {
        self.ruled_out = if self.weight < min_weight {
            false
        } else if self.ruled_out {
            self.mean() - self.spread() <= worthless_gain
        } else {
            self.upper_bound() < worthless_gain
        };
    }

    fn mean(&self) -> f64 {
        if self.weight > 0.0 {
            self.sum / self.weight
        } else {
            0.0
        }
    }

    /// [`GAIN_BOUND_Z`] standard errors (the variance floored at that of one change in twenty,
    /// so a run of zeros does not make the bounds collapse onto the mean).
    fn spread(&self) -> f64 {
        let mean = self.mean();
        let variance = (self.sum_squares / self.weight - mean * mean).max(0.05);
        GAIN_BOUND_Z * (variance / self.weight).sqrt()
    }

    /// The mean plus its spread.
    fn upper_bound(&self) -> f64 {
        if self.weight <= 1.0 {
            return 1.0;
        }
        self.mean() + self.spread()
    }

    /// The mean, once there is any feedback.
    fn estimate(&self) -> Option<f64> {
        (self.weight > 0.0).then(|| self.mean())
    }

    /// The upper bound, once there is more than one feedback's weight.
    fn upper_estimate(&self) -> Option<f64> {
        (self.weight > 1.0).then(|| self.upper_bound())
    }
}

/// Number of answer types the learner keeps apart.
const ANSWER_TYPES: usize = 5;

/// A class of requests whose value of depth is learned separately: the answer type (yes/no
/// questions may agree systematically while arithmetic does not) and the prompt's difficulty bin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DepthClass {
    /// How answers are extracted.
    pub answer_type: AnswerType,
    /// Difficulty bin of the prompt (0 = easy).
    pub bin: usize,
}

impl DepthClass {
    fn index(&self) -> usize {
        let type_index = match self.answer_type {
            AnswerType::Number => 0,
            AnswerType::Choice { .. } => 1,
            AnswerType::YesNo => 2,
            AnswerType::Short => 3,
            AnswerType::Json => 4,
        };
        type_index * DIFFICULTY_BINS + self.bin.min(DIFFICULTY_BINS - 1)
    }
}

/// Learns online whether extra samples can change answers for this workload, per class of
/// request ([`DepthClass`]) and overall.
///
/// Every request that drew two or more samples is an observation of its *disagreement*: the
/// share of the samples after the first whose answer differs from the first sample's. Where
/// later samples always repeat the first (the systematic agreement measured on SmolLM2), no vote
/// and no amount of depth can change the answer, so depth buys nothing but joules and the
/// controller falls back to minimum depth for that class. Disagreement rather than "did the
/// final answer change" because a vote of two with first-seen tie-breaking can never change the
/// answer, so at low depths the latter would always read zero and hide the value of going
/// deeper. Answer changes (final differs from the first sample's) are counted too, for metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthValueLearner {
    config: DepthValueConfig,
    classes: [RateCounts; ANSWER_TYPES * DIFFICULTY_BINS],
    /// The class each slot was last seen as, for the report.
    class_names: [Option<DepthClass>; ANSWER_TYPES * DIFFICULTY_BINS],
    overall: RateCounts,
    /// Gain over minimum depth from correctness feedback, per class and overall.
    gains: [GainMoments; ANSWER_TYPES * DIFFICULTY_BINS],
    overall_gain: GainMoments,
    requests: u64,
    total_observed: u64,
    total_answer_changes: u64,
    total_feedback: u64,
    /// The gain depth must show with feedback to keep being paid for (the policy's
    /// `minDepthGain`).
    min_gain: f64,
}

/// The policy's default `minDepthGain`.
const DEFAULT_MIN_GAIN: f64 = 0.03;

/// What the [`DepthValueLearner`] believes, ready for metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DepthValueReport {
    /// Requests with two or more samples observed (all time).
    pub observed: u64,
    /// Of which the final answer differed from the first sample's (all time).
    pub answer_changes: u64,
    /// Estimated probability that a later sample disagrees with the first (recent, smoothed).
    pub disagreement: f64,
    /// Upper confidence bound on that probability.
    pub disagreement_upper: f64,
    /// Correctness feedback taken that said something about depth (all time).
    pub feedback: u64,
    /// Accuracy depth gained over minimum depth, from feedback (recent; `None` without any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gain: Option<f64>,
    /// Whether extra depth is judged able to change answers for the workload as a whole, and,
    /// where feedback says, to make them right more often.
    pub depth_pays: bool,
    /// The same per class of request seen so far.
    pub classes: Vec<DepthClassReport>,
}

/// What the learner believes about one class of request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DepthClassReport {
    /// The class.
    pub class: DepthClass,
    /// Observations, exponentially forgotten.
    pub weight: f64,
    /// Estimated disagreement.
    pub disagreement: f64,
    /// Feedback weight (exponentially forgotten).
    pub feedback_weight: f64,
    /// Accuracy depth gained over minimum depth, from feedback (`None` without any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gain: Option<f64>,
    /// Upper bound on that gain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gain_upper: Option<f64>,
    /// Whether extra depth is judged to pay for this class: able to change its answers, and,
    /// once feedback has been judged, to make them right more often.
    pub depth_pays: bool,
}

/// How many observations' worth the overall rate counts in a class's estimate (shrinkage, so a
/// class seen twice is not judged on two requests alone).
const CLASS_PRIOR_WEIGHT: f64 = 2.0;

impl DepthValueLearner {
    /// A learner that assumes depth may pay until shown otherwise.
    pub fn new(config: DepthValueConfig) -> Self {
        Self {
            config,
            classes: [RateCounts::default(); ANSWER_TYPES * DIFFICULTY_BINS],
            class_names: [None; ANSWER_TYPES * DIFFICULTY_BINS],
            overall: RateCounts::default(),
            gains: [GainMoments::default(); ANSWER_TYPES * DIFFICULTY_BINS],
            overall_gain: GainMoments::default(),
            requests: 0,
            total_observed: 0,
            total_answer_changes: 0,
            total_feedback: 0,
            min_gain: DEFAULT_MIN_GAIN,
        }
    }

    /// Sets the gain depth must show with feedback to keep being paid for (the policy's
    /// `minDepthGain`), and judges what was learned against it.
    pub fn set_min_gain(&mut self, min_gain: f64) {
        self.min_gain = if min_gain.is_finite() {
            min_gain.clamp(0.0, 1.0)
        } else {
            DEFAULT_MIN_GAIN
        };
        let min_weight = self.config.min_feedback;
        for gains in self.gains.iter_mut().chain([&mut self.overall_gain]) {
            gains.ruled_out = false;
            gains.judge(min_weight, self.min_gain);
        }
    }

    /// Records a request: its class, its samples' answers in the order drawn and the final
    /// answer. Requests with fewer than two samples say nothing and are ignored.
    pub fn record(
        &mut self,
        class: DepthClass,
        answers: &[Option<&str>],
        final_answer: Option<&str>,
    ) {
        let Some((first, later)) = answers.split_first() else {
            return;
        };
        if later.is_empty() {
            return;
        }
        let disagreeing = later
            .iter()
            .filter(|a| first.is_none() || *a != first)
            .count();
        let disagreement = disagreeing as f64 / later.len() as f64;
        let decay = self.config.decay.clamp(0.0, 1.0);
        let index = class.index();
        self.classes[index].record(disagreement, decay);
        self.class_names[index] = Some(class);
        self.overall.record(disagreement, decay);
        self.total_observed += 1;
        self.total_answer_changes += u64::from(first.is_none() || *first != final_answer);
    }

    /// Records correctness feedback: the accuracy a request of `class` gained from its depth
    /// over minimum depth ([`crate::feedback::FeedbackTicket::gain`]).
    pub fn record_gain(&mut self, class: DepthClass, gain: f64) {
        let decay = self.config.feedback_decay.clamp(0.0, 1.0);
        let index = class.index();
        let (min_weight, threshold) = (self.config.min_feedback, self.min_gain);
        for gains in [&mut self.gains[index], &mut self.overall_gain] {
            gains.record(gain, decay);
            gains.judge(min_weight, threshold);
        }
        self.class_names[index] = Some(class);
        self.total_feedback += 1;
    }

    /// Estimated probability that a later sample of a request of `class` disagrees with the
    /// first, shrunk towards the overall rate while the class is young.
    pub fn disagreement(&self, class: DepthClass) -> f64 {
        let counts = &self.classes[class.index()];
        (counts.hits + CLASS_PRIOR_WEIGHT * self.overall.rate())
            / (counts.observations + CLASS_PRIOR_WEIGHT)
    }

    fn pays(&self, counts: &RateCounts) -> bool {
        counts.upper_bound() >= self.config.worthless_disagreement
    }

    /// Whether extra depth is still believed able to change answers for the workload.
    pub fn depth_pays(&self) -> bool {
        (self.overall.observations < self.config.min_observations || self.pays(&self.overall))
            && !self.overall_gain.ruled_out
    }

    /// Whether extra depth is still believed to pay for `class`: able to change its answers
    /// (judged on the class once it has enough observations, on the whole workload before), and
    /// not shown by feedback to leave them no more often right.
    pub fn depth_pays_for(&self, class: DepthClass) -> bool {
        let index = class.index();
        let counts = &self.classes[index];
        let changes_answers = if counts.observations >= self.config.min_observations {
            self.pays(counts)
        } else {
            self.depth_pays()
        };
        changes_answers && !self.gains[index].ruled_out
    }

    /// Counts a request of `class` and says whether it is a probe: a request that gets extra
    /// depth while depth is judged worthless for its class, to keep learning.
    pub fn next_request_is_probe(&mut self, class: DepthClass) -> bool {
        self.requests += 1;
        !self.depth_pays_for(class) && self.requests.is_multiple_of(self.config.probe_every.max(1))
    }

    /// The learner's state for metrics.
    pub fn report(&self) -> DepthValueReport {
        let classes = self
            .class_names
            .iter()
            .flatten()
            .map(|class| {
                let gains = &self.gains[class.index()];
                DepthClassReport {
                    class: *class,
                    weight: self.classes[class.index()].observations,
                    disagreement: self.disagreement(*class),
                    feedback_weight: gains.weight,
                    gain: gains.estimate(),
                    gain_upper: gains.upper_estimate(),
                    depth_pays: self.depth_pays_for(*class),
                }
            })
            .collect();
        DepthValueReport {
            observed: self.total_observed,
            answer_changes: self.total_answer_changes,
            disagreement: self.overall.rate(),
            disagreement_upper: self.overall.upper_bound(),
            feedback: self.total_feedback,
            gain: self.overall_gain.estimate(),
            depth_pays: self.depth_pays(),
            classes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vote::{VoteWeighting, majority_vote};

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
            retrace_logprob: None,
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

    fn class(bin: usize) -> DepthClass {
        DepthClass {
            answer_type: AnswerType::Short,
            bin,
        }
    }

    #[test]
    fn learner_gives_up_on_depth_that_never_changes_answers() {
        let mut learner = DepthValueLearner::new(DepthValueConfig::default());
        assert!(
            learner.depth_pays(),
            "assumes depth may pay before evidence"
        );
        for _ in 0..100 {
            learner.record(class(1), &[Some("no"), Some("no")], Some("no"));
        }
        let report = learner.report();
        assert!(!report.depth_pays, "{report:?}");
        assert!(!learner.depth_pays_for(class(1)));
        assert_eq!(report.observed, 100);
        assert_eq!(report.answer_changes, 0);
        assert!(report.disagreement_upper < 0.05);
        assert_eq!(report.classes.len(), 1);
        // It still probes, one request in `probe_every`.
        let probes = (0..100)
            .filter(|_| learner.next_request_is_probe(class(1)))
            .count();
        assert_eq!(probes, 5);
        // Single samples are no evidence.
        learner.record(class(1), &[Some("yes")], Some("yes"));
        assert_eq!(learner.report().observed, 100);
    }

    #[test]
    fn learner_keeps_depth_where_samples_disagree_and_tells_classes_apart() {
        let mut learner = DepthValueLearner::new(DepthValueConfig::default());
        let yes_no = DepthClass {
            answer_type: AnswerType::YesNo,
            bin: 0,
        };
        for i in 0..200 {
            learner.record(yes_no, &[Some("no"), Some("no"), Some("no")], Some("no"));
            // A split pair: the vote keeps the first answer, but depth could change it.
            let second = if i % 2 == 0 { "b" } else { "a" };
            learner.record(class(2), &[Some("a"), Some(second)], Some("a"));
        }
        assert!(learner.depth_pays(), "the workload as a whole");
        assert!(learner.depth_pays_for(class(2)));
        assert!(
            !learner.depth_pays_for(yes_no),
            "systematic yes/no agreement"
        );
        assert!(
            learner.disagreement(yes_no) < 0.05,
            "{}",
            learner.disagreement(yes_no)
        );
        assert!((learner.disagreement(class(2)) - 0.5).abs() < 0.1);
        // A class never seen takes the overall rate.
        assert!((learner.disagreement(class(0)) - learner.report().disagreement).abs() < 1e-9);
        assert!(learner.depth_pays_for(class(0)));
        assert_eq!(learner.report().answer_changes, 0);
        assert_eq!(learner.report().classes.len(), 2);
        assert!(!learner.next_request_is_probe(class(2)));
        // A changed answer is counted; an unanswered first sample disagrees with everything.
        let mut fresh = DepthValueLearner::new(DepthValueConfig::default());
        fresh.record(class(0), &[Some("a"), Some("b"), Some("b")], Some("b"));
        fresh.record(class(0), &[None, Some("b")], Some("b"));
        assert_eq!(fresh.report().answer_changes, 2);
        assert!(fresh.disagreement(class(0)) > 0.6);
    }

    #[test]
    fn feedback_overrides_disagreement_where_depth_changes_answers_without_making_them_right() {
        let mut learner = DepthValueLearner::new(DepthValueConfig::default());
        let (scattered, helped) = (class(0), class(2));
        for i in 0..300 {
            // Both classes' samples disagree half the time ...
            let second = if i % 2 == 0 { "b" } else { "a" };
            learner.record(scattered, &[Some("a"), Some(second)], Some("a"));
            learner.record(helped, &[Some("a"), Some(second)], Some("a"));
            // ... but depth makes one class right as often as wrong, the other right.
            learner.record_gain(scattered, if i % 2 == 0 { 0.3 } else { -0.3 });
            learner.record_gain(helped, if i % 4 == 0 { 0.0 } else { 0.4 });
        }
        assert!(learner.disagreement(scattered) > 0.4);
        assert!(!learner.depth_pays_for(scattered), "{:?}", learner.report());
        assert!(learner.depth_pays_for(helped), "{:?}", learner.report());
        let report = learner.report();
        assert_eq!(report.feedback, 600);
        let of = |c: DepthClass| report.classes.iter().find(|r| r.class == c).cloned();
        let (Some(s), Some(h)) = (of(scattered), of(helped)) else {
            panic!("{report:?}");
        };
        assert!(s.gain.is_some_and(|g| g.abs() < 0.01), "{s:?}");
        assert!(s.gain_upper.is_some_and(|u| u < 0.03), "{s:?}");
        assert!(h.gain.is_some_and(|g| (g - 0.3).abs() < 0.01), "{h:?}");
        // The policy's minDepthGain moves the bar, and what was learned is judged against it.
        learner.set_min_gain(0.5);
        assert!(!learner.depth_pays_for(helped), "0.3 gained is under 0.5");
        learner.set_min_gain(0.03);
        assert!(learner.depth_pays_for(helped));
        assert!(!learner.depth_pays_for(scattered));
        // Too little feedback is not judged: a fresh class keeps depth.
        let mut young = DepthValueLearner::new(DepthValueConfig::default());
        for _ in 0..10 {
            young.record_gain(scattered, -1.0);
        }
        assert!(young.depth_pays_for(scattered));
    }

    #[test]
    fn learner_forgets_and_notices_a_changed_workload() {
        let mut learner = DepthValueLearner::new(DepthValueConfig::default());
        for _ in 0..200 {
            learner.record(class(1), &[Some("x"), Some("x")], Some("x"));
        }
        assert!(!learner.depth_pays());
        for i in 0..30 {
            let second = if i % 2 == 0 { "y" } else { "x" };
            learner.record(class(1), &[Some("x"), Some(second)], Some("x"));
        }
        assert!(learner.depth_pays(), "{:?}", learner.report());
        assert!(learner.depth_pays_for(class(1)));
    }
}
