//! Batch-invariant matmul on 32-wide GGUF blocks (Q4_0, Q4_1, Q8_0), CPU.
//!
//! `y = x · Wᵀ` with `W` kept in its GGUF block format and each row of `x` quantized to 8 bits
//! per 32-block, then integer dot products per block: the arithmetic of llama.cpp's
//! `vec_dot_q4_1_q8_1` / `vec_dot_q4_0_q8_0` / `vec_dot_q8_0_q8_0` (AVX2 versions), down to
//! the order of the float accumulation. Two properties follow:
//!
//! - **Batch invariance.** Every output element is computed by the same instruction sequence
//!   whatever the number of rows, the other rows, the thread split or the SIMD path: a token's
//!   logits do not depend on what else is in the batch or on how a prompt was chunked, so the
//!   KV a prefill writes is bit-identical to what a decode would write. That is what lets the
//!   prefix cache (and batching) never change an output.
//! - **Fidelity to llama.cpp.** The reference implementation computes the same quantized
//!   products, so logits agree to the last bits where the rest of the model does too.
//!
//! One kernel serves prefill and decode: weights stay in their compact file format (decode is
//! bound by the bytes it reads) and a weight block is unpacked once for a tile of up to four
//! activation rows (prefill is bound by arithmetic).
//!
//! Block layouts (ggml), kept byte for byte as in the file:
//! ```text
//!   Q4_0 (18 B): d:f16 | qs[16]          element e: (qs[e%16] >> 4*(e/16)) & 15, value d*(q-8)
//!   Q4_1 (20 B): d:f16 m:f16 | qs[16]    element e as above, value d*q + m
//!   Q8_0 (34 B): d:f16 | qs:i8[32]       value d*q
//! ```

use half::f16;
use rayon::prelude::*;

pub const QK: usize = 32;
use crate::cpu::columns::{PAIR_ROW_TILE, ROW_TILE};

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

    /// Offset of the quants in a block.
    fn qs_offset(self) -> usize {
        match self {
            BlockFormat::Q4_0 | BlockFormat::Q8_0 => 2,
            BlockFormat::Q4_1 => 4,
        }
    }
}

/// A `[rows, cols]` weight matrix in one of the 32-block formats.
#[derive(Clone)]
pub struct BlockMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    /// GGUF block bytes, row after row.
    data: Vec<u8>,
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

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// One weight block's bytes, read through the layout of its format.
#[derive(Clone, Copy)]
struct WeightBlock<'a> {
    bytes: &'a [u8],
}

impl WeightBlock<'_> {
    #[inline]
    fn d(&self) -> f32 {
        f16_at(self.bytes, 0)
    }
    #[inline]
    fn m(&self) -> f32 {
        f16_at(self.bytes, 2)
    }
    /// The quant of element `e`: unsigned 0..15 for the 4-bit formats (Q4_0's -8 bias is
    /// applied by the caller), signed for Q8_0.
    #[inline]
    fn quant(&self, format: BlockFormat, e: usize) -> i32 {
        let qs = &self.bytes[format.qs_offset()..];
        match format {
            BlockFormat::Q8_0 => qs[e] as i8 as i32,
            _ if e < 16 => (qs[e] & 0x0F) as i32,
            _ => (qs[e - 16] >> 4) as i32,
        }
    }
}

impl BlockMatrix {
    /// Takes raw GGUF block data of a `[rows, cols]` tensor.
    pub fn from_gguf_bytes(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        data: &[u8],
    ) -> Option<Self> {
        if !cols.is_multiple_of(QK) || data.len() != rows * cols / QK * format.block_bytes() {
            return None;
        }
        Some(Self {
            format,
            rows,
            cols,
            data: data.to_vec(),
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

    fn row_bytes(&self) -> usize {
        self.cols / QK * self.format.block_bytes()
    }

    fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
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
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
        })
    }

    /// One row dequantized to f32.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let bb = self.format.block_bytes();
        for (bi, bytes) in self.row(row).chunks_exact(bb).enumerate() {
            let w = WeightBlock { bytes };
            for e in 0..QK {
                let q = w.quant(self.format, e);
                out[bi * QK + e] = match self.format {
                    BlockFormat::Q4_0 => w.d() * (q - 8) as f32,
                    BlockFormat::Q4_1 => w.d() * q as f32 + w.m(),
                    BlockFormat::Q8_0 => w.d() * q as f32,
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
        let nb = self.cols / QK;
        let with_sum = self.format == BlockFormat::Q4_1;
        let acts: Vec<ActBlock> = if m > 1 {
            x.par_chunks(self.cols)
                .flat_map_iter(|row| quantize_row(row, with_sum))
                .collect()
        } else {
            quantize_row(x, with_sum).collect()
        };
        // The kernel path is chosen once per matmul, not per output column.
        let vnni = crate::cpu::kernels::vnni();
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        if vnni {
            return crate::cpu::columns::par_column_pairs(
                m,
                self.rows,
                |c, cols, r0, rows, out| {
                    let a = &acts[r0 * nb..(r0 + rows) * nb];
                    if cols == 2 {
                        // SAFETY: `vnni` is true only where the processor has AVX-512 VNNI, F, BW
                        // and VL (`kernels::has_vnni`).
                        unsafe {
                            avx2::dot_pair_vnni512(
                                self.format,
                                self.row(c),
                                self.row(c + 1),
                                a,
                                nb,
                                rows,
                                out,
                            )
                        }
                    } else {
                        // A last odd column: the 256-bit kernel, `ROW_TILE` rows at a time.
                        for (i, o) in out[0][..rows].chunks_mut(ROW_TILE).enumerate() {
                            let a = &a[i * ROW_TILE * nb..(i * ROW_TILE + o.len()) * nb];
                            dot_rows(self.format, self.row(c), a, nb, o, vnni);
                        }
                    }
                },
            );
        }
        crate::cpu::columns::par_columns(m, self.rows, |c, r0, out| {
            let a = &acts[r0 * nb..(r0 + out.len()) * nb];
            dot_rows(self.format, self.row(c), a, nb, out, vnni);
        })
    }
}

/// An activation block quantized to 8 bits (ggml's Q8_0, or Q8_1 with `s = d * Σq`).
/// `d` and `s` hold the f16-rounded values ggml stores.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct ActBlock {
    qs: [i8; 32],
    d: f32,
    s: f32,
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
        ActBlock { qs, d: d16, s }
    })
}

/// ggml's `hsum_float_8` order: ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)).
#[inline]
fn hsum8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// One weight row (`nb` blocks) against `out.len()` activation rows (`acts`: `[rows, nb]`).
#[inline]
/// `vnni`: use AVX-512 VNNI (only ever true where the processor has it, see `cpu::kernels`).
#[cfg_attr(
    not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )),
    allow(unused_variables)
)]
fn dot_rows(
    format: BlockFormat,
    w: &[u8],
    acts: &[ActBlock],
    nb: usize,
    out: &mut [f32],
    vnni: bool,
) {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        avx2::dot_rows(format, w, acts, nb, out, vnni)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        for (r, o) in out.iter_mut().enumerate() {
            *o = dot_scalar(format, w, &acts[r * nb..(r + 1) * nb]);
        }
    }
}

/// The definition of one output element; the SIMD path must agree with it bit for bit. The
/// integer part of a block is 8 lanes, lane j summing elements 4j..4j+3 (what `maddubs` +
/// `madd` produce); each lane is converted to f32 and fused-multiply-added with the block's
/// scale product into a per-lane accumulator, reduced at the end in `hsum8` order.
#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
fn dot_scalar(format: BlockFormat, w: &[u8], a: &[ActBlock]) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (bytes, ab) in w.chunks_exact(format.block_bytes()).zip(a) {
        let wb = WeightBlock { bytes };
        let dd = wb.d() * ab.d;
        for (lane, acc_lane) in acc.iter_mut().enumerate() {
            let mut isum = 0i32;
            for e in 4 * lane..4 * lane + 4 {
                let q = wb.quant(format, e);
                let wq = if format == BlockFormat::Q4_0 {
                    q - 8
                } else {
                    q
                };
                isum += wq * ab.qs[e] as i32;
            }
            *acc_lane = dd.mul_add(isum as f32, *acc_lane);
        }
        if format == BlockFormat::Q4_1 {
            summs += wb.m() * ab.s;
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
    use super::{hsum8, ActBlock, BlockFormat, PAIR_ROW_TILE, ROW_TILE};
    use std::arch::x86_64::*;

    #[inline]
    pub(super) fn dot_rows(
        format: BlockFormat,
        w: &[u8],
        acts: &[ActBlock],
        nb: usize,
        out: &mut [f32],
        vnni: bool,
    ) {
        debug_assert!(out.len() <= ROW_TILE && acts.len() == out.len() * nb);
        debug_assert_eq!(w.len(), nb * format.block_bytes());
        if vnni {
            debug_assert!(crate::cpu::kernels::has_vnni());
            // SAFETY: the caller passes `vnni` from `kernels::vnni()`, true only when the
            // processor has AVX-512 VNNI and VL.
            unsafe { dot_rows_vnni(format, w, acts, nb, out) }
        } else {
            dot_rows_with::<false>(format, w, acts, nb, out)
        }
    }

    /// [`dot_rows_with`] compiled with AVX-512 VNNI, so the `vpdpbusd` of `VNNI = true` is
    /// inlined.
    ///
    /// # Safety
    /// The processor supports AVX-512 VNNI and AVX-512 VL.
    #[target_feature(enable = "avx512vnni,avx512vl")]
    pub(super) unsafe fn dot_rows_vnni(
        format: BlockFormat,
        w: &[u8],
        acts: &[ActBlock],
        nb: usize,
        out: &mut [f32],
    ) {
        dot_rows_with::<true>(format, w, acts, nb, out)
    }

    #[inline(always)]
    pub(super) fn dot_rows_with<const VNNI: bool>(
        format: BlockFormat,
        w: &[u8],
        acts: &[ActBlock],
        nb: usize,
        out: &mut [f32],
    ) {
        // A const row count keeps every accumulator in a register.
        match (format, out.len()) {
            (BlockFormat::Q4_1, 1) => dot_tile::<1, Q41, VNNI>(w, acts, nb, out),
            (BlockFormat::Q4_1, 2) => dot_tile::<2, Q41, VNNI>(w, acts, nb, out),
            (BlockFormat::Q4_1, 3) => dot_tile::<3, Q41, VNNI>(w, acts, nb, out),
            (BlockFormat::Q4_1, _) => dot_tile::<4, Q41, VNNI>(w, acts, nb, out),
            (BlockFormat::Q4_0, 1) => dot_tile::<1, Q40, VNNI>(w, acts, nb, out),
            (BlockFormat::Q4_0, 2) => dot_tile::<2, Q40, VNNI>(w, acts, nb, out),
            (BlockFormat::Q4_0, 3) => dot_tile::<3, Q40, VNNI>(w, acts, nb, out),
            (BlockFormat::Q4_0, _) => dot_tile::<4, Q40, VNNI>(w, acts, nb, out),
            (BlockFormat::Q8_0, 1) => dot_tile::<1, Q80, VNNI>(w, acts, nb, out),
            (BlockFormat::Q8_0, 2) => dot_tile::<2, Q80, VNNI>(w, acts, nb, out),
            (BlockFormat::Q8_0, 3) => dot_tile::<3, Q80, VNNI>(w, acts, nb, out),
            (BlockFormat::Q8_0, _) => dot_tile::<4, Q80, VNNI>(w, acts, nb, out),
        }
    }

    /// Two weight rows `w0`, `w1` against `rows` activation rows: `out[j][r]` is row `r` against
    /// `wj`. Each 512-bit register holds the 8 lanes of `w0` in its low half and those of `w1`
    /// in its high half; per lane it is [`dot_tile`]'s arithmetic (the same `vpdpbusd` lanes,
    /// the same scale product, the same fused multiply-add chain over blocks in order, the same
    /// `m * s` sum and final `hsum8`), so the results are those of the 256-bit path, bit for
    /// bit, at about half the instructions per weight block.
    ///
    /// # Safety
    /// The processor supports AVX-512 F, BW, VL and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn dot_pair_vnni512(
        format: BlockFormat,
        w0: &[u8],
        w1: &[u8],
        acts: &[ActBlock],
        nb: usize,
        rows: usize,
        out: &mut [[f32; PAIR_ROW_TILE]; 2],
    ) {
        assert!((1..=PAIR_ROW_TILE).contains(&rows) && acts.len() == rows * nb);
        assert!(w0.len() == nb * format.block_bytes() && w1.len() == w0.len());
        // A const row count keeps every accumulator in a register.
        macro_rules! by_rows {
            ($f:ty) => {
                match rows {
                    1 => pair_tile::<1, $f>(w0, w1, acts, nb, out),
                    2 => pair_tile::<2, $f>(w0, w1, acts, nb, out),
                    3 => pair_tile::<3, $f>(w0, w1, acts, nb, out),
                    4 => pair_tile::<4, $f>(w0, w1, acts, nb, out),
                    5 => pair_tile::<5, $f>(w0, w1, acts, nb, out),
                    6 => pair_tile::<6, $f>(w0, w1, acts, nb, out),
                    7 => pair_tile::<7, $f>(w0, w1, acts, nb, out),
                    _ => pair_tile::<8, $f>(w0, w1, acts, nb, out),
                }
            };
        }
        match format {
            BlockFormat::Q4_1 => by_rows!(Q41),
            BlockFormat::Q4_0 => by_rows!(Q40),
            BlockFormat::Q8_0 => by_rows!(Q80),
        }
    }

    /// The 32 quants of a block of each of two rows, as unsigned bytes `[row 0 | row 1]`,
    /// and (signed formats) the signed quants whose signs move onto the activations.
    ///
    /// # Safety
    /// `b0`, `b1` point to whole blocks of `format`; AVX-512 F/BW/VL are enabled.
    #[inline(always)]
    unsafe fn weights_pair(
        format: BlockFormat,
        b0: *const u8,
        b1: *const u8,
    ) -> (__m512i, Option<__m512i>) {
        let nibbles = |off: usize| {
            let packed = _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_loadu_si128(b0.add(off) as *const __m128i)),
                _mm_loadu_si128(b1.add(off) as *const __m128i),
            );
            let mask = _mm256_set1_epi8(0x0F);
            let lo = _mm256_and_si256(packed, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), mask);
            // 128-bit lanes [lo0 lo1 hi0 hi1] -> [lo0 hi0 lo1 hi1]: each row's elements 0..15
            // then 16..31, as `nibbles` lays out one row.
            let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            _mm512_shuffle_i64x2::<0b11_01_10_00>(z, z)
        };
        match format {
            BlockFormat::Q4_1 => (nibbles(4), None),
            BlockFormat::Q4_0 => {
                let qx = _mm512_sub_epi8(nibbles(2), _mm512_set1_epi8(8));
                (_mm512_abs_epi8(qx), Some(qx))
            }
            BlockFormat::Q8_0 => {
                let qx = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_loadu_si256(b0.add(2) as *const __m256i)),
                    _mm256_loadu_si256(b1.add(2) as *const __m256i),
                );
                (_mm512_abs_epi8(qx), Some(qx))
            }
        }
    }

    /// The body of [`dot_pair_vnni512`] for `R` rows.
    ///
    /// # Safety
    /// AVX-512 F, BW, VL and VNNI are enabled in the caller; `w0` and `w1` hold `nb` blocks of
    /// `F`'s format and `acts` holds `R * nb` blocks (asserted by the caller).
    #[inline(always)]
    unsafe fn pair_tile<const R: usize, F: Format>(
        w0: &[u8],
        w1: &[u8],
        acts: &[ActBlock],
        nb: usize,
        out: &mut [[f32; PAIR_ROW_TILE]; 2],
    ) {
        let bb = F::FORMAT.block_bytes();
        let zero = _mm512_setzero_si512();
        // Lanes 0..8 take element 0 (d of row 0, or m with 1), lanes 8..16 element 2 (row 1).
        let d_idx = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
        let m_idx = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut summs = [_mm512_setzero_ps(); R];
        let (p0, p1) = (w0.as_ptr(), w1.as_ptr());
        for b in 0..nb {
            let (blk0, blk1) = (p0.add(b * bb), p1.add(b * bb));
            // d and m of both blocks, f16 -> f32 in one conversion: [d0, m0, d1, m1].
            let dm = _mm_cvtph_ps(_mm_set_epi32(
                0,
                0,
                (blk1 as *const i32).read_unaligned(),
                (blk0 as *const i32).read_unaligned(),
            ));
            let dm = _mm512_castps128_ps512(dm);
            let dvec = _mm512_permutexvar_ps(d_idx, dm);
            let mvec = _mm512_permutexvar_ps(m_idx, dm);
            let (wx, sign_src) = weights_pair(F::FORMAT, blk0, blk1);
            let negate = sign_src.map(|qx| _mm512_movepi8_mask(qx));
            for r in 0..R {
                let ab = acts.get_unchecked(r * nb + b);
                let qy =
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i));
                let qy = match negate {
                    Some(neg) => _mm512_mask_sub_epi8(qy, neg, zero, qy),
                    None => qy,
                };
                let sums = _mm512_dpbusd_epi32(zero, wx, qy);
                let scale = _mm512_mul_ps(dvec, _mm512_set1_ps(ab.d));
                acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums), acc[r]);
                if F::FORMAT == BlockFormat::Q4_1 {
                    summs[r] = _mm512_add_ps(summs[r], _mm512_mul_ps(mvec, _mm512_set1_ps(ab.s)));
                }
            }
        }
        for r in 0..R {
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), acc[r]);
            let mut m = [0f32; 16];
            _mm512_storeu_ps(m.as_mut_ptr(), summs[r]);
            let (lo, hi) = lanes.split_at(8);
            out[0][r] = hsum8(lo.try_into().unwrap()) + m[0];
            out[1][r] = hsum8(hi.try_into().unwrap()) + m[8];
        }
    }

    /// How one block format presents its weights to `maddubs`.
    trait Format {
        const FORMAT: BlockFormat;
        /// Unsigned weight bytes, and the signs to move onto the activations (if signed).
        ///
        /// # Safety
        /// `blk` points to a whole block of this format; AVX2 is enabled.
        unsafe fn weights(blk: *const u8) -> (__m256i, Option<__m256i>);
    }

    struct Q41;
    struct Q40;
    struct Q80;

    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let packed = _mm_loadu_si128(p as *const __m128i);
        let hi = _mm_srli_epi16(packed, 4);
        _mm256_and_si256(
            _mm256_insertf128_si256(_mm256_castsi128_si256(packed), hi, 1),
            _mm256_set1_epi8(0x0F),
        )
    }

    impl Format for Q41 {
        const FORMAT: BlockFormat = BlockFormat::Q4_1;
        #[inline(always)]
        unsafe fn weights(blk: *const u8) -> (__m256i, Option<__m256i>) {
            (nibbles(blk.add(4)), None)
        }
    }
    impl Format for Q40 {
        const FORMAT: BlockFormat = BlockFormat::Q4_0;
        #[inline(always)]
        unsafe fn weights(blk: *const u8) -> (__m256i, Option<__m256i>) {
            let qx = _mm256_sub_epi8(nibbles(blk.add(2)), _mm256_set1_epi8(8));
            (_mm256_sign_epi8(qx, qx), Some(qx))
        }
    }
    impl Format for Q80 {
        const FORMAT: BlockFormat = BlockFormat::Q8_0;
        #[inline(always)]
        unsafe fn weights(blk: *const u8) -> (__m256i, Option<__m256i>) {
            let qx = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            (_mm256_sign_epi8(qx, qx), Some(qx))
        }
    }

    /// One weight row against `R` activation rows. The integer part of each block is 8 i32
    /// lanes, lane j summing the products of bytes 4j..4j+3: `maddubs` + `madd` (AVX2) and
    /// `vpdpbusd` (VNNI) give the same lanes exactly (no product pair overflows the 16 bits
    /// `maddubs` keeps: at most 2 x 128 x 127), so both paths give bit-identical results.
    #[inline(always)]
    fn dot_tile<const R: usize, F: Format, const VNNI: bool>(
        w: &[u8],
        acts: &[ActBlock],
        nb: usize,
        out: &mut [f32],
    ) {
        let bb = F::FORMAT.block_bytes();
        // SAFETY: compiled only when AVX2, FMA and F16C are enabled for the whole build
        // (`target_feature`), so the intrinsics exist; the VNNI instruction is used only with
        // `VNNI = true`, which only `dot_rows_vnni` (AVX-512 VNNI checked at run time) passes. Block `b < nb` of `w` spans
        // `b*bb..(b+1)*bb`, inside `w` (its length is `nb * bb`, checked by the caller), and
        // `F::weights` reads only inside its block; activation loads read the 32-byte `qs` of
        // `acts[r * nb + b]`, which exists since `acts.len() == R * nb`.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); R];
            let mut summs = [0f32; R];
            let ones = _mm256_set1_epi16(1);
            let wp = w.as_ptr();
            for b in 0..nb {
                let blk = wp.add(b * bb);
                // d (and m for Q4_1) as f16 -> f32 in one conversion.
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
                let wd = _mm_cvtss_f32(dm);
                let (wx, sign_src) = F::weights(blk);
                for r in 0..R {
                    let ab = acts.get_unchecked(r * nb + b);
                    let qy = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                    let qy = match sign_src {
                        Some(qx) => _mm256_sign_epi8(qy, qx),
                        None => qy,
                    };
                    let sums = if VNNI {
                        _mm256_dpbusd_epi32(_mm256_setzero_si256(), wx, qy)
                    } else {
                        _mm256_madd_epi16(_mm256_maddubs_epi16(wx, qy), ones)
                    };
                    acc[r] = _mm256_fmadd_ps(
                        _mm256_set1_ps(wd * ab.d),
                        _mm256_cvtepi32_ps(sums),
                        acc[r],
                    );
                    if F::FORMAT == BlockFormat::Q4_1 {
                        let wm = _mm_cvtss_f32(_mm_movehdup_ps(dm));
                        summs[r] += wm * ab.s;
                    }
                }
            }
            for r in 0..R {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]);
                out[r] = hsum8(&lanes) + summs[r];
            }
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
            // Q8_0 quants stay in -127..=127 like ggml's quantizer produces.
            data.extend((0..n).map(|_| {
                if format == BlockFormat::Q8_0 {
                    rng.random_range(-127i8..=127) as u8
                } else {
                    rng.random::<u8>()
                }
            }));
        }
        BlockMatrix::from_gguf_bytes(format, rows, cols, &data).unwrap()
    }

    const FORMATS: [BlockFormat; 3] = [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0];

    #[test]
    fn kernel_equals_the_scalar_definition_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for format in FORMATS {
            let (n, k, m) = (13, 160, 7);
            let w = random_matrix(format, n, k, &mut rng);
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0)).collect();
            let y = w.matmul(&x, m);
            for r in 0..m {
                let acts: Vec<ActBlock> =
                    quantize_row(&x[r * k..(r + 1) * k], format == BlockFormat::Q4_1).collect();
                for c in 0..n {
                    let want = dot_scalar(format, w.row(c), &acts);
                    assert_eq!(
                        y[r * n + c].to_bits(),
                        want.to_bits(),
                        "{format:?} row {r} col {c}"
                    );
                }
            }
        }
    }

    /// The VNNI paths (256-bit, and two weight rows per 512-bit register) against the AVX2
    /// path, bit for bit, on every format and tile height,
    /// with extreme quants (Q8_0's -128 included, which ggml never writes but a file may hold).
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    #[test]
    fn vnni_and_avx2_kernels_agree_bit_for_bit() {
        if !crate::cpu::kernels::has_vnni() {
            eprintln!("no AVX-512 VNNI on this processor: only the AVX2 path is checked (above)");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(77);
        for format in FORMATS {
            let (n, k) = (9, 256);
            let nb = k / QK;
            let mut w = random_matrix(format, n, k, &mut rng);
            if format == BlockFormat::Q8_0 {
                // Put -128 and 127 into some quants.
                for (i, b) in w.data.iter_mut().enumerate() {
                    if i % 34 >= 2 && i % 7 == 0 {
                        *b = if i % 2 == 0 { 0x80 } else { 0x7F };
                    }
                }
            }
            for rows in 1..=PAIR_ROW_TILE {
                let x: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-4.0..4.0)).collect();
                let acts: Vec<ActBlock> = x
                    .chunks(k)
                    .flat_map(|r| quantize_row(r, format == BlockFormat::Q4_1))
                    .collect();
                // The AVX2 kernel, `ROW_TILE` rows at a time.
                let plain = |c: usize| -> Vec<f32> {
                    let mut out = vec![0f32; rows];
                    for (i, o) in out.chunks_mut(ROW_TILE).enumerate() {
                        let a = &acts[i * ROW_TILE * nb..(i * ROW_TILE + o.len()) * nb];
                        avx2::dot_rows_with::<false>(format, w.row(c), a, nb, o);
                    }
                    out
                };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                for c in 0..n {
                    if rows <= ROW_TILE {
                        let mut vnni = vec![0f32; rows];
                        // SAFETY: has_vnni() checked above.
                        unsafe { avx2::dot_rows_vnni(format, w.row(c), &acts, nb, &mut vnni) };
                        assert_eq!(
                            bits(&plain(c)),
                            bits(&vnni),
                            "{format:?} rows {rows} col {c}"
                        );
                    }
                    // Two rows per 512-bit register: this column with the next (wrapping).
                    let other = (c + 1) % n;
                    let mut pair = [[f32::NAN; PAIR_ROW_TILE]; 2];
                    // SAFETY: has_vnni() (AVX-512 VNNI, F, BW, VL) checked above.
                    unsafe {
                        avx2::dot_pair_vnni512(
                            format,
                            w.row(c),
                            w.row(other),
                            &acts,
                            nb,
                            rows,
                            &mut pair,
                        )
                    };
                    assert_eq!(
                        bits(&plain(c)),
                        bits(&pair[0][..rows]),
                        "{format:?} pair, rows {rows} col {c}"
                    );
                    assert_eq!(
                        bits(&plain(other)),
                        bits(&pair[1][..rows]),
                        "{format:?} pair, rows {rows} col {other}"
                    );
                }
            }
        }
    }

    #[test]
    fn matmul_is_close_to_the_dequantized_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for format in FORMATS {
            let (n, k, m) = (37, 96, 5);
            let w = random_matrix(format, n, k, &mut rng);
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let y = w.matmul(&x, m);
            let mut row = vec![0f32; k];
            for c in 0..n {
                w.dequantize_row(c, &mut row);
                for r in 0..m {
                    let xr = &x[r * k..(r + 1) * k];
                    let exact: f32 = row.iter().zip(xr).map(|(a, b)| a * b).sum();
                    let scale: f32 = row.iter().zip(xr).map(|(a, b)| (a * b).abs()).sum();
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
        for format in FORMATS {
            let w = random_matrix(format, 300, 64, &mut rng);
            let x: Vec<f32> = (0..7 * 64).map(|_| rng.random_range(-1.0..1.0)).collect();
            let batch = w.matmul(&x, 7);
            for r in 0..7 {
                let alone = w.matmul(&x[r * 64..(r + 1) * 64], 1);
                assert_eq!(alone, batch[r * 300..(r + 1) * 300].to_vec());
            }
        }
    }
}
