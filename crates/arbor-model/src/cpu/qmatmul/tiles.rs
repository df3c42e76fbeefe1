//! The tiled definition's kernels: 16 output columns by up to 8 activation rows at once, over
//! weights repacked in tiles of 16 columns (layout in the module docs of [`super`]).
//!
//! Per block and activation row the integer sum of all 16 columns is exact on every path, and
//! the float work is one product of scales, one conversion and one or two fused multiply-adds
//! per column, in the order of [`super::dot_tiled_definition`]:
//! - AVX-512 VNNI: 8 `vpdpbusd` (4 elements of 16 columns each) on the unsigned stored quants
//!   and the signed activations, starting from `-bias·Σx`;
//! - AVX2: the same sums from `maddubs` + `madd` on two halves of 8 columns (Q8_0 with the
//!   signs moved onto the activations, as `maddubs` would overflow on `q + 128`). Each format's
//!   kernel prepares a tile block's weights once for all the tile's rows (split nibbles, signs,
//!   rebuilt 5- and 6-bit values) and adds `maddubs` products as i16 where they cannot
//!   overflow (the 4-bit formats: eight products of at most 2·15·127), widening once; a single
//!   Q8_0 row streams instead.
//!
//! Q6K and Q5K have AVX2 kernels only (the sub-block scales applied in the `madd` that widens
//! the sums); AVX-512 processors run them too, with the same bits.

use super::{ActBlock, BlockFormat};
use crate::cpu::columns::{TILE_COLS, TILE_ROWS};

/// `out[i][j]` = activation row `i` (of `rows`) against column `j` of the tile.
#[inline]
#[cfg_attr(
    not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )),
    allow(unused_variables)
)]
pub(super) fn dot_tile(
    format: BlockFormat,
    tile: &[u8],
    acts: &[ActBlock],
    nb: usize,
    rows: usize,
    out: &mut [[f32; TILE_COLS]; TILE_ROWS],
    vnni: bool,
) {
    assert!((1..=TILE_ROWS).contains(&rows) && acts.len() == rows * nb);
    assert_eq!(tile.len(), nb * format.tile_block_bytes());
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        if vnni && !matches!(format, BlockFormat::Q6K | BlockFormat::Q5K) {
            debug_assert!(crate::cpu::kernels::has_vnni());
            // SAFETY: `vnni` comes from `kernels::vnni()`, true only where the processor has
            // AVX-512 F, BW, VL and VNNI; the shapes are asserted above.
            unsafe { avx512::dot_tile(format, tile, acts, nb, rows, out) }
        } else {
            avx2::dot_tile(format, tile, acts, nb, rows, out)
        }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    scalar(format, tile, acts, nb, rows, out)
}

/// The signed weight of element `e` of column `j` in a tile block.
#[cfg_attr(
    all(
        not(test),
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
fn tile_weight(format: BlockFormat, blk: &[u8], j: usize, e: usize) -> i32 {
    let qa = format.tile_quants_offset();
    match format {
        BlockFormat::Q8_0 => (blk[qa + e / 4 * 64 + 4 * j + e % 4] ^ 0x80) as i8 as i32,
        BlockFormat::Q6K => {
            let (half, k) = (e / 16, e % 4);
            let byte = blk[qa + (e % 16) / 4 * 64 + 4 * j + k];
            let nibble = if e < 16 { byte & 0x0F } else { byte >> 4 };
            let high = (blk[qa + 256 + half * 64 + 4 * j + k] >> (2 * ((e % 16) / 4))) & 3;
            let q = i32::from(nibble | (high << 4));
            let scale = blk[(2 + half) * TILE_COLS + j] as i8;
            i32::from(scale) * (q - format.tile_bias())
        }
        BlockFormat::Q5K => {
            let k = e % 4;
            let byte = blk[qa + (e % 16) / 4 * 64 + 4 * j + k];
            let nibble = if e < 16 { byte & 0x0F } else { byte >> 4 };
            let high = (blk[qa + 256 + 4 * j + k] >> ((e % 16) / 4 + 4 * (e / 16))) & 1;
            i32::from(blk[4 * TILE_COLS + j]) * i32::from(nibble | (high << 4))
        }
        _ => {
            let byte = blk[qa + (e % 16) / 4 * 64 + 4 * j + e % 4];
            let q = if e < 16 { byte & 0x0F } else { byte >> 4 } as i32;
            q - format.tile_bias()
        }
    }
}

/// The portable path, element by element in the definition's order (built for processors
/// without AVX2, and in tests, which compare it with the definition).
#[cfg_attr(
    all(
        not(test),
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
pub(super) fn scalar(
    format: BlockFormat,
    tile: &[u8],
    acts: &[ActBlock],
    nb: usize,
    rows: usize,
    out: &mut [[f32; TILE_COLS]; TILE_ROWS],
) {
    let tbb = format.tile_block_bytes();
    for (r, out_row) in out.iter_mut().enumerate().take(rows) {
        for (j, o) in out_row.iter_mut().enumerate() {
            let mut acc = 0f32;
            for (b, blk) in tile.chunks_exact(tbb).enumerate() {
                let ab = &acts[r * nb + b];
                let isum: i32 = (0..super::QK)
                    .map(|e| tile_weight(format, blk, j, e) * ab.qs[e] as i32)
                    .sum();
                let d = super::f16_at(blk, 2 * j);
                acc = (d * ab.d).mul_add(isum as f32, acc);
                let min = super::f16_at(blk, 2 * TILE_COLS + 2 * j);
                match format {
                    BlockFormat::Q4_1 => acc = min.mul_add(ab.s, acc),
                    BlockFormat::Q5K => {
                        let m = f32::from(blk[5 * TILE_COLS + j]);
                        acc = (-(min * m)).mul_add(ab.s, acc);
                    }
                    _ => {}
                }
            }
            *o = acc;
        }
    }
}

/// The format behind a const generic (const generics cannot be enums on stable Rust).
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
const fn format_of(f: u8) -> BlockFormat {
    match f {
        0 => BlockFormat::Q4_0,
        1 => BlockFormat::Q4_1,
        _ => BlockFormat::Q8_0,
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
pub(super) mod avx512 {
    use super::{format_of, ActBlock, BlockFormat, TILE_COLS, TILE_ROWS};
    use std::arch::x86_64::*;

    /// # Safety
    /// The processor supports AVX-512 F, BW, VL and VNNI; `1 <= rows <= TILE_ROWS`,
    /// `acts.len() == rows * nb` and `tile.len() == nb * format.tile_block_bytes()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(crate) unsafe fn dot_tile(
        format: BlockFormat,
        tile: &[u8],
        acts: &[ActBlock],
        nb: usize,
        rows: usize,
        out: &mut [[f32; TILE_COLS]; TILE_ROWS],
    ) {
        // Const row counts and formats keep every accumulator in a register.
        macro_rules! by_rows {
            ($f:literal) => {
                match rows {
                    1 => rows_tile::<1, $f>(tile, acts, nb, out),
                    2 => rows_tile::<2, $f>(tile, acts, nb, out),
                    3 => rows_tile::<3, $f>(tile, acts, nb, out),
                    4 => rows_tile::<4, $f>(tile, acts, nb, out),
                    5 => rows_tile::<5, $f>(tile, acts, nb, out),
                    6 => rows_tile::<6, $f>(tile, acts, nb, out),
                    7 => rows_tile::<7, $f>(tile, acts, nb, out),
                    _ => rows_tile::<8, $f>(tile, acts, nb, out),
                }
            };
        }
        match format {
            BlockFormat::Q4_0 => by_rows!(0),
            BlockFormat::Q4_1 => by_rows!(1),
            BlockFormat::Q8_0 => by_rows!(2),
            // No VNNI kernels for these (`tiles::dot_tile` never sends them here): AVX2's.
            BlockFormat::Q6K | BlockFormat::Q5K => {
                super::avx2::dot_tile(format, tile, acts, nb, rows, out)
            }
        }
    }

    /// # Safety
    /// As [`dot_tile`], with `rows == R` and `format == format_of(F)`.
    #[inline(always)]
    unsafe fn rows_tile<const R: usize, const F: u8>(
        tile: &[u8],
        acts: &[ActBlock],
        nb: usize,
        out: &mut [[f32; TILE_COLS]; TILE_ROWS],
    ) {
        let format = format_of(F);
        let tbb = format.tile_block_bytes();
        let bias = format.tile_bias();
        let low = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let blk = tile.as_ptr().add(b * tbb);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
            let m = if format == BlockFormat::Q4_1 {
                _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(2 * TILE_COLS) as *const __m256i))
            } else {
                _mm512_setzero_ps()
            };
            let q = blk.add(format.tile_quants_offset());
            // Group g: elements 4g..4g+3 of each of the 16 columns.
            let mut w = [_mm512_setzero_si512(); 8];
            if format == BlockFormat::Q8_0 {
                for (g, wg) in w.iter_mut().enumerate() {
                    *wg = _mm512_loadu_si512(q.add(64 * g) as *const _);
                }
            } else {
                for g in 0..4 {
                    let packed = _mm512_loadu_si512(q.add(64 * g) as *const _);
                    w[g] = _mm512_and_si512(packed, low);
                    w[g + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low);
                }
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let ab = acts.get_unchecked(r * nb + b);
                let qs = ab.qs.as_ptr() as *const i32;
                let mut isum = _mm512_set1_epi32(-bias * ab.sum());
                for (g, wg) in w.iter().enumerate() {
                    let x = _mm512_set1_epi32(qs.add(g).read_unaligned());
                    isum = _mm512_dpbusd_epi32(isum, *wg, x);
                }
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(ab.d));
                *acc_r = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(isum), *acc_r);
                if format == BlockFormat::Q4_1 {
                    *acc_r = _mm512_fmadd_ps(m, _mm512_set1_ps(ab.s), *acc_r);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            _mm512_storeu_ps(o.as_mut_ptr(), a);
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
pub(super) mod avx2 {
    use super::{format_of, ActBlock, BlockFormat, TILE_COLS, TILE_ROWS};
    use std::arch::x86_64::*;

    /// `$kernel::<R, ...>($args)` with `R` the constant equal to `$rows` (1 to 8): a constant
    /// row count keeps every accumulator in a register.
    macro_rules! with_const_rows {
        ($rows:expr, $kernel:ident $(, $f:literal)?; $($arg:expr),*) => {
            match $rows {
                1 => $kernel::<1 $(, $f)?>($($arg),*),
                2 => $kernel::<2 $(, $f)?>($($arg),*),
                3 => $kernel::<3 $(, $f)?>($($arg),*),
                4 => $kernel::<4 $(, $f)?>($($arg),*),
                5 => $kernel::<5 $(, $f)?>($($arg),*),
                6 => $kernel::<6 $(, $f)?>($($arg),*),
                7 => $kernel::<7 $(, $f)?>($($arg),*),
                _ => $kernel::<8 $(, $f)?>($($arg),*),
            }
        };
    }

    pub(crate) fn dot_tile(
        format: BlockFormat,
        tile: &[u8],
        acts: &[ActBlock],
        nb: usize,
        rows: usize,
        out: &mut [[f32; TILE_COLS]; TILE_ROWS],
    ) {
        assert!((1..=TILE_ROWS).contains(&rows) && acts.len() == rows * nb);
        assert_eq!(tile.len(), nb * format.tile_block_bytes());
        let out = &mut out[..rows];
        match format {
            BlockFormat::Q6K => dot_tile_q6k(tile, acts, nb, out),
            BlockFormat::Q5K => dot_tile_q5k(tile, acts, nb, out),
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => dot_tile_q4(format, tile, acts, nb, out),
            // One row streams its weights (`q8_one_row`): faster there than preparing them (measured).
            BlockFormat::Q8_0 if rows == 1 => q8_one_row(tile, acts, nb, &mut out[0]),
            BlockFormat::Q8_0 => dot_tile_q8(tile, acts, nb, out),
        }
    }

    /// Q8_0 over several rows of the tile at once: its weights' signs and magnitudes are
    /// prepared once per block for all rows (passes of two rows, before, prepared them per
    /// pass: this measured 1.2-1.45x faster at 64 rows).
    #[inline(never)]
    fn dot_tile_q8(tile: &[u8], acts: &[ActBlock], nb: usize, out: &mut [[f32; TILE_COLS]]) {
        with_const_rows!(out.len(), rows_tile_q8; tile, acts, nb, out)
    }

    /// Q8_0's tile kernel: per half of 8 columns, the signed quants (stored `q + 128`) and their
    /// magnitudes once per block; per row the activations take the weights' signs (`maddubs`
    /// multiplies unsigned by signed, and `q + 128` would overflow its i16 pairs), and the
    /// exact i32 block sum gets one fused multiply-add.
    #[inline(always)]
    fn rows_tile_q8<const R: usize>(
        tile: &[u8],
        acts: &[ActBlock],
        nb: usize,
        out: &mut [[f32; TILE_COLS]],
    ) {
        let format = BlockFormat::Q8_0;
        let tbb = format.tile_block_bytes();
        debug_assert!(acts.len() == R * nb && out.len() == R && tile.len() == nb * tbb);
        // SAFETY: compiled only when AVX2, FMA and F16C are enabled for the whole build
        // (`target_feature`), so the intrinsics exist. Tile block `b < nb` spans
        // `b*tbb..(b+1)*tbb` of `tile` (asserted by the caller); the loads below read its
        // scales (16 bytes at 16h) and quant groups (32 bytes at 32 + 64g + 32h, g < 8, so up to
        // 544 = tbb), all inside it; activation loads read `acts[r * nb + b]` with `r < R`,
        // inside `acts`.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let flip = _mm256_set1_epi8(-128);
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for b in 0..nb {
                let blk = tile.as_ptr().add(b * tbb);
                let q = blk.add(format.tile_quants_offset());
                for h in 0..2 {
                    let mut signed = [_mm256_setzero_si256(); 8];
                    let mut magnitude = [_mm256_setzero_si256(); 8];
                    for (g, (s, m)) in signed.iter_mut().zip(magnitude.iter_mut()).enumerate() {
                        let stored = _mm256_loadu_si256(q.add(64 * g + 32 * h) as *const __m256i);
                        *s = _mm256_xor_si256(stored, flip);
                        *m = _mm256_sign_epi8(*s, *s);
                    }
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h) as *const __m128i));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let ab = acts.get_unchecked(r * nb + b);
                        let qs = ab.qs.as_ptr() as *const i32;
                        let mut isum = _mm256_setzero_si256();
                        for (g, (s, m)) in signed.iter().zip(&magnitude).enumerate() {
                            let x = _mm256_set1_epi32(qs.add(g).read_unaligned());
                            let p = _mm256_maddubs_epi16(*m, _mm256_sign_epi8(x, *s));
                            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, ones));
                        }
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(ab.d));
                        a[h] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), a[h]);
                    }
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(o.as_mut_ptr().add(8), a[1]);
            }
        }
    }

    /// Q4_0 and Q4_1 over every row of the tile at once.
    #[inline(never)]
    fn dot_tile_q4(
        format: BlockFormat,
        tile: &[u8],
        acts: &[ActBlock],
        nb: usize,
        out: &mut [[f32; TILE_COLS]],
    ) {
        if format == BlockFormat::Q4_1 {
            with_const_rows!(out.len(), rows_tile_q4, 1; tile, acts, nb, out)
        } else {
            with_const_rows!(out.len(), rows_tile_q4, 0; tile, acts, nb, out)
        }
    }

    /// The 4-bit formats' tile kernel: per half of 8 columns, the nibbles of the block are
    /// split once for all rows; per row the eight `maddubs` products (each at most 2·15·127 in
    /// magnitude) are added as i16, exactly, and widened once, from `-bias·Σx`.
    #[inline(always)]
    fn rows_tile_q4<const R: usize, const F: u8>(
        tile: &[u8],
        acts: &[ActBlock],
        nb: usize,
        out: &mut [[f32; TILE_COLS]],
    ) {
        let format = format_of(F);
        let tbb = format.tile_block_bytes();
        debug_assert!(acts.len() == R * nb && out.len() == R && tile.len() == nb * tbb);
        // SAFETY: compiled only when AVX2, FMA and F16C are enabled for the whole build
        // (`target_feature`), so the intrinsics exist. Tile block `b < nb` spans
        // `b*tbb..(b+1)*tbb` of `tile` (asserted by the caller); the loads below read its
        // scales (16 bytes at 16h), Q4_1's minimums (16 at 32 + 16h) and its nibble groups
        // (32 bytes at the quants' offset + 64g + 32h, g < 4), all inside it; activation
        // loads read `acts[r * nb + b]` with `r < R`, inside `acts`.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let bias = format.tile_bias();
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for b in 0..nb {
                let blk = tile.as_ptr().add(b * tbb);
                let q = blk.add(format.tile_quants_offset());
                for h in 0..2 {
                    // w[g]: elements 4g..4g+3 (low nibbles); w[4 + g]: 16+4g.. (high).
                    let mut w = [_mm256_setzero_si256(); 8];
                    for g in 0..4 {
                        let packed = _mm256_loadu_si256(q.add(64 * g + 32 * h) as *const __m256i);
                        w[g] = _mm256_and_si256(packed, low);
                        w[g + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
                    }
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h) as *const __m128i));
                    let m = if format == BlockFormat::Q4_1 {
                        _mm256_cvtph_ps(_mm_loadu_si128(
                            blk.add(2 * TILE_COLS + 16 * h) as *const __m128i
                        ))
                    } else {
                        _mm256_setzero_ps()
                    };
                    for (r, a) in acc.iter_mut().enumerate() {
                        let ab = acts.get_unchecked(r * nb + b);
                        let qs = ab.qs.as_ptr() as *const i32;
                        let mut pairs = _mm256_setzero_si256();
                        for (g, wg) in w.iter().enumerate() {
                            let x = _mm256_set1_epi32(qs.add(g).read_unaligned());
                            pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(*wg, x));
                        }
                        let isum = _mm256_add_epi32(
                            _mm256_set1_epi32(-bias * ab.sum()),
                            _mm256_madd_epi16(pairs, ones),
                        );
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(ab.d));
                        a[h] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), a[h]);
                        if format == BlockFormat::Q4_1 {
                            a[h] = _mm256_fmadd_ps(m, _mm256_set1_ps(ab.s), a[h]);
                        }
                    }
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(o.as_mut_ptr().add(8), a[1]);
            }
        }
    }

    /// Q5K over every row of the tile at once, as [`dot_tile_q6k`].
    #[inline(never)]
    fn dot_tile_q5k(tile: &[u8], acts: &[ActBlock], nb: usize, out: &mut [[f32; TILE_COLS]]) {
        with_const_rows!(out.len(), rows_tile_q5k; tile, acts, nb, out)
    }

    /// Q5K's tile kernel: per half of 8 columns, each nibble group joined with its high bit
    /// into the unsigned 5-bit quants (0..31); the four groups of one half of the block are
    /// added as i16 (at most 4·7,874 in magnitude) and multiplied by the block's scale in the
    /// `madd` that widens them, then the float terms of the definition: `d·d_x·isum`, then
    /// `−dmin·m·s`.
    #[inline(always)]
    fn rows_tile_q5k<const R: usize>(
        tile: &[u8],
        acts: &[ActBlock],
        nb: usize,
        out: &mut [[f32; TILE_COLS]],
    ) {
        let format = BlockFormat::Q5K;
        let tbb = format.tile_block_bytes();
        debug_assert!(acts.len() == R * nb && out.len() == R && tile.len() == nb * tbb);
        // SAFETY: compiled only when AVX2, FMA and F16C are enabled for the whole build
        // (`target_feature`), so the intrinsics exist. Tile block `b < nb` spans
        // `b*tbb..(b+1)*tbb` of `tile` (asserted by the caller); the loads below read its
        // scales and dmins (16 bytes at 16h and 32 + 16h), block scales and mins (8 bytes at
        // 64 + 8h and 80 + 8h), nibble groups (64 bytes each at 96..352) and high bits (64 at
        // 352..416 = tbb), all inside it; activation loads read `acts[r * nb + b]` with
        // `r < R`, inside `acts`.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let bit4 = _mm256_set1_epi8(0x10);
            let sign = _mm256_set1_ps(-0.0);
            // Plane p's high bit (bit p of each byte) moved to bit 4.
            let high = |qh: __m256i, p: usize| {
                let at4 = match p {
                    0 => _mm256_slli_epi16::<4>(qh),
                    1 => _mm256_slli_epi16::<3>(qh),
                    2 => _mm256_slli_epi16::<2>(qh),
                    3 => _mm256_slli_epi16::<1>(qh),
                    4 => qh,
                    5 => _mm256_srli_epi16::<1>(qh),
                    6 => _mm256_srli_epi16::<2>(qh),
                    _ => _mm256_srli_epi16::<3>(qh),
                };
                _mm256_and_si256(at4, bit4)
            };
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for b in 0..nb {
                let blk = tile.as_ptr().add(b * tbb);
                let q = blk.add(format.tile_quants_offset());
                for h in 0..2 {
                    let qh = _mm256_loadu_si256(q.add(256 + 32 * h) as *const __m256i);
                    // The 8 columns' block scales as the i16 pair (sc, sc) of each lane.
                    let sc = _mm_loadl_epi64(blk.add(4 * TILE_COLS + 8 * h) as *const __m128i);
                    let sc = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(sc, sc));
                    let m = _mm_loadl_epi64(blk.add(5 * TILE_COLS + 8 * h) as *const __m128i);
                    let dmin = _mm_loadu_si128(blk.add(2 * TILE_COLS + 16 * h) as *const __m128i);
                    let min = _mm256_xor_ps(
                        _mm256_mul_ps(
                            _mm256_cvtph_ps(dmin),
                            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m)),
                        ),
                        sign,
                    );
                    // The 5-bit quants of the block's halves, unpacked once for every row:
                    // w[0][g] elements 4g..4g+3, w[1][g] elements 16+4g...
                    let mut w = [[_mm256_setzero_si256(); 4]; 2];
                    let [w0, w1] = &mut w;
                    for (g, (lower, upper)) in w0.iter_mut().zip(w1.iter_mut()).enumerate() {
                        let packed = _mm256_loadu_si256(q.add(64 * g + 32 * h) as *const __m256i);
                        *lower = _mm256_or_si256(_mm256_and_si256(packed, low), high(qh, g));
                        let nibbles = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
                        *upper = _mm256_or_si256(nibbles, high(qh, g + 4));
                    }
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h) as *const __m128i));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let ab = acts.get_unchecked(r * nb + b);
                        let qs = ab.qs.as_ptr() as *const i32;
                        let x = |e4: usize| _mm256_set1_epi32(qs.add(e4).read_unaligned());
                        let half = |ws: &[__m256i; 4], at: usize| {
                            _mm256_add_epi16(
                                _mm256_add_epi16(
                                    _mm256_maddubs_epi16(ws[0], x(at)),
                                    _mm256_maddubs_epi16(ws[1], x(at + 1)),
                                ),
                                _mm256_add_epi16(
                                    _mm256_maddubs_epi16(ws[2], x(at + 2)),
                                    _mm256_maddubs_epi16(ws[3], x(at + 3)),
                                ),
                            )
                        };
                        let isum = _mm256_add_epi32(
                            _mm256_madd_epi16(half(&w[0], 0), sc),
                            _mm256_madd_epi16(half(&w[1], 4), sc),
                        );
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(ab.d));
                        a[h] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), a[h]);
                        a[h] = _mm256_fmadd_ps(min, _mm256_set1_ps(ab.s), a[h]);
                    }
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(o.as_mut_ptr().add(8), a[1]);
            }
        }
    }

    /// Q6K over every row of the tile at once (its weights take more work to unpack than the
    /// other formats', so they are unpacked once per block for all rows), kept out of line so
    /// that the other formats' kernels are compiled as they were without it.
    #[inline(never)]
    fn dot_tile_q6k(tile: &[u8], acts: &[ActBlock], nb: usize, out: &mut [[f32; TILE_COLS]]) {
        with_const_rows!(out.len(), rows_tile_q6k; tile, acts, nb, out)
    }

    /// Q6K's tile kernel: per half of 8 columns, each nibble group joined with its two high
    /// bits into the unsigned 6-bit quants (0..63, so `maddubs` cannot saturate). Two groups
    /// of one sub-block are added as i16 (at most 2·16,002 in magnitude) and multiplied by the
    /// sub-block's scale in the same `madd` that widens them to i32, so both sub-blocks build
    /// one exact sum, which starts from `-32·(sc0·Σx₀ + sc1·Σx₁)` over the activations' halves.
    #[inline(always)]
    fn rows_tile_q6k<const R: usize>(
        tile: &[u8],
        acts: &[ActBlock],
        nb: usize,
        out: &mut [[f32; TILE_COLS]],
    ) {
        let format = BlockFormat::Q6K;
        let tbb = format.tile_block_bytes();
        debug_assert!(acts.len() == R * nb && out.len() == R && tile.len() == nb * tbb);
        debug_assert_eq!(format.tile_bias(), 32);
        // SAFETY: compiled only when AVX2, FMA and F16C are enabled for the whole build
        // (`target_feature`), so the intrinsics exist. Tile block `b < nb` spans
        // `b*tbb..(b+1)*tbb` of `tile` (asserted by the caller); the loads below read its
        // scales (32 bytes at 0), sub-block scales (8 bytes at 32 + 8h and 48 + 8h), nibble
        // groups (64 bytes each at 64..320) and high-bit groups (64 each at 320..448 = tbb),
        // all inside it; activation loads read `acts[r * nb + b]` with `r < R`, inside `acts`.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let bits45 = _mm256_set1_epi8(0x30);
            // Plane g's two high bits (at bit 2g of each byte) moved to bits 4-5.
            let high = |qh: __m256i, g: usize| {
                let at45 = match g {
                    0 => _mm256_slli_epi16::<4>(qh),
                    1 => _mm256_slli_epi16::<2>(qh),
                    2 => qh,
                    _ => _mm256_srli_epi16::<2>(qh),
                };
                _mm256_and_si256(at45, bits45)
            };
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for b in 0..nb {
                let blk = tile.as_ptr().add(b * tbb);
                let q = blk.add(format.tile_quants_offset());
                for h in 0..2 {
                    let qh0 = _mm256_loadu_si256(q.add(256 + 32 * h) as *const __m256i);
                    let qh1 = _mm256_loadu_si256(q.add(320 + 32 * h) as *const __m256i);
                    // The 8 columns' sub-block scales as i16: (sc0, sc0), (sc1, sc1) and
                    // (sc0, sc1) in each column's 32-bit lane.
                    let sc0 = _mm_loadl_epi64(blk.add(2 * TILE_COLS + 8 * h) as *const __m128i);
                    let sc1 = _mm_loadl_epi64(blk.add(3 * TILE_COLS + 8 * h) as *const __m128i);
                    let sc00 = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(sc0, sc0));
                    let sc11 = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(sc1, sc1));
                    let sc01 = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(sc0, sc1));
                    let mut isum = [_mm256_setzero_si256(); R];
                    for (r, s) in isum.iter_mut().enumerate() {
                        let ab = acts.get_unchecked(r * nb + b);
                        // (Σx₀, Σx₁) as i16 (each at most 16·127): sc0·Σx₀ + sc1·Σx₁, times -32.
                        let scaled = _mm256_madd_epi16(sc01, _mm256_set1_epi32(ab.halves));
                        *s = _mm256_sub_epi32(
                            _mm256_setzero_si256(),
                            _mm256_slli_epi32::<5>(scaled),
                        );
                    }
                    // The 6-bit quants of both sub-blocks, unpacked once for every row:
                    // w[s][g] is sub-block s's group g (its elements 4g..4g+3).
                    let mut w = [[_mm256_setzero_si256(); 4]; 2];
                    let [w0, w1] = &mut w;
                    for (g, (lower, upper)) in w0.iter_mut().zip(w1.iter_mut()).enumerate() {
                        let packed = _mm256_loadu_si256(q.add(64 * g + 32 * h) as *const __m256i);
                        *lower = _mm256_or_si256(_mm256_and_si256(packed, low), high(qh0, g));
                        let nibbles = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
                        *upper = _mm256_or_si256(nibbles, high(qh1, g));
                    }
                    for (r, s) in isum.iter_mut().enumerate() {
                        let qs = acts.get_unchecked(r * nb + b).qs.as_ptr() as *const i32;
                        let x = |e4: usize| _mm256_set1_epi32(qs.add(e4).read_unaligned());
                        for pair in [0, 2] {
                            // Sub-block 0 takes activations 4g.., sub-block 1 16+4g...
                            let p0 = _mm256_add_epi16(
                                _mm256_maddubs_epi16(w[0][pair], x(pair)),
                                _mm256_maddubs_epi16(w[0][pair + 1], x(pair + 1)),
                            );
                            let p1 = _mm256_add_epi16(
                                _mm256_maddubs_epi16(w[1][pair], x(pair + 4)),
                                _mm256_maddubs_epi16(w[1][pair + 1], x(pair + 5)),
                            );
                            let both = _mm256_add_epi32(
                                _mm256_madd_epi16(p0, sc00),
                                _mm256_madd_epi16(p1, sc11),
                            );
                            *s = _mm256_add_epi32(*s, both);
                        }
                    }
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h) as *const __m128i));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let ab = acts.get_unchecked(r * nb + b);
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(ab.d));
                        a[h] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum[r]), a[h]);
                    }
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(o.as_mut_ptr().add(8), a[1]);
            }
        }
    }

    /// Q8_0 for one activation row, streaming: each group's signs and magnitudes are made
    /// and used at once, which one row does not gain from preparing ahead.
    fn q8_one_row(tile: &[u8], act: &[ActBlock], nb: usize, out: &mut [f32; TILE_COLS]) {
        let format = BlockFormat::Q8_0;
        let tbb = format.tile_block_bytes();
        debug_assert!(act.len() == nb && tile.len() == nb * tbb);
        // SAFETY: compiled only when AVX2, FMA and F16C are enabled for the whole build
        // (`target_feature`), so the intrinsics exist. Tile block `b < nb` spans
        // `b*tbb..(b+1)*tbb` of `tile` (asserted by the caller); the loads below read its
        // scales (16 bytes at 16h) and quant groups (32 bytes at 32 + 64g + 32h, g < 8), all
        // inside it; activation loads read `act[b]`, inside `act`.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let flip = _mm256_set1_epi8(-128);
            let mut acc = [_mm256_setzero_ps(); 2];
            for b in 0..nb {
                let blk = tile.as_ptr().add(b * tbb);
                let q = blk.add(format.tile_quants_offset());
                let ab = act.get_unchecked(b);
                let qs = ab.qs.as_ptr() as *const i32;
                for (h, a) in acc.iter_mut().enumerate() {
                    let mut isum = _mm256_setzero_si256();
                    for g in 0..8 {
                        let stored = _mm256_loadu_si256(q.add(64 * g + 32 * h) as *const __m256i);
                        let signed = _mm256_xor_si256(stored, flip);
                        let magnitude = _mm256_sign_epi8(signed, signed);
                        let x = _mm256_set1_epi32(qs.add(g).read_unaligned());
                        let p = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x, signed));
                        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, ones));
                    }
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h) as *const __m128i));
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(ab.d));
                    *a = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), *a);
                }
            }
            _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[1]);
        }
    }
}
