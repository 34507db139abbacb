//! What depth costs: a model of joules per request learned online from what the meter measured.
//!
//! Joules are modelled as `fixed + per_prompt_token * prompt_tokens + per_completion_token *
//! completion_tokens`, fitted by least squares over exponentially forgotten requests (so it
//! follows changes in clocks, batch sizes and co-tenants), coefficients kept non-negative. The
//! tokens a sample generates are tracked as an exponentially weighted mean, so the cost of a
//! depth not yet tried can be predicted.

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
    /// Joules per generated token.
    pub joules_per_completion_token: f64,
    /// Generated tokens per sample.
    pub tokens_per_sample: f64,
}

impl Default for CostPrior {
    fn default() -> Self {
        // A small model on two CPU cores: ~25 W, ~200 prefill and ~100 decode tokens/s.
        Self {
            fixed_joules: 0.5,
            joules_per_prompt_token: 0.1,
            joules_per_completion_token: 0.25,
            tokens_per_sample: 32.0,
        }
    }
}

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
}

/// The learned cost of depth.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthCost {
    /// The prior coefficients (fixed, per scaled prompt token, per scaled completion token).
    prior: [f64; 3],
    /// Exponentially weighted sufficient statistics of the least-squares fit: X'X and X'y.
    xtx: [[f64; 3]; 3],
    xty: [f64; 3],
    /// The current fit.
    theta: [f64; 3],
    decay: f64,
    ridge: f64,
    tokens_per_sample: f64,
    tokens_alpha: f64,
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
    /// Joules per generated token.
    pub joules_per_completion_token: f64,
    /// Generated tokens per sample (weighted mean).
    pub tokens_per_sample: f64,
    /// Requests learned from.
    pub observations: u64,
}

impl DepthCost {
    /// A model starting from `prior`.
    pub fn new(prior: CostPrior) -> Self {
        let prior_theta = [
            prior.fixed_joules.max(0.0),
            prior.joules_per_prompt_token.max(0.0) * TOKEN_SCALE,
            prior.joules_per_completion_token.max(0.0) * TOKEN_SCALE,
        ];
        Self {
            prior: prior_theta,
            xtx: [[0.0; 3]; 3],
            xty: [0.0; 3],
            theta: prior_theta,
            // About the last 50 requests count: follows clock, batch and co-tenant changes.
            decay: 0.98,
            // The prior weighs as a tenth of one request: it only decides directions the data
            // leaves open (a prompt length that never varies, say).
            ridge: 0.1,
            tokens_per_sample: prior.tokens_per_sample.max(1.0),
            tokens_alpha: 0.05,
            observations: 0,
        }
    }

    /// Learns from one measured request. Non-finite or negative measurements are ignored.
    pub fn observe(&mut self, observation: &CostObservation) {
        if !observation.joules.is_finite() || observation.joules < 0.0 {
            return;
        }
        let x = [
            1.0,
            observation.prompt_tokens as f64 / TOKEN_SCALE,
            observation.completion_tokens as f64 / TOKEN_SCALE,
        ];
        for i in 0..3 {
            for j in 0..3 {
                self.xtx[i][j] = self.decay * self.xtx[i][j] + x[i] * x[j];
            }
            self.xty[i] = self.decay * self.xty[i] + x[i] * observation.joules;
        }
        self.theta = self.fit();
        if observation.samples > 0 {
            let per_sample = observation.completion_tokens as f64 / observation.samples as f64;
            self.tokens_per_sample += self.tokens_alpha * (per_sample - self.tokens_per_sample);
            self.tokens_per_sample = self.tokens_per_sample.max(1.0);
        }
        self.observations += 1;
    }

    /// Ridge least squares towards the prior with non-negative coefficients (joules never fall
    /// as tokens grow): the exact optimum over the 8 faces of the non-negative orthant.
    fn fit(&self) -> [f64; 3] {
        let mut a = self.xtx;
        let mut b = self.xty;
        for i in 0..3 {
            a[i][i] += self.ridge;
            b[i] += self.ridge * self.prior[i];
        }
        let objective = |t: &[f64; 3]| {
            let mut f = 0.0;
            for i in 0..3 {
                for j in 0..3 {
                    f += t[i] * a[i][j] * t[j];
                }
                f -= 2.0 * b[i] * t[i];
            }
            f
        };
        let mut best = ([0.0; 3], 0.0);
        for mask in 1u8..8 {
            let free: Vec<usize> = (0..3).filter(|i| mask & (1 << i) != 0).collect();
            let Some(solution) = solve_subsystem(&a, &b, &free) else {
                continue;
            };
            let mut t = [0.0; 3];
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

    fn linear(&self, x: [f64; 3]) -> f64 {
        self.theta[0] * x[0] + self.theta[1] * x[1] + self.theta[2] * x[2]
    }

    /// Predicted joules of a request with `prompt_tokens` that generates `completion_tokens`.
    pub fn predict_tokens(&self, prompt_tokens: usize, completion_tokens: f64) -> f64 {
        self.linear([
            1.0,
            prompt_tokens as f64 / TOKEN_SCALE,
            completion_tokens.max(0.0) / TOKEN_SCALE,
        ])
        .max(0.0)
    }

    /// Predicted joules of `samples` samples (a mean may be fractional) of at most
    /// `max_tokens` tokens each.
    pub fn predict_samples(&self, prompt_tokens: usize, samples: f64, max_tokens: usize) -> f64 {
        let per_sample = self.tokens_per_sample.min(max_tokens.max(1) as f64);
        self.predict_tokens(prompt_tokens, samples.max(0.0) * per_sample)
    }

    /// Joules per generated token.
    pub fn joules_per_completion_token(&self) -> f64 {
        self.theta[2] / TOKEN_SCALE
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
            joules_per_completion_token: self.theta[2] / TOKEN_SCALE,
            tokens_per_sample: self.tokens_per_sample,
            observations: self.observations,
        }
    }
}

/// Solves `a[free][free] t = b[free]` by Gaussian elimination; `None` when singular.
fn solve_subsystem(a: &[[f64; 3]; 3], b: &[f64; 3], free: &[usize]) -> Option<Vec<f64>> {
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
    use crate::ttc::tasks::SplitMix64;

    #[test]
    fn learns_a_scripted_cost_within_five_percent() {
        // True cost: 2 J + 0.01 J per prompt token + 0.05 J per generated token, +-10% noise.
        let truth = |p: usize, c: usize| 2.0 + 0.01 * p as f64 + 0.05 * c as f64;
        let mut rng = SplitMix64::new(7);
        let mut model = DepthCost::new(CostPrior::default());
        for _ in 0..400 {
            let prompt = 20 + rng.below(180) as usize;
            let samples = 1 + rng.below(8) as usize;
            let completion = samples * (10 + rng.below(40) as usize);
            let noise = 0.9 + 0.2 * rng.unit();
            model.observe(&CostObservation {
                joules: truth(prompt, completion) * noise,
                prompt_tokens: prompt,
                completion_tokens: completion,
                samples,
            });
        }
        for (p, c) in [(50, 30), (150, 240), (100, 100)] {
            let predicted = model.predict_tokens(p, c as f64);
            let actual = truth(p, c);
            assert!(
                (predicted - actual).abs() / actual < 0.05,
                "p={p} c={c}: predicted {predicted:.3}, true {actual:.3}, {:?}",
                model.report()
            );
        }
        let per_sample = model.tokens_per_sample();
        assert!(
            (25.0..45.0).contains(&per_sample),
            "tokens per sample {per_sample}"
        );
        assert_eq!(model.report().observations, 400);
    }

    #[test]
    fn follows_a_cost_change_and_ignores_garbage() {
        let mut model = DepthCost::new(CostPrior::default());
        let obs = |joules| CostObservation {
            joules,
            prompt_tokens: 40,
            completion_tokens: 100,
            samples: 4,
        };
        for _ in 0..200 {
            model.observe(&obs(10.0));
        }
        assert!((model.predict_tokens(40, 100.0) - 10.0).abs() < 0.2);
        for _ in 0..200 {
            model.observe(&obs(20.0));
        }
        let after = model.predict_tokens(40, 100.0);
        assert!((after - 20.0).abs() < 0.5, "{after} {:?}", model.report());
        let before = model.clone();
        model.observe(&obs(f64::NAN));
        model.observe(&obs(-1.0));
        assert_eq!(model, before);
    }

    #[test]
    fn more_samples_never_cost_less() {
        let model = DepthCost::new(CostPrior::default());
        let costs: Vec<f64> = (1..=8)
            .map(|d| model.predict_samples(30, d as f64, 64))
            .collect();
        assert!(costs.windows(2).all(|w| w[1] > w[0]), "{costs:?}");
        // A low max_tokens caps the per-sample estimate.
        assert!(model.predict_samples(30, 4.0, 4) < model.predict_samples(30, 4.0, 64));
    }
}
