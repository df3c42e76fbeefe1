//! Attention on the GPU: which kernel a head shape runs on, the slot lists and launch plan of
//! a step (how each context is split along its keys), and the launches (tensor-core or
//! CUDA-core kernels, then the merge of the splits' partial results).

use super::*;

/// Steps with prefill chunks on the tensor-core kernel get enough splits for about this many
/// blocks (about four waves of its two 128-thread blocks per SM on an H200): a long prompt's
/// tiles fill the GPU unsplit, while a short chunk over a long cached prefix (a follow-up turn)
/// is cut along its keys.
pub(crate) const PREFILL_TARGET_BLOCKS: usize = 1024;

/// Keys per split for the CUDA-core prefill kernel (shapes the tensor-core kernel lacks).
pub(crate) const SPLIT_LEN_PREFILL: usize = 1024;

/// Query rows per CUDA-core prefill tile (`QT` in kernels.cu) and the largest head_dim whose
/// tile fits the default 48 KiB of shared memory.
pub(crate) const TILE_ROWS: usize = 16;

pub(crate) const TILE_MAX_HEAD_DIM: usize = 128;

/// Keys per shared-memory stage of the tensor-core kernel (`MMA_KT`) and its flat rows per
/// prefill block (4 warps of 16).
pub(crate) const MMA_KEYS: usize = 64;

pub(crate) const MMA_BLOCK_ROWS: usize = 64;

/// Splits one thread of the merge sums before another group of threads joins (see `attention`).
const MERGE_SPLITS_PER_THREAD: usize = 8;

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

/// How decode rows are cut for the attention kernels ([`CudaOptions::decode_target_warps`],
/// [`CudaOptions::decode_stage_keys`]).
#[derive(Debug, Clone, Copy)]
pub struct DecodeTuning {
    /// Set: split until about this many warps run, whatever the step.
    pub fixed_target_warps: Option<usize>,
    pub stage_keys: usize,
    pub kv_dtype: KvCacheDtype,
}

/// About one wave of the tensor-core decode kernel's one-warp blocks on an H200 (165
/// registers a thread leave room for 12 a SM, 1,584 on 132 SMs), with room to spare.
const ONE_WAVE_WARPS: usize = 1024;

/// Several waves: where one wave is not enough.
const MANY_WAVES_WARPS: usize = 4096;

impl DecodeTuning {
    pub fn of(options: &CudaOptions) -> Self {
        Self {
            fixed_target_warps: options.decode_target_warps,
            stage_keys: options.decode_stage_keys,
            kv_dtype: options.kv_cache_dtype,
        }
    }

    /// Warps to split a decode step's keys into, for a step whose every row takes
    /// `warps_per_split` warps per split. Decode steps cut each context into splits that run
    /// in parallel and are merged (flash-decoding). Measured on the H200 (docs/BENCHMARKS.md,
    /// "decode attention splits"): with a bf16 cache, as many splits as fit in about one
    /// wave of blocks beat 4x as many by 1-4% from batch 8 to 128 (a second, partial wave and
    /// the merge of more partial results cost more than the extra parallelism gives) and tie
    /// at batch 1; where one split a row is already more than a wave (batch 256), two splits
    /// beat one. The FP8 kernel converts every fragment and loads V a byte at a time: it
    /// wants more warps in flight, and 4x as many won by 3% at batch 64 over 2k tokens.
    pub fn target_warps(&self, warps_per_split: usize) -> usize {
        if let Some(t) = self.fixed_target_warps {
            return t;
        }
        match self.kv_dtype {
            KvCacheDtype::Bf16 if warps_per_split <= ONE_WAVE_WARPS => ONE_WAVE_WARPS,
            _ => MANY_WAVES_WARPS,
        }
    }
}

/// How one step's attention launches: the kernel, its decode rows and prefill tiles, and how
/// the keys are split. Decode steps replayed as CUDA graphs fix `splits` per graph and pass
/// `split_len` 0, so that each row cuts its own keys into `splits` pieces (kernels.cu,
/// `row_split_len`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnPlan {
    pub kernel: AttnKernel,
    /// Keys per shared-memory stage of the tensor-core decode kernel (16, 32 or 64).
    pub decode_stage: usize,
    pub n_decode: usize,
    pub n_tiles: usize,
    pub splits: usize,
    /// Keys per split of every row, or 0: each row's own keys over `splits`.
    pub split_len: usize,
}

/// A step's slot lists and row lists on the GPU, as the attention kernels read them: query
/// row r attends keys `0..row_keys[r]` of the list starting at `flat[row_offset[r]]` (its
/// sequence's slots; causal within the chunk). Decode rows (one new token) go to the decode
/// kernel a row each (`decode_rows`); rows of prefill chunks to the prefill kernel in tiles of
/// consecutive rows of one sequence (`tile_row0`, `tile_rows`).
pub struct ListViews<'a> {
    pub flat: CudaView<'a, u32>,
    pub row_offset: CudaView<'a, u32>,
    pub row_keys: CudaView<'a, u32>,
    pub decode_rows: CudaView<'a, u32>,
    pub tile_row0: CudaView<'a, u32>,
    pub tile_rows: CudaView<'a, u32>,
}

/// The slot lists of one step planned on the host and uploaded in one copy (see
/// [`ListViews`] for what they hold).
pub struct SlotLists {
    pub(crate) plan: AttnPlan,
    buf: CudaSlice<u32>,
    /// Where flat, row_offset, row_keys, decode_rows, tile_row0 and tile_rows start in `buf`,
    /// and where the last ends.
    at: [usize; 7],
}

impl SlotLists {
    /// From each sequence's whole slot list and its number of new tokens (queries).
    pub(crate) fn build<'a>(
        dev: &CudaDevice,
        seqs: impl Iterator<Item = (&'a [u32], usize)>,
        dims: AttnDims,
        kernel: AttnKernel,
        tuning: DecodeTuning,
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
        let max_keys = keys.iter().copied().max().unwrap_or(1) as usize;
        let split_len = split_len(kernel, dims, (decode.len(), tile0.len()), max_keys, tuning);
        let plan = AttnPlan {
            kernel,
            decode_stage: tuning.stage_keys,
            n_decode: decode.len(),
            n_tiles: tile0.len(),
            splits: max_keys.div_ceil(split_len).max(1),
            split_len,
        };
        // One upload; an empty list still gets one (unused) element.
        let mut packed = Vec::new();
        let mut at = [0; 7];
        for (i, part) in [&flat, &off, &keys, &decode, &tile0, &tile_n]
            .iter()
            .enumerate()
        {
            at[i] = packed.len();
            packed.extend_from_slice(part);
            if part.is_empty() {
                packed.push(0);
            }
        }
        at[6] = packed.len();
        let buf = dev.cuda_stream().clone_htod(&packed).map_err(cuda_err)?;
        Ok(Self { plan, buf, at })
    }

    pub(crate) fn views(&self) -> ListViews<'_> {
        let part = |i: usize| self.buf.slice(self.at[i]..self.at[i + 1]);
        ListViews {
            flat: part(0),
            row_offset: part(1),
            row_keys: part(2),
            decode_rows: part(3),
            tile_row0: part(4),
            tile_rows: part(5),
        }
    }
}

/// Keys per split of one step (see [`DecodeTuning::target_warps`], [`PREFILL_TARGET_BLOCKS`]).
pub(crate) fn split_len(
    kernel: AttnKernel,
    dims: AttnDims,
    (n_decode, n_tiles): (usize, usize),
    max_keys: usize,
    tuning: DecodeTuning,
) -> usize {
    let decode_warps = decode_warps(kernel, dims, n_decode);
    let decode_target_warps = tuning.target_warps(decode_warps);
    // Splits for `units` parallel pieces of work to reach `target`, in whole stages of `stage` keys.
    let fit = |target: usize, units: usize, stage: usize| {
        let splits = (target / units.max(1)).clamp(1, max_keys.div_ceil(stage));
        max_keys.div_ceil(splits).next_multiple_of(stage)
    };
    match (kernel, n_tiles) {
        (AttnKernel::TensorCore, 0) => fit(decode_target_warps, decode_warps, MMA_KEYS),
        (AttnKernel::TensorCore, _) => fit(
            PREFILL_TARGET_BLOCKS,
            (n_tiles + n_decode) * dims.kv_heads,
            MMA_KEYS,
        ),
        (AttnKernel::CudaCore, 0) => fit(decode_target_warps, decode_warps, 32),
        (AttnKernel::CudaCore, _) => SPLIT_LEN_PREFILL,
    }
}

/// Warps the decode kernel runs per split for `n_decode` rows: on tensor cores one per 16
/// heads of a query group, on CUDA cores one per query head.
fn decode_warps(kernel: AttnKernel, dims: AttnDims, n_decode: usize) -> usize {
    let group = dims.heads / dims.kv_heads;
    match kernel {
        AttnKernel::TensorCore => n_decode * dims.kv_heads * group.div_ceil(16),
        AttnKernel::CudaCore => n_decode * dims.heads,
    }
}

/// The plan of a decode-only step of `rows` rows (padding included) whose longest context is
/// `max_keys`, for a launch shape that is replayed (CUDA graphs): the splits that
/// [`split_len`] would give, rounded up to a power of two so that one captured shape serves
/// contexts up to twice as long; each row cuts its own keys (`split_len` 0).
pub fn replayed_decode_plan(
    kernel: AttnKernel,
    dims: AttnDims,
    rows: usize,
    max_keys: usize,
    tuning: DecodeTuning,
) -> AttnPlan {
    let stage = match kernel {
        AttnKernel::TensorCore => MMA_KEYS,
        AttnKernel::CudaCore => 32,
    };
    let warps = decode_warps(kernel, dims, rows).max(1);
    let splits = (tuning.target_warps(warps) / warps).clamp(1, max_keys.div_ceil(stage).max(1));
    AttnPlan {
        kernel,
        decode_stage: tuning.stage_keys,
        n_decode: rows,
        n_tiles: 0,
        splits: splits.next_power_of_two(),
        split_len: 0,
    }
}

/// One layer's K and V pools (bytes of `dtype` elements), as the attention kernels read them.
#[derive(Clone, Copy)]
pub(crate) struct KvLayer<'a> {
    pub k: &'a CudaSlice<u8>,
    pub v: &'a CudaSlice<u8>,
    pub dtype: KvCacheDtype,
}

#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    pub rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Per-split partial results of the attention kernels (reused by every layer of a step), with
/// room for `capacity` (row, head, split) entries.
pub struct AttnPartials {
    o: CudaSlice<f32>,
    m: CudaSlice<f32>,
    l: CudaSlice<f32>,
    capacity: usize,
}

impl AttnPartials {
    /// Room for `rows` rows of `heads` heads over `splits` splits.
    pub(crate) fn new(
        dev: &CudaDevice,
        rows: usize,
        heads: usize,
        d: usize,
        splits: usize,
    ) -> Result<Self> {
        let n = (rows * heads * splits).max(1);
        // Safety: the attention kernels write every (row, head, split) entry before the merge
        // kernel reads it.
        Ok(Self {
            o: unsafe { dev.alloc::<f32>(n * d) }?,
            m: unsafe { dev.alloc::<f32>(n) }?,
            l: unsafe { dev.alloc::<f32>(n) }?,
            capacity: n,
        })
    }
}

/// Attention of every query row over its slot list, split along the keys, then merged into
/// `out` (`[rows, heads, head_dim]` bf16, `rows` of `dims`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    dev: &CudaDevice,
    q: &CudaSlice<bf16>,
    kv: KvLayer,
    lists: &ListViews,
    plan: &AttnPlan,
    dims: AttnDims,
    parts: &mut AttnPartials,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    let AttnDims {
        rows,
        heads,
        kv_heads,
        head_dim,
    } = dims;
    if rows * heads * plan.splits > parts.capacity || out.len() < rows * heads * head_dim {
        return Err(ModelError::Cuda(format!(
            "attention buffers too small for {rows} rows over {} splits",
            plan.splits
        )));
    }
    let (hi, kvi, di) = (heads as i32, kv_heads as i32, head_dim as i32);
    let (splits_i, split_len_i) = (plan.splits as i32, plan.split_len as i32);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let group = heads / kv_heads;
    match plan.kernel {
        AttnKernel::TensorCore => {
            let (prefill, decode) = tensor_core_kernels(head_dim, plan.decode_stage, kv.dtype);
            let scale_log2 = scale * std::f32::consts::LOG2_E;
            // Decode rows: tiles of one position, a warp per 16 heads of the group; prefill
            // tiles: 64 / group positions, 4 warps.
            let launches = [
                (
                    decode,
                    &lists.decode_rows,
                    plan.n_decode,
                    1i32,
                    group.div_ceil(16),
                ),
                (
                    prefill,
                    &lists.tile_row0,
                    plan.n_tiles,
                    0i32,
                    MMA_BLOCK_ROWS / 16,
                ),
            ];
            for (name, row0, n, single, warps) in launches {
                if n == 0 {
                    continue;
                }
                let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
                let mut b = func.builder();
                slot_list_args(&mut b, q, kv, lists);
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
                    grid_dim: (n as u32, kv_heads as u32, plan.splits as u32),
                    block_dim: (32 * warps as u32, 1, 1),
                    shared_mem_bytes: 0, // static: at most 36 KiB (64-key bf16 stages, d 128)
                };
                // Safety: argument types and order match the kernel's signature; each block
                // reads its tile's rows of q and its sequence's slot list (checked against the
                // pool size by the caller), and writes only the partial entries of its own
                // (row, head, split)s, which `parts` has room for (checked above);
                // `tile_rows` is read only when `single` is 0.
                unsafe { b.launch(cfg) }.w()?;
            }
        }
        AttnKernel::CudaCore if kv.dtype != KvCacheDtype::Bf16 => {
            return Err(ModelError::Cuda(
                "the CUDA-core attention kernels read bf16 KV pools only".into(),
            ))
        }
        AttnKernel::CudaCore => cuda_core_attention(dev, q, kv, lists, plan, dims, parts, scale)?,
    }
    let func = dev.get_or_load_custom_func("arbor_attention_merge", MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&parts.o)
        .arg(&parts.m)
        .arg(&parts.l)
        .arg(out)
        .arg(&hi)
        .arg(&di)
        .arg(&splits_i);
    // Threads per (row, head): one group of head_dim threads per MERGE_SPLITS_PER_THREAD
    // splits, up to eight groups (kernels.cu), at least a warp. One sequence decoding at 8k
    // tokens has ~130 splits per head, merged by 32 blocks (one per head): eight groups, each
    // thread reading ~16 splits rather than ~130. A batch of 64 decodes at 2k tokens has 8
    // splits: one group, 2,048 blocks of 128 threads. (One group per split there, 1,024
    // threads a block, each adding one product behind three block-wide reductions, took 47 us
    // a layer on the H200, 13% of the step: ncu, docs/results/ncu-decode-2026-12-02.)
    let groups = plan.splits.div_ceil(MERGE_SPLITS_PER_THREAD).clamp(1, 8);
    let threads = (head_dim * groups).clamp(32, 1024).next_multiple_of(32);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, heads as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: ((plan.splits + threads) * 4) as u32,
    };
    // Safety: one block per (row, head) reading that entry's splits and writing its output
    // (`out` holds rows x heads x head_dim, checked above); shared memory holds one weight per
    // split and one partial sum per thread.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// The tensor-core kernels' names for a head size, decode stage and pool element: (prefill
/// tiles, decode rows); a 64-key decode stage runs on the prefill variant. The FP8 variants
/// carry a suffix (kernels.cu, `ATTENTION_MMA_ALL`). Static names: no string is built per
/// launch.
fn tensor_core_kernels(
    head_dim: usize,
    decode_stage: usize,
    dtype: KvCacheDtype,
) -> (&'static str, &'static str) {
    use KvCacheDtype::{Bf16, Fp8E4m3};
    let prefill = match (head_dim, dtype) {
        (64, Bf16) => "arbor_attention_mma_d64",
        (64, Fp8E4m3) => "arbor_attention_mma_d64_fp8",
        (_, Bf16) => "arbor_attention_mma_d128",
        (_, Fp8E4m3) => "arbor_attention_mma_d128_fp8",
    };
    let decode = match (head_dim, decode_stage, dtype) {
        (64, 16, Bf16) => "arbor_attention_mma_decode_d64_k16",
        (64, 32, Bf16) => "arbor_attention_mma_decode_d64_k32",
        (_, 16, Bf16) => "arbor_attention_mma_decode_d128_k16",
        (_, 32, Bf16) => "arbor_attention_mma_decode_d128_k32",
        (64, 16, Fp8E4m3) => "arbor_attention_mma_decode_d64_k16_fp8",
        (64, 32, Fp8E4m3) => "arbor_attention_mma_decode_d64_k32_fp8",
        (_, 16, Fp8E4m3) => "arbor_attention_mma_decode_d128_k16_fp8",
        (_, 32, Fp8E4m3) => "arbor_attention_mma_decode_d128_k32_fp8",
        _ => prefill,
    };
    (prefill, decode)
}

/// The arguments every attention kernel takes first: q, the layer's K and V pools, and the
/// step's slot lists.
pub(crate) fn slot_list_args<'a>(
    b: &mut LaunchArgs<'a>,
    q: &'a CudaSlice<bf16>,
    kv: KvLayer<'a>,
    lists: &'a ListViews,
) {
    b.arg(q)
        .arg(kv.k)
        .arg(kv.v)
        .arg(&lists.flat)
        .arg(&lists.row_offset)
        .arg(&lists.row_keys);
}

/// The CUDA-core kernels' launches (see [`AttnKernel::CudaCore`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn cuda_core_attention(
    dev: &CudaDevice,
    q: &CudaSlice<bf16>,
    kv: KvLayer,
    lists: &ListViews,
    plan: &AttnPlan,
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
    let (splits_i, split_len_i) = (plan.splits as i32, plan.split_len as i32);
    let group = heads / kv_heads;
    // Decode rows: the GQA kernel (one block per (row, KV head, split), one warp per query
    // head) where its shared memory fits, else a warp per (row, head, split). Both take the
    // same arguments.
    let gqa_smem = (group * head_dim + 2 * 32 * (head_dim + 1) + 32) * 4;
    let use_gqa = head_dim % 8 == 0 && group * 32 <= 1024 && gqa_smem <= 48 * 1024;
    // (kernel, launch shape, the row lists it takes after the slot lists)
    let mut launches: Vec<(&str, LaunchConfig, Vec<&CudaView<u32>>)> = Vec::new();
    if plan.n_decode > 0 {
        let (name, cfg) = if use_gqa {
            let cfg = LaunchConfig {
                grid_dim: (plan.n_decode as u32, kv_heads as u32, plan.splits as u32),
                block_dim: (32 * group as u32, 1, 1),
                shared_mem_bytes: gqa_smem as u32,
            };
            ("arbor_attention_gqa", cfg)
        } else {
            let cfg = LaunchConfig {
                grid_dim: (plan.n_decode as u32, heads as u32, plan.splits as u32),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            };
            ("arbor_attention", cfg)
        };
        launches.push((name, cfg, vec![&lists.decode_rows]));
    }
    if plan.n_tiles > 0 {
        // qs [16][D] + ks, vs [32][D + 1] floats + 32 slot ids (kernels.cu).
        let smem = (TILE_ROWS * head_dim + 2 * 32 * (head_dim + 1) + 32) * 4;
        let cfg = LaunchConfig {
            grid_dim: (plan.n_tiles as u32, heads as u32, plan.splits as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let rows = vec![&lists.tile_row0, &lists.tile_rows];
        launches.push(("arbor_attention_tiled", cfg, rows));
    }
    for (name, cfg, rows) in launches {
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let mut b = func.builder();
        slot_list_args(&mut b, q, kv, lists);
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
