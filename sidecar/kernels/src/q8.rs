//! Our CPU matrix multiplication for quantized weights: Q8_0 weights (blocks of 32 signed bytes
//! with one f32 scale) times activations quantized per row to the same blocks on the fly.
//!
//! Why not candle's: its quantized matmul runs one dot product per (activation row, weight row),
//! so a batch of `b` sampled rows reads every weight block `b` times, and it has no AVX-VNNI
//! path. Here each thread takes a range of weight rows and, for each, computes that row against
//! all activation rows in tiles of four while its blocks sit in L1: the weights stream from memory
//! once per forward pass whatever the batch, which is what makes eight samples cheap. Blocks are
//! 32-byte aligned; the kernel is AVX2 (`maddubs`) or AVX-VNNI (`vpdpbusd`), picked at run time,
//! with a portable scalar path that is also the tests' reference. Work runs on candle's
//! persistent spinning thread pool, so there is one pool and no per-call thread start.

/// Elements per quantization block.
pub const BLOCK: usize = 32;

/// 32 quantized values, aligned for one 256-bit load.
#[repr(C, align(32))]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Block(pub [i8; BLOCK]);

/// Rows of `cols` values quantized in blocks of 32: one scale per block.
#[derive(Clone, Debug, PartialEq)]
pub struct Q8Rows {
    rows: usize,
    blocks: usize,
    quants: Vec<Block>,
    scales: Vec<f32>,
}

impl Q8Rows {
    /// Quantizes `rows` x `cols` row-major values (`cols` a multiple of 32): per block,
    /// scale = max |x| / 127 and q = round(x / scale), as ggml's Q8_0.
    pub fn quantize(values: &[f32], rows: usize, cols: usize) -> Self {
        assert!(
            cols.is_multiple_of(BLOCK),
            "{cols} columns: not a multiple of {BLOCK}"
        );
        assert_eq!(values.len(), rows * cols, "{rows} x {cols} values expected");
        let blocks = cols / BLOCK;
        let mut quants = Vec::with_capacity(rows * blocks);
        let mut scales = Vec::with_capacity(rows * blocks);
        for chunk in values.chunks_exact(BLOCK) {
            let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut block = [0i8; BLOCK];
            for (q, v) in block.iter_mut().zip(chunk) {
                *q = (v * inverse).round() as i8;
            }
            quants.push(Block(block));
            scales.push(scale);
        }
        Self {
            rows,
            blocks,
            quants,
            scales,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.blocks * BLOCK
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.quants.len() * size_of::<Block>() + self.scales.len() * size_of::<f32>()
    }

    /// The rows of several matrices of equal width, one after the other (fused projections).
    pub fn stack(parts: &[Q8Rows]) -> Self {
        let blocks = parts.first().map_or(0, |p| p.blocks);
        assert!(
            parts.iter().all(|p| p.blocks == blocks),
            "stacked matrices must have equal widths"
        );
        Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            blocks,
            quants: parts
                .iter()
                .flat_map(|p| p.quants.iter().copied())
                .collect(),
            scales: parts
                .iter()
                .flat_map(|p| p.scales.iter().copied())
                .collect(),
        }
    }

    fn row(&self, r: usize) -> (&[Block], &[f32]) {
        let range = r * self.blocks..(r + 1) * self.blocks;
        (&self.quants[range.clone()], &self.scales[range])
    }

    /// `x` (m x cols, row-major f32) times this matrix transposed: returns m x rows, row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let x = Self::quantize(x, m, self.cols());
        let n = self.rows;
        let mut out = vec![0f32; m * n];
        let kernel = Kernel::detect();
        let out_ptr = SendPtr(out.as_mut_ptr());
        let x = &x;
        candle_core::utils::barrier_pool().execute_chunked(n, |range| {
            let out_ptr = &out_ptr;
            for j in range {
                let (w, ws) = self.row(j);
                // SAFETY: column j of `out` (m x n) is written by this work item only, and
                // every index (r * n + j) with r < m is in bounds.
                unsafe { kernel.row_times_all(w, ws, x, out_ptr.0.add(j), n) };
            }
        });
        out
    }
}

struct SendPtr(*mut f32);
// SAFETY: the pointer is only used for disjoint writes (one column per work item).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Which dot-product kernel this CPU runs.
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

    /// Writes the dot product of weight row `(w, ws)` with every row of `x` to
    /// `out[r * stride]`.
    ///
    /// # Safety
    /// `out.add(r * stride)` must be valid for writes for every row r of `x`, and the kernel
    /// must be one [`Kernel::available`] returned.
    pub unsafe fn row_times_all(
        self,
        w: &[Block],
        ws: &[f32],
        x: &Q8Rows,
        out: *mut f32,
        stride: usize,
    ) {
        debug_assert_eq!(w.len(), x.blocks);
        match self {
            Self::Scalar => {
                for r in 0..x.rows {
                    let (xq, xs) = x.row(r);
                    // SAFETY: the caller's contract.
                    unsafe { *out.add(r * stride) = dot_scalar(w, ws, xq, xs) };
                }
            }
            // SAFETY: the CPU supports the kernel (caller's contract); pointers as above.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { x86::row_times_all_avx2(w, ws, x, out, stride) },
            #[cfg(target_arch = "x86_64")]
            Self::AvxVnni => unsafe { x86::row_times_all_vnni(w, ws, x, out, stride) },
        }
    }
}

fn dot_scalar(w: &[Block], ws: &[f32], x: &[Block], xs: &[f32]) -> f32 {
    let mut sum = 0f32;
    for b in 0..w.len() {
        let dot: i32 = w[b]
            .0
            .iter()
            .zip(&x[b].0)
            .map(|(a, c)| i32::from(*a) * i32::from(*c))
            .sum();
        sum += dot as f32 * ws[b] * xs[b];
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Block, Q8Rows};

    #[target_feature(enable = "avx2")]
    fn hsum(v: __m256) -> f32 {
        let low = _mm256_castps256_ps128(v);
        let high = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(low, high);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// One kernel per instruction set, same body: `$dot(|w|, sign(x, w))` gives eight i32 partial
    /// sums of one block's 32 products.
    macro_rules! row_times_all {
        ($name:ident, $features:literal, $dot:expr) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(
                w: &[Block],
                ws: &[f32],
                x: &Q8Rows,
                out: *mut f32,
                stride: usize,
            ) {
                let blocks = w.len();
                let wp = w.as_ptr() as *const __m256i;
                let xp = x.quants.as_ptr() as *const __m256i;
                let xs = x.scales.as_ptr();
                let dot = $dot;
                let mut r0 = 0;
                // Four activation rows at a time: each weight block is loaded once per tile.
                while r0 + 4 <= x.rows {
                    let mut acc = [_mm256_setzero_ps(); 4];
                    for b in 0..blocks {
                        let wv = unsafe { _mm256_load_si256(wp.add(b)) };
                        let aw = _mm256_sign_epi8(wv, wv);
                        let wscale = unsafe { *ws.get_unchecked(b) };
                        for (t, acc) in acc.iter_mut().enumerate() {
                            let i = (r0 + t) * blocks + b;
                            let xv = unsafe { _mm256_load_si256(xp.add(i)) };
                            let products = dot(aw, _mm256_sign_epi8(xv, wv));
                            let scale = _mm256_set1_ps(wscale * unsafe { *xs.add(i) });
                            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), scale, *acc);
                        }
                    }
                    for (t, acc) in acc.iter().enumerate() {
                        unsafe { *out.add((r0 + t) * stride) = hsum(*acc) };
                    }
                    r0 += 4;
                }
                for r in r0..x.rows {
                    let mut acc = _mm256_setzero_ps();
                    for b in 0..blocks {
                        let wv = unsafe { _mm256_load_si256(wp.add(b)) };
                        let i = r * blocks + b;
                        let xv = unsafe { _mm256_load_si256(xp.add(i)) };
                        let products = dot(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
                        let scale = _mm256_set1_ps(unsafe { *ws.get_unchecked(b) * *xs.add(i) });
                        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), scale, acc);
                    }
                    unsafe { *out.add(r * stride) = hsum(acc) };
                }
            }
        };
    }

    row_times_all!(row_times_all_avx2, "avx2,fma", |aw, sx| {
        _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1))
    });
    row_times_all!(row_times_all_vnni, "avx2,fma,avxvnni", |aw, sx| {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), aw, sx)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // A small LCG: reproducible, signed, with some exact zeros and a zero block.
        let mut state = seed;
        (0..n)
            .map(|i| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                if i % 7 == 0 || (64..96).contains(&i) {
                    0.0
                } else {
                    (state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
                }
            })
            .collect()
    }

    fn reference(w: &[f32], x: &[f32], n: usize, m: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum();
            }
        }
        out
    }

    #[test]
    fn quantization_round_trips_within_half_a_step() {
        let v = values(96, 3);
        let q = Q8Rows::quantize(&v, 1, 96);
        for (i, x) in v.iter().enumerate() {
            let back = f32::from(q.quants[i / BLOCK].0[i % BLOCK]) * q.scales[i / BLOCK];
            assert!((back - x).abs() <= q.scales[i / BLOCK] * 0.5 + 1e-7, "{i}");
        }
        // A block of zeros has scale 0 and quantizes to zeros, not NaN.
        assert_eq!(q.scales[2], 0.0);
        assert!(q.quants[2].0.iter().all(|v| *v == 0));
    }

    #[test]
    fn every_kernel_matches_the_scalar_one_and_the_float_product() {
        let (n, k) = (37, 160);
        let w = values(n * k, 1);
        let weights = Q8Rows::quantize(&w, n, k);
        for m in [1, 3, 4, 5, 8, 17] {
            let x = values(m * k, 2 + m as u32);
            let xq = Q8Rows::quantize(&x, m, k);
            let exact = reference(&w, &x, n, m, k);
            let mut expected = vec![0f32; m * n];
            for j in 0..n {
                let (wq, ws) = weights.row(j);
                for r in 0..m {
                    let (q, s) = xq.row(r);
                    expected[r * n + j] = dot_scalar(wq, ws, q, s);
                }
            }
            for kernel in Kernel::available() {
                let mut out = vec![0f32; m * n];
                for j in 0..n {
                    let (wq, ws) = weights.row(j);
                    // SAFETY: out is m x n; the kernel is available.
                    unsafe { kernel.row_times_all(wq, ws, &xq, out.as_mut_ptr().add(j), n) };
                }
                for i in 0..m * n {
                    assert!(
                        (out[i] - expected[i]).abs() <= 1e-4 * (1.0 + expected[i].abs()),
                        "{kernel:?} m={m} at {i}: {} vs {}",
                        out[i],
                        expected[i]
                    );
                    // Quantization error of both operands stays small against the f32 product.
                    assert!((out[i] - exact[i]).abs() < 0.05 * (1.0 + exact[i].abs()));
                }
            }
            assert_eq!(weights.matmul(&x, m), {
                let mut out = vec![0f32; m * n];
                for j in 0..n {
                    let (wq, ws) = weights.row(j);
                    // SAFETY: as above, with the detected kernel.
                    unsafe {
                        Kernel::detect().row_times_all(wq, ws, &xq, out.as_mut_ptr().add(j), n)
                    };
                }
                out
            });
        }
    }

    #[test]
    fn stacked_rows_multiply_like_their_parts() {
        let k = 64;
        let a = Q8Rows::quantize(&values(5 * k, 4), 5, k);
        let b = Q8Rows::quantize(&values(3 * k, 5), 3, k);
        let both = Q8Rows::stack(&[a.clone(), b.clone()]);
        let x = values(2 * k, 6);
        let (pa, pb, pboth) = (a.matmul(&x, 2), b.matmul(&x, 2), both.matmul(&x, 2));
        for r in 0..2 {
            assert_eq!(&pboth[r * 8..r * 8 + 5], &pa[r * 5..r * 5 + 5]);
            assert_eq!(&pboth[r * 8 + 5..r * 8 + 8], &pb[r * 3..r * 3 + 3]);
        }
    }
}
