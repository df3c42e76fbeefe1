//! Runs a workload against one target and records every request.
//!
//! Sessions start in order (at their Poisson arrival time, if any) as soon as one of the
//! `concurrency` slots is free; a session's trunk turns run one after another, each resending
//! the history with the server's actual previous reply, then its branches run concurrently.
//! A turn that fails ends its session (later turns would resend a history the server never
//! produced); the failure is recorded and the run goes on.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::client::{Client, Measured, Message, Sampling};
use crate::workload::{Session, TurnSpec, Workload};

/// One request's measurements and where it sat in the workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestRecord {
    pub target: String,
    pub repeat: usize,
    pub concurrency: usize,
    pub session: usize,
    /// `None` on the trunk, else the branch's index.
    pub branch: Option<usize>,
    /// Turn number within the trunk (1-based) or the branch.
    pub turn: usize,
    pub test: String,
    /// Seconds from the start of the run to sending this request.
    pub sent_at: f64,
    #[serde(flatten)]
    pub m: Measured,
}

/// Settings shared by every request of a run.
#[derive(Debug, Clone, Copy)]
pub struct RunSettings {
    pub temperature: f32,
    pub ignore_eos: bool,
    pub repeat: usize,
    pub concurrency: usize,
}

/// What one run of a workload against one target gave.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunOutcome {
    pub records: Vec<RequestRecord>,
    /// Wall time of the run in seconds.
    pub wall_s: f64,
}

struct Shared {
    client: Arc<Client>,
    settings: RunSettings,
    started: Instant,
    records: Mutex<Vec<RequestRecord>>,
    done: AtomicUsize,
}

impl Shared {
    async fn turn(
        &self,
        history: &mut Vec<Message>,
        spec: &TurnSpec,
        session: usize,
        branch: Option<usize>,
        turn: usize,
    ) -> bool {
        history.push(Message::new("user", spec.user.clone()));
        let sent_at = self.started.elapsed().as_secs_f64();
        let m = self
            .client
            .chat(
                history,
                Sampling {
                    max_tokens: spec.max_tokens,
                    temperature: self.settings.temperature,
                    ignore_eos: self.settings.ignore_eos,
                },
            )
            .await;
        let ok = m.error.is_none();
        history.push(Message::new("assistant", m.text.clone()));
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(RequestRecord {
                target: self.client.target.name.clone(),
                repeat: self.settings.repeat,
                concurrency: self.settings.concurrency,
                session,
                branch,
                turn,
                test: spec.test.clone(),
                sent_at,
                m,
            });
        self.done.fetch_add(1, Ordering::Relaxed);
        ok
    }

    async fn session(self: Arc<Self>, index: usize, s: Session) {
        let mut history: Vec<Message> = s
            .system
            .iter()
            .map(|sys| Message::new("system", sys.clone()))
            .chain(s.history.iter().cloned())
            .collect();
        for (t, spec) in s.trunk.iter().enumerate() {
            if !self.turn(&mut history, spec, index, None, t + 1).await {
                return;
            }
        }
        let branches = s.branches.into_iter().enumerate().map(|(b, turns)| {
            let me = self.clone();
            let mut history = history.clone();
            async move {
                for (t, spec) in turns.iter().enumerate() {
                    if !me.turn(&mut history, spec, index, Some(b), t + 1).await {
                        return;
                    }
                }
            }
        });
        futures_join_all(branches.collect()).await;
    }
}

/// Awaits futures concurrently (a tiny join_all on tokio tasks).
async fn futures_join_all<F>(futures: Vec<F>)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    for h in handles {
        let _ = h.await;
    }
}

fn request_count(w: &Workload) -> usize {
    w.sessions
        .iter()
        .map(|s| s.trunk.len() + s.branches.iter().map(Vec::len).sum::<usize>())
        .sum()
}

/// Runs the workload once; `label` names the run in the progress line.
pub async fn run(
    client: Arc<Client>,
    w: &Workload,
    settings: RunSettings,
    label: &str,
) -> RunOutcome {
    let shared = Arc::new(Shared {
        client,
        settings,
        started: Instant::now(),
        records: Mutex::new(Vec::new()),
        done: AtomicUsize::new(0),
    });
    let total = request_count(w);
    let progress = tokio::spawn(progress_line(shared.clone(), total, label.to_string()));
    let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let mut tasks = Vec::new();
    for (i, s) in w.sessions.iter().cloned().enumerate() {
        let wait = s.start_at - shared.started.elapsed().as_secs_f64();
        if wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
        // Acquired here, in session order, so sessions start in order.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let me = shared.clone();
        tasks.push(tokio::spawn(async move {
            me.session(i, s).await;
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let wall_s = shared.started.elapsed().as_secs_f64();
    progress.abort();
    if std::io::stderr().is_terminal() {
        eprintln!(
            "\r{label}: {total}/{total} requests in {wall_s:.1} s{:20}",
            ""
        );
    } else {
        eprintln!(
            "{label}: {} requests in {wall_s:.1} s",
            shared.done.load(Ordering::Relaxed)
        );
    }
    let mut records =
        std::mem::take(&mut *shared.records.lock().unwrap_or_else(|e| e.into_inner()));
    records.sort_by(|a, b| a.sent_at.total_cmp(&b.sent_at));
    RunOutcome { records, wall_s }
}

/// A progress bar on a terminal (a line every 30 s otherwise, for logs).
async fn progress_line(shared: Arc<Shared>, total: usize, label: String) {
    let tty = std::io::stderr().is_terminal();
    let period = if tty {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(30)
    };
    loop {
        tokio::time::sleep(period).await;
        let done = shared.done.load(Ordering::Relaxed);
        let elapsed = shared.started.elapsed().as_secs_f64();
        if tty {
            let width = 30;
            let filled = (done * width).checked_div(total).unwrap_or(width);
            eprint!(
                "\r{label}: [{}{}] {done}/{total} requests, {elapsed:.0} s",
                "#".repeat(filled),
                "-".repeat(width - filled)
            );
        } else {
            eprintln!("{label}: {done}/{total} requests, {elapsed:.0} s");
        }
    }
}
