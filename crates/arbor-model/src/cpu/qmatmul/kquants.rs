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
//! - **Every other K-quant becomes Q8_0** (dequantized, then quantized per 32 weights, as Q5_0
//!   and Q5_1 are): 8 bits hold 2- to 6-bit values with room to spare (for Q6_K the added
//!   rounding is at most an eighth of its own step).
//!
//! Q4_K's block, as ggml writes it (144 bytes):
//! ```text
//!   d:f16 dmin:f16 | scales[12]: 8 six-bit scales and 8 six-bit mins | qs[128]
//!   weights 64c..64c+32: low nibbles of qs[32c..32c+32]; 64c+32..64c+64: their high nibbles
//! ```

use half::f16;

/// Weights per K-quant super-block.
const QK_K: usize = 256;
const Q4K_BLOCK_BYTES: usize = 144;
const Q4_1_BLOCK_BYTES: usize = 20;

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
        // Weights of several spreads and offsets, so scales and mins use their 6 bits.
        let (rows, cols) = (6, 512);
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let u = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                let spread = [0.02, 0.3, 1.0, 4.0][i / 64 % 4];
                u * spread + if i % 3 == 0 { 0.1 } else { -0.05 }
            })
            .collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q4K).unwrap();
        let want = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
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
    }
}
