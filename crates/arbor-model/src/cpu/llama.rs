//! The Llama-family decoder (Llama 2/3, Mistral, SmolLM, Qwen2) and its batched forward step.
//!
//! One [`Llama::forward`] call runs any mix of sequences: prefill chunks of any length next to
//! single-token decodes. The new tokens of all sequences are flattened into one `[T, hidden]`
//! matrix, so every linear layer is a single matmul for the whole step; only attention looks at
//! sequence boundaries, through each sequence's slot list.

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::cpu::attention::{attention, AttnSeq, AttnShape};
use crate::cpu::kv_pool::KvPool;
use crate::cpu::linear::{FusedLinear, Linear};
use crate::error::Result;
use crate::rope::Rope;
use crate::step::{FlatStep, SeqStep};

#[derive(Debug)]
pub enum Embedding {
    /// GGUF rows, dequantized on lookup (exact, and no f32 copy of a large vocabulary). Boxed:
    /// a QTensor is several times a Tensor's size in CUDA builds.
    Quantized(Box<QTensor>),
    /// `[vocab, hidden]` f32.
    Dense(Tensor),
}

impl Embedding {
    fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Embedding::Quantized(q) => q.embedding(ids)?,
            Embedding::Dense(t) => t.index_select(ids, 0)?,
        })
    }

    pub fn rows(&self) -> Result<usize> {
        Ok(match self {
            Embedding::Quantized(q) => q.shape().dims2()?.0,
            Embedding::Dense(t) => t.dims2()?.0,
        })
    }
}

#[derive(Debug)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    /// Q, K and V projections.
    pub qkv: FusedLinear,
    pub wo: Linear,
    pub ffn_norm: Vec<f32>,
    /// Gate and up projections of the SwiGLU MLP.
    pub gate_up: FusedLinear,
    pub w_down: Linear,
}

#[derive(Debug)]
pub struct Llama {
    pub config: ModelConfig,
    pub embedding: Embedding,
    pub layers: Vec<Layer>,
    pub final_norm: Vec<f32>,
    pub lm_head: Linear,
    rope: Rope,
    device: Device,
}

impl Llama {
    pub fn new(
        config: ModelConfig,
        embedding: Embedding,
        layers: Vec<Layer>,
        final_norm: Vec<f32>,
        lm_head: Linear,
        device: Device,
    ) -> Result<Self> {
        config.validate()?;
        let rope = Rope::new(&config);
        Ok(Self {
            config,
            embedding,
            layers,
            final_norm,
            lm_head,
            rope,
            device,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs one step and returns the requested logit rows, sequence by sequence in batch order.
    pub fn forward(&self, batch: &[SeqStep], kv: &mut KvPool) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.config;
        let FlatStep {
            tokens,
            positions,
            new_slots,
            logit_rows,
        } = FlatStep::gather(batch, cfg, kv.num_slots())?;
        let mut row_offset = 0;
        let attn_seqs: Vec<AttnSeq> = batch
            .iter()
            .map(|s| {
                let seq = AttnSeq {
                    row_offset,
                    n_new: s.tokens.len(),
                    slots: s.slots,
                };
                row_offset += s.tokens.len();
                seq
            })
            .collect();
        let n_tokens = tokens.len();
        if n_tokens == 0 {
            return Ok(Vec::new());
        }
        let shape = AttnShape {
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        };
        let rope_tables = self.rope.tables(&positions);
        let ids = Tensor::from_vec(tokens, n_tokens, &self.device)?;
        let mut x = self
            .embedding
            .lookup(&ids)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut h = vec![0f32; x.len()];
        let mut attn_out = vec![0f32; n_tokens * cfg.q_dim()];
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, cfg.rms_norm_eps, &mut h);
            let mut qkv = layer.qkv.forward_vec(&h, n_tokens)?;
            let v = qkv.pop().expect("three projections");
            let mut k = qkv.pop().expect("three projections");
            let mut q = qkv.pop().expect("three projections");
            self.rope.apply(&mut q, cfg.num_heads, &rope_tables);
            self.rope.apply(&mut k, cfg.num_kv_heads, &rope_tables);
            kv.write(l, &new_slots, &k, &v);
            let pool = kv.layer(l);
            attention(&q, &pool.k, &pool.v, &attn_seqs, shape, &mut attn_out);
            add_assign(&mut x, &layer.wo.forward_vec(&attn_out, n_tokens)?);
            rms_norm(&x, &layer.ffn_norm, cfg.rms_norm_eps, &mut h);
            let mut gate_up = layer.gate_up.forward_vec(&h, n_tokens)?;
            let up = gate_up.pop().expect("two projections");
            let mut act = gate_up.pop().expect("two projections");
            act.iter_mut()
                .zip(&up)
                .for_each(|(g, u)| *g = crate::cpu::fastmath::silu(*g) * u);
            add_assign(&mut x, &layer.w_down.forward_vec(&act, n_tokens)?);
        }
        if logit_rows.is_empty() {
            return Ok(Vec::new());
        }
        let hd = cfg.hidden_size;
        let last: Vec<f32> = logit_rows
            .iter()
            .flat_map(|&r| x[r as usize * hd..(r as usize + 1) * hd].iter().copied())
            .collect();
        let mut normed = vec![0f32; last.len()];
        rms_norm(&last, &self.final_norm, cfg.rms_norm_eps, &mut normed);
        let logits = self.lm_head.forward_vec(&normed, logit_rows.len())?;
        Ok(logits
            .chunks_exact(self.lm_head.out_dim)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

/// RMSNorm of each row, computed like ggml's `rms_norm` + `mul`: the sum of squares in f64,
/// `x * (1 / sqrt(mean + eps))`, then times the weight. (Dividing by the root instead differs
/// in the last bit, and the next matmul's 8-bit activation rounding can turn a last-bit
/// difference into a visible one.)
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for (row, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = (v * scale) * w;
        }
    }
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}
