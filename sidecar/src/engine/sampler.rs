//! Turning one row of logits into a token: greedy, or temperature with top-k and top-p, from a
//! per-row seeded generator so that a request with a seed is reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ttc_kernels::exp::{exp, sum_exp};

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
        let (best, max) = argmax(logits);
        // The normalisers run over the whole vocabulary for every row at every step: the
        // vectorised sum keeps each to tens of microseconds (libm's expf: about 170 us on
        // SmolLM2's 49 152 tokens).
        let z = sum_exp(logits, max, 1.0);
        let log_z = max + z.ln();
        let temperature = self.config.temperature;
        if temperature <= 0.0 {
            return Pick {
                token: best as u32,
                logprob: logits[best] - log_z,
                sample_logprob: 0.0,
            };
        }
        let inv_t = 1.0 / temperature;
        let z_t = if temperature == 1.0 {
            z
        } else {
            sum_exp(logits, max, inv_t)
        };
        let token = if self.greedy {
            best
        } else {
            self.sample(logits, max, inv_t, z_t, best)
        };
        Pick {
            token: token as u32,
            logprob: logits[token] - log_z,
            sample_logprob: (logits[token] - max) * inv_t - z_t.ln(),
        }
    }

    /// Draws a token with probability `e^((x - max) inv_t) / z_t` (`z_t` their sum), after top-k
    /// and top-p where configured; `best` (the most likely token) where rounding leaves the draw
    /// past the last token.
    fn sample(&mut self, logits: &[f32], max: f32, inv_t: f32, z_t: f32, best: usize) -> usize {
        if self.config.top_k == 0 && self.config.top_p >= 1.0 {
            // Plain temperature (what test-time compute samples with): one scan to the drawn
            // point of the cumulative weights, no sort. Sorting the vocabulary at every step
            // cost a third of a batch of 8 samples' decode throughput.
            // Whole blocks are skipped by their vectorised sums; only the block the draw falls
            // in is scanned token by token.
            const BLOCK: usize = 256;
            let mut target = self.rng.random::<f32>() * z_t;
            for (b, block) in logits.chunks(BLOCK).enumerate() {
                let weight = sum_exp(block, max, inv_t);
                if target > weight {
                    target -= weight;
                    continue;
                }
                for (j, &x) in block.iter().enumerate() {
                    target -= exp((x - max) * inv_t);
                    if target <= 0.0 {
                        return b * BLOCK + j;
                    }
                }
            }
            return best;
        }
        // Tokens below e^-30 of the best one can never matter; dropping them keeps the sort short.
        let floor = max - 30.0 / inv_t;
        let mut candidates: Vec<(usize, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, x)| **x >= floor)
            .map(|(i, x)| (i, exp((x - max) * inv_t)))
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

/// The first position of the largest value and the value (`(0, -inf)` for none): the maximum
/// vectorised ([`ttc_kernels::exp::max`]), then its first position.
fn argmax(values: &[f32]) -> (usize, f32) {
    let max = ttc_kernels::exp::max(values);
    (values.iter().position(|&x| x == max).unwrap_or(0), max)
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
    fn argmax_finds_the_first_largest_value() {
        let mut values: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32).collect();
        values[517] = 500.0;
        values[900] = 500.0;
        assert_eq!(argmax(&values), (517, 500.0));
        assert_eq!(argmax(&[3.0, 1.0]), (0, 3.0));
        assert_eq!(argmax(&[]), (0, f32::NEG_INFINITY));
    }

    /// The block scan draws each token as often as its probability at the temperature.
    #[test]
    fn temperature_sampling_follows_the_tempered_distribution() {
        // 600 tokens (blocks of 256 and a partial one), three of them likely.
        let mut logits = vec![-5.0f32; 600];
        (logits[3], logits[300], logits[599]) = (2.0, 1.5, 1.0);
        let config = SamplerConfig {
            temperature: 0.7,
            ..Default::default()
        };
        let weights: Vec<f64> = logits
            .iter()
            .map(|&x| (f64::from(x - 2.0) / 0.7).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut sampler = Sampler::new(config, 11);
        let draws = 20_000;
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[sampler.pick(&logits).token as usize] += 1;
        }
        for token in [3, 300, 599] {
            let expected = weights[token] / total;
            let seen = counts[token] as f64 / f64::from(draws);
            assert!(
                (seen - expected).abs() < 0.015,
                "token {token}: drawn {seen:.3}, probability {expected:.3}"
            );
        }
        let tail =
            1.0 - [3, 300, 599].iter().map(|&t| counts[t]).sum::<usize>() as f64 / f64::from(draws);
        let expected_tail = 1.0 - [3, 300, 599].iter().map(|&t| weights[t]).sum::<f64>() / total;
        assert!(
            (tail - expected_tail).abs() < 0.015,
            "tail {tail:.3} vs {expected_tail:.3}"
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
