//! Loading a Hugging Face model folder: config.json, *.safetensors (single or sharded),
//! tokenizer.json, tokenizer_config.json (chat template, special tokens).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::config::{ModelConfig, RopeScaling, RopeStyle};
use crate::error::{ModelError, Result};
use crate::text::chat::{ChatTemplate, CHATML_TEMPLATE};
use crate::text::tokenizer::Tokenizer;
use crate::weights::{check_shape, Stored, Weight, WeightSource};

const SUPPORTED: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::BadConfig(format!("{}: {e}", path.display())))
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

/// Parses config.json into a [`ModelConfig`].
pub fn parse_config(cfg: &Value) -> Result<ModelConfig> {
    let arch = cfg
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .unwrap_or("(none)");
    if !SUPPORTED.contains(&arch) {
        return Err(ModelError::UnsupportedArchitecture(arch.to_string()));
    }
    let req = |k: &str| -> Result<usize> {
        cfg.get(k)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| ModelError::BadConfig(format!("config.json lacks {k}")))
    };
    let hidden_size = req("hidden_size")?;
    let num_heads = req("num_attention_heads")?;
    let head_dim = cfg
        .get("head_dim")
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .unwrap_or(hidden_size / num_heads.max(1));
    let f = |k: &str, d: f64| cfg.get(k).and_then(Value::as_f64).unwrap_or(d) as f32;
    // transformers 5 moved rope_theta and the scaling into `rope_parameters`.
    let rope_params = cfg.get("rope_parameters").filter(|v| v.is_object());
    let rope_theta = cfg
        .get("rope_theta")
        .or_else(|| rope_params?.get("rope_theta"))
        .and_then(Value::as_f64)
        .unwrap_or(10_000.0) as f32;
    let rope_scaling = match cfg
        .get("rope_scaling")
        .filter(|v| !v.is_null())
        .or(rope_params)
    {
        None => RopeScaling::None,
        Some(rs) => {
            let kind = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            let g = |k: &str, d: f64| rs.get(k).and_then(Value::as_f64).unwrap_or(d) as f32;
            match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear {
                    factor: g("factor", 1.0),
                },
                "llama3" => RopeScaling::Llama3 {
                    factor: g("factor", 8.0),
                    low_freq_factor: g("low_freq_factor", 1.0),
                    high_freq_factor: g("high_freq_factor", 4.0),
                    original_max_position_embeddings: rs
                        .get("original_max_position_embeddings")
                        .and_then(Value::as_u64)
                        .unwrap_or(8192)
                        as usize,
                },
                other => {
                    return Err(ModelError::BadConfig(format!(
                        "unsupported rope_scaling type {other:?}"
                    )))
                }
            }
        }
    };
    let mut max_pos = req("max_position_embeddings")?;
    // Sliding-window attention is not implemented: cap the context so outputs stay exact.
    if let Some(w) = cfg.get("sliding_window").and_then(Value::as_u64) {
        let enabled = cfg
            .get("use_sliding_window")
            .and_then(Value::as_bool)
            .unwrap_or(arch != "Qwen2ForCausalLM");
        if enabled && (w as usize) < max_pos {
            tracing::warn!(
                window = w,
                "sliding-window attention: context capped at the window"
            );
            max_pos = w as usize;
        }
    }
    let config = ModelConfig {
        architecture: cfg
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or(arch)
            .to_string(),
        vocab_size: req("vocab_size")?,
        hidden_size,
        intermediate_size: req("intermediate_size")?,
        num_layers: req("num_hidden_layers")?,
        num_heads,
        num_kv_heads: cfg
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .unwrap_or(num_heads),
        head_dim,
        rms_norm_eps: f("rms_norm_eps", 1e-6),
        rope_theta,
        rope_style: RopeStyle::Halves,
        rope_scaling,
        max_position_embeddings: max_pos,
        tie_word_embeddings: cfg
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        ggml_rope_angles: false,
        qkv_bias: arch == "Qwen2ForCausalLM"
            || cfg
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
    };
    config.validate()?;
    Ok(config)
}

fn safetensor_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let idx = read_json(&index)?;
        let map = idx
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                ModelError::BadConfig(format!("{} has no weight_map", index.display()))
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(Value::as_str)
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::NotFound(dir.join("model.safetensors")))
}

/// A Hugging Face model folder's configuration, tokenizer and chat template (shared by the CPU
/// loader and the CUDA one), read before any weight so a mismatch is reported at once.
pub fn open_hf(dir: &Path) -> Result<(ModelConfig, Tokenizer, ChatTemplate)> {
    let cfg_json = read_json(&dir.join("config.json"))?;
    let config = parse_config(&cfg_json)?;
    // The tokenizer first: a mismatch is reported before seconds of weight loading.
    let (tokenizer, chat_template) = open_tokenizer(dir, &cfg_json, config.vocab_size)?;
    Ok((config, tokenizer, chat_template))
}

/// The tokenizer and chat template of a Hugging Face folder (`tokenizer.json`, with
/// `tokenizer_config.json` and `generation_config.json` if present), checked against a model
/// of `vocab_size` embeddings whose `config.json` is `cfg_json`.
pub fn open_tokenizer(
    dir: &Path,
    cfg_json: &Value,
    vocab_size: usize,
) -> Result<(Tokenizer, ChatTemplate)> {
    let tok_cfg_path = dir.join("tokenizer_config.json");
    let tok_cfg = if tok_cfg_path.exists() {
        Some(read_json(&tok_cfg_path)?)
    } else {
        None
    };
    let gen_cfg_path = dir.join("generation_config.json");
    let gen_cfg = if gen_cfg_path.exists() {
        Some(read_json(&gen_cfg_path)?)
    } else {
        None
    };
    let mut gen_eos = ids(gen_cfg.as_ref().and_then(|g| g.get("eos_token_id")));
    gen_eos.extend(ids(cfg_json.get("eos_token_id")));
    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.exists() {
        return Err(ModelError::NotFound(tokenizer_path));
    }
    let tokenizer = Tokenizer::from_hf_files(&tokenizer_path, tok_cfg.as_ref(), &gen_eos)?;
    if tokenizer.max_token_id() as usize >= vocab_size {
        return Err(ModelError::TokenizerMismatch(format!(
            "the tokenizer produces ids up to {} but the model has {} embeddings",
            tokenizer.max_token_id(),
            vocab_size
        )));
    }
    let template_src = chat_template_source(dir, tok_cfg.as_ref())?;
    let bos = tokenizer.token_text(tokenizer.bos_id);
    let eos = tokenizer.token_text(tokenizer.eos_id);
    let chat_template = match template_src {
        Some(src) => ChatTemplate::new(&src, &bos, &eos)?,
        None => {
            tracing::warn!("{} has no chat template; using ChatML", dir.display());
            ChatTemplate::new(CHATML_TEMPLATE, &bos, &eos)?
        }
    };
    Ok((tokenizer, chat_template))
}

/// The safetensors files of a folder, checked to exist.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let files = safetensor_files(dir)?;
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        return Err(ModelError::NotFound(missing.clone()));
    }
    Ok(files)
}

/// A Hugging Face folder's safetensors, loaded onto a device, as a [`WeightSource`].
pub struct SafetensorsWeights {
    config: ModelConfig,
    tensors: HashMap<String, Tensor>,
}

impl SafetensorsWeights {
    /// Every tensor of `dir`'s safetensors files (single or sharded), on `device`.
    pub fn load(dir: &Path, config: ModelConfig, device: &Device) -> Result<Self> {
        let mut tensors = HashMap::new();
        for file in weight_files(dir)? {
            let loaded = candle_core::safetensors::load(&file, device)
                .map_err(|e| ModelError::BadConfig(format!("{}: {e}", file.display())))?;
            tensors.extend(loaded);
        }
        Ok(Self { config, tensors })
    }
}

impl WeightSource for SafetensorsWeights {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Each tensor is handed over once (its memory leaves with it), except the embedding,
    /// which a tied LM head asks for again.
    fn get(&mut self, w: Weight) -> Result<Stored> {
        let name = w.hf_name();
        let t = if w == Weight::TokenEmbedding {
            self.tensors.get(&name).cloned()
        } else {
            self.tensors.remove(&name)
        }
        .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
        check_shape(Stored::Dense(t), w, &name, &self.config)
    }
}

fn chat_template_source(dir: &Path, tok_cfg: Option<&Value>) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|source| ModelError::Io {
                path: jinja,
                source,
            });
    }
    Ok(match tok_cfg.and_then(|c| c.get("chat_template")) {
        Some(Value::String(s)) => Some(s.clone()),
        // A list of named templates: take "default".
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(String::from)),
        _ => None,
    })
}
