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

/// A token choice with two log-probabilities of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    pub token: u32,
    /// Under the model (temperature 1, before truncation), which verifiers and weighted votes
    /// use.
    pub logprob: f32,
    /// Under the sampling distribution of the row's configuration (its temperature, before
    /// top-k and top-p truncation, which only raise a kept token's share): how likely a sampled
    /// row is to pick this token here. 0 when the configuration is greedy. Summed over a row, it
    /// bounds from below how likely a sample is to retrace the row exactly.
    pub sample_logprob: f32,
}

/// One row's sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplerConfig,
    rng: StdRng,
    /// Decodes greedily whatever `config` says (`config` still prices the picks).
    greedy: bool,
}

impl Sampler {
    /// A sampler seeded with `seed`.
    pub fn new(config: SamplerConfig, seed: u64) -> Self {
        Self {
            config,
            rng: StdRng::seed_from_u64(seed),
            greedy: false,
        }
    }

    /// A sampler that picks the most likely token while its picks' `sample_logprob` prices them
    /// under `config`: the greedy row of a batch of samples, which says how likely those samples
    /// are to retrace it.
    pub fn greedy_within(config: SamplerConfig) -> Self {
        Self {
            config,
            rng: StdRng::seed_from_u64(0),
            greedy: true,
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
        let temperature = self.config.temperature;
        let token = if temperature <= 0.0 || self.greedy {
            best
        } else {
            self.sample(logits, max)
        };
        let sample_logprob = if temperature <= 0.0 {
            0.0
        } else if temperature == 1.0 {
            logits[token] - log_z
        } else {
            let inv_t = 1.0 / temperature;
            let log_z_t = logits
                .iter()
                .map(|x| ((x - max) * inv_t).exp())
                .sum::<f32>()
                .ln();
            (logits[token] - max) * inv_t - log_z_t
        };
        Pick {
            token: token as u32,
            logprob: logits[token] - log_z,
            sample_logprob,
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
    fn a_greedy_row_within_samples_is_priced_at_their_temperature() {
        let logits = [0.0, 2.0, 1.0];
        let config = SamplerConfig {
            temperature: 0.5,
            ..Default::default()
        };
        let mut s = Sampler::greedy_within(config);
        let pick = s.pick(&logits);
        assert_eq!(pick.token, 1);
        // At T = 0.5 the logits double: the best token's share is e^4 / (1 + e^4 + e^2).
        let expected = 4.0 - (1f32 + 4f32.exp() + 2f32.exp()).ln();
        assert!((pick.sample_logprob - expected).abs() < 1e-5);
        assert!(
            pick.sample_logprob > pick.logprob,
            "cooler sampling favours the best token"
        );
        let mut greedy = Sampler::new(
            SamplerConfig {
                temperature: 0.0,
                ..config
            },
            1,
        );
        assert_eq!(
            greedy.pick(&logits).sample_logprob,
            0.0,
            "greedy retraces itself"
        );
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
