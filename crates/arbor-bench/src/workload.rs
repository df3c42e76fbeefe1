//! Workloads: conversations to send, built per target (the reference workload grows its large
//! context to a token count on the target's own tokenizer).
//!
//! A [`Session`] is one conversation: a trunk of turns run in order, each resending the whole
//! history plus the previous reply, then optional branches that fork from the trunk's history
//! and run concurrently (several different follow-ups to the same conversation).
//!
//! ```text
//!   system + t1 -> r1 -> t2 -> r2            trunk (sequential)
//!                              |-> b1 -> ..   branches (concurrent), each from the
//!                              |-> b2 -> ..   trunk's full history
//! ```

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::client::{Client, Message};

/// The reference workload (a copy of shared/workloads/reference-multiturn.json).
pub const REFERENCE_JSON: &str = include_str!("../../../workloads/reference-multiturn.json");

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TurnSpec {
    /// The row this turn's measurements go to ("LARGE_CONTEXT_CACHED_1", "turn 3", ...).
    pub test: String,
    pub user: String,
    pub max_tokens: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub system: Option<String>,
    pub trunk: Vec<TurnSpec>,
    pub branches: Vec<Vec<TurnSpec>>,
    /// Seconds after the run starts at which the session may begin (Poisson arrivals).
    pub start_at: f64,
    /// Earlier messages to start from (custom conversations with a given history).
    #[serde(default)]
    pub history: Vec<Message>,
}

#[derive(Debug, Clone)]
pub struct Workload {
    pub name: String,
    pub sessions: Vec<Session>,
    /// Sessions in flight at once.
    pub concurrency: usize,
    /// Rows in the order tables show them.
    pub tests: Vec<String>,
    /// Notes for the report (how the context was sized, what was estimated).
    pub notes: Vec<String>,
}

/// Parameters of every workload kind (each kind reads the ones it needs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadParams {
    pub kind: WorkloadKind,
    pub context_tokens: usize,
    pub max_tokens: usize,
    pub conversations: usize,
    pub turns: usize,
    pub branches: usize,
    pub groups: usize,
    pub prompts_per_group: usize,
    pub system_tokens: usize,
    pub question_tokens: usize,
    pub concurrency: usize,
    /// Sessions per second (Poisson); 0 starts them all at once (bounded by concurrency).
    pub rate: f64,
    pub seed: u64,
    pub custom_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    Reference,
    MultiTurn,
    Branching,
    SharedPrefix,
    OneShot,
    Custom,
}

impl WorkloadKind {
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Reference => "reference",
            WorkloadKind::MultiTurn => "multi-turn",
            WorkloadKind::Branching => "branching",
            WorkloadKind::SharedPrefix => "shared-prefix",
            WorkloadKind::OneShot => "one-shot",
            WorkloadKind::Custom => "custom",
        }
    }
}

/// Words for synthetic text: plain English, so every tokenizer sees ordinary words.
const WORDS: &[&str] = &[
    "the", "system", "memory", "request", "cache", "model", "token", "latency", "server", "batch",
    "prefix", "context", "answer", "question", "engineer", "network", "storage", "compute",
    "kernel", "thread", "queue", "budget", "policy", "signal", "vector", "matrix", "layer",
    "weight", "stream", "window", "record", "report", "metric", "design", "review", "choice", "is",
    "was", "will", "can", "should", "with", "from", "into", "over", "under", "and", "or", "but",
    "because", "when", "while", "after", "before", "fast", "slow", "large", "small", "shared",
    "local", "remote", "stable", "simple", "careful", "quiet", "busy", "early", "late",
];

/// Roughly `tokens` tokens of sentences (about 1.3 tokens per word on common tokenizers; the
/// report shows the real counts from the server).
pub fn synthetic_text(rng: &mut impl Rng, tokens: usize) -> String {
    let words = (tokens as f64 / 1.3).ceil() as usize;
    let mut out = String::new();
    for i in 0..words {
        let w = WORDS[rng.random_range(0..WORDS.len())];
        if i % 12 == 0 {
            if i > 0 {
                out.push_str(". ");
            }
            let mut c = w.chars();
            if let Some(f) = c.next() {
                out.extend(f.to_uppercase());
                out.push_str(c.as_str());
            }
        } else {
            out.push(' ');
            out.push_str(w);
        }
    }
    out.push('.');
    out
}

fn turn(test: impl Into<String>, user: impl Into<String>, max_tokens: usize) -> TurnSpec {
    TurnSpec {
        test: test.into(),
        user: user.into(),
        max_tokens,
    }
}

fn session(system: Option<String>, trunk: Vec<TurnSpec>) -> Session {
    Session {
        system,
        trunk,
        branches: Vec::new(),
        start_at: 0.0,
        history: Vec::new(),
    }
}

/// Poisson arrivals: exponential gaps at `rate` sessions per second.
fn poisson_starts(sessions: &mut [Session], rate: f64, rng: &mut impl Rng) {
    if rate <= 0.0 {
        return;
    }
    let mut t = 0.0;
    for s in sessions {
        s.start_at = t;
        let u: f64 = rng.random_range(f64::EPSILON..1.0);
        t += -u.ln() / rate;
    }
}

/// Builds the workload for one target. `nonce` starts every system prompt, so that each
/// repeat starts from a cold cache on every engine while sharing within the repeat.
pub async fn build(p: &WorkloadParams, client: &Client, nonce: &str) -> anyhow::Result<Workload> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed);
    let mut notes = Vec::new();
    let tag = |s: String| format!("[session {nonce}]\n{s}");
    let (sessions, concurrency, tests) = match p.kind {
        WorkloadKind::Reference => {
            let r: Value = serde_json::from_str(REFERENCE_JSON)?;
            let (context, note) = reference_context(&r, p.context_tokens, client).await?;
            notes.push(note);
            let max_tokens = p.max_tokens;
            let mut sessions = Vec::new();
            let mut tests = Vec::new();
            for case in r["test_cases"].as_array().into_iter().flatten() {
                let name = case["name"].as_str().unwrap_or("case").to_string();
                let user = case["user"].as_str().unwrap_or_default();
                let system = (case["system"].as_str() == Some("large_context"))
                    .then(|| tag(context.clone()));
                // The small-context case has no system prompt; the nonce goes in the question.
                let user = if system.is_some() {
                    user.to_string()
                } else {
                    format!("{user} ({nonce})")
                };
                sessions.push(session(system, vec![turn(&name, user, max_tokens)]));
                tests.push(name);
            }
            // The cases run one after another: the cached cases measure reuse of the first.
            (sessions, 1, tests)
        }
        WorkloadKind::MultiTurn | WorkloadKind::Branching => {
            let system_text = synthetic_text(&mut rng, p.system_tokens);
            let mut sessions: Vec<Session> = (0..p.conversations)
                .map(|c| {
                    let trunk = (0..p.turns)
                        .map(|t| {
                            let q = synthetic_text(&mut rng, p.question_tokens);
                            turn(
                                format!("turn {}", t + 1),
                                format!("Conversation {c}, question {}: {q}?", t + 1),
                                p.max_tokens,
                            )
                        })
                        .collect();
                    let mut s = session(Some(tag(system_text.clone())), trunk);
                    if p.kind == WorkloadKind::Branching {
                        s.branches = (0..p.branches)
                            .map(|b| {
                                let q = synthetic_text(&mut rng, p.question_tokens);
                                vec![turn(
                                    "branch",
                                    format!("Alternative follow-up {b}: {q}?"),
                                    p.max_tokens,
                                )]
                            })
                            .collect();
                    }
                    s
                })
                .collect();
            poisson_starts(&mut sessions, p.rate, &mut rng);
            let mut tests: Vec<String> = (1..=p.turns).map(|t| format!("turn {t}")).collect();
            if p.kind == WorkloadKind::Branching {
                tests.push("branch".into());
            }
            (sessions, p.concurrency, tests)
        }
        WorkloadKind::SharedPrefix => {
            let mut sessions = Vec::new();
            for g in 0..p.groups {
                let system = tag(format!(
                    "Group {g}. {}",
                    synthetic_text(&mut rng, p.system_tokens)
                ));
                for i in 0..p.prompts_per_group {
                    let test = if i == 0 {
                        "first of group"
                    } else {
                        "shared prefix"
                    };
                    let q = synthetic_text(&mut rng, p.question_tokens);
                    sessions.push(session(
                        Some(system.clone()),
                        vec![turn(test, format!("Question {i}: {q}?"), p.max_tokens)],
                    ));
                }
            }
            poisson_starts(&mut sessions, p.rate, &mut rng);
            (
                sessions,
                p.concurrency,
                vec!["first of group".into(), "shared prefix".into()],
            )
        }
        WorkloadKind::OneShot => {
            let r: Value = serde_json::from_str(REFERENCE_JSON)?;
            let prompt = r["published_results"]["one_shot_example"]["prompt"]
                .as_str()
                .unwrap_or("Do an in-depth historical analysis of the Declaration of Independence");
            (
                vec![session(
                    None,
                    vec![turn(
                        "one-shot",
                        format!("{prompt} ({nonce})"),
                        p.max_tokens,
                    )],
                )],
                1,
                vec!["one-shot".into()],
            )
        }
        WorkloadKind::Custom => {
            let path = p
                .custom_file
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("--workload custom needs --file PATH"))?;
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            let mut sessions = parse_custom(&text, p.max_tokens)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            for s in &mut sessions {
                s.system = Some(tag(s.system.take().unwrap_or_default()));
            }
            poisson_starts(&mut sessions, p.rate, &mut rng);
            let mut tests: Vec<String> = Vec::new();
            for s in &sessions {
                for t in s.trunk.iter().chain(s.branches.iter().flatten()) {
                    if !tests.contains(&t.test) {
                        tests.push(t.test.clone());
                    }
                }
            }
            (sessions, p.concurrency, tests)
        }
    };
    Ok(Workload {
        name: p.kind.name().into(),
        sessions,
        concurrency: concurrency.max(1),
        tests,
        notes,
    })
}

/// The reference recipe: base content plus technical details, repeated until the system
/// message reaches `target` tokens on the target's tokenizer.
async fn reference_context(
    r: &Value,
    target: usize,
    client: &Client,
) -> anyhow::Result<(String, String)> {
    let base = r["base_content"].as_str().unwrap_or_default();
    let details: Vec<String> = r["technical_details"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d.as_str().map(|d| format!("- {d}")))
        .collect();
    let block = format!("{base}\n\nTechnical details:\n{}", details.join("\n"));
    let join = |k: usize| vec![block.as_str(); k].join("\n\n");
    let per_block = match client.count_tokens(&block).await {
        Some(n) if n > 0 => n,
        _ => {
            let k = (target * 4).div_ceil(block.len()).max(1);
            return Ok((
                join(k),
                format!(
                    "{}: no tokenize endpoint; the large context was sized at 4 characters per token ({k} blocks)",
                    client.target.name
                ),
            ));
        }
    };
    let mut k = target.div_ceil(per_block).max(1);
    // Joining changes token boundaries a little: check, and grow until it is enough.
    let mut tokens = client.count_tokens(&join(k)).await.unwrap_or(per_block * k);
    while tokens < target {
        k += 1;
        tokens = client.count_tokens(&join(k)).await.unwrap_or(per_block * k);
    }
    Ok((
        join(k),
        format!(
            "{}: large context = {k} blocks, {tokens} tokens on the target's tokenizer (target {target})",
            client.target.name
        ),
    ))
}

/// Custom conversations, as a JSON list or JSONL, one conversation each:
/// `{"system": "...", "turns": ["first question", "follow-up", ...], "max_tokens": 64,
///   "branches": [["alt follow-up"], ...], "messages": [earlier messages]}`; or a bare list of
/// messages (`[{"role", "content"}, ...]`) for a single request with that history.
pub fn parse_custom(text: &str, default_max_tokens: usize) -> anyhow::Result<Vec<Session>> {
    let items: Vec<Value> = match serde_json::from_str::<Value>(text) {
        Ok(Value::Array(a)) if a.first().is_some_and(|x| x.get("role").is_none()) => a,
        Ok(v) => vec![v],
        Err(_) => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| anyhow::anyhow!("line {}: {e}", i + 1))
            })
            .collect::<anyhow::Result<_>>()?,
    };
    if items.is_empty() {
        anyhow::bail!("no conversations");
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let bad = |m: &str| anyhow::anyhow!("conversation {}: {m}", i + 1);
            if let Value::Array(messages) = item {
                // A bare history: the last user message is the turn, the rest is history.
                let mut msgs: Vec<Message> = serde_json::from_value(Value::Array(messages.clone()))
                    .map_err(|e| bad(&e.to_string()))?;
                let last = msgs
                    .pop()
                    .filter(|m| m.role == "user")
                    .ok_or_else(|| bad("the last message must be the user's"))?;
                let system = (msgs.first().map(|m| m.role.as_str()) == Some("system"))
                    .then(|| msgs.remove(0).content);
                return Ok(Session {
                    system,
                    trunk: vec![turn("turn 1", last.content, default_max_tokens)],
                    branches: Vec::new(),
                    start_at: 0.0,
                    history: msgs,
                });
            }
            let max_tokens = item["max_tokens"]
                .as_u64()
                .map_or(default_max_tokens, |m| m as usize);
            let strings = |v: &Value| -> Option<Vec<String>> {
                v.as_array()?
                    .iter()
                    .map(|s| s.as_str().map(str::to_string))
                    .collect()
            };
            let turns = strings(&item["turns"])
                .filter(|t| !t.is_empty())
                .ok_or_else(|| bad("`turns` must be a non-empty list of strings"))?;
            let branches = match &item["branches"] {
                Value::Null => Vec::new(),
                b => b
                    .as_array()
                    .and_then(|bs| bs.iter().map(strings).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| bad("`branches` must be a list of lists of strings"))?,
            };
            let history: Vec<Message> = match &item["messages"] {
                Value::Null => Vec::new(),
                m => serde_json::from_value(m.clone()).map_err(|e| bad(&e.to_string()))?,
            };
            Ok(Session {
                system: item["system"].as_str().map(str::to_string),
                trunk: turns
                    .into_iter()
                    .enumerate()
                    .map(|(t, u)| turn(format!("turn {}", t + 1), u, max_tokens))
                    .collect(),
                branches: branches
                    .into_iter()
                    .map(|b| {
                        b.into_iter()
                            .map(|u| turn("branch", u, max_tokens))
                            .collect()
                    })
                    .collect(),
                start_at: 0.0,
                history,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_conversations_in_every_shape() {
        let jsonl = "{\"system\": \"s\", \"turns\": [\"a\", \"b\"], \"branches\": [[\"c\"]], \"max_tokens\": 5}\n\n{\"turns\": [\"x\"]}\n";
        let s = parse_custom(jsonl, 9).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].trunk.len(), 2);
        assert_eq!(s[0].trunk[1].test, "turn 2");
        assert_eq!(s[0].trunk[0].max_tokens, 5);
        assert_eq!(s[0].branches[0][0].test, "branch");
        assert_eq!(s[1].trunk[0].max_tokens, 9);
        let list = "[{\"turns\": [\"x\"]}, {\"turns\": [\"y\"]}]";
        assert_eq!(parse_custom(list, 9).unwrap().len(), 2);
        let history = "[{\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"user\", \"content\": \"u1\"}, {\"role\": \"assistant\", \"content\": \"a1\"}, {\"role\": \"user\", \"content\": \"u2\"}]";
        let s = parse_custom(history, 9).unwrap();
        assert_eq!(s[0].system.as_deref(), Some("S"));
        assert_eq!(s[0].history.len(), 2);
        assert_eq!(s[0].trunk[0].user, "u2");
        assert!(parse_custom("{\"turns\": []}", 9).is_err());
        assert!(parse_custom("{\"turns\": [1]}", 9).is_err());
        assert!(parse_custom("not json\n", 9).is_err());
        assert!(parse_custom("", 9).is_err());
    }

    #[test]
    fn poisson_gaps_have_the_right_mean() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut s: Vec<Session> = (0..4000).map(|_| session(None, Vec::new())).collect();
        poisson_starts(&mut s, 2.0, &mut rng);
        let mean_gap = s.last().unwrap().start_at / 3999.0;
        assert!((mean_gap - 0.5).abs() < 0.03, "{mean_gap}");
        assert!(s.windows(2).all(|w| w[1].start_at >= w[0].start_at));
    }

    #[test]
    fn synthetic_text_is_sized_by_tokens() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let t = synthetic_text(&mut rng, 130);
        assert_eq!(t.split_whitespace().count(), 100);
    }
}
