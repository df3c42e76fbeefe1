//! Sampling on the GPU (`sampler.cu`): a step's logit rows become tokens where they are, and
//! only the tokens (and requested log-probabilities) come back.
//!
//! The host describes each row in a [`SampleBatch`]: its parameters, its Philox key (the
//! sequence's seed) and counter (its draw count), and the distinct tokens whose logits the
//! penalties, `logit_bias` and bans change ([`Adjust`]). The batch goes up in one copy through
//! page-locked memory into a buffer that lives as long as the sampler, the kernel runs one
//! block per row, and one copy brings the rows' results back. Buffers grow to the largest step
//! seen and are reused: no allocation per step once warm.
//!
//! Semantics are those of [`crate::sampling::Sampler`]: greedy tokens are identical (the same
//! adjusted logits to the bit, the same first maximum); seeded draws follow the same
//! distribution (checked by a chi-square test in `diagnostics::gpu_sampler_checks`) from a
//! different random stream.

use super::*;

pub use crate::device_sampling::{
    Adjust, SampleBatch, SeqSamplingState, MAX_TOP_LOGPROBS, OUT_WORDS,
};
use crate::sampling::TokenLogprob;

const SAMPLER_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/arbor_sampler.ptx"));
const SAMPLER_MODULE: &str = "arbor_sampler";
const THREADS: u32 = 1024;

/// What a row gave: its token and, when asked, log-probabilities.
pub type SampledRow = (u32, Option<TokenLogprob>);

/// The sampler's device and page-locked buffers, grown as needed and reused.
pub struct GpuSampler {
    device: Device,
    packed_host: Option<PinnedHostSlice<u32>>,
    packed: Option<CudaSlice<u32>>,
    /// Adjusted logits, then kept probabilities, one row each per sampling row.
    work: Option<CudaSlice<f32>>,
    probs: Option<CudaSlice<f32>>,
    out: Option<CudaSlice<u32>>,
    out_host: Option<PinnedHostSlice<u32>>,
    /// The vocabulary of a launch whose results are on their way into `out_host`, and its
    /// rows' log-probability requests (reused each step).
    launched: Option<usize>,
    launched_top_n: Vec<Option<usize>>,
}

/// `slot` holding at least `n` elements, reallocated (to the next power of two) when smaller.
fn ensure<T>(
    slot: &mut Option<T>,
    n: usize,
    len: impl Fn(&T) -> usize,
    alloc: impl FnOnce(usize) -> Result<T>,
) -> Result<&mut T> {
    if slot.as_ref().is_none_or(|s| len(s) < n) {
        *slot = None; // the old buffer goes first
        *slot = Some(alloc(n.next_power_of_two())?);
    }
    slot.as_mut()
        .ok_or_else(|| ModelError::Cuda("sampler buffer missing".into()))
}

impl GpuSampler {
    pub fn new(device: &Device) -> Result<Self> {
        cuda_device(device)?;
        Ok(Self {
            device: device.clone(),
            packed_host: None,
            packed: None,
            work: None,
            probs: None,
            out: None,
            out_host: None,
            launched: None,
            launched_top_n: Vec::new(),
        })
    }

    /// Samples `batch` from `logits` (`[rows, vocab]` f32 on this sampler's GPU); one result per
    /// pushed row, in order.
    pub fn sample(&mut self, logits: &Tensor, batch: &SampleBatch) -> Result<Vec<SampledRow>> {
        self.launch(logits, batch)?;
        self.collect_rows()
    }

    /// [`GpuSampler::sample`] without the wait: see [`GpuSampler::launch_rows`].
    pub fn launch(&mut self, logits: &Tensor, batch: &SampleBatch) -> Result<()> {
        let (logit_rows, vocab) = logits.dims2()?;
        if logits.dtype() != DType::F32 {
            return Err(ModelError::Cuda("the sampler reads f32 logits".into()));
        }
        let (st, lay) = logits.storage_and_layout();
        let logits_s = slice_of::<f32>(&st, lay)?;
        self.launch_rows(&logits_s, (logit_rows, vocab), batch)
    }

    /// [`GpuSampler::sample`] from `logit_rows` rows of `vocab` f32 logits in a device buffer.
    pub fn sample_rows(
        &mut self,
        logits_s: &CudaView<f32>,
        dims: (usize, usize),
        batch: &SampleBatch,
    ) -> Result<Vec<SampledRow>> {
        self.launch_rows(logits_s, dims, batch)?;
        self.collect_rows()
    }

    /// Queues [`GpuSampler::sample_rows`]'s work on the stream and returns without waiting:
    /// [`GpuSampler::collect_rows`] waits and reads the results. The logits must stay where
    /// they are until then (stream order protects them from later kernels, not from a free).
    pub fn launch_rows(
        &mut self,
        logits_s: &CudaView<f32>,
        (logit_rows, vocab): (usize, usize),
        batch: &SampleBatch,
    ) -> Result<()> {
        if self.launched.is_some() {
            return Err(ModelError::Cuda(
                "a sampling launch is not collected yet".into(),
            ));
        }
        let n = batch.len();
        self.launched_top_n.clear();
        if n == 0 {
            self.launched = Some(vocab);
            return Ok(());
        }
        if logits_s.len() < logit_rows * vocab {
            return Err(ModelError::Cuda("fewer logits than rows x vocab".into()));
        }
        if let Some(bad) = batch.logit_rows().find(|&r| r >= logit_rows) {
            return Err(ModelError::Cuda(format!(
                "sampling row names logit row {bad} of {logit_rows}"
            )));
        }
        let dev = cuda_device(&self.device)?.clone();
        let stream = dev.cuda_stream();
        let words = batch.row_words().len() + batch.adjust_words().len();
        let ctx = stream.context().clone();
        // Flags 0: cacheable (the host reads the results back).
        let pinned = |len: usize| {
            // Safety: page-locked memory of `len` u32s; only the prefix written before a copy
            // is ever copied or read.
            unsafe { ctx.alloc_pinned_with_flags::<u32>(len, 0) }.map_err(cuda_err)
        };
        let host = ensure(&mut self.packed_host, words, |s| s.len(), pinned)?;
        {
            let host = host.as_mut_slice().map_err(cuda_err)?;
            host[..batch.row_words().len()].copy_from_slice(batch.row_words());
            host[batch.row_words().len()..words].copy_from_slice(batch.adjust_words());
        }
        let host = host.as_slice().map_err(cuda_err)?;
        let zeros_u32 = |len| stream.alloc_zeros::<u32>(len).map_err(cuda_err);
        let zeros_f32 = |len| stream.alloc_zeros::<f32>(len).map_err(cuda_err);
        let packed = ensure(&mut self.packed, words, |s| s.len(), zeros_u32)?;
        stream
            .memcpy_htod(&host[..words], &mut packed.slice_mut(..words))
            .map_err(cuda_err)?;
        let work = ensure(&mut self.work, n * vocab, |s| s.len(), zeros_f32)?;
        let probs = ensure(&mut self.probs, n * vocab, |s| s.len(), zeros_f32)?;
        let out = ensure(&mut self.out, n * OUT_WORDS, |s| s.len(), zeros_u32)?;
        {
            let func = dev.get_or_load_custom_func("arbor_sample", SAMPLER_MODULE, SAMPLER_PTX)?;
            let (adjust_offset, vocab_i) = (batch.row_words().len() as i32, vocab as i32);
            let mut b = func.builder();
            b.arg(&*packed)
                .arg(&adjust_offset)
                .arg(logits_s)
                .arg(&vocab_i)
                .arg(&mut *work)
                .arg(&mut *probs)
                .arg(&mut *out);
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // Safety: `packed` holds n rows of ROW_WORDS then the adjustments each row's
            // (start, len) names; every row's logit row is below `logit_rows` (checked above)
            // and the kernel skips adjusted tokens >= vocab; work and probs hold n x vocab
            // floats and out n x OUT_WORDS words; block size is the kernel's THREADS.
            unsafe { b.launch(cfg) }.w()?;
        }
        let out_host = ensure(&mut self.out_host, n * OUT_WORDS, |s| s.len(), pinned)?;
        {
            let dst = out_host.as_mut_slice().map_err(cuda_err)?;
            stream
                .memcpy_dtoh(&out.slice(..n * OUT_WORDS), &mut dst[..n * OUT_WORDS])
                .map_err(cuda_err)?;
        }
        self.launched_top_n.extend_from_slice(batch.top_n());
        self.launched = Some(vocab);
        Ok(())
    }

    /// Waits for the last [`GpuSampler::launch_rows`] and returns its rows' results, in order.
    pub fn collect_rows(&mut self) -> Result<Vec<SampledRow>> {
        let vocab = self
            .launched
            .take()
            .ok_or_else(|| ModelError::Cuda("no sampling launch to collect".into()))?;
        let top_n = &self.launched_top_n;
        let n = top_n.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let dev = cuda_device(&self.device)?;
        // The copy into page-locked memory is asynchronous.
        dev.cuda_stream().synchronize().map_err(cuda_err)?;
        let out_host = self
            .out_host
            .as_ref()
            .ok_or_else(|| ModelError::Cuda("sampler output buffer missing".into()))?;
        let results = out_host.as_slice().map_err(cuda_err)?;
        Ok(results[..n * OUT_WORDS]
            .chunks_exact(OUT_WORDS)
            .zip(top_n)
            .map(|(r, top_n)| {
                let token = r[0];
                let logprob = top_n.map(|k| TokenLogprob {
                    logprob: f32::from_bits(r[1]),
                    top: (0..k.min(vocab))
                        .map(|j| (r[2 + j], f32::from_bits(r[2 + MAX_TOP_LOGPROBS + j])))
                        .collect(),
                });
                (token, logprob)
            })
            .collect())
    }
}
