//! The CUDA runners: [`CudaRunner`] samples on the GPU (the default); [`CudaBackend`] is
//! [`CudaLlama`] over a GPU [`CudaKvPool`] as a [`LogitsBackend`], whose logits the host
//! sampler takes (`--cuda-sampling host`, for A/B comparisons).

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use super::host::LogitsBackend;
use super::{
    panic_message, FaultInjector, FaultSite, Launched, ModelRunner, RowOutcome, Sampled, SeqId,
    SequenceSampling, StepOutput, StepRow,
};
use crate::config::ModelConfig;
use crate::cuda::{
    CudaKvPool, CudaLlama, DecodeGraphs, GpuSampler, SampleBatch, SampledRow, SeqSamplingState,
};
use crate::error::{ModelError, Result};
use crate::step::{LogitsWanted, SeqStep};

/// Share of the GPU memory free after loading the weights that the default KV pool takes: the
/// rest is for activations and cuBLAS workspaces.
pub(crate) const GPU_KV_MEMORY_SHARE: f64 = 0.85;

pub struct CudaBackend {
    model: Arc<CudaLlama>,
    pool: CudaKvPool,
}

impl CudaBackend {
    /// The model with a pool of `kv_slots` slots (default: 85% of the GPU memory left after
    /// the weights); fails when the pool does not fit.
    pub fn new(model: Arc<CudaLlama>, kv_slots: Option<usize>) -> Result<Self> {
        let budget = model
            .free_memory_bytes()
            .map(|m| (m as f64 * GPU_KV_MEMORY_SHARE) as usize);
        let per_slot = model.kv_bytes_per_slot();
        let slots =
            kv_slots.unwrap_or_else(|| super::default_kv_slots(&model.config, per_slot, budget));
        let pool = CudaKvPool::new(&model, slots)?;
        Ok(Self { model, pool })
    }

    pub fn model(&self) -> &Arc<CudaLlama> {
        &self.model
    }
}

impl LogitsBackend for CudaBackend {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn device_name(&self) -> String {
        format!("{:?}", self.model.device().location())
    }

    fn kv_slots(&self) -> usize {
        self.pool.num_slots()
    }

    fn kv_bytes_per_slot(&self) -> usize {
        self.model.kv_bytes_per_slot()
    }

    fn forward(&mut self, batch: &[SeqStep]) -> Result<Vec<Vec<f32>>> {
        self.model.forward(batch, &mut self.pool)
    }

    fn logits_from_scratch(&self, tokens: &[u32], which: LogitsWanted) -> Result<Vec<Vec<f32>>> {
        let mut pool = CudaKvPool::new(&self.model, tokens.len())?;
        let slots: Vec<u32> = (0..tokens.len() as u32).collect();
        let step = SeqStep {
            tokens,
            slots: &slots,
            logits: which,
        };
        self.model.forward(&[step], &mut pool)
    }
}

/// A [`ModelRunner`] that samples on the GPU ([`GpuSampler`]): the logits stay on the device
/// and only each row's token (and requested log-probabilities) come back. Sampling state lives
/// here per sequence: the seed (the request's, or a random one), the draw count (the Philox
/// counter, so a preempted sequence continues its stream), the output token counts the
/// penalties need, and the fixed adjustments (logit bias, prompt tokens under a repetition
/// penalty, stop tokens banned before `min_tokens`), sorted by token once at registration.
pub struct CudaRunner {
    backend: CudaBackend,
    sampler: GpuSampler,
    /// Decode-only steps on persistent buffers as CUDA graphs; None where the model's weights
    /// do not run there (GGUF blocks kept quantized) or phases are profiled.
    decode: Option<DecodeGraphs>,
    sampling: DeviceSampling,
    /// The step launched and not yet collected.
    running: Option<RunningStep>,
}

/// A launched step: what its collect needs once the GPU is done.
struct RunningStep {
    prepared: PreparedRows,
    /// Whether the sampler was launched (some row samples).
    sampling: bool,
    /// The general path's logits, kept alive until the sampler has read them.
    _logits: Option<candle_core::Tensor>,
    started: Instant,
}

struct DeviceSeq {
    spec: SequenceSampling,
    state: SeqSamplingState,
}

/// The host's side of sampling on a GPU: each sequence's sampling state, and the packing of a
/// step's sampling rows into a [`SampleBatch`] (shared by [`CudaRunner`] and the
/// tensor-parallel runner, whose rank 0 samples).
#[derive(Default)]
pub(crate) struct DeviceSampling {
    seqs: HashMap<SeqId, DeviceSeq>,
    /// Reused each step: the packed sampling rows.
    pub(crate) batch: SampleBatch,
    pub(crate) faults: Option<FaultInjector>,
}

/// A step's sampling rows after [`DeviceSampling::prepare`]: one outcome per row (rows that
/// failed before the GPU already have theirs), and which ones the GPU samples.
pub(crate) struct PreparedRows {
    outcomes: Vec<Option<RowOutcome>>,
    launched: Vec<(usize, SeqId)>,
}

impl DeviceSampling {
    pub(crate) fn add(&mut self, seq: SeqId, spec: SequenceSampling) {
        let state = SeqSamplingState::new(
            &spec.params,
            &spec.prompt,
            spec.min_tokens,
            &spec.banned_before_min,
        );
        self.seqs.insert(seq, DeviceSeq { spec, state });
    }

    pub(crate) fn remove(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
    }

    /// Packs the rows of `rows` that sample into `self.batch`, logit row by logit row.
    /// Each packed row uses its sequence's next draw (see [`SeqSamplingState::begin_draw`]).
    pub(crate) fn prepare(&mut self, rows: &[StepRow], vocab: usize) -> PreparedRows {
        let mut outcomes: Vec<Option<RowOutcome>> = Vec::new();
        let mut launched: Vec<(usize, SeqId)> = Vec::new();
        self.batch.clear();
        for (logit_row, r) in rows.iter().filter(|r| r.sample).enumerate() {
            let Some(state) = self.seqs.get_mut(&r.seq) else {
                outcomes.push(Some(Err(format!(
                    "sequence {} was never added to the runner",
                    r.seq
                ))));
                continue;
            };
            if let Some(f) = &self.faults {
                let hook = AssertUnwindSafe(|| {
                    (f.0)(FaultSite::Sample {
                        prompt: &state.spec.prompt,
                    })
                });
                if let Err(p) = catch_unwind(hook) {
                    outcomes.push(Some(Err(format!(
                        "sampling failed: {}",
                        panic_message(p.as_ref())
                    ))));
                    continue;
                }
            }
            self.batch.push_seq(
                logit_row,
                &state.state,
                state.spec.logprobs,
                r.allowed.map(|m| (m, vocab)),
            );
            state.state.begin_draw();
            launched.push((outcomes.len(), r.seq));
            outcomes.push(None);
        }
        PreparedRows { outcomes, launched }
    }

    /// Every sampling row's outcome, given what the GPU sampled for the launched ones.
    pub(crate) fn finish(
        &mut self,
        prepared: PreparedRows,
        sampled: Option<Vec<SampledRow>>,
    ) -> Vec<RowOutcome> {
        let PreparedRows {
            mut outcomes,
            launched,
        } = prepared;
        if let Some(sampled) = sampled {
            for ((at, seq), (token, logprob)) in launched.into_iter().zip(sampled) {
                // A sequence removed while its step ran is gone: its token is dropped above.
                if let Some(seq) = self.seqs.get_mut(&seq) {
                    seq.state.count_output(token);
                }
                outcomes[at] = Some(Ok(Sampled { token, logprob }));
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err("the step produced no logits for this row".into())))
            .collect()
    }
}

impl CudaRunner {
    pub fn new(backend: CudaBackend) -> Result<Self> {
        let sampler = GpuSampler::new(backend.model.device())?;
        let model = &backend.model;
        let decode = if DecodeGraphs::supports(model) && !model.options().profile {
            Some(DecodeGraphs::new(
                model,
                model.options().decode_graphs,
                false,
            )?)
        } else {
            None
        };
        Ok(Self {
            backend,
            sampler,
            decode,
            sampling: DeviceSampling::default(),
            running: None,
        })
    }
}

impl ModelRunner for CudaRunner {
    fn config(&self) -> &ModelConfig {
        self.backend.config()
    }

    fn device_name(&self) -> String {
        self.backend.device_name()
    }

    fn kv_slots(&self) -> usize {
        self.backend.kv_slots()
    }

    fn kv_bytes_per_slot(&self) -> usize {
        self.backend.kv_bytes_per_slot()
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

    /// Queues the forward pass and the sampling on the GPU's stream, and the copy of the
    /// sampled tokens into page-locked memory, then returns: nothing here waits for the GPU
    /// (the graph path's metadata goes up from page-locked memory, asynchronously).
    fn launch(&mut self, rows: &[StepRow]) -> Result<Launched> {
        if self.running.is_some() {
            return Err(ModelError::Cuda(
                "a step was launched before the previous one was collected".into(),
            ));
        }
        let batch: Vec<SeqStep> = rows.iter().map(StepRow::seq_step).collect();
        let started = Instant::now();
        let vocab = self.backend.config().vocab_size;
        // Decode-only steps on the graph path: its logits stay in its buffer, one row per row
        // of the batch (every row samples); other steps through the general forward pass.
        let (decoded, logits) = match &mut self.decode {
            Some(d) if DecodeGraphs::takes(&batch) => {
                let view = d.step(&self.backend.model, &mut self.backend.pool, &batch, None)?;
                (view, None)
            }
            _ => {
                let model = &self.backend.model;
                (None, model.forward_logits(&batch, &mut self.backend.pool)?)
            }
        };
        let prepared = self.sampling.prepare(rows, vocab);
        let batch = &self.sampling.batch;
        let sampling = match (&decoded, &logits) {
            _ if batch.is_empty() => false,
            (Some(view), _) => {
                self.sampler.launch_rows(view, (rows.len(), vocab), batch)?;
                true
            }
            (None, Some(logits)) => {
                self.sampler.launch(logits, batch)?;
                true
            }
            (None, None) => false,
        };
        self.running = Some(RunningStep {
            prepared,
            sampling,
            _logits: logits,
            started,
        });
        Ok(Launched::Running)
    }

    fn collect(&mut self) -> Result<StepOutput> {
        let step = self
            .running
            .take()
            .ok_or_else(|| ModelError::Cuda("no step is running".into()))?;
        let sampled = if step.sampling {
            Some(self.sampler.collect_rows()?)
        } else {
            None
        };
        let sampled = self.sampling.finish(step.prepared, sampled);
        // From the launch to the sampled tokens' arrival: the forward pass and sampling, and
        // whatever the host did meanwhile.
        let forward_seconds = step.started.elapsed().as_secs_f64();
        Ok(StepOutput {
            sampled,
            forward_seconds,
        })
    }

    fn overlaps(&self) -> bool {
        true
    }

    fn logits_from_scratch(&self, tokens: &[u32], which: LogitsWanted) -> Result<Vec<Vec<f32>>> {
        self.backend.logits_from_scratch(tokens, which)
    }

    fn set_fault_injector(&mut self, faults: Option<FaultInjector>) {
        self.sampling.faults = faults;
    }
}
