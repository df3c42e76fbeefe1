//! Tensor parallelism on GPUs: a [`TensorParallel`] whose ranks are [`CudaLlama`] shards, one
//! worker thread per GPU with its own device context and stream, its shard of the weights and
//! of the KV pool, summing over NCCL ([`NcclGroup`]) — or, with every rank on one GPU, through
//! the host ([`StagedAllReduce`]): the check of the cut that one GPU allows.
//!
//! Steps run the general forward pass (no CUDA graphs yet: the collectives are not captured),
//! and the host samples the joined logits once ([`super::HostSampledRunner`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::tp::{RankModel, TensorParallel};
use crate::cuda::{CudaKvPool, CudaLlama, DeviceAllReduce};
use crate::error::{ModelError, Result};
use crate::step::SeqStep;

/// Share of each GPU's memory free after the weights that the ranks' KV pools take, as for
/// one GPU (`super::cuda`).
const GPU_KV_MEMORY_SHARE: f64 = 0.85;

/// One GPU rank: its shard, its KV pool (its KV heads of every slot) and the group.
struct CudaRank {
    model: CudaLlama,
    pool: CudaKvPool,
    group: Arc<dyn DeviceAllReduce>,
}

impl RankModel for CudaRank {
    fn rank(&self) -> usize {
        self.model.shard.rank
    }

    fn step(&mut self, batch: &[SeqStep]) -> Result<Vec<Vec<f32>>> {
        self.model
            .forward_shard(batch, &mut self.pool, &*self.group)
    }

    fn scratch(&mut self, batch: &[SeqStep], tokens: usize) -> Result<Vec<Vec<f32>>> {
        let mut pool = CudaKvPool::new(&self.model, tokens)?;
        self.model.forward_shard(batch, &mut pool, &*self.group)
    }
}

impl TensorParallel {
    /// GPU shards (rank order) summing through `group`, each with a KV pool of `kv_slots`
    /// slots (default: 85% of the memory each GPU has free after the weights, divided
    /// between the ranks it holds).
    pub fn cuda(
        shards: Vec<CudaLlama>,
        group: Arc<dyn DeviceAllReduce>,
        kv_slots: Option<usize>,
    ) -> Result<Self> {
        let size = shards.len();
        let config = shards[0].config.clone();
        // Per GPU: its free memory and the KV width of the ranks it holds.
        let mut gpus: BTreeMap<String, (Option<usize>, usize)> = BTreeMap::new();
        for s in &shards {
            let entry = gpus
                .entry(format!("{:?}", s.device().location()))
                .or_insert((s.free_memory_bytes(), 0));
            entry.1 += s.shard.kv_dim(&config);
        }
        let slots = kv_slots.unwrap_or_else(|| {
            // The tightest GPU decides; a slot costs the sum of its ranks' widths there.
            let budget = gpus
                .values()
                .map(|(free, width)| {
                    free.map(|f| (f as f64 * GPU_KV_MEMORY_SHARE) as usize / width.max(&1))
                })
                .min()
                .flatten()
                .map(|per_width| per_width * config.kv_dim());
            super::default_kv_slots(&config, budget)
        });
        let names: Vec<String> = gpus.keys().cloned().collect();
        let mut ranks = Vec::with_capacity(size);
        for model in shards {
            let pool = CudaKvPool::new(&model, slots).map_err(|e| {
                ModelError::Cuda(format!(
                    "rank {}: a KV pool of {slots} slots does not fit ({e}); pass a smaller --kv-slots",
                    model.shard.rank
                ))
            })?;
            ranks.push(CudaRank {
                model,
                pool,
                group: group.clone(),
            });
        }
        tracing::info!(
            "CUDA tensor parallelism: {size} ranks on {}, {slots} KV slots each",
            names.join(", ")
        );
        let name = format!("{} (tensor parallel x{size})", names.join(", "));
        Self::start(ranks, config, slots, group, name)
    }
}
