//! What the sidecar takes on at once: a memory budget for the rows it decodes (their KV caches)
//! and a cap on rows in flight, with a bounded, fair queue in front. A request that cannot be
//! admitted within its wait is refused whole (429 with `Retry-After`), never half-served; one
//! that could never fit is refused at once (400). Test-time compute sheds depth before that:
//! [`Admission::rows_fitting`] tells the planner how many samples fit now.
//!
//! A request's memory is estimated from the model's shape: keys and values of every layer for
//! each position it holds, its prompt once (the samples share the prefilled prefix) and each
//! row's generated tokens, doubled because the per-row buffers grow by doubling.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Memory kept aside for everything but the rows (runtime, buffers, the HTTP server).
const RESERVE_BYTES: u64 = 256 << 20;
/// The smallest budget the sidecar runs with, whatever the limit says.
const MIN_BUDGET_BYTES: u64 = 64 << 20;

/// The admission's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionConfig {
    /// Bytes the rows' KV caches may hold together.
    pub memory_budget_bytes: u64,
    /// Rows (samples of every request together) decoding at once.
    pub max_rows: usize,
    /// Requests that may wait for room; one more is refused at once.
    pub max_waiting: usize,
    /// The longest a request waits for room (less when its deadline is nearer).
    pub max_wait: Duration,
}

/// What one request needs while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    /// Rows it decodes at once.
    pub rows: usize,
    /// Bytes its KV caches may reach.
    pub bytes: u64,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// The request alone needs more than the whole budget: it can never run here.
    #[error(
        "the request needs {needed_mib} MiB for its samples' KV caches ({rows} rows), more than this pod's whole memory budget of {budget_mib} MiB; lower n or max_tokens"
    )]
    TooLarge {
        /// MiB it needs.
        needed_mib: u64,
        /// Rows it asked for.
        rows: usize,
        /// The budget, in MiB.
        budget_mib: u64,
    },
    /// Too many requests wait already.
    #[error("the sidecar is at capacity and {waiting} requests are waiting; retry later")]
    QueueFull {
        /// Requests waiting.
        waiting: usize,
    },
    /// No room came within the request's wait.
    #[error(
        "the sidecar is at capacity: no room for the request within {waited_ms} ms; retry later"
    )]
    NoRoom {
        /// How long it waited.
        waited_ms: u64,
    },
}

impl Refusal {
    /// The label of its metric (`ttc_refusals_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::QueueFull { .. } => "queue_full",
            Self::NoRoom { .. } => "no_room",
        }
    }
}

/// Where the admission stands, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionState {
    /// Requests waiting for room.
    pub waiting: usize,
    /// Rows admitted and not yet finished.
    pub rows_in_flight: usize,
    /// Bytes of the budget held by admitted requests.
    pub bytes_in_use: u64,
    /// The budget.
    pub budget_bytes: u64,
}

impl From<AdmissionState> for ttc_telemetry::AdmissionFigures {
    fn from(s: AdmissionState) -> Self {
        Self {
            waiting: s.waiting as u64,
            rows_in_flight: s.rows_in_flight as u64,
            used_bytes: s.bytes_in_use,
            budget_bytes: s.budget_bytes,
        }
    }
}

/// The sidecar's admission control; shared by every request.
#[derive(Debug)]
pub struct Admission {
    config: AdmissionConfig,
    /// The budget in KiB (semaphore permits count in u32).
    memory: Arc<Semaphore>,
    rows: Arc<Semaphore>,
    waiting: AtomicUsize,
    /// KV bytes of one position (every layer's keys and values).
    bytes_per_position: u64,
}

/// Room held by an admitted request; given back to the semaphores when dropped.
#[derive(Debug)]
pub struct Permit {
    _memory: OwnedSemaphorePermit,
    _rows: OwnedSemaphorePermit,
}

fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024)
}

/// The budget in KiB, as many as a semaphore's permits can count.
fn budget_kib(bytes: u64) -> u64 {
    kib(bytes).min(u64::from(u32::MAX))
}

impl Admission {
    /// Admission for a model whose positions take `bytes_per_position` of KV cache.
    pub fn new(config: AdmissionConfig, bytes_per_position: u64) -> Self {
        Self {
            memory: Arc::new(Semaphore::new(
                budget_kib(config.memory_budget_bytes) as usize
            )),
            rows: Arc::new(Semaphore::new(config.max_rows.max(1))),
            waiting: AtomicUsize::new(0),
            bytes_per_position: bytes_per_position.max(1),
            config,
        }
    }

    /// The settings.
    pub fn config(&self) -> &AdmissionConfig {
        &self.config
    }

    /// What `rows` samples of a `prompt_tokens` prompt, each up to `max_tokens`, need.
    pub fn demand(&self, prompt_tokens: usize, rows: usize, max_tokens: usize) -> Demand {
        let positions = prompt_tokens as u64 + rows as u64 * max_tokens as u64;
        Demand {
            rows,
            bytes: 2 * positions * self.bytes_per_position,
        }
    }

    /// How many rows of a `prompt_tokens` prompt, each up to `max_tokens`, fit in the room free
    /// now (0 when not even one does): the depth test-time compute may plan without waiting.
    pub fn rows_fitting(&self, prompt_tokens: usize, max_tokens: usize) -> usize {
        let free_bytes = self.memory.available_permits() as u64 * 1024;
        let prompt = 2 * prompt_tokens as u64 * self.bytes_per_position;
        let per_row = (2 * max_tokens as u64 * self.bytes_per_position).max(1);
        let by_memory = free_bytes.saturating_sub(prompt) / per_row;
        (by_memory as usize).min(self.rows.available_permits())
    }

    /// Where it stands now.
    pub fn state(&self) -> AdmissionState {
        AdmissionState {
            waiting: self.waiting.load(Ordering::Relaxed),
            // What the semaphores have handed out.
            rows_in_flight: self.config.max_rows.max(1) - self.rows.available_permits(),
            bytes_in_use: (budget_kib(self.config.memory_budget_bytes)
                - self.memory.available_permits() as u64)
                * 1024,
            budget_bytes: self.config.memory_budget_bytes,
        }
    }

    /// Admits `demand`, waiting in line (first come, first served) for at most `wait` (capped
    /// by the configured wait).
    pub async fn admit(&self, demand: Demand, wait: Duration) -> Result<Permit, Refusal> {
        let (kib, rows) = self.check(demand)?;
        if let Some(permit) = self.try_take(kib, rows) {
            return Ok(permit);
        }
        let waiting = self.waiting.fetch_add(1, Ordering::Relaxed);
        let _leave = Leave(&self.waiting);
        if waiting >= self.config.max_waiting {
            return Err(Refusal::QueueFull { waiting });
        }
        let started = Instant::now();
        let wait = wait.min(self.config.max_wait);
        let taken = tokio::time::timeout(wait, async {
            let memory = self.memory.clone().acquire_many_owned(kib as u32).await;
            let rows = self.rows.clone().acquire_many_owned(rows as u32).await;
            (memory, rows)
        })
        .await;
        match taken {
            Ok((Ok(memory), Ok(row_permit))) => Ok(Permit {
                _memory: memory,
                _rows: row_permit,
            }),
            // Closed semaphores (never closed) or the wait ran out.
            _ => Err(Refusal::NoRoom {
                waited_ms: started.elapsed().as_millis() as u64,
            }),
        }
    }

    /// Admits `demand` only if there is room now.
    pub fn try_admit(&self, demand: Demand) -> Result<Permit, Refusal> {
        let (kib, rows) = self.check(demand)?;
        self.try_take(kib, rows)
            .ok_or(Refusal::NoRoom { waited_ms: 0 })
    }

    /// The demand in permits; refused when it exceeds the whole budget or row cap.
    fn check(&self, demand: Demand) -> Result<(u64, usize), Refusal> {
        let kib = kib(demand.bytes).max(1);
        let rows = demand.rows.max(1);
        if kib > budget_kib(self.config.memory_budget_bytes) || rows > self.config.max_rows.max(1) {
            return Err(Refusal::TooLarge {
                needed_mib: demand.bytes.div_ceil(1 << 20),
                rows,
                budget_mib: self.config.memory_budget_bytes >> 20,
            });
        }
        Ok((kib, rows))
    }

    fn try_take(&self, kib: u64, rows: usize) -> Option<Permit> {
        let memory = self
            .memory
            .clone()
            .try_acquire_many_owned(kib as u32)
            .ok()?;
        let row_permit = self.rows.clone().try_acquire_many_owned(rows as u32).ok()?;
        Some(Permit {
            _memory: memory,
            _rows: row_permit,
        })
    }
}

/// Counts a waiting request out when its wait ends, however it ends.
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The memory limit of this container: cgroup v2 `memory.max`, else cgroup v1
/// `memory.limit_in_bytes`; `None` when unlimited or unknown.
pub fn container_memory_limit() -> Option<u64> {
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok();
    let v1 = std::fs::read_to_string("/sys/fs/cgroup/memory/memory.limit_in_bytes").ok();
    parse_memory_limit(v2.as_deref(), v1.as_deref())
}

/// The limit from the contents of cgroup v2's `memory.max` or v1's `memory.limit_in_bytes`: v2's
/// `max` and v1's page-rounded `i64::MAX` mean no limit.
pub fn parse_memory_limit(v2: Option<&str>, v1: Option<&str>) -> Option<u64> {
    if let Some(v2) = v2 {
        return v2.trim().parse().ok();
    }
    v1?.trim().parse::<u64>().ok().filter(|&v| v < 1 << 60)
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// The default budget: the container's memory limit (or, without one, three quarters of the
/// memory available now) less the model file, the prefix cache and a reserve; at least 64 MiB.
pub fn default_memory_budget(model: &Path, prefix_cache_bytes: u64) -> u64 {
    let model_bytes = std::fs::metadata(model).map_or(0, |m| m.len());
    let limit = container_memory_limit()
        .or_else(|| memory_available().map(|a| a / 4 * 3))
        .unwrap_or(4 << 30);
    budget_within(limit, model_bytes, prefix_cache_bytes)
}

fn budget_within(limit: u64, model_bytes: u64, prefix_cache_bytes: u64) -> u64 {
    limit
        .saturating_sub(model_bytes)
        .saturating_sub(prefix_cache_bytes)
        .saturating_sub(RESERVE_BYTES)
        .max(MIN_BUDGET_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(budget_mib: u64, max_rows: usize, max_waiting: usize) -> Admission {
        Admission::new(
            AdmissionConfig {
                memory_budget_bytes: budget_mib << 20,
                max_rows,
                max_waiting,
                max_wait: Duration::from_millis(200),
            },
            1024,
        )
    }

    #[test]
    fn cgroup_limits_parse_and_unlimited_is_none() {
        assert_eq!(
            parse_memory_limit(Some("4294967296\n"), None),
            Some(4 << 30)
        );
        assert_eq!(parse_memory_limit(Some("max\n"), Some("1024")), None);
        assert_eq!(parse_memory_limit(None, Some("2147483648")), Some(2 << 30));
        assert_eq!(parse_memory_limit(None, Some("9223372036854771712")), None);
        assert_eq!(parse_memory_limit(None, None), None);
        // 4 GiB less a 0.5 GiB model, 0.25 GiB of prefix cache and the reserve.
        assert_eq!(
            budget_within(4 << 30, 512 << 20, 256 << 20),
            (4 << 30) - (1 << 30)
        );
        assert_eq!(budget_within(100 << 20, 512 << 20, 0), MIN_BUDGET_BYTES);
    }

    #[test]
    fn demand_counts_the_shared_prompt_once_and_rows_apart() {
        let a = admission(64, 64, 4);
        // 100 prompt positions + 4 rows x 50 tokens = 300 positions, x 1 KiB, doubled.
        assert_eq!(
            a.demand(100, 4, 50),
            Demand {
                rows: 4,
                bytes: 600 * 1024
            }
        );
    }

    #[tokio::test]
    async fn a_full_pod_queues_then_refuses_and_gives_room_back() {
        let a = admission(1, 8, 1);
        // 1 MiB budget: 512 positions (x 1 KiB, doubled).
        let half = a.demand(0, 1, 256);
        let first = a.admit(half, Duration::from_secs(1)).await.expect("room");
        let second = a.try_admit(half).expect("room for a second half");
        assert_eq!(a.state().bytes_in_use, 1 << 20);
        assert_eq!(a.state().rows_in_flight, 2);
        assert_eq!(a.rows_fitting(0, 256), 0);
        assert_eq!(a.try_admit(half).unwrap_err().reason(), "no_room");
        // One may wait; it gets the room the first one gives back.
        let waiter = a.admit(half, Duration::from_secs(5));
        let release = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            // A second waiter finds the line full.
            let refused = a.admit(half, Duration::from_secs(5)).await.unwrap_err();
            assert!(
                matches!(refused, Refusal::QueueFull { waiting: 1 }),
                "{refused:?}"
            );
            drop(first);
        };
        let (admitted, ()) = tokio::join!(waiter, release);
        let third = admitted.expect("admitted once room was given back");
        // Nobody gives room back now: the wait ends in a refusal, within the configured wait.
        let started = Instant::now();
        assert!(matches!(
            a.admit(half, Duration::from_secs(5)).await,
            Err(Refusal::NoRoom { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
        drop((second, third));
        assert_eq!(
            a.state(),
            AdmissionState {
                waiting: 0,
                rows_in_flight: 0,
                bytes_in_use: 0,
                budget_bytes: 1 << 20,
            }
        );
        assert_eq!(a.rows_fitting(0, 256), 2);
    }

    #[tokio::test]
    async fn a_request_larger_than_the_budget_or_row_cap_is_refused_at_once() {
        let a = admission(1, 4, 8);
        let too_much = a.demand(0, 1, 1024);
        let refused = a.admit(too_much, Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(refused.reason(), "too_large");
        assert!(
            refused.to_string().contains("lower n or max_tokens"),
            "{refused}"
        );
        let too_wide = a.demand(0, 5, 1);
        assert_eq!(a.try_admit(too_wide).unwrap_err().reason(), "too_large");
    }
}
