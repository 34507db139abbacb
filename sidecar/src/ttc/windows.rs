//! Whether early stopping pays on this pod: windows or one batch.
//!
//! Drawing a request's samples in small windows lets it stop as soon as they agree, but on a
//! batched engine one window of `w` samples costs much less than `w` single samples, so several
//! windows cost more than one batch of all of them. Windows pay only when they stop early often
//! enough. The learner watches how much of its sample limit each windowed request actually drew;
//! while that share stays high (the samples rarely agree early: a weak model, hard questions), the
//! pod draws each request's samples as one batch, and it keeps one request in `probe_every`
//! windowed so that it notices when early stopping starts to pay.

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
    /// Whether requests are currently drawn in one batch.
    pub batching: bool,
}

/// Learns whether early stopping saves enough samples to pay for its windows.
#[derive(Debug, Clone)]
pub struct WindowLearner {
    config: WindowConfig,
    drawn_share: Option<f64>,
    observations: u64,
    eligible: u64,
}

impl WindowLearner {
    /// A learner that starts with windows.
    pub fn new(config: WindowConfig) -> Self {
        Self {
            config,
            drawn_share: None,
            observations: 0,
            eligible: 0,
        }
    }

    fn batching(&self) -> bool {
        self.observations >= self.config.min_observations
            && self
                .drawn_share
                .is_some_and(|s| s >= self.config.batch_above_drawn_share)
    }

    /// The window of a request whose plan allows `max_samples` in windows of `window`: `window`,
    /// or `max_samples` (one batch) while early stopping does not pay.
    pub fn window(&mut self, window: usize, max_samples: usize) -> usize {
        if window >= max_samples {
            return window;
        }
        self.eligible += 1;
        let probe =
            self.config.probe_every > 0 && self.eligible.is_multiple_of(self.config.probe_every);
        if self.batching() && !probe {
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
        self.drawn_share = Some(match self.drawn_share {
            Some(mean) => mean + self.config.alpha * (share - mean),
            None => share,
        });
        self.observations += 1;
    }

    /// The learner's state.
    pub fn report(&self) -> WindowReport {
        WindowReport {
            drawn_share: self.drawn_share,
            observations: self.observations,
            batching: self.batching(),
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

    #[test]
    fn a_plan_of_one_window_is_left_alone() {
        let mut learner = WindowLearner::new(WindowConfig::default());
        assert_eq!(learner.window(4, 4), 4);
        assert_eq!(learner.window(4, 2), 4);
        assert_eq!(learner.report().observations, 0);
    }
}
