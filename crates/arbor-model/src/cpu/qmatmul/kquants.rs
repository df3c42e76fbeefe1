//! GGUF K-quant weights onto the batch-invariant block kernels.
//!
//! K-quants group 256 weights in a super-block of 8 or 16 sub-blocks, each with its own small
//! integer scale (and min) times the super-block's f16 ones. candle's kernels for them are not
//! batch-invariant (Q6_K switches to a repacked kernel for several rows), so a K-quant model's
//! prefix cache could change its outputs in the last bits. Instead, at load:
//!
//! - **Q4_K becomes Q4_1**, sub-block by sub-block, with the same 4-bit values: a 32-weight
//!   sub-block is `d·sc·q − dmin·m`, which is Q4_1's `d'·q + m'` with `d' = d·sc` and
//!   `m' = −dmin·m`. The only change is rounding `d'` and `m'` to f16 (the product of an f16
//!   and a 6-bit integer needs up to 17 significant bits): a relative error under 2^-11 in a
//!   block's scale, far below the 4-bit quantization's own. Same size in memory (5 bits a
//!   weight against 4.5).
//! - **Q6_K becomes Q6K blocks** (see [`super`]): each 32-weight piece of a super-block keeps
//!   the super-block's f16 `d`, its two 16-weight sub-blocks' i8 scales and its 6-bit values,
//!   so every weight is exactly the file's. 7 bits a weight against the file's 6.56 (Q8_0,
//!   what it was before, takes 8.5). Under `--cpu-kernels ggml` (no tiles) it is still Q8_0.
//! - **Q5_K becomes Q5K blocks** likewise: each 32-weight sub-block keeps the super-block's f16
//!   `d` and `dmin`, its 6-bit scale and min and its 5-bit values, 6.5 bits a weight (the file:
//!   5.5; Q8_0, before: 8.5), every weight exactly the file's.
//! - **Every other K-quant becomes Q8_0** (dequantized, then quantized per 32 weights, as Q5_0
//!   and Q5_1 are): 8 bits hold 2- to 3-bit values with room to spare.
//!
//! Q4_K's block, as ggml writes it (144 bytes):
//! ```text
//!   d:f16 dmin:f16 | scales[12]: 8 six-bit scales and 8 six-bit mins | qs[128]
//!   weights 64c..64c+32: low nibbles of qs[32c..32c+32]; 64c+32..64c+64: their high nibbles
//! ```
//! Q5_K's (176 bytes), weight `d·sc·q − dmin·m` with `q` 0..31, sub-block `s` = weights
//! 32s..32s+32:
//! ```text
//!   d:f16 dmin:f16 | scales[12] as Q4_K's | qh[32] | qs[128]
//!   weight 64c+l (l < 32): low nibble of qs[32c+l] | bit 2c of qh[l] << 4
//!   weight 64c+32+l:       high nibble of qs[32c+l] | bit 2c+1 of qh[l] << 4
//! ```
//! Q6_K's (210 bytes), weight `d·sc[i/16]·(q − 32)` with `q` 0..63:
//! ```text
//!   ql[128] | qh[64] | sc:i8[16] | d:f16
//!   in half n (weights 128n..128n+128), l in 0..32, ql' = ql[64n..], qh' = qh[32n..]:
//!   weight l:      low nibble of ql'[l]     | bits 0-1 of qh'[l] << 4
//!   weight l+32:   low nibble of ql'[l+32]  | bits 2-3 of qh'[l] << 4
//!   weight l+64:   high nibble of ql'[l]    | bits 4-5 of qh'[l] << 4
//!   weight l+96:   high nibble of ql'[l+32] | bits 6-7 of qh'[l] << 4
//! ```

use half::f16;

/// Weights per K-quant super-block.
const QK_K: usize = 256;
const Q4K_BLOCK_BYTES: usize = 144;
const Q4_1_BLOCK_BYTES: usize = 20;
const Q6K_BLOCK_BYTES: usize = 210;
const Q5K_BLOCK_BYTES: usize = 176;
/// Bytes of one of Arbor's 32-weight Q5K blocks ([`super::BlockFormat::Q5K`]).
const Q5K_PIECE_BYTES: usize = 26;
/// Bytes of one of Arbor's 32-weight Q6K blocks ([`super::BlockFormat::Q6K`]).
const Q6K_PIECE_BYTES: usize = 28;

/// Sub-block `j`'s 6-bit scale and min (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K blocks (a whole tensor's bytes) as Q4_1 blocks of the same weights, 8 per super-block;
/// `None` when the bytes are not whole Q4_K blocks.
pub fn q4k_to_q4_1(bytes: &[u8]) -> Option<Vec<u8>> {
    if !bytes.len().is_multiple_of(Q4K_BLOCK_BYTES) {
        return None;
    }
    let blocks = bytes.len() / Q4K_BLOCK_BYTES;
    let mut out = Vec::with_capacity(blocks * (QK_K / 32) * Q4_1_BLOCK_BYTES);
    for b in bytes.chunks_exact(Q4K_BLOCK_BYTES) {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        let dmin = f16::from_le_bytes([b[2], b[3]]).to_f32();
        let scales = &b[4..16];
        let qs = &b[16..];
        for chunk in 0..QK_K / 64 {
            let q = &qs[32 * chunk..32 * chunk + 32];
            for half in 0..2 {
                let (sc, m) = scale_min_k4(2 * chunk + half, scales);
                out.extend_from_slice(&f16::from_f32(d * f32::from(sc)).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(-dmin * f32::from(m)).to_le_bytes());
                // Q4_1 keeps element e of a block in byte e % 16, low nibble for e < 16.
                let nibble = |byte: u8| if half == 0 { byte & 0xF } else { byte >> 4 };
                for l in 0..16 {
                    out.push(nibble(q[l]) | (nibble(q[l + 16]) << 4));
                }
            }
        }
    }
    Some(out)
}

/// Q5_K blocks (a whole tensor's bytes) as Arbor's Q5K blocks of the same weights, 8 per
/// super-block; `None` when the bytes are not whole Q5_K blocks.
pub fn q5k_to_blocks(bytes: &[u8]) -> Option<Vec<u8>> {
    if !bytes.len().is_multiple_of(Q5K_BLOCK_BYTES) {
        return None;
    }
    let blocks = bytes.len() / Q5K_BLOCK_BYTES;
    let mut out = Vec::with_capacity(blocks * (QK_K / 32) * Q5K_PIECE_BYTES);
    for b in bytes.chunks_exact(Q5K_BLOCK_BYTES) {
        let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..]);
        for sub in 0..QK_K / 32 {
            let (chunk, upper) = (sub / 2, sub % 2 == 1);
            // The sub-block's 5-bit values, in order.
            let q: Vec<u8> = (0..32)
                .map(|l| {
                    let byte = qs[32 * chunk + l];
                    let nibble = if upper { byte >> 4 } else { byte & 0xF };
                    nibble | (((qh[l] >> sub) & 1) << 4)
                })
                .collect();
            let (sc, m) = scale_min_k4(sub, scales);
            out.extend_from_slice(&b[..4]);
            out.extend([sc, m]);
            // ql as Q4_1's: element e in byte e % 16, low nibble for e < 16.
            out.extend((0..16).map(|l| (q[l] & 0xF) | ((q[l + 16] & 0xF) << 4)));
            // qh byte k: bit p holds element 4p + k (p < 4) or 16 + 4(p - 4) + k.
            out.extend((0..4).map(|k| {
                (0..8).fold(0u8, |byte, p| {
                    let e = if p < 4 {
                        4 * p + k
                    } else {
                        16 + 4 * (p - 4) + k
                    };
                    byte | ((q[e] >> 4) << p)
                })
            }));
        }
    }
    Some(out)
}

/// The 6-bit value (0..63) of each of a Q6_K super-block's 256 weights.
fn q6k_values(b: &[u8]) -> [u8; QK_K] {
    let (ql, qh) = (&b[..128], &b[128..192]);
    let mut q = [0u8; QK_K];
    for n in 0..2 {
        let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
        let y = &mut q[128 * n..128 * n + 128];
        for l in 0..32 {
            y[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
            y[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
            y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    q
}

/// Q6_K blocks (a whole tensor's bytes) as Arbor's Q6K blocks of the same weights, 8 per
/// super-block; `None` when the bytes are not whole Q6_K blocks.
pub fn q6k_to_blocks(bytes: &[u8]) -> Option<Vec<u8>> {
    if !bytes.len().is_multiple_of(Q6K_BLOCK_BYTES) {
        return None;
    }
    let blocks = bytes.len() / Q6K_BLOCK_BYTES;
    let mut out = Vec::with_capacity(blocks * (QK_K / 32) * Q6K_PIECE_BYTES);
    for b in bytes.chunks_exact(Q6K_BLOCK_BYTES) {
        let q = q6k_values(b);
        let (scales, d) = (&b[192..208], &b[208..210]);
        for (piece, q) in q.chunks_exact(32).enumerate() {
            out.extend_from_slice(d);
            out.extend_from_slice(&scales[2 * piece..2 * piece + 2]);
            // ql as Q4_1's: element e in byte e % 16, low nibble for e < 16.
            out.extend((0..16).map(|l| (q[l] & 0xF) | ((q[l + 16] & 0xF) << 4)));
            // qh byte 4h + k: the high bits of elements 16h + 4m + k at bit 2m, m in 0..4.
            for h in 0..2 {
                out.extend((0..4).map(|k| {
                    (0..4).fold(0u8, |byte, m| {
                        byte | ((q[16 * h + 4 * m + k] >> 4) << (2 * m))
                    })
                }));
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Q4_1 blocks' weights, as the block kernels read them.
    fn dequantize_q4_1(bytes: &[u8]) -> Vec<f32> {
        let mut out = Vec::new();
        for b in bytes.chunks_exact(Q4_1_BLOCK_BYTES) {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
            out.extend((0..32).map(|e| {
                let q = (b[4 + e % 16] >> (4 * (e / 16))) & 0xF;
                d * f32::from(q) + m
            }));
        }
        out
    }

    #[test]
    fn q4k_as_q4_1_keeps_every_weight_to_the_rounding_of_its_block_scale() {
        let (rows, cols) = (6, 512);
        let (q, want) = quantized(GgmlDType::Q4K, rows, cols);
        let q4_1 = q4k_to_q4_1(&q.data().unwrap()).unwrap();
        assert_eq!(q4_1.len(), rows * cols / 32 * Q4_1_BLOCK_BYTES);
        let got = dequantize_q4_1(&q4_1);
        assert_eq!(got.len(), want.len());
        // Rounding d' and m' to f16 moves a weight d'·q + m' by at most 2^-11 (15|d'| + |m'|)
        // (twice that allowed); a misplaced nibble moves it by whole steps of d'.
        for (block, ((g, w), b)) in got
            .chunks(32)
            .zip(want.chunks(32))
            .zip(q4_1.chunks_exact(Q4_1_BLOCK_BYTES))
            .enumerate()
        {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32().abs();
            let m = f16::from_le_bytes([b[2], b[3]]).to_f32().abs();
            let bound = (15.0 * d + m) * 2f32.powi(-10);
            for (e, (a, b)) in g.iter().zip(w).enumerate() {
                assert!(
                    (a - b).abs() <= bound,
                    "block {block}, weight {e}: {a} against {b} (bound {bound})"
                );
            }
        }
    }

    #[test]
    fn bytes_that_are_not_whole_blocks_are_refused() {
        assert!(q4k_to_q4_1(&[0u8; Q4K_BLOCK_BYTES + 1]).is_none());
        assert_eq!(q4k_to_q4_1(&[]).unwrap().len(), 0);
        assert!(q6k_to_blocks(&[0u8; Q6K_BLOCK_BYTES - 1]).is_none());
        assert_eq!(q6k_to_blocks(&[]).unwrap().len(), 0);
        assert!(q5k_to_blocks(&[0u8; Q5K_BLOCK_BYTES + 3]).is_none());
        assert_eq!(q5k_to_blocks(&[]).unwrap().len(), 0);
    }

    /// Weights of several spreads and offsets, so that scales and mins use their bits.
    fn spread_values(n: usize, mut seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let u = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                u * [0.01, 0.5, 3.0, 0.05][i / 16 % 4] + if i % 3 == 0 { 0.1 } else { -0.05 }
            })
            .collect()
    }

    /// A `[rows, cols]` tensor of [`spread_values`] quantized to `dtype` by candle (as ggml
    /// does), and ggml's dequantization of it.
    fn quantized(dtype: GgmlDType, rows: usize, cols: usize) -> (QTensor, Vec<f32>) {
        let values = spread_values(rows * cols, 0x9E37_79B9);
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let want = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (q, want)
    }

    /// A K-quant tensor (quantized by candle, as ggml does) converted by `convert` into
    /// `format` blocks and read back through the block matrix: every weight must equal ggml's
    /// own dequantization of the file. ggml rounds `(d·sc)·q` where the blocks round
    /// `d·(sc·q)`: the same exact product (an f16 times a small integer is exact in f32).
    fn assert_exact(
        dtype: GgmlDType,
        convert: fn(&[u8]) -> Option<Vec<u8>>,
        format: crate::cpu::qmatmul::BlockFormat,
        piece_bytes: usize,
    ) {
        use crate::cpu::qmatmul::{BlockMatrix, Layout};
        let (rows, cols) = (20, 768);
        let (q, want) = quantized(dtype, rows, cols);
        let blocks = convert(&q.data().unwrap()).unwrap();
        assert_eq!(blocks.len(), rows * cols / 32 * piece_bytes);
        let w = BlockMatrix::with_layout(format, rows, cols, &blocks, Layout::Tiles).unwrap();
        let mut row = vec![0f32; cols];
        let mut distinct = std::collections::BTreeSet::new();
        for r in 0..rows {
            w.dequantize_row(r, &mut row);
            for (c, (&got, &want)) in row.iter().zip(&want[r * cols..]).enumerate() {
                // Equal as numbers: a zero weight's sign follows `d` here and `d·sc` there.
                assert!(
                    got == want,
                    "{dtype:?} row {r}, weight {c}: {got} against {want}"
                );
                distinct.insert(want.to_bits());
            }
        }
        assert!(
            distinct.len() > 1000,
            "{dtype:?}: too few distinct weights to test"
        );
    }

    #[test]
    fn q6k_and_q5k_blocks_keep_every_weight_exactly() {
        use crate::cpu::qmatmul::BlockFormat;
        assert_exact(
            GgmlDType::Q6K,
            q6k_to_blocks,
            BlockFormat::Q6K,
            Q6K_PIECE_BYTES,
        );
        assert_exact(
            GgmlDType::Q5K,
            q5k_to_blocks,
            BlockFormat::Q5K,
            Q5K_PIECE_BYTES,
        );
    }
}
