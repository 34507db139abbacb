//! Attention of one new position per row (a decode step) over a preallocated KV cache, with
//! grouped-query heads, on candle's persistent thread pool.
//!
//! candle runs this as two f32 matmuls through `gemm`, which packs the keys for every call and
//! hands the work to a second (rayon) pool that competes with the spinning one for the cores; at
//! a decode step's sizes (one query, a few hundred keys of 64 values) the packing costs more
//! than the arithmetic. Here each (row, query head) is one work item: scores, softmax and the
//! weighted sum of values in one pass over its keys.
//!
//! The rows of one request are samples of one prompt: they may read the prompt's keys and values
//! from one shared buffer (a prefix) and only their own positions from buffers of their own, so
//! that eight samples neither store nor stream the prompt eight times.

/// Shapes of a decode step's attention.
#[derive(Debug, Clone, Copy)]
pub struct DecodeShape {
    /// Sequences (rows) in the batch.
    pub rows: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads` is a multiple of it).
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Positions the rows' own buffers hold room for (their third dimension).
    pub capacity: usize,
    /// Positions in the shared prefix (0: none). The own buffers hold positions `shared..len`,
    /// from their index 0.
    pub shared: usize,
    /// Positions the shared buffers hold room for.
    pub shared_capacity: usize,
    /// Positions filled, the new one included.
    pub len: usize,
    /// First position attended: 0, or where a sliding window starts.
    pub start: usize,
}

/// Keys and values of a cache: (rows, kv heads, capacity, head_dim) each, row-major.
#[derive(Debug, Clone, Copy)]
pub struct Kv<'a> {
    /// Keys.
    pub k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
}

/// `q`: (rows, heads, head_dim); `own`: the rows' own buffers (rows, kv_heads, capacity,
/// head_dim); `shared`: the prefix every row reads (1, kv_heads, shared_capacity, head_dim), when
/// `s.shared > 0`. Returns softmax(q k^T / sqrt(head_dim)) v over positions `start..len` as
/// (rows, heads, head_dim).
pub fn decode(q: &[f32], own: Kv<'_>, shared: Option<Kv<'_>>, s: DecodeShape) -> Vec<f32> {
    assert!(
        s.heads.is_multiple_of(s.kv_heads),
        "heads must be a multiple of kv_heads"
    );
    assert!(
        s.start < s.len && s.shared <= s.len && s.len - s.shared <= s.capacity,
        "need start < len, shared <= len and len - shared <= capacity"
    );
    assert_eq!(q.len(), s.rows * s.heads * s.head_dim, "q shape");
    let cache = s.rows * s.kv_heads * s.capacity * s.head_dim;
    assert!(own.k.len() == cache && own.v.len() == cache, "k/v shape");
    let shared = match shared {
        Some(kv) if s.shared > 0 => {
            let cache = s.kv_heads * s.shared_capacity * s.head_dim;
            assert!(
                s.shared <= s.shared_capacity && kv.k.len() == cache && kv.v.len() == cache,
                "shared k/v shape"
            );
            Some(kv)
        }
        None if s.shared > 0 => panic!("a shared prefix of {} positions needs buffers", s.shared),
        _ => None,
    };
    let mut out = vec![0f32; q.len()];
    let out_ptr = OutPtr(out.as_mut_ptr());
    let group = s.heads / s.kv_heads;
    // One work item per (row, KV head) reads that head's keys and values once for all the query
    // heads sharing it; with too few rows to keep every thread busy that way, one per query head.
    let per_item = if s.rows * s.kv_heads >= 8 { group } else { 1 };
    candle_core::utils::barrier_pool().execute_chunked(s.rows * s.heads / per_item, |items| {
        let out_ptr = &out_ptr;
        let mut scores = vec![0f32; per_item * (s.len - s.start)];
        for item in items {
            let first = item * per_item;
            // SAFETY: the item's heads' values of `out` are written by this work item only.
            let out = unsafe {
                std::slice::from_raw_parts_mut(
                    out_ptr.0.add(first * s.head_dim),
                    per_item * s.head_dim,
                )
            };
            heads(q, own, shared, s, first, per_item, &mut scores, out);
        }
    });
    out
}

struct OutPtr(*mut f32);
// SAFETY: work items write disjoint ranges.
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

/// Query heads `first..first + count` (flattened row x head indices, all sharing one KV head):
/// scores against every key, softmax, weighted sum of the values, one pass over each. `out`
/// starts zeroed.
#[allow(clippy::too_many_arguments)]
fn heads(
    q: &[f32],
    own: Kv<'_>,
    shared: Option<Kv<'_>>,
    s: DecodeShape,
    first: usize,
    count: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let d = s.head_dim;
    let (row, head) = (first / s.heads, first % s.heads);
    let kv_head = head / (s.heads / s.kv_heads);
    let queries = &q[first * d..(first + count) * d];
    // The attended positions in up to two runs of consecutive keys and values: the shared
    // prefix's, then the row's own.
    let own_base = (row * s.kv_heads + kv_head) * s.capacity * d;
    let own_from = s.start.max(s.shared) - s.shared;
    let own_run = (
        &own.k[own_base + own_from * d..own_base + (s.len - s.shared) * d],
        &own.v[own_base + own_from * d..own_base + (s.len - s.shared) * d],
    );
    let shared_run = shared.filter(|_| s.start < s.shared).map(|kv| {
        let base = kv_head * s.shared_capacity * d;
        (
            &kv.k[base + s.start * d..base + s.shared * d],
            &kv.v[base + s.start * d..base + s.shared * d],
        )
    });
    let runs = || shared_run.into_iter().chain([own_run]);
    let n = s.len - s.start;
    let scale = 1.0 / (d as f32).sqrt();
    let scores = &mut scores[..count * n];
    #[cfg(target_arch = "x86_64")]
    let wide = d.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    let mut at = 0;
    for (keys, _) in runs() {
        let scores = &mut scores[at..];
        if wide {
            // SAFETY: the CPU has AVX-512F; d is a multiple of 16.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                x86::scores(queries, keys, d, scale, scores, n)
            };
        } else {
            for (t, key) in keys.chunks_exact(d).enumerate() {
                for (h, query) in queries.chunks_exact(d).enumerate() {
                    scores[h * n + t] = dot(query, key) * scale;
                }
            }
        }
        at += keys.len() / d;
    }
    for scores in scores.chunks_exact_mut(n) {
        softmax(scores);
    }
    let mut at = 0;
    for (_, values) in runs() {
        let scores = &scores[at..];
        at += values.len() / d;
        // SAFETY (each arm): the CPU has AVX-512F; d = 16 x the arm's blocks.
        #[cfg(target_arch = "x86_64")]
        if wide {
            match d / 16 {
                4 => unsafe { x86::weighted_sum::<4>(values, scores, n, out) },
                8 => unsafe { x86::weighted_sum::<8>(values, scores, n, out) },
                16 => unsafe { x86::weighted_sum::<16>(values, scores, n, out) },
                _ => weighted_sum(values, scores, n, d, out),
            }
            continue;
        }
        weighted_sum(values, scores, n, d, out);
    }
}

/// Softmax in place, with the maximum and the sum kept in 16 lanes so that the loops vectorise
/// (a single running sum is a chain the compiler may not reorder).
fn softmax(scores: &mut [f32]) {
    const LANES: usize = 16;
    let max = crate::exp::max(scores);
    let mut sums = [0f32; LANES];
    let mut chunks = scores.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, x) in sums.iter_mut().zip(chunk) {
            *x = crate::exp::exp(*x - max);
            *s += *x;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for x in chunks.into_remainder() {
        *x = crate::exp::exp(*x - max);
        sum += *x;
    }
    let inverse = 1.0 / sum;
    for x in scores {
        *x *= inverse;
    }
}

/// `out[h] += sum over t of scores[h * stride + t] x values[t]`, rows of `d` values (portable).
fn weighted_sum(values: &[f32], scores: &[f32], stride: usize, d: usize, out: &mut [f32]) {
    for (t, value) in values.chunks_exact(d).enumerate() {
        for (h, out) in out.chunks_exact_mut(d).enumerate() {
            let p = scores[h * stride + t];
            for (o, x) in out.iter_mut().zip(value) {
                *o += p * x;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `scores[h * stride + t]` = query h . key t x `scale`: four keys at a time, their four dot
    /// products reduced together (one reduction per four keys instead of one per key).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores(
        queries: &[f32],
        keys: &[f32],
        d: usize,
        scale: f32,
        scores: &mut [f32],
        stride: usize,
    ) {
        let count = queries.len() / d;
        let n = keys.len() / d;
        let kp = keys.as_ptr();
        let four = n - n % 4;
        for t in (0..four).step_by(4) {
            for h in 0..count {
                let qp = unsafe { queries.as_ptr().add(h * d) };
                let mut acc = [_mm512_setzero_ps(); 4];
                for c in (0..d).step_by(16) {
                    let q = unsafe { _mm512_loadu_ps(qp.add(c)) };
                    for (k, acc) in acc.iter_mut().enumerate() {
                        let key = unsafe { _mm512_loadu_ps(kp.add((t + k) * d + c)) };
                        *acc = _mm512_fmadd_ps(q, key, *acc);
                    }
                }
                let sums = _mm_mul_ps(reduce4(acc), _mm_set1_ps(scale));
                unsafe { _mm_storeu_ps(scores.as_mut_ptr().add(h * stride + t), sums) };
            }
        }
        for t in four..n {
            for h in 0..count {
                let qp = unsafe { queries.as_ptr().add(h * d) };
                let mut acc = _mm512_setzero_ps();
                for c in (0..d).step_by(16) {
                    acc = unsafe {
                        _mm512_fmadd_ps(
                            _mm512_loadu_ps(qp.add(c)),
                            _mm512_loadu_ps(kp.add(t * d + c)),
                            acc,
                        )
                    };
                }
                scores[h * stride + t] = _mm512_reduce_add_ps(acc) * scale;
            }
        }
    }

    /// The sums of four vectors' lanes, as one vector of four.
    #[target_feature(enable = "avx512f")]
    fn reduce4([a, b, c, d]: [__m512; 4]) -> __m128 {
        // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], and the same for c and d.
        let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
        let (ab, cd) = (_mm512_castps_pd(ab), _mm512_castps_pd(cd));
        // Per 128-bit lane: [a, b, c, d] partial sums.
        let lanes = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)),
        );
        let half = _mm256_add_ps(
            _mm512_castps512_ps256(lanes),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(lanes))),
        );
        _mm_add_ps(
            _mm256_castps256_ps128(half),
            _mm256_extractf128_ps::<1>(half),
        )
    }

    /// `out` (heads x 16 C) += the score-weighted sum of the value rows (16 C wide; head h's
    /// scores at `h * stride`), head by head with the head's sum held in registers.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weighted_sum<const C: usize>(
        values: &[f32],
        scores: &[f32],
        stride: usize,
        out: &mut [f32],
    ) {
        let d = 16 * C;
        for (h, out) in out.chunks_exact_mut(d).enumerate() {
            let mut acc: [__m512; C] =
                std::array::from_fn(|c| unsafe { _mm512_loadu_ps(out.as_ptr().add(16 * c)) });
            for (t, value) in values.chunks_exact(d).enumerate() {
                let p = _mm512_set1_ps(scores[h * stride + t]);
                let vp = value.as_ptr();
                for (c, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(p, unsafe { _mm512_loadu_ps(vp.add(16 * c)) }, *acc);
                }
            }
            for (c, acc) in acc.iter().enumerate() {
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * c), *acc) };
            }
        }
    }
}

/// Dot product with eight independent partial sums (so that it vectorises).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values;

    /// The textbook computation, head by head.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: DecodeShape) -> Vec<f32> {
        let mut out = Vec::new();
        for row in 0..s.rows {
            for head in 0..s.heads {
                let kv = head / (s.heads / s.kv_heads);
                let qv = &q[(row * s.heads + head) * s.head_dim..][..s.head_dim];
                let at = |t: usize| ((row * s.kv_heads + kv) * s.capacity + t) * s.head_dim;
                let scores: Vec<f64> = (s.start..s.len)
                    .map(|t| {
                        let key = &k[at(t)..at(t) + s.head_dim];
                        qv.iter()
                            .zip(key)
                            .map(|(a, b)| f64::from(a * b))
                            .sum::<f64>()
                            / (s.head_dim as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..s.head_dim {
                    let o: f64 = (s.start..s.len)
                        .map(|t| e[t - s.start] / sum * f64::from(v[at(t) + d]))
                        .sum();
                    out.push(o as f32);
                }
            }
        }
        out
    }

    /// One row's keys or values of every position, prefix and own, as one buffer of capacity
    /// `s.len` (what a cache without sharing holds).
    fn materialize(own: &[f32], shared: &[f32], s: DecodeShape) -> Vec<f32> {
        let d = s.head_dim;
        let mut full = Vec::new();
        for row in 0..s.rows {
            for kv in 0..s.kv_heads {
                for t in 0..s.len {
                    let at = match t.checked_sub(s.shared) {
                        Some(o) => ((row * s.kv_heads + kv) * s.capacity + o) * d,
                        None => (kv * s.shared_capacity + t) * d,
                    };
                    let source = if t < s.shared { shared } else { own };
                    full.extend_from_slice(&source[at..at + d]);
                }
            }
        }
        full
    }

    #[test]
    fn matches_the_textbook_computation_with_grouped_heads_shared_prefixes_and_windows() {
        // (5, 33): 5 rows x 2 KV heads >= 8 work items, so the grouped path runs. A nonzero
        // start is a sliding window; it may begin inside the shared prefix or after it.
        // Head widths: 20 (portable), 64 (512-bit), 48 (512-bit scores, portable sum).
        let cases = [
            // (rows, len, start, shared)
            (1, 1, 0, 0),
            (1, 7, 0, 0),
            (3, 40, 0, 0),
            (5, 33, 0, 0),
            (1, 7, 6, 0),
            (5, 40, 9, 0),
            (3, 40, 0, 30),
            (5, 33, 0, 32),
            (5, 40, 9, 20),
            (3, 40, 25, 20),
            (1, 7, 6, 6),
        ];
        for ((rows, len, start, shared), head_dim) in
            cases.into_iter().flat_map(|c| [(c, 20), (c, 64), (c, 48)])
        {
            let s = DecodeShape {
                rows,
                heads: 6,
                kv_heads: 2,
                head_dim,
                capacity: 48,
                shared,
                shared_capacity: 36,
                len,
                start,
            };
            let q = test_values(rows * s.heads * s.head_dim, 1);
            let cache = rows * s.kv_heads * s.capacity * s.head_dim;
            let (k, mut v) = (test_values(cache, 2), test_values(cache, 3));
            let prefix = s.kv_heads * s.shared_capacity * s.head_dim;
            let (shared_k, mut shared_v) = (test_values(prefix, 4), test_values(prefix, 5));
            // Positions outside start..len must not count: poison them.
            for row_head in 0..rows * s.kv_heads {
                let head = row_head * s.capacity * s.head_dim;
                let own_start = start.saturating_sub(shared);
                v[head..head + own_start * s.head_dim].fill(1e9);
                v[head + (len - shared) * s.head_dim..head + s.capacity * s.head_dim].fill(1e9);
            }
            for kv in 0..s.kv_heads {
                let head = kv * s.shared_capacity * s.head_dim;
                shared_v[head..head + start.min(shared) * s.head_dim].fill(1e9);
                shared_v[head + shared * s.head_dim..head + s.shared_capacity * s.head_dim]
                    .fill(1e9);
            }
            let got = decode(
                &q,
                Kv { k: &k, v: &v },
                Some(Kv {
                    k: &shared_k,
                    v: &shared_v,
                }),
                s,
            );
            let full = DecodeShape {
                capacity: len,
                shared: 0,
                ..s
            };
            let want = reference(
                &q,
                &materialize(&k, &shared_k, s),
                &materialize(&v, &shared_v, s),
                full,
            );
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() < 1e-4,
                    "rows {rows} len {len} start {start} shared {shared} head_dim {head_dim} \
                     at {i}: {a} vs {b}"
                );
            }
        }
    }
}
