//! Whether early stopping pays on this pod: windows or one batch.
//!
//! Drawing a request's samples in small windows lets it stop as soon as they agree, but on a
//! batched engine one window of `w` samples costs much less than `w` single samples, so several
//! windows cost more than one batch of all of them. Windows pay only when they stop early often
//! enough. The learner watches how much of its sample limit each windowed request actually drew;
//! while that share stays high (the samples rarely agree early: a weak model, hard questions), the
//! pod draws each request's samples as one batch, and it keeps one request in `probe_every`
//! windowed so that it notices when early stopping starts to pay.
//!
//! How high is too high depends on the engine, so the learner also measures it: from the decode
//! passes it sees, a pass of k rows costs 1 + beta (k - 1) passes of one row. Drawing d of m
//! samples in windows of w then costs about (d / w) (1 + beta (w - 1)) against 1 + beta (m - 1)
//! for one batch, so windows pay while d / m stays below
//! w (1 + beta (m - 1)) / (m (1 + beta (w - 1))): 0.39 for windows of 2 of 8 on this project's
//! CPU engine (beta about 0.1: 8 rows cost 1.7 one-row passes), 1 where rows cost the same alone or together (beta = 1). Until
//! it has measured beta it uses `batch_above_drawn_share`.

use serde::{Deserialize, Serialize};

/// Settings of the [`WindowLearner`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowConfig {
    /// Draw in one batch while windowed requests draw at least this share of their sample
    /// limit on average (1.0 or more: always windows).
    pub batch_above_drawn_share: f64,
    /// Windowed requests observed before the learner may batch.
    pub min_observations: u64,
    /// One eligible request in this many stays windowed while batching, to keep measuring.
    pub probe_every: u64,
    /// Weight of the newest observation in the mean drawn share.
    pub alpha: f64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            batch_above_drawn_share: 0.8,
            min_observations: 8,
            probe_every: 8,
            alpha: 0.1,
        }
    }
}

/// What the learner knows, for metrics and responses.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowReport {
    /// Mean share of the sample limit windowed requests drew; `None` before any.
    pub drawn_share: Option<f64>,
    /// Windowed requests observed.
    pub observations: u64,
    /// Whether requests are currently drawn in one batch (for the last plan's window and limit).
    pub batching: bool,
    /// Measured cost of each extra row in a decode pass, in passes of one row; `None` before
    /// enough passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_cost: Option<f64>,
    /// The drawn share above which one batch is cheaper (for the last plan).
    pub batch_above_drawn_share: f64,
}

/// Learns whether early stopping saves enough samples to pay for its windows.
#[derive(Debug, Clone)]
pub struct WindowLearner {
    config: WindowConfig,
    drawn_share: Option<f64>,
    observations: u64,
    eligible: u64,
    /// Mean seconds of a one-row decode pass.
    one_row_seconds: Option<f64>,
    /// Mean cost of an extra row, in one-row passes (beta).
    row_cost: Option<f64>,
    row_cost_observations: u64,
    /// The last plan's (window, limit), for the report.
    last_plan: Option<(usize, usize)>,
}

impl WindowLearner {
    /// A learner that starts with windows.
    pub fn new(config: WindowConfig) -> Self {
        Self {
            config,
            drawn_share: None,
            observations: 0,
            eligible: 0,
            one_row_seconds: None,
            row_cost: None,
            row_cost_observations: 0,
            last_plan: None,
        }
    }

    fn ema(&self, mean: Option<f64>, value: f64) -> f64 {
        match mean {
            Some(mean) => mean + self.config.alpha * (value - mean),
            None => value,
        }
    }

    /// Learns the engine's cost curve from one decode pass of `rows` rows (all requests'
    /// rows, when requests shared it) that took `seconds`.
    pub fn observe_pass(&mut self, rows: usize, seconds: f64) {
        if rows == 0 || !seconds.is_finite() || seconds <= 0.0 {
            return;
        }
        if rows == 1 {
            self.one_row_seconds = Some(self.ema(self.one_row_seconds, seconds));
            return;
        }
        if let Some(one) = self.one_row_seconds {
            let beta = ((seconds / one - 1.0) / (rows - 1) as f64).clamp(0.0, 1.0);
            self.row_cost = Some(self.ema(self.row_cost, beta));
            self.row_cost_observations += 1;
        }
    }

    /// The drawn share above which one batch of `max_samples` costs less than windows of
    /// `window`.
    fn threshold(&self, window: usize, max_samples: usize) -> f64 {
        match self
            .row_cost
            .filter(|_| self.row_cost_observations >= self.config.min_observations)
        {
            Some(beta) => {
                let cost = |rows: usize| 1.0 + beta * (rows as f64 - 1.0);
                (window as f64 * cost(max_samples) / (max_samples as f64 * cost(window))).min(1.0)
            }
            None => self.config.batch_above_drawn_share,
        }
    }

    fn batching(&self, window: usize, max_samples: usize) -> bool {
        self.observations >= self.config.min_observations
            && self
                .drawn_share
                .is_some_and(|s| s >= self.threshold(window, max_samples))
    }

    /// The smallest sample limit (above `window`, up to `max_samples`) whose samples are drawn
    /// as one batch now; `usize::MAX` when none is.
    pub fn batch_from(&self, window: usize, max_samples: usize) -> usize {
        (window + 1..=max_samples)
            .find(|&m| self.batching(window, m))
            .unwrap_or(usize::MAX)
    }

    /// The window of a request whose plan allows `max_samples` in windows of `window`: `window`,
    /// or `max_samples` (one batch) while early stopping does not pay.
    pub fn window(&mut self, window: usize, max_samples: usize) -> usize {
        if window >= max_samples {
            return window;
        }
        self.last_plan = Some((window, max_samples));
        self.eligible += 1;
        let probe =
            self.config.probe_every > 0 && self.eligible.is_multiple_of(self.config.probe_every);
        if self.batching(window, max_samples) && !probe {
            max_samples
        } else {
            window
        }
    }

    /// Learns from a finished request that ran in windows of `window` and drew `samples` of its
    /// `max_samples`; batched requests (one window of all) teach nothing and are ignored.
    pub fn record(&mut self, window: usize, samples: usize, max_samples: usize) {
        if max_samples == 0 || window >= max_samples {
            return;
        }
        let share = (samples as f64 / max_samples as f64).min(1.0);
        self.drawn_share = Some(self.ema(self.drawn_share, share));
        self.observations += 1;
    }

    /// The learner's state.
    pub fn report(&self) -> WindowReport {
        let (window, max_samples) = self.last_plan.unwrap_or((2, 8));
        WindowReport {
            drawn_share: self.drawn_share,
            observations: self.observations,
            batching: self.batching(window, max_samples),
            row_cost: self
                .row_cost
                .filter(|_| self.row_cost_observations >= self.config.min_observations),
            batch_above_drawn_share: self.threshold(window, max_samples),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_while_windows_draw_nearly_everything_and_keeps_probing() {
        let mut learner = WindowLearner::new(WindowConfig::default());
        for _ in 0..8 {
            assert_eq!(learner.window(2, 8), 2, "windows until it has seen enough");
            learner.record(2, 8, 8);
        }
        assert!(learner.report().batching);
        let windows: Vec<usize> = (0..16).map(|_| learner.window(2, 8)).collect();
        assert_eq!(
            windows.iter().filter(|w| **w == 8).count(),
            14,
            "{windows:?}"
        );
        assert_eq!(
            windows.iter().filter(|w| **w == 2).count(),
            2,
            "probes: {windows:?}"
        );
        // Batched requests teach nothing.
        learner.record(8, 8, 8);
        assert_eq!(learner.report().observations, 8);
    }

    #[test]
    fn keeps_windows_while_early_stopping_saves_samples() {
        let mut learner = WindowLearner::new(WindowConfig::default());
        for _ in 0..20 {
            let window = learner.window(2, 8);
            assert_eq!(window, 2);
            learner.record(window, 2, 8);
        }
        let report = learner.report();
        assert!(!report.batching);
        assert!((report.drawn_share.unwrap() - 0.25).abs() < 1e-9);
    }

    #[test]
    fn returns_to_windows_when_probes_show_early_stops() {
        let mut learner = WindowLearner::new(WindowConfig::default());
        for _ in 0..8 {
            learner.record(2, 8, 8);
        }
        assert!(learner.report().batching);
        // The model got better: probes stop after the first window.
        for _ in 0..200 {
            let window = learner.window(2, 8);
            if window == 2 {
                learner.record(2, 2, 8);
            }
            if !learner.report().batching {
                return;
            }
        }
        panic!("still batching: {:?}", learner.report());
    }

    /// On an engine where 8 rows cost 2.5 one-row passes (beta = 3/14), windows of 2 of 8 pay
    /// only below a drawn share of about 0.51: a share of 0.6, which the default 0.8 would keep
    /// windowed, is batched once the cost curve is measured.
    #[test]
    fn the_measured_cost_curve_sets_the_threshold() {
        let mut learner = WindowLearner::new(WindowConfig::default());
        for _ in 0..10 {
            learner.record(2, 5, 8); // a drawn share of 0.625
        }
        assert_eq!(
            learner.window(2, 8),
            2,
            "0.625 < 0.8: windows before any measurement"
        );
        for _ in 0..10 {
            learner.observe_pass(1, 0.010);
            learner.observe_pass(8, 0.025);
        }
        let report = learner.report();
        let beta = report.row_cost.unwrap();
        assert!((beta - 1.5 / 7.0).abs() < 1e-9, "{beta}");
        let expected = 2.0 * (1.0 + 7.0 * beta) / (8.0 * (1.0 + beta));
        assert!((report.batch_above_drawn_share - expected).abs() < 1e-9);
        assert!((0.5..0.52).contains(&expected), "{expected}");
        assert!(report.batching);
        assert_eq!(learner.window(2, 8), 8);
        // Where rows cost the same alone or together, windows always pay.
        let mut flat = WindowLearner::new(WindowConfig::default());
        for _ in 0..10 {
            flat.record(2, 7, 8);
            flat.observe_pass(1, 0.010);
            flat.observe_pass(4, 0.040);
        }
        assert_eq!(flat.report().batch_above_drawn_share, 1.0);
        assert!(!flat.report().batching);
    }

    #[test]
    fn passes_before_a_one_row_pass_or_of_no_time_teach_nothing() {
        let mut learner = WindowLearner::new(WindowConfig::default());
        learner.observe_pass(8, 0.025);
        learner.observe_pass(0, 0.025);
        learner.observe_pass(1, 0.0);
        learner.observe_pass(1, f64::NAN);
        assert_eq!(learner.report().row_cost, None);
        assert_eq!(learner.report().batch_above_drawn_share, 0.8);
    }

    #[test]
    fn a_plan_of_one_window_is_left_alone() {
        let mut learner = WindowLearner::new(WindowConfig::default());
        assert_eq!(learner.window(4, 4), 4);
        assert_eq!(learner.window(4, 2), 4);
        assert_eq!(learner.report().observations, 0);
    }
}
