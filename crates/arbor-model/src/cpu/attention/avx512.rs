//! The AVX-512 attention kernel: the arithmetic of the definition in [`super`] (and of the
//! AVX2 kernel, `blocked`), element for element, with more of it per instruction.
//!
//! Three places gain:
//! - **Scores of a prefill chunk** (through a transposed K tile): 16 keys per register instead
//!   of 8, and three query vectors scored per pass over the tile, so a tile row loaded once
//!   feeds three fused multiply-adds (32 registers hold the 24 accumulators).
//! - **Scores of a decode** (few vectors, keys read row by row): 8 keys of up to three vectors
//!   at once, each (vector, key) pair still one 8-lane accumulator as in [`super::dot8`]; the
//!   lanes are added after an 8x8 transpose, in lane order, eight scores per vector add.
//! - **The V sum**: the running sums of three vectors stay in registers across a tile, and each
//!   V row is widened from f16 in registers, once for the three.
//!
//! Why the same bits as the AVX2 path: every score is `dot8`'s lane-wise fused multiply-add
//! chain followed by the same in-order lane sum, every V sum is the same `fma(p, v, acc)` per
//! element in key order, and the softmax is the same function (inlined into this
//! `target_feature` context, where LLVM vectorises it wider; per element it is the same
//! operations). `tests::avx512_kernel_equals_the_definition` checks it.

use std::arch::x86_64::*;

use half::f16;

use super::avx2::transpose8;
use super::blocked::ItemLayout;
use super::{partials, HeadView, Partial, KEY_TILE, TRANSPOSE_MIN_VECTORS};

/// Head sizes this kernel takes: whole 16-float registers, at most 8 of them per vector (the V
/// sums of a block of vectors live in registers). Others use the AVX2 path.
pub(super) fn supports(head_dim: usize) -> bool {
    head_dim.is_multiple_of(16) && head_dim <= 128
}

/// Query vectors scored together (the GQA group of SmolLM2; any count works, in blocks).
const Q_BLOCK: usize = 3;

/// See [`super::attend_with`]; the same results, bit for bit.
///
/// # Safety
/// The processor has AVX-512 F and VL (and the baseline's AVX2, FMA, F16C); `supports(d)`.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn attend_with(
    qv: &[f32],
    limits: &[usize],
    keys: std::ops::Range<usize>,
    k: &HeadView,
    v: &HeadView,
    scale: f32,
    p: &mut Vec<f32>,
) -> Vec<Option<Partial>> {
    let d = k.head_dim;
    debug_assert!(supports(d));
    let n_vec = limits.len();
    let k0 = keys.start;
    let ItemLayout {
        n_keys,
        ends,
        starts,
    } = ItemLayout::new(qv, limits, &keys, (k, v), p);

    // Scores, scaled, into `p` (`[n_vec, n_keys]`, each vector up to its end).
    let mut write = |vi: usize, from: usize, to: usize, dots: &[f32]| {
        let end = to.min(ends[vi]);
        if end > from {
            for (sc, x) in p[vi * n_keys + from..vi * n_keys + end]
                .iter_mut()
                .zip(dots)
            {
                *sc = x * scale;
            }
        }
    };
    if n_vec >= TRANSPOSE_MIN_VECTORS {
        let mut tile_buf = vec![0f32; KEY_TILE * d];
        let mut row_buf = vec![0f32; d];
        for tile in (0..n_keys).step_by(KEY_TILE) {
            let tile_end = (tile + KEY_TILE).min(n_keys);
            k.widen_transposed(k0 + tile..k0 + tile_end, &mut row_buf, &mut tile_buf);
            for v0 in (0..n_vec).step_by(Q_BLOCK) {
                let nv = Q_BLOCK.min(n_vec - v0);
                if ends[v0..v0 + nv].iter().all(|&e| e <= tile) {
                    continue;
                }
                let q = qv.as_ptr().add(v0 * d);
                let n = tile_end - tile;
                match nv {
                    3 => tile_dots::<3>(q, d, &tile_buf, n)
                        .iter()
                        .enumerate()
                        .for_each(|(i, dots)| write(v0 + i, tile, tile_end, dots)),
                    2 => tile_dots::<2>(q, d, &tile_buf, n)
                        .iter()
                        .enumerate()
                        .for_each(|(i, dots)| write(v0 + i, tile, tile_end, dots)),
                    _ => write(v0, tile, tile_end, &tile_dots::<1>(q, d, &tile_buf, n)[0]),
                }
            }
        }
    } else {
        for k8 in (0..n_keys).step_by(8) {
            let k8_end = (k8 + 8).min(n_keys);
            // Missing keys of a last short group read the group's last key again; their scores
            // are not written.
            let rows: [*const f16; 8] =
                std::array::from_fn(|t| k.pool.as_ptr().add(starts[(k8 + t).min(k8_end - 1)]));
            // A decode reads each K row once, wherever its slot lies: ask for the rows two
            // groups ahead so that memory latency overlaps the arithmetic.
            for &start in starts.iter().skip(k8 + PREFETCH_KEYS).take(8) {
                prefetch_row(k.pool.as_ptr().add(start), d);
            }
            for v0 in (0..n_vec).step_by(Q_BLOCK) {
                let nv = Q_BLOCK.min(n_vec - v0);
                if ends[v0..v0 + nv].iter().all(|&e| e <= k8) {
                    continue;
                }
                let q = qv.as_ptr().add(v0 * d);
                match nv {
                    3 => row_dots::<3>(q, d, &rows)
                        .iter()
                        .enumerate()
                        .for_each(|(i, dots)| write(v0 + i, k8, k8_end, dots)),
                    2 => row_dots::<2>(q, d, &rows)
                        .iter()
                        .enumerate()
                        .for_each(|(i, dots)| write(v0 + i, k8, k8_end, dots)),
                    _ => write(v0, k8, k8_end, &row_dots::<1>(q, d, &rows)[0]),
                }
            }
        }
    }

    let stats = softmax_rows(p, n_keys, &ends);

    let mut out = vec![0f32; n_vec * d];
    for tile in (0..n_keys).step_by(KEY_TILE) {
        let tile_end = (tile + KEY_TILE).min(n_keys);
        for v0 in (0..n_vec).step_by(Q_BLOCK) {
            let nv = Q_BLOCK.min(n_vec - v0);
            let group_end = |i: usize| tile_end.min(ends[v0 + i]);
            // Keys every vector of the block sees go through the blocked loop; the causal
            // remainder of each (a few keys on the diagonal) one vector at a time.
            let common = (0..nv).map(group_end).min().unwrap_or(tile);
            let mut block = PvBlock {
                out: &mut out,
                p: p.as_slice(),
                n_keys,
                d,
                pool: v.pool.as_ptr(),
                starts: &starts,
            };
            if common > tile {
                match nv {
                    3 => block.run::<3>(v0, tile..common),
                    2 => block.run::<2>(v0, tile..common),
                    _ => block.run::<1>(v0, tile..common),
                }
            }
            for i in 0..nv {
                let from = common.max(tile);
                if group_end(i) > from {
                    block.run::<1>(v0 + i, from..group_end(i));
                }
            }
        }
    }
    partials(&ends, stats, &out, d)
}

/// [`super::softmax_f16`] of every vector's row of scores (`p`: `[n_vec, n_keys]`, row `i` up
/// to `ends[i]`) with 16 scores per instruction, the same bits: the max is a max (order-free),
/// each `exp` is [`crate::cpu::fastmath::exp`]'s operations on 16 lanes, the f64 sum keeps the
/// four lanes of the scalar loop (score `i` into lane `i % 4`, in order), and the f16 rounding
/// is the F16C conversion (round to nearest even), there and back.
///
/// Rows go four at a time through the exponentials: each row's f64 sum is a chain of dependent
/// additions (its definition fixes their order), so four rows in step keep four chains in
/// flight instead of one.
#[inline(always)]
unsafe fn softmax_rows(p: &mut [f32], n_keys: usize, ends: &[usize]) -> Vec<(f32, f64)> {
    const ROWS: usize = 4;
    assert!(ends
        .iter()
        .enumerate()
        .all(|(i, &e)| i * n_keys + e <= p.len()));
    let base = p.as_mut_ptr();
    let mut stats = Vec::with_capacity(ends.len());
    for r0 in (0..ends.len()).step_by(ROWS) {
        let rows = ROWS.min(ends.len() - r0);
        let row = |i: usize| base.add((r0 + i) * n_keys);
        let maxes: [f32; ROWS] = std::array::from_fn(|i| {
            if i < rows {
                row_max(std::slice::from_raw_parts(row(i), ends[r0 + i]))
            } else {
                0.0
            }
        });
        let common = ends[r0..r0 + rows].iter().min().copied().unwrap_or(0) / 16 * 16;
        let mut sums = [_mm256_setzero_pd(); ROWS];
        if rows == ROWS {
            for at in (0..common).step_by(16) {
                for (i, s) in sums.iter_mut().enumerate() {
                    *s = exp_and_sum16(row(i).add(at), _mm512_set1_ps(maxes[i]), *s);
                }
            }
        }
        let done = if rows == ROWS { common } else { 0 };
        for (i, s) in sums.iter().enumerate().take(rows) {
            let r = std::slice::from_raw_parts_mut(row(i), ends[r0 + i]);
            stats.push(finish_softmax(r, maxes[i], done, *s));
        }
    }
    stats
}

/// The largest score of a row.
#[inline(always)]
unsafe fn row_max(row: &[f32]) -> f32 {
    let ptr = row.as_ptr();
    let main = row.len() / 16 * 16;
    let mut maxv = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..main).step_by(16) {
        maxv = _mm512_max_ps(maxv, _mm512_loadu_ps(ptr.add(i)));
    }
    let mut max = _mm512_reduce_max_ps(maxv);
    for &x in &row[main..] {
        max = if x > max { x } else { max };
    }
    max
}

/// Sixteen scores at `at` replaced by `exp(x - max)`, added to the four f64 lanes in order.
#[inline(always)]
unsafe fn exp_and_sum16(at: *mut f32, maxb: __m512, mut sums: __m256d) -> __m256d {
    let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(at), maxb));
    _mm512_storeu_ps(at, e);
    for quarter in 0..4 {
        let four = _mm_loadu_ps(at.add(4 * quarter));
        sums = _mm256_add_pd(sums, _mm256_cvtps_pd(four));
    }
    sums
}

/// The rest of a row's softmax once its first `done` scores (a multiple of 16) went through
/// [`exp_and_sum16`] into `sums`: the remaining exponentials, the total, and the
/// probabilities rounded to f16. Returns the row's max and sum.
#[inline(always)]
unsafe fn finish_softmax(row: &mut [f32], max: f32, done: usize, mut sums: __m256d) -> (f32, f64) {
    let n = row.len();
    let ptr = row.as_mut_ptr();
    let main = n / 16 * 16;
    let maxb = _mm512_set1_ps(max);
    for i in (done..main).step_by(16) {
        sums = exp_and_sum16(ptr.add(i), maxb, sums);
    }
    let mut lanes = [0f64; 4];
    _mm256_storeu_pd(lanes.as_mut_ptr(), sums);
    for (i, x) in row.iter_mut().enumerate().skip(main) {
        *x = crate::cpu::fastmath::exp(*x - max);
        lanes[i % 4] += *x as f64;
    }
    let sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    let inv = (1.0 / sum) as f32;
    let invb = _mm512_set1_ps(inv);
    for i in (0..main).step_by(16) {
        let x = _mm512_mul_ps(_mm512_loadu_ps(ptr.add(i)), invb);
        let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        _mm512_storeu_ps(ptr.add(i), _mm512_cvtph_ps(h));
    }
    for x in &mut row[main..] {
        *x = f16::from_f32(*x * inv).to_f32();
    }
    (max, sum)
}

/// [`crate::cpu::fastmath::exp`] on 16 lanes, operation for operation (the inputs are
/// finite: scores minus their max).
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    use crate::cpu::fastmath::{EXP_MAX, EXP_MIN, EXP_TAYLOR, LN2_HI, LN2_LO};
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN)),
        _mm512_set1_ps(EXP_MAX),
    );
    let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(LOG2_E)),
    );
    let r = _mm512_fmadd_ps(
        k,
        _mm512_set1_ps(-LN2_LO),
        _mm512_fmadd_ps(k, _mm512_set1_ps(-LN2_HI), x),
    );
    let mut p = _mm512_set1_ps(EXP_TAYLOR[0]);
    for &c in &EXP_TAYLOR[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvttps_epi32(k),
        _mm512_set1_epi32(127),
    ));
    _mm512_mul_ps(p, _mm512_castsi512_ps(bits))
}

/// `NV` query vectors (at `q`, `d` apart) against a transposed K tile (`[d, KEY_TILE]`, `n`
/// keys valid): `KEY_TILE` dot products per vector, each with exactly [`super::dot8`]'s
/// arithmetic (accumulator `l` holds lane `l` for 16 keys; the lanes are added in order).
///
/// # Safety
/// AVX-512 F is enabled in the caller; `q` points to `NV * d` floats; `kt` holds
/// `d * KEY_TILE` (asserted in debug builds), so every load is inside it.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `l` and `i` name the lane and the vector, as in `dot8`
unsafe fn tile_dots<const NV: usize>(
    q: *const f32,
    d: usize,
    kt: &[f32],
    n: usize,
) -> [[f32; KEY_TILE]; NV] {
    debug_assert!(kt.len() >= d * KEY_TILE && d.is_multiple_of(8));
    let mut out = [[0f32; KEY_TILE]; NV];
    for t0 in (0..n).step_by(16) {
        let mut acc = [[_mm512_setzero_ps(); 8]; NV];
        for base in (0..d).step_by(8) {
            for l in 0..8 {
                let dd = base + l;
                let kk = _mm512_loadu_ps(kt.as_ptr().add(dd * KEY_TILE + t0));
                for i in 0..NV {
                    let qd = _mm512_set1_ps(*q.add(i * d + dd));
                    acc[i][l] = _mm512_fmadd_ps(qd, kk, acc[i][l]);
                }
            }
        }
        for i in 0..NV {
            let mut sum = _mm512_setzero_ps();
            for a in acc[i] {
                sum = _mm512_add_ps(sum, a);
            }
            _mm512_storeu_ps(out[i].as_mut_ptr().add(t0), sum);
        }
    }
    out
}

/// `NV` query vectors (at `q`, `d` apart) against 8 K rows (f16, at `rows`): 8 dot products
/// per vector with [`super::dot8`]'s arithmetic. Accumulator `[i][t]` holds the 8 lanes of
/// vector `i` and key `t`; an 8x8 transpose puts lane `l` of the 8 keys in one register, and
/// the registers are added in lane order.
///
/// # Safety
/// AVX-512 VL and F16C are enabled in the caller; `q` points to `NV * d` floats and each row
/// to `d` f16 values (the caller checks the rows lie inside the pool).
#[inline(always)]
unsafe fn row_dots<const NV: usize>(
    q: *const f32,
    d: usize,
    rows: &[*const f16; 8],
) -> [[f32; 8]; NV] {
    let mut acc = [[_mm256_setzero_ps(); 8]; NV];
    for c in (0..d).step_by(8) {
        let qc: [__m256; NV] = std::array::from_fn(|i| _mm256_loadu_ps(q.add(i * d + c)));
        for (t, row) in rows.iter().enumerate() {
            let kc = _mm256_cvtph_ps(_mm_loadu_si128(row.add(c) as *const __m128i));
            for i in 0..NV {
                acc[i][t] = _mm256_fmadd_ps(qc[i], kc, acc[i][t]);
            }
        }
    }
    let mut out = [[0f32; 8]; NV];
    for i in 0..NV {
        let lanes = transpose8(acc[i]);
        let mut sum = _mm256_setzero_ps();
        for l in lanes {
            sum = _mm256_add_ps(sum, l);
        }
        _mm256_storeu_ps(out[i].as_mut_ptr(), sum);
    }
    out
}

/// Keys ahead whose K or V row is prefetched while the current ones are computed.
const PREFETCH_KEYS: usize = 16;

/// Asks for the cache lines of one f16 row of `d` values (a hint: no effect on results).
#[inline(always)]
unsafe fn prefetch_row(row: *const f16, d: usize) {
    for off in (0..2 * d).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>((row as *const i8).add(off));
    }
}

/// The probability-weighted V sums of an item: `out[vi] += p[vi][j] * V[j]` over keys in order.
struct PvBlock<'a> {
    out: &'a mut [f32],
    p: &'a [f32],
    n_keys: usize,
    d: usize,
    pool: *const f16,
    starts: &'a [usize],
}

impl PvBlock<'_> {
    /// Vectors `v0..v0 + NV` over `keys` (all of which they see).
    ///
    /// # Safety
    /// AVX-512 F is enabled in the caller; `out` and `p` hold those vectors' rows, `keys` lie
    /// within `starts`, and each start is a row of `d` f16 values inside the pool (checked by
    /// `attend_with`).
    #[inline(always)]
    unsafe fn run<const NV: usize>(&mut self, v0: usize, keys: std::ops::Range<usize>) {
        match self.d / 16 {
            1 => self.run_chunks::<NV, 1>(v0, keys),
            2 => self.run_chunks::<NV, 2>(v0, keys),
            3 => self.run_chunks::<NV, 3>(v0, keys),
            4 => self.run_chunks::<NV, 4>(v0, keys),
            5 => self.run_chunks::<NV, 5>(v0, keys),
            6 => self.run_chunks::<NV, 6>(v0, keys),
            7 => self.run_chunks::<NV, 7>(v0, keys),
            _ => self.run_chunks::<NV, 8>(v0, keys),
        }
    }

    /// `C` registers of 16 floats per vector (`d == 16 * C`): the sums of the `NV` vectors stay
    /// in registers across the keys; each V row is widened once for all of them.
    #[inline(always)]
    unsafe fn run_chunks<const NV: usize, const C: usize>(
        &mut self,
        v0: usize,
        keys: std::ops::Range<usize>,
    ) {
        let d = self.d;
        debug_assert_eq!(d, 16 * C);
        debug_assert!((v0 + NV) * d <= self.out.len() && keys.end <= self.starts.len());
        let out = self.out.as_mut_ptr().add(v0 * d);
        let mut acc = [[_mm512_setzero_ps(); C]; NV];
        for (i, a) in acc.iter_mut().enumerate() {
            for (c, r) in a.iter_mut().enumerate() {
                *r = _mm512_loadu_ps(out.add(i * d + 16 * c));
            }
        }
        for j in keys {
            if let Some(&ahead) = self.starts.get(j + PREFETCH_KEYS) {
                prefetch_row(self.pool.add(ahead), d);
            }
            let row = self.pool.add(*self.starts.get_unchecked(j));
            let vr: [__m512; C] = std::array::from_fn(|c| {
                _mm512_cvtph_ps(_mm256_loadu_si256(row.add(16 * c) as *const __m256i))
            });
            for (i, a) in acc.iter_mut().enumerate() {
                let pj = _mm512_set1_ps(*self.p.get_unchecked((v0 + i) * self.n_keys + j));
                for (r, v) in a.iter_mut().zip(&vr) {
                    *r = _mm512_fmadd_ps(pj, *v, *r);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (c, r) in a.iter().enumerate() {
                _mm512_storeu_ps(out.add(i * d + 16 * c), *r);
            }
        }
    }
}
