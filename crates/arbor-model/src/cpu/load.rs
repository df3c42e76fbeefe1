//! The CPU model from any [`WeightSource`]: GGUF blocks stay in their format (Arbor's
//! batch-invariant block kernels run them), float weights become f32.

use candle_core::{DType, Device};

use crate::cpu::linear::{FusedLinear, Linear};
use crate::cpu::llama::{Embedding, Layer, Llama};
use crate::error::Result;
use crate::weights::{LayerWeight as L, Stored, Weight, WeightSource};

/// A linear layer from its weight (and bias) as stored.
fn linear(
    src: &mut dyn WeightSource,
    w: Weight,
    bias: Option<Weight>,
    device: &Device,
) -> Result<Linear> {
    let bias = match bias {
        Some(b) => Some(src.get(b)?.to_dense(DType::F32, device)?),
        None => None,
    };
    match src.get(w)? {
        Stored::Quantized(q) => Linear::from_qtensor(q, bias, device),
        Stored::Dense(t) => Linear::from_dense(t.to_dtype(DType::F32)?, bias),
    }
}

fn norm(src: &mut dyn WeightSource, w: Weight, device: &Device) -> Result<Vec<f32>> {
    Ok(src.get(w)?.to_dense(DType::F32, device)?.to_vec1::<f32>()?)
}

/// Builds the CPU model from `src`.
pub fn build(src: &mut dyn WeightSource, device: &Device) -> Result<Llama> {
    let config = src.config().clone();
    let bias = |b: L| config.qkv_bias.then_some(b);
    let mut layers = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let w = |role: L| Weight::Layer(i, role);
        let b = |role: L| bias(role).map(|r| Weight::Layer(i, r));
        layers.push(Layer {
            qkv: FusedLinear::new(vec![
                linear(src, w(L::Q), b(L::QBias), device)?,
                linear(src, w(L::K), b(L::KBias), device)?,
                linear(src, w(L::V), b(L::VBias), device)?,
            ]),
            wo: linear(src, w(L::O), None, device)?,
            gate_up: FusedLinear::new(vec![
                linear(src, w(L::Gate), None, device)?,
                linear(src, w(L::Up), None, device)?,
            ]),
            w_down: linear(src, w(L::Down), None, device)?,
            attn_norm: norm(src, w(L::AttnNorm), device)?,
            ffn_norm: norm(src, w(L::FfnNorm), device)?,
        });
    }
    let final_norm = norm(src, Weight::FinalNorm, device)?;
    let head = if config.tie_word_embeddings {
        Weight::TokenEmbedding
    } else {
        Weight::LmHead
    };
    let lm_head = linear(src, head, None, device)?;
    let embedding = match src.get(Weight::TokenEmbedding)? {
        // GGUF rows, dequantized on lookup.
        Stored::Quantized(q) => Embedding::Quantized(Box::new(q)),
        Stored::Dense(t) => Embedding::Dense(t.to_dtype(DType::F32)?),
    };
    Llama::new(
        config,
        embedding,
        layers,
        final_norm,
        lm_head,
        device.clone(),
    )
}
