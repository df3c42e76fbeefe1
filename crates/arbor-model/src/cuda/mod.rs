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
//! The KV pool is one buffer per layer for K and one for V, `[slots, kv_heads, head_dim]`, of
//! bf16 or, with [`KvCacheDtype::Fp8E4m3`], FP8 E4M3 bytes (only the tensor-core kernels read
//! those), owned here (not candle tensors) because the kernels write into it in place. Attention runs
//! on the tensor-core kernel where the head shape allows ([`AttnKernel`]), else on the CUDA-core
//! kernels; both write per-split partial results that one merge kernel combines.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the device, [`CudaLlama`] and its forward pass, the KV pool |
//! | `load.rs` | loading from any `WeightSource` (files, or random weights) |
//! | `attention.rs` | kernel choice, slot lists and split planning, the attention launches |
//! | `decode.rs` | decode steps on persistent buffers, padded to buckets, replayed as CUDA graphs |
//! | `ops.rs` | linear layers (cuBLAS, quantized, GEMV) and the fused element-wise kernels |
//! | `sampler.rs` | sampling on the GPU (`sampler.cu`): penalties, truncation, seeded draws, logprobs |
//! | `profile.rs` | the per-phase profile ([`CudaOptions::profile`]) |
//! | `checks.rs` | kernel checks and the linear-layer benchmark, for `arbor_model::diagnostics` |
//! | `collective.rs` | tensor parallelism's sums across GPUs: NCCL, or through the host on one GPU |
//!
//! Under tensor parallelism a [`CudaLlama`] is one rank's [`Shard`]: its heads, KV heads, MLP
//! columns and vocabulary rows, at those widths everywhere (weights, KV pool, buffers), and
//! [`CudaLlama::forward_shard`] sums the partial hidden states over the group after the
//! embedding, the O and the down projections (Megatron's cut, `crate::parallel`).

use std::path::Path;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, LaunchArgs, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Storage, Tensor};
use half::bf16;

pub use candle_core::quantized::GgmlDType;

use crate::config::{ModelConfig, RopeStyle};
use crate::error::{ModelError, Result};
use crate::parallel::Shard;
use crate::rope::Rope;
use crate::step::{FlatStep, SeqStep};
use crate::weights::{LayerWeight as L, Stored, Weight, WeightSource};
use crate::{ChatTemplate, Tokenizer};

mod attention;
mod checks;
mod collective;
mod decode;
mod load;
mod ops;
mod profile;
mod sampler;

pub use self::attention::*;
pub use self::checks::*;
pub use self::collective::*;
pub use self::decode::*;
pub use self::load::*;
use self::ops::*;
pub use self::profile::*;
pub use self::sampler::{
    Adjust, GpuSampler, SampleBatch, SampledRow, SeqSamplingState, MAX_TOP_LOGPROBS,
};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/arbor_kernels.ptx"));
const MODULE: &str = "arbor_kernels";
fn cuda_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Cuda(e.to_string())
}

/// Opens GPU `ordinal`.
pub fn device(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| ModelError::Cuda(format!("CUDA device {ordinal}: {e}")))
}

/// Opens GPU `ordinal` with a stream of its own (not the per-thread default stream): a
/// tensor-parallel rank is built on one thread and runs on another, and ranks that share a
/// GPU must not share a stream or a cuBLAS handle.
///
/// A stream of its own puts cudarc in its multi-stream mode, where every buffer records an
/// event at each use and every use waits on the last writer's event: host work on each of the
/// ~400 launches of a step, and waits on events recorded outside a CUDA graph's capture, which
/// the capture of the decode graphs must not see. A rank uses only its own stream, so the
/// tracking is turned off before any buffer exists.
pub fn device_with_stream(ordinal: usize) -> Result<Device> {
    let dev = CudaDevice::new_with_stream(ordinal)
        .map_err(|e| ModelError::Cuda(format!("CUDA device {ordinal}: {e}")))?;
    // Safety: every buffer made on this device is used on its one stream only (a rank's
    // weights, KV pool, workspace and sampler; collectives are queued on the same stream), so
    // no use needs ordering against another stream.
    unsafe { dev.disable_event_tracking() };
    Ok(Device::Cuda(dev))
}

/// Bytes of memory free now on `device`'s GPU.
pub fn free_memory(device: &Device) -> Option<usize> {
    let dev = cuda_device(device).ok()?;
    dev.cuda_stream()
        .context()
        .mem_get_info()
        .ok()
        .map(|(free, _)| free)
}

fn cuda_device(device: &Device) -> Result<&CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d),
        _ => Err(ModelError::Cuda("not a CUDA device".into())),
    }
}

pub use crate::options::{CudaOptions, GgufWeights, KvCacheDtype};

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
    /// The whole model's shape.
    pub config: ModelConfig,
    /// The part of the model this one holds (all of it without tensor parallelism).
    pub shard: Shard,
    /// This shard's vocabulary rows of the embedding.
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

/// K and V of every slot, per layer, on the GPU, plus one scratch slot past the last that no
/// sequence owns: the padding rows of a decode bucket write and read it ([`DecodeGraphs`]).
/// The buffers are bytes: bf16 elements or FP8 E4M3 ones, as `dtype` says; each kernel takes
/// the element type of its variant.
pub struct CudaKvPool {
    k: Vec<CudaSlice<u8>>,
    v: Vec<CudaSlice<u8>>,
    dtype: KvCacheDtype,
    num_slots: usize,
}

impl CudaKvPool {
    /// A pool in the model's [`CudaOptions::kv_cache_dtype`].
    pub fn new(model: &CudaLlama, num_slots: usize) -> Result<Self> {
        let dev = cuda_device(&model.device)?;
        let dtype = model.options.kv_cache_dtype;
        let n = (num_slots + 1) * model.shard.kv_dim(&model.config) * dtype.element_bytes();
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..model.config.num_layers {
            k.push(dev.alloc_zeros::<u8>(n).map_err(cuda_err)?);
            v.push(dev.alloc_zeros::<u8>(n).map_err(cuda_err)?);
        }
        Ok(Self {
            k,
            v,
            dtype,
            num_slots,
        })
    }

    pub fn dtype(&self) -> KvCacheDtype {
        self.dtype
    }

    /// Layer `l`'s pools, for the attention kernels.
    pub(crate) fn layer(&self, l: usize) -> KvLayer<'_> {
        KvLayer {
            k: &self.k[l],
            v: &self.v[l],
            dtype: self.dtype,
        }
    }

    pub fn num_slots(&self) -> usize {
        self.num_slots
    }

    /// The slot past the sequences' ones (see above).
    fn scratch_slot(&self) -> u32 {
        self.num_slots as u32
    }
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
        let whole = Shard::whole(src.config());
        let mut models = Self::build_shards(
            ShardSources::Shared(src),
            &[whole],
            keep_quantized,
            &options,
            std::slice::from_ref(device),
        )?;
        Ok(models.pop().expect("one shard, one model"))
    }

    /// Each of `shards`' model on its device (`devices[rank]`), from one source read once and
    /// cut for every rank, or from one source per rank (random weights made on each GPU).
    pub(crate) fn build_shards(
        mut sources: ShardSources,
        shards: &[Shard],
        keep_quantized: bool,
        options: &CudaOptions,
        devices: &[Device],
    ) -> Result<Vec<Self>> {
        let config = sources.config().clone();
        config.validate()?;
        if !config.head_dim.is_multiple_of(2) || config.head_dim > 256 {
            return Err(ModelError::BadConfig(format!(
                "the CUDA kernels need an even head_dim up to 256, got {}",
                config.head_dim
            )));
        }
        if options.kv_cache_dtype == KvCacheDtype::Fp8E4m3 {
            // Only the tensor-core kernels read FP8 pools.
            let fits = shards.iter().all(|s| {
                AttnKernel::tensor_core_fits(s.num_heads(), s.num_kv_heads(), config.head_dim)
            });
            if options.force_cuda_core_attention || !fits {
                return Err(ModelError::InvalidOption(format!(
                    "kv_cache_dtype fp8 needs the tensor-core attention: head_dim 64 or 128 and at \
                     most {} query heads per KV head (this model: head_dim {}, {} heads, {} KV \
                     heads), and cuda_attention auto",
                    attention::MMA_BLOCK_ROWS,
                    config.head_dim,
                    config.num_heads,
                    config.num_kv_heads
                )));
            }
        }
        let n = shards.len();
        // Per rank: the weights `ws` stacked into one linear layer on the rank's device.
        let linear = |sources: &mut ShardSources, ws: &[Weight]| -> Result<Vec<GpuLinear>> {
            let mut per_rank: Vec<Vec<Stored>> = (0..n).map(|_| Vec::new()).collect();
            for &w in ws {
                for (r, t) in sources.parts(w, shards)?.into_iter().enumerate() {
                    per_rank[r].push(t);
                }
            }
            per_rank
                .into_iter()
                .zip(devices)
                .map(|(parts, device)| gpu_linear(parts, keep_quantized, device))
                .collect()
        };
        let dense = |sources: &mut ShardSources, w: Weight| -> Result<Vec<Tensor>> {
            sources
                .parts(w, shards)?
                .into_iter()
                .zip(devices)
                .map(|(t, device)| dense_bf16(t, device))
                .collect()
        };
        let mut layers: Vec<Vec<CudaLayer>> = (0..n)
            .map(|_| Vec::with_capacity(config.num_layers))
            .collect();
        for i in 0..config.num_layers {
            let w = |role: L| Weight::Layer(i, role);
            let qkv = linear(&mut sources, &[w(L::Q), w(L::K), w(L::V)])?;
            let qkv_bias: Vec<Option<Tensor>> = if config.qkv_bias {
                let (q, k, v) = (
                    dense(&mut sources, w(L::QBias))?,
                    dense(&mut sources, w(L::KBias))?,
                    dense(&mut sources, w(L::VBias))?,
                );
                q.into_iter()
                    .zip(k)
                    .zip(v)
                    .map(|((q, k), v)| Ok(Some(Tensor::cat(&[q, k, v], 0)?)))
                    .collect::<Result<_>>()?
            } else {
                (0..n).map(|_| None).collect()
            };
            let gate_up = linear(&mut sources, &[w(L::Gate), w(L::Up)])?;
            let wo = linear(&mut sources, &[w(L::O)])?;
            let down = linear(&mut sources, &[w(L::Down)])?;
            let attn_norm = dense(&mut sources, w(L::AttnNorm))?;
            let ffn_norm = dense(&mut sources, w(L::FfnNorm))?;
            let parts = qkv
                .into_iter()
                .zip(qkv_bias)
                .zip(gate_up)
                .zip(wo)
                .zip(down)
                .zip(attn_norm)
                .zip(ffn_norm);
            for (r, ((((((qkv, qkv_bias), gate_up), wo), down), attn_norm), ffn_norm)) in
                parts.enumerate()
            {
                layers[r].push(CudaLayer {
                    attn_norm,
                    qkv,
                    qkv_bias,
                    wo,
                    ffn_norm,
                    gate_up,
                    down,
                });
            }
        }
        let embed = dense(&mut sources, Weight::TokenEmbedding)?;
        let final_norm = dense(&mut sources, Weight::FinalNorm)?;
        let lm_head = if config.tie_word_embeddings {
            embed.iter().cloned().map(GpuLinear::Dense).collect()
        } else {
            linear(&mut sources, &[Weight::LmHead])?
        };
        let rope = Rope::new(&config);
        let (cos, sin) = rope.full_tables(config.max_position_embeddings);
        let mut models = Vec::with_capacity(n);
        let ranks = shards
            .iter()
            .zip(devices)
            .zip(layers)
            .zip(embed)
            .zip(final_norm)
            .zip(lm_head);
        for (((((shard, device), layers), embed), final_norm), lm_head) in ranks {
            let stream = cuda_device(device)?.cuda_stream();
            models.push(Self {
                cos: stream.clone_htod(&cos).map_err(cuda_err)?,
                sin: stream.clone_htod(&sin).map_err(cuda_err)?,
                config: config.clone(),
                shard: shard.clone(),
                embed,
                layers,
                final_norm,
                lm_head,
                device: device.clone(),
                options: options.clone(),
                logits_host: std::sync::Mutex::new(None),
            });
        }
        Ok(models)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn options(&self) -> &CudaOptions {
        &self.options
    }

    /// Bytes of this rank's KV pool one token slot takes, over every layer.
    pub fn kv_bytes_per_slot(&self) -> usize {
        let element = self.options.kv_cache_dtype.element_bytes();
        self.shard.kv_bytes_per_slot(&self.config, element)
    }

    /// Bytes of GPU memory free now (after the weights): the KV pool's budget.
    pub fn free_memory_bytes(&self) -> Option<usize> {
        free_memory(&self.device)
    }

    /// Runs one step, like [`crate::Llama::forward`]: the logit rows on the host.
    pub fn forward(&self, batch: &[SeqStep], kv: &mut CudaKvPool) -> Result<Vec<Vec<f32>>> {
        match self.run(batch, kv, None)? {
            Some(logits) => self.rows_to_host(&logits, None),
            None => Ok(Vec::new()),
        }
    }

    /// One tensor-parallel rank's step: like [`Self::forward`] on this shard, summing over
    /// `group` after the embedding, O and down; each row is this shard's vocabulary slice.
    pub fn forward_shard(
        &self,
        batch: &[SeqStep],
        kv: &mut CudaKvPool,
        group: &dyn DeviceAllReduce,
    ) -> Result<Vec<Vec<f32>>> {
        match self.run(batch, kv, Some(group))? {
            Some(logits) => self.rows_to_host(&logits, Some(group)),
            None => Ok(Vec::new()),
        }
    }

    /// One tensor-parallel rank's step leaving its logits on the GPU: this shard's vocabulary
    /// slice of each row that wants logits (`[rows, slice]` f32), or `None` when none does.
    pub fn forward_shard_logits(
        &self,
        batch: &[SeqStep],
        kv: &mut CudaKvPool,
        group: &dyn DeviceAllReduce,
    ) -> Result<Option<Tensor>> {
        self.run(batch, kv, Some(group))
    }

    /// `logits` (`[rows, vocab]` f32 on the GPU) as rows on the host: one flat copy into
    /// page-locked memory (candle's `to_vec2` gathers element by element through pageable
    /// memory). Under tensor parallelism the wait for the GPU goes through the group, which
    /// gives up when a peer fails.
    fn rows_to_host(
        &self,
        logits: &Tensor,
        group: Option<&dyn DeviceAllReduce>,
    ) -> Result<Vec<Vec<f32>>> {
        let dev = cuda_device(&self.device)?;
        let stream = dev.cuda_stream();
        let mut prof = Profiler::start(dev, self.options.profile);
        let (n_rows, vocab) = logits.dims2()?;
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
        match group {
            Some(g) => g.wait(self.shard.rank, dev)?,
            None => stream.synchronize().map_err(cuda_err)?,
        }
        let logits = host[..n].chunks_exact(vocab).map(<[f32]>::to_vec).collect();
        prof.mark("copy_out");
        Ok(logits)
    }

    /// Runs one step and leaves its logits on the GPU: `[rows wanting logits, vocab]` f32, or
    /// `None` when no row wants them.
    pub fn forward_logits(&self, batch: &[SeqStep], kv: &mut CudaKvPool) -> Result<Option<Tensor>> {
        if !self.shard.is_whole() {
            return Err(ModelError::Cuda(
                "a tensor-parallel shard runs through forward_shard".into(),
            ));
        }
        self.run(batch, kv, None)
    }

    /// The forward pass; `group` sums a shard's partial hidden states (None: the whole model).
    fn run(
        &self,
        batch: &[SeqStep],
        kv: &mut CudaKvPool,
        group: Option<&dyn DeviceAllReduce>,
    ) -> Result<Option<Tensor>> {
        let cfg = &self.config;
        let dev = cuda_device(&self.device)?;
        let stream = dev.cuda_stream();
        let shard = &self.shard;
        let (nh, nkv, d) = (shard.num_heads(), shard.num_kv_heads(), cfg.head_dim);
        let rank = shard.rank;
        let FlatStep {
            tokens,
            positions,
            new_slots,
            logit_rows,
        } = FlatStep::gather(batch, cfg, kv.num_slots)?;
        let positions: Vec<u32> = positions.into_iter().map(|p| p as u32).collect();
        let t = tokens.len();
        if t == 0 {
            return Ok(None);
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
            DecodeTuning::of(&self.options),
        )?;
        let (plan, views) = (slot_lists.plan, slot_lists.views());
        let mut parts = AttnPartials::new(dev, t, nh, d, plan.splits)?;

        let mut prof = Profiler::start(dev, self.options.profile);
        let mut x = self.embed_rows(tokens)?;
        prof.mark("embed");
        // The sums over the group (tensor parallelism), timed apart when profiling.
        let reduce = |x: Tensor, prof: &mut Profiler| -> Result<Tensor> {
            let Some(g) = group else { return Ok(x) };
            let sum = g.sum(rank, &x)?;
            prof.mark("all_reduce");
            Ok(sum)
        };
        x = reduce(x, &mut prof)?;
        let gemv = self.options.gemv_for_one_row;
        let eps = cfg.rms_norm_eps;
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
                self.qkv_rope_write(
                    dev,
                    &qkv_s,
                    (&positions_d.slice(..), &new_slots_d.slice(..)),
                    &mut q,
                    kv,
                    l,
                    t,
                )?;
            }
            prof.mark("qkv_rope_write");
            // Safety: the merge kernel writes every element.
            let mut attn = unsafe { dev.alloc::<bf16>(t * nh * d) }?;
            attention(
                dev,
                &q,
                kv.layer(l),
                &views,
                &plan,
                dims,
                &mut parts,
                &mut attn,
            )?;
            prof.mark("attention");
            let attn = wrap(attn, dev, (t, nh * d));
            let o = layer.wo.forward_with(&attn, gemv)?;
            prof.mark("matmul_wo");
            let o = reduce(o, &mut prof)?;
            (x, h) = add_rms_norm(dev, &x, &o, &layer.ffn_norm, eps)?;
            prof.mark("add+rms_norm");
            let gu = layer.gate_up.forward_with(&h, gemv)?.contiguous()?;
            prof.mark("matmul_gate_up");
            let down = swiglu_down(dev, &gu, &layer.down, (t, shard.ffn.len()), gemv, &mut prof)?;
            let down = reduce(down, &mut prof)?;
            let next_norm = self
                .layers
                .get(l + 1)
                .map_or(&self.final_norm, |next| &next.attn_norm);
            (x, h) = add_rms_norm(dev, &x, &down, next_norm, eps)?;
            prof.mark("add+rms_norm");
        }
        if logit_rows.is_empty() {
            return Ok(None);
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
        Ok(Some(logits))
    }
}

impl CudaLlama {
    /// The embedding rows of `tokens` (bf16 `[T, hidden]`). A shard holds some vocabulary
    /// rows: tokens outside them get zero rows, and the sum over ranks completes each row.
    fn embed_rows(&self, tokens: Vec<u32>) -> Result<Tensor> {
        let t = tokens.len();
        if self.shard.is_whole() {
            let ids = Tensor::from_vec(tokens, t, &self.device)?;
            return Ok(self.embed.index_select(&ids, 0)?);
        }
        let vocab = &self.shard.vocab;
        let held = |tok: u32| vocab.contains(&(tok as usize));
        let local: Vec<u32> = tokens
            .iter()
            .map(|&tok| {
                if held(tok) {
                    tok - vocab.start as u32
                } else {
                    0
                }
            })
            .collect();
        let mask: Vec<bf16> = tokens
            .iter()
            .map(|&tok| bf16::from_f32(if held(tok) { 1.0 } else { 0.0 }))
            .collect();
        let ids = Tensor::from_vec(local, t, &self.device)?;
        let mask = Tensor::from_vec(mask, (t, 1), &self.device)?;
        Ok(self.embed.index_select(&ids, 0)?.broadcast_mul(&mask)?)
    }

    /// `arbor_qkv_rope_write` for layer `layer`: the first `rows` rows of the fused QKV
    /// projection split into Q (rotated, into `q`) and K (rotated) and V written into their
    /// new slots of the layer's pool.
    #[allow(clippy::too_many_arguments)]
    fn qkv_rope_write(
        &self,
        dev: &CudaDevice,
        qkv: &CudaView<bf16>,
        (positions, new_slots): (&CudaView<u32>, &CudaView<u32>),
        q: &mut CudaSlice<bf16>,
        kv: &mut CudaKvPool,
        layer: usize,
        rows: usize,
    ) -> Result<()> {
        let cfg = &self.config;
        let (nh, nkv, d) = (
            self.shard.num_heads(),
            self.shard.num_kv_heads(),
            cfg.head_dim,
        );
        if qkv.len() < rows * (nh + 2 * nkv) * d
            || q.len() < rows * nh * d
            || positions.len() < rows
            || new_slots.len() < rows
        {
            return Err(ModelError::Cuda("QKV + RoPE: buffers too small".into()));
        }
        let interleaved = i32::from(cfg.rope_style == RopeStyle::Interleaved);
        let (ti, nhi, nkvi, di) = (rows as i32, nh as i32, nkv as i32, d as i32);
        let pairs = rows * (nh + 2 * nkv) * (d / 2);
        let name = match kv.dtype {
            KvCacheDtype::Bf16 => "arbor_qkv_rope_write",
            KvCacheDtype::Fp8E4m3 => "arbor_qkv_rope_write_fp8",
        };
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(qkv)
            .arg(positions)
            .arg(new_slots)
            .arg(&self.cos)
            .arg(&self.sin)
            .arg(q)
            .arg(&mut kv.k[layer])
            .arg(&mut kv.v[layer])
            .arg(&ti)
            .arg(&nhi)
            .arg(&nkvi)
            .arg(&di)
            .arg(&interleaved);
        // Safety: argument types and order match the kernel's signature; the buffers hold the
        // rows read and written (checked above), and every position and slot was checked
        // against the RoPE tables and the pool before it was uploaded.
        unsafe { b.launch(LaunchConfig::for_num_elems(pairs as u32)) }.w()?;
        Ok(())
    }
}
