//! Arbor as a worker of an NVIDIA Dynamo deployment (the `arbor-dynamo-worker` binary).
//!
//! Dynamo's frontend takes the OpenAI requests, applies the chat template, tokenizes, and its
//! KV-aware router picks the worker whose cache holds the longest part of the prompt. This
//! binary is that worker: Arbor's engine (the same one `arbor serve` runs) behind Dynamo's
//! Rust backend interface (`dynamo-backend-common`'s `LLMEngine`, pinned to 1.6.1):
//!
//! - `generate` takes a pre-tokenized request and streams token ids back, the final chunk with
//!   the finish reason and usage (`cached_tokens` included); a cancelled request leaves the
//!   engine at once (its KV back to the pool) and ends with `Cancelled`;
//! - the prefix cache's changes go to the router as vLLM-format KV events over ZeroMQ (Arbor's
//!   own publisher, `--kv-events-endpoint`), which Dynamo subscribes to
//!   (`kv_event_sources`), pages of `--kv-block-size` tokens;
//! - the KV blocks in use are reported as the router's load signal;
//! - Dynamo's cache namespace (a request's `cache_salt`, or the frontend's `x-tenant-id`
//!   header) becomes Arbor's cache namespace, and the KV events name it back the way the
//!   router salts its block hashes ([`CacheNamespaces`]).
//!
//! Everything else (discovery, the request plane, shutdown, health) is Dynamo's `Worker`.
//! It lives outside Arbor's main workspace: Dynamo's crates pin tokio and bring some nine
//! hundred dependencies, which the default build and CI do without.

pub mod card;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbor_engine::{Engine, EngineConfig as ArborEngineConfig, Event, FinishReason, Request};
use arbor_model::{DeviceSpec, RunnerOptions, SamplingParams};
use arbor_server::kv_events::{namespace_key, KvEventPublisher, KvEventsConfig, NamespaceKeys};
use arbor_server::worker::{SubmitError, Tagged};
use arbor_server::{EngineHandle, Metrics};
use async_trait::async_trait;
use clap::Parser;
use dynamo_backend_common::engine::{
    chunk, ComponentSnapshot, GenerateContext, KvEventSource, LLMEngineOutputExt, LlmRegistration,
    MetricsBindings, MetricsCtx, PromptTokensDetails,
};
use dynamo_backend_common::{
    BackendError, CommonArgs, DynamoError, EngineConfig, ErrorType, LLMEngine, LLMEngineOutput,
    PreprocessedRequest, WorkerConfig,
};
use dynamo_kv_router::zmq_wire::DYNAMO_CACHE_SALT_PREFIX;
use futures::stream::BoxStream;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "arbor-dynamo-worker",
    about = "Arbor as an NVIDIA Dynamo worker",
    long_about = "Arbor as a worker of an NVIDIA Dynamo deployment: registers with its discovery (etcd), serves pre-tokenized requests from its frontend, and publishes KV events to its KV-aware router."
)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    /// A GGUF file or a Hugging Face folder (Dynamo's frontend reads its tokenizer and chat
    /// template from the same path).
    #[arg(long, env = "ARBOR_MODEL")]
    pub model: PathBuf,
    /// Name clients use (default: the model path).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Ranks the model is cut into, as `arbor serve --tensor-parallel-size` (`-tp N` works
    /// too): on GPUs one per GPU from --device's on, summing over NCCL.
    #[arg(long, default_value_t = 1, env = "ARBOR_TENSOR_PARALLEL_SIZE")]
    pub tensor_parallel_size: usize,
    /// KV pool size in token slots (default: as `arbor serve`).
    #[arg(long)]
    pub kv_slots: Option<usize>,
    #[arg(long, default_value_t = arbor_engine::DEFAULT_MAX_BATCH_TOKENS)]
    pub max_batch_tokens: usize,
    #[arg(long, default_value_t = 256)]
    pub max_running: usize,
    /// Requests waiting for admission beyond which new ones are refused.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Where Arbor's KV events are published for Dynamo to subscribe (a ZeroMQ PUB socket;
    /// port 0 picks a free one).
    #[arg(long, default_value = "tcp://127.0.0.1:0")]
    pub kv_events_endpoint: String,
    /// Tokens per KV block as the router sees them (the pages of Arbor's radix tree).
    #[arg(long, default_value_t = 16)]
    pub kv_block_size: usize,
    /// Where a GGUF model's tokenizer, template and configuration are written as the Hugging
    /// Face folder Dynamo's frontend reads (default: one folder per model file in the
    /// temporary directory, shared by the workers of that file: Dynamo serves a model only
    /// from workers whose cards match, paths included).
    #[arg(long)]
    pub model_card_dir: Option<PathBuf>,
}

/// Most distinct cache namespaces whose names the KV events carry. Past it, further
/// namespaces are still isolated in the cache, but their events carry Arbor's hashed key,
/// which the router cannot match to requests: those tenants lose KV-aware routing, not
/// correctness. It bounds what clients choosing arbitrary salts can make the worker remember.
pub const MAX_NAMED_NAMESPACES: usize = 65_536;

/// Dynamo's cache namespaces as Arbor's.
///
/// Dynamo's router salts the block hashes of a request in a namespace with the namespace's
/// name; Arbor's cache keys a namespace by a 64-bit hash. The worker maps each name to a hash
/// for the engine and remembers the name, so the KV events can carry it back in the first
/// block's `extra_keys` as `dynamo-cache-salt:<name>`, which is how Dynamo's vLLM worker
/// passes it and how its event reader finds it. The router then hashes the blocks of the
/// event exactly as it hashes the request.
#[derive(Default)]
pub struct CacheNamespaces {
    names: Mutex<HashMap<u64, String>>,
}

impl CacheNamespaces {
    /// The engine's namespace for a request's cache namespace (none or empty: the default,
    /// namespace 0, which every request without one shares).
    pub fn resolve(&self, name: Option<&str>) -> u64 {
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            return 0;
        };
        // SipHash with fixed keys: stable for the life of the process, which is as long as
        // the cache it keys.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut h);
        let ns = h.finish().max(1);
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if names.len() < MAX_NAMED_NAMESPACES || names.contains_key(&ns) {
            names.entry(ns).or_insert_with(|| name.to_owned());
        }
        ns
    }

    /// How a namespace's blocks are keyed in the KV events.
    pub fn event_key(&self, ns: u64) -> String {
        match self
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ns)
        {
            Some(name) => format!("{DYNAMO_CACHE_SALT_PREFIX}{name}"),
            None => namespace_key(ns),
        }
    }
}

/// What `start` brings up.
struct Running {
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    /// The model's end-of-turn tokens: they end a reply and are not part of it.
    stop_ids: Vec<u32>,
    kv_slots: usize,
    /// The KV event socket's address as bound.
    kv_events: String,
}

pub struct ArborWorker {
    args: Args,
    running: Mutex<Option<Arc<Running>>>,
    namespaces: Arc<CacheNamespaces>,
}

fn backend_error(kind: BackendError, message: impl Into<String>) -> DynamoError {
    DynamoError::builder()
        .error_type(ErrorType::Backend(kind))
        .message(message.into())
        .build()
}

impl ArborWorker {
    pub fn new(args: Args) -> Self {
        Self {
            args,
            running: Mutex::new(None),
            namespaces: Arc::default(),
        }
    }

    /// Dynamo's worker settings from the flags. The model is registered as a Hugging Face
    /// folder, which a GGUF file is first written out as ([`card::hf_folder`]).
    pub fn worker_config(&self) -> anyhow::Result<WorkerConfig> {
        let a = &self.args;
        let card_dir = match &a.model_card_dir {
            Some(dir) => dir.clone(),
            None => card::default_dir(&a.model)?,
        };
        let folder = card::hf_folder(&a.model, &card_dir)?;
        Ok(WorkerConfig {
            namespace: a.common.namespace.clone(),
            component: a.common.component.clone(),
            endpoint: a.common.endpoint.clone(),
            model_name: folder.display().to_string(),
            served_model_name: a.served_model_name.clone(),
            endpoint_types: a.common.endpoint_types.clone(),
            custom_jinja_template: a.common.custom_jinja_template.clone(),
            tool_call_parser: a.common.dyn_tool_call_parser.clone(),
            reasoning_parser: a.common.dyn_reasoning_parser.clone(),
            runtime: a.common.runtime.clone(),
            ..Default::default()
        })
    }

    fn running(&self) -> Result<Arc<Running>, DynamoError> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| backend_error(BackendError::EngineShutdown, "the engine is not running"))
    }

    fn served_name(&self) -> String {
        self.args
            .served_model_name
            .clone()
            .unwrap_or_else(|| self.args.model.display().to_string())
    }
}

/// Dynamo's request as Arbor's, and the tokens that end its reply without being sent (the
/// model's end-of-turn ids among them). Dynamo's frontend has already applied stop strings' and
/// detokenization's jobs; the worker stops on tokens.
fn arbor_request(r: &PreprocessedRequest, model_stop_ids: &[u32]) -> (Request, Vec<u32>) {
    let s = &r.sampling_options;
    let mut params = SamplingParams::default();
    if let Some(t) = s.temperature {
        params.temperature = t;
    }
    if let Some(p) = s.top_p {
        params.top_p = p;
    }
    if let Some(k) = s.top_k.filter(|&k| k > 0) {
        params.top_k = k as usize;
    }
    if let Some(p) = s.min_p {
        params.min_p = p;
    }
    if let Some(p) = s.repetition_penalty {
        params.repetition_penalty = p;
    }
    if let Some(p) = s.presence_penalty {
        params.presence_penalty = p;
    }
    if let Some(p) = s.frequency_penalty {
        params.frequency_penalty = p;
    }
    params.seed = s.seed.map(|x| x as u64);
    let c = &r.stop_conditions;
    let mut req = Request::new(
        r.token_ids.to_vec(),
        c.max_tokens.unwrap_or(u32::MAX) as usize,
    );
    req.sampling = params;
    req.stop.min_tokens = c.min_tokens.unwrap_or(0) as usize;
    req.stop.ignore_eos = c.ignore_eos.unwrap_or(false);
    // Every stop id, and which of them end the reply without being part of it: all but the
    // visible ones, plus the model's own end-of-turn ids.
    let eos = r.eos_token_ids.iter().filter(|_| !req.stop.ignore_eos);
    let mut hidden: Vec<u32> = [&c.stop_token_ids, &c.stop_token_ids_hidden]
        .into_iter()
        .flatten()
        .flatten()
        .chain(eos)
        .copied()
        .collect();
    let stop: Vec<u32> = hidden
        .iter()
        .chain(c.stop_token_ids_visible.iter().flatten())
        .copied()
        .collect();
    if !req.stop.ignore_eos {
        hidden.extend_from_slice(model_stop_ids);
    }
    req.stop.stop_token_ids = stop.into();
    (req, hidden)
}

#[async_trait]
impl LLMEngine for ArborWorker {
    async fn start(&self, worker_id: u64) -> Result<EngineConfig, DynamoError> {
        let args = self.args.clone();
        let namespaces = self.namespaces.clone();
        tracing::info!(worker_id, model = %args.model.display(), "loading the model");
        let running = tokio::task::spawn_blocking(move || -> Result<Running, String> {
            let device: DeviceSpec = args.device.parse()?;
            let options = RunnerOptions {
                kv_slots: args.kv_slots,
                tensor_parallel_size: args.tensor_parallel_size,
                ..Default::default()
            };
            let opened =
                arbor_model::open(&args.model, device, &options).map_err(|e| e.to_string())?;
            let stop_ids = opened.tokenizer.stop_ids.clone();
            let kv_slots = opened.runner.kv_slots();
            let config = ArborEngineConfig {
                max_batch_tokens: args.max_batch_tokens,
                max_running: args.max_running,
                ..Default::default()
            };
            let engine =
                Engine::new(opened.runner, opened.tokenizer, config).map_err(|e| e.to_string())?;
            let mut events = KvEventsConfig::new(args.kv_events_endpoint.clone());
            events.page_size = args.kv_block_size;
            events.namespace_keys = NamespaceKeys::new(move |ns| namespaces.event_key(ns));
            let publisher = KvEventPublisher::start(&events)?;
            let kv_events = publisher.endpoint.clone();
            engine
                .enable_kv_events(publisher.page_size())
                .map_err(|e| e.to_string())?;
            let metrics = Arc::new(Metrics::default());
            let engine =
                EngineHandle::spawn(engine, args.max_queue, metrics.clone(), Some(publisher));
            Ok(Running {
                engine,
                metrics,
                stop_ids,
                kv_slots,
                kv_events,
            })
        })
        .await
        .map_err(|e| DynamoError::msg(format!("loading the model panicked: {e}")))?
        .map_err(|e| backend_error(BackendError::Unknown, format!("cannot start Arbor: {e}")))?;
        let kv_slots = running.kv_slots;
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(running));
        let block = self.args.kv_block_size as u64;
        Ok(EngineConfig {
            model: self.args.model.display().to_string(),
            served_model_name: Some(self.served_name()),
            llm: Some(LlmRegistration {
                kv_cache_block_size: Some(block as u32),
                total_kv_blocks: Some(kv_slots as u64 / block),
                max_num_seqs: Some(self.args.max_running as u64),
                max_num_batched_tokens: Some(self.args.max_batch_tokens as u64),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn generate(
        &self,
        request: PreprocessedRequest,
        ctx: GenerateContext,
    ) -> Result<BoxStream<'static, Result<LLMEngineOutput, DynamoError>>, DynamoError> {
        let running = self.running()?;
        let (mut req, hidden) = arbor_request(&request, &running.stop_ids);
        req.namespace = self.namespaces.resolve(
            request
                .routing
                .as_ref()
                .and_then(|r| r.cache_namespace.as_deref()),
        );
        let prompt_tokens = req.prompt.len() as u32;
        let namespace = req.namespace;
        // Within Dynamo's request span (its request_id): for logs of which worker ran what.
        tracing::debug!(prompt_tokens, namespace, "request");
        let (_, mut rx) = running
            .engine
            .submit(vec![req])
            .await
            .map_err(|e| match e {
                SubmitError::Invalid(e) => {
                    backend_error(BackendError::InvalidArgument, e.to_string())
                }
                SubmitError::QueueFull { waiting, limit } => backend_error(
                    BackendError::Unknown,
                    format!("Arbor is at capacity: {waiting} requests waiting (limit {limit})"),
                ),
                SubmitError::Draining => {
                    backend_error(BackendError::EngineShutdown, "Arbor is draining")
                }
                SubmitError::EngineFailed(why) => backend_error(BackendError::EngineShutdown, why),
            })?;
        let stream = async_stream::stream! {
            let mut emitted: u32 = 0;
            loop {
                let event = tokio::select! {
                    // Dropping the receiver cancels the request in the engine before its next
                    // step; its KV goes back to the pool.
                    _ = ctx.stopped() => None,
                    ev = rx.recv() => Some(ev),
                };
                let Some(event) = event else {
                    drop(rx);
                    yield Ok(LLMEngineOutput::cancelled().with_usage(usage(prompt_tokens, emitted, 0)));
                    break;
                };
                match event {
                    None => {
                        yield Err(backend_error(BackendError::EngineShutdown, "the engine stopped mid-request"));
                        break;
                    }
                    Some(Tagged { event: Event::Token { token, .. }, .. }) => {
                        if !hidden.contains(&token) {
                            emitted += 1;
                            yield Ok(chunk::token(token));
                        }
                    }
                    Some(Tagged { event: Event::Finished { reason, usage: u, error, .. }, .. }) => {
                        let used = usage(prompt_tokens, emitted, u.cached_tokens as u32);
                        tracing::debug!(cached_tokens = u.cached_tokens, completion_tokens = emitted, ?reason, "finished");
                        let end = match reason {
                            FinishReason::Stop => LLMEngineOutput::stop(),
                            FinishReason::Length => LLMEngineOutput::length(),
                            FinishReason::Cancelled => LLMEngineOutput::cancelled(),
                            FinishReason::Error => {
                                yield Err(backend_error(
                                    BackendError::Unknown,
                                    error.unwrap_or_else(|| "generation failed".into()),
                                ));
                                break;
                            }
                        };
                        yield Ok(end.with_usage(used));
                        break;
                    }
                }
            }
        };
        Ok(Box::pin(stream))
    }

    async fn cleanup(&self) -> Result<(), DynamoError> {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(r) = running {
            // The engine thread stops once the last handle goes (requests in flight end).
            tokio::task::spawn_blocking(move || r.engine.shutdown())
                .await
                .map_err(|e| DynamoError::msg(format!("stopping the engine: {e}")))?;
        }
        Ok(())
    }

    async fn kv_event_sources(&self) -> Result<Vec<KvEventSource>, DynamoError> {
        let running = self.running()?;
        Ok(vec![KvEventSource::Zmq {
            endpoint: running.kv_events.replace("*", "127.0.0.1"),
            topic: String::new(),
            dp_rank: 0,
            image_token_id: None,
        }])
    }

    async fn setup_metrics(&self, _ctx: MetricsCtx<'_>) -> Result<MetricsBindings, DynamoError> {
        let running = self.running()?;
        let block = self.args.kv_block_size as u64;
        Ok(MetricsBindings {
            dp_ranks: vec![0],
            on_publisher_ready: Some(Box::new(move |publisher| {
                // The router's load signal: KV blocks held by requests, every 100 ms.
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_millis(100));
                    loop {
                        tick.tick().await;
                        let (slots, _, _) = running.metrics.engine_state();
                        let total = slots.total as u64 / block;
                        let used = (slots.held_by_requests as u64).div_ceil(block);
                        publisher.publish(
                            0,
                            ComponentSnapshot {
                                kv_used_blocks: used,
                                kv_total_blocks: total,
                                gpu_cache_usage: used as f32 / total.max(1) as f32,
                                kv_cache_hit_rate: None,
                                dp_rank: 0,
                            },
                        );
                    }
                });
                Ok(())
            })),
        })
    }
}

fn usage(
    prompt: u32,
    completion: u32,
    cached: u32,
) -> dynamo_backend_common::engine::CompletionUsage {
    let mut u = dynamo_backend_common::engine::usage(prompt, completion);
    u.prompt_tokens_details = Some(PromptTokensDetails {
        cached_tokens: Some(cached),
        ..Default::default()
    });
    u
}
