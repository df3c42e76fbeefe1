//! The engine thread: owns the [`Engine`] (model, KV pool, prefix cache) and runs its step loop;
//! request handlers talk to it through channels.
//!
//! ```text
//!  handlers (tokio tasks)            engine thread
//!  ---------------------            -------------
//!  submit(requests) --Command::Submit--> add to engine, remember each request's sink
//!          <-------- oneshot reply ----- ids, or why not (queue full, invalid, draining)
//!  events rx <------ Tagged{index, ev} -- step(): tokens, finished requests
//!  (drop rx) ........................... sink closed -> cancel: slots freed before next step
//! ```
//!
//! A client that disconnects drops its receiver; the loop checks every sink before each step
//! and cancels the requests whose receiver is gone, so their KV returns to the pool at once.
//!
//! Faults: a request whose own processing fails (sampling, detokenizing, a stop check) is
//! finished with an error by the engine and the others go on. A failure of the engine itself
//! (a step that returns an error or panics: a forward pass, a lost device) is fatal: the
//! engine's state can no longer be trusted, so every request in flight ends with an error
//! event, [`EngineHandle::failure`] resolves (the server stops and the process exits non-zero
//! for its supervisor to restart it), and /health answers 503 from that moment.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use arbor_engine::{Engine, EngineError, Event, FinishReason, Request, RequestId, Timing, Usage};
use tokio::sync::{mpsc as tmpsc, oneshot, Notify};

use crate::kv_events::KvEventPublisher;
use crate::metrics::{Finished, Metrics, Outcome};

/// An engine event for one choice of a multi-choice request.
#[derive(Debug)]
pub struct Tagged {
    /// The choice (or, for /v1/completions with several prompts, prompt x n + choice).
    pub index: usize,
    pub event: Event,
}

#[derive(Debug)]
pub enum SubmitError {
    /// The engine refused a request (bad parameters, too long for the pool or the context).
    Invalid(EngineError),
    /// The queue is at its bound.
    QueueFull { waiting: usize, limit: usize },
    /// The server is shutting down.
    Draining,
    /// The engine failed (the reason); the process is about to exit.
    EngineFailed(String),
}

/// Whether the engine thread is alive, shared with the handlers: set once, when it fails.
#[derive(Default)]
struct Health {
    failed: OnceLock<String>,
    changed: Notify,
}

impl Health {
    fn fail(&self, why: String) {
        let _ = self.failed.set(why);
        self.changed.notify_waiters();
    }
}

enum Command {
    Submit {
        requests: Vec<Request>,
        sink: tmpsc::UnboundedSender<Tagged>,
        reply: oneshot::Sender<Result<Vec<RequestId>, SubmitError>>,
    },
    /// Compute prefixes into the cache when idle (a conversation's next turn); one prepared
    /// warm-up in the metrics ends.
    Warm {
        namespace: u64,
        prefixes: Vec<Vec<u32>>,
    },
    /// Cancel everything in flight (shutdown deadline).
    CancelAll,
    Stop,
}

/// Where a running request's events go.
struct Route {
    index: usize,
    sink: tmpsc::UnboundedSender<Tagged>,
    last_token_at: Option<Instant>,
}

/// The handlers' side of the engine thread.
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    draining: Arc<AtomicBool>,
    health: Arc<Health>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl EngineHandle {
    /// Starts the engine thread. `max_queue` bounds the requests waiting for admission.
    /// `kv_events` publishes the prefix cache's changes after every loop turn.
    pub fn spawn(
        engine: Engine,
        max_queue: usize,
        metrics: Arc<Metrics>,
        kv_events: Option<KvEventPublisher>,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let draining = Arc::new(AtomicBool::new(false));
        let health = Arc::new(Health::default());
        let flag = draining.clone();
        let loop_health = health.clone();
        let thread = std::thread::Builder::new()
            .name("arbor-engine".into())
            .spawn(move || {
                EngineLoop {
                    engine,
                    routes: HashMap::new(),
                    metrics,
                    max_queue,
                    draining: flag,
                    health: loop_health,
                    kv_events,
                }
                .run(rx)
            })
            .expect("spawning the engine thread");
        Self {
            tx,
            draining,
            health,
            thread: std::sync::Mutex::new(Some(thread)),
        }
    }

    /// Queues requests that belong together (the choices of one API call): all are accepted or
    /// none. Events arrive on the returned receiver; dropping it cancels them.
    pub async fn submit(
        &self,
        requests: Vec<Request>,
    ) -> Result<(Vec<RequestId>, tmpsc::UnboundedReceiver<Tagged>), SubmitError> {
        if let Some(why) = self.failed() {
            return Err(SubmitError::EngineFailed(why));
        }
        if self.is_draining() {
            return Err(SubmitError::Draining);
        }
        let (sink, events) = tmpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Submit {
                requests,
                sink,
                reply,
            })
            .map_err(|_| self.gone())?;
        let ids = answer.await.map_err(|_| self.gone())??;
        Ok((ids, events))
    }

    /// Why a command found no engine thread: it failed, or it was stopped.
    fn gone(&self) -> SubmitError {
        match self.failed() {
            Some(why) => SubmitError::EngineFailed(why),
            None => SubmitError::Draining,
        }
    }

    /// Why the engine failed, once it has.
    pub fn failed(&self) -> Option<String> {
        self.health.failed.get().cloned()
    }

    /// Resolves when the engine fails, with the reason.
    pub async fn failure(&self) -> String {
        loop {
            let changed = self.health.changed.notified();
            if let Some(why) = self.failed() {
                return why;
            }
            changed.await;
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Refuses new requests from now on; those in flight go on.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Queues a reply's history warm-ups (see `Engine::warm_prefix`), ending the preparation
    /// counted by `Metrics::warmup_preparing` once the engine has them; dropped while draining.
    pub fn warm(&self, metrics: &Metrics, namespace: u64, prefixes: Vec<Vec<u32>>) {
        let sent = !self.is_draining()
            && self
                .tx
                .send(Command::Warm {
                    namespace,
                    prefixes,
                })
                .is_ok();
        if !sent {
            metrics.warmup_preparing(false);
        }
    }

    /// Ends every request in flight (their streams end with finish_reason "abort").
    pub fn cancel_all(&self) {
        let _ = self.tx.send(Command::CancelAll);
    }

    /// Cancels whatever is left, stops the thread and waits for it.
    pub fn shutdown(&self) {
        self.begin_drain();
        let _ = self.tx.send(Command::Stop);
        let thread = self.thread.lock().map(|mut t| t.take()).ok().flatten();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct EngineLoop {
    engine: Engine,
    routes: HashMap<RequestId, Route>,
    metrics: Arc<Metrics>,
    max_queue: usize,
    draining: Arc<AtomicBool>,
    health: Arc<Health>,
    kv_events: Option<KvEventPublisher>,
}

impl EngineLoop {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        loop {
            // Idle: sleep until a command comes. Busy: take what is there and step.
            if !self.engine.has_work() {
                match rx.recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            let mut stop = false;
            while let Ok(cmd) = rx.try_recv() {
                if !self.handle(cmd) {
                    stop = true;
                    break;
                }
            }
            if stop {
                break;
            }
            self.cancel_disconnected();
            if self.engine.has_work() {
                // Per-request faults are caught inside the step; what gets out is the
                // engine's own failure.
                match catch_unwind(AssertUnwindSafe(|| self.engine.step())) {
                    Ok(Ok((events, stats))) => {
                        if stats.warm_tokens > 0 {
                            self.metrics.warmed(stats.warm_tokens);
                        }
                        // State first: a client that sees its request end also sees its slots
                        // back in /metrics.
                        self.publish_state();
                        self.route(events)
                    }
                    Ok(Err(e)) => return self.fail(format!("an engine step failed: {e}")),
                    Err(panic) => {
                        let what = arbor_engine::panic_message(panic.as_ref());
                        return self.fail(format!("the engine panicked: {what}"));
                    }
                }
            }
            self.publish_state();
        }
        let events = self.engine.cancel_all();
        self.route(events);
        self.publish_state();
    }

    /// The engine failed: its state cannot be trusted, so it is not touched again. Every
    /// request in flight gets an error event, the handle reports the failure (health 503, the
    /// server exits non-zero), and the thread ends.
    fn fail(mut self, why: String) {
        tracing::error!("{why}; ending every request in flight and stopping the server");
        self.health.fail(why.clone());
        let now = Instant::now();
        let ids: Vec<RequestId> = self.routes.keys().copied().collect();
        let events = ids
            .into_iter()
            .map(|id| Event::Finished {
                id,
                reason: FinishReason::Error,
                text: String::new(),
                usage: Usage::default(),
                timing: Timing {
                    queued_at: now,
                    first_token_at: None,
                    finished_at: Some(now),
                },
                error: Some(why.clone()),
            })
            .collect();
        self.route(events);
    }

    /// Returns false on `Stop`.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit {
                requests,
                sink,
                reply,
            } => {
                let result = self.submit(requests, &sink);
                let _ = reply.send(result);
                self.publish_state();
                true
            }
            Command::Warm {
                namespace,
                prefixes,
            } => {
                for tokens in prefixes {
                    if let Err(e) = self.engine.warm_prefix(namespace, tokens) {
                        tracing::debug!("history warm-up refused: {e}");
                    }
                }
                self.metrics.warmup_preparing(false);
                self.publish_state();
                true
            }
            Command::CancelAll => {
                let events = self.engine.cancel_all();
                self.publish_state();
                self.route(events);
                true
            }
            Command::Stop => false,
        }
    }

    fn submit(
        &mut self,
        requests: Vec<Request>,
        sink: &tmpsc::UnboundedSender<Tagged>,
    ) -> Result<Vec<RequestId>, SubmitError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(SubmitError::Draining);
        }
        let waiting = self.engine.waiting_len();
        if waiting + requests.len() > self.max_queue {
            return Err(SubmitError::QueueFull {
                waiting,
                limit: self.max_queue,
            });
        }
        let mut ids = Vec::with_capacity(requests.len());
        for (index, req) in requests.into_iter().enumerate() {
            match self.engine.add_request(req) {
                Ok(id) => {
                    ids.push(id);
                    self.routes.insert(
                        id,
                        Route {
                            index,
                            sink: sink.clone(),
                            last_token_at: None,
                        },
                    );
                }
                Err(e) => {
                    // All or nothing: take back the choices already queued.
                    for id in ids {
                        self.engine.cancel(id);
                        self.routes.remove(&id);
                    }
                    return Err(SubmitError::Invalid(e));
                }
            }
        }
        Ok(ids)
    }

    /// Cancels requests whose client dropped its receiver.
    fn cancel_disconnected(&mut self) {
        let gone: Vec<RequestId> = self
            .routes
            .iter()
            .filter(|(_, r)| r.sink.is_closed())
            .map(|(&id, _)| id)
            .collect();
        let mut events = Vec::new();
        for id in gone {
            events.extend(self.engine.cancel(id));
        }
        if !events.is_empty() {
            self.publish_state();
            self.route(events);
        }
    }

    fn route(&mut self, events: Vec<Event>) {
        for event in events {
            match &event {
                Event::Token { id, .. } => {
                    if let Some(route) = self.routes.get_mut(id) {
                        let now = Instant::now();
                        if let Some(prev) = route.last_token_at.replace(now) {
                            self.metrics.inter_token_latency((now - prev).as_secs_f64());
                        }
                        let _ = route.sink.send(Tagged {
                            index: route.index,
                            event,
                        });
                    }
                }
                Event::Finished {
                    id,
                    reason,
                    usage,
                    timing,
                    ..
                } => {
                    let Some(route) = self.routes.remove(id) else {
                        continue;
                    };
                    let outcome = match reason {
                        FinishReason::Stop => Outcome::Stop,
                        FinishReason::Length => Outcome::Length,
                        FinishReason::Cancelled if route.sink.is_closed() => Outcome::Cancelled,
                        FinishReason::Cancelled => Outcome::Aborted,
                        FinishReason::Error => Outcome::Error,
                    };
                    self.metrics.finished(Finished {
                        outcome,
                        prompt_tokens: usage.prompt_tokens,
                        cached_tokens: usage.cached_tokens,
                        generated_tokens: usage.completion_tokens,
                        time_to_first_token: timing
                            .first_token_at
                            .map(|_| timing.time_to_first_token()),
                        end_to_end: timing.total_time(),
                    });
                    let _ = route.sink.send(Tagged {
                        index: route.index,
                        event,
                    });
                }
            }
        }
    }

    /// Metrics and KV events: what the engine holds now.
    fn publish_state(&mut self) {
        self.metrics.set_engine_state(
            self.engine.slot_usage(),
            self.engine.waiting_len(),
            self.engine.running_len(),
            self.engine.warming_len(),
        );
        if let Some(p) = &mut self.kv_events {
            p.publish(&self.engine);
        }
    }
}
