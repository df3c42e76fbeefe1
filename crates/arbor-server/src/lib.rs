//! Arbor's OpenAI-compatible HTTP server (`arbor serve`), on axum and tokio.
//!
//! | module    | owns |
//! |-----------|------|
//! | `worker`  | the engine thread: the [`arbor_engine::Engine`] and its step loop, fed by channels |
//! | `routes`  | the HTTP handlers: authenticate, parse, check limits, submit, respond |
//! | `limits`  | the per-call bounds a request meets before it is queued; the engine requests of a call |
//! | `responder` | one JSON response or one event stream per call, from the engine's events |
//! | `wire`    | OpenAI's wire format: finish reasons, usage, log-probabilities and token bytes |
//! | `api`     | request bodies and their validation into engine parameters |
//! | `error`   | errors in OpenAI's shape with the right status |
//! | `metrics` | Prometheus counters, gauges and histograms |
//! | `tenancy` | API keys and the prefix-cache namespace each key gets |
//! | `history` | a conversation's next turn as the template will render it (warm-ups), and where a prompt left the cache |
//!
//! The engine owns the model and the KV pool on its own thread; handlers never touch them.
//! Tokenization and template rendering run on tokio's blocking pool.

pub mod api;
pub mod error;
mod history;
pub mod kv_events;
mod limits;
pub mod metrics;
pub mod reasoning;
mod responder;
mod routes;
pub mod structured;
pub mod tenancy;
pub mod tools;
mod wire;
pub mod worker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arbor_engine::Engine;
use arbor_model::{ChatTemplate, Tokenizer};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub use error::ApiError;
pub use metrics::Metrics;
pub use tenancy::{parse_api_keys, Tenancy};
pub use worker::EngineHandle;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The id clients use in `model`; requests naming another model get 404.
    pub model_name: String,
    /// With keys, every /v1 request needs one, and each key has its own cache namespace.
    pub api_keys: Vec<String>,
    /// Requests waiting for admission beyond which new ones get 503.
    pub max_queue: usize,
    pub max_body_bytes: usize,
    /// On SIGINT/SIGTERM, how long requests in flight may take to finish before they are
    /// cancelled.
    pub shutdown_timeout: Duration,
    /// Sequences (prompts x n) one call may create; beyond, 400.
    pub max_sequences_per_request: usize,
    /// Prompt tokens one call may send, all prompts together (`None`: the KV pool's size,
    /// which is also the most it may ever be).
    pub max_prompt_tokens_per_request: Option<usize>,
    /// With API keys, /metrics needs a key too unless this is set.
    pub metrics_public: bool,
    /// How chat replies are split into `reasoning_content` and `content`.
    pub reasoning_parser: reasoning::ReasoningParser,
    /// The format tool calls are read from replies in.
    pub tool_call_parser: tools::ToolCallParser,
    /// After a chat reply, compute the conversation as its next request will render it into
    /// the cache while the engine is idle (see `history`).
    pub history_warmup: bool,
}

/// Per-call bounds on work, checked before anything is copied or queued.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_sequences_per_request: usize,
    pub max_prompt_tokens_per_request: usize,
    /// Text longer than this many bytes cannot tokenize to fewer than the tokens allowed: it is
    /// refused before the tokenizer runs (tokenizing 12 MB took 13 s of a blocking thread).
    /// Twice the longest vocabulary entry per allowed token.
    pub max_prompt_text_bytes: usize,
}

impl ServerConfig {
    pub fn new(model_name: impl Into<String>) -> Self {
        Self {
            model_name: model_name.into(),
            api_keys: Vec::new(),
            max_queue: 256,
            max_body_bytes: 16 << 20,
            shutdown_timeout: Duration::from_secs(30),
            max_sequences_per_request: DEFAULT_MAX_SEQUENCES_PER_REQUEST,
            max_prompt_tokens_per_request: None,
            metrics_public: false,
            reasoning_parser: reasoning::ReasoningParser::Auto,
            tool_call_parser: tools::ToolCallParser::Auto,
            history_warmup: true,
        }
    }
}

/// Default bound on the sequences of one call: as many as `n` alone may ask for. A full queue
/// (256 waiting) of such calls' worth of sequence state is a few MiB.
pub const DEFAULT_MAX_SEQUENCES_PER_REQUEST: usize = api::MAX_N;

/// The warning to print when the server listens beyond loopback without API keys: every
/// client then shares one cache namespace, and `cached_tokens` (and a fast first token) tell a
/// client how much of its prompt someone else sent before.
pub fn exposure_warning(addr: std::net::SocketAddr, has_keys: bool) -> Option<String> {
    if has_keys || addr.ip().is_loopback() {
        return None;
    }
    Some(format!(
        "listening on {addr} without --api-key: anyone who can reach it may use it, and all \
         clients share one prefix-cache namespace, so `cached_tokens` and time to first token \
         reveal which prompts others sent; set --api-key (one namespace per key) or listen on \
         127.0.0.1"
    ))
}

/// What the handlers share.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
    pub metrics: Arc<Metrics>,
    pub tenancy: Tenancy,
    pub model_name: String,
    /// The model's context length in tokens.
    pub context: usize,
    pub vocab: usize,
    pub max_body_bytes: usize,
    pub shutdown_timeout: Duration,
    pub limits: RequestLimits,
    pub metrics_public: bool,
    /// Unix time the server started (the model card's `created`).
    pub created: u64,
    /// The reasoning parser in force (`None`: replies are not split).
    pub reasoning: Option<reasoning::ReasoningParser>,
    /// The tool-call format in force (`None`: requests with tools need `tool_choice: none`).
    pub tools: Option<tools::ToolCallParser>,
    /// Constrained decoding for `response_format` (built on first use).
    pub structured: structured::Structured,
    /// Whether chat replies warm their conversation's next turn.
    pub history_warmup: bool,
    /// Whether each namespace's clients send reasoning back (how the next turn renders).
    pub(crate) reasoning_echoes: history::ReasoningEchoes,
}

impl AppState {
    /// Starts the engine thread and wraps everything the handlers need.
    pub fn new(engine: Engine, template: ChatTemplate, config: &ServerConfig) -> Arc<Self> {
        Self::build(engine, template, config, None)
    }

    /// [`AppState::new`], publishing the prefix cache's changes through `publisher` (see
    /// [`kv_events`]); fails if the engine cannot log them (something is cached already, or
    /// the block cache's blocks are not the publisher's pages).
    pub fn with_kv_events(
        engine: Engine,
        template: ChatTemplate,
        config: &ServerConfig,
        publisher: kv_events::KvEventPublisher,
    ) -> Result<Arc<Self>, String> {
        engine
            .enable_kv_events(publisher.page_size())
            .map_err(|e| e.to_string())?;
        Ok(Self::build(engine, template, config, Some(publisher)))
    }

    fn build(
        engine: Engine,
        template: ChatTemplate,
        config: &ServerConfig,
        kv_events: Option<kv_events::KvEventPublisher>,
    ) -> Arc<Self> {
        let metrics = Arc::new(Metrics::default());
        let tokenizer = Arc::new(engine.tokenizer().clone());
        let structured_tokenizer = tokenizer.clone();
        let context = engine.model_config().max_position_embeddings;
        let vocab = engine.model_config().vocab_size;
        let kv_slots = engine.runner().kv_slots();
        let max_prompt_tokens_per_request = config
            .max_prompt_tokens_per_request
            .map_or(kv_slots, |m| m.min(kv_slots));
        // The longest vocabulary entry bounds the bytes one token can stand for (a byte-level
        // or SentencePiece piece is never shorter than the text it covers).
        let longest_token = (0..tokenizer.vocab_size() as u32)
            .filter_map(|id| tokenizer.id_to_token(id))
            .map(|t| t.len())
            .max()
            .unwrap_or(64)
            .max(1);
        let limits = RequestLimits {
            max_sequences_per_request: config.max_sequences_per_request,
            max_prompt_tokens_per_request,
            max_prompt_text_bytes: max_prompt_tokens_per_request
                .max(context)
                .saturating_mul(2 * longest_token),
        };
        Arc::new(Self {
            engine: EngineHandle::spawn(engine, config.max_queue, metrics.clone(), kv_events),
            tokenizer,
            reasoning: config.reasoning_parser.resolve(template.source()),
            tools: config.tool_call_parser.resolve(template.source()),
            structured: structured::Structured::new(structured_tokenizer, vocab),
            history_warmup: config.history_warmup,
            reasoning_echoes: Default::default(),
            template: Arc::new(template),
            metrics,
            tenancy: Tenancy::new(config.api_keys.clone()),
            model_name: config.model_name.clone(),
            context,
            vocab,
            max_body_bytes: config.max_body_bytes,
            shutdown_timeout: config.shutdown_timeout,
            limits,
            metrics_public: config.metrics_public,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })
    }
}

/// All routes, for `axum::serve` or for tests through `tower::ServiceExt::oneshot`. The API
/// routes sit behind the authentication middleware; /health (and /metrics with
/// `--metrics-public`) do not.
pub fn router(state: Arc<AppState>) -> Router {
    let auth = axum::middleware::from_fn_with_state(state.clone(), routes::require_key);
    let mut keyed = Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/models", get(routes::list_models))
        .route("/v1/models/{id}", get(routes::get_model))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize));
    let mut open = Router::new().route("/health", get(routes::health));
    // /metrics says how busy the server is and how much is cached: keyed unless made public.
    if state.metrics_public {
        open = open.route("/metrics", get(routes::metrics));
    } else {
        keyed = keyed.route("/metrics", get(routes::metrics));
    }
    Router::new()
        .merge(keyed.route_layer(auth))
        .merge(open)
        .fallback(routes::unknown_path)
        .method_not_allowed_fallback(routes::wrong_method)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .with_state(state)
}

/// How long streams get to deliver their error events after the engine failed.
const FAILURE_GRACE: Duration = Duration::from_secs(2);

/// Serves until `shutdown` resolves, then drains: new requests get 503, requests in flight
/// have `shutdown_timeout` to finish before they are cancelled, and the function returns once
/// every connection has closed (or a few seconds after the deadline, whatever clients do).
///
/// If the engine fails, the server stops at once (requests in flight have already received
/// their error events; they get [`FAILURE_GRACE`] to be delivered) and this returns an error,
/// so that the process exits non-zero and a supervisor restarts it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let started = Arc::new(tokio::sync::Notify::new());
    let drain = {
        let state = state.clone();
        let started = started.clone();
        async move {
            let failed = tokio::select! {
                _ = shutdown => false,
                why = state.engine.failure() => {
                    tracing::error!("stopping the server: {why}");
                    true
                }
            };
            let grace = if failed {
                FAILURE_GRACE
            } else {
                state.shutdown_timeout
            };
            tracing::info!(
                "shutting down: refusing new requests, giving those in flight {:.0}s",
                grace.as_secs_f64()
            );
            state.engine.begin_drain();
            started.notify_one();
            let st = state.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                st.engine.cancel_all();
            });
        }
    };
    let server = axum::serve(listener, router(state.clone())).with_graceful_shutdown(drain);
    let grace = state.shutdown_timeout;
    let result = tokio::select! {
        r = server => r,
        _ = async {
            started.notified().await;
            let grace = if state.engine.failed().is_some() { FAILURE_GRACE } else { grace };
            tokio::time::sleep(grace + Duration::from_secs(1)).await;
        } => {
            tracing::warn!("connections still open after the shutdown deadline; closing");
            Ok(())
        }
    };
    state.engine.shutdown();
    if let Some(why) = state.engine.failed() {
        return Err(std::io::Error::other(format!("the engine failed: {why}")));
    }
    result
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
