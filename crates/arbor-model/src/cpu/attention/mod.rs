//! Causal attention of a batch of sequences over the slot pool, read in place (CPU).
//!
//! Each sequence in a step brings `n_new` query rows (a prefill chunk, or 1 for a decode) and a
//! slot list covering its whole context: the already-stored prefix followed by the new tokens,
//! whose K/V were written to the pool just before. New token `i` attends to slots
//! `0..=past + i`. Nothing is gathered into a contiguous K/V copy: K and V rows are read through
//! the slot list where they lie.
//!
//! Work is split into (sequence, KV head, block of queries, key segment) items run in parallel.
//! One item scores all query heads of its GQA group for a block of queries against the keys of
//! one segment, so every K and V row fetched from memory is used `block x group` times. K/V are
//! stored as f16 and widened a tile at a time (64 keys of one head: 8 KiB), never as a
//! whole-context copy.
//!
//! Segments are fixed ranges of key positions (`KEY_SEGMENT` keys each), the same for every
//! query, so a long context's keys are spread over both cores even for a single decoding
//! sequence (flash-decoding's split), while a query's arithmetic still depends only on its
//! position and its keys, never on the batch:
//!
//! ```text
//!   keys:    [ segment 0: 0..1024 ][ segment 1: 1024..2048 ][ segment 2: 2048..2500 )
//!   each:     m_s = max score, p = f16(exp(score - m_s) / sum_s), acc_s = sum p v
//!   merge:    w_s = sum_s * exp(m_s - max m), out = sum_s (w_s / sum w) * acc_s, in segment order
//! ```
//! A query that sees a single segment (contexts up to 1024) takes `acc_0` unchanged.
//!
//! Numerics follow llama.cpp's CPU attention with an f16 cache (the reference our fixtures come
//! from): queries rounded to f16 before `q·k` (f32 accumulation), the scale applied to the dot
//! product, softmax in f32, probabilities rounded to f16 before the V sum.
//! Every query's result depends only on its own row and the K/V it reads, so attention is
//! batch-invariant like the matmuls.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Queries per work item in prefill; with SmolLM2's GQA group of 3 this is 96 query vectors
/// per K/V row fetched (and per K tile widened). 32 measured 2-4% faster than 16 on 2k-4k
/// prefills; results do not depend on it (each query's arithmetic is its own).
const QUERY_BLOCK: usize = 32;
/// Keys scored per tile, so a tile of K rows stays in L1 while every query vector visits it.
const KEY_TILE: usize = 64;
/// Keys per segment (a multiple of `KEY_TILE`). Changing it changes long-context numerics
/// (slightly), never batch invariance.
const KEY_SEGMENT: usize = 1024;

#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    fn group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// One sequence of a step.
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq<'a> {
    /// First row of this sequence's queries in the step's flattened `q`.
    pub row_offset: usize,
    pub n_new: usize,
    /// Slots of the whole context, new tokens last.
    pub slots: &'a [u32],
}

/// Which kernel computes an item: all three give the same bits (the tests check it); the
/// definition is the plain code the others are checked against, and the one off x86.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Definition,
    /// `blocked`: AVX2 register blocking (every x86-64-v3 build).
    Avx2,
    /// `avx512`: only where the processor has AVX-512 F and VL.
    Avx512,
}

impl Kernel {
    /// The fastest the processor and the build allow (the start-up's kernel choice).
    fn detect() -> Self {
        if crate::cpu::kernels::avx512() {
            Kernel::Avx512
        } else if cfg!(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        )) {
            Kernel::Avx2
        } else {
            Kernel::Definition
        }
    }
}

#[inline]
fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = alpha.mul_add(*xi, *yi);
    }
}

struct WorkItem {
    seq: usize,
    kv_head: usize,
    q_start: usize,
    q_len: usize,
    /// Keys `segment * KEY_SEGMENT ..` of the segment this item covers.
    segment: usize,
}

/// One item's partial result for each of its query vectors: the segment's max score, softmax
/// denominator and probability-weighted V sum (`None` where the vector sees no key of it).
struct Partial {
    max: f32,
    sum: f64,
    acc: Vec<f32>,
}

#[inline]
fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// One KV head of one sequence, as laid out in a pool.
struct HeadView<'a> {
    pool: &'a [f16],
    slots: &'a [u32],
    /// Values per slot (all KV heads).
    kv_width: usize,
    /// Offset of this head in a slot.
    head_off: usize,
    head_dim: usize,
}

impl HeadView<'_> {
    /// Widens the rows of keys `keys` into `dst` transposed (`[head_dim, KEY_TILE]`), so that
    /// one query's scores against a tile are `head_dim` vector FMAs over contiguous keys.
    /// Keys past the end of the range are zero.
    fn widen_transposed(&self, keys: std::ops::Range<usize>, row: &mut [f32], dst: &mut [f32]) {
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "f16c"
        ))]
        if self.head_dim.is_multiple_of(8) {
            let starts: Vec<usize> = keys
                .clone()
                .map(|j| self.slots[j] as usize * self.kv_width + self.head_off)
                .collect();
            return avx2::widen_transposed(self.pool, &starts, self.head_dim, dst);
        }
        let d = self.head_dim;
        let n = keys.len();
        for (t, j) in keys.enumerate() {
            let s = self.slots[j] as usize * self.kv_width + self.head_off;
            self.pool[s..s + d].convert_to_f32_slice(&mut row[..d]);
            for (dd, &x) in row[..d].iter().enumerate() {
                dst[dd * KEY_TILE + t] = x;
            }
        }
        for dd in 0..d {
            dst[dd * KEY_TILE + n..(dd + 1) * KEY_TILE].fill(0.0);
        }
    }

    /// Widens the rows of keys `keys` into `dst` (`[keys, head_dim]`).
    fn widen(&self, keys: std::ops::Range<usize>, dst: &mut [f32]) {
        let d = self.head_dim;
        for (t, j) in keys.enumerate() {
            let s = self.slots[j] as usize * self.kv_width + self.head_off;
            self.pool[s..s + d].convert_to_f32_slice(&mut dst[t * d..(t + 1) * d]);
        }
    }
}

/// One query (`d` values) against a transposed K tile (`[d, KEY_TILE]`): `KEY_TILE` dot
/// products, vectorised across keys, with exactly [`dot8`]'s arithmetic per key.
fn tile_dots(q: &[f32], kt: &[f32]) -> [f32; KEY_TILE] {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        avx2::tile_dots(q, kt)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        tile_dots_portable(q, kt)
    }
}

/// The definition of [`tile_dots`] (and the fallback off x86).
#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
fn tile_dots_portable(q: &[f32], kt: &[f32]) -> [f32; KEY_TILE] {
    let d = q.len();
    let mut out = [0f32; KEY_TILE];
    let mut key = vec![0f32; d];
    for (t, o) in out.iter_mut().enumerate() {
        for (dd, k) in key.iter_mut().enumerate() {
            *k = kt[dd * KEY_TILE + t];
        }
        *o = dot8(q, &key);
    }
    out
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2 {
    use super::KEY_TILE;
    use half::f16;
    use std::arch::x86_64::*;

    /// Widens `starts.len() <= KEY_TILE` f16 rows of `d` values (row `t` at `pool[starts[t]..]`)
    /// into `dst` transposed, `[d, KEY_TILE]`, zero past the last row: 8x8 blocks converted
    /// with F16C and transposed in registers.
    pub(super) fn widen_transposed(pool: &[f16], starts: &[usize], d: usize, dst: &mut [f32]) {
        assert!(d.is_multiple_of(8) && starts.len() <= KEY_TILE && dst.len() >= d * KEY_TILE);
        assert!(
            starts.iter().all(|&s| s + d <= pool.len()),
            "rows lie inside the pool"
        );
        // SAFETY: AVX2/F16C are enabled for the whole build. Loads read 8 f16 at
        // `pool[start + dd ..]` with `dd + 8 <= d` and `start + d <= pool.len()` (asserted);
        // stores write 8 f32 at `dst[(dd + i) * KEY_TILE + t0 ..]` with `dd + i < d` and
        // `t0 + 8 <= KEY_TILE`, inside `dst` (asserted).
        unsafe {
            for t0 in (0..KEY_TILE).step_by(8) {
                for dd in (0..d).step_by(8) {
                    let mut r = [_mm256_setzero_ps(); 8];
                    for (i, ri) in r.iter_mut().enumerate() {
                        if let Some(&st) = starts.get(t0 + i) {
                            let h = _mm_loadu_si128(pool.as_ptr().add(st + dd) as *const __m128i);
                            *ri = _mm256_cvtph_ps(h);
                        }
                    }
                    let cols = transpose8(r);
                    for (i, c) in cols.iter().enumerate() {
                        _mm256_storeu_ps(dst.as_mut_ptr().add((dd + i) * KEY_TILE + t0), *c);
                    }
                }
            }
        }
    }

    /// Rows to columns of an 8x8 block of floats: `out[l][t] = r[t][l]`.
    #[inline(always)]
    pub(super) fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // SAFETY: AVX is enabled for the whole build (`target_feature = "avx2"`); register
        // shuffles only, no memory access.
        unsafe {
            let t = [
                _mm256_unpacklo_ps(r[0], r[1]),
                _mm256_unpackhi_ps(r[0], r[1]),
                _mm256_unpacklo_ps(r[2], r[3]),
                _mm256_unpackhi_ps(r[2], r[3]),
                _mm256_unpacklo_ps(r[4], r[5]),
                _mm256_unpackhi_ps(r[4], r[5]),
                _mm256_unpacklo_ps(r[6], r[7]),
                _mm256_unpackhi_ps(r[6], r[7]),
            ];
            let s = [
                _mm256_shuffle_ps::<0x44>(t[0], t[2]),
                _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
                _mm256_shuffle_ps::<0x44>(t[1], t[3]),
                _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
                _mm256_shuffle_ps::<0x44>(t[4], t[6]),
                _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
                _mm256_shuffle_ps::<0x44>(t[5], t[7]),
                _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
            ];
            [
                _mm256_permute2f128_ps::<0x20>(s[0], s[4]),
                _mm256_permute2f128_ps::<0x20>(s[1], s[5]),
                _mm256_permute2f128_ps::<0x20>(s[2], s[6]),
                _mm256_permute2f128_ps::<0x20>(s[3], s[7]),
                _mm256_permute2f128_ps::<0x31>(s[0], s[4]),
                _mm256_permute2f128_ps::<0x31>(s[1], s[5]),
                _mm256_permute2f128_ps::<0x31>(s[2], s[6]),
                _mm256_permute2f128_ps::<0x31>(s[3], s[7]),
            ]
        }
    }

    /// Eight keys per step: accumulator `l` holds lane `l` of [`super::dot8`] for 8 keys at
    /// once, and the lanes are added in order with vector adds.
    pub(super) fn tile_dots(q: &[f32], kt: &[f32]) -> [f32; KEY_TILE] {
        let d = q.len();
        assert!(
            kt.len() >= d * KEY_TILE,
            "a transposed tile holds d rows of KEY_TILE keys"
        );
        let main = d / 8 * 8;
        let mut out = [0f32; KEY_TILE];
        // SAFETY: AVX2/FMA are enabled for the whole build (`target_feature`). Every load reads
        // 8 floats at `kt[dd * KEY_TILE + t0 ..]` with `dd < d` and `t0 + 8 <= KEY_TILE`,
        // inside `kt` (asserted above); stores write `out[t0..t0 + 8]`.
        unsafe {
            for t0 in (0..KEY_TILE).step_by(8) {
                let mut acc = [_mm256_setzero_ps(); 8];
                for base in (0..main).step_by(8) {
                    for (l, a) in acc.iter_mut().enumerate() {
                        let dd = base + l;
                        let k = _mm256_loadu_ps(kt.as_ptr().add(dd * KEY_TILE + t0));
                        *a = _mm256_fmadd_ps(_mm256_set1_ps(q[dd]), k, *a);
                    }
                }
                let mut sum = _mm256_setzero_ps();
                for a in acc {
                    sum = _mm256_add_ps(sum, a);
                }
                for (dd, &qd) in q.iter().enumerate().skip(main) {
                    let k = _mm256_loadu_ps(kt.as_ptr().add(dd * KEY_TILE + t0));
                    sum = _mm256_add_ps(sum, _mm256_mul_ps(_mm256_set1_ps(qd), k));
                }
                _mm256_storeu_ps(out.as_mut_ptr().add(t0), sum);
            }
        }
        out
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod avx512;

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod blocked;

/// Below this many query vectors an item scores keys row by row; from it on, through a
/// transposed K tile (the transposition costs a tile's worth of scattered stores, which only
/// pays off when many vectors share it). Both compute [`dot8`]'s arithmetic.
const TRANSPOSE_MIN_VECTORS: usize = 12;

/// `q·k` for one key in the order of an 8-wide SIMD dot product: lane `l` accumulates
/// dimensions `l, l+8, ...` by fused multiply-add, then the lanes are added in order, then any
/// dimensions past the last multiple of 8. [`tile_dots`] computes the same values for a tile.
#[inline]
fn dot8(q: &[f32], k: &[f32]) -> f32 {
    let d = q.len();
    let main = d / 8 * 8;
    let mut lanes = [0f32; 8];
    for (qc, kc) in q[..main].chunks_exact(8).zip(k[..main].chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] = qc[l].mul_add(kc[l], lanes[l]);
        }
    }
    let mut sum = 0f32;
    for l in lanes {
        sum += l;
    }
    for dd in main..d {
        sum += q[dd] * k[dd];
    }
    sum
}

/// Attention of `qv.len() / d` query vectors (f16-rounded) over the keys `keys` of one KV
/// head. Vector `v` sees keys `0..limits[v]`; returns one partial per vector.
fn attend(
    qv: &[f32],
    limits: &[usize],
    keys: std::ops::Range<usize>,
    k: &HeadView,
    v: &HeadView,
    scale: f32,
    kernel: Kernel,
) -> Vec<Option<Partial>> {
    thread_local! {
        /// Score buffers reused across items: a fresh allocation per item costs page faults
        /// and zeroing on every step.
        static SCORES: std::cell::RefCell<(Vec<f32>, Vec<f16>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }
    SCORES.with_borrow_mut(|(p, p16)| attend_with(qv, limits, keys, k, v, scale, kernel, p, p16))
}

#[allow(clippy::too_many_arguments)]
#[cfg_attr(
    not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )),
    allow(unused_variables)
)]
fn attend_with(
    qv: &[f32],
    limits: &[usize],
    keys: std::ops::Range<usize>,
    k: &HeadView,
    v: &HeadView,
    scale: f32,
    kernel: Kernel,
    p: &mut Vec<f32>,
    p16: &mut Vec<f16>,
) -> Vec<Option<Partial>> {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        if kernel == Kernel::Avx512 && avx512::supports(k.head_dim) {
            // SAFETY: `Kernel::Avx512` comes from `kernels::avx512()` (or a test that checked
            // `has_avx512()`), true only when the processor has AVX-512 F and VL.
            return unsafe { avx512::attend_with(qv, limits, keys, k, v, scale, p) };
        }
        if kernel != Kernel::Definition && blocked::supports(k.head_dim) {
            return blocked::attend_with(qv, limits, keys, k, v, scale, p);
        }
    }
    let d = k.head_dim;
    let n_vec = limits.len();
    let k0 = keys.start;
    let (n_keys, ends) = extent(limits, &keys);
    let mut tile_buf = vec![0f32; KEY_TILE * d];
    let mut row_buf = vec![0f32; d];
    // Scores, then probabilities, `[n_vec, n_keys]`; every entry read below is written first.
    if p.len() < n_vec * n_keys {
        p.resize(n_vec * n_keys, 0.0);
    }
    if p16.len() < n_keys {
        p16.resize(n_keys, f16::ZERO);
    }
    if n_vec < TRANSPOSE_MIN_VECTORS {
        row_scores(qv, &ends, (k, k0, n_keys), scale, p, dot8_rows);
    }
    for tile in (0..n_keys).step_by(KEY_TILE) {
        let tile_end = (tile + KEY_TILE).min(n_keys);
        if n_vec >= TRANSPOSE_MIN_VECTORS {
            k.widen_transposed(k0 + tile..k0 + tile_end, &mut row_buf, &mut tile_buf);
            for (vi, &limit) in ends.iter().enumerate() {
                let end = tile_end.min(limit);
                if end <= tile {
                    continue;
                }
                let dots = tile_dots(&qv[vi * d..(vi + 1) * d], &tile_buf);
                for (sc, x) in p[vi * n_keys + tile..vi * n_keys + end]
                    .iter_mut()
                    .zip(&dots)
                {
                    *sc = x * scale;
                }
            }
        }
    }
    let stats: Vec<(f32, f64)> = ends
        .iter()
        .enumerate()
        .map(|(vi, &end)| softmax_f16(&mut p[vi * n_keys..vi * n_keys + end], &mut p16[..end]))
        .collect();
    let mut out = vec![0f32; n_vec * d];
    let mut acc = vec![0f32; d];
    for tile in (0..n_keys).step_by(KEY_TILE) {
        let tile_end = (tile + KEY_TILE).min(n_keys);
        v.widen(k0 + tile..k0 + tile_end, &mut tile_buf);
        for (vi, &limit) in ends.iter().enumerate() {
            let end = tile_end.min(limit);
            if end <= tile {
                continue;
            }
            // The running sum lives in a local buffer for the tile, then goes back.
            acc.copy_from_slice(&out[vi * d..(vi + 1) * d]);
            let probs = &p[vi * n_keys + tile..vi * n_keys + end];
            for (pj, vrow) in probs.iter().zip(tile_buf.chunks_exact(d)) {
                axpy(&mut acc, *pj, vrow);
            }
            out[vi * d..(vi + 1) * d].copy_from_slice(&acc);
        }
    }
    partials(&ends, stats, &out, d)
}

/// Scores of a few vectors (a decode's), key row by key row, scaled, into `p` (`[n_vec,
/// n_keys]`, each vector up to its end): widening K rows is cheaper than transposing a tile
/// when few vectors read it. `dots8(q, tile, first)` gives [`dot8`] of the query against the
/// 8 widened rows from row `first` of the tile (`[KEY_TILE, d]`; rows past the tile's keys
/// hold stale values, whose scores are not written).
fn row_scores(
    qv: &[f32],
    ends: &[usize],
    (k, k0, n_keys): (&HeadView, usize, usize),
    scale: f32,
    p: &mut [f32],
    dots8: impl Fn(&[f32], &[f32], usize) -> [f32; 8],
) {
    let d = k.head_dim;
    assert!(qv.len() >= ends.len() * d && p.len() >= ends.len() * n_keys);
    let mut tile_buf = vec![0f32; KEY_TILE * d];
    for tile in (0..n_keys).step_by(KEY_TILE) {
        let tile_end = (tile + KEY_TILE).min(n_keys);
        k.widen(k0 + tile..k0 + tile_end, &mut tile_buf);
        for (vi, &limit) in ends.iter().enumerate() {
            let end = tile_end.min(limit);
            for k8 in (tile..end).step_by(8) {
                let dots = dots8(&qv[vi * d..(vi + 1) * d], &tile_buf, k8 - tile);
                for (j, x) in (k8..(k8 + 8).min(end)).zip(dots) {
                    p[vi * n_keys + j] = x * scale;
                }
            }
        }
    }
}

/// [`dot8`] of `q` against the 8 rows from row `first` of `rows` (`[KEY_TILE, d]`, `first + 8
/// <= KEY_TILE`).
fn dot8_rows(q: &[f32], rows: &[f32], first: usize) -> [f32; 8] {
    let d = q.len();
    std::array::from_fn(|t| dot8(q, &rows[(first + t) * d..][..d]))
}

/// The keys an item scores (from the segment's start) and each vector's end within them.
fn extent(limits: &[usize], keys: &std::ops::Range<usize>) -> (usize, Vec<usize>) {
    let n_keys = limits
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .min(keys.end)
        .saturating_sub(keys.start);
    let ends = limits
        .iter()
        .map(|&l| l.min(keys.end).saturating_sub(keys.start))
        .collect();
    (n_keys, ends)
}

/// An item's result per vector from its softmax statistics and V sums.
fn partials(ends: &[usize], stats: Vec<(f32, f64)>, out: &[f32], d: usize) -> Vec<Option<Partial>> {
    ends.iter()
        .zip(stats)
        .zip(out.chunks_exact(d))
        .map(|((&end, (max, sum)), acc)| {
            (end > 0).then(|| Partial {
                max,
                sum,
                acc: acc.to_vec(),
            })
        })
        .collect()
}

/// Combines a query vector's per-segment partials, in segment order (see the module docs).
fn merge(parts: &[&Partial], out: &mut [f32]) {
    if let [only] = parts {
        out.copy_from_slice(&only.acc);
        return;
    }
    let max = parts
        .iter()
        .map(|p| p.max)
        .fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = parts
        .iter()
        .map(|p| p.sum * ((p.max - max) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    out.fill(0.0);
    for (p, w) in parts.iter().zip(&weights) {
        axpy(out, (w / total) as f32, &p.acc);
    }
}

/// Softmax of one row of scores in place, the probabilities rounded to f16 (see the module
/// docs); returns the row's max and the sum of `exp(x - max)`. The max and the f64 sum use
/// several independent lanes so they vectorise. Inlined so that the AVX-512 kernel's copy is
/// vectorised for its registers (the same operations per element, so the same bits).
#[inline(always)]
fn softmax_f16(row: &mut [f32], scratch: &mut [f16]) -> (f32, f64) {
    let mut maxes = [f32::NEG_INFINITY; 8];
    for chunk in row.chunks(8) {
        for (m, &x) in maxes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = maxes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sums = [0f64; 4];
    for chunk in row.chunks_mut(4) {
        for (s, x) in sums.iter_mut().zip(chunk.iter_mut()) {
            *x = crate::cpu::fastmath::exp(*x - max);
            *s += *x as f64;
        }
    }
    let sum = (sums[0] + sums[1]) + (sums[2] + sums[3]);
    let inv = (1.0 / sum) as f32;
    row.iter_mut().for_each(|x| *x *= inv);
    scratch.convert_from_f32_slice(row);
    scratch.convert_to_f32_slice(row);
    (max, sum)
}

/// `q`: `[rows, num_heads * head_dim]`; `out` likewise. `k_pool`/`v_pool`:
/// `[slots, num_kv_heads * head_dim]`.
pub fn attention(
    q: &[f32],
    k_pool: &[f16],
    v_pool: &[f16],
    seqs: &[AttnSeq],
    shape: AttnShape,
    out: &mut [f32],
) {
    attention_with(q, k_pool, v_pool, seqs, shape, out, Kernel::detect())
}

/// [`attention`] on `kernel` (`Kernel::Avx512` only where the processor has it).
fn attention_with(
    q: &[f32],
    k_pool: &[f16],
    v_pool: &[f16],
    seqs: &[AttnSeq],
    shape: AttnShape,
    out: &mut [f32],
    kernel: Kernel,
) {
    let AttnShape {
        num_heads,
        num_kv_heads,
        head_dim: d,
    } = shape;
    let g = shape.group();
    let q_width = num_heads * d;
    let kv_width = num_kv_heads * d;
    let scale = 1.0 / (d as f32).sqrt();

    let mut items = Vec::new();
    for (seq, s) in seqs.iter().enumerate() {
        for kv_head in 0..num_kv_heads {
            for q_start in (0..s.n_new).step_by(QUERY_BLOCK) {
                let q_len = QUERY_BLOCK.min(s.n_new - q_start);
                // Keys visible to the block's last query.
                let visible = s.slots.len() - s.n_new + q_start + q_len;
                for segment in 0..visible.div_ceil(KEY_SEGMENT) {
                    items.push(WorkItem {
                        seq,
                        kv_head,
                        q_start,
                        q_len,
                        segment,
                    });
                }
            }
        }
    }

    let results: Vec<Vec<Option<Partial>>> = items
        .par_iter()
        .map(|it| {
            let s = &seqs[it.seq];
            let view = |pool| HeadView {
                pool,
                slots: s.slots,
                kv_width,
                head_off: it.kv_head * d,
                head_dim: d,
            };
            // Query vectors of the block, rounded to f16: vector v = (query qi, head in group gi).
            let n_vec = it.q_len * g;
            let mut qv = vec![0f32; n_vec * d];
            for qi in 0..it.q_len {
                let row = s.row_offset + it.q_start + qi;
                for gi in 0..g {
                    let head = it.kv_head * g + gi;
                    let src = &q[row * q_width + head * d..][..d];
                    let dst = &mut qv[(qi * g + gi) * d..][..d];
                    dst.iter_mut()
                        .zip(src)
                        .for_each(|(o, x)| *o = round_f16(*x));
                }
            }
            let past = s.slots.len() - s.n_new;
            // Key limit (exclusive) of each vector: the causal mask.
            let limits: Vec<usize> = (0..n_vec).map(|v| past + it.q_start + v / g + 1).collect();
            let keys = it.segment * KEY_SEGMENT..(it.segment + 1) * KEY_SEGMENT;
            attend(
                &qv,
                &limits,
                keys,
                &view(k_pool),
                &view(v_pool),
                scale,
                kernel,
            )
        })
        .collect();

    // Items of one (sequence, KV head, query block) are consecutive, segments in order.
    let mut i = 0;
    while i < items.len() {
        let it = &items[i];
        let group_len = items[i..]
            .iter()
            .take_while(|o| (o.seq, o.kv_head, o.q_start) == (it.seq, it.kv_head, it.q_start))
            .count();
        let group = &results[i..i + group_len];
        let s = &seqs[it.seq];
        for qi in 0..it.q_len {
            let row = s.row_offset + it.q_start + qi;
            for gi in 0..g {
                let vi = qi * g + gi;
                let head = it.kv_head * g + gi;
                let parts: Vec<&Partial> = group.iter().filter_map(|r| r[vi].as_ref()).collect();
                merge(&parts, &mut out[row * q_width + head * d..][..d]);
            }
        }
        i += group_len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain softmax(QK^T/sqrt(d))V over a contiguous copy, the textbook definition.
    fn reference(
        q: &[f32],
        k: &[Vec<f32>],
        v: &[Vec<f32>],
        past: usize,
        shape: AttnShape,
    ) -> Vec<f32> {
        let d = shape.head_dim;
        let g = shape.group();
        let n_new = q.len() / (shape.num_heads * d);
        let mut out = vec![0.0; q.len()];
        for i in 0..n_new {
            for h in 0..shape.num_heads {
                let kvh = h / g;
                let qrow = &q[(i * shape.num_heads + h) * d..][..d];
                let n = past + i + 1;
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        let kr = &k[j][kvh * d..(kvh + 1) * d];
                        qrow.iter()
                            .zip(kr)
                            .map(|(a, b)| (a * b) as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    for c in 0..d {
                        out[(i * shape.num_heads + h) * d + c] +=
                            (w / z * v[j][kvh * d + c] as f64) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn transposed_widening_matches_the_scalar_one() {
        let d = 16;
        let pool: Vec<f16> = (0..50 * 2 * d)
            .map(|i| f16::from_f32(i as f32 * 0.25 - 7.0))
            .collect();
        let slots: Vec<u32> = (0..50).rev().collect();
        let view = HeadView {
            pool: &pool,
            slots: &slots,
            kv_width: 2 * d,
            head_off: d,
            head_dim: d,
        };
        let mut row = vec![0f32; d];
        let mut got = vec![f32::NAN; d * KEY_TILE];
        // 37 keys: a partial tile, zero-filled past the end.
        view.widen_transposed(3..40, &mut row, &mut got);
        for t in 0..KEY_TILE {
            for dd in 0..d {
                let want = if t < 37 {
                    pool[slots[3 + t] as usize * 2 * d + d + dd].to_f32()
                } else {
                    0.0
                };
                assert_eq!(got[dd * KEY_TILE + t], want, "key {t} dim {dd}");
            }
        }
    }

    /// Decode-sized items score row by row, prefill-sized ones through a transposed tile: the
    /// two must agree bit for bit, or a token's attention would depend on its batch.
    #[test]
    fn tile_dots_equal_dot8_bit_for_bit() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for d in [64usize, 80, 128, 12] {
            let q: Vec<f32> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
            let keys: Vec<Vec<f32>> = (0..KEY_TILE)
                .map(|_| (0..d).map(|_| rng.random_range(-2.0..2.0)).collect())
                .collect();
            let mut kt = vec![0f32; d * KEY_TILE];
            for (t, k) in keys.iter().enumerate() {
                for dd in 0..d {
                    kt[dd * KEY_TILE + t] = k[dd];
                }
            }
            let tiled = tile_dots(&q, &kt);
            for (t, k) in keys.iter().enumerate() {
                assert_eq!(tiled[t].to_bits(), dot8(&q, k).to_bits(), "d {d} key {t}");
            }
        }
    }

    /// Runs a prefill chunk of `n_new_a` queries over `seq_a` and a decode over `seq_b` in one
    /// call, on random queries and pools of `pool_slots`, and returns the largest difference
    /// from the textbook reference.
    fn max_error_against_reference(
        seed: u64,
        shape: AttnShape,
        pool_slots: usize,
        seq_a: &[u32],
        n_new_a: usize,
        seq_b: &[u32],
    ) -> f32 {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let kvw = shape.num_kv_heads * shape.head_dim;
        let qw = shape.num_heads * shape.head_dim;
        let mut pool = |scale: f32| -> Vec<f16> {
            (0..pool_slots * kvw)
                .map(|_| f16::from_f32(rng.random_range(-scale..scale)))
                .collect()
        };
        let (k_pool, v_pool) = (pool(1.5), pool(1.0));
        let rows = n_new_a + 1;
        let q: Vec<f32> = (0..rows * qw)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let seqs = [
            AttnSeq {
                row_offset: 0,
                n_new: n_new_a,
                slots: seq_a,
            },
            AttnSeq {
                row_offset: n_new_a,
                n_new: 1,
                slots: seq_b,
            },
        ];
        let mut out = vec![0f32; rows * qw];
        attention(&q, &k_pool, &v_pool, &seqs, shape, &mut out);
        let gather = |seq: &[u32], pool: &[f16]| -> Vec<Vec<f32>> {
            seq.iter()
                .map(|&s| {
                    pool[s as usize * kvw..][..kvw]
                        .iter()
                        .map(|x| x.to_f32())
                        .collect()
                })
                .collect()
        };
        let (qa, qb) = q.split_at(n_new_a * qw);
        let ra = reference(
            qa,
            &gather(seq_a, &k_pool),
            &gather(seq_a, &v_pool),
            seq_a.len() - n_new_a,
            shape,
        );
        let rb = reference(
            qb,
            &gather(seq_b, &k_pool),
            &gather(seq_b, &v_pool),
            seq_b.len() - 1,
            shape,
        );
        out.iter()
            .zip(ra.iter().chain(&rb))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    // The reference is exact (f64, unrounded q and p); Arbor rounds q and p to f16 (relative
    // 2^-11), so errors up to ~1e-3 on outputs of magnitude ~1 are expected.
    const F16_TOLERANCE: f32 = 2e-3;

    /// Contexts longer than a segment: the per-segment softmaxes merged must equal the plain
    /// softmax over all keys, for prefill queries straddling a segment boundary and a decode.
    #[test]
    fn segments_merge_to_the_full_softmax() {
        let shape = AttnShape {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
        };
        let seq_a: Vec<u32> = (0..(KEY_SEGMENT + 40) as u32).rev().collect();
        let seq_b: Vec<u32> = (0..(2 * KEY_SEGMENT + 300) as u32).collect();
        let err = max_error_against_reference(8, shape, 2 * KEY_SEGMENT + 600, &seq_a, 30, &seq_b);
        assert!(err < F16_TOLERANCE, "max abs error {err}");
    }

    /// A prefill chunk of 37 new tokens after 50 cached (not multiples of the tile sizes) and a
    /// decode after 90, with slots scattered over the pool.
    #[test]
    fn matches_reference_over_scattered_slots() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut perm: Vec<u32> = (0..200).collect();
        for i in (1..perm.len()).rev() {
            perm.swap(i, rng.random_range(0..=i));
        }
        let shape = AttnShape {
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 12,
        };
        let err = max_error_against_reference(3, shape, 200, &perm[..87], 37, &perm[87..178]);
        assert!(err < F16_TOLERANCE, "max abs error {err}");
    }

    /// The AVX-512 kernel against the AVX2 one, bit for bit, where the processor has both:
    /// prefill chunks through the transposed tile (with segments and the causal diagonal),
    /// small chunks and decodes row by row, over scattered slots, for every head size the
    /// kernel takes and one it leaves to AVX2.
    #[test]
    fn avx512_kernel_equals_the_definition() {
        if !crate::cpu::kernels::has_avx512() {
            eprintln!("no AVX-512 on this processor: only the AVX2 kernel is checked");
            return;
        }
        assert_kernel_equals_the_definition(Kernel::Avx512);
    }

    #[test]
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    fn blocked_avx2_kernel_equals_the_definition() {
        assert_kernel_equals_the_definition(Kernel::Avx2);
    }

    /// `kernel` against [`Kernel::Definition`], bit for bit, on head sizes it takes and one it
    /// leaves to the definition, GQA groups of 1-4, prefill chunks over one and two segments,
    /// from position 0, small chunks (row-by-row scores) and decodes, odd vector counts.
    fn assert_kernel_equals_the_definition(kernel: Kernel) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let shapes = [
            (9, 3, 64),
            (8, 2, 128),
            (4, 1, 32),
            (6, 2, 16),
            (5, 5, 48),
            (4, 2, 80),
            (4, 2, 20),
        ];
        for (num_heads, num_kv_heads, head_dim) in shapes {
            let shape = AttnShape {
                num_heads,
                num_kv_heads,
                head_dim,
            };
            let pool_slots = 2 * KEY_SEGMENT + 1200;
            let kvw = num_kv_heads * head_dim;
            let mut pool = |scale: f32| -> Vec<f16> {
                (0..pool_slots * kvw)
                    .map(|_| f16::from_f32(rng.random_range(-scale..scale)))
                    .collect()
            };
            let (k_pool, v_pool) = (pool(1.5), pool(1.0));
            let mut perm: Vec<u32> = (0..pool_slots as u32).collect();
            for i in (1..perm.len()).rev() {
                perm.swap(i, rng.random_range(0..=i));
            }
            // (context length, new tokens): a long chunk over two segments, a chunk from
            // position 0, a small chunk (row-by-row scores), decodes short and long.
            let cases = [
                (KEY_SEGMENT + 77, 45),
                (70, 70),
                (300, 3),
                (2 * KEY_SEGMENT + 500, 1),
                (13, 1),
            ];
            let mut seqs = Vec::new();
            let mut used = 0;
            let mut rows = 0;
            for (len, n_new) in cases {
                seqs.push(AttnSeq {
                    row_offset: rows,
                    n_new,
                    slots: &perm[used % 600..used % 600 + len],
                });
                used += 97;
                rows += n_new;
            }
            let qw = num_heads * head_dim;
            let q: Vec<f32> = (0..rows * qw)
                .map(|_| rng.random_range(-2.5..2.5))
                .collect();
            let run = |kernel: Kernel| {
                let mut out = vec![0f32; rows * qw];
                attention_with(&q, &k_pool, &v_pool, &seqs, shape, &mut out, kernel);
                out
            };
            let (plain, fast) = (run(Kernel::Definition), run(kernel));
            assert!(plain.iter().all(|x| x.is_finite()) && plain.iter().any(|&x| x != 0.0));
            for (i, (a, b)) in plain.iter().zip(&fast).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{shape:?}: element {i} (row {}) {a} vs {b}",
                    i / qw
                );
            }
        }
    }
}
