//! The AVX2 attention kernel: [`super::attend_with`]'s arithmetic (the definition), element
//! for element, laid out for the 16 registers of AVX2.
//!
//! The definition scores a prefill chunk one query vector at a time against a transposed K
//! tile (two loads per fused multiply-add: the tile and the query broadcast), adds each V row
//! into a running sum in memory (eight loads and eight stores per key and vector for
//! SmolLM2's 64-float heads), and leaves the softmax to the compiler. On the 2-core AMD EPYC
//! without AVX-512 that made a 6.9k-token prefill and a cached 7k-token request slower than
//! llama.cpp's (docs/BENCHMARKS.md, 2026-12-03). Here instead:
//! - **Scores**: two query vectors per pass over the tile, four of `dot8`'s lanes at a time
//!   (eight accumulators of 8 keys in flight), so a tile row loaded once feeds two fused
//!   multiply-adds.
//! - **The V sums** of two vectors stay in registers across a tile, 32 floats of the head at
//!   a time; each V row is widened from f16 in registers, once for both.
//! - **Scores of a decode** (few vectors, keys read row by row): 8 keys per pass, each
//!   (vector, key) pair one 8-lane accumulator as in `dot8`, the lanes added after an 8x8
//!   transpose (eight scores per add instead of a horizontal sum per key).
//! - **The softmax** runs 8 scores per instruction.
//!
//! Why the same bits as the definition: every score is `dot8`'s lane-wise fused multiply-add
//! chain (lane `l` over dimensions `l, l + 8, ...` in order) followed by the in-order lane
//! sum; every V sum is the same `fma(p, v, acc)` per element in key order; the exponential
//! is [`crate::cpu::fastmath::exp`]'s operations on 8 lanes, the f64 sums keep its four lanes
//! (score `i` into lane `i % 4`, in order) and the f16 rounding is F16C's round to nearest
//! even, as `half`'s conversion. `tests::blocked_avx2_kernel_equals_the_definition` checks it.

use std::arch::x86_64::*;

use half::f16;

use super::avx2::transpose8;
use super::{extent, partials, row_scores, HeadView, Partial, KEY_TILE, TRANSPOSE_MIN_VECTORS};

/// Head sizes this kernel takes: whole 8-float registers, at most 16 of them.
pub(super) fn supports(head_dim: usize) -> bool {
    head_dim.is_multiple_of(8) && head_dim <= 128
}

/// What the SIMD kernels (this one and `avx512`) set up for an item: the keys it scores and
/// each vector's end ([`extent`]), `p` sized for `[n_vec, n_keys]` scores, and where each key's
/// row starts in the pools (K and V share the layout), checked to lie inside both, as the query
/// vectors inside `qv`.
pub(super) struct ItemLayout {
    pub(super) n_keys: usize,
    pub(super) ends: Vec<usize>,
    pub(super) starts: Vec<usize>,
}

impl ItemLayout {
    pub(super) fn new(
        qv: &[f32],
        limits: &[usize],
        keys: &std::ops::Range<usize>,
        (k, v): (&HeadView, &HeadView),
        p: &mut Vec<f32>,
    ) -> Self {
        let d = k.head_dim;
        let n_vec = limits.len();
        let (n_keys, ends) = extent(limits, keys);
        if p.len() < n_vec * n_keys {
            p.resize(n_vec * n_keys, 0.0);
        }
        let starts: Vec<usize> = (keys.start..keys.start + n_keys)
            .map(|j| k.slots[j] as usize * k.kv_width + k.head_off)
            .collect();
        assert!(
            starts
                .iter()
                .all(|&s| s + d <= k.pool.len() && s + d <= v.pool.len()),
            "rows lie inside the pools"
        );
        assert!(qv.len() >= n_vec * d);
        Self {
            n_keys,
            ends,
            starts,
        }
    }
}

/// Query vectors scored and summed together.
const Q_BLOCK: usize = 2;
/// Registers of a vector's V sum kept per pass over the keys (32 floats).
const PV_CHUNKS: usize = 4;

/// See [`super::attend_with`]; the same results, bit for bit. `supports(k.head_dim)`.
pub(super) fn attend_with(
    qv: &[f32],
    limits: &[usize],
    keys: std::ops::Range<usize>,
    k: &HeadView,
    v: &HeadView,
    scale: f32,
    p: &mut Vec<f32>,
) -> Vec<Option<Partial>> {
    let d = k.head_dim;
    assert!(supports(d));
    let n_vec = limits.len();
    let k0 = keys.start;
    let ItemLayout {
        n_keys,
        ends,
        starts,
    } = ItemLayout::new(qv, limits, &keys, (k, v), p);

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
                let n = tile_end - tile;
                // SAFETY: the build enables AVX2 and FMA; `qv` holds `n_vec * d` floats
                // (asserted), so vectors v0..v0 + nv lie inside it; the tile holds d x
                // KEY_TILE floats.
                let dots = unsafe { tile_dots(qv.as_ptr().add(v0 * d), nv, d, &tile_buf, n) };
                for (i, dots) in dots.iter().enumerate().take(nv) {
                    let vi = v0 + i;
                    let end = tile_end.min(ends[vi]);
                    if end > tile {
                        for (sc, x) in p[vi * n_keys + tile..vi * n_keys + end]
                            .iter_mut()
                            .zip(dots)
                        {
                            *sc = x * scale;
                        }
                    }
                }
            }
        }
    } else {
        // SAFETY (the closure): the build enables AVX2 and FMA; `row_scores` passes a query of
        // d floats and a tile of KEY_TILE rows of d with `first + 8 <= KEY_TILE`.
        let dots8 =
            |q: &[f32], rows: &[f32], first: usize| unsafe { row_dots(q.as_ptr(), d, rows, first) };
        row_scores(qv, &ends, (k, k0, n_keys), scale, p, dots8);
    }

    // SAFETY: the build enables AVX2, FMA and F16C; row i of `p` holds `ends[i]` scores
    // (it was sized for n_vec x n_keys above).
    let stats = unsafe { softmax_rows(p, n_keys, &ends) };

    let mut out = vec![0f32; n_vec * d];
    for tile in (0..n_keys).step_by(KEY_TILE) {
        let tile_end = (tile + KEY_TILE).min(n_keys);
        for v0 in (0..n_vec).step_by(Q_BLOCK) {
            let nv = Q_BLOCK.min(n_vec - v0);
            let group_end = |i: usize| tile_end.min(ends[v0 + i]);
            // Keys both vectors see go through the paired loop; the causal remainder of each
            // (a few keys on the diagonal) one vector at a time, after them, so every
            // vector's keys are still added in order.
            let common = (0..nv).map(group_end).min().unwrap_or(tile);
            let mut block = PvBlock {
                out: &mut out,
                p: p.as_slice(),
                n_keys,
                d,
                pool: v.pool,
                starts: &starts,
            };
            if common > tile {
                block.run(v0, nv, tile..common);
            }
            for i in 0..nv {
                let from = common.max(tile);
                if group_end(i) > from {
                    block.run(v0 + i, 1, from..group_end(i));
                }
            }
        }
    }
    partials(&ends, stats, &out, d)
}

/// One query vector (at `q`, `d` floats) against the 8 widened K rows from row `first` of
/// `rows` (`[KEY_TILE, d]`): [`super::dot8`] of each (the decode's scores, through
/// [`super::row_scores`]). Accumulator `t` holds the 8 lanes of key
/// `t`; an 8x8 transpose puts lane `l` of the 8 keys in one register, and the registers are
/// added in lane order.
///
/// # Safety
/// AVX2 and FMA are enabled; `q` points to `d` floats; `first + 8 <= KEY_TILE`, `d % 8 == 0`
/// and `rows` holds `KEY_TILE * d` floats (checked in debug builds).
#[inline(always)]
unsafe fn row_dots(q: *const f32, d: usize, rows: &[f32], first: usize) -> [f32; 8] {
    debug_assert!(first + 8 <= KEY_TILE && d.is_multiple_of(8) && rows.len() >= KEY_TILE * d);
    let base = rows.as_ptr().add(first * d);
    let mut acc = [_mm256_setzero_ps(); 8];
    for c in (0..d).step_by(8) {
        let qc = _mm256_loadu_ps(q.add(c));
        for (t, a) in acc.iter_mut().enumerate() {
            let kc = _mm256_loadu_ps(base.add(t * d + c));
            *a = _mm256_fmadd_ps(qc, kc, *a);
        }
    }
    let lanes = transpose8(acc);
    let mut sum = _mm256_setzero_ps();
    for l in lanes {
        sum = _mm256_add_ps(sum, l);
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), sum);
    out
}

/// `nv <= Q_BLOCK` query vectors (at `q`, `d` apart) against a transposed K tile (`[d,
/// KEY_TILE]`, the first `n` keys wanted): [`super::dot8`] of each vector and key. Lanes go
/// four at a time: accumulator `[i][l]` holds lane `l` of vector `i` for 8 keys, and each
/// vector's lanes are added into its sum in lane order.
///
/// # Safety
/// AVX2 and FMA are enabled; `q` points to `nv * d` floats; `kt` holds `d * KEY_TILE`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `l` and `i` name the lane and the vector, as in `dot8`
unsafe fn tile_dots(
    q: *const f32,
    nv: usize,
    d: usize,
    kt: &[f32],
    n: usize,
) -> [[f32; KEY_TILE]; Q_BLOCK] {
    debug_assert!(nv <= Q_BLOCK && kt.len() >= d * KEY_TILE && d.is_multiple_of(8));
    // A lone vector reads its own row for the second, and its results are dropped.
    let qs = [q, q.add(if nv > 1 { d } else { 0 })];
    let mut out = [[0f32; KEY_TILE]; Q_BLOCK];
    for t0 in (0..n).step_by(8) {
        let mut sum = [_mm256_setzero_ps(); Q_BLOCK];
        for l0 in (0..8).step_by(4) {
            let mut acc = [[_mm256_setzero_ps(); 4]; Q_BLOCK];
            for base in (0..d).step_by(8) {
                for l in 0..4 {
                    let dd = base + l0 + l;
                    let kk = _mm256_loadu_ps(kt.as_ptr().add(dd * KEY_TILE + t0));
                    for i in 0..Q_BLOCK {
                        let qd = _mm256_set1_ps(*qs[i].add(dd));
                        acc[i][l] = _mm256_fmadd_ps(qd, kk, acc[i][l]);
                    }
                }
            }
            for i in 0..Q_BLOCK {
                for a in acc[i] {
                    sum[i] = _mm256_add_ps(sum[i], a);
                }
            }
        }
        for i in 0..Q_BLOCK {
            _mm256_storeu_ps(out[i].as_mut_ptr().add(t0), sum[i]);
        }
    }
    out
}

/// [`super::softmax_f16`] of every vector's row of scores (`p`: `[n_vec, n_keys]`, row `i` up
/// to `ends[i]`) with 8 scores per instruction, the same bits (see the module docs).
///
/// # Safety
/// AVX2, FMA and F16C are enabled; `p` holds `ends.len()` rows of `n_keys`.
unsafe fn softmax_rows(p: &mut [f32], n_keys: usize, ends: &[usize]) -> Vec<(f32, f64)> {
    assert!(ends
        .iter()
        .enumerate()
        .all(|(i, &e)| e <= n_keys && i * n_keys + e <= p.len()));
    ends.iter()
        .enumerate()
        .map(|(i, &end)| softmax_row(&mut p[i * n_keys..i * n_keys + end]))
        .collect()
}

/// One row's softmax in place: probabilities rounded to f16; returns its max and its sum of
/// `exp(x - max)`.
#[inline(always)]
unsafe fn softmax_row(row: &mut [f32]) -> (f32, f64) {
    let n = row.len();
    let ptr = row.as_mut_ptr();
    let main = n / 8 * 8;
    let mut maxv = _mm256_set1_ps(f32::NEG_INFINITY);
    for i in (0..main).step_by(8) {
        maxv = _mm256_max_ps(maxv, _mm256_loadu_ps(ptr.add(i)));
    }
    let mut lanes8 = [0f32; 8];
    _mm256_storeu_ps(lanes8.as_mut_ptr(), maxv);
    let mut max = lanes8.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &x in &row[main..] {
        max = if x > max { x } else { max };
    }
    let maxb = _mm256_set1_ps(max);
    let mut sums = _mm256_setzero_pd();
    for i in (0..main).step_by(8) {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(ptr.add(i)), maxb));
        _mm256_storeu_ps(ptr.add(i), e);
        sums = _mm256_add_pd(sums, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        sums = _mm256_add_pd(sums, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
    }
    let mut lanes = [0f64; 4];
    _mm256_storeu_pd(lanes.as_mut_ptr(), sums);
    for (i, x) in row.iter_mut().enumerate().skip(main) {
        *x = crate::cpu::fastmath::exp(*x - max);
        lanes[i % 4] += *x as f64;
    }
    let sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    let inv = (1.0 / sum) as f32;
    let invb = _mm256_set1_ps(inv);
    for i in (0..main).step_by(8) {
        let x = _mm256_mul_ps(_mm256_loadu_ps(ptr.add(i)), invb);
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
        _mm256_storeu_ps(ptr.add(i), _mm256_cvtph_ps(h));
    }
    for x in &mut row[main..] {
        *x = f16::from_f32(*x * inv).to_f32();
    }
    (max, sum)
}

/// [`crate::cpu::fastmath::exp`] on 8 lanes, operation for operation (the inputs are finite:
/// scores minus their max).
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    use crate::cpu::fastmath::{EXP_MAX, EXP_MIN, EXP_TAYLOR, LN2_HI, LN2_LO};
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(EXP_MIN)),
        _mm256_set1_ps(EXP_MAX),
    );
    let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(LOG2_E),
    ));
    let r = _mm256_fmadd_ps(
        k,
        _mm256_set1_ps(-LN2_LO),
        _mm256_fmadd_ps(k, _mm256_set1_ps(-LN2_HI), x),
    );
    let mut p = _mm256_set1_ps(EXP_TAYLOR[0]);
    for &c in &EXP_TAYLOR[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvttps_epi32(k),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
}

/// The probability-weighted V sums of an item: `out[vi] += p[vi][j] * V[j]` over keys in order.
struct PvBlock<'a> {
    out: &'a mut [f32],
    p: &'a [f32],
    n_keys: usize,
    d: usize,
    pool: &'a [f16],
    starts: &'a [usize],
}

impl PvBlock<'_> {
    /// Vectors `v0..v0 + nv` (`nv <= Q_BLOCK`) over `keys`, all of which they see; the head
    /// in passes of [`PV_CHUNKS`] registers.
    fn run(&mut self, v0: usize, nv: usize, keys: std::ops::Range<usize>) {
        let chunks = self.d / 8;
        assert!(
            nv <= Q_BLOCK
                && (v0 + nv) * self.d <= self.out.len()
                && (v0 + nv) * self.n_keys <= self.p.len()
                && keys.end <= self.starts.len()
        );
        for c0 in (0..chunks).step_by(PV_CHUNKS) {
            // SAFETY: the build enables AVX2, FMA and F16C; the rows and buffers were checked
            // above and in `attend_with` (every start is a row of d values inside the pool).
            unsafe {
                match (nv, chunks - c0) {
                    (2, 4..) => self.pass::<2, 4>(v0, c0, keys.clone()),
                    (2, 3) => self.pass::<2, 3>(v0, c0, keys.clone()),
                    (2, 2) => self.pass::<2, 2>(v0, c0, keys.clone()),
                    (2, _) => self.pass::<2, 1>(v0, c0, keys.clone()),
                    (_, 4..) => self.pass::<1, 4>(v0, c0, keys.clone()),
                    (_, 3) => self.pass::<1, 3>(v0, c0, keys.clone()),
                    (_, 2) => self.pass::<1, 2>(v0, c0, keys.clone()),
                    (_, _) => self.pass::<1, 1>(v0, c0, keys.clone()),
                }
            }
        }
    }

    /// Registers `c0..c0 + C` of the sums of vectors `v0..v0 + NV`, kept in registers across
    /// `keys`; each V row's part widened once for all of them.
    ///
    /// # Safety
    /// As [`Self::run`] checks; AVX2, FMA and F16C are enabled.
    #[inline(always)]
    unsafe fn pass<const NV: usize, const C: usize>(
        &mut self,
        v0: usize,
        c0: usize,
        keys: std::ops::Range<usize>,
    ) {
        let d = self.d;
        let out = self.out.as_mut_ptr().add(v0 * d + 8 * c0);
        let mut acc = [[_mm256_setzero_ps(); C]; NV];
        for (i, a) in acc.iter_mut().enumerate() {
            for (c, r) in a.iter_mut().enumerate() {
                *r = _mm256_loadu_ps(out.add(i * d + 8 * c));
            }
        }
        let pool = self.pool.as_ptr();
        let p = self.p.as_ptr().add(v0 * self.n_keys);
        for j in keys {
            let row = pool.add(*self.starts.get_unchecked(j) + 8 * c0);
            let vr: [__m256; C] = std::array::from_fn(|c| {
                _mm256_cvtph_ps(_mm_loadu_si128(row.add(8 * c) as *const __m128i))
            });
            for (i, a) in acc.iter_mut().enumerate() {
                let pj = _mm256_set1_ps(*p.add(i * self.n_keys + j));
                for (r, v) in a.iter_mut().zip(&vr) {
                    *r = _mm256_fmadd_ps(pj, *v, *r);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (c, r) in a.iter().enumerate() {
                _mm256_storeu_ps(out.add(i * d + 8 * c), *r);
            }
        }
    }
}
