//! The budget controller (the inner loop): per request, choose the depth so that the mean joules
//! per request over a window of requests stays at the pod's allocation.
//!
//! Three parts work together. The [`DepthCost`] model predicts what a depth costs, learned from
//! measured joules, together with how many samples a sample limit actually draws once early
//! stopping has had its say (a limit of 8 may draw 3 on average). A debt term (the window's joules above or below the allocation, paid back
//! over a few requests) corrects whatever the model gets wrong, the way a sigma-delta modulator
//! reaches a fractional depth on average with whole samples. And a value share gives each
//! request more or less than the average budget by how likely extra depth is to change its
//! answer, so the joules go where they can matter.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::cost::{CostObservation, CostPrior, DepthCost, DepthCostReport};

/// Settings of the [`BudgetController`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetConfig {
    /// Requests in the averaging window the allocation is held over.
    pub window_requests: usize,
    /// Allowed relative deviation of the window mean from the allocation (0.05 = ±5%).
    pub tolerance: f64,
    /// Over how many requests a debt (or surplus) is paid back; smaller reacts faster and
    /// oscillates more.
    pub payback_requests: f64,
    /// Largest multiple of the average extra budget one request may get for its value.
    pub max_value_share: f64,
    /// Weight of the newest request in the running mean of request values.
    pub value_alpha: f64,
    /// Starting guesses of the cost model.
    pub cost_prior: CostPrior,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            window_requests: 200,
            tolerance: 0.05,
            payback_requests: 10.0,
            max_value_share: 4.0,
            value_alpha: 0.05,
            cost_prior: CostPrior::default(),
        }
    }
}

/// What depth means for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DepthUnit {
    /// Number of samples (majority vote, best-of-N).
    Samples,
    /// Reasoning tokens of one sample (budget forcing).
    ReasoningTokens,
}

/// The policy's limits on one request's depth.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DepthBounds {
    /// Fewest samples.
    pub min_samples: usize,
    /// Most samples.
    pub max_samples: usize,
    /// Fewest reasoning tokens.
    pub min_reasoning_tokens: usize,
    /// Most reasoning tokens.
    pub max_reasoning_tokens: usize,
    /// Token limit of one sample's answer (the request's `max_tokens`).
    pub max_tokens: usize,
}

/// What the controller needs to know about a request to size it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DepthRequest {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// What depth means here.
    pub unit: DepthUnit,
    /// The policy's limits.
    pub bounds: DepthBounds,
    /// How likely extra depth is to change this request's answer (>= 0; relative to other
    /// requests, any scale).
    pub value: f64,
    /// Extra depth is judged worthless for this workload: give the minimum.
    pub depth_worthless: bool,
    /// How its samples will be drawn, for predicting its decode passes.
    pub windows: WindowShape,
}

/// How a request's samples are drawn: an opening window (best-of-N's greedy candidate alone),
/// then windows of a fixed size, or one batch of the rest from some sample limit on (where the
/// window learner found that early stopping does not pay).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowShape {
    /// Samples of an opening window drawn on its own (0: none).
    pub opening: usize,
    /// Samples per later window.
    pub window: usize,
    /// From this sample limit on, everything after the opening is one batch (`usize::MAX`:
    /// never).
    pub batch_from: usize,
}

impl WindowShape {
    /// All samples in one batch.
    pub fn one_batch() -> Self {
        Self {
            opening: 0,
            window: usize::MAX,
            batch_from: 0,
        }
    }

    /// Expected windows of a request that draws `drawn` samples (a mean) of at most `limit`.
    pub fn windows(&self, drawn: f64, limit: usize) -> f64 {
        let opening = self.opening.min(limit);
        let rest = (drawn - opening as f64).max(0.0);
        let size = if limit >= self.batch_from || limit <= self.window {
            limit - opening
        } else {
            self.window
        };
        (opening as f64 + rest / size.max(1) as f64).max(1.0)
    }
}

/// Where the controller stands with respect to the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BudgetState {
    /// No allocation: depth is bounded by the policy only.
    Unbounded,
    /// Depth is sized to hold the allocation.
    Tracking,
    /// Extra depth does not change answers for this workload: minimum depth, spending under
    /// the allocation on purpose.
    DepthWorthless,
    /// Even minimum depth costs more than the allocation: minimum depth, budget not met.
    Degraded,
}

impl BudgetState {
    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Unbounded => "unbounded",
            Self::Tracking => "tracking",
            Self::DepthWorthless => "depth_worthless",
            Self::Degraded => "degraded",
        }
    }
}

/// The depth chosen for one request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DepthChoice {
    /// Most samples to draw.
    pub samples: usize,
    /// Reasoning tokens of a sample (0 unless the unit is reasoning tokens).
    pub reasoning_tokens: usize,
    /// Predicted joules at that depth.
    pub predicted_joules: f64,
    /// This request's share of the budget, when there is an allocation.
    pub budget_joules: Option<f64>,
    /// Why the depth is what it is.
    pub state: BudgetState,
}

/// The controller's state, ready for metrics and the energy report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetReport {
    /// The pod's allocation, in joules per request.
    pub allocation_joules_per_request: Option<f64>,
    /// Requests in the current window.
    pub window_requests: usize,
    /// Mean measured joules per request over the window.
    pub window_mean_joules: Option<f64>,
    /// Relative deviation of that mean from the allocation (+0.03 = 3% over).
    pub deviation: Option<f64>,
    /// Whether the mean is within the tolerance of the allocation.
    pub within_tolerance: Option<bool>,
    /// Mean samples per request over the window.
    pub mean_samples: Option<f64>,
    /// State of the last decision.
    pub state: BudgetState,
    /// Requests of the window sized at minimum depth because the budget could not be met.
    pub degraded_requests: usize,
    /// The learned cost model.
    pub cost: DepthCostReport,
}

#[derive(Debug, Clone, Copy)]
struct WindowEntry {
    joules: f64,
    samples: usize,
    degraded: bool,
}

/// Chooses each request's depth to hold the pod's joules-per-request allocation.
#[derive(Debug, Clone)]
pub struct BudgetController {
    config: BudgetConfig,
    allocation: Option<f64>,
    /// A second bound on the mean joules per request, from a power cap at the current request
    /// rate ([`crate::power`]); it moves with the rate, so changing it keeps the window.
    cap: Option<f64>,
    cost: DepthCost,
    window: VecDeque<WindowEntry>,
    window_joules: f64,
    mean_value: Option<f64>,
    last_state: BudgetState,
    /// Mean samples actually drawn per sample limit (index = limit), learned; a limit not yet
    /// seen is assumed to draw in full.
    drawn_by_limit: Vec<Option<f64>>,
    /// Requests planned but not yet recorded, and their predicted joules: counted in the debt
    /// so that concurrent requests do not all spend the same surplus.
    in_flight: usize,
    in_flight_joules: f64,
}

/// A finished request, as the controller learns from it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FinishedRequest {
    /// What it measured.
    pub observation: CostObservation,
    /// Its sample limit (sampling strategies only).
    pub sample_limit: Option<usize>,
    /// The joules its plan predicted ([`DepthChoice::predicted_joules`]).
    pub predicted_joules: f64,
    /// Whether it ran at minimum depth because the budget could not be met.
    pub degraded: bool,
}

/// Weight of the newest request in the mean samples drawn per sample limit.
const DRAWN_ALPHA: f64 = 0.1;

impl BudgetController {
    /// A controller without an allocation yet.
    pub fn new(config: BudgetConfig) -> Self {
        Self {
            cost: DepthCost::new(config.cost_prior),
            config,
            allocation: None,
            cap: None,
            window: VecDeque::new(),
            window_joules: 0.0,
            mean_value: None,
            last_state: BudgetState::Unbounded,
            drawn_by_limit: Vec::new(),
            in_flight: 0,
            in_flight_joules: 0.0,
        }
    }

    /// Accepts a new allocation (joules per request; `None` or a non-positive value removes
    /// it). A change of more than 1% starts a new window: debt run up against the old
    /// allocation says nothing about the new one.
    pub fn set_allocation(&mut self, joules_per_request: Option<f64>) {
        let next = joules_per_request.filter(|j| j.is_finite() && *j > 0.0);
        let changed = match (self.allocation, next) {
            (Some(old), Some(new)) => (new - old).abs() > 0.01 * old,
            (None, None) => false,
            _ => true,
        };
        if changed {
            self.window.clear();
            self.window_joules = 0.0;
        }
        // Requests in flight stay in flight: they will be recorded against the new window.
        self.allocation = next;
    }

    /// Sets the power cap's bound in joules per request (`None` or a non-positive value: none).
    /// Unlike [`Self::set_allocation`] it keeps the window: the bound follows the request rate
    /// and changes with every request.
    pub fn set_cap(&mut self, joules_per_request: Option<f64>) {
        self.cap = joules_per_request.filter(|j| j.is_finite() && *j > 0.0);
    }

    /// The target mean joules per request: the allocation or the power cap's bound, whichever
    /// is lower.
    pub fn allocation(&self) -> Option<f64> {
        match (self.allocation, self.cap) {
            (Some(a), Some(c)) => Some(a.min(c)),
            (a, c) => a.or(c),
        }
    }

    /// The learned cost model.
    pub fn cost(&self) -> &DepthCost {
        &self.cost
    }

    fn predict(&self, request: &DepthRequest, depth: usize) -> f64 {
        match request.unit {
            DepthUnit::Samples => self.cost.predict_samples(
                request.prompt_tokens,
                self.expected_drawn(depth),
                request
                    .windows
                    .windows(self.expected_drawn(depth), depth.max(1)),
                request.bounds.max_tokens,
            ),
            DepthUnit::ReasoningTokens => self.cost.predict_tokens(
                request.prompt_tokens,
                depth as f64
                    + self
                        .cost
                        .tokens_per_sample()
                        .min(request.bounds.max_tokens as f64),
            ),
        }
    }

    fn depth_range(request: &DepthRequest) -> (usize, usize) {
        let b = &request.bounds;
        match request.unit {
            DepthUnit::Samples => {
                let max = b.max_samples.max(1);
                (b.min_samples.clamp(1, max), max)
            }
            DepthUnit::ReasoningTokens => {
                let max = b.max_reasoning_tokens;
                (b.min_reasoning_tokens.min(max), max)
            }
        }
    }

    fn choice(
        &self,
        request: &DepthRequest,
        depth: usize,
        budget: Option<f64>,
        state: BudgetState,
    ) -> DepthChoice {
        let (samples, reasoning_tokens) = match request.unit {
            DepthUnit::Samples => (depth, 0),
            DepthUnit::ReasoningTokens => (1, depth),
        };
        DepthChoice {
            samples,
            reasoning_tokens,
            predicted_joules: self.predict(request, depth),
            budget_joules: budget,
            state,
        }
    }

    /// Chooses the depth of one request.
    pub fn choose(&mut self, request: &DepthRequest) -> DepthChoice {
        let (min_depth, max_depth) = Self::depth_range(request);
        let choice = self.choose_inner(request, min_depth, max_depth);
        self.last_state = choice.state;
        self.in_flight += 1;
        self.in_flight_joules += choice.predicted_joules;
        choice
    }

    fn choose_inner(
        &mut self,
        request: &DepthRequest,
        min_depth: usize,
        max_depth: usize,
    ) -> DepthChoice {
        let Some(target) = self.allocation() else {
            let depth = if request.depth_worthless {
                min_depth
            } else {
                max_depth
            };
            let state = if request.depth_worthless {
                BudgetState::DepthWorthless
            } else {
                BudgetState::Unbounded
            };
            return self.choice(request, depth, None, state);
        };
        let min_cost = self.predict(request, min_depth);
        if min_cost > target * (1.0 + self.config.tolerance) {
            return self.choice(request, min_depth, Some(target), BudgetState::Degraded);
        }
        if request.depth_worthless {
            return self.choice(
                request,
                min_depth,
                Some(target),
                BudgetState::DepthWorthless,
            );
        }
        let debt = self.window_joules + self.in_flight_joules
            - target * (self.window.len() + self.in_flight) as f64;
        let average_budget = target - debt / self.config.payback_requests.max(1.0);
        let value = if request.value.is_finite() {
            request.value.max(0.0)
        } else {
            0.0
        };
        let mean_value = *self.mean_value.get_or_insert(value);
        self.mean_value = Some(mean_value + self.config.value_alpha * (value - mean_value));
        let share = if mean_value > 1e-9 {
            (value / mean_value).min(self.config.max_value_share)
        } else {
            1.0
        };
        let budget = if average_budget > min_cost {
            min_cost + (average_budget - min_cost) * share
        } else {
            average_budget
        };
        let depth = self.depth_nearest(request, min_depth, max_depth, budget);
        self.choice(request, depth, Some(budget.max(0.0)), BudgetState::Tracking)
    }

    /// The depth in `min..=max` whose predicted cost is nearest to `budget`. Nearest, not the
    /// largest within: always rounding down would leave half a step of every request's budget
    /// unspent, a bias the debt term would then have to carry.
    fn depth_nearest(&self, request: &DepthRequest, min: usize, max: usize, budget: f64) -> usize {
        // Cost grows with depth, so binary search for the largest depth within the budget.
        let (mut low, mut high) = (min, max);
        while low < high {
            let middle = low + (high - low).div_ceil(2);
            if self.predict(request, middle) <= budget {
                low = middle;
            } else {
                high = middle - 1;
            }
        }
        if low < max {
            let (below, above) = (self.predict(request, low), self.predict(request, low + 1));
            if budget - below > above - budget {
                return low + 1;
            }
        }
        low
    }

    /// Mean samples a limit of `limit` draws, as learned; never more than the limit and never
    /// less than what a smaller limit draws, so predicted cost still grows with the limit.
    pub fn expected_drawn(&self, limit: usize) -> f64 {
        let mut drawn: f64 = 0.0;
        for l in 1..=limit {
            let learned = self.drawn_by_limit.get(l).copied().flatten();
            drawn = drawn.max(learned.unwrap_or(l as f64).min(l as f64));
        }
        drawn.max(limit.min(1) as f64)
    }

    /// Forgets a planned request that will never be recorded (it never ran), so it stops
    /// counting as in flight. `predicted_joules` is its [`DepthChoice::predicted_joules`].
    pub fn release(&mut self, predicted_joules: f64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.in_flight_joules = (self.in_flight_joules - predicted_joules).max(0.0);
        if self.in_flight == 0 {
            self.in_flight_joules = 0.0;
        }
    }

    /// Learns from a finished request: its measured joules (cost model and window) and, for
    /// sampling strategies, how many of its `sample_limit` samples it drew. Every planned
    /// request is recorded (or released) exactly once.
    pub fn record(&mut self, finished: &FinishedRequest) {
        self.release(finished.predicted_joules);
        let observation = &finished.observation;
        let sample_limit = finished.sample_limit;
        let degraded = finished.degraded;
        self.cost.observe(observation);
        if let Some(limit) = sample_limit.filter(|l| (1..=1024).contains(l)) {
            if self.drawn_by_limit.len() <= limit {
                self.drawn_by_limit.resize(limit + 1, None);
            }
            let drawn = observation.samples.min(limit) as f64;
            let slot = &mut self.drawn_by_limit[limit];
            *slot = Some(match *slot {
                Some(mean) => mean + DRAWN_ALPHA * (drawn - mean),
                None => drawn,
            });
        }
        if !observation.joules.is_finite() || observation.joules < 0.0 {
            return;
        }
        self.window.push_back(WindowEntry {
            joules: observation.joules,
            samples: observation.samples,
            degraded,
        });
        self.window_joules += observation.joules;
        while self.window.len() > self.config.window_requests.max(1) {
            if let Some(old) = self.window.pop_front() {
                self.window_joules -= old.joules;
            }
        }
        // Re-sum now and then so floating-point drift cannot accumulate.
        if self.cost.report().observations.is_multiple_of(1024) {
            self.window_joules = self.window.iter().map(|e| e.joules).sum();
        }
    }

    /// The controller's state for metrics.
    pub fn report(&self) -> BudgetReport {
        let n = self.window.len();
        let mean = (n > 0).then(|| self.window_joules / n as f64);
        let deviation = match (mean, self.allocation()) {
            (Some(m), Some(a)) => Some(m / a - 1.0),
            _ => None,
        };
        BudgetReport {
            allocation_joules_per_request: self.allocation(),
            window_requests: n,
            window_mean_joules: mean,
            deviation,
            within_tolerance: deviation.map(|d| d.abs() <= self.config.tolerance),
            mean_samples: (n > 0)
                .then(|| self.window.iter().map(|e| e.samples as f64).sum::<f64>() / n as f64),
            state: self.last_state,
            degraded_requests: self.window.iter().filter(|e| e.degraded).count(),
            cost: self.cost.report(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn bounds(min: usize, max: usize) -> DepthBounds {
        DepthBounds {
            min_samples: min,
            max_samples: max,
            min_reasoning_tokens: 0,
            max_reasoning_tokens: 2048,
            max_tokens: 64,
        }
    }

    fn request(value: f64) -> DepthRequest {
        DepthRequest {
            prompt_tokens: 40,
            unit: DepthUnit::Samples,
            bounds: bounds(1, 16),
            value,
            depth_worthless: false,
            windows: WindowShape::one_batch(),
        }
    }

    /// A scripted pod: 1 J fixed, 0.02 J per prompt token, 0.04 J per generated token, samples of
    /// 20-40 tokens, +-10% meter noise; every sample is drawn (no early stop).
    fn run(controller: &mut BudgetController, requests: usize, rng: &mut SplitMix64) -> Vec<usize> {
        let mut depths = Vec::new();
        for _ in 0..requests {
            let choice = controller.choose(&request(1.0));
            let lengths: Vec<usize> = (0..choice.samples)
                .map(|_| 20 + rng.below(21) as usize)
                .collect();
            let tokens: usize = lengths.iter().sum();
            let joules = (1.0 + 0.02 * 40.0 + 0.04 * tokens as f64) * (0.9 + 0.2 * rng.unit());
            controller.record(&FinishedRequest {
                observation: CostObservation {
                    joules,
                    prompt_tokens: 40,
                    completion_tokens: tokens,
                    samples: choice.samples,
                    windows: 1,
                    decode_passes: lengths.iter().max().copied().unwrap_or(0),
                },
                sample_limit: Some(choice.samples),
                predicted_joules: choice.predicted_joules,
                degraded: choice.state == BudgetState::Degraded,
            });
            depths.push(choice.samples);
        }
        depths
    }

    #[test]
    fn window_shapes_count_the_windows_a_request_draws() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(WindowShape::one_batch().windows(8.0, 8), 1.0));
        let windowed = WindowShape {
            opening: 1,
            window: 2,
            batch_from: usize::MAX,
        };
        // Greedy alone, then windows of two: 5 samples are 1 + 2 + 2.
        assert!(close(windowed.windows(5.0, 8), 3.0));
        // Accepted at once: one window.
        assert!(close(windowed.windows(1.0, 8), 1.0));
        let batched = WindowShape {
            batch_from: 3,
            ..windowed
        };
        // Greedy alone, then the other 7 in one batch for the 4 of 7 requests that go on.
        assert!(close(batched.windows(5.0, 8), 1.0 + 4.0 / 7.0));
        // A vote of 2 in windows of 2: one window.
        let vote = WindowShape {
            opening: 0,
            ..windowed
        };
        assert!(close(vote.windows(2.0, 2), 1.0));
    }

    #[test]
    fn a_power_cap_bound_tightens_the_target_without_clearing_the_window() {
        let mut rng = SplitMix64::new(11);
        let mut controller = BudgetController::new(BudgetConfig::default());
        controller.set_allocation(Some(8.0));
        run(&mut controller, 50, &mut rng);
        let before = controller.report().window_requests;
        controller.set_cap(Some(4.0));
        assert_eq!(controller.allocation(), Some(4.0));
        assert_eq!(controller.report().window_requests, before);
        // Held to the cap's bound: the deeper depths of the 8 J allocation are gone.
        let deep = run(&mut controller, 150, &mut rng);
        let mean = controller.report().window_mean_joules.unwrap();
        assert!(mean < 6.0, "mean {mean} J under a 4 J cap");
        assert!(deep[100..].iter().all(|d| *d <= 4), "{deep:?}");
        // A cap looser than the allocation leaves the allocation in charge; none removes it.
        controller.set_cap(Some(100.0));
        assert_eq!(controller.allocation(), Some(8.0));
        controller.set_cap(None);
        assert_eq!(controller.allocation(), Some(8.0));
        controller.set_allocation(None);
        controller.set_cap(Some(3.0));
        assert_eq!(controller.allocation(), Some(3.0));
    }

    #[test]
    fn holds_the_allocation_within_five_percent_over_200_requests() {
        // Cost prior deliberately 2.5x off: the controller has to learn the real cost.
        let mut controller = BudgetController::new(BudgetConfig::default());
        controller.set_allocation(Some(8.0));
        let mut rng = SplitMix64::new(11);
        let depths = run(&mut controller, 400, &mut rng);
        let report = controller.report();
        let deviation = report.deviation.unwrap_or(f64::NAN);
        assert_eq!(report.window_requests, 200);
        assert!(
            deviation.abs() <= 0.05,
            "window deviation {deviation:+.4}, {report:?}"
        );
        // 8 J buys (8 - 1.8) / 1.2 ~ 5.2 samples on average: the depth must be mixed, not pinned.
        let mean = report.mean_samples.unwrap_or(0.0);
        assert!((4.5..6.0).contains(&mean), "mean samples {mean}");
        assert!(depths[200..].iter().any(|d| *d >= 6) && depths[200..].iter().any(|d| *d <= 5));
        assert_eq!(report.state, BudgetState::Tracking);
        eprintln!(
            "controller: allocation 8 J, window mean deviation {deviation:+.4}, mean samples {mean:.2}"
        );
    }

    #[test]
    fn concurrent_requests_hold_the_allocation_too() {
        // Sixteen requests are planned before any of them is measured, as under a batching
        // server; in-flight predictions keep them from all spending the same surplus.
        let mut controller = BudgetController::new(BudgetConfig::default());
        controller.set_allocation(Some(8.0));
        let mut rng = SplitMix64::new(13);
        let mut joules_log = Vec::new();
        for _ in 0..40 {
            let choices: Vec<DepthChoice> =
                (0..16).map(|_| controller.choose(&request(1.0))).collect();
            assert_eq!(controller.in_flight, 16);
            for choice in choices {
                let lengths: Vec<usize> = (0..choice.samples)
                    .map(|_| 20 + rng.below(21) as usize)
                    .collect();
                let tokens: usize = lengths.iter().sum();
                let joules = (1.8 + 0.04 * tokens as f64) * (0.9 + 0.2 * rng.unit());
                joules_log.push(joules);
                controller.record(&FinishedRequest {
                    observation: CostObservation {
                        joules,
                        prompt_tokens: 40,
                        completion_tokens: tokens,
                        samples: choice.samples,
                        windows: 1,
                        decode_passes: lengths.iter().max().copied().unwrap_or(0),
                    },
                    sample_limit: Some(choice.samples),
                    predicted_joules: choice.predicted_joules,
                    degraded: false,
                });
            }
            assert_eq!(controller.in_flight, 0);
        }
        let last: f64 = joules_log[joules_log.len() - 200..].iter().sum::<f64>() / 200.0;
        // Batch means stay near the allocation: no batch spends the whole surplus at once.
        let worst_batch = joules_log[160..]
            .chunks(16)
            .map(|b| (b.iter().sum::<f64>() / 16.0 / 8.0 - 1.0).abs())
            .fold(0.0, f64::max);
        eprintln!("concurrent: last-200 mean {last:.3} J, worst batch deviation {worst_batch:.3}");
        // Without in-flight accounting the worst batch is off by ~75% on this script.
        assert!(worst_batch < 0.5, "worst batch deviation {worst_batch:.3}");
        assert!((last / 8.0 - 1.0).abs() <= 0.05, "last-200 mean {last:.3}");
        // A planned request that never runs is released.
        let choice = controller.choose(&request(1.0));
        controller.release(choice.predicted_joules);
        assert_eq!(
            (controller.in_flight, controller.in_flight_joules),
            (0, 0.0)
        );
    }

    #[test]
    fn accepts_a_new_allocation_at_any_time() {
        let mut controller = BudgetController::new(BudgetConfig::default());
        let mut rng = SplitMix64::new(3);
        controller.set_allocation(Some(12.0));
        run(&mut controller, 250, &mut rng);
        let high = controller.report().mean_samples.unwrap_or(0.0);
        controller.set_allocation(Some(4.0));
        assert_eq!(
            controller.report().window_requests,
            0,
            "a new allocation starts a new window"
        );
        run(&mut controller, 200, &mut rng);
        let report = controller.report();
        let deviation = report.deviation.unwrap_or(f64::NAN);
        assert!(deviation.abs() <= 0.05, "after the change: {deviation:+.4}");
        assert!(report.mean_samples.unwrap_or(99.0) < high / 2.0);
        // Without an allocation the policy's maximum applies.
        controller.set_allocation(None);
        let choice = controller.choose(&request(1.0));
        assert_eq!((choice.samples, choice.state), (16, BudgetState::Unbounded));
    }

    /// Best-of-N under an allocation a little below what unbounded best-of-8 spends: each
    /// sample is accepted with 35%, samples are drawn one at a time until one is (2.8 of 8 on
    /// average, 5.1 J, 97% accepted), and the allocation is 4.6 J (90%). The last tenth of the
    /// spend buys the most: uniform limits about that spend accept 82% (limit 4, 4.3 J) to 88%
    /// (limit 5, 4.8 J), since the requests still open at sample 5 are the ones that need the
    /// most samples. Over 20 seeds the controller must hold the allocation and accept as many as
    /// the cheaper uniform limit (measured 2026-11-29: 81-82% over the first 100 requests and the
    /// next 200, payback 5 to 30 requests alike).
    #[test]
    fn best_of_n_under_a_tight_allocation_holds_it_and_accepts_as_uniform_limits_do() {
        let seeds = 20;
        let (mut accepted_late, mut worst_deviation) = (0.0, 0.0f64);
        for seed in 0..seeds {
            let mut controller = BudgetController::new(BudgetConfig::default());
            controller.set_allocation(Some(4.6));
            let mut rng = SplitMix64::new(seed);
            let mut accepted = Vec::new();
            for _ in 0..300 {
                let mut request = request(1.0);
                request.bounds = bounds(1, 8);
                request.windows = WindowShape {
                    opening: 0,
                    window: 1,
                    batch_from: usize::MAX,
                };
                let choice = controller.choose(&request);
                let mut drawn = 0;
                let mut ok = false;
                while drawn < choice.samples && !ok {
                    drawn += 1;
                    ok = rng.unit() < 0.35;
                }
                let tokens = 30 * drawn;
                let joules = (1.8 + 0.04 * tokens as f64) * (0.9 + 0.2 * rng.unit());
                controller.record(&FinishedRequest {
                    observation: CostObservation {
                        joules,
                        prompt_tokens: 40,
                        completion_tokens: tokens,
                        samples: drawn,
                        windows: drawn,
                        decode_passes: tokens,
                    },
                    sample_limit: Some(choice.samples),
                    predicted_joules: choice.predicted_joules,
                    degraded: choice.state == BudgetState::Degraded,
                });
                accepted.push(ok);
            }
            accepted_late += accepted[100..].iter().filter(|&&ok| ok).count() as f64 / 200.0;
            worst_deviation =
                worst_deviation.max(controller.report().deviation.unwrap_or(1.0).abs());
        }
        let rate = accepted_late / seeds as f64;
        eprintln!(
            "best-of-N at 90% of its unbounded spend: accepted {rate:.3} over requests 100-300, worst window deviation {worst_deviation:.3} (20 seeds)"
        );
        assert!(
            worst_deviation <= 0.05,
            "window deviation {worst_deviation:.3}"
        );
        assert!(rate >= 0.80, "accepted {rate:.3}");
    }

    #[test]
    fn an_unreachable_budget_degrades_to_minimum_depth_and_says_so() {
        let mut controller = BudgetController::new(BudgetConfig::default());
        let mut rng = SplitMix64::new(5);
        controller.set_allocation(Some(1.0)); // minimum depth costs ~3 J
        let depths = run(&mut controller, 100, &mut rng);
        assert!(depths[20..].iter().all(|d| *d == 1), "{depths:?}");
        let report = controller.report();
        assert_eq!(report.state, BudgetState::Degraded);
        assert!(report.degraded_requests >= 80);
        assert_eq!(report.within_tolerance, Some(false));
    }

    #[test]
    fn value_share_moves_depth_to_valuable_requests_and_policy_bounds_hold() {
        let mut controller = BudgetController::new(BudgetConfig::default());
        controller.set_allocation(Some(8.0));
        let mut rng = SplitMix64::new(9);
        run(&mut controller, 100, &mut rng);
        let low = controller.choose(&request(0.1));
        let high = controller.choose(&request(2.0));
        assert!(high.samples > low.samples + 2, "{low:?} vs {high:?}");
        let mut bounded = request(100.0);
        bounded.bounds = bounds(2, 3);
        let c = controller.choose(&bounded);
        assert!((2..=3).contains(&c.samples));
        bounded.value = 0.0;
        assert!(controller.choose(&bounded).samples >= 2);
        let mut worthless = request(5.0);
        worthless.depth_worthless = true;
        let c = controller.choose(&worthless);
        assert_eq!((c.samples, c.state), (1, BudgetState::DepthWorthless));
    }

    #[test]
    fn reasoning_tokens_are_sized_by_the_budget() {
        let mut controller = BudgetController::new(BudgetConfig {
            cost_prior: CostPrior {
                fixed_joules: 1.0,
                joules_per_prompt_token: 0.0,
                joules_per_decode_pass: 0.0,
                joules_per_completion_token: 0.01,
                tokens_per_sample: 10.0,
            },
            ..BudgetConfig::default()
        });
        controller.set_allocation(Some(6.0));
        let mut r = request(1.0);
        r.unit = DepthUnit::ReasoningTokens;
        let c = controller.choose(&r);
        // 6 J - 1 J fixed - 10 answer tokens at 0.01 J leaves ~490 reasoning tokens.
        assert_eq!(c.samples, 1);
        assert!((480..=500).contains(&c.reasoning_tokens), "{c:?}");
        r.bounds.max_reasoning_tokens = 256;
        assert_eq!(controller.choose(&r).reasoning_tokens, 256);
    }
}
