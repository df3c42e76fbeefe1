//! The CUDA backend: the Llama forward pass on one NVIDIA GPU, in bf16.
//!
//! Weights live on the GPU in bf16 (Hugging Face safetensors as they are; GGUF tensors
//! dequantized at load, or kept in their block format with [`GgufWeights::Quantized`]; or
//! random for `--load-format dummy`), linear layers go through cuBLAS (or candle's quantized
//! kernels), and Arbor's own kernels (`kernels.cu`) do what candle lacks:
//!
//! ```text
//!  x --add+rms_norm--> h --matmul(Wqkv)--> qkv --arbor_qkv_rope_write--> q, and K/V into slots
//!  q, slot lists --attention (tensor cores, split along keys)--> partials --merge--> o
//!  x += o Wo (fused with the next RMSNorm);  gu = h Wgate_up;  act = silu_mul(gu);  x += act Wdown
//! ```
//!
//! The KV pool is one bf16 buffer per layer for K and one for V, `[slots, kv_heads, head_dim]`,
//! owned here (not candle tensors) because the kernels write into it in place. Attention runs
//! on the tensor-core kernel where the head shape allows ([`AttnKernel`]), else on the CUDA-core
//! kernels; both write per-split partial results that one merge kernel combines.

use std::path::Path;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, LaunchArgs, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Storage, Tensor};
use half::bf16;

pub use candle_core::quantized::GgmlDType;

use crate::config::{ModelConfig, RopeStyle};
use crate::error::{ModelError, Result};
use crate::rope::Rope;
use crate::step::{FlatStep, SeqStep};
use crate::weights::{LayerWeight as L, Stored, Weight, WeightSource};
use crate::{ChatTemplate, Tokenizer};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/arbor_kernels.ptx"));
const MODULE: &str = "arbor_kernels";
/// Decode steps cut each context into splits that run in parallel and are merged
/// (flash-decoding), as many as it takes to give the GPU about this many warps: one sequence
/// of 512 tokens needs short splits (128-key splits left the first kernel latency-bound at
/// 100 us a layer on the H200), while 64 sequences fill the GPU with one split each (and many
/// splits would cost more in partial results and merging than they save). Set per model with
/// [`CudaOptions::decode_target_warps`] (benchmarking).
pub const DECODE_TARGET_WARPS: usize = crate::runner::DEFAULT_DECODE_TARGET_WARPS;
/// Steps with prefill chunks on the tensor-core kernel get enough splits for about this many
/// blocks (about four waves of its two 128-thread blocks per SM on an H200): a long prompt's
/// tiles fill the GPU unsplit, while a short chunk over a long cached prefix (a follow-up turn)
/// is cut along its keys.
const PREFILL_TARGET_BLOCKS: usize = 1024;
/// Keys per split for the CUDA-core prefill kernel (shapes the tensor-core kernel lacks).
const SPLIT_LEN_PREFILL: usize = 1024;
/// Query rows per CUDA-core prefill tile (`QT` in kernels.cu) and the largest head_dim whose
/// tile fits the default 48 KiB of shared memory.
const TILE_ROWS: usize = 16;
const TILE_MAX_HEAD_DIM: usize = 128;
/// Keys per shared-memory stage of the tensor-core kernel (`MMA_KT`) and its flat rows per
/// prefill block (4 warps of 16).
const MMA_KEYS: usize = 64;
const MMA_BLOCK_ROWS: usize = 64;

/// The attention kernels a head shape runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnKernel {
    /// `arbor_attention_mma_d{64,128}`: tensor cores, for head_dim 64 or 128 and query groups
    /// of up to 64 heads per KV head (every Llama, Qwen2 and Mistral size).
    TensorCore,
    /// The CUDA-core kernels (`arbor_attention_gqa`/`arbor_attention` for decode rows,
    /// `arbor_attention_tiled` for prefill tiles): any even head_dim up to 256.
    CudaCore,
}

impl AttnKernel {
    /// The fastest kernel that supports the shape; `force_cuda_core` takes the CUDA-core
    /// kernels anyway ([`CudaOptions::force_cuda_core_attention`], A/B benchmarks).
    pub fn for_shape(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        force_cuda_core: bool,
    ) -> Self {
        if !force_cuda_core && Self::tensor_core_fits(heads, kv_heads, head_dim) {
            Self::TensorCore
        } else {
            Self::CudaCore
        }
    }

    pub fn tensor_core_fits(heads: usize, kv_heads: usize, head_dim: usize) -> bool {
        matches!(head_dim, 64 | 128) && heads / kv_heads <= MMA_BLOCK_ROWS
    }
}

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

pub use crate::runner::{CudaOptions, GgufWeights};

/// A linear layer's weight, `[out, in]`.
#[derive(Debug)]
enum GpuLinear {
    Dense(Tensor),
    Quantized(candle_core::quantized::QMatMul),
}

/// Activation rows up to which [`CudaOptions::gemv_for_one_row`] runs dense linear layers
/// through Arbor's GEMV kernel (`arbor_gemv_m1`) instead of cuBLAS (an A/B experiment; cuBLAS
/// measured as fast or faster, docs/BENCHMARKS.md).
const GEMV_MAX_ROWS: usize = 1;

impl GpuLinear {
    /// `x [T, in] -> [T, out]`, bf16, through cuBLAS (or candle's quantized kernels).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, false)
    }

    /// [`GpuLinear::forward`], one-row dense layers through Arbor's GEMV kernel with `gemv`.
    fn forward_with(&self, x: &Tensor, gemv_enabled: bool) -> Result<Tensor> {
        use candle_core::Module;
        Ok(match self {
            Self::Dense(w) if gemv_enabled && gemv_fits(x, w) => gemv(x, w)?,
            Self::Dense(w) => x.matmul(&w.t()?)?,
            Self::Quantized(q) => q.forward(x)?,
        })
    }
}

fn gemv_fits(x: &Tensor, w: &Tensor) -> bool {
    let (Ok((m, k)), Ok((_, wk))) = (x.dims2(), w.dims2()) else {
        return false;
    };
    // 16-byte loads: rows of whole 8-element pieces starting on a piece boundary.
    (1..=GEMV_MAX_ROWS).contains(&m)
        && k == wk
        && k % 8 == 0
        && x.dtype() == DType::BF16
        && w.dtype() == DType::BF16
        && w.is_contiguous()
        && w.layout().start_offset().is_multiple_of(8)
}

/// `x W^T` through `arbor_gemv_m{rows}` (see [`GEMV_MAX_ROWS`]).
fn gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dev = cuda_device(x.device())?;
    let (m, k) = x.dims2()?;
    let n = w.dims2()?.0;
    let x = if x.is_contiguous() && x.layout().start_offset().is_multiple_of(8) {
        x.clone()
    } else {
        x.copy()?
    };
    // Safety: the kernel writes all m x n outputs.
    let mut y = unsafe { dev.alloc::<bf16>(m * n) }?;
    {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (x_s, w_s) = (slice_of::<bf16>(&xs, xl)?, slice_of::<bf16>(&ws, wl)?);
        let func = dev.get_or_load_custom_func("arbor_gemv_m1", MODULE, PTX)?;
        let (ni, ki) = (n as i32, k as i32);
        let mut b = func.builder();
        b.arg(&x_s).arg(&w_s).arg(&mut y).arg(&ni).arg(&ki);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(4) as u32, 1, 1), // GEMV_WARPS rows per block
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // Safety: one warp per output row reads that row of w (k elements) and the m rows of
        // x; both are contiguous bf16 starting at 16-byte boundaries (checked by gemv_fits
        // and above), k % 8 == 0.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(wrap(y, dev, (m, n)))
}

/// Arbor's GEMV against cuBLAS on random data: `(rows, out, in, max |difference| / max |y|)`
/// per shape (the 8B shape's layers, the default model's, an odd small one).
pub fn gemv_check(device: &Device) -> Result<Vec<(usize, usize, usize, f64)>> {
    let mut rows = Vec::new();
    for (n, k) in [(6144, 4096), (4096, 14336), (1000, 576), (37, 8)] {
        let w = Tensor::randn(0f32, 0.02, (n, k), device)?.to_dtype(DType::BF16)?;
        for m in 1..=GEMV_MAX_ROWS {
            let x = Tensor::randn(0f32, 1.0, (m, k), device)?.to_dtype(DType::BF16)?;
            let ours = gemv(&x, &w)?.to_dtype(DType::F32)?;
            let theirs = x.matmul(&w.t()?)?.to_dtype(DType::F32)?;
            let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = theirs.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
            rows.push((m, n, k, f64::from(diff / scale)));
        }
    }
    Ok(rows)
}

#[derive(Debug)]
pub struct CudaLayer {
    attn_norm: Tensor,
    /// `[(H + 2 KVH) D, hidden]`: Q, K and V projections stacked.
    qkv: GpuLinear,
    qkv_bias: Option<Tensor>,
    wo: GpuLinear,
    ffn_norm: Tensor,
    /// `[2 F, hidden]`: gate then up.
    gate_up: GpuLinear,
    down: GpuLinear,
}

#[derive(Debug)]
pub struct CudaLlama {
    pub config: ModelConfig,
    embed: Tensor,
    layers: Vec<CudaLayer>,
    final_norm: Tensor,
    lm_head: GpuLinear,
    /// `[max_pos, D/2]` f32 RoPE tables (the CPU path's angles, so both agree).
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    device: Device,
    options: CudaOptions,
    /// Page-locked host memory the logits are copied into, grown as needed: a pageable copy
    /// ran at about 1 GB/s on the H200 machine's host (38 ms a step for 64 rows of 128k).
    logits_host: std::sync::Mutex<Option<PinnedHostSlice<f32>>>,
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

/// Random weights of a config's shapes, made on the GPU (`--load-format dummy`).
struct DummyWeights {
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
fn dense_bf16(t: Stored, device: &Device) -> Result<Tensor> {
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
fn gpu_linear(
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

impl CudaLlama {
    /// The model from `src`: bf16 weights, or GGUF blocks kept as they are with
    /// `keep_quantized` (see [`GgufWeights`]).
    fn build(
        src: &mut dyn WeightSource,
        keep_quantized: bool,
        options: CudaOptions,
        device: &Device,
    ) -> Result<Self> {
        let config = src.config().clone();
        config.validate()?;
        if !config.head_dim.is_multiple_of(2) || config.head_dim > 256 {
            return Err(ModelError::BadConfig(format!(
                "the CUDA kernels need an even head_dim up to 256, got {}",
                config.head_dim
            )));
        }
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let w = |role: L| Weight::Layer(i, role);
            let qkv = gpu_linear(src, &[w(L::Q), w(L::K), w(L::V)], keep_quantized, device)?;
            let qkv_bias = if config.qkv_bias {
                let mut b = |role: L| dense_bf16(src.get(w(role))?, device);
                Some(Tensor::cat(&[b(L::QBias)?, b(L::KBias)?, b(L::VBias)?], 0)?)
            } else {
                None
            };
            let gate_up = gpu_linear(src, &[w(L::Gate), w(L::Up)], keep_quantized, device)?;
            let wo = gpu_linear(src, &[w(L::O)], keep_quantized, device)?;
            let down = gpu_linear(src, &[w(L::Down)], keep_quantized, device)?;
            layers.push(CudaLayer {
                attn_norm: dense_bf16(src.get(w(L::AttnNorm))?, device)?,
                qkv,
                qkv_bias,
                wo,
                ffn_norm: dense_bf16(src.get(w(L::FfnNorm))?, device)?,
                gate_up,
                down,
            });
        }
        let embed = dense_bf16(src.get(Weight::TokenEmbedding)?, device)?;
        let final_norm = dense_bf16(src.get(Weight::FinalNorm)?, device)?;
        let lm_head = if config.tie_word_embeddings {
            GpuLinear::Dense(embed.clone())
        } else {
            gpu_linear(src, &[Weight::LmHead], keep_quantized, device)?
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
            options,
            logits_host: std::sync::Mutex::new(None),
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
        let FlatStep {
            tokens,
            positions,
            new_slots,
            logit_rows,
        } = FlatStep::gather(batch, cfg, kv.num_slots)?;
        let positions: Vec<u32> = positions.into_iter().map(|p| p as u32).collect();
        let t = tokens.len();
        if t == 0 {
            return Ok(Vec::new());
        }
        let up = |v: &[u32]| stream.clone_htod(v).map_err(cuda_err);
        let (positions_d, new_slots_d) = (up(&positions)?, up(&new_slots)?);
        let dims = AttnDims {
            rows: t,
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
        };
        let slot_lists = SlotLists::build(
            dev,
            batch.iter().map(|s| (s.slots, s.tokens.len())),
            dims,
            AttnKernel::for_shape(nh, nkv, d, self.options.force_cuda_core_attention),
            self.options.decode_target_warps,
        )?;
        let mut parts = AttnPartials::new(dev, t, nh, d, &slot_lists)?;

        let ids = Tensor::from_vec(tokens, t, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let mut prof = Profiler::start(dev, self.options.profile);
        let gemv = self.options.gemv_for_one_row;
        prof.mark("embed");
        let eps = cfg.rms_norm_eps;
        let interleaved = i32::from(cfg.rope_style == RopeStyle::Interleaved);
        let (ti, nhi, nkvi, di) = (t as i32, nh as i32, nkv as i32, d as i32);
        // The first RMSNorm alone; every later one is fused with the residual add before it.
        let mut h = candle_nn::ops::rms_norm(&x, &self.layers[0].attn_norm, eps)?;
        prof.mark("rms_norm");
        for (l, layer) in self.layers.iter().enumerate() {
            let mut qkv = layer.qkv.forward_with(&h, gemv)?;
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
            let attn = attention(dev, &q, &kv.k[l], &kv.v[l], &slot_lists, dims, &mut parts)?;
            prof.mark("attention");
            let attn = wrap(attn, dev, (t, nh * d));
            let o = layer.wo.forward_with(&attn, gemv)?;
            prof.mark("matmul_wo");
            (x, h) = add_rms_norm(dev, &x, &o, &layer.ffn_norm, eps)?;
            prof.mark("add+rms_norm");
            let gu = layer.gate_up.forward_with(&h, gemv)?.contiguous()?;
            prof.mark("matmul_gate_up");
            let down = swiglu_down(
                dev,
                &gu,
                &layer.down,
                (t, cfg.intermediate_size),
                gemv,
                &mut prof,
            )?;
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
        let logits = self
            .lm_head
            .forward_with(&normed, gemv)?
            .to_dtype(DType::F32)?;
        prof.mark("lm_head");
        // One flat copy into page-locked memory, then rows on the host (candle's `to_vec2`
        // gathers element by element through pageable memory).
        let vocab = logits.dim(1)?;
        let n = n_rows * vocab;
        let mut pinned = self.logits_host.lock().unwrap_or_else(|e| e.into_inner());
        if pinned.as_ref().is_none_or(|p| p.len() < n) {
            *pinned = None; // the old buffer goes first
                            // Safety: only the first n elements are read, after the copy below wrote them.
                            // Flags 0: cacheable (write-combined memory is slow for the host to read).
            let fresh = unsafe {
                stream
                    .context()
                    .alloc_pinned_with_flags::<f32>(n.next_power_of_two(), 0)
            };
            *pinned = Some(fresh.map_err(cuda_err)?);
        }
        let Some(host) = pinned.as_mut() else {
            return Err(ModelError::Cuda("no host buffer for the logits".into()));
        };
        let host = host.as_mut_slice().map_err(cuda_err)?;
        {
            let (st, lay) = logits.storage_and_layout();
            let all = slice_of::<f32>(&st, lay)?;
            stream
                .memcpy_dtoh(&all.slice(..n), &mut host[..n])
                .map_err(cuda_err)?;
        }
        // The copy into page-locked memory is asynchronous.
        stream.synchronize().map_err(cuda_err)?;
        let logits = host[..n].chunks_exact(vocab).map(<[f32]>::to_vec).collect();
        prof.mark("copy_out");
        Ok(logits)
    }
}

/// Per-section GPU time of forward steps, with [`CudaOptions::profile`]: each mark waits for
/// the GPU, so profiling slows the steps down; it says where the time goes, not how long a
/// step takes.
struct Profiler {
    stream: Option<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>>,
    last: std::time::Instant,
}

static PROFILE: std::sync::Mutex<Vec<(&'static str, f64, u64)>> = std::sync::Mutex::new(Vec::new());

impl Profiler {
    fn start(dev: &CudaDevice, enabled: bool) -> Self {
        let stream = enabled.then(|| dev.cuda_stream());
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

/// The profile gathered so far by models with [`CudaOptions::profile`], and clears it.
pub fn take_profile() -> Vec<(&'static str, f64, u64)> {
    std::mem::take(&mut *PROFILE.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The slot lists of one step, on the GPU: query row r attends keys `0..row_keys[r]` of the
/// list starting at `flat[row_offset[r]]` (its sequence's slots; causal within the chunk).
/// Rows of prefill chunks go to the prefill kernel in tiles of consecutive rows of one
/// sequence; decode rows (one new token) to the decode kernel, a row each.
pub struct SlotLists {
    kernel: AttnKernel,
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
        dims: AttnDims,
        kernel: AttnKernel,
        decode_target_warps: usize,
    ) -> Result<Self> {
        let (mut flat, mut off, mut keys) = (Vec::new(), Vec::new(), Vec::new());
        let (mut decode, mut tile0, mut tile_n) = (Vec::new(), Vec::new(), Vec::new());
        let group = dims.heads / dims.kv_heads;
        let tile_positions = match kernel {
            AttnKernel::TensorCore => (MMA_BLOCK_ROWS / group).max(1),
            AttnKernel::CudaCore if dims.head_dim <= TILE_MAX_HEAD_DIM => TILE_ROWS,
            AttnKernel::CudaCore => 0,
        };
        for (slots, n_new) in seqs {
            let o = flat.len() as u32;
            flat.extend_from_slice(slots);
            let past = slots.len() - n_new;
            let first_row = off.len();
            for i in 0..n_new {
                off.push(o);
                keys.push((past + i + 1) as u32);
            }
            if tile_positions > 0 && n_new > 1 {
                for start in (0..n_new).step_by(tile_positions) {
                    tile0.push((first_row + start) as u32);
                    tile_n.push(tile_positions.min(n_new - start) as u32);
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
        let split_len = split_len(
            kernel,
            dims,
            (decode.len(), tile0.len()),
            max_keys,
            decode_target_warps,
        );
        Ok(Self {
            kernel,
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

/// Keys per split of one step (see [`DECODE_TARGET_WARPS`], [`PREFILL_TARGET_BLOCKS`]).
fn split_len(
    kernel: AttnKernel,
    dims: AttnDims,
    (n_decode, n_tiles): (usize, usize),
    max_keys: usize,
    decode_target_warps: usize,
) -> usize {
    let group = dims.heads / dims.kv_heads;
    // Splits for `units` parallel pieces of work to reach `target`, in whole stages of `stage` keys.
    let fit = |target: usize, units: usize, stage: usize| {
        let splits = (target / units.max(1)).clamp(1, max_keys.div_ceil(stage));
        max_keys.div_ceil(splits).next_multiple_of(stage)
    };
    match (kernel, n_tiles) {
        (AttnKernel::TensorCore, 0) => {
            // One warp per 16 (head of the group) rows of a decode row.
            let warps = n_decode * dims.kv_heads * group.div_ceil(16);
            fit(decode_target_warps, warps, MMA_KEYS)
        }
        (AttnKernel::TensorCore, _) => fit(
            PREFILL_TARGET_BLOCKS,
            (n_tiles + n_decode) * dims.kv_heads,
            MMA_KEYS,
        ),
        (AttnKernel::CudaCore, 0) => fit(decode_target_warps, n_decode * dims.heads, 32),
        (AttnKernel::CudaCore, _) => SPLIT_LEN_PREFILL,
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
    match lists.kernel {
        AttnKernel::TensorCore => {
            let name = if head_dim == 64 {
                "arbor_attention_mma_d64"
            } else {
                "arbor_attention_mma_d128"
            };
            let scale_log2 = scale * std::f32::consts::LOG2_E;
            // Decode rows: tiles of one position, a warp per 16 heads of the group; prefill
            // tiles: 64 / group positions, 4 warps.
            let launches = [
                (&lists.decode_rows, lists.n_decode, 1i32, group.div_ceil(16)),
                (&lists.tile_row0, lists.n_tiles, 0i32, MMA_BLOCK_ROWS / 16),
            ];
            for (row0, n, single, warps) in launches {
                if n == 0 {
                    continue;
                }
                let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
                let mut b = func.builder();
                slot_list_args(&mut b, q, k_pool, v_pool, lists);
                b.arg(row0)
                    .arg(&lists.tile_rows)
                    .arg(&single)
                    .arg(&mut parts.o)
                    .arg(&mut parts.m)
                    .arg(&mut parts.l)
                    .arg(&hi)
                    .arg(&kvi)
                    .arg(&splits_i)
                    .arg(&split_len_i)
                    .arg(&scale_log2);
                let cfg = LaunchConfig {
                    grid_dim: (n as u32, kv_heads as u32, parts.splits as u32),
                    block_dim: (32 * warps as u32, 1, 1),
                    shared_mem_bytes: 0, // static: 36 KiB at head_dim 128
                };
                // Safety: argument types and order match the kernel's signature; each block
                // reads its tile's rows of q and its sequence's slot list (checked against the
                // pool size by the caller), and writes only the partial entries of its own
                // (row, head, split)s; `tile_rows` is read only when `single` is 0.
                unsafe { b.launch(cfg) }.w()?;
            }
        }
        AttnKernel::CudaCore => {
            cuda_core_attention(dev, q, k_pool, v_pool, lists, dims, parts, scale)?
        }
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
    // Up to eight split groups per output dim (kernels.cu), no more groups than splits (a
    // batch of decodes has few splits per row), at least a warp: one sequence decoding at 8k
    // tokens has ~130 splits per head, merged by 32 blocks (one per head), so each thread
    // reads ~16 of them rather than ~33.
    let threads = (head_dim * parts.splits.min(8))
        .clamp(32, 1024)
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

/// The arguments every attention kernel takes first: q, the layer's K and V pools, and the
/// step's slot lists.
fn slot_list_args<'a>(
    b: &mut LaunchArgs<'a>,
    q: &'a CudaSlice<bf16>,
    k_pool: &'a CudaSlice<bf16>,
    v_pool: &'a CudaSlice<bf16>,
    lists: &'a SlotLists,
) {
    b.arg(q)
        .arg(k_pool)
        .arg(v_pool)
        .arg(&lists.flat)
        .arg(&lists.row_offset)
        .arg(&lists.row_keys);
}

/// The CUDA-core kernels' launches (see [`AttnKernel::CudaCore`]).
#[allow(clippy::too_many_arguments)]
fn cuda_core_attention(
    dev: &CudaDevice,
    q: &CudaSlice<bf16>,
    k_pool: &CudaSlice<bf16>,
    v_pool: &CudaSlice<bf16>,
    lists: &SlotLists,
    dims: AttnDims,
    parts: &mut AttnPartials,
    scale: f32,
) -> Result<()> {
    let AttnDims {
        heads,
        kv_heads,
        head_dim,
        ..
    } = dims;
    let (hi, kvi, di) = (heads as i32, kv_heads as i32, head_dim as i32);
    let (splits_i, split_len_i) = (parts.splits as i32, lists.split_len as i32);
    let group = heads / kv_heads;
    // Decode rows: the GQA kernel (one block per (row, KV head, split), one warp per query
    // head) where its shared memory fits, else a warp per (row, head, split). Both take the
    // same arguments.
    let gqa_smem = (group * head_dim + 2 * 32 * (head_dim + 1) + 32) * 4;
    let use_gqa = head_dim % 8 == 0 && group * 32 <= 1024 && gqa_smem <= 48 * 1024;
    // (kernel, launch shape, the row lists it takes after the slot lists)
    let mut launches: Vec<(&str, LaunchConfig, Vec<&CudaSlice<u32>>)> = Vec::new();
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
        launches.push((name, cfg, vec![&lists.decode_rows]));
    }
    if lists.n_tiles > 0 {
        // qs [16][D] + ks, vs [32][D + 1] floats + 32 slot ids (kernels.cu).
        let smem = (TILE_ROWS * head_dim + 2 * 32 * (head_dim + 1) + 32) * 4;
        let cfg = LaunchConfig {
            grid_dim: (lists.n_tiles as u32, heads as u32, parts.splits as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let rows = vec![&lists.tile_row0, &lists.tile_rows];
        launches.push(("arbor_attention_tiled", cfg, rows));
    }
    for (name, cfg, rows) in launches {
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let mut b = func.builder();
        slot_list_args(&mut b, q, k_pool, v_pool, lists);
        for r in rows {
            b.arg(r);
        }
        b.arg(&mut parts.o)
            .arg(&mut parts.m)
            .arg(&mut parts.l)
            .arg(&hi)
            .arg(&kvi)
            .arg(&di)
            .arg(&splits_i)
            .arg(&split_len_i)
            .arg(&scale);
        // Safety: argument types and order match the three kernels' signatures; each block
        // reads only its rows' slot lists (checked against the pool size by the caller) and
        // writes only its own (row, head, split) partial entries; the tiled kernel's shared
        // memory is sized for head_dim <= TILE_MAX_HEAD_DIM.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(())
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
    kernel: AttnKernel,
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
    let rows: usize = seqs.iter().map(|s| s.n_new).sum();
    let dims = AttnDims {
        rows,
        heads,
        kv_heads,
        head_dim,
    };
    if kernel == AttnKernel::TensorCore && !AttnKernel::tensor_core_fits(heads, kv_heads, head_dim)
    {
        return Err(ModelError::Cuda(format!(
            "no tensor-core attention kernel for {heads} heads, {kv_heads} KV heads, head_dim {head_dim}"
        )));
    }
    let lists = SlotLists::build(
        dev,
        seqs.iter().map(|s| (&s.slots[..], s.n_new)),
        dims,
        kernel,
        DECODE_TARGET_WARPS,
    )?;
    let mut parts = AttnPartials::new(dev, rows, heads, head_dim, &lists)?;
    let out = attention(dev, &q_d, &k_d, &v_d, &lists, dims, &mut parts)?;
    let host: Vec<bf16> = stream.clone_dtoh(&out).map_err(cuda_err)?;
    Ok(host.into_iter().map(f32::from).collect())
}

/// `silu(gate) * up` of the fused gate/up output `gu [T, 2F]` (`arbor_silu_mul`), through the
/// down projection. (Fusing SwiGLU into a one-row down-projection GEMV cost 0.5 ms a step on
/// the H200: each of its 4,096 warps recomputed the 14,336 activations, bound by the
/// special-function units.)
fn swiglu_down(
    dev: &CudaDevice,
    gu: &Tensor,
    down: &GpuLinear,
    (t, ffn): (usize, usize),
    gemv: bool,
    prof: &mut Profiler,
) -> Result<Tensor> {
    // Safety: the kernel writes all T x F elements.
    let mut act = unsafe { dev.alloc::<bf16>(t * ffn) }?;
    {
        let (st, lay) = gu.storage_and_layout();
        let gu_s = slice_of::<bf16>(&st, lay)?;
        let func = dev.get_or_load_custom_func("arbor_silu_mul", MODULE, PTX)?;
        let (ti, fi) = (t as i32, ffn as i32);
        let mut b = func.builder();
        b.arg(&gu_s).arg(&mut act).arg(&ti).arg(&fi);
        // Safety: one thread per output element.
        unsafe { b.launch(LaunchConfig::for_num_elems((t * ffn) as u32)) }.w()?;
    }
    prof.mark("silu_mul");
    let act = wrap(act, dev, (t, ffn));
    let down = down.forward_with(&act, gemv)?;
    prof.mark("matmul_down");
    Ok(down)
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
    // 16-byte pieces, up to RMS_PIECES (kernels.cu) per thread of a 1024-thread block.
    let pieces = n / 8;
    let aligned = |t: &Tensor| t.layout().start_offset().is_multiple_of(8);
    if n % 8 != 0 || pieces > 4 * 1024 || !aligned(x) || !aligned(y) || !aligned(w) {
        let sum = (x + y)?;
        let h = candle_nn::ops::rms_norm(&sum, w, eps)?;
        return Ok((sum, h));
    }
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
            block_dim: (pieces.next_multiple_of(32).min(1024) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // Safety: one block per row reads and writes that row only (n elements, n % 8 == 0, in
        // 16-byte pieces: x, y and the outputs are fresh or offset by whole rows, w is a
        // whole tensor); the block has at least pieces / 4 threads.
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

/// One row of [`linear_bench`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinearBenchRow {
    /// `bf16` (dense, cuBLAS) or a GGUF block format through candle's quantized kernels.
    pub format: String,
    pub batch: usize,
    /// The four linear layers of one transformer layer (QKV, O, gate/up, down).
    pub ms_per_layer: f64,
    /// Weight bytes read per layer over the time: the bandwidth the kernels reach.
    pub weight_gbs: f64,
}

/// Times one layer's linear layers (QKV, O, gate/up, down) of `config`'s shape with random
/// weights, dense bf16 (cuBLAS; and Arbor's GEMV kernel where it applies) against each
/// quantized `format`, for each batch size (rows of activations). Four copies of the layer are cycled so that the weights come from HBM, not
/// the 50 MB L2.
pub fn linear_bench(
    device: &Device,
    config: &ModelConfig,
    formats: &[candle_core::quantized::GgmlDType],
    batches: &[usize],
    iters: usize,
) -> Result<Vec<LinearBenchRow>> {
    use candle_core::quantized::{QMatMul, QStorage, QTensor};
    let dev = cuda_device(device)?;
    let stream = dev.cuda_stream();
    let (h, q, kv, f) = (
        config.hidden_size,
        config.q_dim(),
        config.kv_dim(),
        config.intermediate_size,
    );
    let shapes = [(q + 2 * kv, h), (h, q), (2 * f, h), (h, f)];
    let params: usize = shapes.iter().map(|(o, i)| o * i).sum();
    const COPIES: usize = 4;
    let mut rows = Vec::new();
    // `gemv`: dense layers through Arbor's GEMV kernel (batches it takes only).
    let mut time =
        |layers: &[Vec<GpuLinear>], format: String, bytes: f64, gemv_rows: bool| -> Result<()> {
            for &b in batches {
                if gemv_rows && b > GEMV_MAX_ROWS {
                    continue;
                }
                let x = Tensor::randn(0f32, 1.0, (b, h.max(q).max(f)), device)?
                    .to_dtype(DType::BF16)?;
                let inputs: Vec<Tensor> = shapes
                    .iter()
                    .map(|&(_, i)| x.narrow(1, 0, i).and_then(|t| t.contiguous()))
                    .collect::<candle_core::Result<_>>()?;
                let run = |n: usize| -> Result<()> {
                    for it in 0..n {
                        for (lin, inp) in layers[it % COPIES].iter().zip(&inputs) {
                            match lin {
                                GpuLinear::Dense(w) if gemv_rows => gemv(inp, w)?,
                                _ => lin.forward(inp)?,
                            };
                        }
                    }
                    Ok(())
                };
                run(COPIES)?; // warm-up: kernels loaded, workspaces allocated
                stream.synchronize().map_err(cuda_err)?;
                let t0 = std::time::Instant::now();
                run(iters)?;
                stream.synchronize().map_err(cuda_err)?;
                let per_layer = t0.elapsed().as_secs_f64() / iters as f64;
                rows.push(LinearBenchRow {
                    format: format.clone(),
                    batch: b,
                    ms_per_layer: per_layer * 1e3,
                    weight_gbs: bytes / per_layer / 1e9,
                });
            }
            Ok(())
        };
    // Dense bf16, made on the GPU.
    let dense: Vec<Vec<GpuLinear>> = (0..COPIES)
        .map(|_| {
            shapes
                .iter()
                .map(|&s| {
                    Ok(GpuLinear::Dense(
                        Tensor::randn(0f32, 0.02, s, device)?.to_dtype(DType::BF16)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;
    time(&dense, "bf16".into(), params as f64 * 2.0, false)?;
    time(&dense, "bf16-gemv".into(), params as f64 * 2.0, true)?;
    drop(dense);
    for &fmt in formats {
        // Quantized once on the CPU; the copies share the bytes, uploaded separately.
        let mut blobs = Vec::new();
        for &s in &shapes {
            let w = Tensor::randn(0f32, 0.02, s, &Device::Cpu)?;
            let qt = QTensor::quantize(&w, fmt)?;
            blobs.push((qt.data()?.into_owned(), s));
        }
        let bytes: usize = blobs.iter().map(|(b, _)| b.len()).sum();
        let layers: Vec<Vec<GpuLinear>> = (0..COPIES)
            .map(|_| {
                blobs
                    .iter()
                    .map(|(data, s)| {
                        let st =
                            QStorage::from_data(std::borrow::Cow::Borrowed(data), device, fmt)?;
                        Ok(GpuLinear::Quantized(QMatMul::from_qtensor(QTensor::new(
                            st, *s,
                        )?)?))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        time(&layers, format!("{fmt:?}"), bytes as f64, false)?;
    }
    Ok(rows)
}
