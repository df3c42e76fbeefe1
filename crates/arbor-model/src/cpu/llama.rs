//! The Llama-family decoder (Llama 2/3, Mistral, SmolLM, Qwen2) and its batched forward step.
//!
//! One [`Llama::forward`] call runs any mix of sequences: prefill chunks of any length next to
//! single-token decodes. The new tokens of all sequences are flattened into one `[T, hidden]`
//! matrix, so every linear layer is a single matmul for the whole step; only attention looks at
//! sequence boundaries, through each sequence's slot list.
//!
//! A model may be one rank's [`Shard`] of a tensor-parallel group (built by
//! `cpu::load::build_shards`): it then holds its heads, MLP columns and vocabulary rows only,
//! and [`Llama::forward_shard`] sums the partial hidden states over the group through an
//! [`AllReduce`] after the embedding and the O and down projections (see [`crate::parallel`]).

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::cpu::attention::{attention, AttnSeq, AttnShape};
use crate::cpu::kv_pool::KvPool;
use crate::cpu::linear::{FusedLinear, Linear};
use crate::error::{ModelError, Result};
use crate::parallel::{AllReduce, Shard};
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
    /// `[ids.len(), hidden]` rows; `ids` index this embedding's own rows.
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
    /// The whole model's shape (a shard's own widths are in `shard`).
    pub config: ModelConfig,
    /// What this model holds of the whole: all of it, or one tensor-parallel rank's part.
    pub shard: Shard,
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
        shard: Shard,
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
            shard,
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

    /// A KV pool of `slots` slots for this model (a shard's pool holds its own KV heads).
    pub fn new_kv_pool(&self, slots: usize) -> KvPool {
        KvPool::with_dims(
            self.config.num_layers,
            self.shard.kv_dim(&self.config),
            slots,
        )
    }

    /// Runs one step and returns the requested logit rows, sequence by sequence in batch order.
    /// The whole model only: a tensor-parallel shard runs through [`Llama::forward_shard`].
    pub fn forward(&self, batch: &[SeqStep], kv: &mut KvPool) -> Result<Vec<Vec<f32>>> {
        if !self.shard.is_whole() {
            return Err(ModelError::RankFailed(format!(
                "rank {} of {} runs only with its group's all-reduce",
                self.shard.rank, self.shard.size
            )));
        }
        self.run(batch, kv, None)
    }

    /// One rank's part of a tensor-parallel step: every rank of the group calls it with the
    /// same batch, at the same time, over its own KV pool. Returns the rank's slice of each
    /// requested logit row (its vocabulary rows, `shard.vocab`); the caller joins the slices.
    pub fn forward_shard(
        &self,
        batch: &[SeqStep],
        kv: &mut KvPool,
        group: &dyn AllReduce,
    ) -> Result<Vec<Vec<f32>>> {
        self.run(batch, kv, Some(group))
    }

    fn run(
        &self,
        batch: &[SeqStep],
        kv: &mut KvPool,
        group: Option<&dyn AllReduce>,
    ) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.config;
        let shard = &self.shard;
        // Sums a row-parallel partial result over the group (nothing to sum on one rank).
        let reduce = |buf: &mut [f32]| match group {
            Some(g) => g.sum(shard.rank, buf),
            None => Ok(()),
        };
        debug_assert_eq!(
            kv.kv_dim(),
            shard.kv_dim(cfg),
            "a pool of this shard's width"
        );
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
        let (heads, kv_heads) = (shard.num_heads(), shard.num_kv_heads());
        let shape = AttnShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: cfg.head_dim,
        };
        let rope_tables = self.rope.tables(&positions);
        let mut x = self.embed(&tokens)?;
        if !shard.is_whole() {
            // Each token's row came from the one rank that holds it; the others gave zeros.
            reduce(&mut x)?;
        }
        let mut h = vec![0f32; x.len()];
        let mut attn_out = vec![0f32; n_tokens * shard.q_dim(cfg)];
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, cfg.rms_norm_eps, &mut h);
            let mut qkv = layer.qkv.forward_vec(&h, n_tokens)?;
            let v = qkv.pop().expect("three projections");
            let mut k = qkv.pop().expect("three projections");
            let mut q = qkv.pop().expect("three projections");
            self.rope.apply(&mut q, heads, &rope_tables);
            self.rope.apply(&mut k, kv_heads, &rope_tables);
            kv.write(l, &new_slots, &k, &v);
            let pool = kv.layer(l);
            attention(&q, &pool.k, &pool.v, &attn_seqs, shape, &mut attn_out);
            let mut o = layer.wo.forward_vec(&attn_out, n_tokens)?;
            reduce(&mut o)?;
            add_assign(&mut x, &o, cfg.hidden_size);
            rms_norm(&x, &layer.ffn_norm, cfg.rms_norm_eps, &mut h);
            let act = swiglu(&layer.gate_up, &h, n_tokens)?;
            let mut down = layer.w_down.forward_vec(&act, n_tokens)?;
            reduce(&mut down)?;
            add_assign(&mut x, &down, cfg.hidden_size);
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

impl Llama {
    /// The embedding rows of `tokens`, `[tokens.len(), hidden]`. A shard holds its
    /// vocabulary rows only: other tokens get zero rows (the group's sum fills them in).
    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        if self.shard.is_whole() {
            let ids = Tensor::from_slice(tokens, tokens.len(), &self.device)?;
            return Ok(self
                .embedding
                .lookup(&ids)?
                .flatten_all()?
                .to_vec1::<f32>()?);
        }
        let vocab = &self.shard.vocab;
        let held = |t: u32| vocab.contains(&(t as usize));
        let local: Vec<u32> = tokens
            .iter()
            .map(|&t| if held(t) { t - vocab.start as u32 } else { 0 })
            .collect();
        let ids = Tensor::from_vec(local, tokens.len(), &self.device)?;
        let mut x = self
            .embedding
            .lookup(&ids)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let hd = self.config.hidden_size;
        for (row, &t) in x.chunks_exact_mut(hd).zip(tokens) {
            if !held(t) {
                row.fill(0.0);
            }
        }
        Ok(x)
    }
}

/// Rows per parallel task of the element-wise steps (RMSNorm, SwiGLU, residual adds); a step
/// with fewer than two tasks' worth (a decode) runs on the calling thread. Each row is
/// computed the same way either way.
const ROWS_PER_TASK: usize = 16;

/// `f(row_index, out_row)` over the rows (`width` wide) of `out`, in parallel for many rows.
fn for_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if out.len() >= 2 * ROWS_PER_TASK * width {
        out.par_chunks_mut(ROWS_PER_TASK * width)
            .enumerate()
            .for_each(|(task, rows)| {
                for (i, row) in rows.chunks_exact_mut(width).enumerate() {
                    f(task * ROWS_PER_TASK + i, row);
                }
            });
    } else {
        for (i, row) in out.chunks_exact_mut(width).enumerate() {
            f(i, row);
        }
    }
}

/// RMSNorm of each row, computed like ggml's `rms_norm` + `mul`: the sum of squares in f64,
/// `x * (1 / sqrt(mean + eps))`, then times the weight. (Dividing by the root instead differs
/// in the last bit, and the next matmul's 8-bit activation rounding can turn a last-bit
/// difference into a visible one.)
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for_rows(out, n, |r, o| {
        let row = &x[r * n..(r + 1) * n];
        let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = (v * scale) * w;
        }
    });
}

/// The SwiGLU activation `silu(gate) * up`, `[rows, intermediate]`, from the gate and up
/// projections of `h` computed as one matmul (read in place, not split into two copies).
fn swiglu(gate_up: &FusedLinear, h: &[f32], n_tokens: usize) -> Result<Vec<f32>> {
    let (y, widths) = gate_up.forward_joined(h, n_tokens)?;
    let inter = widths[0];
    assert_eq!(widths, [inter, inter], "gate and up of one width");
    let mut act = vec![0f32; n_tokens * inter];
    for_rows(&mut act, inter, |r, a| {
        let (gate, up) = y[r * 2 * inter..(r + 1) * 2 * inter].split_at(inter);
        for ((a, g), u) in a.iter_mut().zip(gate).zip(up) {
            *a = crate::cpu::fastmath::silu(*g) * u;
        }
    });
    Ok(act)
}

/// `x += y` over rows of `width`.
fn add_assign(x: &mut [f32], y: &[f32], width: usize) {
    for_rows(x, width, |r, row| {
        let src = &y[r * width..(r + 1) * width];
        row.iter_mut().zip(src).for_each(|(a, b)| *a += b);
    });
}
