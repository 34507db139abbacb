//! Statistics the evaluation reports: accuracy with a confidence interval, pass@k.

use serde::{Deserialize, Serialize};

/// A proportion with its Wilson score interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Proportion {
    /// Successes over trials (0 when there are no trials).
    pub estimate: f64,
    /// Lower bound of the interval.
    pub low: f64,
    /// Upper bound of the interval.
    pub high: f64,
    /// Trials.
    pub trials: u64,
}

/// The arithmetic mean of `values` (0 for none).
pub fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// `successes` of `trials` with a 95% Wilson score interval, which stays inside [0, 1] and is
/// honest at 0% and 100% (where the normal approximation collapses to a point).
pub fn wilson_95(successes: u64, trials: u64) -> Proportion {
    wilson(successes, trials, 1.959_964)
}

/// `successes` of `trials` with a Wilson score interval at `z` standard deviations.
pub fn wilson(successes: u64, trials: u64, z: f64) -> Proportion {
    if trials == 0 {
        return Proportion {
            estimate: 0.0,
            low: 0.0,
            high: 1.0,
            trials,
        };
    }
    let n = trials as f64;
    let p = successes.min(trials) as f64 / n;
    let z2 = z * z;
    let denominator = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denominator;
    let spread = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denominator;
    Proportion {
        estimate: p,
        low: (centre - spread).max(0.0),
        high: (centre + spread).min(1.0),
        trials,
    }
}

/// The unbiased pass@k estimate from `n` samples of which `correct` are right (Chen et al.
/// 2021): the probability that at least one of `k` samples drawn without replacement is right.
/// `None` when `k` is 0 or more than `n`.
pub fn pass_at_k(n: u64, correct: u64, k: u64) -> Option<f64> {
    if k == 0 || k > n {
        return None;
    }
    let correct = correct.min(n);
    if n - correct < k {
        return Some(1.0);
    }
    // 1 - C(n - c, k) / C(n, k) as a running product, stable for large n.
    let mut all_wrong = 1.0;
    for i in (n - correct + 1)..=n {
        all_wrong *= 1.0 - k as f64 / i as f64;
    }
    Some(1.0 - all_wrong)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_reference_values() {
        // 62 of 100 at 95%: 0.5221-0.7091 (reference values of the Wilson interval).
        let p = wilson_95(62, 100);
        assert!((p.estimate - 0.62).abs() < 1e-12);
        assert!((p.low - 0.5221).abs() < 5e-4, "{p:?}");
        assert!((p.high - 0.7091).abs() < 5e-4, "{p:?}");
        // 0 of 40 still has an upper bound above zero.
        let zero = wilson_95(0, 40);
        assert_eq!(zero.low, 0.0);
        assert!((zero.high - 0.0876).abs() < 5e-4, "{zero:?}");
        let none = wilson_95(0, 0);
        assert_eq!((none.low, none.high), (0.0, 1.0));
    }

    #[test]
    fn pass_at_k_matches_the_closed_form() {
        // n = 8, c = 2, k = 2: 1 - C(6,2)/C(8,2) = 1 - 15/28.
        let p = pass_at_k(8, 2, 2).unwrap_or(f64::NAN);
        assert!((p - (1.0 - 15.0 / 28.0)).abs() < 1e-12, "{p}");
        assert_eq!(pass_at_k(8, 0, 4), Some(0.0));
        assert_eq!(pass_at_k(8, 7, 2), Some(1.0));
        // pass@1 is the plain accuracy.
        let p1 = pass_at_k(16, 5, 1).unwrap_or(f64::NAN);
        assert!((p1 - 5.0 / 16.0).abs() < 1e-12);
        assert_eq!(pass_at_k(4, 1, 5), None);
        assert_eq!(pass_at_k(4, 1, 0), None);
    }
}
