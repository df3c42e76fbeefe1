//! Batch-invariant matmul on 32-wide GGUF blocks (Q4_0, Q4_1, Q8_0), CPU.
//!
//! `y = x · Wᵀ` with `W` kept in its GGUF block format and each row of `x` quantized to 8 bits
//! per 32-block, then integer dot products per block, exactly the arithmetic of llama.cpp's
//! `vec_dot_q4_1_q8_1` / `vec_dot_q4_0_q8_0` / `vec_dot_q8_0_q8_0` (AVX2 versions), down to
//! the order of the float accumulation. Two properties follow:
//!
//! - **Batch invariance.** Every output element is computed by the same instruction sequence
//!   whatever the number of rows, the other rows, the thread split or the SIMD path: a token's
//!   logits do not depend on what else is in the batch or on how a prompt was chunked, so the
//!   KV a prefill writes is bit-identical to what a decode would write. That is what lets the
//!   prefix cache (and batching) never change an output.
//! - **Fidelity to llama.cpp.** The reference implementation computes the same quantized
//!   products, so logits agree to float-summation noise instead of quantization noise.
//!
//! One kernel serves prefill and decode: weights are read in their compact format (bandwidth is
//! what decode is bound by), and a weight block is unpacked once for a tile of activation rows
//! (what prefill is bound by).
//!
//! Block layouts (ggml):
//! ```text
//!   Q4_0: d:f16 | qs[16]          element e: (qs[e%16] >> 4*(e/16)) & 15, value d*(q-8)
//!   Q4_1: d:f16 m:f16 | qs[16]    element e as above, value d*q + m
//!   Q8_0: d:f16 | qs:i8[32]       value d*q
//! ```

use half::f16;
use rayon::prelude::*;

pub const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl BlockFormat {
    /// Bytes per block in a GGUF file.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
        }
    }
}

/// One weight block, normalised: scale, offset (Q4_1 only) and the 32 quants as bytes in element
/// order (nibbles unpacked at load; Q4_0's -8 bias applied at dot time, like ggml).
#[derive(Clone, Copy)]
struct WeightBlock {
    d: f32,
    m: f32,
    /// Q4_0/Q4_1: 16 bytes of packed nibbles; Q8_0: 32 signed bytes.
    qs: [u8; 32],
}

/// A `[rows, cols]` weight matrix in one of the 32-block formats.
#[derive(Clone)]
pub struct BlockMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    blocks: Vec<WeightBlock>,
}

impl std::fmt::Debug for BlockMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BlockMatrix({:?}, {}x{})",
            self.format, self.rows, self.cols
        )
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

impl BlockMatrix {
    /// Parses raw GGUF block data of a `[rows, cols]` tensor.
    pub fn from_gguf_bytes(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        data: &[u8],
    ) -> Option<Self> {
        if !cols.is_multiple_of(QK) || data.len() != rows * cols / QK * format.block_bytes() {
            return None;
        }
        let blocks = data
            .chunks_exact(format.block_bytes())
            .map(|b| {
                let mut qs = [0u8; 32];
                match format {
                    BlockFormat::Q4_0 => {
                        qs[..16].copy_from_slice(&b[2..18]);
                        WeightBlock {
                            d: f16_at(b, 0),
                            m: 0.0,
                            qs,
                        }
                    }
                    BlockFormat::Q4_1 => {
                        qs[..16].copy_from_slice(&b[4..20]);
                        WeightBlock {
                            d: f16_at(b, 0),
                            m: f16_at(b, 2),
                            qs,
                        }
                    }
                    BlockFormat::Q8_0 => {
                        qs.copy_from_slice(&b[2..34]);
                        WeightBlock {
                            d: f16_at(b, 0),
                            m: 0.0,
                            qs,
                        }
                    }
                }
            })
            .collect();
        Some(Self {
            format,
            rows,
            cols,
            blocks,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> BlockFormat {
        self.format
    }

    /// Stacks matrices of the same format and width: one matmul instead of several (Q, K and V;
    /// gate and up), with outputs side by side.
    pub fn concat_rows(parts: &[&BlockMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.format != first.format || p.cols != first.cols)
        {
            return None;
        }
        Some(Self {
            format: first.format,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            blocks: parts
                .iter()
                .flat_map(|p| p.blocks.iter().copied())
                .collect(),
        })
    }

    /// Dequantized row-major f32 values (tests and embedding lookups).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let nb = self.cols / QK;
        for (bi, blk) in self.blocks[row * nb..(row + 1) * nb].iter().enumerate() {
            for e in 0..QK {
                out[bi * QK + e] = match self.format {
                    BlockFormat::Q4_0 => blk.d * (nibble(&blk.qs, e) as f32 - 8.0),
                    BlockFormat::Q4_1 => blk.d * nibble(&blk.qs, e) as f32 + blk.m,
                    BlockFormat::Q8_0 => blk.d * (blk.qs[e] as i8) as f32,
                };
            }
        }
    }

    /// `x`: `[m, cols]` row-major; returns `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(
            x.len(),
            m * self.cols,
            "activation shape does not match the weight"
        );
        let acts: Vec<ActBlock> = x
            .par_chunks(self.cols)
            .flat_map_iter(|row| quantize_row(row, self.format == BlockFormat::Q4_1))
            .collect();
        let nb = self.cols / QK;
        let n = self.rows;
        // Output columns per parallel task: enough work to amortise scheduling, enough tasks
        // to keep both cores busy.
        let cols_per_task = (n / (4 * rayon::current_num_threads())).clamp(8, 256);
        let parts: Vec<(usize, Vec<f32>)> = (0..n)
            .step_by(cols_per_task)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|c0| {
                let c1 = (c0 + cols_per_task).min(n);
                let mut out = vec![0f32; m * (c1 - c0)];
                for c in c0..c1 {
                    let w = &self.blocks[c * nb..(c + 1) * nb];
                    for r in 0..m {
                        let a = &acts[r * nb..(r + 1) * nb];
                        out[r * (c1 - c0) + (c - c0)] = dot(self.format, w, a);
                    }
                }
                (c0, out)
            })
            .collect();
        let mut y = vec![0f32; m * n];
        for (c0, out) in parts {
            let w = out.len() / m.max(1);
            for r in 0..m {
                y[r * n + c0..r * n + c0 + w].copy_from_slice(&out[r * w..(r + 1) * w]);
            }
        }
        y
    }
}

#[inline]
fn nibble(qs: &[u8; 32], e: usize) -> u8 {
    if e < 16 {
        qs[e] & 0x0F
    } else {
        qs[e - 16] >> 4
    }
}

/// An activation block quantized to 8 bits (ggml's Q8_0, or Q8_1 with `s = d * Σq`).
/// `d` and `s` hold the f16-rounded values ggml stores.
#[derive(Clone, Copy)]
pub struct ActBlock {
    d: f32,
    s: f32,
    qs: [i8; 32],
}

/// ggml's AVX2 `quantize_row_q8_0` / `quantize_row_q8_1`: scale by `127 / max|x|`, round half to
/// even.
fn quantize_row(x: &[f32], with_sum: bool) -> impl Iterator<Item = ActBlock> + '_ {
    x.chunks_exact(QK).map(move |chunk| {
        let amax = chunk.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut qs = [0i8; 32];
        let mut sum = 0i32;
        for (q, &v) in qs.iter_mut().zip(chunk) {
            *q = (v * id).round_ties_even() as i8;
            sum += *q as i32;
        }
        let d16 = f16::from_f32(d).to_f32();
        let s = if with_sum {
            f16::from_f32(d * sum as f32).to_f32()
        } else {
            0.0
        };
        ActBlock { d: d16, s, qs }
    })
}

/// ggml's `hsum_float_8` order: ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)).
#[inline]
fn hsum8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// One weight row against one activation row. The integer part of a block is 8 lanes, lane j
/// summing elements 4j..4j+3 (what `maddubs` + `madd` produce); each lane is converted to f32
/// and fused-multiply-added with the block's scale product into a per-lane accumulator.
#[inline]
fn dot(format: BlockFormat, w: &[WeightBlock], a: &[ActBlock]) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        avx2::dot(format, w, a)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        dot_scalar(format, w, a)
    }
}

/// The portable definition; the SIMD path must agree with it bit for bit.
#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
fn dot_scalar(format: BlockFormat, w: &[WeightBlock], a: &[ActBlock]) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (wb, ab) in w.iter().zip(a) {
        let dd = wb.d * ab.d;
        for (lane, acc_lane) in acc.iter_mut().enumerate() {
            let mut isum = 0i32;
            for e in 4 * lane..4 * lane + 4 {
                let wq = match format {
                    BlockFormat::Q4_0 => nibble(&wb.qs, e) as i32 - 8,
                    BlockFormat::Q4_1 => nibble(&wb.qs, e) as i32,
                    BlockFormat::Q8_0 => wb.qs[e] as i8 as i32,
                };
                isum += wq * ab.qs[e] as i32;
            }
            *acc_lane = dd.mul_add(isum as f32, *acc_lane);
        }
        if format == BlockFormat::Q4_1 {
            summs += wb.m * ab.s;
        }
    }
    hsum8(&acc) + summs
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2 {
    use super::{hsum8, ActBlock, BlockFormat, WeightBlock};
    use std::arch::x86_64::*;

    #[inline]
    pub(super) fn dot(format: BlockFormat, w: &[WeightBlock], a: &[ActBlock]) -> f32 {
        // SAFETY: this module is compiled only when AVX2 and FMA are enabled for the whole
        // build (`target_feature`), so the intrinsics are available; every load reads a
        // 16- or 32-byte array that lives in `WeightBlock`/`ActBlock`, in bounds by construction.
        unsafe {
            let mut acc = _mm256_setzero_ps();
            let mut summs = 0f32;
            let low_mask = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            for (wb, ab) in w.iter().zip(a) {
                let dd = _mm256_set1_ps(wb.d * ab.d);
                let qy = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                let sums = match format {
                    BlockFormat::Q8_0 => {
                        let qx = _mm256_loadu_si256(wb.qs.as_ptr() as *const __m256i);
                        // u8 x i8 products need an unsigned left side: |x| and sign(x) moved to y.
                        let ax = _mm256_sign_epi8(qx, qx);
                        let sy = _mm256_sign_epi8(qy, qx);
                        _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones)
                    }
                    BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                        let packed = _mm_loadu_si128(wb.qs.as_ptr() as *const __m128i);
                        let hi = _mm_srli_epi16(packed, 4);
                        let bytes = _mm256_and_si256(
                            _mm256_insertf128_si256(_mm256_castsi128_si256(packed), hi, 1),
                            low_mask,
                        );
                        if format == BlockFormat::Q4_1 {
                            summs += wb.m * ab.s;
                            _mm256_madd_epi16(_mm256_maddubs_epi16(bytes, qy), ones)
                        } else {
                            let qx = _mm256_sub_epi8(bytes, _mm256_set1_epi8(8));
                            let ax = _mm256_sign_epi8(qx, qx);
                            let sy = _mm256_sign_epi8(qy, qx);
                            _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones)
                        }
                    }
                };
                acc = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sums), acc);
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            hsum8(&lanes) + summs
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_matrix(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        rng: &mut impl Rng,
    ) -> BlockMatrix {
        let mut data = Vec::new();
        for _ in 0..rows * cols / QK {
            data.extend(f16::from_f32(rng.random_range(0.001..0.05)).to_le_bytes());
            if format == BlockFormat::Q4_1 {
                data.extend(f16::from_f32(rng.random_range(-0.2..0.2)).to_le_bytes());
            }
            let n = if format == BlockFormat::Q8_0 { 32 } else { 16 };
            data.extend((0..n).map(|_| rng.random::<u8>()));
        }
        BlockMatrix::from_gguf_bytes(format, rows, cols, &data).unwrap()
    }

    #[test]
    fn simd_path_equals_the_scalar_definition_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for format in [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let w = random_matrix(format, 3, 160, &mut rng);
            let x: Vec<f32> = (0..160).map(|_| rng.random_range(-3.0..3.0)).collect();
            let acts: Vec<ActBlock> = quantize_row(&x, format == BlockFormat::Q4_1).collect();
            for r in 0..3 {
                let wr = &w.blocks[r * 5..(r + 1) * 5];
                assert_eq!(
                    dot(format, wr, &acts).to_bits(),
                    dot_scalar(format, wr, &acts).to_bits(),
                    "{format:?}"
                );
            }
        }
    }

    #[test]
    fn matmul_is_close_to_the_dequantized_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for format in [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let (n, k, m) = (37, 96, 5);
            let w = random_matrix(format, n, k, &mut rng);
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let y = w.matmul(&x, m);
            let mut row = vec![0f32; k];
            for c in 0..n {
                w.dequantize_row(c, &mut row);
                for r in 0..m {
                    let exact: f32 = row
                        .iter()
                        .zip(&x[r * k..(r + 1) * k])
                        .map(|(a, b)| a * b)
                        .sum();
                    let scale: f32 = row
                        .iter()
                        .zip(&x[r * k..(r + 1) * k])
                        .map(|(a, b)| (a * b).abs())
                        .sum();
                    // 8-bit activations: relative error per product below 1/127.
                    assert!(
                        (y[r * n + c] - exact).abs() <= scale / 100.0 + 1e-6,
                        "{format:?} {} vs {exact}",
                        y[r * n + c]
                    );
                }
            }
        }
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let w = random_matrix(BlockFormat::Q4_1, 300, 64, &mut rng);
        let x: Vec<f32> = (0..7 * 64).map(|_| rng.random_range(-1.0..1.0)).collect();
        let batch = w.matmul(&x, 7);
        for r in 0..7 {
            let alone = w.matmul(&x[r * 64..(r + 1) * 64], 1);
            assert_eq!(alone, batch[r * 300..(r + 1) * 300].to_vec());
        }
    }
}
