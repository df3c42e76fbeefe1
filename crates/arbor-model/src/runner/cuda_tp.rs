//! Tensor parallelism on GPUs: a [`TensorParallel`] whose ranks are [`CudaLlama`] shards, one
//! worker thread per GPU with its own device context and stream, its shard of the weights and
//! of the KV pool, summing over NCCL ([`NcclGroup`]) — or, with every rank on one GPU, through
//! the host ([`StagedAllReduce`]): the check of the cut that one GPU allows.
//!
//! Decode steps take the decode path ([`DecodeGraphs`]) at the shard's widths, its collectives
//! recorded in the CUDA graphs under NCCL (launch by launch with the host-staged sums); other
//! steps the general forward pass. Sampling happens once, on rank 0's GPU
//! ([`CudaTensorParallelRunner`]): the ranks' vocabulary slices of the logits are gathered
//! there and sampled as on one GPU, and only the tokens come back. `--cuda-sampling host` samples on the host from the joined logits instead
//! ([`super::HostSampledRunner`] over the same [`TensorParallel`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use super::cuda::{DeviceSampling, PreparedRows, GPU_KV_MEMORY_SHARE};
use super::host::LogitsBackend;
use super::tp::{RankModel, RunningSampled, SampledRow, TensorParallel};
use super::{FaultInjector, Launched, ModelRunner, SeqId, SequenceSampling, StepOutput, StepRow};
use crate::config::ModelConfig;
use crate::cuda::{CudaKvPool, CudaLlama, DecodeGraphs, DeviceAllReduce, GpuSampler, SampleBatch};
use crate::error::{ModelError, Result};
use crate::step::{LogitsWanted, SeqStep};

/// One GPU rank: its shard, its KV pool (its KV heads of every slot) and the group.
struct CudaRank {
    model: CudaLlama,
    pool: CudaKvPool,
    group: Arc<dyn DeviceAllReduce>,
    /// Rank 0's: the sampler of the gathered logits.
    sampler: Option<GpuSampler>,
    /// The decode path, where the model takes it (the same answer on every rank).
    decode: Option<DecodeGraphs>,
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

    fn step_sampled(&mut self, batch: &[SeqStep], sample: &SampleBatch) -> Result<Vec<SampledRow>> {
        let rank = self.model.shard.rank;
        let group = &*self.group;
        let dev = match self.model.device() {
            candle_core::Device::Cuda(d) => d,
            _ => return Err(ModelError::Cuda("a GPU rank off the GPU".into())),
        };
        if let Some(decode) = self.decode.as_mut().filter(|_| DecodeGraphs::takes(batch)) {
            let joined = decode.step(&self.model, &mut self.pool, batch, Some(group))?;
            // Past the collectives (see below) before the sampler waits on the GPU.
            group.wait(rank, dev)?;
            let vocab = self.model.config.vocab_size;
            return match (joined, self.sampler.as_mut()) {
                _ if sample.is_empty() => Ok(Vec::new()),
                (Some(view), Some(sampler)) => {
                    sampler.sample_rows(&view, (batch.len(), vocab), sample)
                }
                (Some(_), None) => Err(ModelError::RankFailed(format!(
                    "rank {rank} joined the logits but has no sampler"
                ))),
                (None, _) => Ok(Vec::new()),
            };
        }
        let logits = self
            .model
            .forward_shard_logits(batch, &mut self.pool, group)?;
        // Every rank sees the same batch, so all of them gather or none does.
        let joined = match logits {
            Some(l) if !sample.is_empty() => {
                group.gather_columns(rank, &l, self.model.config.vocab_size)?
            }
            _ => None,
        };
        // Past the collectives: a peer that failed cannot leave this rank waiting forever.
        group.wait(rank, dev)?;
        match (joined, self.sampler.as_mut()) {
            (Some(logits), Some(sampler)) => sampler.sample(&logits, sample),
            (Some(_), None) => Err(ModelError::RankFailed(format!(
                "rank {rank} gathered the logits but has no sampler"
            ))),
            (None, _) => Ok(Vec::new()),
        }
    }
}

impl TensorParallel {
    /// GPU shards (rank order) summing through `group`, each with a KV pool of `kv_slots`
    /// slots (default: [`GPU_KV_MEMORY_SHARE`] of the memory each GPU has free after the
    /// weights, as on one GPU, divided between the ranks it holds).
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
            let element = shards[0].options().kv_cache_dtype.element_bytes();
            super::default_kv_slots(&config, config.kv_bytes_per_slot_of(element), budget)
        });
        let names: Vec<String> = gpus.keys().cloned().collect();
        let slot_bytes = shards.iter().map(CudaLlama::kv_bytes_per_slot).sum();
        let mut ranks = Vec::with_capacity(size);
        for model in shards {
            let pool = CudaKvPool::new(&model, slots).map_err(|e| {
                ModelError::Cuda(format!(
                    "rank {}: a KV pool of {slots} slots does not fit ({e}); pass a smaller --kv-slots",
                    model.shard.rank
                ))
            })?;
            let sampler = if model.shard.rank == 0 {
                Some(GpuSampler::new(model.device())?)
            } else {
                None
            };
            let options = model.options();
            let decode = if DecodeGraphs::supports(&model) && !options.profile {
                // Graphs only where the collectives queue GPU work alone (NCCL).
                let graphs = options.decode_graphs && group.in_stream();
                Some(DecodeGraphs::new(&model, graphs, true)?)
            } else {
                None
            };
            ranks.push(CudaRank {
                model,
                pool,
                group: group.clone(),
                sampler,
                decode,
            });
        }
        tracing::info!(
            "CUDA tensor parallelism: {size} ranks on {}, {slots} KV slots each",
            names.join(", ")
        );
        let name = format!("{} (tensor parallel x{size})", names.join(", "));
        Self::start(ranks, config, (slots, slot_bytes), group, name)
    }
}

/// Tensor parallelism on GPUs as a [`ModelRunner`] that samples on rank 0's GPU: the host
/// keeps each sequence's sampling state and packs a step's sampling rows
/// ([`DeviceSampling`], as [`super::CudaRunner`] does), rank 0 samples them from the gathered
/// logits, and only the tokens come back. A step's launch hands it to the rank threads and
/// returns, so the engine's thread turns the previous step's tokens into text and plans the
/// next while the ranks run it (as on one GPU: [`ModelRunner::overlaps`]).
pub struct CudaTensorParallelRunner {
    ranks: TensorParallel,
    sampling: DeviceSampling,
    running: Option<RunningStep>,
}

/// A step the ranks are running, and what its collection needs.
struct RunningStep {
    ranks: RunningSampled,
    prepared: PreparedRows,
    /// Whether any row samples (otherwise rank 0 gathers no logits).
    sampling: bool,
    started: Instant,
}

impl CudaTensorParallelRunner {
    pub fn new(ranks: TensorParallel) -> Self {
        Self {
            ranks,
            sampling: DeviceSampling::default(),
            running: None,
        }
    }
}

impl ModelRunner for CudaTensorParallelRunner {
    fn config(&self) -> &ModelConfig {
        self.ranks.config()
    }

    fn device_name(&self) -> String {
        LogitsBackend::device_name(&self.ranks)
    }

    fn kv_slots(&self) -> usize {
        LogitsBackend::kv_slots(&self.ranks)
    }

    fn kv_bytes_per_slot(&self) -> usize {
        LogitsBackend::kv_bytes_per_slot(&self.ranks)
    }

    fn add_sequence(&mut self, seq: SeqId, spec: SequenceSampling) {
        self.sampling.add(seq, spec);
    }

    fn remove_sequence(&mut self, seq: SeqId) {
        self.sampling.remove(seq);
    }

    fn step(&mut self, rows: &[StepRow]) -> Result<StepOutput> {
        self.launch(rows)?;
        self.collect()
    }

    fn launch(&mut self, rows: &[StepRow]) -> Result<Launched> {
        if self.running.is_some() {
            return Err(ModelError::Cuda(
                "a step was launched before the previous one was collected".into(),
            ));
        }
        let batch: Vec<SeqStep> = rows.iter().map(StepRow::seq_step).collect();
        let started = Instant::now();
        let vocab = self.ranks.config().vocab_size;
        let prepared = self.sampling.prepare(rows, vocab);
        let sample = std::mem::take(&mut self.sampling.batch);
        let sampling = !sample.is_empty();
        let ranks = self.ranks.launch_sampled(&batch, sample)?;
        self.running = Some(RunningStep {
            ranks,
            prepared,
            sampling,
            started,
        });
        Ok(Launched::Running)
    }

    fn collect(&mut self) -> Result<StepOutput> {
        let step = self
            .running
            .take()
            .ok_or_else(|| ModelError::Cuda("no step is running".into()))?;
        let (sampled, sample) = self.ranks.collect_sampled(step.ranks)?;
        self.sampling.batch = sample;
        let sampled = self
            .sampling
            .finish(step.prepared, step.sampling.then_some(sampled));
        Ok(StepOutput {
            sampled,
            forward_seconds: step.started.elapsed().as_secs_f64(),
        })
    }

    fn overlaps(&self) -> bool {
        true
    }

    fn logits_from_scratch(&self, tokens: &[u32], which: LogitsWanted) -> Result<Vec<Vec<f32>>> {
        self.ranks.logits_from_scratch(tokens, which)
    }

    fn set_fault_injector(&mut self, faults: Option<FaultInjector>) {
        self.ranks.set_fault_injector(faults.clone());
        self.sampling.faults = faults;
    }
}
