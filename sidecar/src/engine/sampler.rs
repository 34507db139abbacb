//! Turning one row of logits into a token: greedy, or temperature with top-k and top-p, from a
//! per-row seeded generator so that a request with a seed is reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling threshold in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables it.
    pub top_k: usize,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
        }
    }
}

/// A token choice and its log-probability under the model (temperature 1, before truncation),
/// which verifiers and weighted votes use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    pub token: u32,
    pub logprob: f32,
}

/// One row's sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplerConfig,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded with `seed`.
    pub fn new(config: SamplerConfig, seed: u64) -> Self {
        Self {
            config,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Picks the next token from `logits` (one row, any length).
    pub fn pick(&mut self, logits: &[f32]) -> Pick {
        let (best, max) =
            logits
                .iter()
                .copied()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |acc, (i, x)| {
                    if x > acc.1 { (i, x) } else { acc }
                });
        let log_z = max + logits.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
        let token = if self.config.temperature <= 0.0 {
            best
        } else {
            self.sample(logits, max)
        };
        Pick {
            token: token as u32,
            logprob: logits[token] - log_z,
        }
    }

    fn sample(&mut self, logits: &[f32], max: f32) -> usize {
        let inv_t = 1.0 / self.config.temperature;
        // Tokens below e^-30 of the best one can never matter; dropping them keeps the sort short.
        let floor = max - 30.0 * self.config.temperature;
        let mut candidates: Vec<(usize, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, x)| **x >= floor)
            .map(|(i, x)| (i, ((x - max) * inv_t).exp()))
            .collect();
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if self.config.top_k > 0 {
            candidates.truncate(self.config.top_k);
        }
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        if self.config.top_p < 1.0 {
            let mut kept = 0.0;
            let limit = self.config.top_p * total;
            let cut = candidates
                .iter()
                .position(|c| {
                    kept += c.1;
                    kept >= limit
                })
                .map_or(candidates.len(), |i| i + 1);
            candidates.truncate(cut);
        }
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        let mut target = self.rng.random::<f32>() * total;
        for (i, p) in &candidates {
            target -= p;
            if target <= 0.0 {
                return *i;
            }
        }
        candidates.last().map_or(0, |c| c.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_maximum_with_its_logprob() {
        let mut s = Sampler::new(
            SamplerConfig {
                temperature: 0.0,
                ..Default::default()
            },
            1,
        );
        let pick = s.pick(&[0.0, 2.0, 1.0]);
        assert_eq!(pick.token, 1);
        let expected = 2.0 - (1f32 + 2f32.exp() + 1f32.exp()).ln();
        assert!((pick.logprob - expected).abs() < 1e-5);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(
            SamplerConfig {
                temperature: 1.5,
                top_p: 1.0,
                top_k: 1,
            },
            7,
        );
        for _ in 0..50 {
            assert_eq!(s.pick(&[0.1, 0.3, 0.2, 0.25]).token, 1);
        }
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // Token 0 holds ~88% of the mass; with top_p 0.5 only it survives.
        let mut s = Sampler::new(
            SamplerConfig {
                temperature: 1.0,
                top_p: 0.5,
                top_k: 0,
            },
            3,
        );
        for _ in 0..100 {
            assert_eq!(s.pick(&[3.0, 0.0, 0.0, 0.0]).token, 0);
        }
    }

    #[test]
    fn same_seed_same_tokens_and_sampling_varies() {
        let logits = [1.0, 1.0, 1.0, 1.0, 1.0];
        let config = SamplerConfig::default();
        let a: Vec<u32> = (0..20)
            .map({
                let mut s = Sampler::new(config, 9);
                move |_| s.pick(&logits).token
            })
            .collect();
        let b: Vec<u32> = (0..20)
            .map({
                let mut s = Sampler::new(config, 9);
                move |_| s.pick(&logits).token
            })
            .collect();
        assert_eq!(a, b);
        assert!(
            a.iter().any(|t| *t != a[0]),
            "uniform sampling never varied: {a:?}"
        );
    }
}
