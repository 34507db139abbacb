//! What depth costs: a model of joules per request learned online from what the meter measured.
//!
//! Joules are modelled as `fixed + per_prompt_token * prompt_tokens + per_pass * decode_passes +
//! per_completion_token * completion_tokens`, fitted by least squares over exponentially
//! forgotten requests (so it follows changes in clocks, batch sizes and co-tenants),
//! coefficients kept non-negative. Passes and tokens are separate because the engine batches: a
//! window of 8 samples runs as many decode passes as its longest sample, each pass streaming
//! the weights once for all 8 rows, so an extra row costs a fraction of a pass (on this
//! project's CPU engine 8 rows cost 1.7 one-row passes). A model in tokens alone would price 8
//! samples at 8 times one and keep requests shallower than the budget allows. The tokens a
//! sample generates and the passes a window runs are tracked as exponentially weighted means
//! (starting from the first request, not the prior), so the cost of a depth not yet tried can
//! be predicted.

use serde::{Deserialize, Serialize};

/// Scale of token counts inside the regression, so all three features are of order one and the
/// least-squares update stays well conditioned.
const TOKEN_SCALE: f64 = 100.0;

/// Starting guesses of the cost model, used until measurements take over.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CostPrior {
    /// Joules per request independent of tokens.
    pub fixed_joules: f64,
    /// Joules per prompt token.
    pub joules_per_prompt_token: f64,
    /// Joules per decode pass (one token for every row of a window).
    pub joules_per_decode_pass: f64,
    /// Joules per generated token on top of its pass (an extra row's share).
    pub joules_per_completion_token: f64,
    /// Generated tokens per sample.
    pub tokens_per_sample: f64,
}

impl Default for CostPrior {
    fn default() -> Self {
        // A small model on two CPU cores at ~25 W: ~1000 prefill tokens/s, ~200 one-row decode
        // passes/s, an extra row about a tenth of a pass.
        Self {
            fixed_joules: 0.2,
            joules_per_prompt_token: 0.025,
            joules_per_decode_pass: 0.12,
            joules_per_completion_token: 0.012,
            tokens_per_sample: 32.0,
        }
    }
}

/// Features of the regression: constant, prompt tokens, decode passes, completion tokens.
const FEATURES: usize = 4;

/// One measured request, as the cost model learns from it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CostObservation {
    /// Measured joules of the whole request.
    pub joules: f64,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens over all samples.
    pub completion_tokens: usize,
    /// Samples drawn.
    pub samples: usize,
    /// Windows (batches of samples) drawn.
    pub windows: usize,
    /// Decode passes: each window's longest sample, summed.
    pub decode_passes: usize,
}

/// The learned cost of depth.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthCost {
    /// The prior coefficients (fixed, then per scaled prompt token, pass and completion token).
    prior: [f64; FEATURES],
    /// Exponentially weighted sufficient statistics of the least-squares fit: X'X and X'y.
    xtx: [[f64; FEATURES]; FEATURES],
    xty: [f64; FEATURES],
    /// The current fit.
    theta: [f64; FEATURES],
    decay: f64,
    ridge: f64,
    tokens_per_sample: f64,
    /// Decode passes per window.
    passes_per_window: f64,
    /// Weight of the newest request in the two means above.
    mean_alpha: f64,
    observations: u64,
}

/// The cost model's current coefficients, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DepthCostReport {
    /// Joules per request independent of tokens.
    pub fixed_joules: f64,
    /// Joules per prompt token.
    pub joules_per_prompt_token: f64,
    /// Joules per decode pass.
    pub joules_per_decode_pass: f64,
    /// Joules per generated token on top of its pass.
    pub joules_per_completion_token: f64,
    /// Generated tokens per sample (weighted mean).
    pub tokens_per_sample: f64,
    /// Decode passes per window (weighted mean).
    pub passes_per_window: f64,
    /// Requests learned from.
    pub observations: u64,
}

impl DepthCost {
    /// A model starting from `prior`.
    pub fn new(prior: CostPrior) -> Self {
        let prior_theta = [
            prior.fixed_joules.max(0.0),
            prior.joules_per_prompt_token.max(0.0) * TOKEN_SCALE,
            prior.joules_per_decode_pass.max(0.0) * TOKEN_SCALE,
            prior.joules_per_completion_token.max(0.0) * TOKEN_SCALE,
        ];
        Self {
            prior: prior_theta,
            xtx: [[0.0; FEATURES]; FEATURES],
            xty: [0.0; FEATURES],
            theta: prior_theta,
            // About the last 50 requests count: follows clock, batch and co-tenant changes.
            decay: 0.98,
            // The prior weighs as a tenth of one request: it only decides directions the data
            // leaves open (a prompt length that never varies, say).
            ridge: 0.1,
            tokens_per_sample: prior.tokens_per_sample.max(1.0),
            passes_per_window: prior.tokens_per_sample.max(1.0),
            mean_alpha: 0.05,
            observations: 0,
        }
    }

    /// Learns from one measured request. Non-finite or negative measurements are ignored.
    pub fn observe(&mut self, observation: &CostObservation) {
        if !observation.joules.is_finite() || observation.joules < 0.0 {
            return;
        }
        let x = Self::features(
            observation.prompt_tokens as f64,
            observation.decode_passes as f64,
            observation.completion_tokens as f64,
        );
        for i in 0..FEATURES {
            for j in 0..FEATURES {
                self.xtx[i][j] = self.decay * self.xtx[i][j] + x[i] * x[j];
            }
            self.xty[i] = self.decay * self.xty[i] + x[i] * observation.joules;
        }
        self.theta = self.fit();
        // The first request replaces the prior's guesses; later ones move the means.
        let alpha = if self.observations == 0 {
            1.0
        } else {
            self.mean_alpha
        };
        if observation.samples > 0 {
            let per_sample = observation.completion_tokens as f64 / observation.samples as f64;
            self.tokens_per_sample += alpha * (per_sample - self.tokens_per_sample);
            self.tokens_per_sample = self.tokens_per_sample.max(1.0);
        }
        if observation.windows > 0 {
            let per_window = observation.decode_passes as f64 / observation.windows as f64;
            self.passes_per_window += alpha * (per_window - self.passes_per_window);
            self.passes_per_window = self.passes_per_window.max(1.0);
        }
        self.observations += 1;
    }

    fn features(prompt_tokens: f64, passes: f64, completion_tokens: f64) -> [f64; FEATURES] {
        [
            1.0,
            prompt_tokens / TOKEN_SCALE,
            passes.max(0.0) / TOKEN_SCALE,
            completion_tokens.max(0.0) / TOKEN_SCALE,
        ]
    }

    /// Ridge least squares towards the prior with non-negative coefficients (joules never fall
    /// as tokens grow): the exact optimum over the faces of the non-negative orthant.
    fn fit(&self) -> [f64; FEATURES] {
        let mut a = self.xtx;
        let mut b = self.xty;
        for i in 0..FEATURES {
            a[i][i] += self.ridge;
            b[i] += self.ridge * self.prior[i];
        }
        let objective = |t: &[f64; FEATURES]| {
            let mut f = 0.0;
            for i in 0..FEATURES {
                for j in 0..FEATURES {
                    f += t[i] * a[i][j] * t[j];
                }
                f -= 2.0 * b[i] * t[i];
            }
            f
        };
        let mut best = ([0.0; FEATURES], 0.0);
        for mask in 1u8..(1 << FEATURES) {
            let free: Vec<usize> = (0..FEATURES).filter(|i| mask & (1 << i) != 0).collect();
            let Some(solution) = solve_subsystem(&a, &b, &free) else {
                continue;
            };
            let mut t = [0.0; FEATURES];
            for (k, i) in free.iter().enumerate() {
                t[*i] = solution[k];
            }
            if t.iter().any(|v| *v < 0.0 || !v.is_finite()) {
                continue;
            }
            let f = objective(&t);
            if f < best.1 {
                best = (t, f);
            }
        }
        best.0
    }

    /// Predicted joules of a request with `prompt_tokens` that runs `passes` decode passes and
    /// generates `completion_tokens` over all its samples.
    pub fn predict(&self, prompt_tokens: usize, passes: f64, completion_tokens: f64) -> f64 {
        let x = Self::features(prompt_tokens as f64, passes, completion_tokens);
        (0..FEATURES)
            .map(|i| self.theta[i] * x[i])
            .sum::<f64>()
            .max(0.0)
    }

    /// Predicted joules of one sample of `tokens` tokens (every token its own pass).
    pub fn predict_tokens(&self, prompt_tokens: usize, tokens: f64) -> f64 {
        self.predict(prompt_tokens, tokens, tokens)
    }

    /// Predicted joules of `samples` samples (a mean may be fractional) drawn in `windows`
    /// windows, of at most `max_tokens` tokens each.
    pub fn predict_samples(
        &self,
        prompt_tokens: usize,
        samples: f64,
        windows: f64,
        max_tokens: usize,
    ) -> f64 {
        let cap = max_tokens.max(1) as f64;
        let per_sample = self.tokens_per_sample.min(cap);
        let per_window = self.passes_per_window.min(cap);
        self.predict(
            prompt_tokens,
            windows.max(0.0) * per_window,
            samples.max(0.0) * per_sample,
        )
    }

    /// Generated tokens per sample (weighted mean).
    pub fn tokens_per_sample(&self) -> f64 {
        self.tokens_per_sample
    }

    /// The coefficients, for metrics.
    pub fn report(&self) -> DepthCostReport {
        DepthCostReport {
            fixed_joules: self.theta[0],
            joules_per_prompt_token: self.theta[1] / TOKEN_SCALE,
            joules_per_decode_pass: self.theta[2] / TOKEN_SCALE,
            joules_per_completion_token: self.theta[3] / TOKEN_SCALE,
            tokens_per_sample: self.tokens_per_sample,
            passes_per_window: self.passes_per_window,
            observations: self.observations,
        }
    }
}

/// Solves `a[free][free] t = b[free]` by Gaussian elimination; `None` when singular.
fn solve_subsystem(
    a: &[[f64; FEATURES]; FEATURES],
    b: &[f64; FEATURES],
    free: &[usize],
) -> Option<Vec<f64>> {
    let n = free.len();
    let mut m: Vec<Vec<f64>> = free
        .iter()
        .map(|&i| {
            let mut row: Vec<f64> = free.iter().map(|&j| a[i][j]).collect();
            row.push(b[i]);
            row
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n).max_by(|&r, &s| m[r][col].abs().total_cmp(&m[s][col].abs()))?;
        if m[pivot][col].abs() < 1e-12 {
            return None;
        }
        m.swap(col, pivot);
        let pivot_row = m[col].clone();
        for (r, row) in m.iter_mut().enumerate() {
            if r != col {
                let factor = row[col] / pivot_row[col];
                for (cell, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                    *cell -= factor * p;
                }
            }
        }
    }
    Some((0..n).map(|i| m[i][n] / m[i][i]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// A request of `samples` samples of 10-50 tokens in `windows` windows: (passes, tokens).
    fn scripted_request(rng: &mut SplitMix64, samples: usize, windows: usize) -> (usize, usize) {
        let (mut passes, mut tokens) = (0, 0);
        for w in 0..windows {
            let rows = samples / windows + usize::from(w < samples % windows);
            let lengths: Vec<usize> = (0..rows).map(|_| 10 + rng.below(40) as usize).collect();
            passes += lengths.iter().max().copied().unwrap_or(0);
            tokens += lengths.iter().sum::<usize>();
        }
        (passes, tokens)
    }

    #[test]
    fn learns_a_scripted_batched_cost_within_five_percent() {
        // True cost: 2 J + 0.01 J per prompt token + 0.08 J per pass + 0.01 J per token, +-10%.
        let truth = |p: usize, passes: usize, c: usize| {
            2.0 + 0.01 * p as f64 + 0.08 * passes as f64 + 0.01 * c as f64
        };
        let mut rng = SplitMix64::new(7);
        let mut model = DepthCost::new(CostPrior::default());
        for _ in 0..400 {
            let prompt = 20 + rng.below(180) as usize;
            let samples = 1 + rng.below(8) as usize;
            let windows = 1 + rng.below(samples as u64) as usize;
            let (passes, completion) = scripted_request(&mut rng, samples, windows);
            let noise = 0.9 + 0.2 * rng.unit();
            model.observe(&CostObservation {
                joules: truth(prompt, passes, completion) * noise,
                prompt_tokens: prompt,
                completion_tokens: completion,
                samples,
                windows,
                decode_passes: passes,
            });
        }
        for (p, passes, c) in [(50, 30, 30), (150, 40, 240), (100, 100, 100)] {
            let predicted = model.predict(p, passes as f64, c as f64);
            let actual = truth(p, passes, c);
            assert!(
                (predicted - actual).abs() / actual < 0.05,
                "p={p} passes={passes} c={c}: predicted {predicted:.3}, true {actual:.3}, {:?}",
                model.report()
            );
        }
        let report = model.report();
        assert!(
            (25.0..45.0).contains(&report.tokens_per_sample),
            "tokens per sample {report:?}"
        );
        assert!(
            report.passes_per_window > report.tokens_per_sample,
            "a window's longest sample is longer than the mean: {report:?}"
        );
        assert_eq!(report.observations, 400);
        // On this engine 8 samples in one batch cost far less than 8 single samples.
        let one = model.predict_samples(50, 1.0, 1.0, 64);
        let eight = model.predict_samples(50, 8.0, 1.0, 64);
        assert!(
            eight < 3.0 * one,
            "8 in one batch {eight:.2} J vs one {one:.2} J"
        );
    }

    #[test]
    fn the_first_request_replaces_the_priors_lengths() {
        let mut model = DepthCost::new(CostPrior::default());
        model.observe(&CostObservation {
            joules: 1.0,
            prompt_tokens: 40,
            completion_tokens: 24,
            samples: 4,
            windows: 2,
            decode_passes: 14,
        });
        let report = model.report();
        assert_eq!(
            (report.tokens_per_sample, report.passes_per_window),
            (6.0, 7.0)
        );
    }

    #[test]
    fn follows_a_cost_change_and_ignores_garbage() {
        let mut model = DepthCost::new(CostPrior::default());
        let obs = |joules| CostObservation {
            joules,
            prompt_tokens: 40,
            completion_tokens: 100,
            samples: 4,
            windows: 1,
            decode_passes: 30,
        };
        for _ in 0..200 {
            model.observe(&obs(10.0));
        }
        assert!((model.predict(40, 30.0, 100.0) - 10.0).abs() < 0.2);
        for _ in 0..200 {
            model.observe(&obs(20.0));
        }
        let after = model.predict(40, 30.0, 100.0);
        assert!((after - 20.0).abs() < 0.5, "{after} {:?}", model.report());
        let before = model.clone();
        model.observe(&obs(f64::NAN));
        model.observe(&obs(-1.0));
        assert_eq!(model, before);
    }

    #[test]
    fn more_samples_or_windows_never_cost_less() {
        let model = DepthCost::new(CostPrior::default());
        let costs: Vec<f64> = (1..=8)
            .map(|d| model.predict_samples(30, d as f64, 1.0, 64))
            .collect();
        assert!(costs.windows(2).all(|w| w[1] > w[0]), "{costs:?}");
        assert!(model.predict_samples(30, 4.0, 2.0, 64) > model.predict_samples(30, 4.0, 1.0, 64));
        // A low max_tokens caps the per-sample estimate.
        assert!(model.predict_samples(30, 4.0, 1.0, 4) < model.predict_samples(30, 4.0, 1.0, 64));
    }
}
