//! Decode steps on persistent buffers, padded to buckets and replayed as CUDA graphs.
//!
//! The steady state of serving is steps in which every sequence adds one token. Run launch by
//! launch, such a step is ~400 kernel launches plus allocations and six metadata uploads, and
//! at small batches the GPU waits on the host between kernels. Here instead:
//!
//! - the step's rows are padded up to a bucket (`step::decode`, where the packing is
//!   unit-tested); padding rows compute token 0 at position 0 into the KV pool's scratch
//!   slot, attend only that slot, and their logits are never read;
//! - every activation lives in a buffer allocated once for the largest bucket ([`Buffers`]);
//!   linear layers write into them through cuBLAS ([`gemm_into`]), with no allocation, or at
//!   one row through Arbor's GEMV launched as a programmatic dependent ([`gemv_pdl_into`]);
//! - the step's metadata (token ids, positions, new slots, slot-list offsets and lengths, the
//!   slot lists) is written into page-locked memory and goes up in one copy, into one device
//!   buffer at fixed offsets;
//! - the forward pass of each (bucket, attention splits) shape is captured once as a CUDA
//!   graph and replayed: one launch per step. The splits are fixed per graph and each row
//!   cuts its own keys into them ([`replayed_decode_plan`]), so a graph serves contexts as
//!   they grow, up to twice the length it was captured at.
//!
//! With graphs off ([`CudaOptions::decode_graphs`]) the same padded forward runs launch by
//! launch, with identical results (the GPU check compares them), so an A/B measures the
//! graphs alone. Steps with prefill chunks, and models this path does not take (GGUF weights
//! kept quantized), run through [`CudaLlama::forward_logits`].
//!
//! A tensor-parallel shard runs the same path at its widths, with its group's collectives in
//! the recorded pass: the sums after the embedding, O and down projections in place on the
//! persistent buffers, and the vocabulary slices of the logits gathered onto every rank and
//! joined on rank 0 (`arbor_join_columns`). Every rank takes the same decisions from the same
//! batch (path, bucket, splits, capture), so the ranks' collectives always pair up. Graphs
//! need a group that only queues GPU work ([`DeviceAllReduce::in_stream`]: NCCL); the
//! host-staged sums of ranks sharing one GPU run the path launch by launch.

use std::collections::HashMap;

use candle_core::cuda_backend::cudarc::driver::{sys as driver_sys, CudaGraph};

use super::*;

use crate::step::decode::{self as packing, FLAT, MAX_ROWS as MAX_DECODE_ROWS};
use crate::step::decode::{NEW_SLOTS, POSITIONS, ROW_KEYS, ROW_LIST, ROW_OFFSET, TOKENS};

/// Slot-list room allocated at first: 256 contexts of 4k tokens (4 MiB); it doubles when a
/// step needs more, and the graphs are captured again.
const INITIAL_FLAT_CAPACITY: usize = MAX_DECODE_ROWS * 4096;

/// The activations of a decode step of up to [`MAX_DECODE_ROWS`] rows.
struct Buffers {
    /// The residual stream, alternating: each add + RMSNorm reads one and writes the other.
    x: [CudaSlice<bf16>; 2],
    /// Zeros: the first RMSNorm is an add + RMSNorm of the embeddings onto them.
    zeros: CudaSlice<bf16>,
    h: CudaSlice<bf16>,
    qkv: CudaSlice<bf16>,
    q: CudaSlice<bf16>,
    attn: CudaSlice<bf16>,
    /// The embeddings, then each layer's attention output and down projection.
    o: CudaSlice<bf16>,
    gu: CudaSlice<bf16>,
    act: CudaSlice<bf16>,
    /// `[rows, vocab]`: the whole model's logits, or on a shard rank 0's joined ones (one
    /// unused value on other ranks).
    logits: CudaSlice<f32>,
    /// A shard's own vocabulary slice and every rank's, gathered.
    shard_logits: Option<ShardLogits>,
    parts: AttnPartials,
}

/// The logits of a tensor-parallel shard: its `[rows, slice]` part, sent as `rows * chunk`
/// values (chunk: the widest rank's slice), and every rank's part after the gather.
struct ShardLogits {
    part: CudaSlice<f32>,
    gathered: CudaSlice<f32>,
    chunk: usize,
}

/// The decode path of one model and KV pool (see the module docs).
pub struct DecodeGraphs {
    use_graphs: bool,
    /// Steps sum over a tensor-parallel group (a shard, or one rank through the
    /// tensor-parallel runner); rank 0 holds the joined logits.
    in_group: bool,
    kernel: AttnKernel,
    tuning: DecodeTuning,
    /// One-row steps through `gemv_pdl_into` ([`CudaOptions::gemv_for_one_row`], where every
    /// layer's weights suit it).
    one_row_gemv: bool,
    bufs: Buffers,
    meta: CudaSlice<u32>,
    staging: PinnedHostSlice<u32>,
    /// Captured forward passes by (bucket, attention splits).
    graphs: HashMap<(usize, usize), Graph>,
    /// Set when a capture failed: later steps run launch by launch (logged once).
    capture_failed: bool,
}

/// A captured graph, owned by one runner.
struct Graph(CudaGraph);

// Safety: CUDA graph objects may be used from any thread as long as no two threads use one
// at the same time (the CUDA docs' "graphs thread safety"); a `Graph` is only reached through
// its runner's `&mut self`, which the engine moves to its own thread and uses from there.
unsafe impl Send for Graph {}

/// The dense weight of a linear layer this path runs (see [`DecodeGraphs::supports`]).
fn dense(l: &GpuLinear) -> Result<&Tensor> {
    match l {
        GpuLinear::Dense(w) => Ok(w),
        GpuLinear::Quantized(_) => Err(ModelError::Cuda(
            "the decode path runs dense weights only".into(),
        )),
    }
}

impl DecodeGraphs {
    /// Whether `model` can run here: dense bf16 weights (GGUF blocks kept quantized go through
    /// candle's kernels, which allocate their outputs) and rows the fused kernels take. Every
    /// shard of one model gets the same answer (their ranks must take the same path).
    pub fn supports(model: &CudaLlama) -> bool {
        let linear = |l: &GpuLinear| matches!(l, GpuLinear::Dense(w) if w.dtype() == DType::BF16);
        let (hidden, vocab) = (model.config.hidden_size, model.config.vocab_size);
        // Every rank's vocabulary slice has columns (the last one's may be narrower).
        let size = model.shard.size;
        let slices_filled = vocab.div_ceil(size) * (size - 1) < vocab;
        slices_filled
            && rms_norm_fits(hidden)
            && model.embed.dtype() == DType::BF16
            && linear(&model.lm_head)
            && model
                .layers
                .iter()
                .all(|l| linear(&l.qkv) && linear(&l.wo) && linear(&l.gate_up) && linear(&l.down))
    }

    /// Whether `batch` is a step this path takes ([`packing::takes`]).
    pub fn takes(batch: &[SeqStep]) -> bool {
        packing::takes(batch)
    }

    /// Buffers for `model` (about 150 MB for an 8B model, most of it the f32 logits of 256
    /// rows of a 128k vocabulary; a rank of a group adds its slice and the gathered slices);
    /// `use_graphs` false runs the same steps launch by launch. `in_group`: every step sums
    /// over a tensor-parallel group (required of a shard).
    pub fn new(model: &CudaLlama, use_graphs: bool, in_group: bool) -> Result<Self> {
        if !Self::supports(model) {
            return Err(ModelError::Cuda(
                "this model's weights do not run on the decode path".into(),
            ));
        }
        if !in_group && !model.shard.is_whole() {
            return Err(ModelError::Cuda(
                "a tensor-parallel shard's decode steps sum over its group".into(),
            ));
        }
        let dev = cuda_device(&model.device)?;
        let stream = dev.cuda_stream();
        let cfg = &model.config;
        let shard = &model.shard;
        let (nh, nkv, d) = (shard.num_heads(), shard.num_kv_heads(), cfg.head_dim);
        let ffn = shard.ffn.len();
        let r = MAX_DECODE_ROWS;
        let kernel = AttnKernel::for_shape(nh, nkv, d, model.options.force_cuda_core_attention);
        let dims = AttnDims {
            rows: r,
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
        };
        // Room for the most (row, head, split) entries any bucket's plan can take.
        let entries = packing::BUCKETS
            .iter()
            .map(|&b| {
                let plan = replayed_decode_plan(
                    kernel,
                    dims,
                    b,
                    cfg.max_position_embeddings,
                    DecodeTuning::of(&model.options),
                );
                b * plan.splits
            })
            .max()
            .unwrap_or(1);
        let zeros = |n: usize| stream.alloc_zeros::<bf16>(n).map_err(cuda_err);
        let floats = |n: usize| stream.alloc_zeros::<f32>(n).map_err(cuda_err);
        let shard_logits = if !in_group {
            None
        } else {
            let chunk = cfg.vocab_size.div_ceil(shard.size);
            Some(ShardLogits {
                part: floats(r * chunk)?,
                gathered: floats(shard.size * r * chunk)?,
                chunk,
            })
        };
        let joins = !in_group || shard.rank == 0;
        let bufs = Buffers {
            x: [zeros(r * cfg.hidden_size)?, zeros(r * cfg.hidden_size)?],
            zeros: zeros(r * cfg.hidden_size)?,
            h: zeros(r * cfg.hidden_size)?,
            qkv: zeros(r * (nh + 2 * nkv) * d)?,
            q: zeros(r * nh * d)?,
            attn: zeros(r * nh * d)?,
            o: zeros(r * cfg.hidden_size)?,
            gu: zeros(r * 2 * ffn)?,
            act: zeros(r * ffn)?,
            logits: floats(if joins { r * cfg.vocab_size } else { 1 })?,
            shard_logits,
            parts: AttnPartials::new(dev, entries, nh, d, 1)?,
        };
        let (meta, staging) = Self::metadata_buffers(dev, FLAT + INITIAL_FLAT_CAPACITY)?;
        Ok(Self {
            use_graphs,
            in_group,
            kernel,
            tuning: DecodeTuning::of(&model.options),
            one_row_gemv: model.options.gemv_for_one_row
                && model.layers.iter().all(|l| {
                    [&l.qkv, &l.wo, &l.gate_up, &l.down]
                        .iter()
                        .all(|w| matches!(w, GpuLinear::Dense(w) if weight_fits_gemv(w)))
                }),
            bufs,
            meta,
            staging,
            graphs: HashMap::new(),
            capture_failed: false,
        })
    }

    /// The device buffer and its page-locked staging for `len` words of metadata, with the
    /// constant decode row list (0, 1, 2, ...) written in.
    fn metadata_buffers(
        dev: &CudaDevice,
        len: usize,
    ) -> Result<(CudaSlice<u32>, PinnedHostSlice<u32>)> {
        let stream = dev.cuda_stream();
        let meta = stream.alloc_zeros::<u32>(len).map_err(cuda_err)?;
        // Safety: page-locked memory of `len` words; every word a copy reads is written first
        // (zeroed here; `step::decode::pack` writes the step's parts and the fixed row list
        // before every upload). Flags 0: cacheable.
        let mut staging =
            unsafe { stream.context().alloc_pinned_with_flags::<u32>(len, 0) }.map_err(cuda_err)?;
        staging.as_mut_slice().map_err(cuda_err)?[..FLAT].fill(0);
        Ok((meta, staging))
    }

    /// Runs a decode step (see [`DecodeGraphs::takes`]) and returns its logits: `[rows,
    /// vocab]` f32 on the GPU, row i for `batch[i]` (padding rows after them). A shard sums
    /// over `group` (every rank of it runs the same step); its logits are on rank 0 only
    /// (`None` on the others), and its caller waits for the GPU through the group.
    pub fn step(
        &mut self,
        model: &CudaLlama,
        kv: &mut CudaKvPool,
        batch: &[SeqStep],
        group: Option<&dyn DeviceAllReduce>,
    ) -> Result<Option<CudaView<'_, f32>>> {
        if self.in_group != group.is_some() {
            return Err(ModelError::Cuda(
                "a decode step sums over a group exactly when its buffers were made for one".into(),
            ));
        }
        let cfg = &model.config;
        if !Self::takes(batch) {
            return Err(ModelError::BadBatch(
                "the decode path takes one token per row, at most 256 rows".into(),
            ));
        }
        for s in batch {
            s.validate(cfg, kv.num_slots)?;
        }
        let dev = cuda_device(&model.device)?;
        let n = batch.len();
        let words = packing::words(batch);
        if words > self.meta.len() {
            // The graphs read the old buffer's addresses.
            self.graphs.clear();
            (self.meta, self.staging) = Self::metadata_buffers(dev, words.next_power_of_two())?;
        }
        let host = self.staging.as_mut_slice().map_err(cuda_err)?;
        let packed = packing::pack(batch, kv.scratch_slot(), host);
        let (bucket, max_keys) = (packed.bucket, packed.max_keys);
        let stream = dev.cuda_stream();
        let staged = self.staging.as_slice().map_err(cuda_err)?;
        stream
            .memcpy_htod(
                &staged[..packed.words],
                &mut self.meta.slice_mut(..packed.words),
            )
            .map_err(cuda_err)?;
        let dims = AttnDims {
            rows: bucket,
            heads: model.shard.num_heads(),
            kv_heads: model.shard.num_kv_heads(),
            head_dim: cfg.head_dim,
        };
        let plan = replayed_decode_plan(self.kernel, dims, bucket, max_keys, self.tuning);
        let key = (bucket, plan.splits);
        if let Some(Graph(graph)) = self.graphs.get(&key) {
            graph.launch().map_err(cuda_err)?;
        } else {
            // Launch by launch: with graphs off, and the first time a shape is seen (which
            // also loads its kernels and lets cuBLAS pick its algorithms before a capture).
            forward(
                model,
                kv,
                group,
                self.one_row_gemv,
                &mut self.bufs,
                &self.meta,
                dims,
                &plan,
            )?;
            if self.use_graphs && !self.capture_failed {
                match self.capture(model, kv, group, dims, &plan) {
                    Ok(graph) => {
                        self.graphs.insert(key, Graph(graph));
                    }
                    Err(e) => {
                        tracing::warn!(
                            "CUDA graph capture failed, decode steps run launch by launch: {e}"
                        );
                        self.capture_failed = true;
                    }
                }
            }
        }
        let joined = !self.in_group || model.shard.rank == 0;
        Ok(joined.then(|| self.bufs.logits.slice(..n * cfg.vocab_size)))
    }

    /// Records the forward pass of one (bucket, splits) shape as a graph (nothing runs).
    fn capture(
        &mut self,
        model: &CudaLlama,
        kv: &mut CudaKvPool,
        group: Option<&dyn DeviceAllReduce>,
        dims: AttnDims,
        plan: &AttnPlan,
    ) -> Result<CudaGraph> {
        let stream = cuda_device(&model.device)?.cuda_stream();
        stream
            .begin_capture(driver_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(cuda_err)?;
        let recorded = forward(
            model,
            kv,
            group,
            self.one_row_gemv,
            &mut self.bufs,
            &self.meta,
            dims,
            plan,
        );
        // The capture ends whatever happened, so that the stream is usable again.
        let graph = stream.end_capture(driver_sys::CUgraphInstantiate_flags(0));
        recorded?;
        let graph = graph
            .map_err(cuda_err)?
            .ok_or_else(|| ModelError::Cuda("the capture recorded nothing".into()))?;
        graph.upload().map_err(cuda_err)?;
        Ok(graph)
    }

    /// Graphs captured so far (benchmarks and checks).
    pub fn captured(&self) -> usize {
        self.graphs.len()
    }
}

/// The forward pass of a padded decode step whose metadata is in `meta` (fixed offsets),
/// launch by launch (or recorded, under a capture): logits into `bufs.logits`. A shard sums
/// over `group` after the embedding, O and down, and gathers its logits onto rank 0.
#[allow(clippy::too_many_arguments)]
fn forward(
    model: &CudaLlama,
    kv: &mut CudaKvPool,
    group: Option<&dyn DeviceAllReduce>,
    one_row_gemv: bool,
    bufs: &mut Buffers,
    meta: &CudaSlice<u32>,
    dims: AttnDims,
    plan: &AttnPlan,
) -> Result<()> {
    let dev = cuda_device(&model.device)?;
    let cfg = &model.config;
    let shard = &model.shard;
    let rows = dims.rows;
    let (hidden, ffn, eps) = (cfg.hidden_size, shard.ffn.len(), cfg.rms_norm_eps);
    // A shard's partial sums of `[rows, hidden]` completed over its group, in place.
    let reduce = |y: &mut CudaSlice<bf16>| match group {
        Some(g) => g.sum_in_place(shard.rank, dev, y, rows * hidden),
        None => Ok(()),
    };
    let part = |start: usize| meta.slice(start..start + MAX_DECODE_ROWS);
    let (tokens, positions, new_slots) = (part(TOKENS), part(POSITIONS), part(NEW_SLOTS));
    let views = ListViews {
        flat: meta.slice(FLAT..),
        row_offset: part(ROW_OFFSET),
        row_keys: part(ROW_KEYS),
        decode_rows: part(ROW_LIST),
        // No prefill tiles in a decode step: never read.
        tile_row0: part(ROW_LIST),
        tile_rows: part(ROW_LIST),
    };
    let Buffers {
        x,
        zeros,
        h,
        qkv,
        q,
        attn,
        o,
        gu,
        act,
        logits,
        shard_logits,
        parts,
    } = bufs;
    let [x_a, x_b] = x;
    embed_rows(dev, &model.embed, &tokens, o, rows, &shard.vocab)?;
    reduce(o)?;
    // The first RMSNorm is an add onto zeros: the embeddings land in x_a, normed into h.
    let (zeros, embedded) = (zeros.slice(..), o.slice(..));
    let first_norm = &model.layers[0].attn_norm;
    add_rms_norm_into(
        dev,
        &zeros,
        &embedded,
        first_norm,
        x_a,
        h,
        (rows, hidden),
        eps,
    )?;
    // Which residual buffer holds the stream now; each add + RMSNorm writes the other.
    let mut in_a = true;
    let mut add_norm = |y: &CudaSlice<bf16>, w: &Tensor, h: &mut CudaSlice<bf16>| {
        let (from, to) = if in_a {
            (&*x_a, &mut *x_b)
        } else {
            (&*x_b, &mut *x_a)
        };
        in_a = !in_a;
        add_rms_norm_into(
            dev,
            &from.slice(..),
            &y.slice(..),
            w,
            to,
            h,
            (rows, hidden),
            eps,
        )
    };
    // One-row steps take Arbor's GEMV, launched as a programmatic dependent of the kernel
    // before it ([`gemv_pdl_into`]); others cuBLAS.
    let pdl = rows == 1 && one_row_gemv;
    let linear = |x: &CudaSlice<bf16>, w: &GpuLinear, y: &mut CudaSlice<bf16>| match pdl {
        true => gemv_pdl_into(dev, x, dense(w)?, y),
        false => gemm_into(dev, x, rows, dense(w)?, y),
    };
    for (l, layer) in model.layers.iter().enumerate() {
        linear(h, &layer.qkv, qkv)?;
        if let Some(b) = &layer.qkv_bias {
            add_bias(dev, qkv, b, rows)?;
        }
        model.qkv_rope_write(
            dev,
            &qkv.slice(..),
            (&positions, &new_slots),
            q,
            kv,
            l,
            rows,
        )?;
        attention(dev, q, kv.layer(l), &views, plan, dims, parts, attn)?;
        linear(attn, &layer.wo, o)?;
        reduce(o)?;
        add_norm(o, &layer.ffn_norm, h)?;
        linear(h, &layer.gate_up, gu)?;
        silu_mul_into(dev, &gu.slice(..), act, (rows, ffn))?;
        linear(act, &layer.down, o)?;
        reduce(o)?;
        let next_norm = model
            .layers
            .get(l + 1)
            .map_or(&model.final_norm, |next| &next.attn_norm);
        add_norm(o, next_norm, h)?;
    }
    // `h` holds every row after the final norm (fused into the last layer's add).
    let (
        Some(g),
        Some(ShardLogits {
            part,
            gathered,
            chunk,
        }),
    ) = (group, shard_logits)
    else {
        return gemm_into::<f32>(dev, h, rows, dense(&model.lm_head)?, logits);
    };
    // This rank's [rows, slice] at the start of its part; every part to every rank.
    gemm_into::<f32>(dev, h, rows, dense(&model.lm_head)?, part)?;
    g.gather_into(shard.rank, dev, part, rows * *chunk, gathered)?;
    if shard.rank == 0 {
        join_columns(dev, gathered, logits, (rows, cfg.vocab_size, *chunk))?;
    }
    Ok(())
}

/// `out [rows, columns]` from the gathered vocabulary slices of every rank
/// (`arbor_join_columns`, whose comment has the layout).
pub(super) fn join_columns(
    dev: &CudaDevice,
    gathered: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    (rows, columns, chunk): (usize, usize, usize),
) -> Result<()> {
    let ranks = columns.div_ceil(chunk);
    if out.len() < rows * columns || gathered.len() < ranks * rows * chunk {
        return Err(ModelError::Cuda("joining the logits: bad buffers".into()));
    }
    let func = dev.get_or_load_custom_func("arbor_join_columns", MODULE, PTX)?;
    let (ri, ci, ki) = (rows as i32, columns as i32, chunk as i32);
    let mut b = func.builder();
    b.arg(gathered).arg(out).arg(&ri).arg(&ci).arg(&ki);
    // Safety: one thread per value of out's first rows x columns (checked above); each reads
    // inside its rank's rows x chunk part of `gathered` (the rank's width is at most chunk).
    unsafe { b.launch(LaunchConfig::for_num_elems((rows * columns) as u32)) }.w()?;
    Ok(())
}

/// `out[t] = table[ids[t] - vocab.start]` for the first `rows` ids, zero rows for ids outside
/// `vocab` (the table's rows: a shard's slice) (`arbor_embed_rows`).
pub(super) fn embed_rows(
    dev: &CudaDevice,
    table: &Tensor,
    ids: &CudaView<u32>,
    out: &mut CudaSlice<bf16>,
    rows: usize,
    vocab: &std::ops::Range<usize>,
) -> Result<()> {
    let (held, n) = table.dims2()?;
    if n % 8 != 0 || out.len() < rows * n || ids.len() < rows || held != vocab.len() {
        return Err(ModelError::Cuda("embedding rows: bad buffers".into()));
    }
    let (ts, tl) = table.storage_and_layout();
    let table_s = slice_of::<bf16>(&ts, tl)?;
    let func = dev.get_or_load_custom_func("arbor_embed_rows", MODULE, PTX)?;
    let (ti, ni) = (rows as i32, n as i32);
    let (first, count) = (vocab.start as u32, vocab.len() as u32);
    let mut b = func.builder();
    b.arg(&table_s)
        .arg(ids)
        .arg(out)
        .arg(&ti)
        .arg(&ni)
        .arg(&first)
        .arg(&count);
    // Safety: one thread per 16-byte piece of an output row (n % 8 == 0, sizes checked
    // above); the kernel reads only table rows below `count`, the table's row count.
    unsafe { b.launch(LaunchConfig::for_num_elems((rows * n / 8) as u32)) }.w()?;
    Ok(())
}

/// `x[t] += bias` for the first `rows` rows of `x [rows, n]` (`arbor_add_bias`).
fn add_bias(dev: &CudaDevice, x: &mut CudaSlice<bf16>, bias: &Tensor, rows: usize) -> Result<()> {
    let n = bias.elem_count();
    if x.len() < rows * n {
        return Err(ModelError::Cuda("bias add: buffer too small".into()));
    }
    let (bs, bl) = bias.storage_and_layout();
    let bias_s = slice_of::<bf16>(&bs, bl)?;
    let func = dev.get_or_load_custom_func("arbor_add_bias", MODULE, PTX)?;
    let (ti, ni) = (rows as i32, n as i32);
    let mut b = func.builder();
    b.arg(x).arg(&bias_s).arg(&ti).arg(&ni);
    // Safety: one thread per element of the first rows x n of x (checked above); the bias is
    // a contiguous tensor of n elements.
    unsafe { b.launch(LaunchConfig::for_num_elems((rows * n) as u32)) }.w()?;
    Ok(())
}
