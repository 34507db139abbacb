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
//!
//! On CPUs with AVX-512 VNNI a 512-bit kernel takes over: two blocks per `vpdpbusd`, activations
//! quantized with one scale per 256 values ([`GROUP_BLOCKS`]), and the weight rows a few rows
//! ahead prefetched in software. The prefetch matters most: without it a batch's weight stream
//! stalls on memory between bursts of arithmetic (SmolLM2 at batch 8: about +15-25% tok/s with
//! it, +5-10% at batch 1).

use crate::stacking::{concat, equal_width};
use crate::{Kernel, WeightMatrix, by_output_row, by_output_rows};

/// Elements per quantization block.
pub const BLOCK: usize = 32;

/// 32 quantized values, aligned for one 256-bit load.
#[repr(C, align(32))]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Block(pub [i8; BLOCK]);

/// Panics unless `values` are `rows` x `cols` with `cols` a multiple of [`BLOCK`].
fn check_shape(values: &[f32], rows: usize, cols: usize) {
    assert!(
        cols.is_multiple_of(BLOCK),
        "{cols} columns: not a multiple of {BLOCK}"
    );
    assert_eq!(values.len(), rows * cols, "{rows} x {cols} values expected");
}

/// The symmetric int8 scale of `values` (max |x| / 127) and its inverse (0 for all zeros, so
/// a block of zeros quantizes to zeros, not NaN).
fn int8_scale(values: &[f32]) -> (f32, f32) {
    let scale = values.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
    (scale, if scale > 0.0 { 1.0 / scale } else { 0.0 })
}

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
        check_shape(values, rows, cols);
        let blocks = cols / BLOCK;
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { x86::quantize_avx2(values, rows, blocks) };
        }
        Self::quantize_scalar(values, rows, blocks)
    }

    /// The portable quantization (rounding half away from zero).
    fn quantize_scalar(values: &[f32], rows: usize, blocks: usize) -> Self {
        let mut quants = Vec::with_capacity(rows * blocks);
        let mut scales = Vec::with_capacity(rows * blocks);
        for chunk in values.chunks_exact(BLOCK) {
            let (scale, inverse) = int8_scale(chunk);
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

    /// The rows of several matrices of equal width, one after the other (fused projections).
    pub fn stack(parts: &[Q8Rows]) -> Self {
        Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            blocks: equal_width(parts, |p| p.blocks),
            quants: concat(parts, |p| &p.quants),
            scales: concat(parts, |p| &p.scales),
        }
    }

    pub(crate) fn row(&self, r: usize) -> (&[Block], &[f32]) {
        let range = r * self.blocks..(r + 1) * self.blocks;
        (&self.quants[range.clone()], &self.scales[range])
    }

    /// All blocks and their scales, row after row.
    pub(crate) fn parts(&self) -> (&[Block], &[f32]) {
        (&self.quants, &self.scales)
    }

    /// Each block's sum of values (scale x sum of its quantized values), row after row.
    pub(crate) fn block_sums(&self) -> Vec<f32> {
        self.quants
            .iter()
            .zip(&self.scales)
            .map(|(q, s)| s * q.0.iter().map(|v| i32::from(*v)).sum::<i32>() as f32)
            .collect()
    }
}

/// Blocks per activation scale in the 512-bit kernel: 256 values, the granularity llama.cpp
/// quantizes activations at for its K-quant weights (Q8_K). One scale per group instead of per
/// block lets the kernel sum a group's products before scaling them by the activation: per 64
/// multiply-adds three vector operations instead of four. (One scale per whole row is too coarse:
/// Gemma 3 then leaves llama.cpp's greedy path.)
pub const GROUP_BLOCKS: usize = 8;

/// Activation rows as the 512-bit kernel reads them: quantized with one scale per
/// [`GROUP_BLOCKS`] blocks (the last group may be shorter), offset to unsigned bytes (q + 128)
/// for `vpdpbusd`.
#[derive(Debug, PartialEq)]
pub struct WideActivations {
    rows: usize,
    blocks: usize,
    quants: Vec<Block>,
    /// Row after row, one per group.
    scales: Vec<f32>,
}

impl WideActivations {
    /// Quantizes `rows` x `cols` row-major values (`cols` a multiple of 32): per group,
    /// scale = max |x| / 127 and q = round(x / scale), ties to even.
    pub fn quantize(values: &[f32], rows: usize, cols: usize) -> Self {
        check_shape(values, rows, cols);
        #[cfg(target_arch = "x86_64")]
        if wide_available() {
            // SAFETY: the CPU has AVX-512F and BW.
            return unsafe { x86::quantize_groups_avx512(values, rows, cols / BLOCK) };
        }
        Self::quantize_scalar(values, rows, cols / BLOCK)
    }

    /// The portable quantization (the vector one's reference).
    fn quantize_scalar(values: &[f32], rows: usize, blocks: usize) -> Self {
        let cols = blocks * BLOCK;
        let mut quants = Vec::with_capacity(rows * blocks);
        let mut scales = Vec::with_capacity(rows * blocks.div_ceil(GROUP_BLOCKS));
        for group in values
            .chunks_exact(cols)
            .flat_map(|row| row.chunks(GROUP_BLOCKS * BLOCK))
        {
            let (scale, inverse) = int8_scale(group);
            quants.extend(group.chunks_exact(BLOCK).map(|chunk| {
                Block(std::array::from_fn(|i| {
                    ((chunk[i] * inverse).round_ties_even() as i8 as u8 ^ 0x80) as i8
                }))
            }));
            scales.push(scale);
        }
        Self {
            rows,
            blocks,
            quants,
            scales,
        }
    }

    /// Groups per row.
    fn groups(&self) -> usize {
        self.blocks.div_ceil(GROUP_BLOCKS)
    }

    /// The values the quantized rows stand for (the tests' reference).
    #[cfg(test)]
    fn dequantize(&self) -> Vec<f32> {
        let groups = self.groups();
        self.quants
            .iter()
            .enumerate()
            .flat_map(|(b, block)| {
                let (row, within) = (b / self.blocks, b % self.blocks);
                let scale = self.scales[row * groups + within / GROUP_BLOCKS];
                block.0.map(|q| f32::from((q as u8 ^ 0x80) as i8) * scale)
            })
            .collect()
    }
}

impl WeightMatrix for Q8Rows {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.blocks * BLOCK
    }

    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if self.blocks.is_multiple_of(2) && wide_available() {
            let x = WideActivations::quantize(x, m, self.cols());
            if m < x86::TILE_X {
                return by_output_row(self.rows, m, |j, out| {
                    let (w, ws) = self.row(j);
                    // SAFETY: `by_output_row`'s contract; the CPU has AVX-512 VNNI; even blocks.
                    unsafe { x86::row_times_all_avx512(w, ws, &x, out, self.rows) };
                });
            }
            // Batches and prompts: tiles of weight rows x activation rows.
            return by_output_rows(self.rows, m, |range, base| {
                let mut j = range.start;
                while j < range.end {
                    let tile = x86::TILE_W.min(range.end - j);
                    let rows: [usize; x86::TILE_W] = std::array::from_fn(|i| j + i.min(tile - 1));
                    // SAFETY: `by_output_rows`'s contract (columns j..j + tile are this
                    // thread's); the CPU has AVX-512 VNNI; even blocks. A short last tile
                    // repeats its last row, computed again and written to the same place.
                    unsafe {
                        x86::rows_times_all_avx512(
                            rows.map(|r| self.row(r)),
                            &x,
                            rows.map(|r| base.add(r)),
                            self.rows,
                        )
                    };
                    j += tile;
                }
            });
        }
        let x = Self::quantize(x, m, self.cols());
        let kernel = Kernel::detect();
        by_output_row(self.rows, m, |j, out| {
            let (w, ws) = self.row(j);
            // SAFETY: `by_output_row`'s contract; the kernel was detected on this CPU.
            unsafe { row_times_all(kernel, w, ws, &x, out, self.rows) };
        })
    }
}

/// Whether the 512-bit kernel is off for this process ([`use_block_activations`]).
static BLOCK_ACTIVATIONS_ONLY: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Turns the 512-bit kernel off for this process: activations are then quantized per block of
/// 32, as llama.cpp's Q8_0 path and candle's quantized ops quantize them, and the results are
/// those of a CPU without AVX-512. The 512-bit kernel's groups of 256 values round activations
/// more coarsely: its logits stay near, but not within a sum's rounding of, theirs. For a
/// process that compares against them; call it before the first multiplication.
pub fn use_block_activations() {
    BLOCK_ACTIVATIONS_ONLY.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether this CPU runs the 512-bit kernel (AVX-512 VNNI): two blocks per instruction, for rows
/// of an even number of blocks; unless [`use_block_activations`] turned it off.
#[cfg(target_arch = "x86_64")]
pub fn wide_available() -> bool {
    !BLOCK_ACTIVATIONS_ONLY.load(std::sync::atomic::Ordering::Relaxed)
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

/// Writes the dot product of weight row `(w, ws)` with every row of `x` to `out[r * stride]`.
///
/// # Safety
/// `out.add(r * stride)` must be valid for writes for every row r of `x`, and `kernel` must be
/// one [`Kernel::available`] returned.
pub unsafe fn row_times_all(
    kernel: Kernel,
    w: &[Block],
    ws: &[f32],
    x: &Q8Rows,
    out: *mut f32,
    stride: usize,
) {
    debug_assert_eq!(w.len(), x.blocks);
    match kernel {
        Kernel::Scalar => {
            for r in 0..x.rows {
                let (xq, xs) = x.row(r);
                // SAFETY: the caller's contract.
                unsafe { *out.add(r * stride) = dot_scalar(w, ws, xq, xs) };
            }
        }
        // SAFETY: the CPU supports the kernel (caller's contract); pointers as above.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { x86::row_times_all_avx2(w, ws, x, out, stride) },
        #[cfg(target_arch = "x86_64")]
        Kernel::AvxVnni => unsafe { x86::row_times_all_vnni(w, ws, x, out, stride) },
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

    use super::{Block, GROUP_BLOCKS, Q8Rows, WideActivations};
    use crate::x86::{dot_avx2, dot_vnni, hsum};

    /// One kernel per instruction set, same body: `$dot(|w|, sign(x, w))` gives eight i32 partial
    /// sums of one block's 32 products.
    macro_rules! row_times_all {
        ($name:ident, $features:literal, $dot:path) => {
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
                            let products = $dot(aw, _mm256_sign_epi8(xv, wv));
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
                        let products = $dot(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
                        let scale = _mm256_set1_ps(unsafe { *ws.get_unchecked(b) * *xs.add(i) });
                        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), scale, acc);
                    }
                    unsafe { *out.add(r * stride) = hsum(acc) };
                }
            }
        };
    }

    row_times_all!(row_times_all_avx2, "avx2,fma", dot_avx2);
    row_times_all!(row_times_all_vnni, "avx2,fma,avxvnni", dot_vnni);

    /// The weight pair `p` of a row: its bytes, the accumulator's start (-128 x the blocks'
    /// sums, which cancels the activations' offset) and its two scales spread over the lanes
    /// `vpdpbusd` fills from each block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn weight_pair(blocks: &[Block], scales: &[f32], p: usize) -> (__m512i, __m512i, __m512) {
        let wv = unsafe { _mm512_loadu_si512((blocks.as_ptr() as *const __m512i).add(p)) };
        let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(i8::MIN), wv);
        let start = _mm512_sub_epi32(_mm512_setzero_si512(), sums);
        let (s0, s1) = unsafe {
            (
                *scales.get_unchecked(2 * p),
                *scales.get_unchecked(2 * p + 1),
            )
        };
        let spread = _mm512_shuffle_f32x4(_mm512_set1_ps(s0), _mm512_set1_ps(s1), 0x44);
        (wv, start, spread)
    }

    /// The 512-bit kernel: two blocks per `vpdpbusd`. Activations come offset to unsigned
    /// (q + 128) so the signed weights go in as they are; each weight pair's accumulator starts
    /// at -128 x (its blocks' sums), which removes the offset again. A group's products are
    /// summed scaled by the weights only and then scaled once by the group's activation scale.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn row_times_all_avx512(
        w: &[Block],
        ws: &[f32],
        x: &WideActivations,
        out: *mut f32,
        stride: usize,
    ) {
        let mut r0 = 0;
        while r0 < x.rows {
            // SAFETY: the caller's contract, for rows r0..r0 + tile.
            unsafe {
                match x.rows - r0 {
                    1 => rows_against::<1>(w, ws, x, r0, out, stride),
                    2 => rows_against::<2>(w, ws, x, r0, out, stride),
                    3 => rows_against::<3>(w, ws, x, r0, out, stride),
                    _ => rows_against::<4>(w, ws, x, r0, out, stride),
                }
            }
            r0 += 4;
        }
    }

    /// Activation rows `r0..r0 + R` against one weight row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn rows_against<const R: usize>(
        w: &[Block],
        ws: &[f32],
        x: &WideActivations,
        r0: usize,
        out: *mut f32,
        stride: usize,
    ) {
        let pairs = w.len() / 2;
        let groups = x.groups();
        let xp = x.quants.as_ptr() as *const __m512i;
        let mut acc = [_mm512_setzero_ps(); R];
        for g in 0..groups {
            let mut sum = [_mm512_setzero_ps(); R];
            for p in g * GROUP_BLOCKS / 2..((g + 1) * GROUP_BLOCKS / 2).min(pairs) {
                let ahead = (w.as_ptr() as *const __m512i).wrapping_add(p + PREFETCH * pairs);
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                let (wv, start, scales) = weight_pair(w, ws, p);
                for (t, sum) in sum.iter_mut().enumerate() {
                    let xv = unsafe { _mm512_loadu_si512(xp.add((r0 + t) * pairs + p)) };
                    let dot = _mm512_dpbusd_epi32(start, xv, wv);
                    *sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scales, *sum);
                }
            }
            for (t, acc) in acc.iter_mut().enumerate() {
                let xs = unsafe { *x.scales.get_unchecked((r0 + t) * groups + g) };
                *acc = _mm512_fmadd_ps(sum[t], _mm512_set1_ps(xs), *acc);
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            unsafe { *out.add((r0 + t) * stride) = _mm512_reduce_add_ps(*acc) };
        }
    }

    /// [`Q8Rows::quantize`] with AVX2, rounding half to even as ggml's AVX path does.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_avx2(values: &[f32], rows: usize, blocks: usize) -> Q8Rows {
        let mut quants = Vec::with_capacity(rows * blocks);
        let mut scales = Vec::with_capacity(rows * blocks);
        let sign = _mm256_set1_ps(-0.0);
        // packs interleave the 128-bit lanes; this puts the 32 bytes back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for chunk in values.chunks_exact(super::BLOCK) {
            let p = chunk.as_ptr();
            let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(p.add(8 * i)) });
            let abs = v.map(|x| _mm256_andnot_ps(sign, x));
            let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let scale = amax / 127.0;
            let inverse = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            let q = v.map(|x| _mm256_cvtps_epi32(_mm256_mul_ps(x, inverse)));
            let q16 = [
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            ];
            let q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16[0], q16[1]), order);
            let mut block = Block([0; super::BLOCK]);
            unsafe { _mm256_store_si256(block.0.as_mut_ptr() as *mut __m256i, q8) };
            quants.push(block);
            scales.push(scale);
        }
        Q8Rows {
            rows,
            blocks,
            quants,
            scales,
        }
    }

    /// [`WideActivations::quantize`] with AVX-512: a group's maximum in one pass, then 16 values
    /// per multiply, rounding conversion (ties to even) and saturating narrowing to bytes.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_groups_avx512(
        values: &[f32],
        rows: usize,
        blocks: usize,
    ) -> WideActivations {
        let cols = blocks * super::BLOCK;
        let mut quants = vec![Block([0; super::BLOCK]); rows * blocks];
        let mut scales = Vec::with_capacity(rows * blocks.div_ceil(GROUP_BLOCKS));
        let out = quants.as_mut_ptr() as *mut __m128i;
        let offset = _mm_set1_epi8(i8::MIN);
        let mut at = 0;
        for group in values
            .chunks_exact(cols)
            .flat_map(|row| row.chunks(GROUP_BLOCKS * super::BLOCK))
        {
            let p = group.as_ptr();
            let sixteens = group.len() / 16;
            let mut max = _mm512_setzero_ps();
            for i in 0..sixteens {
                max = _mm512_max_ps(
                    max,
                    _mm512_abs_ps(unsafe { _mm512_loadu_ps(p.add(16 * i)) }),
                );
            }
            let scale = _mm512_reduce_max_ps(max) / 127.0;
            let inverse = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            for i in 0..sixteens {
                let q = _mm512_cvtps_epi32(_mm512_mul_ps(
                    unsafe { _mm512_loadu_ps(p.add(16 * i)) },
                    inverse,
                ));
                let bytes = _mm_xor_si128(_mm512_cvtsepi32_epi8(q), offset);
                unsafe { _mm_storeu_si128(out.add(at + i), bytes) };
            }
            at += sixteens;
            scales.push(scale);
        }
        WideActivations {
            rows,
            blocks,
            quants,
            scales,
        }
    }

    /// Weight rows ahead that the 512-bit kernels prefetch (2 to 16 measured alike).
    const PREFETCH: usize = 4;

    /// Weight rows per tile of [`rows_times_all_avx512`].
    pub(super) const TILE_W: usize = 2;
    /// Activation rows per tile (and the fewest activation rows the tiled kernel is used for).
    pub(super) const TILE_X: usize = 4;

    /// Tiles of [`TILE_W`] weight rows x up to [`TILE_X`] activation rows: each activation block
    /// loaded serves several weight rows and each weight block several activation rows, so prompts
    /// and batches read their activations from cache a quarter as often as one weight row at a
    /// time would. `out[i]` is weight row i's column of the output, rows `stride` apart.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn rows_times_all_avx512(
        w: [(&[Block], &[f32]); TILE_W],
        x: &WideActivations,
        out: [*mut f32; TILE_W],
        stride: usize,
    ) {
        let mut r0 = 0;
        while r0 < x.rows {
            // SAFETY: the caller's contract, for rows r0..r0 + tile.
            unsafe {
                match x.rows - r0 {
                    1 => tile::<1>(w, x, r0, out, stride),
                    2 => tile::<2>(w, x, r0, out, stride),
                    3 => tile::<3>(w, x, r0, out, stride),
                    _ => tile::<TILE_X>(w, x, r0, out, stride),
                }
            }
            r0 += TILE_X;
        }
    }

    /// Activation rows `r0..r0 + R` against the tile's weight rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const R: usize>(
        w: [(&[Block], &[f32]); TILE_W],
        x: &WideActivations,
        r0: usize,
        out: [*mut f32; TILE_W],
        stride: usize,
    ) {
        let pairs = w[0].0.len() / 2;
        let groups = x.groups();
        let xp = x.quants.as_ptr() as *const __m512i;
        let mut acc = [[_mm512_setzero_ps(); TILE_W]; R];
        for g in 0..groups {
            let mut sum = [[_mm512_setzero_ps(); TILE_W]; R];
            for p in g * GROUP_BLOCKS / 2..((g + 1) * GROUP_BLOCKS / 2).min(pairs) {
                for (blocks, _) in &w {
                    let ahead =
                        (blocks.as_ptr() as *const __m512i).wrapping_add(p + PREFETCH * pairs);
                    _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                }
                let weights: [_; TILE_W] = std::array::from_fn(|i| weight_pair(w[i].0, w[i].1, p));
                for (t, sum) in sum.iter_mut().enumerate() {
                    let xv = unsafe { _mm512_loadu_si512(xp.add((r0 + t) * pairs + p)) };
                    for (sum, (wv, start, scales)) in sum.iter_mut().zip(weights) {
                        let dot = _mm512_dpbusd_epi32(start, xv, wv);
                        *sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scales, *sum);
                    }
                }
            }
            for (t, acc) in acc.iter_mut().enumerate() {
                let xs = _mm512_set1_ps(unsafe { *x.scales.get_unchecked((r0 + t) * groups + g) });
                for (acc, sum) in acc.iter_mut().zip(sum[t]) {
                    *acc = _mm512_fmadd_ps(sum, xs, *acc);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            for i in 0..TILE_W {
                unsafe { *out[i].add((r0 + t) * stride) = _mm512_reduce_add_ps(acc[i]) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values;

    /// Test values with some exact zeros and an all-zero block (values 64..96).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut v = test_values(n, seed);
        for (i, x) in v.iter_mut().enumerate() {
            if i % 7 == 0 || (64..96).contains(&i) {
                *x = 0.0;
            }
        }
        v
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
    fn vector_quantization_matches_the_scalar_one() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let v: Vec<f32> = values(64 * 40, 8).iter().map(|x| x * 3.7).collect();
            // SAFETY: the CPU has AVX2.
            let ours = unsafe { x86::quantize_avx2(&v, 40, 2) };
            assert_eq!(ours, Q8Rows::quantize_scalar(&v, 40, 2));
        }
    }

    #[test]
    fn vector_group_quantization_matches_the_scalar_one() {
        #[cfg(target_arch = "x86_64")]
        if wide_available() {
            let v: Vec<f32> = values(576 * 3, 8).iter().map(|x| x * 3.7).collect();
            // SAFETY: the CPU has AVX-512F and BW.
            let ours = unsafe { x86::quantize_groups_avx512(&v, 3, 18) };
            assert_eq!(ours, WideActivations::quantize_scalar(&v, 3, 18));
        }
    }

    #[test]
    fn group_quantization_round_trips_within_half_a_step_of_its_group() {
        // 18 blocks: groups of 8, 8 and 2; a group of zeros stays zeros.
        let mut v = values(2 * 576, 9);
        v[576..576 + 256].fill(0.0);
        let x = WideActivations::quantize(&v, 2, 576);
        assert_eq!(x.scales.len(), 6);
        assert_eq!(x.scales[3], 0.0);
        for (i, (back, v)) in x.dequantize().iter().zip(&v).enumerate() {
            let scale = x.scales[(i / 576) * 3 + (i % 576) / (GROUP_BLOCKS * BLOCK)];
            assert!((back - v).abs() <= scale * 0.5 + 1e-7, "{i}");
        }
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

    /// Every kernel against the scalar one, and `matmul` (which takes the 512-bit kernel where
    /// the CPU has it and the width is an even number of blocks: 192 and 576 here, not 160)
    /// against the product of its quantized operands; all within quantization error of the f32
    /// product. 576 ends in a short group (18 blocks: 8 + 8 + 2).
    #[test]
    fn every_kernel_matches_the_scalar_one_and_the_float_product() {
        for (n, k) in [(37, 160), (37, 192), (9, 576)] {
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
                let check = |label: &str, out: &[f32], expected: &[f32]| {
                    for i in 0..m * n {
                        assert!(
                            (out[i] - expected[i]).abs() <= 1e-4 * (1.0 + expected[i].abs()),
                            "{label} k={k} m={m} at {i}: {} vs {}",
                            out[i],
                            expected[i]
                        );
                        // Quantization error of both operands stays small against f32.
                        assert!((out[i] - exact[i]).abs() < 0.1 * (1.0 + exact[i].abs()));
                    }
                };
                for kernel in Kernel::available() {
                    let mut out = vec![0f32; m * n];
                    for j in 0..n {
                        let (wq, ws) = weights.row(j);
                        // SAFETY: out is m x n; the kernel is available.
                        unsafe { row_times_all(kernel, wq, ws, &xq, out.as_mut_ptr().add(j), n) };
                    }
                    check(&format!("{kernel:?}"), &out, &expected);
                }
                // The 512-bit path quantizes activations per group: against the product of
                // what both quantized operands stand for.
                #[cfg(target_arch = "x86_64")]
                if wide_available() && (k / BLOCK).is_multiple_of(2) {
                    let xg = WideActivations::quantize(&x, m, k).dequantize();
                    let wq: Vec<f32> = weights
                        .quants
                        .iter()
                        .zip(&weights.scales)
                        .flat_map(|(q, s)| q.0.map(|v| f32::from(v) * s))
                        .collect();
                    expected = reference(&wq, &xg, n, m, k);
                }
                check("matmul", &weights.matmul(&x, m), &expected);
            }
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
