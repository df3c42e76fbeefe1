//! Model files: GGUF ([`gguf`]) and Hugging Face folders ([`hf`]): their configuration,
//! tokenizer, chat template and tensors.
//!
//! Backends build their layers from a [`WeightSource`]: a tensor is asked for by its role in
//! the model ([`Weight`]), whatever the file calls it; [`TENSOR_NAMES`] is the one table of
//! names per file format. Each source hands tensors over as stored ([`Stored`]: GGUF block
//! formats stay quantized), shape-checked; each backend decides what to make of them (the CPU
//! keeps GGUF blocks for its batch-invariant kernels, the GPU makes bf16 or keeps blocks).
//! [`shard`] cuts them for tensor-parallel ranks.

pub mod gguf;
pub mod hf;
pub mod shard;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// A tensor of one decoder layer, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerWeight {
    AttnNorm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

/// A tensor of a Llama-family model, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weight {
    TokenEmbedding,
    FinalNorm,
    /// The output projection (absent when `tie_word_embeddings`: the embedding serves).
    LmHead,
    Layer(usize, LayerWeight),
}

/// Per layer tensor: its Hugging Face name and its GGUF name (after `model.layers.{i}.` and
/// `blk.{i}.`).
pub const TENSOR_NAMES: [(LayerWeight, &str, &str); 12] = [
    (
        LayerWeight::AttnNorm,
        "input_layernorm.weight",
        "attn_norm.weight",
    ),
    (LayerWeight::Q, "self_attn.q_proj.weight", "attn_q.weight"),
    (LayerWeight::K, "self_attn.k_proj.weight", "attn_k.weight"),
    (LayerWeight::V, "self_attn.v_proj.weight", "attn_v.weight"),
    (LayerWeight::QBias, "self_attn.q_proj.bias", "attn_q.bias"),
    (LayerWeight::KBias, "self_attn.k_proj.bias", "attn_k.bias"),
    (LayerWeight::VBias, "self_attn.v_proj.bias", "attn_v.bias"),
    (
        LayerWeight::O,
        "self_attn.o_proj.weight",
        "attn_output.weight",
    ),
    (
        LayerWeight::FfnNorm,
        "post_attention_layernorm.weight",
        "ffn_norm.weight",
    ),
    (LayerWeight::Gate, "mlp.gate_proj.weight", "ffn_gate.weight"),
    (LayerWeight::Up, "mlp.up_proj.weight", "ffn_up.weight"),
    (LayerWeight::Down, "mlp.down_proj.weight", "ffn_down.weight"),
];

fn layer_names(w: LayerWeight) -> (&'static str, &'static str) {
    let (_, hf, gguf) = TENSOR_NAMES
        .iter()
        .find(|(role, _, _)| *role == w)
        .expect("every layer weight is in the table");
    (hf, gguf)
}

impl Weight {
    pub fn hf_name(self) -> String {
        match self {
            Weight::TokenEmbedding => "model.embed_tokens.weight".into(),
            Weight::FinalNorm => "model.norm.weight".into(),
            Weight::LmHead => "lm_head.weight".into(),
            Weight::Layer(i, w) => format!("model.layers.{i}.{}", layer_names(w).0),
        }
    }

    pub fn gguf_name(self) -> String {
        match self {
            Weight::TokenEmbedding => "token_embd.weight".into(),
            Weight::FinalNorm => "output_norm.weight".into(),
            Weight::LmHead => "output.weight".into(),
            Weight::Layer(i, w) => format!("blk.{i}.{}", layer_names(w).1),
        }
    }

    /// Its shape in a model of `c`'s shape (`[out, in]` for a linear layer's weight).
    pub fn shape(self, c: &ModelConfig) -> Vec<usize> {
        let (h, q, kv, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        match self {
            Weight::TokenEmbedding | Weight::LmHead => vec![c.vocab_size, h],
            Weight::FinalNorm => vec![h],
            Weight::Layer(_, w) => match w {
                LayerWeight::AttnNorm | LayerWeight::FfnNorm => vec![h],
                LayerWeight::Q => vec![q, h],
                LayerWeight::K | LayerWeight::V => vec![kv, h],
                LayerWeight::QBias => vec![q],
                LayerWeight::KBias | LayerWeight::VBias => vec![kv],
                LayerWeight::O => vec![h, q],
                LayerWeight::Gate | LayerWeight::Up => vec![ffn, h],
                LayerWeight::Down => vec![h, ffn],
            },
        }
    }
}

/// A tensor as its file stores it.
// One tensor at a time lives in this enum during loading: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Stored {
    /// GGUF: any of its formats, block-quantized or float.
    Quantized(QTensor),
    /// Safetensors (or made up): a dense tensor in its stored dtype.
    Dense(Tensor),
}

impl Stored {
    pub fn dims(&self) -> &[usize] {
        match self {
            Stored::Quantized(q) => q.shape().dims(),
            Stored::Dense(t) => t.dims(),
        }
    }

    /// The values as a dense tensor of `dtype` (GGUF blocks dequantized on `device`).
    pub fn to_dense(self, dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Stored::Quantized(q) => q.dequantize(device)?.to_dtype(dtype)?,
            Stored::Dense(t) => t.to_dtype(dtype)?,
        })
    }
}

/// Where a backend reads a model's tensors.
pub trait WeightSource {
    fn config(&self) -> &ModelConfig;
    /// `w` as stored, its shape checked against the config.
    fn get(&mut self, w: Weight) -> Result<Stored>;
}

/// `t`'s shape against `w`'s in a model of `config`'s shape, naming the tensor by `name`.
pub(crate) fn check_shape(
    t: Stored,
    w: Weight,
    name: &str,
    config: &ModelConfig,
) -> Result<Stored> {
    let expected = w.shape(config);
    if t.dims() != expected {
        return Err(ModelError::BadShape {
            name: name.into(),
            actual: t.dims().to_vec(),
            expected,
        });
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layer_role_has_one_name_per_format() {
        for (role, hf, gguf) in TENSOR_NAMES {
            let w = Weight::Layer(7, role);
            assert_eq!(w.hf_name(), format!("model.layers.7.{hf}"));
            assert_eq!(w.gguf_name(), format!("blk.7.{gguf}"));
        }
        let hf: std::collections::HashSet<_> = TENSOR_NAMES.iter().map(|t| t.1).collect();
        let gguf: std::collections::HashSet<_> = TENSOR_NAMES.iter().map(|t| t.2).collect();
        assert_eq!(
            (hf.len(), gguf.len()),
            (TENSOR_NAMES.len(), TENSOR_NAMES.len())
        );
    }
}
