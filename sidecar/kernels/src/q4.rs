//! Q4_1 weights as the GGUF file stores them (blocks of 32 four-bit values q with a scale d and a
//! minimum m: w = d q + m) times activations quantized per row to Q8 blocks, with the same
//! batched scheme as [`crate::q8`]: each weight block is unpacked once per tile of four
//! activation rows.
//!
//! Against requantizing to Q8_0 it reads 20 bytes per block instead of 36, and it computes on the
//! file's exact weights. A block's dot product with activation block (dx, xq) is
//! d dx sum(q xq) + m dx sum(xq): the four-bit values are unsigned, so `vpdpbusd` / `vpmaddubsw`
//! take them as they are, and the minimum's term needs only the activation block's sum, computed
//! once when the activations are quantized.

use crate::q8::{BLOCK, Q8Rows};
use crate::stacking::{concat, equal_width};
use crate::{Kernel, WeightMatrix, by_output_row};

/// Bytes of one GGML Q4_1 block: d (f16), m (f16), 16 bytes of packed four-bit values.
const GGML_Q4_1_BYTES: usize = 20;

/// 32 four-bit values packed as GGML packs them: value i in the low nibble of byte i, value
/// i + 16 in the high nibble.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Nibbles(pub [u8; BLOCK / 2]);

/// Rows of Q4_1 blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct Q4Rows {
    rows: usize,
    blocks: usize,
    quants: Vec<Nibbles>,
    scales: Vec<f32>,
    mins: Vec<f32>,
}

/// Why GGML Q4_1 bytes could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Q4_1 data of {rows} x {cols}: expected {expected} bytes, got {got}")]
pub struct Q4Error {
    rows: usize,
    cols: usize,
    expected: usize,
    got: usize,
}

impl Q4Rows {
    /// Reads `rows` x `cols` weights (`cols` a multiple of 32) from GGML Q4_1 blocks.
    pub fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Result<Self, Q4Error> {
        let blocks = cols / BLOCK;
        let expected = rows * blocks * GGML_Q4_1_BYTES;
        if !cols.is_multiple_of(BLOCK) || bytes.len() != expected {
            return Err(Q4Error {
                rows,
                cols,
                expected,
                got: bytes.len(),
            });
        }
        let count = rows * blocks;
        let (mut quants, mut scales, mut mins) = (
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
        );
        for block in bytes.chunks_exact(GGML_Q4_1_BYTES) {
            let f16 = |i: usize| half::f16::from_le_bytes([block[i], block[i + 1]]).to_f32();
            scales.push(f16(0));
            mins.push(f16(2));
            let mut q = [0u8; BLOCK / 2];
            q.copy_from_slice(&block[4..]);
            quants.push(Nibbles(q));
        }
        Ok(Self {
            rows,
            blocks,
            quants,
            scales,
            mins,
        })
    }

    /// The rows of several matrices of equal width, one after the other (fused projections).
    pub fn stack(parts: &[Q4Rows]) -> Self {
        Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            blocks: equal_width(parts, |p| p.blocks),
            quants: concat(parts, |p| &p.quants),
            scales: concat(parts, |p| &p.scales),
            mins: concat(parts, |p| &p.mins),
        }
    }

    /// The weights as f32, row-major (for tests and other back ends).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols());
        for ((q, d), m) in self.quants.iter().zip(&self.scales).zip(&self.mins) {
            let low = q.0.iter().map(|b| b & 0x0F);
            let high = q.0.iter().map(|b| b >> 4);
            out.extend(low.chain(high).map(|v| d * f32::from(v) + m));
        }
        out
    }

    fn row(&self, j: usize) -> WeightRow<'_> {
        let span = j * self.blocks..(j + 1) * self.blocks;
        WeightRow {
            quants: &self.quants[span.clone()],
            scales: &self.scales[span.clone()],
            mins: &self.mins[span],
        }
    }
}

impl WeightMatrix for Q4Rows {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.blocks * BLOCK
    }

    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let x = Q8Rows::quantize(x, m, self.cols());
        let sums = x.block_sums();
        let kernel = Kernel::detect();
        by_output_row(self.rows, m, |j, out| {
            // SAFETY: `by_output_row`'s contract; the kernel was detected on this CPU.
            unsafe { row_times_all(kernel, &self.row(j), &x, &sums, out, self.rows) };
        })
    }
}

/// One weight row's blocks.
pub struct WeightRow<'a> {
    quants: &'a [Nibbles],
    scales: &'a [f32],
    mins: &'a [f32],
}

/// Writes the dot product of weight row `w` with every row of `x` (whose block sums are `sums`)
/// to `out[r * stride]`.
///
/// # Safety
/// `out.add(r * stride)` must be valid for writes for every row r of `x`, and `kernel` must be
/// one [`Kernel::available`] returned.
pub unsafe fn row_times_all(
    kernel: Kernel,
    w: &WeightRow<'_>,
    x: &Q8Rows,
    sums: &[f32],
    out: *mut f32,
    stride: usize,
) {
    match kernel {
        Kernel::Scalar => {
            for r in 0..x.rows() {
                // SAFETY: the caller's contract.
                unsafe { *out.add(r * stride) = dot_scalar(w, x, sums, r) };
            }
        }
        // SAFETY: the CPU supports the kernel (caller's contract); pointers as above.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { x86::row_times_all_avx2(w, x, sums, out, stride) },
        #[cfg(target_arch = "x86_64")]
        Kernel::AvxVnni => unsafe { x86::row_times_all_vnni(w, x, sums, out, stride) },
    }
}

fn dot_scalar(w: &WeightRow<'_>, x: &Q8Rows, sums: &[f32], r: usize) -> f32 {
    let (xq, xs) = x.row(r);
    let blocks = w.quants.len();
    let mut total = 0f32;
    for b in 0..blocks {
        let q = &w.quants[b].0;
        let values = q.iter().map(|v| v & 0x0F).chain(q.iter().map(|v| v >> 4));
        let dot: i32 = values
            .zip(&xq[b].0)
            .map(|(v, x)| i32::from(v) * i32::from(*x))
            .sum();
        total += w.scales[b] * xs[b] * dot as f32 + w.mins[b] * sums[r * blocks + b];
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::WeightRow;
    use crate::WeightMatrix;
    use crate::q8::Q8Rows;
    use crate::x86::{dot_avx2, dot_vnni, hsum};

    /// One kernel per instruction set, same body: `$dot(q, x)` gives eight i32 partial sums of
    /// one block's 32 products of unsigned four-bit values and signed bytes.
    macro_rules! row_times_all {
        ($name:ident, $features:literal, $dot:path) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(
                w: &WeightRow<'_>,
                x: &Q8Rows,
                sums: &[f32],
                out: *mut f32,
                stride: usize,
            ) {
                let blocks = w.quants.len();
                let (xq, xs) = x.parts();
                let xp = xq.as_ptr() as *const __m256i;
                let low_nibbles = _mm_set1_epi8(0x0F);
                let unpack = |b: usize| {
                    let packed =
                        unsafe { _mm_load_si128(w.quants.as_ptr().add(b) as *const __m128i) };
                    let low = _mm_and_si128(packed, low_nibbles);
                    let high = _mm_and_si128(_mm_srli_epi16(packed, 4), low_nibbles);
                    _mm256_set_m128i(high, low)
                };
                let mut r0 = 0;
                // Four activation rows at a time: each weight block is unpacked once per tile.
                while r0 + 4 <= x.rows() {
                    let mut acc = [_mm256_setzero_ps(); 4];
                    let mut minimum = [0f32; 4];
                    for b in 0..blocks {
                        let q = unpack(b);
                        let (scale, min) =
                            unsafe { (*w.scales.get_unchecked(b), *w.mins.get_unchecked(b)) };
                        for t in 0..4 {
                            let i = (r0 + t) * blocks + b;
                            let xv = unsafe { _mm256_load_si256(xp.add(i)) };
                            let products = $dot(q, xv);
                            let s = _mm256_set1_ps(scale * unsafe { *xs.get_unchecked(i) });
                            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), s, acc[t]);
                            minimum[t] += min * unsafe { *sums.get_unchecked(i) };
                        }
                    }
                    for t in 0..4 {
                        unsafe { *out.add((r0 + t) * stride) = hsum(acc[t]) + minimum[t] };
                    }
                    r0 += 4;
                }
                for r in r0..x.rows() {
                    let mut acc = _mm256_setzero_ps();
                    let mut minimum = 0f32;
                    for b in 0..blocks {
                        let i = r * blocks + b;
                        let xv = unsafe { _mm256_load_si256(xp.add(i)) };
                        let products = $dot(unpack(b), xv);
                        let s = _mm256_set1_ps(unsafe {
                            *w.scales.get_unchecked(b) * *xs.get_unchecked(i)
                        });
                        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), s, acc);
                        minimum += unsafe { *w.mins.get_unchecked(b) * *sums.get_unchecked(i) };
                    }
                    unsafe { *out.add(r * stride) = hsum(acc) + minimum };
                }
            }
        };
    }

    row_times_all!(row_times_all_avx2, "avx2,fma", dot_avx2);
    row_times_all!(row_times_all_vnni, "avx2,fma,avxvnni", dot_vnni);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values;

    /// GGML Q4_1 bytes of `rows` x `cols` pseudo-random blocks.
    fn ggml_bytes(rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            state >> 8
        };
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            let d = half::f16::from_f32((next() % 1000) as f32 / 20_000.0);
            let m = half::f16::from_f32(-((next() % 1000) as f32) / 10_000.0);
            bytes.extend(d.to_le_bytes());
            bytes.extend(m.to_le_bytes());
            bytes.extend((0..16).map(|_| (next() & 0xFF) as u8));
        }
        bytes
    }

    #[test]
    fn reads_ggml_blocks_and_rejects_wrong_sizes() {
        let bytes = ggml_bytes(2, 64, 1);
        let w = Q4Rows::from_ggml(&bytes, 2, 64).unwrap();
        let dense = w.dequantize();
        // Value 17 of row 1, block 0: the high nibble of byte 1.
        let block = &bytes[2 * 20..];
        let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
        let m = half::f16::from_le_bytes([block[2], block[3]]).to_f32();
        assert_eq!(dense[64 + 17], d * f32::from(block[4 + 1] >> 4) + m);
        assert!(Q4Rows::from_ggml(&bytes[1..], 2, 64).is_err());
        assert!(Q4Rows::from_ggml(&bytes, 2, 48).is_err());
    }

    #[test]
    fn every_kernel_matches_the_float_product() {
        let (n, k) = (13, 96);
        let w = Q4Rows::from_ggml(&ggml_bytes(n, k, 7), n, k).unwrap();
        let dense = w.dequantize();
        for m in [1, 4, 6, 9] {
            let x = test_values(m * k, 3 + m as u32);
            let xq = Q8Rows::quantize(&x, m, k);
            let sums = xq.block_sums();
            for kernel in Kernel::available() {
                let mut out = vec![0f32; m * n];
                for j in 0..n {
                    // SAFETY: out is m x n; the kernel is available.
                    unsafe {
                        row_times_all(kernel, &w.row(j), &xq, &sums, out.as_mut_ptr().add(j), n)
                    };
                }
                for r in 0..m {
                    for j in 0..n {
                        let exact: f32 = (0..k).map(|i| x[r * k + i] * dense[j * k + i]).sum();
                        let got = out[r * n + j];
                        // Only the activations are quantized: a small error against the floats.
                        assert!(
                            (got - exact).abs() < 0.02 * (1.0 + exact.abs()),
                            "{kernel:?} m={m} ({r}, {j}): {got} vs {exact}"
                        );
                    }
                }
            }
            assert_eq!(w.matmul(&x, m).len(), m * n);
        }
    }

    #[test]
    fn stacked_rows_multiply_like_their_parts() {
        let k = 64;
        let a = Q4Rows::from_ggml(&ggml_bytes(3, k, 4), 3, k).unwrap();
        let b = Q4Rows::from_ggml(&ggml_bytes(2, k, 5), 2, k).unwrap();
        let both = Q4Rows::stack(&[a.clone(), b.clone()]);
        let x = test_values(k, 6);
        let (pa, pb, pboth) = (a.matmul(&x, 1), b.matmul(&x, 1), both.matmul(&x, 1));
        assert_eq!(&pboth[..3], &pa[..]);
        assert_eq!(&pboth[3..], &pb[..]);
    }
}
