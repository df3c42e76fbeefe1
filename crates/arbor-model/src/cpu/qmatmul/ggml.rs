//! The ggml definition of the block matmul: llama.cpp's AVX2 `vec_dot_q4_1_q8_1` /
//! `vec_dot_q4_0_q8_0` / `vec_dot_q8_0_q8_0`, down to the order of the float accumulation, on
//! weight rows in the file's layout. Selected by `--cpu-kernels ggml` to check the rest of the
//! model against llama.cpp bit for bit; the tiled definition ([`super::tiles`]) is the fast one.

use super::{ActBlock, BlockFormat, WeightBlock};
use crate::cpu::columns::ROW_TILE;

/// ggml's `hsum_float_8` order: ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)).
#[inline]
fn hsum8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// One weight row (`nb` blocks) against `out.len()` (at most [`ROW_TILE`]) activation rows
/// (`acts`: `[rows, nb]`).
#[inline]
pub(super) fn dot_rows(
    format: BlockFormat,
    w: &[u8],
    acts: &[ActBlock],
    nb: usize,
    out: &mut [f32],
) {
    debug_assert!(out.len() <= ROW_TILE && acts.len() == out.len() * nb);
    debug_assert_eq!(w.len(), nb * format.block_bytes());
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        avx2::dot_rows(format, w, acts, nb, out)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    scalar_rows(format, w, acts, nb, out)
}

/// [`definition`] for each activation row.
fn scalar_rows(format: BlockFormat, w: &[u8], acts: &[ActBlock], nb: usize, out: &mut [f32]) {
    for (r, o) in out.iter_mut().enumerate() {
        *o = definition(format, w, &acts[r * nb..(r + 1) * nb]);
    }
}

/// The definition of one output element; the SIMD path must agree with it bit for bit. The
/// integer part of a block is 8 lanes, lane j summing elements 4j..4j+3 (what `maddubs` +
/// `madd` produce); each lane is converted to f32 and fused-multiply-added with the block's
/// scale product into a per-lane accumulator, reduced at the end in `hsum8` order; Q4_1's
/// `m * s` terms are summed apart and added last.
#[cfg_attr(
    all(
        not(test),
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
pub(super) fn definition(format: BlockFormat, w: &[u8], a: &[ActBlock]) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (bytes, ab) in w.chunks_exact(format.block_bytes()).zip(a) {
        let wb = WeightBlock { bytes };
        let dd = wb.d() * ab.d;
        for (lane, acc_lane) in acc.iter_mut().enumerate() {
            let isum: i32 = (4 * lane..4 * lane + 4)
                .map(|e| wb.weight(format, e) * ab.qs[e] as i32)
                .sum();
            *acc_lane = dd.mul_add(isum as f32, *acc_lane);
        }
        if format == BlockFormat::Q4_1 {
            summs += wb.min(format) * ab.s;
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
    use super::super::{ActBlock, BlockFormat};
    use super::hsum8;
    use std::arch::x86_64::*;

    #[inline]
    pub(super) fn dot_rows(
        format: BlockFormat,
        w: &[u8],
        acts: &[ActBlock],
        nb: usize,
        out: &mut [f32],
    ) {
        // A const row count keeps every accumulator in a register.
        match (format, out.len()) {
            (BlockFormat::Q4_1, 1) => dot_tile::<1, Q41>(w, acts, nb, out),
            (BlockFormat::Q4_1, 2) => dot_tile::<2, Q41>(w, acts, nb, out),
            (BlockFormat::Q4_1, 3) => dot_tile::<3, Q41>(w, acts, nb, out),
            (BlockFormat::Q4_1, _) => dot_tile::<4, Q41>(w, acts, nb, out),
            (BlockFormat::Q4_0, 1) => dot_tile::<1, Q40>(w, acts, nb, out),
            (BlockFormat::Q4_0, 2) => dot_tile::<2, Q40>(w, acts, nb, out),
            (BlockFormat::Q4_0, 3) => dot_tile::<3, Q40>(w, acts, nb, out),
            (BlockFormat::Q4_0, _) => dot_tile::<4, Q40>(w, acts, nb, out),
            (BlockFormat::Q8_0, 1) => dot_tile::<1, Q80>(w, acts, nb, out),
            (BlockFormat::Q8_0, 2) => dot_tile::<2, Q80>(w, acts, nb, out),
            (BlockFormat::Q8_0, 3) => dot_tile::<3, Q80>(w, acts, nb, out),
            (BlockFormat::Q8_0, _) => dot_tile::<4, Q80>(w, acts, nb, out),
            // No matrix of the row layout holds these (`BlockMatrix::with_layout` refuses them).
            (BlockFormat::Q6K | BlockFormat::Q5K, _) => {
                super::scalar_rows(format, w, acts, nb, out)
            }
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

    /// # Safety
    /// `p` points to 16 readable bytes; AVX2 is enabled.
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
    /// lanes, lane j summing the products of bytes 4j..4j+3 (`maddubs` + `madd`, exact: no
    /// product pair overflows the 16 bits `maddubs` keeps, at most 2 x 128 x 127).
    #[inline(always)]
    fn dot_tile<const R: usize, F: Format>(
        w: &[u8],
        acts: &[ActBlock],
        nb: usize,
        out: &mut [f32],
    ) {
        let bb = F::FORMAT.block_bytes();
        // SAFETY: compiled only when AVX2, FMA and F16C are enabled for the whole build
        // (`target_feature`), so the intrinsics exist. Block `b < nb` of `w` spans
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
                    let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(wx, qy), ones);
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
