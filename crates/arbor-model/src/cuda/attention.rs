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
    pub(crate) fn build<'a>(
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
pub(crate) fn split_len(
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
    pub(crate) fn new(
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
pub(crate) fn attention(
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
pub(crate) fn slot_list_args<'a>(
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
pub(crate) fn cuda_core_attention(
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
