//! The CPU model from any [`WeightSource`]: GGUF blocks stay in their format (Arbor's
//! batch-invariant block kernels run them), float weights become f32.

use std::path::Path;

use candle_core::{DType, Device};

use crate::cpu::linear::{FusedLinear, Linear};
use crate::cpu::llama::{Embedding, Layer, Llama};
use crate::error::{ModelError, Result};
use crate::parallel::Shard;
use crate::text::chat::ChatTemplate;
use crate::text::tokenizer::Tokenizer;
use crate::weights::shard::get_parts;
use crate::weights::{LayerWeight as L, Stored, Weight, WeightSource};

/// A linear layer from its weight (and bias) as stored.
fn linear(w: Stored, bias: Option<Stored>, device: &Device) -> Result<Linear> {
    let bias = bias.map(|b| b.to_dense(DType::F32, device)).transpose()?;
    match w {
        Stored::Quantized(q) => Linear::from_qtensor(q, bias, device),
        Stored::Dense(t) => Linear::from_dense(t.to_dtype(DType::F32)?, bias),
    }
}

/// Each rank's part of a linear layer (and its bias).
fn linears(
    src: &mut dyn WeightSource,
    w: Weight,
    bias: Option<Weight>,
    shards: &[Shard],
    device: &Device,
) -> Result<Vec<Linear>> {
    let weights = get_parts(src, w, shards)?;
    let biases: Vec<Option<Stored>> = match bias {
        Some(b) => get_parts(src, b, shards)?.into_iter().map(Some).collect(),
        None => shards.iter().map(|_| None).collect(),
    };
    weights
        .into_iter()
        .zip(biases)
        .map(|(w, b)| linear(w, b, device))
        .collect()
}

fn norms(
    src: &mut dyn WeightSource,
    w: Weight,
    shards: &[Shard],
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    get_parts(src, w, shards)?
        .into_iter()
        .map(|t| Ok(t.to_dense(DType::F32, device)?.to_vec1::<f32>()?))
        .collect()
}

/// Builds the CPU model from `src`.
pub fn build(src: &mut dyn WeightSource, device: &Device) -> Result<Llama> {
    let whole = Shard::whole(src.config());
    let mut models = build_shards(src, &[whole], device)?;
    Ok(models.pop().expect("one shard, one model"))
}

/// Builds each shard's model (tensor parallelism), reading every tensor from `src` once.
pub fn build_shards(
    src: &mut dyn WeightSource,
    shards: &[Shard],
    device: &Device,
) -> Result<Vec<Llama>> {
    let config = src.config().clone();
    let bias = |b: L| config.qkv_bias.then_some(b);
    let mut layers: Vec<Vec<Layer>> = shards
        .iter()
        .map(|_| Vec::with_capacity(config.num_layers))
        .collect();
    for i in 0..config.num_layers {
        let w = |role: L| Weight::Layer(i, role);
        let b = |role: L| bias(role).map(|r| Weight::Layer(i, r));
        let mut q = linears(src, w(L::Q), b(L::QBias), shards, device)?.into_iter();
        let mut k = linears(src, w(L::K), b(L::KBias), shards, device)?.into_iter();
        let mut v = linears(src, w(L::V), b(L::VBias), shards, device)?.into_iter();
        let mut o = linears(src, w(L::O), None, shards, device)?.into_iter();
        let mut gate = linears(src, w(L::Gate), None, shards, device)?.into_iter();
        let mut up = linears(src, w(L::Up), None, shards, device)?.into_iter();
        let mut down = linears(src, w(L::Down), None, shards, device)?.into_iter();
        let mut attn_norm = norms(src, w(L::AttnNorm), shards, device)?.into_iter();
        let mut ffn_norm = norms(src, w(L::FfnNorm), shards, device)?.into_iter();
        for rank in layers.iter_mut() {
            let parts = (
                q.next(),
                k.next(),
                v.next(),
                o.next(),
                gate.next(),
                up.next(),
                down.next(),
                attn_norm.next(),
                ffn_norm.next(),
            );
            let (
                Some(q),
                Some(k),
                Some(v),
                Some(wo),
                Some(gate),
                Some(up),
                Some(w_down),
                Some(attn_norm),
                Some(ffn_norm),
            ) = parts
            else {
                unreachable!("get_parts returns one part per shard")
            };
            rank.push(Layer {
                qkv: FusedLinear::new(vec![q, k, v]),
                wo,
                gate_up: FusedLinear::new(vec![gate, up]),
                w_down,
                attn_norm,
                ffn_norm,
            });
        }
    }
    let final_norm = norms(src, Weight::FinalNorm, shards, device)?;
    let head = if config.tie_word_embeddings {
        Weight::TokenEmbedding
    } else {
        Weight::LmHead
    };
    let lm_head = linears(src, head, None, shards, device)?;
    let embedding = get_parts(src, Weight::TokenEmbedding, shards)?;
    shards
        .iter()
        .zip(layers)
        .zip(final_norm)
        .zip(lm_head)
        .zip(embedding)
        .map(|((((shard, layers), final_norm), lm_head), embedding)| {
            let embedding = match embedding {
                // GGUF rows, dequantized on lookup.
                Stored::Quantized(q) => Embedding::Quantized(Box::new(q)),
                Stored::Dense(t) => Embedding::Dense(t.to_dtype(DType::F32)?),
            };
            Llama::new(
                config.clone(),
                shard.clone(),
                embedding,
                layers,
                final_norm,
                lm_head,
                device.clone(),
            )
        })
        .collect()
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
    let (model, tokenizer, chat_template) = load_with(path, device, |src| build(src, device))?;
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
    })
}

/// Loads a GGUF file or a Hugging Face folder cut into `size` tensor-parallel shards (rank
/// order), each tensor read once; a size the model cannot be cut into is an error before
/// any weight is read.
pub fn load_shards(
    path: &Path,
    device: &Device,
    size: usize,
) -> Result<(Vec<Llama>, Tokenizer, ChatTemplate)> {
    load_with(path, device, |src| {
        let shards = crate::parallel::plan(src.config(), size)?;
        build_shards(src, &shards, device)
    })
}

/// Opens `path`'s configuration, tokenizer and template, then `build`s from its tensors.
fn load_with<T>(
    path: &Path,
    device: &Device,
    build: impl FnOnce(&mut dyn WeightSource) -> Result<T>,
) -> Result<(T, Tokenizer, ChatTemplate)> {
    if !path.exists() {
        return Err(ModelError::NotFound(path.to_path_buf()));
    }
    let started = std::time::Instant::now();
    let (built, config, tokenizer, chat_template) = if path.is_dir() {
        // Configuration and tokenizer first: a mismatch is reported before the weights load.
        let (config, tokenizer, chat_template) = crate::weights::hf::open_hf(path)?;
        let mut src = crate::weights::hf::SafetensorsWeights::load(path, config.clone(), device)?;
        (build(&mut src)?, config, tokenizer, chat_template)
    } else {
        let mut file = crate::weights::gguf::open_gguf(path)?;
        let config = file.config().clone();
        let built = build(&mut file)?;
        (built, config, file.tokenizer, file.chat_template)
    };
    let c = &config;
    tracing::info!(
        arch = %c.architecture, layers = c.num_layers, hidden = c.hidden_size,
        heads = c.num_heads, kv_heads = c.num_kv_heads, vocab = c.vocab_size,
        context = c.max_position_embeddings,
        "loaded {} in {:.2}s", path.display(), started.elapsed().as_secs_f64()
    );
    Ok((built, tokenizer, chat_template))
}
