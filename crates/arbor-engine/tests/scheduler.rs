//! The engine above the seam, on the fake runner (no model files, milliseconds): scheduling,
//! chunked prefill, preemption, cancellation, prefix sharing and fault handling keep every
//! output exactly what the request gives alone, and never lose or leak a KV slot.
//!
//! The fake model's next token depends on every (token, position) its slot list holds, so a
//! wrong slot, a stale cache match or a slot reused while in use changes an output; references
//! are each request run alone, with no cache, on a fresh engine.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arbor_engine::fake::{self, FakeControls, FakeModel, FAKE_EOS};
use arbor_engine::{
    Engine, EngineConfig, Event, FaultInjector, FaultSite, FinishReason, PrefixCacheMode, Request,
    RequestId, SamplingParams, StopConditions,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod common;
use common::Traffic;

fn engine(kv_slots: usize, config: EngineConfig) -> (Engine, Arc<FakeControls>) {
    let (runner, tokenizer, controls) = fake::runner(FakeModel {
        kv_slots,
        ..Default::default()
    });
    let engine = Engine::new(Box::new(runner), tokenizer, config).unwrap();
    (engine, controls)
}

fn config(mode: PrefixCacheMode, max_batch_tokens: usize, max_running: usize) -> EngineConfig {
    EngineConfig {
        prefix_cache: mode,
        max_batch_tokens,
        max_running,
        ..Default::default()
    }
}

/// A request with seeded sampling (or greedy), so that its tokens are reproducible alone.
fn request(prompt: Vec<u32>, max_tokens: usize, seed: Option<u64>) -> Request {
    let mut r = Request::new(prompt, max_tokens);
    if let Some(seed) = seed {
        r.sampling = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            frequency_penalty: 0.2,
            seed: Some(seed),
            ..Default::default()
        };
    }
    r.stop.min_tokens = 2;
    r
}

use common::Outcome;

/// Every KV slot is in exactly one place: free, cached (evictable) or held by a request.
fn assert_conserved(e: &Engine) {
    let u = e.slot_usage();
    assert_eq!(u.free + u.cached + u.held_by_requests, u.total, "{u:?}");
}

/// Steps until nothing is left, checking slot conservation after every step; the outcome of
/// each request by id.
fn drain(e: &mut Engine) -> HashMap<RequestId, Outcome> {
    let mut tokens: HashMap<RequestId, Vec<u32>> = HashMap::new();
    let mut done = HashMap::new();
    let mut steps = 0;
    while e.has_work() {
        steps += 1;
        assert!(steps < 100_000, "the engine stopped making progress");
        let (events, _) = e.step().unwrap();
        assert_conserved(e);
        collect(events, &mut tokens, &mut done);
    }
    done
}

fn collect(
    events: Vec<Event>,
    tokens: &mut HashMap<RequestId, Vec<u32>>,
    done: &mut HashMap<RequestId, Outcome>,
) {
    for ev in events {
        match ev {
            Event::Token { id, token, .. } => tokens.entry(id).or_default().push(token),
            Event::Finished { id, reason, .. } => {
                done.insert(id, (tokens.remove(&id).unwrap_or_default(), reason));
            }
        }
    }
}

/// The request alone on a fresh engine without a prefix cache.
fn alone(req: &Request) -> Outcome {
    let (mut e, _) = engine(8192, config(PrefixCacheMode::Off, 4096, 1));
    let id = e.add_request(req.clone()).unwrap();
    drain(&mut e).remove(&id).unwrap()
}

/// Conversations: prompts that share long prefixes (a system prompt, earlier turns), as the
/// radix cache sees them in production.
fn conversation_prompts(rng: &mut StdRng, n: usize) -> Vec<Vec<u32>> {
    let system: Vec<u32> = (0..120).map(|_| rng.random_range(10..128)).collect();
    let mut prompts: Vec<Vec<u32>> = Vec::new();
    for i in 0..n {
        let mut p = if i > 0 && rng.random_bool(0.5) {
            // A later turn: an earlier prompt plus more.
            prompts[rng.random_range(0..i)].clone()
        } else {
            system.clone()
        };
        let extra = rng.random_range(1..80);
        p.extend((0..extra).map(|_| rng.random_range(10..128)));
        prompts.push(p);
    }
    prompts
}

#[test]
fn batched_chunked_and_cached_outputs_equal_each_request_alone() {
    let mut rng = StdRng::seed_from_u64(11);
    let prompts = conversation_prompts(&mut rng, 16);
    let reqs: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| request(p.clone(), 5 + i % 20, (i % 3 != 0).then_some(i as u64)))
        .collect();
    let want: Vec<Outcome> = reqs.iter().map(alone).collect();
    assert!(want.iter().any(|w| w.0.len() > 5), "outputs of some length");
    for mode in [
        PrefixCacheMode::Radix,
        PrefixCacheMode::Blocks,
        PrefixCacheMode::Off,
    ] {
        for max_batch_tokens in [7, 64, 4096] {
            let (mut e, controls) = engine(8192, config(mode, max_batch_tokens, 64));
            let ids: Vec<RequestId> = reqs
                .iter()
                .map(|r| e.add_request(r.clone()).unwrap())
                .collect();
            let mut got = drain(&mut e);
            for (i, id) in ids.iter().enumerate() {
                assert_eq!(
                    got.remove(id).unwrap(),
                    want[i],
                    "request {i}, {mode:?}, {max_batch_tokens} tokens per step"
                );
            }
            assert!(controls.widest_batch.load(Ordering::Relaxed) > 1);
            let u = e.slot_usage();
            assert_eq!(u.held_by_requests, 0, "{u:?}");
        }
    }
}

#[test]
fn preemption_under_a_small_pool_keeps_outputs_exact() {
    let mut rng = StdRng::seed_from_u64(12);
    let prompts = conversation_prompts(&mut rng, 12);
    let reqs: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| request(p.clone(), 40, Some(100 + i as u64)))
        .collect();
    let want: Vec<Outcome> = reqs.iter().map(alone).collect();
    // Room for about two requests at a time: the rest wait or are preempted and resumed.
    let longest = reqs.iter().map(|r| r.prompt.len() + 40).max().unwrap();
    let (mut e, _) = engine(longest + 40, config(PrefixCacheMode::Radix, 64, 64));
    let ids: Vec<RequestId> = reqs
        .iter()
        .map(|r| e.add_request(r.clone()).unwrap())
        .collect();
    let mut preempted = 0;
    let mut tokens = HashMap::new();
    let mut got = HashMap::new();
    while e.has_work() {
        let (events, stats) = e.step().unwrap();
        preempted += stats.preempted;
        assert_conserved(&e);
        collect(events, &mut tokens, &mut got);
    }
    assert!(preempted > 0, "the pool was meant to be too small");
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(got[id], want[i], "request {i}");
    }
}

#[test]
fn a_shared_prompt_arriving_together_is_computed_once() {
    let prompt: Vec<u32> = (0..300).map(|i| 10 + (i * 7 % 100) as u32).collect();
    let (mut e, controls) = engine(8192, config(PrefixCacheMode::Radix, 64, 64));
    for i in 0..8 {
        e.add_request(request(prompt.clone(), 4, Some(i))).unwrap();
    }
    let got = drain(&mut e);
    assert_eq!(got.len(), 8);
    // One prefill of the prompt, then each request's own last prompt token and decodes.
    let computed = controls.tokens_computed.load(Ordering::Relaxed) as usize;
    assert!(
        computed < prompt.len() + 8 * 8,
        "{computed} tokens computed for 8 x {} prompt tokens",
        prompt.len()
    );
}

#[test]
fn cancelling_at_any_point_frees_everything_and_spares_the_others() {
    let mut rng = StdRng::seed_from_u64(13);
    let prompts = conversation_prompts(&mut rng, 10);
    let reqs: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| request(p.clone(), 30, Some(i as u64)))
        .collect();
    let want: Vec<Outcome> = reqs.iter().map(alone).collect();
    for cancel_at_step in [0, 1, 3, 9, 25] {
        let (mut e, _) = engine(4096, config(PrefixCacheMode::Radix, 48, 64));
        let ids: Vec<RequestId> = reqs
            .iter()
            .map(|r| e.add_request(r.clone()).unwrap())
            .collect();
        let cancelled: Vec<RequestId> = ids.iter().copied().step_by(3).collect();
        let mut tokens = HashMap::new();
        let mut got = HashMap::new();
        let mut step = 0;
        while e.has_work() {
            if step == cancel_at_step {
                for &id in &cancelled {
                    if let Some(ev) = e.cancel(id) {
                        collect(vec![ev], &mut tokens, &mut got);
                    }
                }
                assert_conserved(&e);
            }
            let (events, _) = e.step().unwrap();
            assert_conserved(&e);
            collect(events, &mut tokens, &mut got);
            step += 1;
        }
        for (i, id) in ids.iter().enumerate() {
            if cancelled.contains(id) && got[id].1 == FinishReason::Cancelled {
                // Whatever it produced before the cancel is the start of its own output.
                assert!(want[i].0.starts_with(&got[id].0), "request {i}");
            } else {
                assert_eq!(
                    got[id], want[i],
                    "request {i}, cancel at step {cancel_at_step}"
                );
            }
        }
        let u = e.slot_usage();
        assert_eq!((u.held_by_requests, u.free + u.cached), (0, u.total));
    }
}

#[test]
fn a_runner_failure_fails_the_step_and_leaves_state_consistent() {
    let reqs: Vec<Request> = (0..4)
        .map(|i| request((10 + i..60 + i).collect(), 12, Some(i as u64)))
        .collect();
    let want: Vec<Outcome> = reqs.iter().map(alone).collect();
    let (mut e, controls) = engine(4096, config(PrefixCacheMode::Radix, 32, 64));
    let ids: Vec<RequestId> = reqs
        .iter()
        .map(|r| e.add_request(r.clone()).unwrap())
        .collect();
    let mut tokens = HashMap::new();
    let mut got = HashMap::new();
    for step in 0.. {
        if !e.has_work() {
            break;
        }
        if step == 3 || step == 6 {
            controls.fail_next_forward.store(true, Ordering::SeqCst);
            let held = e.slot_usage();
            let err = e.step().unwrap_err().to_string();
            assert!(err.contains("injected device fault"), "{err}");
            // The failed step's slots were given back: the state is as before it.
            assert_eq!(e.slot_usage(), held);
            continue;
        }
        let (events, _) = e.step().unwrap();
        collect(events, &mut tokens, &mut got);
    }
    // The caller may retry (the server fails instead): the outputs are the requests' own.
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(got[id], want[i], "request {i}");
    }
}

#[test]
fn a_fault_in_one_request_fails_it_alone() {
    const POISON_SAMPLE: u32 = 127;
    const POISON_DETOKENIZE: u32 = 126;
    let faults = FaultInjector(Arc::new(|site| match site {
        FaultSite::Sample { prompt } if prompt.contains(&POISON_SAMPLE) => {
            panic!("poisoned sample")
        }
        FaultSite::Detokenize { prompt } if prompt.contains(&POISON_DETOKENIZE) => {
            panic!("poisoned detokenize")
        }
        _ => {}
    }));
    let healthy: Vec<Request> = (0..4)
        .map(|i| request((10 + i..50 + i).collect(), 10, Some(i as u64)))
        .collect();
    let want: Vec<Outcome> = healthy.iter().map(alone).collect();
    let (mut e, _) = engine(
        4096,
        EngineConfig {
            fault_injector: Some(faults),
            ..config(PrefixCacheMode::Radix, 64, 64)
        },
    );
    let bad_sample = e
        .add_request(request(vec![20, 21, POISON_SAMPLE], 10, None))
        .unwrap();
    let ids: Vec<RequestId> = healthy
        .iter()
        .map(|r| e.add_request(r.clone()).unwrap())
        .collect();
    let bad_detok = e
        .add_request(request(vec![POISON_DETOKENIZE, 20], 10, None))
        .unwrap();
    let mut got = drain(&mut e);
    for bad in [bad_sample, bad_detok] {
        assert_eq!(got.remove(&bad).unwrap().1, FinishReason::Error);
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(got[id], want[i], "request {i}");
    }
}

#[test]
fn min_tokens_holds_back_the_stop_token_and_eos_ends_a_request() {
    // Greedy over many prompts: some reach the end-of-sequence token early.
    let mut stopped = 0;
    for start in 10..60u32 {
        let prompt: Vec<u32> = (start..start + 5).collect();
        let free = alone(&Request::new(prompt.clone(), 64));
        if free.1 == FinishReason::Stop {
            assert_eq!(*free.0.last().unwrap(), FAKE_EOS);
            stopped += 1;
            // With min_tokens beyond that point, the stop token does not come before it.
            let mut held = Request::new(prompt, 64);
            held.stop = StopConditions {
                max_tokens: free.0.len() + 10,
                min_tokens: free.0.len() + 3,
                ..Default::default()
            };
            let (tokens, why) = alone(&held);
            assert!(
                tokens.len() >= free.0.len() + 3,
                "{tokens:?} {why:?} {free:?}"
            );
            assert!(
                !tokens[..free.0.len() + 3].contains(&FAKE_EOS),
                "{tokens:?}"
            );
        }
    }
    assert!(stopped > 0, "no prompt reached the end-of-sequence token");
}

/// Requests arrive, run, are cancelled and finish at random, on a pool small enough to evict
/// and preempt: after every step each slot is in exactly one place, and every request that was
/// not cancelled gives exactly its own output.
#[test]
fn random_arrivals_and_cancels_never_lose_a_slot_or_change_an_output() {
    for seed in 0..4u64 {
        let mut rng = StdRng::seed_from_u64(1000 + seed);
        let prompts = conversation_prompts(&mut rng, 24);
        let reqs: Vec<Request> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                request(
                    p.clone(),
                    rng.random_range(1..30),
                    Some(seed * 100 + i as u64),
                )
            })
            .collect();
        let want: Vec<Outcome> = reqs.iter().map(alone).collect();
        let longest = reqs.iter().map(|r| r.prompt.len() + 30).max().unwrap();
        let (mut e, _) = engine(
            longest * 2,
            config(
                PrefixCacheMode::Radix,
                rng.random_range(8..128),
                rng.random_range(2..12),
            ),
        );
        let mut traffic = Traffic::default();
        while traffic.next < reqs.len() || e.has_work() {
            traffic.before_step(&mut rng, &mut e, &reqs, &prompts, 40);
            let (events, _) = e.step().unwrap();
            assert_conserved(&e);
            traffic.take(events);
        }
        traffic.check(&want, &format!("seed {seed}"));
        let u = e.slot_usage();
        assert_eq!((u.held_by_requests, u.free + u.cached), (0, u.total));
    }
}

/// A reply's tokens as the engine cached them, then the same history as a chat template
/// renders it in the next request (the reasoning dropped, a separator added): the warm-up
/// computes that history after the reply, and the next turn computes only its new message.
#[test]
fn a_history_warm_up_leaves_the_next_turn_only_its_new_message() {
    let system: Vec<u32> = (0..200).map(|i| 10 + (i * 13 % 100) as u32).collect();
    let user: Vec<u32> = (0..30).map(|i| 20 + (i * 3 % 50) as u32).collect();
    let first: Vec<u32> = [system.clone(), user.clone()].concat();
    let (mut e, controls) = engine(8192, config(PrefixCacheMode::Radix, 64, 8));
    e.add_request(request(first.clone(), 40, Some(1))).unwrap();
    let reply = drain(&mut e).into_values().next().unwrap().0;
    // The template renders only the reply's last 10 tokens (its answer) and adds a separator.
    let mut history = first.clone();
    history.extend_from_slice(&reply[reply.len() - 10..]);
    history.push(7);
    let next_message: Vec<u32> = (0..25).map(|i| 30 + (i * 11 % 60) as u32).collect();
    let second: Vec<u32> = [history.clone(), next_message.clone()].concat();

    // Without a warm-up the answer and the separator are recomputed with the new message.
    let want = alone(&request(second.clone(), 12, Some(2)));
    let before = controls.tokens_computed.load(Ordering::Relaxed) as usize;
    e.warm_prefix(0, history.clone()).unwrap();
    assert_eq!(e.warming_len(), 1);
    let mut warmed = 0;
    while e.has_work() {
        let (events, stats) = e.step().unwrap();
        assert!(events.is_empty(), "a warm-up produces no events");
        assert_eq!(stats.warm_tokens, stats.prefill_tokens);
        warmed += stats.warm_tokens;
        assert_conserved(&e);
    }
    assert_eq!(warmed, 11, "the answer as rendered and the separator");
    assert_eq!(
        controls.tokens_computed.load(Ordering::Relaxed) as usize - before,
        11
    );
    let before = controls.tokens_computed.load(Ordering::Relaxed) as usize;
    let id = e.add_request(request(second.clone(), 12, Some(2))).unwrap();
    let mut usage = None;
    let mut tokens = Vec::new();
    while e.has_work() {
        for ev in e.step().unwrap().0 {
            match ev {
                Event::Token { token, .. } => tokens.push(token),
                Event::Finished {
                    id: done,
                    usage: u,
                    reason,
                    ..
                } => {
                    assert_eq!(done, id);
                    usage = Some(u);
                    assert_eq!((tokens.clone(), reason), want);
                }
            }
        }
    }
    let usage = usage.unwrap();
    assert_eq!(usage.cached_tokens, history.len());
    // The new message's tokens, then one decode per generated token but the last.
    let computed = controls.tokens_computed.load(Ordering::Relaxed) as usize - before;
    assert_eq!(computed, next_message.len() + usage.completion_tokens - 1);

    // A warm-up of what is cached already, or of nothing, computes nothing.
    e.warm_prefix(0, history.clone()).unwrap();
    e.warm_prefix(0, Vec::new()).unwrap();
    let before = controls.tokens_computed.load(Ordering::Relaxed);
    drain(&mut e);
    assert_eq!(controls.tokens_computed.load(Ordering::Relaxed), before);
    assert_eq!(e.warming_len(), 0);
}

/// A warm-up runs only on capacity no request wants: a request that needs the running slot or
/// the memory a warm-up holds takes it at once, its output unchanged, and the warm-up resumes
/// after it from what it had cached.
#[test]
fn warm_ups_give_way_to_requests() {
    let long: Vec<u32> = (0..1500).map(|i| 10 + (i * 7 % 110) as u32).collect();
    let other: Vec<u32> = (0..200).map(|i| 15 + (i * 5 % 90) as u32).collect();
    for (slots, max_running) in [(8192, 1), (1700, 4)] {
        let (mut e, _) = engine(slots, config(PrefixCacheMode::Radix, 64, max_running));
        e.warm_prefix(3, long.clone()).unwrap();
        for _ in 0..5 {
            let (_, stats) = e.step().unwrap();
            assert_eq!(stats.warm_tokens, 64);
        }
        let req = request(other.clone(), 30, Some(9));
        let want = alone(&req);
        let id = e.add_request(req).unwrap();
        let mut tokens = HashMap::new();
        let mut got = HashMap::new();
        let mut waited = 0;
        while !got.contains_key(&id) {
            let (events, stats) = e.step().unwrap();
            assert_conserved(&e);
            assert_eq!(stats.warm_tokens, 0, "the warm-up waits for the request");
            waited += 1;
            assert!(waited < 200);
            collect(events, &mut tokens, &mut got);
        }
        assert_eq!(got[&id], want);
        // The warm-up then finishes from where it was, and a request on its prefix hits.
        drain(&mut e);
        let cached_for = |e: &mut Engine, namespace| {
            let mut next = long.clone();
            next.extend([40, 41, 42]);
            let mut r = request(next, 2, None);
            r.namespace = namespace;
            let id = e.add_request(r).unwrap();
            let mut usage = None;
            while e.has_work() {
                for ev in e.step().unwrap().0 {
                    if let Event::Finished {
                        id: done, usage: u, ..
                    } = ev
                    {
                        assert_eq!(done, id);
                        usage = Some(u);
                    }
                }
            }
            usage.unwrap().cached_tokens
        };
        // Namespace 3 was warmed, this request is in 0: nothing shared across namespaces.
        assert_eq!(cached_for(&mut e, 0), 0, "slots {slots}");
        let cached = cached_for(&mut e, 3);
        if slots > 4000 {
            assert_eq!(cached, long.len(), "slots {slots}");
        } else {
            // The small pool evicted some of it for the namespace-0 request.
            assert!(cached > 0, "slots {slots}");
        }
    }
}

use arbor_model::runner::{ModelRunner, SeqId, SequenceSampling, StepOutput, StepRow};
use arbor_model::{LogitsWanted, ModelConfig, Result as ModelResult};

/// A fake runner that takes as long as a made-up device would: 0.5 ms a step plus 10 us per
/// token computed, so that the engine's step-time model has something to learn.
struct TimedRunner(Box<dyn ModelRunner>);

impl TimedRunner {
    fn seconds(rows: &[StepRow]) -> f64 {
        let tokens: usize = rows.iter().map(|r| r.tokens.len()).sum();
        5e-4 + 1e-5 * tokens as f64
    }
}

impl ModelRunner for TimedRunner {
    fn config(&self) -> &ModelConfig {
        self.0.config()
    }
    fn device_name(&self) -> String {
        self.0.device_name()
    }
    fn kv_slots(&self) -> usize {
        self.0.kv_slots()
    }
    fn add_sequence(&mut self, seq: SeqId, s: SequenceSampling) {
        self.0.add_sequence(seq, s)
    }
    fn remove_sequence(&mut self, seq: SeqId) {
        self.0.remove_sequence(seq)
    }
    fn step(&mut self, rows: &[StepRow]) -> ModelResult<StepOutput> {
        std::thread::sleep(std::time::Duration::from_secs_f64(Self::seconds(rows)));
        self.0.step(rows)
    }
    fn logits_from_scratch(
        &self,
        tokens: &[u32],
        which: LogitsWanted,
    ) -> ModelResult<Vec<Vec<f32>>> {
        self.0.logits_from_scratch(tokens, which)
    }
}

#[test]
fn a_step_time_budget_cuts_long_prompts_beside_decodes_and_keeps_outputs() {
    let budget = 0.005; // 5 ms: about 450 tokens of the timed runner beside a few decodes
    let (runner, tokenizer, _) = fake::runner(FakeModel {
        kv_slots: 16_384,
        context: 8192,
        ..Default::default()
    });
    let mut e = Engine::new(
        Box::new(TimedRunner(Box::new(runner))),
        tokenizer,
        EngineConfig {
            max_step_time: Some(std::time::Duration::from_secs_f64(budget)),
            ..config(PrefixCacheMode::Radix, 4096, 32)
        },
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let mut prompt = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(10..128)).collect() };
    // Warm-up: requests arriving while others decode teach the model what prefill costs.
    let mut reqs = vec![
        request(prompt(40), 300, Some(1)),
        request(prompt(60), 300, Some(2)),
    ];
    for i in 0..6 {
        reqs.push(request(prompt(100 + 150 * i), 30, Some(10 + i as u64)));
    }
    let long = request(prompt(3000), 20, Some(99));
    let mut ids = Vec::new();
    let (mut tokens, mut done) = (HashMap::new(), HashMap::new());
    let step = |e: &mut Engine, tokens: &mut _, done: &mut _| {
        let (events, stats) = e.step().unwrap();
        assert_conserved(e);
        collect(events, tokens, done);
        stats
    };
    for r in &reqs {
        ids.push(e.add_request(r.clone()).unwrap());
        for _ in 0..4 {
            step(&mut e, &mut tokens, &mut done);
        }
    }
    // The long prompt arrives while the first two requests decode.
    let long_id = e.add_request(long.clone()).unwrap();
    ids.push(long_id);
    reqs.push(long);
    let mut chunks = Vec::new();
    while !done.contains_key(&long_id) {
        let stats = step(&mut e, &mut tokens, &mut done);
        if stats.prefill_tokens > 0 && stats.decode_tokens > 0 {
            chunks.push(stats.prefill_tokens);
        }
    }
    // Without the budget the 3,000 tokens would go in one 30 ms step; with it, in chunks
    // of about 450 (measured times include the host's own work, so a loaded machine only
    // makes chunks smaller).
    assert!(chunks.len() >= 4, "{chunks:?}");
    assert!(chunks.iter().all(|&c| c <= 1000), "{chunks:?}");
    assert!(chunks.iter().sum::<usize>() >= 3000, "{chunks:?}");
    // Many prompts at once: the budget bounds the step, not each prompt's chunk.
    for i in 0..24 {
        let r = request(prompt(300), 5, Some(200 + i));
        ids.push(e.add_request(r.clone()).unwrap());
        reqs.push(r);
    }
    let mut busiest = 0;
    while e.has_work() {
        let stats = step(&mut e, &mut tokens, &mut done);
        if stats.decode_tokens > 0 {
            busiest = busiest.max(stats.prefill_tokens);
        }
    }
    assert!(
        busiest <= 1000,
        "a step with decodes prefilled {busiest} tokens"
    );
    for (id, r) in ids.iter().zip(&reqs) {
        assert_eq!(done[id], alone(r), "request {id}");
    }
}
