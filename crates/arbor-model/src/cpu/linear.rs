//! Linear layers, with the kernel chosen by weight format.
//!
//! - Q4_0, Q4_1, Q8_0 (and Q5_0/Q5_1, re-quantized to Q8_0 at load): Arbor's batch-invariant
//!   block kernel ([`crate::cpu::qmatmul`]), the same arithmetic as llama.cpp, for prefill and
//!   decode alike. candle 0.11's Q4_1/Q5_x dot products are scalar loops (shared/cpu/README.md).
//! - K-quants: the same block kernel, Q4_K as Q4_1 blocks of the same 4-bit values, Q5_K and
//!   Q6_K as Q5K and Q6K blocks of the same values and scales (under `--cpu-kernels ggml`, Q8_0),
//!   Q2_K and Q3_K re-quantized to Q8_0 ([`crate::cpu::qmatmul::kquants`]). candle's K-quant kernels
//!   are not batch-invariant (Q6_K switches to a repacked kernel for several rows), which
//!   would let the prefix cache change a K-quant model's outputs in the last bits.
//! - Anything else GGUF holds: candle's quantized matmul.
//! - F32/F16/BF16 (Hugging Face folders): f32 weights through Arbor's batch-invariant dense
//!   kernel ([`crate::cpu::dense`]).
//!
//! Why not dequantized f32 weights through a GEMM for prefill, which measured 2x faster than
//! candle's quantized matmul? Because a token's K/V would then depend on whether it went
//! through prefill or decode, and in which chunk: the prefix cache could change outputs. One
//! kernel for every row keeps outputs identical with the cache on or off, whatever the batch.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::cpu::dense::DenseMatrix;
use crate::cpu::qmatmul::{kquants, BlockFormat, BlockMatrix, Layout};
use crate::error::Result;

#[derive(Debug, Clone)]
enum Kernel {
    Blocks(BlockMatrix),
    Candle(QMatMul),
    Dense(DenseMatrix),
}

#[derive(Debug, Clone)]
pub struct Linear {
    kernel: Kernel,
    bias: Option<Tensor>,
    pub in_dim: usize,
    pub out_dim: usize,
}

impl Linear {
    /// From a dense weight `[out, in]` (any float dtype; kept as f32).
    pub fn from_dense(w: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = w.dims2()?;
        let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self {
            kernel: Kernel::Dense(DenseMatrix::new(out_dim, in_dim, data)),
            bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
            in_dim,
            out_dim,
        })
    }

    /// From a GGUF tensor of shape `[out, in]`.
    pub fn from_qtensor(q: QTensor, bias: Option<Tensor>, device: &Device) -> Result<Self> {
        let (out_dim, in_dim) = q.shape().dims2()?;
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        let blocks = |format: BlockFormat, q: &QTensor| -> Result<Option<BlockMatrix>> {
            Ok(BlockMatrix::from_gguf_bytes(
                format,
                out_dim,
                in_dim,
                &q.data()?,
            ))
        };
        let kernel = match q.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                return Self::from_dense(q.dequantize(device)?, bias);
            }
            GgmlDType::Q4_0 => blocks(BlockFormat::Q4_0, &q)?.map(Kernel::Blocks),
            GgmlDType::Q4_1 => blocks(BlockFormat::Q4_1, &q)?.map(Kernel::Blocks),
            GgmlDType::Q8_0 => blocks(BlockFormat::Q8_0, &q)?.map(Kernel::Blocks),
            // The same 4-bit values in Q4_1 blocks (crate::cpu::qmatmul::kquants).
            GgmlDType::Q4K => kquants::q4k_to_q4_1(&q.data()?)
                .and_then(|b| BlockMatrix::from_gguf_bytes(BlockFormat::Q4_1, out_dim, in_dim, &b))
                .map(Kernel::Blocks),
            // Every weight as the file has it, in 32-weight blocks (tiled kernels only).
            GgmlDType::Q6K | GgmlDType::Q5K if Layout::selected() == Layout::Tiles => {
                let (format, converted) = if q.dtype() == GgmlDType::Q6K {
                    (BlockFormat::Q6K, kquants::q6k_to_blocks(&q.data()?))
                } else {
                    (BlockFormat::Q5K, kquants::q5k_to_blocks(&q.data()?))
                };
                converted
                    .and_then(|b| BlockMatrix::from_gguf_bytes(format, out_dim, in_dim, &b))
                    .map(Kernel::Blocks)
            }
            GgmlDType::Q5_0
            | GgmlDType::Q5_1
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
            | GgmlDType::Q8K => {
                // 8 bits hold 2- to 6-bit values with room to spare: the re-quantization error
                // is far below the source's own.
                let q8 = QTensor::quantize(&q.dequantize(device)?, GgmlDType::Q8_0)?;
                blocks(BlockFormat::Q8_0, &q8)?.map(Kernel::Blocks)
            }
            _ => None,
        }
        .unwrap_or(Kernel::Candle(QMatMul::from_qtensor(q)?));
        Ok(Self {
            kernel,
            bias,
            in_dim,
            out_dim,
        })
    }

    /// `x: [m, in]` row-major -> `[m, out]`.
    pub fn forward_vec(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let mut y = match &self.kernel {
            Kernel::Blocks(w) => w.matmul(x, m),
            Kernel::Dense(w) => w.matmul(x, m),
            Kernel::Candle(q) => {
                let t = Tensor::from_slice(x, (m, self.in_dim), &Device::Cpu)?;
                q.forward(&t)?.flatten_all()?.to_vec1::<f32>()?
            }
        };
        if let Some(b) = &self.bias {
            let b = b.to_vec1::<f32>()?;
            for row in y.chunks_exact_mut(self.out_dim) {
                row.iter_mut().zip(&b).for_each(|(v, b)| *v += b);
            }
        }
        Ok(y)
    }
}

/// Several projections of the same input (Q, K, V; gate, up) run as one matmul when their
/// weights share a block format, saving a pass over the input and a parallel dispatch per layer.
#[derive(Debug, Clone)]
pub struct FusedLinear {
    parts: Vec<Linear>,
    fused: Option<Linear>,
}

impl FusedLinear {
    pub fn new(parts: Vec<Linear>) -> Self {
        let blocks: Option<Vec<&BlockMatrix>> = parts
            .iter()
            .map(|p| match &p.kernel {
                Kernel::Blocks(b) => Some(b),
                _ => None,
            })
            .collect();
        let fused = blocks.and_then(|b| BlockMatrix::concat_rows(&b)).map(|w| {
            let biases: Option<Vec<Tensor>> = parts.iter().map(|p| p.bias.clone()).collect();
            Linear {
                in_dim: w.cols(),
                out_dim: w.rows(),
                kernel: Kernel::Blocks(w),
                // All or none of the parts have biases (Qwen2's Q/K/V).
                bias: biases.and_then(|b| Tensor::cat(&b, 0).ok()),
            }
        });
        Self { parts, fused }
    }

    /// Returns `[m, Σ out_i]` row-major, the parts side by side in each row, and the parts'
    /// widths: the fused matmul's output as it is, without a copy per part.
    pub fn forward_joined(&self, x: &[f32], m: usize) -> Result<(Vec<f32>, Vec<usize>)> {
        let widths: Vec<usize> = self.parts.iter().map(|p| p.out_dim).collect();
        match &self.fused {
            Some(f) => Ok((f.forward_vec(x, m)?, widths)),
            None => {
                let outs = self.forward_vec(x, m)?;
                let mut y = Vec::with_capacity(m * widths.iter().sum::<usize>());
                for r in 0..m {
                    for (o, w) in outs.iter().zip(&widths) {
                        y.extend_from_slice(&o[r * w..(r + 1) * w]);
                    }
                }
                Ok((y, widths))
            }
        }
    }

    /// Returns one `[m, out_i]` row-major block per part.
    pub fn forward_vec(&self, x: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
        match &self.fused {
            None => self.parts.iter().map(|p| p.forward_vec(x, m)).collect(),
            Some(f) => {
                let y = f.forward_vec(x, m)?;
                let mut outs: Vec<Vec<f32>> = self
                    .parts
                    .iter()
                    .map(|p| Vec::with_capacity(m * p.out_dim))
                    .collect();
                for row in y.chunks_exact(f.out_dim) {
                    let mut off = 0;
                    for (o, p) in outs.iter_mut().zip(&self.parts) {
                        o.extend_from_slice(&row[off..off + p.out_dim]);
                        off += p.out_dim;
                    }
                }
                Ok(outs)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pseudo-random values in [-1, 1).
    fn values(n: usize, mut seed: u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// A K-quant layer gives a row the same output bits alone and inside a batch (so a prompt's
    /// K/V does not depend on its chunking or neighbours, and the prefix cache never changes an
    /// output), and stays close to its dequantized weights.
    #[test]
    fn k_quant_layers_are_batch_invariant_and_close_to_their_weights() {
        let (out_dim, in_dim, batch) = (64, 512, 5);
        let w =
            Tensor::from_vec(values(out_dim * in_dim, 7), (out_dim, in_dim), &Device::Cpu).unwrap();
        let x = values(batch * in_dim, 11);
        for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let dense = Linear::from_dense(q.dequantize(&Device::Cpu).unwrap(), None).unwrap();
            let layer = Linear::from_qtensor(q, None, &Device::Cpu).unwrap();
            assert!(matches!(layer.kernel, Kernel::Blocks(_)), "{dtype:?}");
            let together = layer.forward_vec(&x, batch).unwrap();
            let reference = dense.forward_vec(&x, batch).unwrap();
            let scale = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
            for r in 0..batch {
                let alone = layer
                    .forward_vec(&x[r * in_dim..(r + 1) * in_dim], 1)
                    .unwrap();
                let row = &together[r * out_dim..(r + 1) * out_dim];
                assert_eq!(alone, row, "{dtype:?}, row {r}: alone against batched");
                // The activations' 8-bit quantization moves each output by a fraction of a
                // percent of the largest.
                for (a, b) in row.iter().zip(&reference[r * out_dim..(r + 1) * out_dim]) {
                    assert!((a - b).abs() <= 0.01 * scale, "{dtype:?}: {a} against {b}");
                }
            }
        }
    }
}
