//! Linear layers whose kernel is picked per call by the number of rows.
//!
//! Measured on the 2-core development machine (shared/cpu/README.md): prefill is matrix-matrix
//! work, and dequantized f32 weights through candle's GEMM beat quantized dot products by 2-15x;
//! decode is matrix-vector work bound by memory traffic, where fewer bytes per weight win and
//! Q8_0/Q4_0 (AVX2 dot products in candle) are twice as fast as f32. candle 0.11's Q4_1, Q5_0 and
//! Q5_1 dot products are scalar loops, so those weights are re-quantized to Q8_0 for decode
//! (more bits than the source: the re-quantization error is far below the source's own).
//!
//! A [`Linear`] therefore keeps up to two copies of its weight: `quant` for few rows and `dense`
//! for many. The dense copy costs 4 bytes per weight, so [`WeightPolicy`] drops it for models too
//! large to afford it.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::Result;

/// Below this many rows a matmul runs on the quantized weights; from it on, on the dense copy.
/// Quantized matmul re-reads the weights for every row, GEMM reads them once: the cross-over
/// on the development machine lies between 4 and 16 rows.
pub const DENSE_MIN_ROWS: usize = 8;

#[derive(Debug, Clone, Copy)]
pub struct WeightPolicy {
    /// Keep a dequantized f32 copy of quantized weights for prefill.
    pub dense_prefill: bool,
}

#[derive(Debug, Clone)]
pub struct Linear {
    quant: Option<QMatMul>,
    /// `[out, in]` f32.
    dense: Option<Tensor>,
    bias: Option<Tensor>,
    pub in_dim: usize,
    pub out_dim: usize,
}

fn has_fast_cpu_dot(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

impl Linear {
    /// From a dense weight `[out, in]` (any float dtype; kept as f32).
    pub fn from_dense(w: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = w.dims2()?;
        Ok(Self {
            quant: None,
            dense: Some(w.to_dtype(DType::F32)?.contiguous()?),
            bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
            in_dim,
            out_dim,
        })
    }

    /// From a GGUF tensor of shape `[out, in]`.
    pub fn from_qtensor(q: QTensor, bias: Option<Tensor>, policy: WeightPolicy, device: &Device) -> Result<Self> {
        let (out_dim, in_dim) = q.shape().dims2()?;
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        let dtype = q.dtype();
        if matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return Self::from_dense(q.dequantize(device)?, bias);
        }
        let dense = if policy.dense_prefill {
            Some(q.dequantize(device)?)
        } else {
            None
        };
        let quant = if has_fast_cpu_dot(dtype) || !in_dim.is_multiple_of(32) {
            QMatMul::from_qtensor(q)?
        } else {
            let f32_weights = match &dense {
                Some(d) => d.clone(),
                None => q.dequantize(device)?,
            };
            QMatMul::from_qtensor(QTensor::quantize(&f32_weights, GgmlDType::Q8_0)?)?
        };
        Ok(Self {
            quant: Some(quant),
            dense,
            bias,
            in_dim,
            out_dim,
        })
    }

    /// `x: [m, in]` -> `[m, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let y = match (&self.quant, &self.dense) {
            (Some(q), Some(_)) if rows < DENSE_MIN_ROWS => q.forward(x)?,
            (_, Some(w)) => x.matmul(&w.t()?)?,
            (Some(q), None) => q.forward(x)?,
            (None, None) => unreachable!("a Linear is always built with at least one weight copy"),
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Never keep dense copies larger than this, whatever the free memory.
const DENSE_COPY_MAX_BYTES: u64 = 8 << 30;

impl WeightPolicy {
    /// Dense prefill copies when they fit comfortably: at most a third of the available memory
    /// and at most 8 GiB (a 135M model's copy is 0.5 GB; a 7B model's would be 28 GB).
    pub fn auto(config: &crate::config::ModelConfig) -> Self {
        let h = config.hidden_size as u64;
        let per_layer = h * (2 * config.q_dim() as u64 + 2 * config.kv_dim() as u64)
            + 3 * h * config.intermediate_size as u64;
        let params = config.num_layers as u64 * per_layer + config.vocab_size as u64 * h;
        let dense_bytes = params * 4;
        let budget = available_memory_bytes().map_or(DENSE_COPY_MAX_BYTES, |m| (m / 3).min(DENSE_COPY_MAX_BYTES));
        let dense_prefill = dense_bytes <= budget;
        tracing::debug!(dense_bytes, budget, dense_prefill, "dense prefill weights");
        Self { dense_prefill }
    }
}

/// `MemAvailable` from /proc/meminfo (Linux); `None` elsewhere.
pub fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
