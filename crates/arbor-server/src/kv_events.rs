//! KV events over ZeroMQ in vLLM's wire format, for KV-aware routers (NVIDIA Dynamo's KV
//! router, llm-d) that route each request to the replica holding its prefix.
//!
//! The engine logs its prefix cache's page view (`arbor_cache::events`); the engine thread
//! drains it once per loop turn and hands a batch to the publisher thread, which owns the
//! sockets (no I/O on the engine thread, which never blocks on a subscriber):
//!
//! ```text
//!   engine thread ── try_send(batch) ──> publisher thread ── PUB   [topic, seq u64 BE, msgpack]
//!                                          (replay buffer) ─ ROUTER [seq u64 BE, msgpack]... [-1, ""]
//! ```
//!
//! The payload is vLLM's `KVEventBatch` as msgspec encodes it with `array_like=True`:
//! `[ts, [event, ...], data_parallel_rank]`, each event a tagged array:
//! `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
//! lora_name, extra_keys]`, `["BlockRemoved", block_hashes, medium]`, `["AllBlocksCleared"]`.
//! Block hashes are unsigned 64-bit integers chained per page; `medium` is `"GPU"` (vLLM's
//! name for the engine's own KV pool, whatever the device); `extra_keys` carries the cache
//! namespace (an API key's, or a `cache_salt`'s) as one `["arbor-ns:<hex>"]` per block (or as
//! [`NamespaceKeys`] writes it), and is nil for the default namespace.
//!
//! Every stream starts with `AllBlocksCleared` (a restarted server's subscribers drop what
//! they knew). If the channel to the publisher is full, the batch is dropped and the next one
//! is a resynchronisation: `AllBlocksCleared` and then every page cached at that moment, so a
//! subscriber's view is exact again after any loss on our side. Loss between the sockets (a
//! slow subscriber past the high-water mark) shows as a gap in the sequence numbers, which
//! the subscriber repairs from the replay socket: it sends the first sequence number it
//! wants (8 bytes, big-endian), and gets every buffered batch from there, then `-1` and an
//! empty frame, as vLLM's `ZmqEventPublisher` does.
//!
//! The stream carries the token ids of every cached prompt, of every tenant: bind it to a
//! network only the router can reach.

use std::collections::VecDeque;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use arbor_cache::Namespace;
use arbor_engine::{Engine, KvEvent};
use tokio::sync::mpsc;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

/// vLLM's default page (block) size.
pub const DEFAULT_PAGE_SIZE: usize = 16;
/// Batches kept for replay (vLLM's default `buffer_steps`).
pub const DEFAULT_REPLAY_BATCHES: usize = 10_000;
/// Batches the engine may run ahead of the publisher before one is dropped (and the stream
/// resynchronised).
const CHANNEL_BATCHES: usize = 4096;

/// Where and how to publish.
#[derive(Debug, Clone)]
pub struct KvEventsConfig {
    /// The PUB socket's address, e.g. `tcp://*:5557` or `tcp://127.0.0.1:5557` (bound:
    /// subscribers connect to it).
    pub endpoint: String,
    /// The ROUTER socket serving replays (`None`: no replay).
    pub replay_endpoint: Option<String>,
    /// The first frame of every message (subscribers filter on it).
    pub topic: String,
    /// Tokens per page.
    pub page_size: usize,
    /// Batches kept for replay.
    pub replay_batches: usize,
    /// How a namespace is written into its blocks' `extra_keys`.
    pub namespace_keys: NamespaceKeys,
}

/// How a cache namespace appears in its blocks' `extra_keys`. Arbor's own server writes
/// `arbor-ns:<hex>` (the namespace is a hash of an API key and a `cache_salt`); a router that
/// salts its block hashes with a namespace it knows by name (Dynamo's `cache_salt`) needs that
/// name back, which only the process that mapped the name to the hash can give.
#[derive(Clone)]
pub struct NamespaceKeys(Arc<dyn Fn(Namespace) -> String + Send + Sync>);

impl NamespaceKeys {
    pub fn new(key: impl Fn(Namespace) -> String + Send + Sync + 'static) -> Self {
        Self(Arc::new(key))
    }

    pub fn key(&self, namespace: Namespace) -> String {
        (self.0)(namespace)
    }
}

impl Default for NamespaceKeys {
    fn default() -> Self {
        Self::new(namespace_key)
    }
}

impl std::fmt::Debug for NamespaceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NamespaceKeys(..)")
    }
}

impl KvEventsConfig {
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            replay_endpoint: None,
            topic: String::new(),
            page_size: DEFAULT_PAGE_SIZE,
            replay_batches: DEFAULT_REPLAY_BATCHES,
            namespace_keys: NamespaceKeys::default(),
        }
    }
}

/// One engine loop turn's events, stamped when drained.
struct Batch {
    ts: f64,
    events: Vec<KvEvent>,
}

/// The engine thread's end: drains the engine and hands batches to the publisher thread.
pub struct KvEventPublisher {
    tx: Option<mpsc::Sender<Batch>>,
    thread: Option<JoinHandle<()>>,
    page_size: usize,
    /// A batch was dropped: the next one must be a full resynchronisation.
    resync: bool,
    drained: Vec<KvEvent>,
    /// The addresses the sockets were bound to (with the port chosen, for port 0).
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
}

impl KvEventPublisher {
    /// Binds the sockets (on a thread of their own) and queues the opening `AllBlocksCleared`.
    pub fn start(config: &KvEventsConfig) -> Result<Self, String> {
        if config.page_size == 0 {
            return Err("the KV event page size must be at least 1 token".into());
        }
        for ep in std::iter::once(&config.endpoint).chain(&config.replay_endpoint) {
            if !ep.starts_with("tcp://") {
                return Err(format!(
                    "KV event endpoint `{ep}`: only tcp://HOST:PORT is supported"
                ));
            }
        }
        let (tx, rx) = mpsc::channel(CHANNEL_BATCHES);
        let (bound_tx, bound_rx) = std_mpsc::channel();
        let cfg = config.clone();
        let thread = std::thread::Builder::new()
            .name("arbor-kv-events".into())
            .spawn(move || publisher_thread(cfg, rx, bound_tx))
            .map_err(|e| format!("starting the KV event thread: {e}"))?;
        let (endpoint, replay_endpoint) = bound_rx
            .recv()
            .map_err(|_| "the KV event thread ended before binding".to_string())??;
        let mut publisher = Self {
            tx: Some(tx),
            thread: Some(thread),
            page_size: config.page_size,
            resync: false,
            drained: Vec::new(),
            endpoint,
            replay_endpoint,
        };
        publisher.send(vec![KvEvent::Cleared]);
        Ok(publisher)
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Publishes what the engine's cache did since the last call (nothing if nothing did).
    /// Never blocks: a full channel drops the batch and makes the next one a resync.
    pub fn publish(&mut self, engine: &Engine) {
        engine.drain_kv_events(&mut self.drained);
        if self.resync {
            // The snapshot already reflects what was just drained.
            self.drained.clear();
            let mut events = vec![KvEvent::Cleared];
            events.extend(engine.kv_snapshot_events());
            self.send(events);
        } else if !self.drained.is_empty() {
            let events = std::mem::take(&mut self.drained);
            self.send(events);
        }
    }

    fn send(&mut self, events: Vec<KvEvent>) {
        let Some(tx) = &self.tx else { return };
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        match tx.try_send(Batch { ts, events }) {
            Ok(()) => self.resync = false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.resync {
                    tracing::warn!("KV event publisher behind: dropping a batch, resyncing");
                }
                self.resync = true;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("the KV event publisher stopped; no more KV events");
                self.tx = None;
            }
        }
    }
}

impl Drop for KvEventPublisher {
    /// Closes the channel; the thread publishes what is queued and ends.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Bound = Result<(String, Option<String>), String>;

fn publisher_thread(
    config: KvEventsConfig,
    rx: mpsc::Receiver<Batch>,
    bound: std_mpsc::Sender<Bound>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = bound.send(Err(format!("KV event runtime: {e}")));
            return;
        }
    };
    runtime.block_on(run(config, rx, bound));
}

async fn run(
    config: KvEventsConfig,
    mut rx: mpsc::Receiver<Batch>,
    bound: std_mpsc::Sender<Bound>,
) {
    let mut publ = zeromq::PubSocket::new();
    let endpoint = match publ.bind(&config.endpoint).await {
        Ok(ep) => ep.to_string(),
        Err(e) => {
            let _ = bound.send(Err(format!(
                "binding the KV event socket {}: {e}",
                config.endpoint
            )));
            return;
        }
    };
    let mut replay = None;
    let mut replay_endpoint = None;
    if let Some(ep) = &config.replay_endpoint {
        let mut router = zeromq::RouterSocket::new();
        match router.bind(ep).await {
            Ok(b) => replay_endpoint = Some(b.to_string()),
            Err(e) => {
                let _ = bound.send(Err(format!("binding the KV event replay socket {ep}: {e}")));
                return;
            }
        }
        replay = Some(router);
    }
    let _ = bound.send(Ok((endpoint, replay_endpoint)));

    let topic = bytes::Bytes::from(config.topic.clone().into_bytes());
    let mut buffer: VecDeque<(u64, bytes::Bytes)> = VecDeque::new();
    let mut seq: u64 = 0;
    loop {
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                let payload = bytes::Bytes::from(encode_batch(batch.ts, &batch.events, config.page_size, &config.namespace_keys));
                let frames = vec![topic.clone(), bytes::Bytes::copy_from_slice(&seq.to_be_bytes()), payload.clone()];
                let msg = ZmqMessage::try_from(frames).expect("three frames");
                if let Err(e) = publ.send(msg).await {
                    tracing::warn!("publishing KV events: {e}");
                }
                buffer.push_back((seq, payload));
                if buffer.len() > config.replay_batches {
                    buffer.pop_front();
                }
                seq += 1;
            }
            request = recv_replay(&mut replay) => {
                if let (Some(router), Ok(request)) = (replay.as_mut(), request) {
                    serve_replay(router, request, &buffer).await;
                }
            }
        }
    }
}

/// The next replay request, or never when there is no replay socket.
async fn recv_replay(replay: &mut Option<zeromq::RouterSocket>) -> zeromq::ZmqResult<ZmqMessage> {
    match replay {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// Answers `[identity, (empty,) start_seq]` with every buffered batch from `start_seq` on,
/// then the end marker, each behind the same envelope.
async fn serve_replay(
    router: &mut zeromq::RouterSocket,
    request: ZmqMessage,
    buffer: &VecDeque<(u64, bytes::Bytes)>,
) {
    let frames = request.into_vec();
    let (Some(last), true) = (frames.last(), frames.len() >= 2) else {
        return;
    };
    let Ok(start) = <[u8; 8]>::try_from(last.as_ref()) else {
        tracing::warn!("a KV event replay request without an 8-byte sequence number");
        return;
    };
    let start = u64::from_be_bytes(start);
    let envelope = &frames[..frames.len() - 1];
    let reply = |seq: bytes::Bytes, payload: bytes::Bytes| {
        let mut f = envelope.to_vec();
        f.push(seq);
        f.push(payload);
        ZmqMessage::try_from(f).expect("non-empty")
    };
    for (seq, payload) in buffer.iter().filter(|(s, _)| *s >= start) {
        let msg = reply(
            bytes::Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload.clone(),
        );
        if router.send(msg).await.is_err() {
            return;
        }
    }
    let end = reply(
        bytes::Bytes::copy_from_slice(&(-1i64).to_be_bytes()),
        bytes::Bytes::new(),
    );
    let _ = router.send(end).await;
}

/// vLLM's `KVEventBatch` in msgpack (see the module docs).
pub fn encode_batch(
    ts: f64,
    events: &[KvEvent],
    page_size: usize,
    namespace_keys: &NamespaceKeys,
) -> Vec<u8> {
    use rmp::encode::{write_array_len, write_f64, write_nil, write_str, write_uint};
    // Writing to a Vec cannot fail.
    fn ok<T, E: std::fmt::Debug>(r: Result<T, E>) {
        r.expect("writing msgpack to memory");
    }
    let mut out = Vec::with_capacity(64 + events.len() * 32);
    let w = &mut out;
    ok(write_array_len(w, 3));
    ok(write_f64(w, ts));
    ok(write_array_len(w, events.len() as u32));
    let hashes_of = |w: &mut Vec<u8>, hashes: &[u64]| {
        ok(write_array_len(w, hashes.len() as u32));
        for &h in hashes {
            ok(write_uint(w, h));
        }
    };
    for ev in events {
        match ev {
            KvEvent::Stored {
                namespace,
                parent,
                hashes,
                tokens,
            } => {
                ok(write_array_len(w, 9));
                ok(write_str(w, "BlockStored"));
                hashes_of(w, hashes);
                match parent {
                    Some(p) => ok(write_uint(w, *p)),
                    None => ok(write_nil(w)),
                }
                ok(write_array_len(w, tokens.len() as u32));
                for &t in tokens {
                    ok(write_uint(w, t.into()));
                }
                ok(write_uint(w, page_size as u64));
                ok(write_nil(w)); // lora_id
                ok(write_str(w, "GPU")); // medium
                ok(write_nil(w)); // lora_name
                if *namespace == 0 {
                    ok(write_nil(w));
                } else {
                    let key = namespace_keys.key(*namespace);
                    ok(write_array_len(w, hashes.len() as u32));
                    for _ in hashes {
                        ok(write_array_len(w, 1));
                        ok(write_str(w, &key));
                    }
                }
            }
            KvEvent::Removed { hashes, .. } => {
                ok(write_array_len(w, 3));
                ok(write_str(w, "BlockRemoved"));
                hashes_of(w, hashes);
                ok(write_str(w, "GPU"));
            }
            KvEvent::Cleared => {
                ok(write_array_len(w, 1));
                ok(write_str(w, "AllBlocksCleared"));
            }
        }
    }
    ok(write_uint(w, 0)); // data_parallel_rank
    out
}

/// A namespace as a block's extra key (not 64 hex digits, which routers read as a
/// multimodal hash).
pub fn namespace_key(ns: u64) -> String {
    format!("arbor-ns:{ns:016x}")
}
