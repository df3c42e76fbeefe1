//! Steps planned and launched while the previous one runs (`Overlap`): every request still
//! gives exactly the output it gives alone, no KV slot is lost, and the overlap really
//! happens (one step stays in flight across `Engine::step` calls) except while a request
//! needs its last token before its next row.
//!
//! The runner here defers each step's work to its collect, as a GPU runs a launched step
//! after the host has moved on: the host's changes between a launch and its collect (requests
//! cancelled or finished, slots freed and handed out again in the next plan) must not change
//! what the step computes. The fake model's outputs depend on every (token, position) behind
//! a sequence's slots, so a wrong slot, a stale token or a slot reused too early shows up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arbor_engine::fake::{self, FakeBackend, FakeModel};
use arbor_engine::{
    Engine, EngineConfig, FinishReason, Overlap, PrefixCacheMode, Request, RequestId,
    SamplingParams,
};
use arbor_model::runner::HostSampledRunner;
use arbor_model::{
    Launched, LogitsWanted, ModelConfig, ModelRunner, SeqId, SequenceSampling, StepOutput, StepRow,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod common;
use common::{Outcome, Traffic};

/// One row, owned: what a device keeps of a launched step.
struct OwnedRow {
    seq: SeqId,
    tokens: Vec<u32>,
    slots: Vec<u32>,
    sample: bool,
    allowed: Option<Vec<u32>>,
}

/// Counts a test reads while the engine owns the runner.
#[derive(Default)]
struct Calls {
    launches: AtomicUsize,
    collects: AtomicUsize,
}

/// The fake runner, with each launched step run only when it is collected.
struct DeferredRunner {
    inner: HostSampledRunner<FakeBackend>,
    launched: Option<Vec<OwnedRow>>,
    calls: Arc<Calls>,
}

impl ModelRunner for DeferredRunner {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn device_name(&self) -> String {
        "deferred fake".into()
    }
    fn kv_slots(&self) -> usize {
        self.inner.kv_slots()
    }
    fn add_sequence(&mut self, seq: SeqId, sampling: SequenceSampling) {
        self.inner.add_sequence(seq, sampling)
    }
    fn remove_sequence(&mut self, _seq: SeqId) {
        // Kept until the process ends: a step launched before the removal still samples the
        // sequence when it runs (as the GPU runner keeps what a launched step packed).
    }
    fn step(&mut self, rows: &[StepRow]) -> arbor_model::Result<StepOutput> {
        assert!(self.launched.is_none(), "a step ran with another in flight");
        self.inner.step(rows)
    }
    fn launch(&mut self, rows: &[StepRow]) -> arbor_model::Result<Launched> {
        assert!(
            self.launched.is_none(),
            "launched before the step in flight was collected"
        );
        self.calls.launches.fetch_add(1, Ordering::SeqCst);
        self.launched = Some(
            rows.iter()
                .map(|r| OwnedRow {
                    seq: r.seq,
                    tokens: r.tokens.to_vec(),
                    slots: r.slots.to_vec(),
                    sample: r.sample,
                    allowed: r.allowed.map(<[u32]>::to_vec),
                })
                .collect(),
        );
        Ok(Launched::Running)
    }
    fn collect(&mut self) -> arbor_model::Result<StepOutput> {
        let rows = self.launched.take().expect("collect without a launch");
        self.calls.collects.fetch_add(1, Ordering::SeqCst);
        let rows: Vec<StepRow> = rows
            .iter()
            .map(|r| StepRow {
                seq: r.seq,
                tokens: &r.tokens,
                slots: &r.slots,
                sample: r.sample,
                allowed: r.allowed.as_deref(),
            })
            .collect();
        self.inner.step(&rows)
    }
    fn overlaps(&self) -> bool {
        true
    }
    fn logits_from_scratch(
        &self,
        tokens: &[u32],
        which: LogitsWanted,
    ) -> arbor_model::Result<Vec<Vec<f32>>> {
        self.inner.logits_from_scratch(tokens, which)
    }
}

fn deferred_engine(kv_slots: usize, config: EngineConfig) -> (Engine, Arc<Calls>) {
    let (inner, tokenizer, _) = fake::runner(FakeModel {
        kv_slots,
        ..Default::default()
    });
    let calls = Arc::new(Calls::default());
    let runner = DeferredRunner {
        inner,
        launched: None,
        calls: calls.clone(),
    };
    (
        Engine::new(Box::new(runner), tokenizer, config).unwrap(),
        calls,
    )
}

fn config(overlap: Overlap, max_batch_tokens: usize, max_running: usize) -> EngineConfig {
    EngineConfig {
        prefix_cache: PrefixCacheMode::Radix,
        max_batch_tokens,
        max_running,
        overlap,
        ..Default::default()
    }
}

/// The request alone, steps one at a time, no cache, on the plain fake runner.
fn alone(req: &Request) -> Outcome {
    let (runner, tokenizer, _) = fake::runner(FakeModel::default());
    let cfg = EngineConfig {
        prefix_cache: PrefixCacheMode::Off,
        overlap: Overlap::Off,
        ..Default::default()
    };
    let mut e = Engine::new(Box::new(runner), tokenizer, cfg).unwrap();
    let id = e.add_request(req.clone()).unwrap();
    let mut t = Traffic::default();
    while e.has_work() {
        t.take(e.step().unwrap().0);
    }
    t.done.remove(&id).unwrap()
}

/// A request of every kind that meets the overlap: greedy, seeded draws, stop strings and
/// extra stop tokens (which end requests while their next step is in flight), and now and
/// then one with a penalty (which turns the overlap off while it runs).
fn random_request(rng: &mut StdRng, prompt: Vec<u32>, i: u64) -> Request {
    let mut r = Request::new(prompt, rng.random_range(1..40));
    r.sampling = match rng.random_range(0..20) {
        0..=7 => SamplingParams::greedy(),
        8..=18 => SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            seed: Some(i),
            ..Default::default()
        },
        _ => SamplingParams {
            temperature: 0.9,
            presence_penalty: 0.5,
            seed: Some(i),
            ..Default::default()
        },
    };
    if rng.random_bool(0.5) {
        r.stop.stop_strings = vec!["Q".to_string(), "zz".to_string()].into();
    }
    if rng.random_bool(0.3) {
        r.stop.stop_token_ids = vec![rng.random_range(10..128)].into();
    }
    r
}

/// Random arrivals, cancellations and warm-ups on a pool small enough to preempt: with the
/// overlap on, each step is launched before the previous one's tokens are processed, and
/// every request that was not cancelled still gives exactly its own output.
#[test]
fn overlapped_steps_keep_every_output_and_every_slot() {
    let mut total_preempted = 0;
    for seed in 0..8u64 {
        let mut rng = StdRng::seed_from_u64(2000 + seed);
        let system: Vec<u32> = (0..100).map(|_| rng.random_range(10..128)).collect();
        let reqs: Vec<Request> = (0..24)
            .map(|i| {
                let mut p = system[..rng.random_range(1..system.len())].to_vec();
                p.extend((0..rng.random_range(1..60)).map(|_| rng.random_range(10..128)));
                random_request(&mut rng, p, seed * 100 + i)
            })
            .collect();
        let want: Vec<Outcome> = reqs.iter().map(alone).collect();
        let longest = reqs.iter().map(|r| r.prompt.len() + 40).max().unwrap();
        let (mut e, calls) = deferred_engine(
            longest + rng.random_range(0..longest),
            config(
                Overlap::On,
                rng.random_range(8..128),
                rng.random_range(2..12),
            ),
        );
        let mut traffic = Traffic::default();
        let (mut overlapped_calls, mut steps) = (0, 0);
        let prompts: Vec<Vec<u32>> = reqs.iter().map(|r| r.prompt.clone()).collect();
        while traffic.next < reqs.len() || e.has_work() {
            steps += 1;
            assert!(
                steps < 100_000,
                "seed {seed}: the engine stopped making progress"
            );
            traffic.before_step(&mut rng, &mut e, &reqs, &prompts, 30);
            let (events, stats) = e.step().unwrap();
            total_preempted += stats.preempted;
            traffic.take(events);
            let (l, c) = (
                calls.launches.load(Ordering::SeqCst),
                calls.collects.load(Ordering::SeqCst),
            );
            assert!(l == c || l == c + 1, "{l} launches, {c} collects");
            overlapped_calls += usize::from(l == c + 1);
            let u = e.slot_usage();
            assert_eq!(u.free + u.cached + u.held_by_requests, u.total, "{u:?}");
        }
        traffic.check(&want, &format!("seed {seed}"));
        let stopped = want.iter().filter(|w| w.1 == FinishReason::Stop).count();
        assert!(stopped > 0, "seed {seed}: no request stopped early");
        assert!(
            overlapped_calls > 20,
            "seed {seed}: a step was in flight after only {overlapped_calls} calls"
        );
        let u = e.slot_usage();
        assert_eq!((u.held_by_requests, u.free + u.cached), (0, u.total));
    }
    assert!(total_preempted > 0, "no seed ran the pool out");
}

/// One step is in flight between calls exactly while the overlap may run: on (auto, over a
/// runner that overlaps) for sampling without penalties, off while a request with a penalty
/// runs and with `Overlap::Off`; the tokens are the same every way.
#[test]
fn the_overlap_runs_only_where_it_may() {
    let prompt: Vec<u32> = (10..60).collect();
    let plain = Request::new(prompt.clone(), 12);
    let mut penalized = plain.clone();
    penalized.sampling.frequency_penalty = 0.5;
    for (overlap, req, expect_in_flight) in [
        (Overlap::Auto, &plain, true),
        (Overlap::Off, &plain, false),
        (Overlap::Auto, &penalized, false),
    ] {
        let (mut e, calls) = deferred_engine(4096, config(overlap, 512, 8));
        let id = e.add_request(req.clone()).unwrap();
        let mut t = Traffic::default();
        let mut in_flight_after = Vec::new();
        while e.has_work() {
            t.take(e.step().unwrap().0);
            let l = calls.launches.load(Ordering::SeqCst);
            let c = calls.collects.load(Ordering::SeqCst);
            in_flight_after.push(l - c);
        }
        assert_eq!(t.done.remove(&id).unwrap(), alone(req), "{overlap:?}");
        // Every call but the last leaves a step running with the overlap; none without.
        let running = in_flight_after.iter().filter(|&&n| n == 1).count();
        if expect_in_flight {
            assert_eq!(running, in_flight_after.len() - 1, "{in_flight_after:?}");
        } else {
            assert_eq!(running, 0, "{overlap:?}: {in_flight_after:?}");
        }
    }
}

/// A pool that runs out while every request is decoding, each with a token in flight: the
/// engine preempts only requests whose token is back (a preempted request's token must not
/// arrive while it waits), and every output is still its own.
#[test]
fn memory_running_out_mid_flight_preempts_without_losing_a_token() {
    let mut rng = StdRng::seed_from_u64(7);
    let reqs: Vec<Request> = (0..4)
        .map(|i| {
            let prompt = (0..20).map(|_| rng.random_range(10..128)).collect();
            let mut r = Request::new(prompt, 40);
            r.stop.ignore_eos = true;
            r.sampling = SamplingParams {
                temperature: 0.9,
                seed: Some(i),
                ..Default::default()
            };
            r
        })
        .collect();
    let want: Vec<Outcome> = reqs.iter().map(alone).collect();
    // Room for every prompt and a little more: decoding alone exhausts it.
    let (mut e, calls) = deferred_engine(4 * 20 + 50, config(Overlap::On, 512, 4));
    let ids: Vec<RequestId> = reqs
        .iter()
        .map(|r| e.add_request(r.clone()).unwrap())
        .collect();
    let mut t = Traffic::default();
    let (mut preempted, mut steps) = (0, 0);
    while e.has_work() {
        steps += 1;
        assert!(steps < 10_000, "the engine stopped making progress");
        let (events, stats) = e.step().unwrap();
        preempted += stats.preempted;
        t.take(events);
        let u = e.slot_usage();
        assert_eq!(u.free + u.cached + u.held_by_requests, u.total, "{u:?}");
    }
    assert!(preempted > 0, "the pool never ran out");
    assert!(calls.launches.load(Ordering::SeqCst) > 40);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(t.done[id], want[i], "request {i}");
    }
}
