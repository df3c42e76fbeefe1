//! Loading onto the GPU: a model file (GGUF or Hugging Face folder) or random weights of a
//! config's shapes, through the one `WeightSource` interface; bf16, or GGUF blocks kept as
//! they are.

use super::*;

/// Random weights of a config's shapes, made on the GPU (`--load-format dummy`).
pub(crate) struct DummyWeights {
    config: ModelConfig,
    device: Device,
}

impl WeightSource for DummyWeights {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn get(&mut self, w: Weight) -> Result<Stored> {
        let shape = w.shape(&self.config);
        Ok(Stored::Dense(if w.hf_name().ends_with("norm.weight") {
            Tensor::ones(shape, DType::BF16, &self.device)?
        } else {
            // Small random weights keep activations finite through many layers.
            Tensor::randn(0f32, 0.02, shape, &self.device)?.to_dtype(DType::BF16)?
        }))
    }
}

/// A weight as bf16 on `device`.
pub(crate) fn dense_bf16(t: Stored, device: &Device) -> Result<Tensor> {
    Ok(match t {
        Stored::Quantized(q) => q
            .dequantize(&Device::Cpu)?
            .to_dtype(DType::BF16)?
            .to_device(device)?,
        Stored::Dense(t) => t.to_dtype(DType::BF16)?.to_device(device)?,
    })
}

/// A linear layer's weight: `parts` (`[out, in]` each) stacked along the output dimension.
/// With `keep_quantized`, GGUF block formats stay as they are when every part has the same one
/// (stacking rows of one format is concatenating their bytes); otherwise bf16.
pub(crate) fn gpu_linear(
    src: &mut dyn WeightSource,
    parts: &[Weight],
    keep_quantized: bool,
    device: &Device,
) -> Result<GpuLinear> {
    use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
    let mut stored = Vec::with_capacity(parts.len());
    for &w in parts {
        stored.push(src.get(w)?);
    }
    if keep_quantized {
        let dtypes: Vec<Option<GgmlDType>> = stored
            .iter()
            .map(|t| match t {
                Stored::Quantized(q) => Some(q.dtype()),
                Stored::Dense(_) => None,
            })
            .collect();
        let first = dtypes[0];
        let float = matches!(
            first,
            None | Some(GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
        );
        if !float && dtypes.iter().all(|d| *d == first) {
            let dtype = first.expect("checked above");
            let mut bytes = Vec::new();
            let mut rows = 0;
            let mut cols = 0;
            for t in &stored {
                if let Stored::Quantized(q) = t {
                    bytes.extend_from_slice(&q.data()?);
                    rows += q.shape().dims()[0];
                    cols = q.shape().dims()[1];
                }
            }
            let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), device, dtype)?;
            let qt = QTensor::new(storage, (rows, cols))?;
            return Ok(GpuLinear::Quantized(QMatMul::from_qtensor(qt)?));
        }
    }
    let mut dense = Vec::with_capacity(stored.len());
    for t in stored {
        dense.push(dense_bf16(t, device)?);
    }
    Ok(GpuLinear::Dense(if dense.len() == 1 {
        dense.remove(0)
    } else {
        Tensor::cat(&dense, 0)?
    }))
}

/// A GPU model with its text side.
pub struct LoadedCuda {
    pub model: CudaLlama,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
}

/// Loads a GGUF file or a Hugging Face folder onto the GPU: bf16, or GGUF weights in their
/// own block format (`gguf_weights`).
pub fn load(
    path: &Path,
    device: &Device,
    gguf_weights: GgufWeights,
    options: CudaOptions,
) -> Result<LoadedCuda> {
    if !path.exists() {
        return Err(ModelError::NotFound(path.to_path_buf()));
    }
    if path.is_dir() {
        let (config, tokenizer, chat_template) = crate::weights::hf::open_hf(path)?;
        let mut src = crate::weights::hf::SafetensorsWeights::load(path, config, device)?;
        let model = CudaLlama::build(&mut src, false, options, device)?;
        Ok(LoadedCuda {
            model,
            tokenizer,
            chat_template,
        })
    } else {
        let mut file = crate::weights::gguf::open_gguf(path)?;
        let keep_quantized = gguf_weights == GgufWeights::Quantized;
        let model = CudaLlama::build(&mut file, keep_quantized, options, device)?;
        Ok(LoadedCuda {
            model,
            tokenizer: file.tokenizer,
            chat_template: file.chat_template,
        })
    }
}

/// Random weights of the shapes a Hugging Face `config.json` describes (`--load-format
/// dummy`), made on the GPU. The text side is the tokenizer folder's if one is given (a real
/// tokenizer makes benchmark prompts as long in tokens as they would be on the real model),
/// else a stand-in of one token per character.
pub fn load_dummy(
    config_path: &Path,
    tokenizer_dir: Option<&Path>,
    device: &Device,
    seed: u64,
    options: CudaOptions,
) -> Result<LoadedCuda> {
    let path = if config_path.is_dir() {
        config_path.join("config.json")
    } else {
        config_path.to_path_buf()
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::BadConfig(format!("{}: {e}", path.display())))?;
    let config = crate::weights::hf::parse_config(&json)?;
    let (tokenizer, chat_template) = match tokenizer_dir {
        Some(dir) => crate::weights::hf::open_tokenizer(dir, &json, config.vocab_size)?,
        None => (
            Tokenizer::placeholder(config.vocab_size)?,
            ChatTemplate::new(crate::text::chat::CHATML_TEMPLATE, "", "")?,
        ),
    };
    device.set_seed(seed)?;
    let mut src = DummyWeights {
        config,
        device: device.clone(),
    };
    let model = CudaLlama::build(&mut src, false, options, device)?;
    Ok(LoadedCuda {
        model,
        tokenizer,
        chat_template,
    })
}
