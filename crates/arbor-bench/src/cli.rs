//! `arbor bench`: the command line, target set-up (including `--spawn`) and the run loop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::client::{Client, Target};
use crate::report::{self, Results, RunInfo, TargetInfo};
use crate::runner::{self, RunSettings};
use crate::workload::{self, WorkloadKind, WorkloadParams};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    /// A server to measure: NAME=URL[,key=KEY][,model=MODEL] (repeatable), e.g.
    /// vllm=http://gpu-box:8000/v1,model=meta-llama/Llama-3.1-8B-Instruct
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Start a local `arbor serve` (on a free port) and measure it as target `arbor`.
    #[arg(long)]
    pub spawn: bool,
    /// An argument for the spawned `arbor serve` (repeatable): --spawn-arg=--model --spawn-arg=M.gguf
    #[arg(long = "spawn-arg", allow_hyphen_values = true)]
    pub spawn_args: Vec<String>,
    #[arg(long, value_enum, default_value = "reference")]
    pub workload: WorkloadKind,
    /// reference: tokens the large context is grown to, on each target's tokenizer.
    #[arg(long, default_value_t = 6800)]
    pub context_tokens: usize,
    /// Tokens per answer (default: 150 for reference, 1024 for one-shot, 64 otherwise).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// multi-turn / branching: conversations.
    #[arg(long, default_value_t = 4)]
    pub conversations: usize,
    /// multi-turn / branching: turns per conversation (branching: before the fork).
    #[arg(long, default_value_t = 4)]
    pub turns: usize,
    /// branching: follow-ups forked from each conversation.
    #[arg(long, default_value_t = 3)]
    pub branches: usize,
    /// shared-prefix: groups (G), each with its own system prompt.
    #[arg(long, default_value_t = 4)]
    pub groups: usize,
    /// shared-prefix: prompts per group (P).
    #[arg(long, default_value_t = 4)]
    pub prompts_per_group: usize,
    /// multi-turn / branching / shared-prefix: system prompt size in tokens (S, approximate).
    #[arg(long, default_value_t = 1000)]
    pub system_tokens: usize,
    /// Question size in tokens (Q, approximate).
    #[arg(long, default_value_t = 32)]
    pub question_tokens: usize,
    /// Conversations in flight at once; a comma list sweeps (1,4,16) for the
    /// throughput-against-concurrency charts.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// New conversations per second (Poisson arrivals); 0 starts them as slots free up.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// custom: conversations from a JSON or JSONL file.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Runs per target; differences are judged against the spread between runs.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Ask for exactly max_tokens per answer (ignore_eos + min_tokens) so engines do equal
    /// work; `--ignore-eos false` lets answers stop early.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ignore_eos: bool,
    /// Seconds before a request is abandoned (recorded as failed).
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write every request's measurements (default: arbor-bench-WORKLOAD.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where to write the HTML report (default: the --out path with .html).
    #[arg(long)]
    pub html: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Compare saved results (JSON files written by earlier runs).
    Compare {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        html: Option<PathBuf>,
    },
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A spawned `arbor serve`, killed on drop.
struct Spawned {
    child: tokio::process::Child,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn spawn_arbor(exe: &std::path::Path, extra: &[String]) -> Result<(Spawned, String)> {
    let mut child = tokio::process::Command::new(exe)
        .arg("serve")
        .args(["--port", "0"])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} serve", exe.display()))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(600), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = line
                .split(" on ")
                .nth(1)
                .and_then(|r| r.split("/v1").next())
            {
                if url.starts_with("http://") {
                    return Ok::<_, std::io::Error>(Some(url.to_string()));
                }
            }
            seen.push(line);
        }
        Ok(None)
    })
    .await;
    let url = match found {
        Ok(Ok(Some(url))) => url,
        _ => bail!(
            "the spawned arbor serve did not start:\n{}",
            seen.join("\n")
        ),
    };
    // Keep draining its log so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((Spawned { child }, url))
}

fn params(a: &BenchArgs) -> WorkloadParams {
    let default_max = match a.workload {
        WorkloadKind::Reference => 150,
        WorkloadKind::OneShot => 1024,
        _ => 64,
    };
    WorkloadParams {
        kind: a.workload,
        context_tokens: a.context_tokens,
        max_tokens: a.max_tokens.unwrap_or(default_max),
        conversations: a.conversations,
        turns: a.turns,
        branches: a.branches,
        groups: a.groups,
        prompts_per_group: a.prompts_per_group,
        system_tokens: a.system_tokens,
        question_tokens: a.question_tokens,
        concurrency: 1,
        rate: a.rate,
        seed: a.seed,
        custom_file: a.file.clone(),
    }
}

/// Runs `arbor bench`; `arbor_exe` is the binary to spawn for `--spawn`.
pub async fn run(a: BenchArgs, arbor_exe: PathBuf) -> Result<()> {
    if let Some(BenchCommand::Compare { files, html }) = &a.command {
        return compare(files, html.clone());
    }
    if a.repeats == 0 || a.concurrency.contains(&0) {
        bail!("--repeats and --concurrency must be at least 1");
    }
    let mut targets: Vec<Target> = a
        .targets
        .iter()
        .map(|t| Target::parse(t))
        .collect::<Result<_, _>>()?;
    let mut _spawned = None;
    if a.spawn {
        eprintln!("starting arbor serve ...");
        let (child, url) = spawn_arbor(&arbor_exe, &a.spawn_args).await?;
        eprintln!("arbor serve is up at {url}");
        _spawned = Some(child);
        targets.insert(
            0,
            Target {
                name: "arbor".into(),
                base_url: url,
                api_key: None,
                model: None,
            },
        );
    }
    if targets.is_empty() {
        bail!("nothing to measure: give --target NAME=URL (repeatable) or --spawn");
    }
    let mut names = std::collections::HashSet::new();
    for t in &targets {
        if !names.insert(t.name.clone()) {
            bail!("two targets are named `{}`", t.name);
        }
    }
    let timeout = Duration::from_secs_f64(a.request_timeout.max(1.0));
    let base = params(&a);
    let mut clients: Vec<Option<Arc<Client>>> = Vec::new();
    let mut infos = Vec::new();
    for t in &targets {
        match Client::connect(t.clone(), timeout).await {
            Ok(c) => {
                infos.push(TargetInfo {
                    name: t.name.clone(),
                    base_url: t.base_url.clone(),
                    model: c.model.clone(),
                    notes: if c.can_tokenize() {
                        Vec::new()
                    } else {
                        vec!["no tokenize endpoint: prompt sizes are estimated".into()]
                    },
                    error: None,
                });
                clients.push(Some(Arc::new(c)));
            }
            Err(e) => {
                eprintln!("warning: {e}; measuring the other targets");
                infos.push(TargetInfo {
                    name: t.name.clone(),
                    base_url: t.base_url.clone(),
                    model: t.model.clone().unwrap_or_default(),
                    notes: Vec::new(),
                    error: Some(e.to_string()),
                });
                clients.push(None);
            }
        }
    }
    if clients.iter().all(Option::is_none) {
        bail!("no target could be reached");
    }
    // A warm-up request per target, not measured (first-request compilation, lazy loading).
    for c in clients.iter().flatten() {
        let m = c
            .chat(
                &[crate::client::Message::new("user", "Hello")],
                crate::client::Sampling {
                    max_tokens: 4,
                    temperature: 0.0,
                    ignore_eos: false,
                },
            )
            .await;
        if let Some(e) = m.error {
            eprintln!("warning: {}: warm-up request failed: {e}", c.target.name);
        }
    }
    let mut results = Results {
        version: 1,
        created_unix: now_unix(),
        workload: a.workload.name().into(),
        params: Some(base.clone()),
        repeats: a.repeats,
        targets: infos,
        runs: Vec::new(),
        tests: Vec::new(),
        records: Vec::new(),
    };
    for &conc in &a.concurrency {
        for repeat in 1..=a.repeats {
            // One nonce per repeat: every engine starts the repeat with a cold cache.
            let nonce = format!("{:08x}", rand::random::<u32>());
            // Targets take turns within a repeat, so slow drift of the machine hits all alike.
            for (i, client) in clients.iter().enumerate() {
                let Some(client) = client else { continue };
                let mut p = base.clone();
                p.concurrency = conc;
                let w = match workload::build(&p, client, &nonce).await {
                    Ok(w) => w,
                    Err(e) => {
                        results.targets[i]
                            .error
                            .get_or_insert(format!("building the workload: {e:#}"));
                        continue;
                    }
                };
                for n in &w.notes {
                    if !results.targets[i].notes.contains(n) && repeat == 1 {
                        results.targets[i].notes.push(n.clone());
                    }
                }
                for t in &w.tests {
                    if !results.tests.contains(t) {
                        results.tests.push(t.clone());
                    }
                }
                let label = format!(
                    "{} [{} c={conc} run {repeat}/{}]",
                    client.target.name, w.name, a.repeats
                );
                let settings = RunSettings {
                    temperature: a.temperature,
                    ignore_eos: a.ignore_eos,
                    repeat,
                    concurrency: conc,
                };
                let out = runner::run(client.clone(), &w, settings, &label).await;
                let failed = out.records.iter().filter(|r| r.m.error.is_some()).count();
                if let Some(first) = out.records.iter().find_map(|r| r.m.error.as_ref()) {
                    eprintln!(
                        "warning: {}: {failed} of {} requests failed; first: {first}",
                        client.target.name,
                        out.records.len()
                    );
                }
                results.runs.push(RunInfo {
                    target: client.target.name.clone(),
                    repeat,
                    concurrency: conc,
                    wall_s: out.wall_s,
                });
                results.records.extend(out.records);
            }
        }
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("arbor-bench-{}.json", a.workload.name())));
    let html_path = a.html.clone().unwrap_or_else(|| out.with_extension("html"));
    write_outputs(&results, &out, &html_path)
}

fn write_outputs(
    results: &Results,
    json_path: &std::path::Path,
    html_path: &std::path::Path,
) -> Result<()> {
    println!("{}", report::terminal(results));
    std::fs::write(json_path, serde_json::to_string_pretty(results)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(html_path, report::html(results))
        .with_context(|| format!("writing {}", html_path.display()))?;
    println!(
        "results: {}\nreport: {}",
        json_path.display(),
        html_path.display()
    );
    Ok(())
}

fn compare(files: &[PathBuf], html: Option<PathBuf>) -> Result<()> {
    let mut parts = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let r: Results = serde_json::from_str(&text)
            .with_context(|| format!("{} is not an arbor bench results file", f.display()))?;
        let label = f
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        parts.push((label, r));
    }
    let merged = Results::merge(parts)?;
    let html_path = html.unwrap_or_else(|| PathBuf::from("arbor-bench-compare.html"));
    println!("{}", report::terminal(&merged));
    std::fs::write(&html_path, report::html(&merged))
        .with_context(|| format!("writing {}", html_path.display()))?;
    println!("report: {}", html_path.display());
    Ok(())
}
