//! The sidecar's own CPU compute kernels, where candle's are missing or slow for test-time
//! compute's shape of work (many sampled rows of one prompt per step).
//!
//! A crate of its own so that debug builds still optimise it (see the workspace's
//! `profile.dev.package.ttc-kernels`): the engine's tests run the real model through it.

pub mod activation;
pub mod attention;
pub mod exp;
pub mod q4;
pub mod q8;

/// A quantized weight matrix our kernels multiply: `x` (m x cols) times its transpose.
pub trait WeightMatrix: Send + Sync {
    /// Output features.
    fn rows(&self) -> usize;
    /// Input features.
    fn cols(&self) -> usize;
    /// `x` (m x cols, row-major f32) times this matrix transposed: m x rows, row-major.
    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32>;
}

/// Which instruction set the dot-product kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Portable Rust.
    Scalar,
    /// AVX2 + FMA: `vpmaddubsw` then `vpmaddwd`.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-VNNI: one `vpdpbusd` per block.
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
}

impl Kernel {
    /// The fastest kernel this CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            if avx2 && std::arch::is_x86_feature_detected!("avxvnni") {
                return Self::AvxVnni;
            }
            if avx2 {
                return Self::Avx2;
            }
        }
        Self::Scalar
    }

    /// Every kernel this CPU can run (tests compare them).
    pub fn available() -> Vec<Self> {
        let best = Self::detect();
        let mut all = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if best != Self::Scalar {
                all.push(Self::Avx2);
            }
            if best == Self::AvxVnni {
                all.push(Self::AvxVnni);
            }
        }
        all
    }
}

/// An output pointer shared by the pool's work items, which write disjoint elements.
struct SendPtr(*mut f32);
// SAFETY: only used for disjoint writes (one output column per work item).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// An m x n output, row-major, computed one column (output feature) per work item on candle's
/// spinning pool: `column(j, out)` must write `out.add(r * n)` for every r < m, nothing else.
pub(crate) fn by_output_row(
    n: usize,
    m: usize,
    column: impl Fn(usize, *mut f32) + Sync,
) -> Vec<f32> {
    by_output_rows(n, m, |range, base| {
        for j in range {
            // SAFETY: j < n, so the column's elements (r * n + j, r < m) are in bounds, and
            // only this work item writes them.
            column(j, unsafe { base.add(j) });
        }
    })
}

/// The same, handing each thread its whole range of weight rows at once (kernels that tile
/// several weight rows), with the output's base pointer: column `j` starts at `base.add(j)`.
pub(crate) fn by_output_rows(
    n: usize,
    m: usize,
    columns: impl Fn(std::ops::Range<usize>, *mut f32) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    let base = SendPtr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(n, |range| {
        let base = &base;
        columns(range, base.0);
    });
    out
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// The sum of a vector's eight lanes.
    #[target_feature(enable = "avx2")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// Eight i32 partial sums of the 32 products of unsigned bytes `u` and signed bytes `s`,
    /// with AVX2: `vpmaddubsw` (pairs, no overflow for |s| <= 127 and u <= 255 / 2) then
    /// `vpmaddwd`.
    #[target_feature(enable = "avx2")]
    pub(crate) fn dot_avx2(u: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }

    /// The same with AVX-VNNI: one `vpdpbusd`.
    #[target_feature(enable = "avx2,avxvnni")]
    pub(crate) fn dot_vnni(u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
    }
}

/// Stacking matrices row after row: the blocks per row they all share, and one field of every
/// part concatenated.
pub(crate) mod stacking {
    /// The common blocks per row (panics when the widths differ: a model-loading bug).
    pub(crate) fn equal_width<P>(parts: &[P], blocks: impl Fn(&P) -> usize) -> usize {
        let width = parts.first().map_or(0, &blocks);
        assert!(
            parts.iter().all(|p| blocks(p) == width),
            "stacked matrices must have equal widths"
        );
        width
    }

    /// `field` of every part, one after the other.
    pub(crate) fn concat<P, T: Copy>(parts: &[P], field: impl Fn(&P) -> &[T]) -> Vec<T> {
        parts
            .iter()
            .flat_map(|p| field(p).iter().copied())
            .collect()
    }
}

/// Reproducible pseudo-random values in [-1, 1) for the kernels' tests.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u32) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}
