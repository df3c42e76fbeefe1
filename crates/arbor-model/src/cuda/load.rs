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

/// Where a model's (or its shards') weights come from.
pub(crate) enum ShardSources<'a> {
    /// One source, each tensor read once and cut for every rank.
    Shared(&'a mut dyn WeightSource),
    /// One source per rank giving the same weights (random weights made again on each rank's
    /// GPU from one seed: nothing crosses between GPUs), each cut for its rank.
    PerRank(Vec<Box<dyn WeightSource + 'a>>),
}

impl ShardSources<'_> {
    pub(crate) fn config(&self) -> &ModelConfig {
        match self {
            Self::Shared(src) => src.config(),
            Self::PerRank(srcs) => srcs[0].config(),
        }
    }

    /// `w`'s part for each of `shards`.
    pub(crate) fn parts(&mut self, w: Weight, shards: &[Shard]) -> Result<Vec<Stored>> {
        match self {
            Self::Shared(src) => crate::weights::shard::get_parts(&mut **src, w, shards),
            Self::PerRank(srcs) => srcs
                .iter_mut()
                .zip(shards)
                .map(|(src, shard)| {
                    let part = crate::weights::shard::part(w, src.config(), shard);
                    let t = src.get(w)?;
                    match part {
                        crate::weights::shard::Part::Whole => Ok(t),
                        part => crate::weights::shard::cut(&t, &part, &w.gguf_name()),
                    }
                })
                .collect(),
        }
    }
}

/// A linear layer's weight: `stored` (`[out, in]` each) stacked along the output dimension.
/// With `keep_quantized`, GGUF block formats stay as they are when every part has the same one
/// (stacking rows of one format is concatenating their bytes); otherwise bf16.
pub(crate) fn gpu_linear(
    stored: Vec<Stored>,
    keep_quantized: bool,
    device: &Device,
) -> Result<GpuLinear> {
    use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
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

/// A model cut into tensor-parallel shards, one per device, with its text side.
pub struct LoadedShards {
    pub shards: Vec<CudaLlama>,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
}

/// Loads `path` (GGUF file or Hugging Face folder) cut into one shard per device
/// (`devices[rank]`); every tensor is read once, on the host, and each rank's part goes to
/// its GPU.
pub fn load_shards(
    path: &Path,
    devices: &[Device],
    gguf_weights: GgufWeights,
    options: CudaOptions,
) -> Result<LoadedShards> {
    if !path.exists() {
        return Err(ModelError::NotFound(path.to_path_buf()));
    }
    let keep_quantized = gguf_weights == GgufWeights::Quantized;
    let build = |src: &mut dyn WeightSource| {
        let shards = crate::parallel::plan(src.config(), devices.len())?;
        CudaLlama::build_shards(
            ShardSources::Shared(src),
            &shards,
            keep_quantized,
            &options,
            devices,
        )
    };
    if path.is_dir() {
        let (config, tokenizer, chat_template) = crate::weights::hf::open_hf(path)?;
        let mut src = crate::weights::hf::SafetensorsWeights::load(path, config, &Device::Cpu)?;
        Ok(LoadedShards {
            shards: build(&mut src)?,
            tokenizer,
            chat_template,
        })
    } else {
        let mut file = crate::weights::gguf::open_gguf(path)?;
        let shards = build(&mut file)?;
        Ok(LoadedShards {
            shards,
            tokenizer: file.tokenizer,
            chat_template: file.chat_template,
        })
    }
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
    let mut loaded = load_dummy_shards(
        config_path,
        tokenizer_dir,
        std::slice::from_ref(device),
        seed,
        options,
    )?;
    Ok(LoadedCuda {
        model: loaded.shards.pop().expect("one device, one model"),
        tokenizer: loaded.tokenizer,
        chat_template: loaded.chat_template,
    })
}

/// [`load_dummy`] cut into one shard per device. Every rank's GPU makes the whole tensors
/// from the same seed and keeps its part, so the shards are cuts of the model TP=1 makes
/// on the same kind of GPU.
pub fn load_dummy_shards(
    config_path: &Path,
    tokenizer_dir: Option<&Path>,
    devices: &[Device],
    seed: u64,
    options: CudaOptions,
) -> Result<LoadedShards> {
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
    let shards = crate::parallel::plan(&config, devices.len())?;
    let mut sources: Vec<Box<dyn WeightSource>> = Vec::with_capacity(devices.len());
    for device in devices {
        device.set_seed(seed)?;
        sources.push(Box::new(DummyWeights {
            config: config.clone(),
            device: device.clone(),
        }));
    }
    let shards = CudaLlama::build_shards(
        ShardSources::PerRank(sources),
        &shards,
        false,
        &options,
        devices,
    )?;
    Ok(LoadedShards {
        shards,
        tokenizer,
        chat_template,
    })
}
