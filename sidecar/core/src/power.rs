//! A power cap (or a joules-per-window budget) as joules per request.
//!
//! The budget controller holds a mean joules per request. A pod's power cap `W` bounds that mean
//! by the request rate `r`: spending `J` per request at `r` requests per second draws `J x r`
//! watts, so the cap allows `W / r` joules per request. The rate is measured over the policy's
//! window (`spec.budget.windowSeconds`), and a joules-per-window budget `E` is the cap
//! `E / windowSeconds`. With no requests yet the cap allows anything: the first request's
//! measurement starts the rate.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The shortest span a rate is measured over, so that the first few requests of a window do not
/// make a burst look like a permanent rate.
const MIN_SPAN: Duration = Duration::from_secs(5);

/// A pod's power limit and the request rate it is spent at.
#[derive(Debug, Clone)]
pub struct PowerBudget {
    watts: Option<f64>,
    window: Duration,
    default_window: Duration,
    finished: VecDeque<Instant>,
    since: Instant,
}

impl PowerBudget {
    /// No limit yet; the rate is measured from `now` over `default_window` until a limit names
    /// its own window (the policy's default `windowSeconds`).
    pub fn new(now: Instant, default_window: Duration) -> Self {
        Self {
            watts: None,
            window: default_window,
            default_window,
            finished: VecDeque::new(),
            since: now,
        }
    }

    /// Sets the limit: the tighter of a power cap in watts and a joules-per-window budget over
    /// `window` (`None`, or a non-positive figure, for none).
    pub fn set_limits(
        &mut self,
        watts: Option<f64>,
        joules_per_window: Option<f64>,
        window: Option<Duration>,
    ) {
        self.window = window
            .filter(|w| !w.is_zero())
            .unwrap_or(self.default_window);
        let positive = |x: Option<f64>| x.filter(|v| v.is_finite() && *v > 0.0);
        let from_energy = positive(joules_per_window).map(|j| j / self.window.as_secs_f64());
        self.watts = match (positive(watts), from_energy) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// The power limit in watts, if any.
    pub fn watts(&self) -> Option<f64> {
        self.watts
    }

    /// Notes a finished request.
    pub fn record(&mut self, now: Instant) {
        self.finished.push_back(now);
        self.forget_before(now);
    }

    fn forget_before(&mut self, now: Instant) {
        while let Some(first) = self.finished.front() {
            if now.saturating_duration_since(*first) > self.window {
                self.finished.pop_front();
            } else {
                break;
            }
        }
    }

    /// Requests per second over the window (or since the start, when that is shorter).
    pub fn rate(&mut self, now: Instant) -> Option<f64> {
        self.forget_before(now);
        if self.finished.is_empty() {
            return None;
        }
        let span = now
            .saturating_duration_since(self.since)
            .min(self.window)
            .max(MIN_SPAN);
        Some(self.finished.len() as f64 / span.as_secs_f64())
    }

    /// The joules per request the limit allows at the current rate (`None`: no limit, or no
    /// rate yet).
    pub fn joules_per_request(&mut self, now: Instant) -> Option<f64> {
        let watts = self.watts?;
        Some(watts / self.rate(now)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, seconds: f64) -> Instant {
        start + Duration::from_secs_f64(seconds)
    }

    #[test]
    fn a_cap_allows_watts_over_the_request_rate() {
        let start = Instant::now();
        let mut power = PowerBudget::new(start, Duration::from_secs(300));
        power.set_limits(Some(10.0), None, Some(Duration::from_secs(60)));
        assert_eq!(
            power.joules_per_request(at(start, 1.0)),
            None,
            "no rate yet"
        );
        // 30 requests over the first 60 s: 0.5 per second, so 10 W allows 20 J each.
        for i in 0..30 {
            power.record(at(start, 2.0 * f64::from(i) + 1.0));
        }
        let j = power.joules_per_request(at(start, 60.0)).unwrap();
        assert!((j - 20.0).abs() < 1e-9, "{j}");
        // Twice the rate halves the joules per request.
        for i in 0..30 {
            power.record(at(start, 60.0 + 2.0 * f64::from(i) + 1.0));
            power.record(at(start, 60.0 + 2.0 * f64::from(i) + 1.5));
        }
        let j = power.joules_per_request(at(start, 120.0)).unwrap();
        assert!((j - 10.0).abs() < 1e-9, "{j}");
    }

    #[test]
    fn old_requests_leave_the_window_and_bursts_are_spread_over_a_minimum_span() {
        let start = Instant::now();
        let mut power = PowerBudget::new(start, Duration::from_secs(300));
        power.set_limits(Some(10.0), None, Some(Duration::from_secs(10)));
        for _ in 0..5 {
            power.record(at(start, 0.5));
        }
        // Five requests in the first half second count over 5 s, not 0.5 s.
        assert!((power.rate(at(start, 0.5)).unwrap() - 1.0).abs() < 1e-9);
        // Twenty seconds later they are out of the 10 s window.
        assert_eq!(power.rate(at(start, 20.5)), None);
        assert_eq!(power.joules_per_request(at(start, 20.5)), None);
    }

    #[test]
    fn a_window_budget_is_a_cap_and_the_tighter_limit_wins() {
        let start = Instant::now();
        let mut power = PowerBudget::new(start, Duration::from_secs(300));
        // 3600 J per hour is 1 W.
        power.set_limits(None, Some(3600.0), Some(Duration::from_secs(3600)));
        assert_eq!(power.watts(), Some(1.0));
        power.set_limits(Some(0.5), Some(3600.0), Some(Duration::from_secs(3600)));
        assert_eq!(power.watts(), Some(0.5));
        power.set_limits(Some(-1.0), None, None);
        assert_eq!(power.watts(), None);
    }
}
