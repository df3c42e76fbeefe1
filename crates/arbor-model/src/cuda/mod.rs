//! The CUDA backend: the Llama forward pass on one NVIDIA GPU, in bf16.
//!
//! Weights live on the GPU in bf16 (Hugging Face safetensors as they are; GGUF tensors
//! dequantized at load; or random for `--load-format dummy`), linear layers go through candle's
//! cuBLAS matmul, RMSNorm through candle-nn's kernel, and Arbor's own kernels
//! (`kernels.cu`) do what candle lacks:
//!
//! ```text
//!  x --rms_norm--> h --matmul(Wqkv)--> qkv --arbor_qkv_rope_write--> q, and K/V into their slots
//!  q, slot lists --arbor_attention (split along keys)--> partials --arbor_attention_merge--> o
//!  x += o Wo;  h = rms_norm(x);  gu = h Wgate_up;  act = arbor_silu_mul(gu);  x += act Wdown
//! ```
//!
//! The KV pool is one bf16 buffer per layer for K and one for V, `[slots, kv_heads, head_dim]`,
//! owned here (not candle tensors) because the kernels write into it in place.

use std::path::Path;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Storage, Tensor};
use half::bf16;

use crate::config::{ModelConfig, RopeStyle};
use crate::error::{ModelError, Result};
use crate::llama::{LogitsWanted, SeqStep};
use crate::rope::Rope;
use crate::{ChatTemplate, Tokenizer};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/arbor_kernels.ptx"));
const MODULE: &str = "arbor_kernels";
/// Decode steps cut each context into splits that run in parallel and are merged
/// (flash-decoding), as many as it takes to give the GPU about this many warps: one sequence
/// of 512 tokens needs 32-key splits (128-key splits left its attention latency-bound at 100
/// us a layer on the H200), while 64 sequences fill the GPU with one split each (and many
/// splits would cost more in partial results and merging than they save).
const DECODE_TARGET_WARPS: usize = 4096;
/// Keys per split in steps with prefill chunks: their tiles already give parallelism, and
/// fewer splits mean less partial output written and merged.
const SPLIT_LEN_PREFILL: usize = 1024;
/// Query rows per prefill tile (`QT` in kernels.cu) and the largest head_dim whose tile fits
/// the default 48 KiB of shared memory.
const TILE_ROWS: usize = 16;
const TILE_MAX_HEAD_DIM: usize = 128;

fn cuda_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Cuda(e.to_string())
}

/// Opens GPU `ordinal`.
pub fn device(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| ModelError::Cuda(format!("CUDA device {ordinal}: {e}")))
}

fn cuda_device(device: &Device) -> Result<&CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d),
        _ => Err(ModelError::Cuda("not a CUDA device".into())),
    }
}

#[derive(Debug)]
pub struct CudaLayer {
    attn_norm: Tensor,
    /// `[(H + 2 KVH) D, hidden]`: Q, K and V projections stacked.
    qkv: Tensor,
    qkv_bias: Option<Tensor>,
    wo: Tensor,
    ffn_norm: Tensor,
    /// `[2 F, hidden]`: gate then up.
    gate_up: Tensor,
    down: Tensor,
}

#[derive(Debug)]
pub struct CudaLlama {
    pub config: ModelConfig,
    embed: Tensor,
    layers: Vec<CudaLayer>,
    final_norm: Tensor,
    lm_head: Tensor,
    /// `[max_pos, D/2]` f32 RoPE tables (the CPU path's angles, so both agree).
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    device: Device,
}

/// K and V of every slot, per layer, on the GPU.
pub struct CudaKvPool {
    k: Vec<CudaSlice<bf16>>,
    v: Vec<CudaSlice<bf16>>,
    num_slots: usize,
}

impl CudaKvPool {
    pub fn new(model: &CudaLlama, num_slots: usize) -> Result<Self> {
        let dev = cuda_device(&model.device)?;
        let n = num_slots * model.config.kv_dim();
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..model.config.num_layers {
            k.push(dev.alloc_zeros::<bf16>(n).map_err(cuda_err)?);
            v.push(dev.alloc_zeros::<bf16>(n).map_err(cuda_err)?);
        }
        Ok(Self { k, v, num_slots })
    }

    pub fn num_slots(&self) -> usize {
        self.num_slots
    }
}

/// Where a tensor's weights come from.
enum Source<'a> {
    Gguf(&'a mut crate::gguf::GgufModelFile, &'a Path),
    Hf(std::collections::HashMap<String, Tensor>),
    Dummy,
}

impl Source<'_> {
    /// A weight by its Hugging Face name, as bf16 on `device`, checked against `shape`.
    fn get(&mut self, hf_name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = match self {
            Source::Gguf(f, path) => {
                let name = gguf_name(hf_name);
                f.tensor(&name, path)?
                    .dequantize(&Device::Cpu)?
                    .to_dtype(DType::BF16)?
                    .to_device(device)?
            }
            Source::Hf(map) => map
                .remove(hf_name)
                .ok_or_else(|| ModelError::MissingTensor(hf_name.to_string()))?
                .to_dtype(DType::BF16)?,
            Source::Dummy => {
                if hf_name.ends_with("norm.weight") {
                    Tensor::ones(shape, DType::BF16, device)?
                } else {
                    // Small random weights keep activations finite through many layers.
                    Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(DType::BF16)?
                }
            }
        };
        if t.dims() != shape {
            return Err(ModelError::BadShape {
                name: hf_name.into(),
                actual: t.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(t)
    }
}

/// The GGUF name of a Hugging Face tensor name.
fn gguf_name(hf: &str) -> String {
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        let (i, what) = rest.split_once('.').unwrap_or((rest, ""));
        let mapped = match what {
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.q_proj.bias" => "attn_q.bias",
            "self_attn.k_proj.bias" => "attn_k.bias",
            "self_attn.v_proj.bias" => "attn_v.bias",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            "input_layernorm.weight" => "attn_norm.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            other => other,
        };
        return format!("blk.{i}.{mapped}");
    }
    match hf {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        other => other.into(),
    }
}

/// A GPU model with its text side.
pub struct LoadedCuda {
    pub model: CudaLlama,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
}

/// Loads a GGUF file or a Hugging Face folder onto the GPU in bf16.
pub fn load(path: &Path, device: &Device) -> Result<LoadedCuda> {
    if !path.exists() {
        return Err(ModelError::NotFound(path.to_path_buf()));
    }
    if path.is_dir() {
        let (config, tokenizer, chat_template) = crate::hf::open_hf(path)?;
        let mut tensors = std::collections::HashMap::new();
        for file in crate::hf::weight_files(path)? {
            let loaded = candle_core::safetensors::load(&file, device)
                .map_err(|e| ModelError::BadConfig(format!("{}: {e}", file.display())))?;
            tensors.extend(loaded);
        }
        let model = CudaLlama::build(config, Source::Hf(tensors), device)?;
        Ok(LoadedCuda {
            model,
            tokenizer,
            chat_template,
        })
    } else {
        let mut file = crate::gguf::open_gguf(path, &Device::Cpu)?;
        let config = file.config.clone();
        let model = CudaLlama::build(config, Source::Gguf(&mut file, path), device)?;
        Ok(LoadedCuda {
            model,
            tokenizer: file.tokenizer,
            chat_template: file.chat_template,
        })
    }
}

/// Random weights of the shapes a Hugging Face `config.json` describes (`--load-format
/// dummy`), made on the GPU; a stand-in tokenizer of the model's vocabulary size.
pub fn load_dummy(config_path: &Path, device: &Device, seed: u64) -> Result<LoadedCuda> {
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
    let config = crate::hf::parse_config(&json)?;
    device.set_seed(seed)?;
    let tokenizer = Tokenizer::placeholder(config.vocab_size)?;
    let model = CudaLlama::build(config, Source::Dummy, device)?;
    let chat_template = ChatTemplate::new(crate::chat::CHATML_TEMPLATE, "", "")?;
    Ok(LoadedCuda {
        model,
        tokenizer,
        chat_template,
    })
}

impl CudaLlama {
    fn build(config: ModelConfig, mut src: Source, device: &Device) -> Result<Self> {
        config.validate()?;
        if config.head_dim % 2 != 0 || config.head_dim > 256 {
            return Err(ModelError::BadConfig(format!(
                "the CUDA kernels need an even head_dim up to 256, got {}",
                config.head_dim
            )));
        }
        let (h, q, kv, f) = (
            config.hidden_size,
            config.q_dim(),
            config.kv_dim(),
            config.intermediate_size,
        );
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            let mut w =
                |name: &str, shape: &[usize]| src.get(&format!("{p}.{name}"), shape, device);
            let qkv = Tensor::cat(
                &[
                    w("self_attn.q_proj.weight", &[q, h])?,
                    w("self_attn.k_proj.weight", &[kv, h])?,
                    w("self_attn.v_proj.weight", &[kv, h])?,
                ],
                0,
            )?;
            let qkv_bias = if config.qkv_bias {
                Some(Tensor::cat(
                    &[
                        w("self_attn.q_proj.bias", &[q])?,
                        w("self_attn.k_proj.bias", &[kv])?,
                        w("self_attn.v_proj.bias", &[kv])?,
                    ],
                    0,
                )?)
            } else {
                None
            };
            let gate_up = Tensor::cat(
                &[
                    w("mlp.gate_proj.weight", &[f, h])?,
                    w("mlp.up_proj.weight", &[f, h])?,
                ],
                0,
            )?;
            layers.push(CudaLayer {
                attn_norm: w("input_layernorm.weight", &[h])?,
                qkv,
                qkv_bias,
                wo: w("self_attn.o_proj.weight", &[h, q])?,
                ffn_norm: w("post_attention_layernorm.weight", &[h])?,
                gate_up,
                down: w("mlp.down_proj.weight", &[h, f])?,
            });
        }
        let embed = src.get("model.embed_tokens.weight", &[config.vocab_size, h], device)?;
        let final_norm = src.get("model.norm.weight", &[h], device)?;
        let lm_head = if config.tie_word_embeddings {
            embed.clone()
        } else {
            src.get("lm_head.weight", &[config.vocab_size, h], device)?
        };
        let rope = Rope::new(&config);
        let (cos, sin) = rope.full_tables(config.max_position_embeddings);
        let stream = cuda_device(device)?.cuda_stream();
        Ok(Self {
            cos: stream.clone_htod(&cos).map_err(cuda_err)?,
            sin: stream.clone_htod(&sin).map_err(cuda_err)?,
            config,
            embed,
            layers,
            final_norm,
            lm_head,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of GPU memory free now (after the weights): the KV pool's budget.
    pub fn free_memory_bytes(&self) -> Option<usize> {
        let dev = cuda_device(&self.device).ok()?;
        dev.cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free)
    }

    /// Runs one step, like [`crate::Llama::forward`].
    pub fn forward(&self, batch: &[SeqStep], kv: &mut CudaKvPool) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.config;
        let dev = cuda_device(&self.device)?;
        let stream = dev.cuda_stream();
        let (nh, nkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut new_slots = Vec::new();
        let mut logit_rows: Vec<u32> = Vec::new();
        for s in batch {
            s.validate(cfg, kv.num_slots)?;
            let past = s.slots.len() - s.tokens.len();
            tokens.extend_from_slice(s.tokens);
            positions.extend((past..s.slots.len()).map(|p| p as u32));
            new_slots.extend_from_slice(&s.slots[past..]);
            match s.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => logit_rows.push((tokens.len() - 1) as u32),
                LogitsWanted::All => {
                    logit_rows.extend((tokens.len() - s.tokens.len()) as u32..tokens.len() as u32)
                }
            }
        }
        let t = tokens.len();
        if t == 0 {
            return Ok(Vec::new());
        }
        let up = |v: &[u32]| stream.clone_htod(v).map_err(cuda_err);
        let (positions_d, new_slots_d) = (up(&positions)?, up(&new_slots)?);
        let slot_lists =
            SlotLists::build(dev, batch.iter().map(|s| (s.slots, s.tokens.len())), nh, d)?;
        let mut parts = AttnPartials::new(dev, t, nh, d, &slot_lists)?;

        let ids = Tensor::from_vec(tokens, t, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let mut prof = Profiler::start(dev);
        prof.mark("embed");
        let eps = cfg.rms_norm_eps;
        let interleaved = i32::from(cfg.rope_style == RopeStyle::Interleaved);
        let (ti, nhi, nkvi, di) = (t as i32, nh as i32, nkv as i32, d as i32);
        // The first RMSNorm alone; every later one is fused with the residual add before it.
        let mut h = candle_nn::ops::rms_norm(&x, &self.layers[0].attn_norm, eps)?;
        prof.mark("rms_norm");
        for (l, layer) in self.layers.iter().enumerate() {
            let mut qkv = h.matmul(&layer.qkv.t()?)?;
            if let Some(b) = &layer.qkv_bias {
                qkv = qkv.broadcast_add(b)?;
            }
            let qkv = qkv.contiguous()?;
            prof.mark("matmul_qkv");
            // Safety: the kernel writes all T x H x D elements of q.
            let mut q = unsafe { dev.alloc::<bf16>(t * nh * d) }?;
            {
                let (st, lay) = qkv.storage_and_layout();
                let qkv_s = slice_of::<bf16>(&st, lay)?;
                let pairs = t * (nh + 2 * nkv) * (d / 2);
                let func = dev.get_or_load_custom_func("arbor_qkv_rope_write", MODULE, PTX)?;
                let mut b = func.builder();
                b.arg(&qkv_s)
                    .arg(&positions_d)
                    .arg(&new_slots_d)
                    .arg(&self.cos)
                    .arg(&self.sin)
                    .arg(&mut q)
                    .arg(&mut kv.k[l])
                    .arg(&mut kv.v[l])
                    .arg(&ti)
                    .arg(&nhi)
                    .arg(&nkvi)
                    .arg(&di)
                    .arg(&interleaved);
                // Safety: argument types and order match the kernel's signature; every index
                // it computes is bounded by the sizes passed (slots were checked above).
                unsafe { b.launch(LaunchConfig::for_num_elems(pairs as u32)) }.w()?;
            }
            prof.mark("qkv_rope_write");
            let attn = attention(
                dev,
                &q,
                &kv.k[l],
                &kv.v[l],
                &slot_lists,
                AttnDims {
                    rows: t,
                    heads: nh,
                    kv_heads: nkv,
                    head_dim: d,
                },
                &mut parts,
            )?;
            prof.mark("attention");
            let attn = wrap(attn, dev, (t, nh * d));
            let o = attn.matmul(&layer.wo.t()?)?;
            prof.mark("matmul_wo");
            (x, h) = add_rms_norm(dev, &x, &o, &layer.ffn_norm, eps)?;
            prof.mark("add+rms_norm");
            let gu = h.matmul(&layer.gate_up.t()?)?.contiguous()?;
            prof.mark("matmul_gate_up");
            let ffn = cfg.intermediate_size;
            // Safety: the kernel writes all T x F elements.
            let mut act = unsafe { dev.alloc::<bf16>(t * ffn) }?;
            {
                let (st, lay) = gu.storage_and_layout();
                let gu_s = slice_of::<bf16>(&st, lay)?;
                let func = dev.get_or_load_custom_func("arbor_silu_mul", MODULE, PTX)?;
                let fi = ffn as i32;
                let mut b = func.builder();
                b.arg(&gu_s).arg(&mut act).arg(&ti).arg(&fi);
                // Safety: one thread per output element.
                unsafe { b.launch(LaunchConfig::for_num_elems((t * ffn) as u32)) }.w()?;
            }
            prof.mark("silu_mul");
            let act = wrap(act, dev, (t, ffn));
            let down = act.matmul(&layer.down.t()?)?;
            prof.mark("matmul_down");
            let next_norm = self
                .layers
                .get(l + 1)
                .map_or(&self.final_norm, |next| &next.attn_norm);
            (x, h) = add_rms_norm(dev, &x, &down, next_norm, eps)?;
            prof.mark("add+rms_norm");
        }
        if logit_rows.is_empty() {
            return Ok(Vec::new());
        }
        let n_rows = logit_rows.len();
        let rows = Tensor::from_vec(logit_rows, n_rows, &self.device)?;
        // `h` holds every row after the final norm (fused into the last layer's add).
        let normed = h.index_select(&rows, 0)?;
        let logits = normed.matmul(&self.lm_head.t()?)?.to_dtype(DType::F32)?;
        prof.mark("lm_head");
        let logits = logits.to_vec2::<f32>()?;
        prof.mark("copy_out");
        Ok(logits)
    }
}

/// Per-section GPU time of forward steps, when `ARBOR_CUDA_PROFILE=1`: each mark waits for
/// the GPU, so profiling slows the steps down; it says where the time goes, not how long a
/// step takes.
struct Profiler {
    stream: Option<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>>,
    last: std::time::Instant,
}

static PROFILE: std::sync::Mutex<Vec<(&'static str, f64, u64)>> = std::sync::Mutex::new(Vec::new());

fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ARBOR_CUDA_PROFILE").is_ok_and(|v| v == "1"))
}

impl Profiler {
    fn start(dev: &CudaDevice) -> Self {
        let stream = profiling().then(|| dev.cuda_stream());
        if let Some(s) = &stream {
            let _ = s.synchronize();
        }
        Self {
            stream,
            last: std::time::Instant::now(),
        }
    }

    fn mark(&mut self, name: &'static str) {
        let Some(s) = &self.stream else { return };
        let _ = s.synchronize();
        let now = std::time::Instant::now();
        let dt = (now - self.last).as_secs_f64();
        self.last = now;
        let mut p = PROFILE.lock().unwrap_or_else(|e| e.into_inner());
        match p.iter_mut().find(|e| e.0 == name) {
            Some(e) => {
                e.1 += dt;
                e.2 += 1;
            }
            None => p.push((name, dt, 1)),
        }
    }
}

/// The profile gathered so far (see `ARBOR_CUDA_PROFILE`), and clears it.
pub fn take_profile() -> Vec<(&'static str, f64, u64)> {
    std::mem::take(&mut *PROFILE.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The slot lists of one step, on the GPU: query row r attends keys `0..row_keys[r]` of the
/// list starting at `flat[row_offset[r]]` (its sequence's slots; causal within the chunk).
/// Rows of prefill chunks go to the tiled kernel in tiles of up to `TILE_ROWS` consecutive
/// rows of one sequence; decode rows to the warp-per-row kernel.
pub struct SlotLists {
    flat: CudaSlice<u32>,
    row_offset: CudaSlice<u32>,
    row_keys: CudaSlice<u32>,
    decode_rows: CudaSlice<u32>,
    n_decode: usize,
    tile_row0: CudaSlice<u32>,
    tile_rows: CudaSlice<u32>,
    n_tiles: usize,
    max_keys: usize,
    split_len: usize,
}

impl SlotLists {
    /// From each sequence's whole slot list and its number of new tokens (queries).
    fn build<'a>(
        dev: &CudaDevice,
        seqs: impl Iterator<Item = (&'a [u32], usize)>,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let (mut flat, mut off, mut keys) = (Vec::new(), Vec::new(), Vec::new());
        let (mut decode, mut tile0, mut tile_n) = (Vec::new(), Vec::new(), Vec::new());
        let tiled = head_dim <= TILE_MAX_HEAD_DIM;
        for (slots, n_new) in seqs {
            let o = flat.len() as u32;
            flat.extend_from_slice(slots);
            let past = slots.len() - n_new;
            let first_row = off.len();
            for i in 0..n_new {
                off.push(o);
                keys.push((past + i + 1) as u32);
            }
            if tiled && n_new > 1 {
                for start in (0..n_new).step_by(TILE_ROWS) {
                    tile0.push((first_row + start) as u32);
                    tile_n.push(TILE_ROWS.min(n_new - start) as u32);
                }
            } else {
                decode.extend((first_row..first_row + n_new).map(|r| r as u32));
            }
        }
        let stream = dev.cuda_stream();
        // An empty list still gets one (unused) element: no zero-sized allocations.
        let up = |v: &[u32]| {
            let v = if v.is_empty() { &[0u32][..] } else { v };
            stream.clone_htod(v).map_err(cuda_err)
        };
        let max_keys = keys.iter().copied().max().unwrap_or(1) as usize;
        let split_len = if tile0.is_empty() {
            let warps_per_split = (decode.len() * heads).max(1);
            let splits = (DECODE_TARGET_WARPS / warps_per_split).clamp(1, max_keys.div_ceil(32));
            max_keys.div_ceil(splits).next_multiple_of(32)
        } else {
            SPLIT_LEN_PREFILL
        };
        Ok(Self {
            max_keys,
            split_len,
            flat: up(&flat)?,
            row_offset: up(&off)?,
            row_keys: up(&keys)?,
            n_decode: decode.len(),
            decode_rows: up(&decode)?,
            n_tiles: tile0.len(),
            tile_row0: up(&tile0)?,
            tile_rows: up(&tile_n)?,
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    pub rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Per-split partial results of the attention kernels (reused by every layer of a step).
pub struct AttnPartials {
    o: CudaSlice<f32>,
    m: CudaSlice<f32>,
    l: CudaSlice<f32>,
    splits: usize,
}

impl AttnPartials {
    fn new(
        dev: &CudaDevice,
        rows: usize,
        heads: usize,
        d: usize,
        lists: &SlotLists,
    ) -> Result<Self> {
        let splits = lists.max_keys.div_ceil(lists.split_len).max(1);
        let n = rows * heads * splits;
        // Safety: the attention kernels write every (row, head, split) entry before the merge
        // kernel reads it.
        Ok(Self {
            o: unsafe { dev.alloc::<f32>(n * d) }?,
            m: unsafe { dev.alloc::<f32>(n) }?,
            l: unsafe { dev.alloc::<f32>(n) }?,
            splits,
        })
    }
}

/// Attention of every query row over its slot list, split along the keys, then merged:
/// returns `[rows, heads, head_dim]` bf16.
fn attention(
    dev: &CudaDevice,
    q: &CudaSlice<bf16>,
    k_pool: &CudaSlice<bf16>,
    v_pool: &CudaSlice<bf16>,
    lists: &SlotLists,
    dims: AttnDims,
    parts: &mut AttnPartials,
) -> Result<CudaSlice<bf16>> {
    let AttnDims {
        rows,
        heads,
        kv_heads,
        head_dim,
    } = dims;
    let (hi, kvi, di) = (heads as i32, kv_heads as i32, head_dim as i32);
    let (splits_i, split_len_i) = (parts.splits as i32, lists.split_len as i32);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let group = heads / kv_heads;
    // Decode rows: the GQA kernel (one block per (row, KV head, split), one warp per query
    // head) where its shared memory fits, else a warp per (row, head, split). Both take the
    // same arguments.
    let gqa_smem = (group * head_dim + 2 * 32 * (head_dim + 1) + 32) * 4;
    let use_gqa = head_dim % 8 == 0 && group * 32 <= 1024 && gqa_smem <= 48 * 1024;
    if lists.n_decode > 0 {
        let (name, cfg) = if use_gqa {
            let cfg = LaunchConfig {
                grid_dim: (lists.n_decode as u32, kv_heads as u32, parts.splits as u32),
                block_dim: (32 * group as u32, 1, 1),
                shared_mem_bytes: gqa_smem as u32,
            };
            ("arbor_attention_gqa", cfg)
        } else {
            let cfg = LaunchConfig {
                grid_dim: (lists.n_decode as u32, heads as u32, parts.splits as u32),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            };
            ("arbor_attention", cfg)
        };
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(q)
            .arg(k_pool)
            .arg(v_pool)
            .arg(&lists.flat)
            .arg(&lists.row_offset)
            .arg(&lists.row_keys)
            .arg(&lists.decode_rows)
            .arg(&mut parts.o)
            .arg(&mut parts.m)
            .arg(&mut parts.l)
            .arg(&hi)
            .arg(&kvi)
            .arg(&di)
            .arg(&splits_i)
            .arg(&split_len_i)
            .arg(&scale);
        // Safety: argument types and order match both decode kernels' signatures; each block
        // reads only its row's slot list (checked against the pool size by the caller) and
        // writes only its own (row, head, split) partial entries.
        unsafe { b.launch(cfg) }.w()?;
    }
    if lists.n_tiles > 0 {
        let func = dev.get_or_load_custom_func("arbor_attention_tiled", MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(q)
            .arg(k_pool)
            .arg(v_pool)
            .arg(&lists.flat)
            .arg(&lists.row_offset)
            .arg(&lists.row_keys)
            .arg(&lists.tile_row0)
            .arg(&lists.tile_rows)
            .arg(&mut parts.o)
            .arg(&mut parts.m)
            .arg(&mut parts.l)
            .arg(&hi)
            .arg(&kvi)
            .arg(&di)
            .arg(&splits_i)
            .arg(&split_len_i)
            .arg(&scale);
        // qs [16][D] + ks, vs [32][D + 1] floats + 32 slot ids (kernels.cu).
        let smem = (TILE_ROWS * head_dim + 2 * 32 * (head_dim + 1) + 32) * 4;
        let cfg = LaunchConfig {
            grid_dim: (lists.n_tiles as u32, heads as u32, parts.splits as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // Safety: as above; one block per (tile, head, split) writes the partial entries of its
        // tile's rows only; shared memory is sized for head_dim <= TILE_MAX_HEAD_DIM.
        unsafe { b.launch(cfg) }.w()?;
    }
    // Safety: the merge kernel writes every element of its output.
    let mut out = unsafe { dev.alloc::<bf16>(rows * heads * head_dim) }?;
    let func = dev.get_or_load_custom_func("arbor_attention_merge", MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&parts.o)
        .arg(&parts.m)
        .arg(&parts.l)
        .arg(&mut out)
        .arg(&hi)
        .arg(&di)
        .arg(&splits_i);
    // Up to four split groups per output dim (kernels.cu), no more groups than splits (a
    // batch of decodes has few splits per row), at least a warp.
    let threads = (head_dim * parts.splits.min(4))
        .clamp(32, 512)
        .next_multiple_of(32);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, heads as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: ((parts.splits + threads) * 4) as u32,
    };
    // Safety: one block per (row, head) reading that entry's splits; shared memory holds one
    // weight per split and one partial sum per thread.
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}

/// One sequence of a kernel check: its slot list and how many of its last tokens are queries.
#[derive(Debug, Clone)]
pub struct CheckSeq {
    pub slots: Vec<u32>,
    pub n_new: usize,
}

/// Runs the attention kernels on host data (rounded to bf16 on the way in), for checks
/// against a float reference: q `[rows, heads, d]`, pools `[slots, kv_heads, d]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_on_host(
    device: &Device,
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    seqs: &[CheckSeq],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<Vec<f32>> {
    let dev = cuda_device(device)?;
    let stream = dev.cuda_stream();
    let to_bf16 = |x: &[f32]| x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>();
    let up_bf16 = |x: &[f32]| stream.clone_htod(&to_bf16(x)).map_err(cuda_err);
    let (q_d, k_d, v_d) = (up_bf16(q)?, up_bf16(k_pool)?, up_bf16(v_pool)?);
    let lists = SlotLists::build(
        dev,
        seqs.iter().map(|s| (&s.slots[..], s.n_new)),
        heads,
        head_dim,
    )?;
    let rows: usize = seqs.iter().map(|s| s.n_new).sum();
    let mut parts = AttnPartials::new(dev, rows, heads, head_dim, &lists)?;
    let dims = AttnDims {
        rows,
        heads,
        kv_heads,
        head_dim,
    };
    let out = attention(dev, &q_d, &k_d, &v_d, &lists, dims, &mut parts)?;
    let host: Vec<bf16> = stream.clone_dtoh(&out).map_err(cuda_err)?;
    Ok(host.into_iter().map(f32::from).collect())
}

/// `x + y` and the RMSNorm of it with weight `w`, in one kernel: returns both, `[T, n]` bf16.
fn add_rms_norm(
    dev: &CudaDevice,
    x: &Tensor,
    y: &Tensor,
    w: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let (t, n) = x.dims2()?;
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    // Safety: the kernel writes every element of both outputs.
    let mut x_out = unsafe { dev.alloc::<bf16>(t * n) }?;
    let mut h_out = unsafe { dev.alloc::<bf16>(t * n) }?;
    {
        let (xs, xl) = x.storage_and_layout();
        let (ys, yl) = y.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (x_s, y_s, w_s) = (
            slice_of::<bf16>(&xs, xl)?,
            slice_of::<bf16>(&ys, yl)?,
            slice_of::<bf16>(&ws, wl)?,
        );
        let func = dev.get_or_load_custom_func("arbor_add_rmsnorm", MODULE, PTX)?;
        let (ni, epsf) = (n as i32, eps);
        let mut b = func.builder();
        b.arg(&x_s)
            .arg(&y_s)
            .arg(&w_s)
            .arg(&mut x_out)
            .arg(&mut h_out)
            .arg(&ni)
            .arg(&epsf);
        let cfg = LaunchConfig {
            grid_dim: (t as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // Safety: one block per row reads and writes that row only (n elements).
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((wrap(x_out, dev, (t, n)), wrap(h_out, dev, (t, n))))
}

/// The device slice behind a contiguous tensor, from its offset on.
fn slice_of<'a, T: candle_core::cuda_backend::CudaDType>(
    storage: &'a Storage,
    layout: &candle_core::Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let Storage::Cuda(cs) = storage else {
        return Err(ModelError::Cuda("expected a CUDA tensor".into()));
    };
    if !layout.is_contiguous() {
        return Err(ModelError::Cuda("expected a contiguous tensor".into()));
    }
    let s = cs.as_cuda_slice::<T>()?;
    Ok(s.slice(layout.start_offset()..))
}

fn wrap(slice: CudaSlice<bf16>, dev: &CudaDevice, shape: (usize, usize)) -> Tensor {
    let storage = CudaStorage::wrap_cuda_slice(slice, dev.clone());
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

// Keeps BackendStorage in scope for `device()` on storages in future kernels.
#[allow(dead_code)]
fn _storage_device(s: &CudaStorage) -> &CudaDevice {
    s.device()
}
