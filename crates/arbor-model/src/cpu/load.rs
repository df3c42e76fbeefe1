//! The CPU model from any [`WeightSource`]: GGUF blocks stay in their format (Arbor's
//! batch-invariant block kernels run them), float weights become f32.

use std::path::Path;

use candle_core::{DType, Device};

use crate::cpu::linear::{FusedLinear, Linear};
use crate::cpu::llama::{Embedding, Layer, Llama};
use crate::error::{ModelError, Result};
use crate::text::chat::ChatTemplate;
use crate::text::tokenizer::Tokenizer;
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

/// A model ready to run, with the text side that belongs to it.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
}

/// Loads a GGUF file or a Hugging Face folder.
pub fn load_model(path: &Path, device: &Device) -> Result<LoadedModel> {
    if !path.exists() {
        return Err(ModelError::NotFound(path.to_path_buf()));
    }
    let started = std::time::Instant::now();
    let loaded = if path.is_dir() {
        // Configuration and tokenizer first: a mismatch is reported before the weights load.
        let (config, tokenizer, chat_template) = crate::weights::hf::open_hf(path)?;
        let mut src = crate::weights::hf::SafetensorsWeights::load(path, config, device)?;
        LoadedModel {
            model: build(&mut src, device)?,
            tokenizer,
            chat_template,
        }
    } else {
        let mut file = crate::weights::gguf::open_gguf(path)?;
        LoadedModel {
            model: build(&mut file, device)?,
            tokenizer: file.tokenizer,
            chat_template: file.chat_template,
        }
    };
    let c = &loaded.model.config;
    tracing::info!(
        arch = %c.architecture, layers = c.num_layers, hidden = c.hidden_size,
        heads = c.num_heads, kv_heads = c.num_kv_heads, vocab = c.vocab_size,
        context = c.max_position_embeddings,
        "loaded {} in {:.2}s", path.display(), started.elapsed().as_secs_f64()
    );
    Ok(loaded)
}
