//! Tensor parallelism's runner: one worker thread per rank, each owning its shard of the
//! model and of the KV pool (its KV heads of every slot, so a slot id names the same token on
//! every rank), behind one [`LogitsBackend`]. What a rank runs is a [`RankModel`]: the CPU's
//! (here: [`Llama`] shards summing through a [`HostAllReduce`], each rank with its own rayon
//! pool of the cores divided between the ranks) or, with the `cuda` feature, a GPU's
//! (`cuda_tp.rs`: one worker per GPU, NCCL).
//!
//! A step: the caller's thread checks the batch, sends it to every rank, and joins the ranks'
//! logit slices (their vocabulary rows) into whole rows; sampling happens once, above, in
//! [`super::HostSampledRunner`]. GPU ranks can instead keep the logits on the devices
//! ([`TensorParallel::step_sampled`]): rank 0 gathers and samples them and answers with the
//! tokens. A rank that fails (an error or a panic in its forward pass)
//! breaks the group ([`RankGroup::abort`]), which releases the ranks waiting in a collective:
//! the step returns the failing rank's reason, and every later step fails at once (the KV
//! shards can no longer be trusted; the engine stops). Nothing waits forever.
//!
//! The CPU ranks are the CPU twin of the GPU ones: the same cut of the model, the same points
//! of communication, the same fixed summation order. They let CI check tensor parallelism
//! (TP=N against TP=1, cache on against off) on machines without GPUs; on one processor they
//! are not faster than TP=1.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use super::host::LogitsBackend;
use super::{panic_message, FaultInjector, FaultSite};
use crate::config::ModelConfig;
use crate::cpu::kv_pool::KvPool;
use crate::cpu::llama::Llama;
use crate::device_sampling::SampleBatch;
use crate::error::{ModelError, Result};
use crate::parallel::{HostAllReduce, RankGroup};
use crate::sampling::TokenLogprob;
use crate::step::{LogitsWanted, SeqStep};

/// A step's batch, owned so that it can go to the rank threads: every sequence's tokens and
/// slots in two flat lists.
struct OwnedBatch {
    tokens: Vec<u32>,
    slots: Vec<u32>,
    seqs: Vec<(Range<usize>, Range<usize>, LogitsWanted)>,
}

impl OwnedBatch {
    fn new(batch: &[SeqStep]) -> Self {
        let mut b = Self {
            tokens: Vec::with_capacity(batch.iter().map(|s| s.tokens.len()).sum()),
            slots: Vec::with_capacity(batch.iter().map(|s| s.slots.len()).sum()),
            seqs: Vec::with_capacity(batch.len()),
        };
        for s in batch {
            let t = b.tokens.len()..b.tokens.len() + s.tokens.len();
            let k = b.slots.len()..b.slots.len() + s.slots.len();
            b.tokens.extend_from_slice(s.tokens);
            b.slots.extend_from_slice(s.slots);
            b.seqs.push((t, k, s.logits));
        }
        b
    }

    fn steps(&self) -> Vec<SeqStep<'_>> {
        self.seqs
            .iter()
            .map(|(t, k, logits)| SeqStep {
                tokens: &self.tokens[t.clone()],
                slots: &self.slots[k.clone()],
                logits: *logits,
            })
            .collect()
    }
}

/// What a rank is asked to do; each rank answers on `reply`.
enum Job {
    /// A step over the rank's KV pool.
    Step(Arc<OwnedBatch>),
    /// A step over a scratch pool of the batch's length (diagnostics).
    Scratch(Arc<OwnedBatch>),
    /// A step whose logits stay on the devices: rank 0 gathers them and samples these rows.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    StepSampled(Arc<OwnedBatch>, Arc<SampleBatch>),
}

/// What a rank answers.
enum RankOutput {
    /// Its vocabulary slice of each logit row.
    Logits(Vec<Vec<f32>>),
    /// The sampled rows (rank 0), or nothing (the others).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Sampled(Vec<SampledRow>),
}

type Reply = Result<RankOutput>;

/// A sampled step the ranks are running ([`TensorParallel::launch_sampled`]).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct RunningSampled {
    replies: Vec<Receiver<Reply>>,
    /// Shared with the ranks until they answer; then the caller takes it back for reuse.
    sample: Arc<SampleBatch>,
}

/// A sampled row: its token and, when asked, log-probabilities.
pub(crate) type SampledRow = (u32, Option<TokenLogprob>);

/// One rank's part of the model, run on its worker thread: its shard of the weights, of the
/// KV pool, and its end of the group's collectives.
pub(crate) trait RankModel: Send + 'static {
    fn rank(&self) -> usize;
    /// One step over the rank's KV pool: the rank's vocabulary slice of each logit row.
    fn step(&mut self, batch: &[SeqStep]) -> Result<Vec<Vec<f32>>>;
    /// The same over a fresh pool of the batch's token count (diagnostics).
    fn scratch(&mut self, batch: &[SeqStep], tokens: usize) -> Result<Vec<Vec<f32>>>;
    /// One step over the rank's KV pool whose logits stay on the device: rank 0 gathers the
    /// whole rows and samples `sample`'s rows there; the other ranks return nothing.
    fn step_sampled(
        &mut self,
        _batch: &[SeqStep],
        _sample: &SampleBatch,
    ) -> Result<Vec<SampledRow>> {
        Err(ModelError::InvalidOption(
            "this backend's ranks do not sample on their device".into(),
        ))
    }
}

struct Rank {
    jobs: Option<Sender<(Job, Sender<Reply>)>>,
    thread: Option<JoinHandle<()>>,
}

/// What a rank's thread owns.
struct RankWorker<M: RankModel> {
    model: M,
    group: Arc<dyn RankGroup>,
    faults: Arc<Mutex<Option<FaultInjector>>>,
    steps: Arc<AtomicU64>,
}

impl<M: RankModel> RankWorker<M> {
    fn run(mut self, jobs: Receiver<(Job, Sender<Reply>)>) {
        while let Ok((job, reply)) = jobs.recv() {
            let rank = self.model.rank();
            let outcome = catch_unwind(AssertUnwindSafe(|| self.execute(&job)));
            let result = match outcome {
                Ok(Ok(logits)) => Ok(logits),
                Ok(Err(e @ ModelError::RankFailed(_))) => Err(e),
                Ok(Err(e)) => {
                    let why = format!("rank {rank}: {e}");
                    self.group.abort(&why);
                    Err(ModelError::RankFailed(why))
                }
                Err(panic) => {
                    let why = format!("rank {rank} panicked: {}", panic_message(panic.as_ref()));
                    self.group.abort(&why);
                    Err(ModelError::RankFailed(why))
                }
            };
            // The job's shared batches go before the answer: once every rank has answered, the
            // caller holds the only references (it takes the sampling batch back for reuse).
            drop(job);
            // The caller waits for every rank; if it is gone, so is the runner.
            let _ = reply.send(result);
        }
    }

    fn execute(&mut self, job: &Job) -> Result<RankOutput> {
        match job {
            Job::Step(batch) | Job::StepSampled(batch, _) => {
                let faults = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(f) = faults.as_ref() {
                    let step = self.steps.load(Ordering::SeqCst);
                    (f.0)(FaultSite::Rank {
                        rank: self.model.rank(),
                        step,
                    });
                }
                drop(faults);
                match job {
                    Job::StepSampled(_, sample) => self
                        .model
                        .step_sampled(&batch.steps(), sample)
                        .map(RankOutput::Sampled),
                    _ => self.model.step(&batch.steps()).map(RankOutput::Logits),
                }
            }
            Job::Scratch(batch) => self
                .model
                .scratch(&batch.steps(), batch.tokens.len())
                .map(RankOutput::Logits),
        }
    }
}

/// A CPU rank: its [`Llama`] shard, KV pool and thread pool.
struct CpuRank {
    model: Llama,
    pool: KvPool,
    threads: rayon::ThreadPool,
    group: Arc<HostAllReduce>,
}

impl RankModel for CpuRank {
    fn rank(&self) -> usize {
        self.model.shard.rank
    }

    fn step(&mut self, batch: &[SeqStep]) -> Result<Vec<Vec<f32>>> {
        let (model, pool, group) = (&self.model, &mut self.pool, &*self.group);
        self.threads
            .install(|| model.forward_shard(batch, pool, group))
    }

    fn scratch(&mut self, batch: &[SeqStep], tokens: usize) -> Result<Vec<Vec<f32>>> {
        let mut pool = self.model.new_kv_pool(tokens);
        let (model, group) = (&self.model, &*self.group);
        self.threads
            .install(|| model.forward_shard(batch, &mut pool, group))
    }
}

/// A model over tensor-parallel ranks (see the module docs).
pub struct TensorParallel {
    /// The whole model's shape.
    config: ModelConfig,
    kv_slots: usize,
    /// Over every rank's pool (replicated KV heads count once per rank).
    kv_bytes_per_slot: usize,
    device_name: String,
    ranks: Vec<Rank>,
    group: Arc<dyn RankGroup>,
    /// Every rank must see the jobs in one order: one job at a time.
    dispatch: Mutex<()>,
    faults: Arc<Mutex<Option<FaultInjector>>>,
    /// Steps run so far (the fault hook's count).
    steps: Arc<AtomicU64>,
}

impl TensorParallel {
    /// The CPU model over one worker per shard model (rank order), each with a pool of
    /// `kv_slots` slots (default: 40% of the memory available now, over all ranks' pools) and
    /// an equal share of the cores.
    pub fn cpu(models: Vec<Llama>, kv_slots: Option<usize>) -> Result<Self> {
        let size = models.len();
        let config = models[0].config.clone();
        let slots = kv_slots.unwrap_or_else(|| {
            // The ranks' pools share the host's memory: a slot costs the sum of their widths,
            // more than one model's slot when KV heads are replicated.
            let ranks_slot: usize = models.iter().map(|m| m.shard.kv_dim(&config)).sum();
            let budget = crate::cpu::available_memory_bytes()
                .map(|m| (m as f64 * super::cpu::CPU_KV_MEMORY_SHARE) as usize)
                .map(|b| b / ranks_slot.max(1) * config.kv_dim());
            super::default_kv_slots(&config, config.kv_bytes_per_slot(), budget)
        });
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads_each = (cores / size).max(1);
        let group = Arc::new(HostAllReduce::new(size));
        let mut ranks = Vec::with_capacity(size);
        for model in models {
            let rank = model.shard.rank;
            let threads = rayon::ThreadPoolBuilder::new()
                .num_threads(threads_each)
                .thread_name(move |i| format!("arbor-tp{rank}-{i}"))
                .build()
                .map_err(|e| ModelError::RankFailed(format!("rank {rank}: thread pool: {e}")))?;
            ranks.push(CpuRank {
                pool: model.new_kv_pool(slots),
                model,
                threads,
                group: group.clone(),
            });
        }
        tracing::info!("CPU tensor parallelism: {size} ranks of {threads_each} threads each");
        let name = format!("cpu (tensor parallel x{size})");
        let f16 = std::mem::size_of::<half::f16>();
        let slot_bytes = ranks
            .iter()
            .map(|r| r.model.shard.kv_bytes_per_slot(&config, f16))
            .sum();
        Self::start(ranks, config, (slots, slot_bytes), group, name)
    }

    /// Starts one worker thread per rank (given in rank order). `config` is the whole model's,
    /// `kv_slots` every rank's pool size and `kv_bytes_per_slot` what a slot takes over all
    /// ranks, `group` the ranks' collectives.
    pub(crate) fn start<M: RankModel>(
        models: Vec<M>,
        config: ModelConfig,
        (kv_slots, kv_bytes_per_slot): (usize, usize),
        group: Arc<dyn RankGroup>,
        device_name: String,
    ) -> Result<Self> {
        let faults = Arc::new(Mutex::new(None));
        let steps = Arc::new(AtomicU64::new(0));
        let mut ranks = Vec::with_capacity(models.len());
        for model in models {
            let rank = model.rank();
            let worker = RankWorker {
                model,
                group: group.clone(),
                faults: faults.clone(),
                steps: steps.clone(),
            };
            let (jobs, inbox) = channel();
            let thread = std::thread::Builder::new()
                .name(format!("arbor-tp{rank}"))
                .spawn(move || worker.run(inbox))
                .map_err(|e| ModelError::RankFailed(format!("rank {rank}: thread: {e}")))?;
            ranks.push(Rank {
                jobs: Some(jobs),
                thread: Some(thread),
            });
        }
        Ok(Self {
            config,
            kv_slots,
            kv_bytes_per_slot,
            device_name,
            ranks,
            group,
            dispatch: Mutex::new(()),
            faults,
            steps,
        })
    }

    /// Sends `job` to every rank; their answers in rank order.
    fn run_job(&self, make: impl Fn() -> Job) -> Result<Vec<RankOutput>> {
        let replies = self.send_job(make)?;
        self.await_job(replies)
    }

    /// Sends `job` to every rank and returns without waiting: each rank's reply channel, in
    /// rank order, for [`Self::await_job`].
    fn send_job(&self, make: impl Fn() -> Job) -> Result<Vec<Receiver<Reply>>> {
        // Every rank must queue the jobs in one order. Each job has its own reply channels, so
        // only the sending is serialised: a job may queue behind one still running.
        let _one_at_a_time = self.dispatch.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(why) = self.group.aborted() {
            return Err(ModelError::RankFailed(why));
        }
        let mut replies = Vec::with_capacity(self.ranks.len());
        for (r, rank) in self.ranks.iter().enumerate() {
            let (tx, rx) = channel();
            let sent = rank
                .jobs
                .as_ref()
                .is_some_and(|jobs| jobs.send((make(), tx)).is_ok());
            if !sent {
                // Ranks already sent this job would wait for this one in the all-reduce.
                let why = format!("rank {r} is gone");
                self.group.abort(&why);
                return Err(ModelError::RankFailed(why));
            }
            replies.push(rx);
        }
        Ok(replies)
    }

    /// Every rank's answer to a job [`Self::send_job`] sent, in rank order, or the first
    /// failure.
    fn await_job(&self, replies: Vec<Receiver<Reply>>) -> Result<Vec<RankOutput>> {
        let mut slices = Vec::with_capacity(replies.len());
        let mut failure = None;
        for (r, rx) in replies.into_iter().enumerate() {
            match rx.recv() {
                Ok(Ok(rows)) => slices.push(rows),
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                }
                Err(_) => {
                    let why = format!("rank {r} stopped without answering");
                    self.group.abort(&why);
                    failure.get_or_insert(ModelError::RankFailed(why));
                }
            }
        }
        // The reason a rank gave first; the others were released by it.
        if let Some(e) = failure {
            return Err(match self.group.aborted() {
                Some(why) => ModelError::RankFailed(why),
                None => e,
            });
        }
        Ok(slices)
    }

    /// Sends `job` to every rank and joins their logit slices row by row.
    fn run_logits_job(&self, make: impl Fn() -> Job) -> Result<Vec<Vec<f32>>> {
        let mut slices = Vec::new();
        for out in self.run_job(make)? {
            match out {
                RankOutput::Logits(rows) => slices.push(rows),
                RankOutput::Sampled(_) => {
                    return Err(ModelError::RankFailed(
                        "a rank sampled where logits were asked for".into(),
                    ))
                }
            }
        }
        Ok(join_rows(slices, self.config.vocab_size))
    }

    /// One step whose logits never leave the GPUs: rank 0 samples `sample`'s rows (packed by
    /// the caller in logit-row order). Gives the sampled rows and the batch back (its buffers
    /// are reused). The runner launches and collects separately; this is both at once.
    #[cfg(test)]
    pub(crate) fn step_sampled(
        &self,
        batch: &[SeqStep],
        sample: SampleBatch,
    ) -> Result<(Vec<SampledRow>, SampleBatch)> {
        let running = self.launch_sampled(batch, sample)?;
        self.collect_sampled(running)
    }

    /// [`Self::step_sampled`]'s first half: checks the batch and hands it to the ranks, then
    /// returns while they run it, so that the caller's thread can prepare the next step.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn launch_sampled(
        &self,
        batch: &[SeqStep],
        sample: SampleBatch,
    ) -> Result<RunningSampled> {
        // Bad input is the caller's error, found before any rank starts: it breaks nothing.
        self.check(batch, self.kv_slots)?;
        let owned = Arc::new(OwnedBatch::new(batch));
        let sample = Arc::new(sample);
        let replies = self.send_job(|| Job::StepSampled(owned.clone(), sample.clone()))?;
        Ok(RunningSampled { replies, sample })
    }

    /// [`Self::step_sampled`]'s second half: every rank's answer to the step
    /// [`Self::launch_sampled`] handed them.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn collect_sampled(
        &self,
        running: RunningSampled,
    ) -> Result<(Vec<SampledRow>, SampleBatch)> {
        let RunningSampled { replies, sample } = running;
        let result = self.await_job(replies);
        // Counted once the ranks are done with the step: a rank's fault hook sees the count of
        // the steps before its own, with or without overlap.
        self.steps.fetch_add(1, Ordering::SeqCst);
        let sampled = match result?.into_iter().next() {
            Some(RankOutput::Sampled(rows)) => rows,
            _ => return Err(ModelError::RankFailed("rank 0 gave no sampled rows".into())),
        };
        // Every rank has answered, so every clone of the batch is gone.
        let sample = Arc::try_unwrap(sample).unwrap_or_default();
        Ok((sampled, sample))
    }

    /// The whole model's shape.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn check(&self, batch: &[SeqStep], pool_slots: usize) -> Result<()> {
        batch
            .iter()
            .try_for_each(|s| s.validate(&self.config, pool_slots))
    }
}

/// Row `i` of the result is rank 0's row `i`, then rank 1's, ...: each rank's vocabulary
/// rows in order.
fn join_rows(slices: Vec<Vec<Vec<f32>>>, vocab: usize) -> Vec<Vec<f32>> {
    let rows = slices.first().map_or(0, Vec::len);
    let mut joined: Vec<Vec<f32>> = (0..rows).map(|_| Vec::with_capacity(vocab)).collect();
    for rank in slices {
        for (row, part) in joined.iter_mut().zip(rank) {
            row.extend_from_slice(&part);
        }
    }
    joined
}

impl LogitsBackend for TensorParallel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn device_name(&self) -> String {
        self.device_name.clone()
    }

    fn kv_slots(&self) -> usize {
        self.kv_slots
    }

    fn kv_bytes_per_slot(&self) -> usize {
        self.kv_bytes_per_slot
    }

    fn forward(&mut self, batch: &[SeqStep]) -> Result<Vec<Vec<f32>>> {
        // Bad input is the caller's error, found before any rank starts: it breaks nothing.
        self.check(batch, self.kv_slots)?;
        let owned = Arc::new(OwnedBatch::new(batch));
        let result = self.run_logits_job(|| Job::Step(owned.clone()));
        self.steps.fetch_add(1, Ordering::SeqCst);
        result
    }

    fn logits_from_scratch(&self, tokens: &[u32], which: LogitsWanted) -> Result<Vec<Vec<f32>>> {
        let slots: Vec<u32> = (0..tokens.len() as u32).collect();
        let step = SeqStep {
            tokens,
            slots: &slots,
            logits: which,
        };
        self.check(&[step], tokens.len())?;
        let owned = Arc::new(OwnedBatch::new(&[step]));
        self.run_logits_job(|| Job::Scratch(owned.clone()))
    }

    fn set_fault_injector(&mut self, faults: Option<FaultInjector>) {
        *self.faults.lock().unwrap_or_else(PoisonError::into_inner) = faults;
    }
}

impl Drop for TensorParallel {
    fn drop(&mut self) {
        // Closing the job channels ends the workers' loops once they have answered the jobs
        // queued (a launched step nobody collects included: its reply goes nowhere).
        for rank in &mut self.ranks {
            rank.jobs.take();
        }
        for rank in &mut self.ranks {
            if let Some(t) = rank.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_sampling::SeqSamplingState;
    use crate::parallel::AllReduce;
    use crate::sampling::SamplingParams;

    /// A rank that joins one all-reduce per step, as a real rank's forward pass does, and
    /// "samples" each row as the row's index plus the group's sum (so a result can only come
    /// from a rank that met all the others).
    struct CountingRank {
        rank: usize,
        fails: bool,
        group: Arc<HostAllReduce>,
        /// Where set, a sampled step starts only once the test opens it (or fails after 10 s).
        gate: Option<Arc<Gate>>,
    }

    /// A door the test opens: `(open, its condition)`.
    type Gate = (Mutex<bool>, std::sync::Condvar);

    fn open(gate: &Gate) {
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    impl RankModel for CountingRank {
        fn rank(&self) -> usize {
            self.rank
        }

        fn step(&mut self, _batch: &[SeqStep]) -> Result<Vec<Vec<f32>>> {
            Ok(vec![vec![self.rank as f32]])
        }

        fn scratch(&mut self, batch: &[SeqStep], _tokens: usize) -> Result<Vec<Vec<f32>>> {
            self.step(batch)
        }

        fn step_sampled(
            &mut self,
            _batch: &[SeqStep],
            sample: &SampleBatch,
        ) -> Result<Vec<SampledRow>> {
            if self.fails {
                return Err(ModelError::Cuda("out of memory".into()));
            }
            if let Some(gate) = &self.gate {
                let wait = std::time::Duration::from_secs(10);
                let open = gate.0.lock().unwrap();
                let (open, _) = gate.1.wait_timeout_while(open, wait, |o| !*o).unwrap();
                if !*open {
                    return Err(ModelError::Cuda(
                        "the step ran before its launch returned".into(),
                    ));
                }
            }
            let mut x = [1.0f32 + self.rank as f32];
            self.group.sum(self.rank, &mut x)?;
            let rows = if self.rank == 0 { sample.len() } else { 0 };
            Ok((0..rows).map(|i| (i as u32 + x[0] as u32, None)).collect())
        }
    }

    fn ranks(size: usize, failing: Option<usize>) -> TensorParallel {
        gated_ranks(size, failing, None)
    }

    fn gated_ranks(size: usize, failing: Option<usize>, gate: Option<Arc<Gate>>) -> TensorParallel {
        let group = Arc::new(HostAllReduce::new(size));
        let models = (0..size)
            .map(|rank| CountingRank {
                rank,
                fails: failing == Some(rank),
                group: group.clone(),
                gate: gate.clone(),
            })
            .collect();
        let config = crate::parallel::tests::config(4, 2, 64, 32);
        TensorParallel::start(models, config, (16, 64), group, "test".into()).unwrap()
    }

    fn sample_rows(n: usize) -> SampleBatch {
        let state = SeqSamplingState::new(&SamplingParams::default(), &[1, 2], 0, &[]);
        let mut batch = SampleBatch::default();
        for row in 0..n {
            batch.push_seq(row, &state, None, None);
        }
        batch
    }

    #[test]
    fn rank_zero_samples_once_after_every_rank_joined_and_the_batch_comes_back() {
        let tp = ranks(3, None);
        let (tokens, slots) = ([5u32, 6], [0u32, 1]);
        let steps = [
            SeqStep {
                tokens: &tokens[..1],
                slots: &slots[..1],
                logits: LogitsWanted::Last,
            },
            SeqStep {
                tokens: &tokens[1..],
                slots: &slots[1..],
                logits: LogitsWanted::Last,
            },
        ];
        let (sampled, back) = tp.step_sampled(&steps, sample_rows(2)).unwrap();
        // The group's sum is 1 + 2 + 3 = 6: every rank took part.
        let tokens: Vec<u32> = sampled.iter().map(|r| r.0).collect();
        assert_eq!(tokens, vec![6, 7]);
        assert_eq!(back.len(), 2, "the packed rows come back for reuse");
        // Bad input is refused before any rank runs, and breaks nothing.
        let bad = [SeqStep {
            tokens: &[99],
            slots: &[0],
            logits: LogitsWanted::Last,
        }];
        assert!(tp.step_sampled(&bad, sample_rows(1)).is_err());
        assert!(tp.step_sampled(&steps, sample_rows(2)).is_ok());
    }

    #[test]
    fn a_launched_step_runs_while_the_caller_works_and_later_jobs_queue_behind_it() {
        let gate = Arc::new(Gate::default());
        let tp = gated_ranks(2, None, Some(gate.clone()));
        let step = [SeqStep {
            tokens: &[5],
            slots: &[0],
            logits: LogitsWanted::Last,
        }];
        // The ranks hold the step until the gate opens: a launch that waited for them would
        // make them fail it.
        let running = tp.launch_sampled(&step, sample_rows(3)).unwrap();
        open(&gate);
        // A job sent while the step runs goes to every rank after it: no deadlock, and the
        // step's all-reduce still pairs up.
        let scratch = tp.logits_from_scratch(&[5], LogitsWanted::Last).unwrap();
        assert_eq!(
            scratch,
            vec![vec![0.0, 1.0]],
            "rank 0's slice, then rank 1's"
        );
        let (sampled, back) = tp.collect_sampled(running).unwrap();
        let tokens: Vec<u32> = sampled.iter().map(|r| r.0).collect();
        assert_eq!(
            tokens,
            vec![3, 4, 5],
            "1 + 2 from the two ranks, plus the row"
        );
        assert_eq!(back.len(), 3);
        // A launch refused for bad input leaves nothing running and breaks nothing.
        let bad = [SeqStep {
            tokens: &[99],
            slots: &[0],
            logits: LogitsWanted::Last,
        }];
        assert!(tp.launch_sampled(&bad, sample_rows(1)).is_err());
        let again = tp.launch_sampled(&step, sample_rows(1)).unwrap();
        assert_eq!(tp.collect_sampled(again).unwrap().0[0].0, 3);
    }

    #[test]
    fn a_rank_that_fails_a_sampled_step_fails_it_and_every_later_one() {
        let tp = ranks(3, Some(2));
        let step = [SeqStep {
            tokens: &[5],
            slots: &[0],
            logits: LogitsWanted::Last,
        }];
        let e = tp
            .step_sampled(&step, sample_rows(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 2") && e.contains("out of memory"), "{e}");
        let again = tp
            .step_sampled(&step, sample_rows(1))
            .unwrap_err()
            .to_string();
        assert!(again.contains("rank 2"), "{again}");
    }
}
