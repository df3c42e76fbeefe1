//! Causal attention of a batch of sequences over the slot pool, read in place (CPU).
//!
//! Each sequence in a step brings `n_new` query rows (a prefill chunk, or 1 for a decode) and a
//! slot list covering its whole context: the already-stored prefix followed by the new tokens,
//! whose K/V were written to the pool just before. New token `i` attends to slots
//! `0..=past + i`. Nothing is gathered into a contiguous K/V copy: K and V rows are read through
//! the slot list where they lie.
//!
//! Work is split into (sequence, KV head, block of queries) items run in parallel. One item
//! scores all query heads of its GQA group for a block of queries against each key, so every K
//! and V row fetched from memory is used `block x group` times. K/V are stored as f16 and
//! widened a tile at a time (64 keys of one head: 8 KiB), never as a whole-context copy.
//!
//! Numerics follow llama.cpp's CPU attention with an f16 cache (the reference our fixtures come
//! from): queries rounded to f16 before `q·k` (f32 accumulation), the scale applied to the dot
//! product, softmax in f32, probabilities rounded to f16 before the V sum.
//! Every query's result depends only on its own row and the K/V it reads, so attention is
//! batch-invariant like the matmuls.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Queries per work item in prefill; with SmolLM2's GQA group of 3 this is 48 query vectors
/// per K/V row fetched.
const QUERY_BLOCK: usize = 16;
/// Keys scored per tile, so a tile of K rows stays in L1 while every query vector visits it.
const KEY_TILE: usize = 64;

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
/// products, vectorised across keys.
///
/// Each dot product sums in 8 lanes (lane `l` takes dimensions `l, l+8, l+16, ...` by fused
/// multiply-add), then adds the lanes in order: the order of an 8-wide SIMD dot product. Any
/// fixed order keeps the batch invariance; this one also reproduces llama.cpp's `q·k` closely
/// enough that short contexts agree with it bit for bit (tests/reference_logits.rs).
fn tile_dots(q: &[f32], kt: &[f32]) -> [f32; KEY_TILE] {
    const SUB: usize = 8;
    let d = q.len();
    let main = d / 8 * 8;
    let mut out = [0f32; KEY_TILE];
    for t0 in (0..KEY_TILE).step_by(SUB) {
        let mut acc = [[0f32; SUB]; 8];
        for base in (0..main).step_by(8) {
            for (l, lane) in acc.iter_mut().enumerate() {
                let dd = base + l;
                let qd = q[dd];
                let kc = &kt[dd * KEY_TILE + t0..dd * KEY_TILE + t0 + SUB];
                for (a, &k) in lane.iter_mut().zip(kc) {
                    *a = qd.mul_add(k, *a);
                }
            }
        }
        for i in 0..SUB {
            let mut sum = 0f32;
            for lane in &acc {
                sum += lane[i];
            }
            for dd in main..d {
                sum += q[dd] * kt[dd * KEY_TILE + t0 + i];
            }
            out[t0 + i] = sum;
        }
    }
    out
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
                items.push(WorkItem {
                    seq,
                    kv_head,
                    q_start,
                    q_len: QUERY_BLOCK.min(s.n_new - q_start),
                });
            }
        }
    }

    let results: Vec<(usize, Vec<f32>)> = items
        .par_iter()
        .enumerate()
        .map(|(idx, it)| {
            let s = &seqs[it.seq];
            let past = s.slots.len() - s.n_new;
            let n_vec = it.q_len * g;
            let n_keys = past + it.q_start + it.q_len;
            // Query vectors of the block, rounded to f16: vector v = (query qi, head in group gi).
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
            // Key limit (exclusive) of each vector: causal mask.
            let limit = |v: usize| past + it.q_start + v / g + 1;

            let view = |pool| HeadView {
                pool,
                slots: s.slots,
                kv_width,
                head_off: it.kv_head * d,
                head_dim: d,
            };
            let (k_view, v_view) = (view(k_pool), view(v_pool));
            let mut tile_buf = vec![0f32; KEY_TILE * d];
            let mut row_buf = vec![0f32; d];
            let mut scores = vec![f32::NEG_INFINITY; n_vec * n_keys];
            for tile in (0..n_keys).step_by(KEY_TILE) {
                let tile_end = (tile + KEY_TILE).min(n_keys);
                k_view.widen_transposed(tile..tile_end, &mut row_buf, &mut tile_buf);
                for v in 0..n_vec {
                    let end = tile_end.min(limit(v));
                    if end <= tile {
                        continue;
                    }
                    let acc = tile_dots(&qv[v * d..(v + 1) * d], &tile_buf);
                    for (sc, a) in scores[v * n_keys + tile..v * n_keys + end]
                        .iter_mut()
                        .zip(&acc)
                    {
                        *sc = a * scale;
                    }
                }
            }
            let mut probs_f16 = vec![f16::ZERO; n_keys];
            for v in 0..n_vec {
                let row = &mut scores[v * n_keys..v * n_keys + limit(v)];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                row.iter_mut()
                    .for_each(|x| *x = crate::fastmath::exp(*x - max));
                let sum: f64 = row.iter().map(|&x| x as f64).sum();
                let inv = (1.0 / sum) as f32;
                row.iter_mut().for_each(|x| *x *= inv);
                // Rounded to f16 like the reference (see the module docs).
                let p16 = &mut probs_f16[..row.len()];
                p16.convert_from_f32_slice(row);
                p16.convert_to_f32_slice(row);
            }
            let mut acc = vec![0f32; n_vec * d];
            for tile in (0..n_keys).step_by(KEY_TILE) {
                let tile_end = (tile + KEY_TILE).min(n_keys);
                v_view.widen(tile..tile_end, &mut tile_buf);
                for v in 0..n_vec {
                    let end = tile_end.min(limit(v));
                    let arow = &mut acc[v * d..(v + 1) * d];
                    for j in tile..end {
                        let vrow = &tile_buf[(j - tile) * d..(j - tile + 1) * d];
                        axpy(arow, scores[v * n_keys + j], vrow);
                    }
                }
            }
            (idx, acc)
        })
        .collect();

    for (idx, acc) in results {
        let it = &items[idx];
        let s = &seqs[it.seq];
        for qi in 0..it.q_len {
            let row = s.row_offset + it.q_start + qi;
            for gi in 0..g {
                let head = it.kv_head * g + gi;
                out[row * q_width + head * d..][..d]
                    .copy_from_slice(&acc[(qi * g + gi) * d..][..d]);
            }
        }
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
    fn matches_reference_over_scattered_slots() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let shape = AttnShape {
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 12,
        };
        let kvw = shape.num_kv_heads * shape.head_dim;
        let qw = shape.num_heads * shape.head_dim;
        let pool_slots = 200;
        let k_pool: Vec<f16> = (0..pool_slots * kvw)
            .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)))
            .collect();
        let v_pool: Vec<f16> = (0..pool_slots * kvw)
            .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)))
            .collect();
        // Two sequences: a prefill chunk of 37 new tokens after 50 cached (not multiples of the
        // tile sizes), and a decode after 90, with slots scattered over the pool.
        let mut perm: Vec<u32> = (0..pool_slots as u32).collect();
        for i in (1..perm.len()).rev() {
            perm.swap(i, rng.random_range(0..=i));
        }
        let seq_a: Vec<u32> = perm[..87].to_vec();
        let seq_b: Vec<u32> = perm[87..178].to_vec();
        let rows = 37 + 1;
        let q: Vec<f32> = (0..rows * qw)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let seqs = [
            AttnSeq {
                row_offset: 0,
                n_new: 37,
                slots: &seq_a,
            },
            AttnSeq {
                row_offset: 37,
                n_new: 1,
                slots: &seq_b,
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
        let ra = reference(
            &q[..37 * qw],
            &gather(&seq_a, &k_pool),
            &gather(&seq_a, &v_pool),
            50,
            shape,
        );
        let rb = reference(
            &q[37 * qw..],
            &gather(&seq_b, &k_pool),
            &gather(&seq_b, &v_pool),
            90,
            shape,
        );
        let expected: Vec<f32> = ra.into_iter().chain(rb).collect();
        let max_err = out
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        // The reference is exact (f64, unrounded q and p); Arbor rounds q and p to f16
        // (relative 2^-11), so errors up to ~1e-3 on outputs of magnitude ~1 are expected.
        assert!(max_err < 2e-3, "max abs error {max_err}");
    }
}
