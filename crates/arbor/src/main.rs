//! The `arbor` command: a thin layer over `arbor-model` and `arbor-engine`.

mod model_fetch;
mod perf;

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use arbor_engine::{
    Engine, EngineConfig, Overlap, PrefixCacheMode, Request, SamplingParams, StopConditions,
};
use arbor_model::runner::{CpuKernels, CudaOptions, GgufWeights, RunnerOptions};
use arbor_model::ChatMessage;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "arbor",
    version,
    about = "An LLM inference server whose KV cache is a radix tree over token ids"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate one completion, streamed to stdout; speeds are printed to stderr.
    Generate(GenerateArgs),
    /// An interactive multi-turn chat in the terminal.
    Chat(ChatArgs),
    /// Serve the OpenAI-compatible HTTP API (chat/completions, completions, models, metrics).
    Serve(ServeArgs),
    /// Compare serving engines (Arbor, vLLM, SGLang, llama.cpp) on multi-turn and shared-context
    /// workloads through their OpenAI APIs; `arbor bench compare A.json B.json` for saved runs.
    Bench(arbor_bench::BenchArgs),
    /// Measure the engine alone: decode tok/s by batch size and prefill by length, against
    /// the memory-bandwidth roofline (e.g. with --device cuda --load-format dummy).
    EngineBench(perf::EngineBenchArgs),
    /// Compare the GPU path's logits and greedy tokens with the CPU path's, or check the GPU
    /// kernels alone (CUDA builds).
    GpuCheck(perf::GpuCheckArgs),
    /// Download the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) if it is missing.
    FetchModel,
    /// Run as a worker of an NVIDIA Dynamo deployment (KV-aware routing): starts
    /// `arbor-dynamo-worker`, built apart (bash scripts/dynamo/setup.sh), with these arguments.
    #[command(disable_help_flag = true)]
    DynamoWorker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face folder. Default: the SmolLM2-135M-Instruct Q4_1 GGUF,
    /// fetched into ./models on first use.
    #[arg(long, env = "ARBOR_MODEL")]
    model: Option<PathBuf>,
    /// A Jinja chat template file used instead of the model's own (as vLLM's flag).
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// KV pool size in token slots (default: 40% of the memory available at start, at least one
    /// full context).
    #[arg(long, env = "ARBOR_KV_SLOTS")]
    kv_slots: Option<usize>,
    /// Keep computed prefixes for reuse: a radix tree (any prefix), vLLM-style 16-token hashed
    /// blocks (whole blocks only), or off.
    #[arg(long, value_enum, default_value = "radix")]
    prefix_cache: PrefixCacheArg,
    /// Tokens per forward step: the prefill chunk budget.
    #[arg(long, default_value_t = arbor_engine::DEFAULT_MAX_BATCH_TOKENS)]
    max_batch_tokens: usize,
    /// Requests running (holding KV) at once; the rest wait in the queue (default: 64 on the
    /// CPU, 256 on a GPU, vLLM's default there).
    #[arg(long)]
    max_running: Option<usize>,
    /// Per-step time budget in milliseconds: while requests are decoding, prefill chunks are
    /// cut so that a step is predicted (from the steps so far) to take at most this long,
    /// bounding the time between tokens when long prompts arrive. Default: no time budget,
    /// `--max-batch-tokens` alone.
    #[arg(long)]
    max_step_ms: Option<f64>,
    /// Plan and launch the next step while the device runs this one, and turn this one's
    /// tokens into text while the next runs (SGLang's overlap scheduler, vLLM's async
    /// scheduling). `auto`: on the GPU, not on the CPU (where a step's launch is its whole
    /// run, so there is nothing to overlap).
    #[arg(long, value_enum, default_value = "auto")]
    overlap: OverlapArg,
    /// Where the model runs: `cpu`, or `cuda` / `cuda:N` (a build with the `cuda` feature:
    /// scripts/cuda/build.sh).
    #[arg(long, default_value = "cpu", env = "ARBOR_DEVICE")]
    pub device: String,
    /// Cut the model over this many ranks (tensor parallelism; `-tp N` works too): attention
    /// heads, MLP columns and vocabulary split between them, partial results summed after
    /// each layer's attention and MLP. It must divide the model's attention heads and MLP
    /// width, and divide its KV heads or be a multiple of them. On the CPU the ranks are
    /// threads sharing the cores (for testing: not faster than 1); on GPUs one rank per GPU
    /// from --device's on (`--device cuda -tp 2`: cuda:0 and cuda:1), summing over NCCL.
    #[arg(long, default_value_t = 1, env = "ARBOR_TENSOR_PARALLEL_SIZE")]
    tensor_parallel_size: usize,
    /// GPU, checking only: every tensor-parallel rank on --device's one GPU, summing through
    /// the host instead of NCCL (slow; for checking the cut where there is no second GPU).
    #[arg(long)]
    tp_one_gpu: bool,
    /// GPU, checking only: the tensor-parallel runner even at one rank (one NCCL rank), for
    /// A/Bs of its path against the one-GPU runner.
    #[arg(long, hide = true)]
    tp_runner: bool,
    /// `auto` reads the weights from --model; `dummy` makes random weights of the shapes in
    /// --model's config.json, on the GPU (benchmarking models that cannot be downloaded).
    #[arg(long, value_enum, default_value = "auto")]
    load_format: LoadFormat,
    /// With `--load-format dummy`: a Hugging Face folder whose tokenizer.json (and chat
    /// template) to use, so that prompts are as many tokens as on a real model. Default: a
    /// stand-in tokenizer of one token per character.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// On a GPU, how a GGUF model's weights run: `bf16` (dequantized at load, cuBLAS; the
    /// default) or `quantized` (kept in their GGUF format, candle's quantized kernels: fewer
    /// bytes per decode step). The CPU path always runs GGUF formats as they are.
    #[arg(long, value_enum)]
    gguf_weights: Option<GgufWeightsArg>,
    /// GPU, A/B benchmarks: attention on tensor cores where the head shape allows (`auto`) or
    /// always on the CUDA-core kernels (`cuda-core`).
    #[arg(long, value_enum, default_value = "auto")]
    cuda_attention: CudaAttentionArg,
    /// GPU: one-row linear layers through Arbor's GEMV kernel (`on`, the default; in decode
    /// steps launched as programmatic dependents) or cuBLAS (`off`; A/B benchmarks).
    #[arg(long, value_enum, default_value = "on")]
    cuda_gemv: OnOff,
    /// GPU: decode attention cuts each context into splits until about this many warps run
    /// (default: about one wave of resident blocks for a bf16 cache, four times that for FP8
    /// or where one split a row already exceeds a wave; docs/BENCHMARKS.md).
    #[arg(long)]
    cuda_decode_target_warps: Option<usize>,
    /// GPU: keys per shared-memory stage of the tensor-core decode attention (16, 32, 64).
    #[arg(long, default_value_t = arbor_model::runner::DEFAULT_DECODE_STAGE_KEYS)]
    cuda_decode_stage_keys: usize,
    /// GPU: time each phase of the forward pass (`engine-bench` prints the shares; it waits
    /// for the GPU after each phase, so steps get slower).
    #[arg(long)]
    cuda_profile: bool,
    /// GPU: sample on the GPU (`device`, the default) or copy the logits to the host and
    /// sample there (`host`, the path before GPU sampling; A/B benchmarks).
    #[arg(long, value_enum, default_value = "device")]
    cuda_sampling: CudaSamplingArg,
    /// GPU: replay decode steps as CUDA graphs (`on`, the default) or run the same padded
    /// steps launch by launch (`off`; A/B benchmarks, the outputs are identical).
    #[arg(long, value_enum, default_value = "on")]
    cuda_graphs: OnOff,
    /// GPU: how the KV cache stores K and V: `auto` (bf16, as the model computes them) or
    /// `fp8` (FP8 E4M3 without scales, as vLLM's `fp8`: twice the cached tokens in the same
    /// memory and half the KV bytes read per decode step, at a small cost in fidelity;
    /// docs/CORRECTNESS.md).
    #[arg(long, value_enum, default_value = "auto")]
    kv_cache_dtype: KvCacheDtypeArg,
    /// CPU: `auto` uses the fastest kernels the processor has (AVX-512 where present);
    /// `avx2` keeps to the AVX2 ones (comparisons; the outputs are bit-identical); `ggml`
    /// takes llama.cpp's block-matmul arithmetic (slower; checks against llama.cpp).
    #[arg(long, value_enum, default_value = "auto", env = "ARBOR_CPU_KERNELS")]
    cpu_kernels: CpuKernelsArg,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CpuKernelsArg {
    Auto,
    Avx2,
    Ggml,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KvCacheDtypeArg {
    Auto,
    #[value(alias = "fp8_e4m3", alias = "fp8-e4m3")]
    Fp8,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CudaSamplingArg {
    Device,
    Host,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CudaAttentionArg {
    Auto,
    CudaCore,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum GgufWeightsArg {
    Bf16,
    Quantized,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LoadFormat {
    Auto,
    Dummy,
}

/// `cpu`, `cuda` or `cuda:N`, with the flag's name in the error.
fn parse_device(s: &str) -> Result<arbor_model::DeviceSpec> {
    s.parse().map_err(|e| anyhow::anyhow!("--device: {e}"))
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OverlapArg {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PrefixCacheArg {
    Radix,
    Blocks,
    Off,
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text is generated (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past the model's end-of-turn tokens.
    #[arg(long)]
    ignore_eos: bool,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            logit_bias: Default::default(),
        }
    }
    fn stop(&self) -> StopConditions {
        StopConditions {
            max_tokens: self.max_tokens,
            stop_strings: self.stop.clone().into(),
            ignore_eos: self.ignore_eos,
            ..Default::default()
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The user's message (rendered with the model's chat template unless --raw).
    #[arg(long, short, conflicts_with = "messages")]
    prompt: Option<String>,
    /// Read the user's message (or, with --raw, the whole prompt) from a file.
    #[arg(long, conflicts_with_all = ["prompt", "messages"])]
    prompt_file: Option<PathBuf>,
    /// A JSON list of {"role", "content"} messages.
    #[arg(long)]
    messages: Option<String>,
    /// A system message to put before --prompt.
    #[arg(long)]
    system: Option<String>,
    /// Send the prompt to the model as it is, without the chat template.
    #[arg(long)]
    raw: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// A system message that opens the conversation.
    #[arg(long)]
    system: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (the address is printed at start).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The model id clients send and /v1/models lists (default: the model file's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Require this API key (repeatable, or comma-separated in ARBOR_API_KEYS). Each key gets
    /// its own prefix-cache namespace: tenants never share (or time) each other's cache.
    #[arg(long = "api-key", env = "ARBOR_API_KEYS", value_delimiter = ',')]
    api_keys: Vec<String>,
    /// Requests waiting for admission beyond which new ones get 503 (retry later).
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, default_value_t = 16 << 20)]
    max_request_bytes: usize,
    /// Seconds requests in flight get to finish on SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30.0)]
    shutdown_timeout: f64,
    /// Sequences (prompts x n) one call may create; beyond, 400.
    #[arg(long = "max-seqs-per-request", default_value_t = arbor_server::DEFAULT_MAX_SEQUENCES_PER_REQUEST)]
    max_seqs_per_request: usize,
    /// Prompt tokens one call may send, all its prompts together (default and ceiling: the
    /// KV pool's size).
    #[arg(long)]
    max_prompt_tokens_per_request: Option<usize>,
    /// With --api-key, serve /metrics without a key (for a scraper on a trusted network).
    #[arg(long)]
    metrics_public: bool,
    /// Split chat replies into `reasoning_content` (the model's `<think>` block) and `content`:
    /// `deepseek-r1` (replies start inside reasoning), `qwen3` (reasoning when the reply or the
    /// prompt opens a think block), `none`, or `auto` (qwen3's rules for chat templates that
    /// mention `</think>`, none otherwise).
    #[arg(long, default_value = "auto")]
    reasoning_parser: arbor_server::reasoning::ReasoningParser,
    /// How tool calls are read from chat replies: `hermes` (`<tool_call>` tags: Hermes, Qwen
    /// 2.5/3), `llama3_json` (Llama 3.x's JSON), `mistral` (`[TOOL_CALLS]`), `none`, or `auto`
    /// (the format the chat template writes calls in).
    #[arg(long, default_value = "auto")]
    tool_call_parser: arbor_server::tools::ToolCallParser,
    /// Do not compute a conversation's next turn ahead. By default, after a chat reply ends,
    /// the history as the chat template will render it in the next request (which often
    /// differs from what was cached: reasoning dropped from past answers) is computed into
    /// the cache while the engine has nothing else to do, so that the next turn computes only
    /// its new message.
    #[arg(long)]
    no_history_warmup: bool,
    /// Publish prefix-cache changes as vLLM-format KV events on a ZeroMQ PUB socket bound here
    /// (e.g. tcp://*:5557), for KV-aware routers such as NVIDIA Dynamo's. The stream carries
    /// every cached prompt's token ids: bind it where only the router can reach it.
    #[arg(long)]
    kv_events_endpoint: Option<String>,
    /// A ZeroMQ ROUTER socket bound here serves replays of missed KV event batches (vLLM's
    /// replay protocol).
    #[arg(long, requires = "kv_events_endpoint")]
    kv_events_replay_endpoint: Option<String>,
    /// The topic frame of every KV event message.
    #[arg(long, default_value = "", requires = "kv_events_endpoint")]
    kv_events_topic: String,
    /// Tokens per page (vLLM's block size) in KV events; the radix cache is cut into pages of
    /// this size for routers.
    #[arg(long, default_value_t = arbor_server::kv_events::DEFAULT_PAGE_SIZE, requires = "kv_events_endpoint")]
    kv_events_page_size: usize,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ARBOR_LOG")
                .unwrap_or_else(|_| "warn,arbor_engine=info,arbor_model=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `dynamo-worker` hands its arguments on untouched.
    if args.get(1).is_none_or(|a| a != "dynamo-worker") {
        args = args.into_iter().map(vllm_style_short_flags).collect();
    }
    let cli = Cli::parse_from(args);
    let result = match cli.command {
        Command::Generate(a) => generate(a),
        Command::Chat(a) => chat(a),
        Command::Serve(a) => serve(a),
        Command::Bench(a) => bench(a),
        Command::EngineBench(a) => perf::engine_bench(a),
        Command::GpuCheck(a) => perf::gpu_check(a),
        Command::FetchModel => {
            model_fetch::default_model_path(true).map(|p| println!("{}", p.display()))
        }
        Command::DynamoWorker { args } => dynamo_worker(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// vLLM's and SGLang's two-letter short flag `-tp N` (`-tp=N`), which clap's one-letter
/// short flags cannot spell: read as `--tensor-parallel-size`.
fn vllm_style_short_flags(arg: std::ffi::OsString) -> std::ffi::OsString {
    match arg.to_str() {
        Some("-tp") => "--tensor-parallel-size".into(),
        Some(a) if a.starts_with("-tp=") => format!("--tensor-parallel-size={}", &a[4..]).into(),
        _ => arg,
    }
}

/// Replaces this process with `arbor-dynamo-worker`. The worker is its own build (Dynamo's
/// crates are hundreds, kept out of this binary and of CI), looked for in
/// `$ARBOR_DYNAMO_WORKER`, next to this binary, in the repository's build of it, then on PATH.
fn dynamo_worker(args: Vec<std::ffi::OsString>) -> Result<()> {
    use std::os::unix::process::CommandExt;
    const NAME: &str = "arbor-dynamo-worker";
    let found =
        match std::env::var_os("ARBOR_DYNAMO_WORKER") {
            // Set explicitly: that one or none.
            Some(path) => PathBuf::from(path),
            None => {
                let beside = std::env::current_exe()
                    .ok()
                    .and_then(|e| e.parent().map(|d| d.join(NAME)));
                beside
                    .into_iter()
                    .chain(["release", "debug"].map(|p| {
                        PathBuf::from(format!("integrations/arbor-dynamo/target/{p}/{NAME}"))
                    }))
                    .find(|p| p.is_file())
                    .unwrap_or_else(|| PathBuf::from(NAME))
            }
        };
    let err = std::process::Command::new(&found).args(args).exec();
    anyhow::bail!(
        "cannot start {} ({err}); build it with: bash scripts/dynamo/setup.sh",
        found.display()
    )
}

fn model_path(args: &ModelArgs) -> Result<PathBuf> {
    match &args.model {
        Some(p) => Ok(p.clone()),
        None => model_fetch::default_model_path(true),
    }
}

/// Default `--max-running`: a CPU step over 64 sequences already takes long enough; a GPU
/// decode step costs about the same for 1 or 256 (memory-bound), so it takes many more.
const DEFAULT_MAX_RUNNING_CPU: usize = 64;
const DEFAULT_MAX_RUNNING_GPU: usize = 256;

/// The engine's settings from the flags (the KV pool's size is the runner's).
fn engine_config(args: &ModelArgs) -> Result<EngineConfig> {
    let config = EngineConfig {
        max_batch_tokens: args.max_batch_tokens,
        max_running: args.max_running.unwrap_or(if args.device == "cpu" {
            DEFAULT_MAX_RUNNING_CPU
        } else {
            DEFAULT_MAX_RUNNING_GPU
        }),
        max_step_time: match args.max_step_ms {
            Some(ms) if !(ms.is_finite() && ms > 0.0) => {
                anyhow::bail!("--max-step-ms must be a positive number of milliseconds, got {ms}")
            }
            ms => ms.map(|ms| std::time::Duration::from_secs_f64(ms / 1e3)),
        },
        prefix_cache: match args.prefix_cache {
            PrefixCacheArg::Radix => PrefixCacheMode::Radix,
            PrefixCacheArg::Blocks => PrefixCacheMode::Blocks,
            PrefixCacheArg::Off => PrefixCacheMode::Off,
        },
        overlap: match args.overlap {
            OverlapArg::Auto => Overlap::Auto,
            OverlapArg::On => Overlap::On,
            OverlapArg::Off => Overlap::Off,
        },
        ..Default::default()
    };
    // The engine names the setting; say which flag it is.
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("{e} (--max-batch-tokens, --max-running)"))?;
    Ok(config)
}

/// The runner's options from the flags.
fn runner_options(args: &ModelArgs) -> RunnerOptions {
    RunnerOptions {
        kv_slots: args.kv_slots,
        load_format: match args.load_format {
            LoadFormat::Auto => arbor_model::runner::LoadFormat::Auto,
            LoadFormat::Dummy => arbor_model::runner::LoadFormat::Dummy,
        },
        gguf_weights: args.gguf_weights.map(|w| match w {
            GgufWeightsArg::Bf16 => GgufWeights::Bf16,
            GgufWeightsArg::Quantized => GgufWeights::Quantized,
        }),
        tokenizer: args.tokenizer.clone(),
        cuda: CudaOptions {
            force_cuda_core_attention: args.cuda_attention == CudaAttentionArg::CudaCore,
            gemv_for_one_row: args.cuda_gemv == OnOff::On,
            decode_target_warps: args.cuda_decode_target_warps,
            decode_stage_keys: args.cuda_decode_stage_keys,
            profile: args.cuda_profile,
            host_sampling: args.cuda_sampling == CudaSamplingArg::Host,
            decode_graphs: args.cuda_graphs == OnOff::On,
            tp_one_gpu: args.tp_one_gpu,
            tp_runner: args.tp_runner,
            kv_cache_dtype: match args.kv_cache_dtype {
                KvCacheDtypeArg::Auto => arbor_model::runner::KvCacheDtype::Bf16,
                KvCacheDtypeArg::Fp8 => arbor_model::runner::KvCacheDtype::Fp8E4m3,
            },
        },
        cpu_kernels: match args.cpu_kernels {
            CpuKernelsArg::Auto => CpuKernels::Auto,
            CpuKernelsArg::Avx2 => CpuKernels::Avx2,
            CpuKernelsArg::Ggml => CpuKernels::Ggml,
        },
        tensor_parallel_size: args.tensor_parallel_size,
        ..Default::default()
    }
}

/// Loads the model (fetching the default one if none is given) onto the chosen device, into
/// an engine.
fn load(args: &ModelArgs) -> Result<(Engine, arbor_model::ChatTemplate)> {
    let device = parse_device(&args.device)?;
    let config = engine_config(args)?;
    let path = model_path(args)?;
    let opened = arbor_model::open(&path, device, &runner_options(args)).map_err(|e| match e {
        // Option errors name the options; the user typed them as flags.
        arbor_model::ModelError::InvalidOption(why) => anyhow::anyhow!(
            "{}",
            [
                ("kv_slots", "--kv-slots"),
                ("load_format", "--load-format"),
                ("gguf_weights", "--gguf-weights"),
                ("tokenizer ", "--tokenizer "),
                ("device ", "--device "),
                ("cuda_attention", "--cuda-attention"),
                ("cuda_gemv", "--cuda-gemv"),
                ("cuda_decode_target_warps", "--cuda-decode-target-warps"),
                ("cuda_decode_stage_keys", "--cuda-decode-stage-keys"),
                ("cuda_profile", "--cuda-profile"),
                ("cuda_sampling", "--cuda-sampling"),
                ("decode_graphs", "--cuda-graphs"),
                ("tensor_parallel_size", "--tensor-parallel-size"),
                ("tp_one_gpu", "--tp-one-gpu"),
                ("tp_runner", "--tp-runner"),
                ("kv_cache_dtype", "--kv-cache-dtype"),
            ]
            .iter()
            .fold(why, |why, (option, flag)| why.replace(option, flag))
        ),
        e => anyhow::Error::new(e).context(format!("loading {}", path.display())),
    })?;
    let engine = Engine::new(opened.runner, opened.tokenizer, config)?;
    let template = match &args.chat_template {
        Some(file) => {
            let source = std::fs::read_to_string(file)
                .with_context(|| format!("reading --chat-template {}", file.display()))?;
            opened
                .chat_template
                .replaced_by(&source)
                .with_context(|| format!("--chat-template {}", file.display()))?
        }
        None => opened.chat_template,
    };
    Ok((engine, template))
}

fn generate(mut a: GenerateArgs) -> Result<()> {
    if let Some(path) = &a.prompt_file {
        a.prompt = Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        );
    }
    if a.raw && a.prompt.is_none() {
        bail!("--raw needs --prompt or --prompt-file");
    }
    let (mut engine, template) = load(&a.model)?;
    let prompt_ids = if a.raw {
        let text = a.prompt.as_deref().unwrap_or_default();
        engine.tokenizer().encode(text, true)?
    } else {
        let messages: Vec<ChatMessage> = match (&a.prompt, &a.messages) {
            (Some(p), _) => a
                .system
                .iter()
                .map(|s| ChatMessage::new("system", s))
                .chain(std::iter::once(ChatMessage::new("user", p)))
                .collect(),
            (None, Some(m)) => serde_json::from_str(m)
                .context("--messages must be a JSON list of {\"role\", \"content\"}")?,
            (None, None) => bail!("give --prompt or --messages"),
        };
        let text = template.render(&messages, true)?;
        engine.tokenizer().encode(&text, true)?
    };
    let req = Request {
        logprobs: None,
        namespace: 0,
        prompt: prompt_ids,
        sampling: a.sampling.params(),
        stop: a.sampling.stop(),
        constraint: None,
    };
    let mut out = std::io::stdout();
    let done = engine.generate(req, |t| {
        let _ = out.write_all(t.as_bytes());
        let _ = out.flush();
    })?;
    println!();
    report_speed(&done);
    Ok(())
}

fn report_speed(done: &arbor_engine::Completion) {
    eprintln!(
        "prompt: {} tokens ({} cached) in {:.3}s ({:.1} tok/s); generated: {} tokens, decode {:.1} tok/s; finish: {}",
        done.usage.prompt_tokens,
        done.usage.cached_tokens,
        done.timing.time_to_first_token(),
        done.prefill_tokens_per_s(),
        done.usage.completion_tokens,
        done.decode_tokens_per_s(),
        done.reason.as_str(),
    );
}

fn chat(a: ChatArgs) -> Result<()> {
    let (mut engine, template) = load(&a.model)?;
    let mut messages: Vec<ChatMessage> = a
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s))
        .collect();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!(
        "arbor chat: type a message and press Enter; /reset starts over, /exit (or Ctrl-D) quits."
    );
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.retain(|m| m.role == "system");
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::new("user", line));
        let text = template.render(&messages, true)?;
        let prompt = engine.tokenizer().encode(&text, true)?;
        let req = Request {
            logprobs: None,
            namespace: 0,
            prompt,
            sampling: a.sampling.params(),
            stop: a.sampling.stop(),
            constraint: None,
        };
        match engine.generate(req, |t| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        }) {
            Ok(done) => {
                println!();
                messages.push(ChatMessage::new("assistant", done.text.clone()));
                report_speed(&done);
            }
            Err(e) => {
                // The turn failed (e.g. the conversation outgrew the context): say so, keep going.
                messages.pop();
                eprintln!("error: {e:#}");
            }
        }
    }
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    // Flags first: a misconfigured server should fail before it loads a model.
    let api_keys = arbor_server::parse_api_keys(&a.api_keys).map_err(anyhow::Error::msg)?;
    if a.max_seqs_per_request == 0 {
        bail!("--max-seqs-per-request must be at least 1");
    }
    if a.max_prompt_tokens_per_request == Some(0) {
        bail!("--max-prompt-tokens-per-request must be at least 1");
    }
    if a.kv_events_page_size == 0 {
        bail!("--kv-events-page-size must be at least 1");
    }
    let path = model_path(&a.model)?;
    let name = match &a.served_model_name {
        Some(n) => n.clone(),
        // "SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct.Q4_1"; a folder keeps its name.
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
    };
    if !(a.shutdown_timeout.is_finite() && a.shutdown_timeout >= 0.0) {
        bail!("--shutdown-timeout must be a number of seconds >= 0");
    }
    let (engine, template) = load(&a.model)?;
    let mut config = arbor_server::ServerConfig::new(name.clone());
    config.api_keys = api_keys;
    config.max_sequences_per_request = a.max_seqs_per_request;
    config.max_prompt_tokens_per_request = a.max_prompt_tokens_per_request;
    config.metrics_public = a.metrics_public;
    config.reasoning_parser = a.reasoning_parser;
    config.tool_call_parser = a.tool_call_parser;
    config.history_warmup = !a.no_history_warmup;
    config.max_queue = a.max_queue;
    config.max_body_bytes = a.max_request_bytes;
    config.shutdown_timeout = std::time::Duration::from_secs_f64(a.shutdown_timeout);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("arbor-http")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("binding {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        if let Some(w) = arbor_server::exposure_warning(addr, !config.api_keys.is_empty()) {
            tracing::warn!("{w}");
            eprintln!("arbor: WARNING: {w}");
        }
        let state = match &a.kv_events_endpoint {
            None => arbor_server::AppState::new(engine, template, &config),
            Some(endpoint) => {
                let mut kv = arbor_server::kv_events::KvEventsConfig::new(endpoint);
                kv.replay_endpoint = a.kv_events_replay_endpoint.clone();
                kv.topic = a.kv_events_topic.clone();
                kv.page_size = a.kv_events_page_size;
                let publisher = arbor_server::kv_events::KvEventPublisher::start(&kv)
                    .map_err(anyhow::Error::msg)?;
                eprintln!(
                    "arbor: KV events on {}{} ({}-token pages)",
                    publisher.endpoint,
                    publisher
                        .replay_endpoint
                        .as_ref()
                        .map(|r| format!(", replay on {r}"))
                        .unwrap_or_default(),
                    kv.page_size
                );
                arbor_server::AppState::with_kv_events(engine, template, &config, publisher)
                    .map_err(|e| anyhow::anyhow!("--kv-events-endpoint: {e}"))?
            }
        };
        eprintln!(
            "arbor: serving `{name}` on http://{addr}/v1 ({}); Ctrl-C stops",
            if config.api_keys.is_empty() {
                "no API key".to_string()
            } else {
                format!(
                    "{} API keys, one cache namespace each",
                    config.api_keys.len()
                )
            }
        );
        arbor_server::serve(listener, state, arbor_server::shutdown_signal())
            .await
            .context("serving")?;
        eprintln!("arbor: stopped");
        anyhow::Ok(())
    })
}

fn bench(a: arbor_bench::BenchArgs) -> Result<()> {
    let exe = std::env::current_exe().context("finding the arbor binary for --spawn")?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(arbor_bench::cli::run(a, exe))
}
