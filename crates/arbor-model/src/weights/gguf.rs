//! A GGUF file: a Llama-family model's configuration, tokenizer and chat template, and its
//! tensors as a [`WeightSource`].

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::config::{ModelConfig, RopeScaling, RopeStyle};
use crate::error::{ModelError, Result};
use crate::text::chat::{ChatTemplate, CHATML_TEMPLATE};
use crate::text::tokenizer::{tokenizer_from_gguf, GgufVocab, Tokenizer};
use crate::weights::{check_shape, Stored, Weight, WeightSource};

/// GGUF architectures of the Llama decoder family and how RoPE pairs their dimensions.
fn rope_style_for(arch: &str) -> Option<RopeStyle> {
    match arch {
        "llama" | "mistral" | "smollm" => Some(RopeStyle::Interleaved),
        "qwen2" => Some(RopeStyle::Halves),
        _ => None,
    }
}

struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    arch: String,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.md.get(key)
    }
    fn arch_key(&self, key: &str) -> String {
        format!("{}.{key}", self.arch)
    }
    fn u64_opt(&self, key: &str) -> Option<u64> {
        let v = self.get(key)?;
        v.to_u64()
            .ok()
            .or_else(|| v.to_u32().ok().map(u64::from))
            .or_else(|| v.to_i32().ok().and_then(|x| u64::try_from(x).ok()))
            .or_else(|| v.to_i64().ok().and_then(|x| u64::try_from(x).ok()))
    }
    fn usize(&self, key: &str) -> Result<usize> {
        let k = self.arch_key(key);
        self.u64_opt(&k)
            .map(|v| v as usize)
            .ok_or(ModelError::MissingMetadata(k))
    }
    fn f32_opt(&self, key: &str) -> Option<f32> {
        let v = self.get(key)?;
        v.to_f32()
            .ok()
            .or_else(|| v.to_f64().ok().map(|x| x as f32))
    }
    fn str_opt(&self, key: &str) -> Option<&str> {
        self.get(key)?.to_string().ok().map(String::as_str)
    }
    fn bool_opt(&self, key: &str) -> Option<bool> {
        self.get(key)?.to_bool().ok()
    }
    fn u32_opt(&self, key: &str) -> Option<u32> {
        self.u64_opt(key).and_then(|v| u32::try_from(v).ok())
    }
    fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let arr = v
            .to_vec()
            .map_err(|_| ModelError::Tokenizer(format!("{key} is not an array")))?;
        arr.iter()
            .map(|x| {
                x.to_string()
                    .cloned()
                    .map_err(|_| ModelError::Tokenizer(format!("{key} holds a non-string")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
    fn numbers<T>(&self, key: &str, f: impl Fn(&Value) -> Option<T>) -> Option<Vec<T>> {
        let arr = self.get(key)?.to_vec().ok()?;
        arr.iter().map(f).collect()
    }
}

fn bad_gguf(path: &Path, reason: impl std::fmt::Display) -> ModelError {
    ModelError::BadGguf {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// A GGUF file's parsed header: the model's configuration, tokenizer and chat template, and
/// the open file to read tensors from (shared by the CPU loader and the CUDA one).
pub struct GgufModelFile {
    pub path: PathBuf,
    pub content: Content,
    pub reader: BufReader<File>,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
}

impl GgufModelFile {
    /// Reads a tensor by name, in its GGUF format, into host memory.
    pub fn tensor(&mut self, name: &str) -> Result<QTensor> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        check_dtype(name, info.ggml_dtype)?;
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| bad_gguf(&self.path, format!("{name}: {e}")))
    }
}

impl WeightSource for GgufModelFile {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn get(&mut self, w: Weight) -> Result<Stored> {
        let name = w.gguf_name();
        let t = Stored::Quantized(self.tensor(&name)?);
        check_shape(t, w, &name, &self.config)
    }
}

/// Opens a GGUF model file: checks that it is complete and reads its configuration, tokenizer
/// and chat template.
pub fn open_gguf(path: &Path) -> Result<GgufModelFile> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("unknown dtype") {
            ModelError::UnsupportedDType {
                tensor: "(in header)".into(),
                dtype: msg,
            }
        } else {
            bad_gguf(path, msg)
        }
    })?;

    // A cut-off download parses fine (the header is at the front): check the data is all there.
    let needed = content
        .tensor_infos
        .values()
        .map(|t| {
            let bytes = t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size();
            content.tensor_data_offset + t.offset + bytes as u64
        })
        .max()
        .unwrap_or(content.tensor_data_offset);
    if needed > file_len {
        return Err(ModelError::Truncated {
            path: path.to_path_buf(),
            needed,
            actual: file_len,
        });
    }

    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| ModelError::MissingMetadata("general.architecture".into()))?;
    let rope_style =
        rope_style_for(&arch).ok_or_else(|| ModelError::UnsupportedArchitecture(arch.clone()))?;
    let meta = Meta {
        md: &content.metadata,
        arch: arch.clone(),
    };

    let hidden_size = meta.usize("embedding_length")?;
    let num_heads = meta.usize("attention.head_count")?;
    let num_layers = meta.usize("block_count")?;
    let head_dim = meta
        .u64_opt(&meta.arch_key("attention.key_length"))
        .map(|v| v as usize)
        .unwrap_or(hidden_size / num_heads.max(1));
    let embd_info = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
    let vocab_size = embd_info.shape.dims().first().copied().unwrap_or(0);

    let freq_factors = if content.tensor_infos.contains_key("rope_freqs.weight") {
        let t = content.tensor(&mut reader, "rope_freqs.weight", &Device::Cpu)?;
        Some(
            t.dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        )
    } else {
        None
    };
    let rope_scaling = match (
        freq_factors,
        meta.str_opt(&meta.arch_key("rope.scaling.type")),
    ) {
        (Some(f), _) => RopeScaling::FreqFactors(f),
        (None, Some("linear")) => RopeScaling::Linear {
            factor: meta
                .f32_opt(&meta.arch_key("rope.scaling.factor"))
                .unwrap_or(1.0),
        },
        (None, Some("none")) | (None, None) => RopeScaling::None,
        (None, Some(other)) => {
            return Err(ModelError::BadConfig(format!(
                "unsupported RoPE scaling {other:?}"
            )))
        }
    };

    let config = ModelConfig {
        architecture: arch.clone(),
        vocab_size,
        hidden_size,
        intermediate_size: meta.usize("feed_forward_length")?,
        num_layers,
        num_heads,
        num_kv_heads: meta
            .u64_opt(&meta.arch_key("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(num_heads),
        head_dim,
        rms_norm_eps: meta
            .f32_opt(&meta.arch_key("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5),
        rope_theta: meta
            .f32_opt(&meta.arch_key("rope.freq_base"))
            .unwrap_or(10_000.0),
        rope_style,
        rope_scaling,
        max_position_embeddings: meta.usize("context_length")?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        ggml_rope_angles: true,
        qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
    };
    config.validate()?;

    let tokenizer = gguf_tokenizer(&meta, &config)?;
    let chat_template = match meta.str_opt("tokenizer.chat_template") {
        Some(src) => ChatTemplate::new(
            src,
            &tokenizer.token_text(tokenizer.bos_id),
            &tokenizer.token_text(tokenizer.eos_id),
        )?,
        None => {
            tracing::warn!("{} has no chat template; using ChatML", path.display());
            ChatTemplate::new(
                CHATML_TEMPLATE,
                &tokenizer.token_text(tokenizer.bos_id),
                &tokenizer.token_text(tokenizer.eos_id),
            )?
        }
    };
    Ok(GgufModelFile {
        path: path.to_path_buf(),
        content,
        reader,
        config,
        tokenizer,
        chat_template,
    })
}

fn check_dtype(name: &str, dtype: GgmlDType) -> Result<()> {
    match dtype {
        GgmlDType::Q8_1 | GgmlDType::Q8K => Err(ModelError::UnsupportedDType {
            tensor: name.into(),
            dtype: format!("{dtype:?}"),
        }),
        _ => Ok(()),
    }
}

fn gguf_tokenizer(meta: &Meta, config: &ModelConfig) -> Result<Tokenizer> {
    let model = meta
        .str_opt("tokenizer.ggml.model")
        .ok_or_else(|| ModelError::MissingMetadata("tokenizer.ggml.model".into()))?;
    let tokens = meta
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| ModelError::MissingMetadata("tokenizer.ggml.tokens".into()))?;
    if tokens.len() > config.vocab_size {
        return Err(ModelError::TokenizerMismatch(format!(
            "the tokenizer has {} tokens but the embedding only {} rows",
            tokens.len(),
            config.vocab_size
        )));
    }
    let merges = meta.strings("tokenizer.ggml.merges")?;
    let token_types = meta.numbers("tokenizer.ggml.token_type", |v| v.to_i32().ok());
    let scores = meta.numbers("tokenizer.ggml.scores", |v| v.to_f32().ok());
    let vocab = GgufVocab {
        model,
        pre: meta.str_opt("tokenizer.ggml.pre"),
        tokens: &tokens,
        token_types: token_types.as_deref(),
        merges: merges.as_deref(),
        scores: scores.as_deref(),
        unk_id: meta.u32_opt("tokenizer.ggml.unknown_token_id"),
    };
    let bos = meta.u32_opt("tokenizer.ggml.bos_token_id");
    let eos = meta.u32_opt("tokenizer.ggml.eos_token_id");
    let add_bos = meta
        .bool_opt("tokenizer.ggml.add_bos_token")
        .unwrap_or(model == "llama");
    let extra: Vec<u32> = ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
        .iter()
        .filter_map(|k| meta.u32_opt(k))
        .collect();
    for id in bos.iter().chain(eos.iter()).chain(extra.iter()) {
        if *id as usize >= tokens.len() {
            return Err(ModelError::TokenizerMismatch(format!(
                "special token id {id} is outside the {}-token vocabulary",
                tokens.len()
            )));
        }
    }
    tokenizer_from_gguf(&vocab, bos, eos, add_bos, &extra)
}
