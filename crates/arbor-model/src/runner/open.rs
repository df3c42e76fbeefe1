//! [`open`]: a model file onto a device, as a runner with its text side. The one place that
//! knows which backends this build has.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use super::cpu::CpuBackend;
use super::host::{HostSampledRunner, LogitsBackend, DEFAULT_PARALLEL_SAMPLING_MIN_LOGITS};
use super::tp::TensorParallel;
use super::ModelRunner;
use crate::error::{ModelError, Result};
pub use crate::options::{
    CpuKernels, CudaOptions, GgufWeights, KvCacheDtype, DEFAULT_DECODE_STAGE_KEYS,
};
use crate::text::chat::ChatTemplate;
use crate::text::tokenizer::Tokenizer;

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (builds with the `cuda` feature).
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(format!("a device is cpu, cuda or cuda:N, not {s:?}")),
            },
        }
    }
}

/// How the weights are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadFormat {
    /// Read from the model path (GGUF file or Hugging Face folder).
    #[default]
    Auto,
    /// Random weights of the shapes the path's `config.json` describes (GPU benchmarks of
    /// models that are not here).
    Dummy,
}

/// What [`open`] may be told; `Default` is a real model with the backend's defaults.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// KV pool size in token slots (default: the backend's memory budget, at least one
    /// context).
    pub kv_slots: Option<usize>,
    pub load_format: LoadFormat,
    /// GPU only: GGUF weights dequantized to bf16 (default) or kept quantized.
    pub gguf_weights: Option<GgufWeights>,
    /// With [`LoadFormat::Dummy`]: a tokenizer folder (default: one token per character).
    pub tokenizer: Option<PathBuf>,
    /// Seed of dummy weights.
    pub seed: u64,
    /// Steps with at least this many logits sample on several threads.
    pub parallel_sampling_min_logits: usize,
    /// GPU only: the CUDA backend's knobs.
    pub cuda: CudaOptions,
    /// CPU: the fastest kernels the processor has, or the AVX2 ones (a process-wide choice).
    pub cpu_kernels: CpuKernels,
    /// Ranks the model is cut into (tensor parallelism); 1 runs it whole.
    pub tensor_parallel_size: usize,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        Self {
            kv_slots: None,
            load_format: LoadFormat::Auto,
            gguf_weights: None,
            tokenizer: None,
            seed: 0,
            parallel_sampling_min_logits: DEFAULT_PARALLEL_SAMPLING_MIN_LOGITS,
            cuda: CudaOptions::default(),
            cpu_kernels: CpuKernels::Auto,
            tensor_parallel_size: 1,
        }
    }
}

/// A runner ready for an engine, with the text side of its model.
pub struct OpenedModel {
    pub runner: Box<dyn ModelRunner>,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
}

impl std::fmt::Debug for OpenedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedModel")
            .field("device", &self.runner.device_name())
            .field("kv_slots", &self.runner.kv_slots())
            .finish_non_exhaustive()
    }
}

/// An option that cannot apply; the message starts with the option's name and names other
/// options and values as `name value` (the command line turns them into its flags).
fn invalid(message: impl Into<String>) -> ModelError {
    ModelError::InvalidOption(message.into())
}

/// Loads `path` (a GGUF file, a Hugging Face folder, or with [`LoadFormat::Dummy`] a
/// `config.json`) onto `device` and makes its runner. Options that do not apply to the device
/// are errors naming the option, not silently ignored.
pub fn open(path: &Path, device: DeviceSpec, options: &RunnerOptions) -> Result<OpenedModel> {
    if options.kv_slots == Some(0) {
        return Err(invalid("kv_slots must be at least 1"));
    }
    if options.cuda.decode_target_warps == Some(0) {
        return Err(invalid("cuda_decode_target_warps must be at least 1"));
    }
    if ![16, 32, 64].contains(&options.cuda.decode_stage_keys) {
        return Err(invalid("cuda_decode_stage_keys must be 16, 32 or 64"));
    }
    if options.tensor_parallel_size == 0 {
        return Err(invalid("tensor_parallel_size must be at least 1"));
    }
    if options.tokenizer.is_some() && options.load_format != LoadFormat::Dummy {
        return Err(invalid(
            "tokenizer goes with load_format dummy (a real model brings its own)",
        ));
    }
    match device {
        DeviceSpec::Cpu => {
            if options.load_format == LoadFormat::Dummy {
                return Err(invalid("load_format dummy needs device cuda"));
            }
            if options.cuda.kv_cache_dtype != KvCacheDtype::Bf16 {
                return Err(invalid(
                    "kv_cache_dtype fp8 needs device cuda (the CPU's KV cache is f16)",
                ));
            }
            if options.cuda != CudaOptions::default() {
                return Err(invalid(
                    "cuda_attention, cuda_gemv, cuda_decode_target_warps, cuda_decode_stage_keys, cuda_profile, cuda_sampling, decode_graphs, tp_one_gpu and tp_runner need device cuda",
                ));
            }
            if options.gguf_weights.is_some() {
                return Err(invalid(
                    "gguf_weights is for device cuda (the CPU runs GGUF formats as they are)",
                ));
            }
            crate::cpu::kernels::select(options.cpu_kernels);
            tracing::info!("CPU kernels: {}", crate::cpu::kernels::describe());
            if options.tensor_parallel_size > 1 {
                let (shards, tokenizer, chat_template) = crate::cpu::load::load_shards(
                    path,
                    &crate::Device::Cpu,
                    options.tensor_parallel_size,
                )?;
                let backend = TensorParallel::cpu(shards, options.kv_slots)?;
                return Ok(OpenedModel {
                    runner: host_sampled(backend, options),
                    tokenizer,
                    chat_template,
                });
            }
            let loaded = crate::cpu::load::load_model(path, &crate::Device::Cpu)?;
            let backend = CpuBackend::new(Arc::new(loaded.model), options.kv_slots);
            Ok(OpenedModel {
                runner: host_sampled(backend, options),
                tokenizer: loaded.tokenizer,
                chat_template: loaded.chat_template,
            })
        }
        DeviceSpec::Cuda(ordinal) => open_cuda(path, ordinal, options),
    }
}

/// A backend behind the host sampler, with the options' sampling settings.
fn host_sampled<B: LogitsBackend + 'static>(
    backend: B,
    options: &RunnerOptions,
) -> Box<dyn ModelRunner> {
    Box::new(
        HostSampledRunner::new(backend)
            .with_parallel_sampling_min_logits(options.parallel_sampling_min_logits),
    )
}

#[cfg(feature = "cuda")]
fn open_cuda(path: &Path, ordinal: usize, options: &RunnerOptions) -> Result<OpenedModel> {
    use super::cuda::{CudaBackend, CudaRunner};
    if options.tensor_parallel_size > 1 || options.cuda.tp_runner {
        return open_cuda_tp(path, ordinal, options);
    }
    if options.cuda.tp_one_gpu {
        return Err(invalid("tp_one_gpu goes with tensor_parallel_size above 1"));
    }
    let device = crate::cuda::device(ordinal)?;
    let started = std::time::Instant::now();
    let loaded = match options.load_format {
        LoadFormat::Auto => crate::cuda::load(
            path,
            &device,
            options.gguf_weights.unwrap_or_default(),
            options.cuda.clone(),
        )?,
        LoadFormat::Dummy => crate::cuda::load_dummy(
            path,
            options.tokenizer.as_deref(),
            &device,
            options.seed,
            options.cuda.clone(),
        )?,
    };
    tracing::info!(
        "loaded {} onto cuda:{ordinal} in {:.1}s",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    let backend = CudaBackend::new(Arc::new(loaded.model), options.kv_slots)?;
    let runner = if options.cuda.host_sampling {
        host_sampled(backend, options)
    } else {
        Box::new(CudaRunner::new(backend)?)
    };
    Ok(OpenedModel {
        runner,
        tokenizer: loaded.tokenizer,
        chat_template: loaded.chat_template,
    })
}

/// Tensor parallelism on GPUs: ranks on GPUs `ordinal`, `ordinal + 1`, ... summing over
/// NCCL, or all on GPU `ordinal` summing through the host (`tp_one_gpu`).
#[cfg(feature = "cuda")]
fn open_cuda_tp(path: &Path, ordinal: usize, options: &RunnerOptions) -> Result<OpenedModel> {
    use crate::cuda::{DeviceAllReduce, NcclGroup, StagedAllReduce};
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    let size = options.tensor_parallel_size;
    let ordinals: Vec<usize> = if options.cuda.tp_one_gpu {
        vec![ordinal; size]
    } else {
        (ordinal..ordinal + size).collect()
    };
    let count = CudaContext::device_count()
        .map_err(|e| ModelError::Cuda(format!("counting GPUs: {e}")))? as usize;
    if let Some(&last) = ordinals.iter().max() {
        if last >= count {
            return Err(invalid(format!(
                "tensor_parallel_size {size} needs GPUs cuda:{ordinal} to cuda:{last}, and this \
                 machine has {count} (cuda:0 to cuda:{}); tp_one_gpu puts every rank on one GPU \
                 to check the cut",
                count.saturating_sub(1)
            )));
        }
    }
    // The group first: a missing NCCL fails before minutes of loading.
    let group: Arc<dyn DeviceAllReduce> = if options.cuda.tp_one_gpu {
        Arc::new(StagedAllReduce::new(size))
    } else {
        NcclGroup::new(&ordinals)?
    };
    let devices = ordinals
        .iter()
        .map(|&o| crate::cuda::device_with_stream(o))
        .collect::<Result<Vec<_>>>()?;
    let free_before: Vec<Option<usize>> = devices.iter().map(crate::cuda::free_memory).collect();
    let started = std::time::Instant::now();
    // Out of memory while loading: say which GPU, what it had free, and what to change.
    let explain = |e: ModelError| {
        let text = e.to_string();
        if !text.contains("OUT_OF_MEMORY") {
            return e;
        }
        // The driver's reason alone: candle's error text carries a backtrace after it.
        let why = text.lines().next().unwrap_or_default();
        let free: Vec<String> = ordinals
            .iter()
            .zip(&free_before)
            .map(|(o, f)| match f {
                Some(b) => format!("cuda:{o} {:.1} GiB", *b as f64 / (1u64 << 30) as f64),
                None => format!("cuda:{o} unknown"),
            })
            .collect();
        ModelError::Cuda(format!(
            "out of GPU memory loading {size} tensor-parallel shards (free before loading: \
                 {}); another process may hold the GPU, or the model needs a larger \
                 tensor_parallel_size ({why})",
            free.join(", ")
        ))
    };
    let loaded = match options.load_format {
        LoadFormat::Auto => crate::cuda::load_shards(
            path,
            &devices,
            options.gguf_weights.unwrap_or_default(),
            options.cuda.clone(),
        ),
        LoadFormat::Dummy => crate::cuda::load_dummy_shards(
            path,
            options.tokenizer.as_deref(),
            &devices,
            options.seed,
            options.cuda.clone(),
        ),
    }
    .map_err(explain)?;
    tracing::info!(
        "loaded {} onto GPUs {ordinals:?} as {size} tensor-parallel shards in {:.1}s",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    let backend = TensorParallel::cuda(loaded.shards, group, options.kv_slots)?;
    let runner = if options.cuda.host_sampling {
        host_sampled(backend, options)
    } else {
        Box::new(super::cuda_tp::CudaTensorParallelRunner::new(backend))
    };
    Ok(OpenedModel {
        runner,
        tokenizer: loaded.tokenizer,
        chat_template: loaded.chat_template,
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_: &Path, _: usize, _: &RunnerOptions) -> Result<OpenedModel> {
    Err(ModelError::Cuda(
        "this build has no CUDA backend; build it with scripts/cuda/build.sh".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_bad_ones_say_what_is_accepted() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", ""] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains("cpu, cuda or cuda:N"), "{e}");
        }
    }

    #[test]
    fn options_that_do_not_apply_are_refused_by_name() {
        let path = Path::new("no-such-model.gguf");
        let cases = [
            (
                RunnerOptions {
                    kv_slots: Some(0),
                    ..Default::default()
                },
                "kv_slots",
            ),
            (
                RunnerOptions {
                    load_format: LoadFormat::Dummy,
                    ..Default::default()
                },
                "load_format",
            ),
            (
                RunnerOptions {
                    gguf_weights: Some(GgufWeights::Quantized),
                    ..Default::default()
                },
                "gguf_weights",
            ),
            (
                RunnerOptions {
                    tokenizer: Some("tok".into()),
                    ..Default::default()
                },
                "tokenizer",
            ),
            (
                RunnerOptions {
                    cuda: CudaOptions {
                        profile: true,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "cuda_profile",
            ),
            (
                RunnerOptions {
                    cuda: CudaOptions {
                        host_sampling: true,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "cuda_sampling",
            ),
            (
                RunnerOptions {
                    cuda: CudaOptions {
                        decode_target_warps: Some(0),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "cuda_decode_target_warps",
            ),
            (
                RunnerOptions {
                    cuda: CudaOptions {
                        decode_stage_keys: 48,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "cuda_decode_stage_keys",
            ),
            (
                RunnerOptions {
                    cuda: CudaOptions {
                        decode_graphs: false,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "decode_graphs",
            ),
            (
                RunnerOptions {
                    tensor_parallel_size: 0,
                    ..Default::default()
                },
                "tensor_parallel_size",
            ),
            (
                RunnerOptions {
                    tensor_parallel_size: 2,
                    cuda: CudaOptions {
                        tp_one_gpu: true,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "tp_one_gpu",
            ),
            (
                RunnerOptions {
                    cuda: CudaOptions {
                        kv_cache_dtype: KvCacheDtype::Fp8E4m3,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "kv_cache_dtype fp8 needs device cuda",
            ),
        ];
        for (options, name) in cases {
            let e = open(path, DeviceSpec::Cpu, &options)
                .unwrap_err()
                .to_string();
            assert!(e.contains(name), "{e}");
        }
        // Valid options reach the loader, which names the missing file.
        let e = open(path, DeviceSpec::Cpu, &RunnerOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no-such-model.gguf"), "{e}");
    }
}
