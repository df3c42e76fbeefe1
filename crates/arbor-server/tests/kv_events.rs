//! KV events over ZeroMQ, from a subscriber's side: the messages are decoded with a generic
//! msgpack reader (not the encoder's types), the block view is rebuilt from them alone, and it
//! must equal what the engine's prefix cache holds after a workload that evicts.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use arbor_engine::{Engine, EngineConfig, Event, KvEvent, PrefixCacheMode, Request};
use arbor_model::{DeviceSpec, RunnerOptions};
use arbor_server::kv_events::{namespace_key, KvEventPublisher, KvEventsConfig};
use rmpv::Value;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

const PAGE: usize = 16;

fn engine(kv_slots: usize, mode: PrefixCacheMode) -> (Engine, arbor_model::ChatTemplate) {
    let options = RunnerOptions {
        kv_slots: Some(kv_slots),
        ..Default::default()
    };
    let opened = arbor_model::open(&common::model_path(), DeviceSpec::Cpu, &options).unwrap();
    let config = EngineConfig {
        prefix_cache: mode,
        ..Default::default()
    };
    let engine = Engine::new(opened.runner, opened.tokenizer, config).unwrap();
    (engine, opened.chat_template)
}

fn publisher() -> KvEventPublisher {
    let mut config = KvEventsConfig::new("tcp://127.0.0.1:0");
    config.replay_endpoint = Some("tcp://127.0.0.1:0".into());
    config.topic = "kv".into();
    config.page_size = PAGE;
    KvEventPublisher::start(&config).unwrap()
}

async fn subscribe(endpoint: &str) -> zeromq::SubSocket {
    let mut sub = zeromq::SubSocket::new();
    sub.connect(endpoint).await.unwrap();
    sub.subscribe("kv").await.unwrap();
    // Let the publisher register the subscription (what it sends before is replayed below).
    tokio::time::sleep(Duration::from_millis(300)).await;
    sub
}

/// Live messages until none arrives for `quiet`: (seq, payload).
async fn drain_live(sub: &mut zeromq::SubSocket, quiet: Duration) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    while let Ok(msg) = tokio::time::timeout(quiet, sub.recv()).await {
        let frames = msg.unwrap().into_vec();
        assert_eq!(frames.len(), 3, "topic, sequence number, payload");
        assert_eq!(frames[0].as_ref(), b"kv");
        let seq = u64::from_be_bytes(frames[1].as_ref().try_into().unwrap());
        out.push((seq, frames[2].to_vec()));
    }
    out
}

/// vLLM's replay protocol: ask for everything from `start`, read until the -1 marker.
async fn replay(endpoint: &str, start: u64) -> Vec<(u64, Vec<u8>)> {
    let mut dealer = zeromq::DealerSocket::new();
    dealer.connect(endpoint).await.unwrap();
    let request = ZmqMessage::try_from(vec![
        bytes::Bytes::new(),
        bytes::Bytes::copy_from_slice(&start.to_be_bytes()),
    ])
    .unwrap();
    dealer.send(request).await.unwrap();
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), dealer.recv())
            .await
            .expect("replay answered")
            .unwrap();
        let frames = msg.into_vec();
        assert_eq!(frames.len(), 3, "empty delimiter, sequence number, payload");
        let seq = i64::from_be_bytes(frames[1].as_ref().try_into().unwrap());
        if seq == -1 {
            assert!(frames[2].is_empty());
            return out;
        }
        out.push((seq as u64, frames[2].to_vec()));
    }
}

/// A block as a subscriber knows it: (parent, page tokens, extra key).
type Block = (Option<u64>, Vec<u64>, Option<String>);

/// A subscriber's block view: hash -> block.
#[derive(Default, Debug, PartialEq)]
struct View {
    blocks: HashMap<u64, Block>,
    stored: usize,
    removed: usize,
}

fn uint(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("an unsigned integer, got {v}"))
}

impl View {
    /// Applies one msgpack `KVEventBatch` ([ts, [events], dp_rank], events as tagged arrays),
    /// checking it against the view as a router would.
    fn apply_batch(&mut self, payload: &[u8]) {
        let batch = rmpv::decode::read_value(&mut &payload[..]).unwrap();
        let batch = batch.as_array().expect("array-like batch");
        assert_eq!(batch.len(), 3);
        assert!(batch[0].as_f64().unwrap() > 1.7e9, "a Unix timestamp");
        assert_eq!(uint(&batch[2]), 0, "data parallel rank");
        for ev in batch[1].as_array().unwrap() {
            let ev = ev.as_array().unwrap();
            match ev[0].as_str().unwrap() {
                "BlockStored" => {
                    assert_eq!(ev.len(), 9);
                    let hashes: Vec<u64> = ev[1].as_array().unwrap().iter().map(uint).collect();
                    let parent = (!ev[2].is_nil()).then(|| uint(&ev[2]));
                    let tokens: Vec<u64> = ev[3].as_array().unwrap().iter().map(uint).collect();
                    assert_eq!(uint(&ev[4]) as usize, PAGE);
                    assert!(ev[5].is_nil(), "lora_id");
                    assert_eq!(ev[6].as_str(), Some("GPU"));
                    assert!(ev[7].is_nil(), "lora_name");
                    let keys: Vec<Option<String>> = match &ev[8] {
                        Value::Nil => vec![None; hashes.len()],
                        Value::Array(per_block) => per_block
                            .iter()
                            .map(|k| Some(k.as_array().unwrap()[0].as_str().unwrap().to_owned()))
                            .collect(),
                        other => panic!("extra_keys {other}"),
                    };
                    assert_eq!(keys.len(), hashes.len());
                    assert_eq!(tokens.len(), hashes.len() * PAGE);
                    if let Some(p) = parent {
                        assert!(self.blocks.contains_key(&p), "unknown parent {p:x}");
                    }
                    let mut prev = parent;
                    for ((h, page), key) in hashes.iter().zip(tokens.chunks(PAGE)).zip(keys) {
                        let old = self.blocks.insert(*h, (prev, page.to_vec(), key));
                        assert!(old.is_none(), "block {h:x} stored twice");
                        prev = Some(*h);
                        self.stored += 1;
                    }
                }
                "BlockRemoved" => {
                    assert_eq!(ev.len(), 3);
                    assert_eq!(ev[2].as_str(), Some("GPU"));
                    for h in ev[1].as_array().unwrap().iter().map(uint) {
                        assert!(self.blocks.remove(&h).is_some(), "removed unknown {h:x}");
                        self.removed += 1;
                    }
                }
                "AllBlocksCleared" => {
                    assert_eq!(ev.len(), 1);
                    self.blocks.clear();
                }
                other => panic!("unknown event {other}"),
            }
        }
    }
}

/// The engine's own page view, from its snapshot.
fn engine_view(engine: &Engine) -> HashMap<u64, Block> {
    let mut out = HashMap::new();
    for ev in engine.kv_snapshot_events() {
        let KvEvent::Stored {
            namespace,
            parent,
            hashes,
            tokens,
        } = ev
        else {
            panic!("a snapshot holds stores only")
        };
        let mut prev = parent;
        for (h, page) in hashes.iter().zip(tokens.chunks(PAGE)) {
            let key = (namespace != 0).then(|| namespace_key(namespace));
            out.insert(*h, (prev, page.iter().map(|&t| t as u64).collect(), key));
            prev = Some(*h);
        }
    }
    out
}

/// Deterministic token ids in the vocabulary's ordinary range.
fn tokens(seed: u64, n: usize) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            1000 + ((x >> 33) % 20000) as u32
        })
        .collect()
}

/// Conversations over three namespaces share system prompts and grow turn by turn, through a
/// KV pool far smaller than what they compute, four at a time: the tree splits, reuses and
/// evicts. The view rebuilt from the live stream (gaps from the subscriber's late join filled
/// by replay) equals the engine's page view, and replay reproduces the live bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_rebuilds_the_cache_view_after_evictions() {
    let (mut engine, _) = engine(700, PrefixCacheMode::Radix);
    let mut publisher = publisher();
    engine.enable_kv_events(PAGE).unwrap();
    let mut sub = subscribe(&publisher.endpoint).await;

    let mut requests = Vec::new();
    for conv in 0..9u64 {
        let ns = conv % 3;
        let mut history = tokens(100 + ns, 70);
        for turn in 0..3u64 {
            history.extend(tokens(conv * 10 + turn, 25 + (conv as usize * 7) % 30));
            let mut r = Request::new(history.clone(), 3);
            r.namespace = ns;
            r.stop.ignore_eos = true;
            requests.push(r);
        }
    }
    let mut pending = requests.into_iter();
    let mut running = 0;
    loop {
        while running < 4 {
            let Some(r) = pending.next() else { break };
            engine.add_request(r).unwrap();
            running += 1;
        }
        if running == 0 {
            break;
        }
        let (events, _) = engine.step().unwrap();
        running -= events
            .iter()
            .filter(|e| matches!(e, Event::Finished { .. }))
            .count();
        publisher.publish(&engine);
    }
    publisher.publish(&engine);

    let live = drain_live(&mut sub, Duration::from_millis(500)).await;
    assert!(live.len() > 20, "{} live batches", live.len());
    for w in live.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "a gap in the live stream");
    }
    let replay_endpoint = publisher.replay_endpoint.clone().unwrap();
    let replayed = replay(&replay_endpoint, 0).await;
    assert_eq!(replayed[0].0, 0);
    let by_seq: HashMap<u64, &Vec<u8>> = replayed.iter().map(|(s, p)| (*s, p)).collect();
    for (seq, payload) in &live {
        assert_eq!(
            by_seq[seq], payload,
            "replay of {seq} differs from the live batch"
        );
    }
    // A subscriber that joined late: what it missed from replay, the rest live.
    let mut view = View::default();
    for (_, payload) in replayed.iter().filter(|(s, _)| *s < live[0].0) {
        view.apply_batch(payload);
    }
    for (_, payload) in &live {
        view.apply_batch(payload);
    }
    assert!(view.removed > 20, "the workload evicted: {view:?}");
    let want = engine_view(&engine);
    assert!(want.len() > 10, "{} pages cached", want.len());
    assert_eq!(view.blocks, want, "the rebuilt view differs from the cache");
    // Pages of all three namespaces, each tagged with its own.
    for ns in 0..3 {
        let key = (ns != 0).then(|| namespace_key(ns));
        assert!(view.blocks.values().any(|b| b.2 == key), "namespace {ns}");
    }
    // A replay from the middle starts there.
    let mid = live[live.len() / 2].0;
    let tail = replay(&replay_endpoint, mid).await;
    assert_eq!(tail.first().map(|t| t.0), Some(mid));
    assert_eq!(tail.len() as u64, live.last().unwrap().0 - mid + 1);
}

/// Through the HTTP server: a completion's prompt shows up as stored pages of exactly its
/// tokens, and the stream opens with AllBlocksCleared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_publishes_what_a_request_caches() {
    use axum::body::Body;
    use tower::ServiceExt;
    let (engine, template) = engine(4096, PrefixCacheMode::Radix);
    let publisher = publisher();
    let (endpoint, replay_endpoint) = (
        publisher.endpoint.clone(),
        publisher.replay_endpoint.clone().unwrap(),
    );
    let config = arbor_server::ServerConfig::new("m");
    let state =
        arbor_server::AppState::with_kv_events(engine, template, &config, publisher).unwrap();
    let app = arbor_server::router(state.clone());
    let mut sub = subscribe(&endpoint).await;

    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(8);
    let body = serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 2}).to_string();
    let req = axum::http::Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);

    let live = drain_live(&mut sub, Duration::from_millis(500)).await;
    let all = replay(&replay_endpoint, 0).await;
    assert!(!live.is_empty());
    let mut view = View::default();
    let first = rmpv::decode::read_value(&mut &all[0].1[..]).unwrap();
    assert_eq!(first[1][0][0].as_str(), Some("AllBlocksCleared"));
    for (_, payload) in &all {
        view.apply_batch(payload);
    }
    let prompt_ids = state.tokenizer.encode(&prompt, true).unwrap();
    let whole = prompt_ids.len() / PAGE;
    assert!(whole >= 4, "{} prompt tokens", prompt_ids.len());
    // Follow the chain from the root: the first `whole` pages are the prompt's.
    let mut parent = None;
    for page in prompt_ids.chunks_exact(PAGE) {
        let want: Vec<u64> = page.iter().map(|&t| t as u64).collect();
        let (&h, _) = view
            .blocks
            .iter()
            .find(|(_, b)| b.0 == parent && b.1 == want)
            .expect("the prompt's page is stored under its predecessor");
        parent = Some(h);
    }
}

/// The block cache publishes its own blocks, so its pages must be its blocks.
#[test]
fn block_mode_needs_its_block_size() {
    let (engine, _) = engine(256, PrefixCacheMode::Blocks);
    let err = engine.enable_kv_events(32).unwrap_err().to_string();
    assert!(err.contains("16") && err.contains("32"), "{err}");
    engine.enable_kv_events(16).unwrap();
}

#[test]
fn only_tcp_endpoints_are_accepted() {
    let err = KvEventPublisher::start(&KvEventsConfig::new("ipc:///tmp/x"))
        .err()
        .unwrap();
    assert!(err.contains("tcp://"), "{err}");
    // A port in use is an error at start, not a silent publisher.
    let first = publisher();
    let err = KvEventPublisher::start(&KvEventsConfig::new(first.endpoint.clone()))
        .err()
        .unwrap();
    assert!(err.contains("binding"), "{err}");
}
