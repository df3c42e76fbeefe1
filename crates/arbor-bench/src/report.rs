//! Results files, terminal tables, verdicts and the HTML report.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::runner::RequestRecord;
use crate::stats::{self, judge, Row, Spread, Verdict};
use crate::svg;
use crate::workload::WorkloadParams;

/// Everything a bench run measured: saved as JSON, read back by `arbor bench compare`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub version: u32,
    pub created_unix: u64,
    pub workload: String,
    pub params: Option<WorkloadParams>,
    pub repeats: usize,
    pub targets: Vec<TargetInfo>,
    pub runs: Vec<RunInfo>,
    /// Rows in table order.
    pub tests: Vec<String>,
    pub records: Vec<RequestRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetInfo {
    pub name: String,
    pub base_url: String,
    pub model: String,
    pub notes: Vec<String>,
    /// Why the target could not be measured (down, refused the model, ...).
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub target: String,
    pub repeat: usize,
    pub concurrency: usize,
    pub wall_s: f64,
}

/// (target, concurrency, test) -> one Row per repeat.
type RowsByKey = BTreeMap<(String, usize, String), Vec<Row>>;

impl Results {
    pub fn target_names(&self) -> Vec<String> {
        self.targets
            .iter()
            .filter(|t| t.error.is_none())
            .map(|t| t.name.clone())
            .collect()
    }

    pub fn concurrency_levels(&self) -> Vec<usize> {
        let mut c: Vec<usize> = self.runs.iter().map(|r| r.concurrency).collect();
        c.sort_unstable();
        c.dedup();
        c
    }

    fn rows(&self) -> RowsByKey {
        let mut groups: BTreeMap<(String, usize, String, usize), Vec<&RequestRecord>> =
            BTreeMap::new();
        for r in &self.records {
            groups
                .entry((r.target.clone(), r.concurrency, r.test.clone(), r.repeat))
                .or_default()
                .push(r);
        }
        let mut out: RowsByKey = BTreeMap::new();
        for ((t, c, test, repeat), recs) in groups {
            let mut row = stats::row(&recs);
            row.repeat = repeat;
            out.entry((t, c, test)).or_default().push(row);
        }
        out
    }

    /// Merges saved results (`arbor bench compare`): targets with the same name get the file's
    /// label appended.
    pub fn merge(mut parts: Vec<(String, Results)>) -> anyhow::Result<Results> {
        let Some((_, first)) = parts.first() else {
            anyhow::bail!("no results to compare")
        };
        let mut merged = Results {
            targets: Vec::new(),
            runs: Vec::new(),
            records: Vec::new(),
            tests: Vec::new(),
            ..first.clone()
        };
        let mut seen = std::collections::HashSet::new();
        for (label, r) in parts.iter_mut() {
            if r.workload != merged.workload {
                eprintln!(
                    "note: comparing different workloads ({} and {})",
                    merged.workload, r.workload
                );
            }
            let mut rename = BTreeMap::new();
            for t in &r.targets {
                let name = if seen.insert(t.name.clone()) {
                    t.name.clone()
                } else {
                    format!("{} ({label})", t.name)
                };
                seen.insert(name.clone());
                rename.insert(t.name.clone(), name);
            }
            for t in &r.targets {
                merged.targets.push(TargetInfo {
                    name: rename[&t.name].clone(),
                    ..t.clone()
                });
            }
            for run in &r.runs {
                merged.runs.push(RunInfo {
                    target: rename
                        .get(&run.target)
                        .cloned()
                        .unwrap_or(run.target.clone()),
                    ..run.clone()
                });
            }
            for rec in &r.records {
                merged.records.push(RequestRecord {
                    target: rename
                        .get(&rec.target)
                        .cloned()
                        .unwrap_or(rec.target.clone()),
                    ..rec.clone()
                });
            }
            for t in &r.tests {
                if !merged.tests.contains(t) {
                    merged.tests.push(t.clone());
                }
            }
            merged.repeats = merged.repeats.min(r.repeats);
        }
        Ok(merged)
    }
}

fn spread(rows: &[Row], f: impl Fn(&Row) -> f64) -> Spread {
    Spread::of(&rows.iter().map(f).collect::<Vec<_>>())
}

fn cell(s: Spread, decimals: usize) -> String {
    if !s.mean.is_finite() {
        return "-".into();
    }
    if s.n >= 2 && s.sd.is_finite() {
        format!("{:.*} ±{:.*}", decimals, s.mean, decimals, s.sd)
    } else {
        format!("{:.*}", decimals, s.mean)
    }
}

const HEADERS: [&str; 8] = [
    "Test",
    "Duration (s)",
    "TTFT (s)",
    "Prompt tokens",
    "Cached tokens",
    "Response tokens",
    "Decode tok/s",
    "Overall tok/s",
];

/// Table cells of one target at one concurrency level.
fn table_cells(res: &Results, rows: &RowsByKey, target: &str, conc: usize) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for test in &res.tests {
        let Some(rs) = rows.get(&(target.to_string(), conc, test.clone())) else {
            continue;
        };
        let errors: usize = rs.iter().map(|r| r.errors).sum();
        let requests: usize = rs.iter().map(|r| r.requests).sum();
        let cached = if rs.iter().all(|r| r.cached_tokens.is_some()) {
            cell(spread(rs, |r| r.cached_tokens.unwrap_or(f64::NAN)), 0)
        } else {
            "n/a".into()
        };
        let mut name = test.clone();
        if errors > 0 {
            let _ = write!(name, " ({errors}/{requests} failed)");
        }
        if rs.iter().any(|r| r.estimated) {
            name.push_str(" ~");
        }
        out.push(vec![
            name,
            cell(spread(rs, |r| r.duration_s), 3),
            cell(spread(rs, |r| r.ttft_s), 3),
            cell(spread(rs, |r| r.prompt_tokens), 0),
            cached,
            cell(spread(rs, |r| r.response_tokens), 0),
            cell(spread(rs, |r| r.decode_tps), 1),
            cell(spread(rs, |r| r.overall_tps), 1),
        ]);
    }
    out
}

fn text_table(cells: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = HEADERS.iter().map(|h| h.len()).collect();
    for row in cells {
        for (i, c) in row.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |row: &[String]| -> String {
        row.iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let mut s = line(&HEADERS.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    s.push('\n');
    s.push_str(
        &widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-|-"),
    );
    s.push('\n');
    for row in cells {
        s.push_str(&line(row));
        s.push('\n');
    }
    s
}

/// Geometric mean of the positive finite values (NaN if none).
fn geometric_mean(v: &[f64]) -> f64 {
    let ok: Vec<f64> = v
        .iter()
        .copied()
        .filter(|x| x.is_finite() && *x > 0.0)
        .collect();
    if ok.is_empty() {
        f64::NAN
    } else {
        (ok.iter().map(|x| x.ln()).sum::<f64>() / ok.len() as f64).exp()
    }
}

/// "A failed 3/10 requests" for each target of a comparison that failed any.
fn failures(named: &[(&str, &[Row])]) -> Option<String> {
    let parts: Vec<String> = named
        .iter()
        .filter_map(|(name, rows)| {
            let errors: usize = rows.iter().map(|r| r.errors).sum();
            let requests: usize = rows.iter().map(|r| r.requests).sum();
            (errors > 0).then(|| format!("{name} failed {errors}/{requests} requests"))
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(" and "))
}

/// Verdicts: every other target against the first, per test (on overall tokens/second, the
/// published tables' measure) and overall (geometric mean over tests, per repeat). Every
/// sentence names both targets. A test in which either target failed requests is reported as
/// failed, with the counts, and not judged: a target cannot win by failing its slow requests.
/// The overall figure covers only the tests both targets completed, and pairs each test's
/// values by repeat number.
pub fn verdicts(res: &Results) -> Vec<String> {
    let rows = res.rows();
    let names = res.target_names();
    let mut out = Vec::new();
    let Some(base) = names.first() else {
        return out;
    };
    for conc in res.concurrency_levels() {
        let at = if res.concurrency_levels().len() > 1 {
            format!(" at concurrency {conc}")
        } else {
            String::new()
        };
        for other in &names[1..] {
            // Repeat number -> overall tok/s of each completed test.
            let mut per_repeat_a: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
            let mut per_repeat_b: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
            let mut compared = 0;
            let mut left_out = Vec::new();
            for test in &res.tests {
                let (Some(a), Some(b)) = (
                    rows.get(&(base.clone(), conc, test.clone())),
                    rows.get(&(other.clone(), conc, test.clone())),
                ) else {
                    continue;
                };
                if let Some(failed) = failures(&[(base, a), (other, b)]) {
                    out.push(format!(
                        "FAILED {test}{at}: {failed}; {base} and {other} are not compared on it"
                    ));
                    left_out.push(test.clone());
                    continue;
                }
                if let Some(v) = judge(
                    base,
                    spread(a, |r| r.overall_tps),
                    other,
                    spread(b, |r| r.overall_tps),
                    false,
                ) {
                    out.push(v.sentence("tokens/second", &format!("{test}{at}")));
                }
                if let Some(v @ Verdict::Better { .. }) = judge(
                    base,
                    spread(a, |r| r.ttft_s),
                    other,
                    spread(b, |r| r.ttft_s),
                    true,
                ) {
                    out.push(v.sentence("time to first token", &format!("{test}{at}")));
                }
                compared += 1;
                for r in a {
                    per_repeat_a
                        .entry(r.repeat)
                        .or_default()
                        .push(r.overall_tps);
                }
                for r in b {
                    per_repeat_b
                        .entry(r.repeat)
                        .or_default()
                        .push(r.overall_tps);
                }
            }
            // Only repeats in which both targets have every compared test.
            let complete = |m: &BTreeMap<usize, Vec<f64>>, r: &usize| {
                m.get(r).is_some_and(|v| v.len() == compared)
            };
            let repeats: Vec<usize> = per_repeat_a
                .keys()
                .filter(|r| complete(&per_repeat_a, r) && complete(&per_repeat_b, r))
                .copied()
                .collect();
            let geo = |m: &BTreeMap<usize, Vec<f64>>| {
                repeats
                    .iter()
                    .map(|r| geometric_mean(&m[r]))
                    .collect::<Vec<_>>()
            };
            let a = Spread::of(&geo(&per_repeat_a));
            let b = Spread::of(&geo(&per_repeat_b));
            let scope = if left_out.is_empty() {
                String::new()
            } else {
                format!(
                    " (the {compared} tests both completed; left out: {})",
                    left_out.join(", ")
                )
            };
            if compared == 0 {
                out.push(format!(
                    "OVERALL: no test completed by both {base} and {other}{at}: no overall comparison"
                ));
            } else if let Some(v) = judge(base, a, other, b, false) {
                out.push(format!(
                    "OVERALL: {}{scope}",
                    v.sentence(
                        "tokens/second (geometric mean over tests)",
                        &format!("{}{at}", res.workload)
                    )
                ));
            }
        }
    }
    out
}

/// The terminal report: a table per target (and concurrency level), then the verdicts.
pub fn terminal(res: &Results) -> String {
    let rows = res.rows();
    let mut s = String::new();
    for t in &res.targets {
        if let Some(e) = &t.error {
            let _ = writeln!(s, "\n{}: not measured: {e}", t.name);
            continue;
        }
        for conc in res.concurrency_levels() {
            let _ = writeln!(
                s,
                "\n{} ({}, model {}), workload {}, concurrency {conc}, {} repeat(s):",
                t.name, t.base_url, t.model, res.workload, res.repeats
            );
            s.push_str(&text_table(&table_cells(res, &rows, &t.name, conc)));
            if let Some(sum) = run_summary(res, &t.name, conc) {
                let _ = writeln!(s, "{sum}");
            }
        }
        for n in &t.notes {
            let _ = writeln!(s, "note: {n}");
        }
    }
    if rows.values().flatten().any(|r| r.estimated) {
        s.push_str("~ some token counts were estimated (the server reported no usage)\n");
    }
    let v = verdicts(res);
    if !v.is_empty() {
        s.push_str("\nVerdict:\n");
        for line in v {
            let _ = writeln!(s, "  {line}");
        }
    }
    s
}

fn run_summary(res: &Results, target: &str, conc: usize) -> Option<String> {
    let recs: Vec<&RequestRecord> = res
        .records
        .iter()
        .filter(|r| r.target == target && r.concurrency == conc)
        .collect();
    let wall: f64 = res
        .runs
        .iter()
        .filter(|r| r.target == target && r.concurrency == conc)
        .map(|r| r.wall_s)
        .sum();
    if recs.is_empty() {
        return None;
    }
    let s = stats::run_summary(&recs, wall);
    let q = |x: Option<stats::Summary>| {
        x.map_or("-".into(), |x| {
            format!(
                "mean {:.3} p50 {:.3} p90 {:.3} p99 {:.3}",
                x.mean, x.p50, x.p90, x.p99
            )
        })
    };
    Some(format!(
        "  TTFT s: {}\n  TPOT s: {}\n  ITL s: {}\n  E2E s: {}\n  {:.2} req/s, {:.1} output tok/s{}{}",
        q(s.ttft), q(s.tpot), q(s.itl), q(s.e2e), s.requests_per_s, s.output_tokens_per_s,
        s.cache_hit_ratio.map_or(String::new(), |h| format!(", cache hit ratio {:.1}%", 100.0 * h)),
        if s.errors > 0 { format!(", {} of {} requests failed", s.errors, s.requests) } else { String::new() },
    ))
}

/// The self-contained HTML report: tables, verdicts and charts.
pub fn html(res: &Results) -> String {
    let rows = res.rows();
    let names = res.target_names();
    let levels = res.concurrency_levels();
    let mut h = String::new();
    let _ = write!(h, "<!doctype html><html><head><meta charset=\"utf-8\"><title>arbor bench: {}</title><style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}.v{{background:#f4f7fb;padding:.5em 1em}}</style></head><body>", svg::escape(&res.workload));
    let _ = write!(
        h,
        "<h1>arbor bench: {}</h1><p>{} repeat(s); concurrency {:?}.</p>",
        svg::escape(&res.workload),
        res.repeats,
        levels
    );
    let v = verdicts(res);
    if !v.is_empty() {
        h.push_str("<div class=\"v\"><h2>Verdict</h2><ul>");
        for line in v {
            let _ = write!(h, "<li>{}</li>", svg::escape(&line));
        }
        h.push_str("</ul></div>");
    }
    let conc0 = levels.first().copied().unwrap_or(1);
    // Per test and target: mean and spread over repeats.
    let bars = |f: fn(&Row) -> f64| -> Vec<svg::BarSeries> {
        names
            .iter()
            .map(|n| {
                let vals = res
                    .tests
                    .iter()
                    .map(|t| {
                        let rs = rows.get(&(n.clone(), conc0, t.clone()))?;
                        let s = spread(rs, f);
                        s.mean.is_finite().then_some((s.mean, s.sd))
                    })
                    .collect();
                (n.clone(), vals)
            })
            .collect()
    };
    h.push_str(&svg::bar_chart(
        "Time to first token per test",
        "seconds",
        &res.tests,
        &bars(|r| r.ttft_s),
    ));
    h.push_str(&svg::bar_chart(
        "Overall tokens/second per test",
        "tokens/s",
        &res.tests,
        &bars(|r| r.overall_tps),
    ));
    // TTFT per turn of multi-turn conversations (trunk turns).
    let turns: Vec<(String, Vec<(f64, f64)>)> = names
        .iter()
        .map(|n| {
            let mut by_turn: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
            for r in res.records.iter().filter(|r| {
                &r.target == n
                    && r.concurrency == conc0
                    && r.branch.is_none()
                    && r.m.error.is_none()
            }) {
                if let Some(t) = r.m.ttft {
                    by_turn.entry(r.turn).or_default().push(t);
                }
            }
            (
                n.clone(),
                by_turn
                    .into_iter()
                    .map(|(t, v)| (t as f64, v.iter().sum::<f64>() / v.len() as f64))
                    .collect(),
            )
        })
        .collect();
    if turns.iter().any(|(_, p)| p.len() > 1) {
        h.push_str(&svg::line_chart(
            "Time to first token per turn of a conversation",
            "turn",
            "seconds (mean)",
            &turns,
        ));
    }
    if levels.len() > 1 {
        let per_level =
            |f: &dyn Fn(&stats::RunSummary) -> Option<f64>| -> Vec<(String, Vec<(f64, f64)>)> {
                names
                    .iter()
                    .map(|n| {
                        let pts = levels
                            .iter()
                            .filter_map(|&c| {
                                let recs: Vec<&RequestRecord> = res
                                    .records
                                    .iter()
                                    .filter(|r| &r.target == n && r.concurrency == c)
                                    .collect();
                                let wall: f64 = res
                                    .runs
                                    .iter()
                                    .filter(|r| &r.target == n && r.concurrency == c)
                                    .map(|r| r.wall_s)
                                    .sum();
                                f(&stats::run_summary(&recs, wall)).map(|y| (c as f64, y))
                            })
                            .collect();
                        (n.clone(), pts)
                    })
                    .collect()
            };
        h.push_str(&svg::line_chart(
            "Throughput against concurrency",
            "concurrent conversations",
            "output tokens/s",
            &per_level(&|s| Some(s.output_tokens_per_s)),
        ));
        h.push_str(&svg::line_chart(
            "Latency against concurrency",
            "concurrent conversations",
            "end-to-end p50 (s)",
            &per_level(&|s| s.e2e.map(|e| e.p50)),
        ));
        h.push_str(&svg::line_chart(
            "Time to first token against concurrency",
            "concurrent conversations",
            "TTFT p50 (s)",
            &per_level(&|s| s.ttft.map(|e| e.p50)),
        ));
    }
    for t in &res.targets {
        let _ = write!(
            h,
            "<h2>{}</h2><p>{} &middot; model {}</p>",
            svg::escape(&t.name),
            svg::escape(&t.base_url),
            svg::escape(&t.model)
        );
        if let Some(e) = &t.error {
            let _ = write!(h, "<p><b>Not measured:</b> {}</p>", svg::escape(e));
            continue;
        }
        for &c in &levels {
            let _ = write!(h, "<h3>concurrency {c}</h3><table><tr>");
            for hd in HEADERS {
                let _ = write!(h, "<th>{hd}</th>");
            }
            h.push_str("</tr>");
            for row in table_cells(res, &rows, &t.name, c) {
                h.push_str("<tr>");
                for c in row {
                    let _ = write!(h, "<td>{}</td>", svg::escape(&c));
                }
                h.push_str("</tr>");
            }
            h.push_str("</table>");
            if let Some(s) = run_summary(res, &t.name, c) {
                let _ = write!(h, "<pre>{}</pre>", svg::escape(&s));
            }
        }
        for n in &t.notes {
            let _ = write!(h, "<p>note: {}</p>", svg::escape(n));
        }
    }
    h.push_str("</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Measured;

    fn record(target: &str, repeat: usize, test: &str, tps: f64, error: bool) -> RequestRecord {
        RequestRecord {
            target: target.into(),
            repeat,
            concurrency: 1,
            session: 0,
            branch: None,
            turn: 1,
            test: test.into(),
            sent_at: 0.0,
            m: Measured {
                ttft: Some(0.1),
                e2e: 1.0,
                completion_tokens: Some(tps as usize),
                error: error.then(|| "HTTP 500".to_string()),
                ..Default::default()
            },
        }
    }

    fn results(records: Vec<RequestRecord>) -> Results {
        let target = |name: &str| TargetInfo {
            name: name.into(),
            base_url: String::new(),
            model: String::new(),
            notes: Vec::new(),
            error: None,
        };
        Results {
            version: 1,
            created_unix: 0,
            workload: "w".into(),
            params: None,
            repeats: 3,
            targets: vec![target("A"), target("B"), target("C")],
            runs: vec![RunInfo {
                target: "A".into(),
                repeat: 0,
                concurrency: 1,
                wall_s: 1.0,
            }],
            tests: vec!["t1".into(), "t2".into()],
            records,
        }
    }

    /// B fails a request on t2 (and is very fast on the ones it completes): t2 is reported as
    /// failed for B with the count, not judged, and left out of OVERALL, which then shows A's
    /// real 2x lead on t1. C equals A within noise, and that sentence names both. C's records
    /// come in reverse repeat order and lack repeat 0 of t2: repeats pair by number.
    #[test]
    fn failures_are_reported_and_never_win_and_sentences_name_both_targets() {
        let mut recs = Vec::new();
        for repeat in 0..3 {
            let wobble = repeat as f64;
            for test in ["t1", "t2"] {
                recs.push(record("A", repeat, test, 100.0 + wobble, false));
                let b = if test == "t1" { 50.0 + wobble } else { 1000.0 };
                recs.push(record("B", repeat, test, b, false));
            }
        }
        recs.push(record("B", 1, "t2", 0.0, true));
        for repeat in (0..3).rev() {
            for test in ["t1", "t2"] {
                if !(repeat == 0 && test == "t2") {
                    recs.push(record("C", repeat, test, 101.0 - repeat as f64, false));
                }
            }
        }
        let v = verdicts(&results(recs));
        let text = v.join("\n");
        assert!(
            v.iter()
                .any(|l| l.starts_with("FAILED t2") && l.contains("B failed 1/4 requests")),
            "{text}"
        );
        assert!(
            !v.iter().any(|l| l.contains("B was") && l.contains("on t2")),
            "{text}"
        );
        let overall_ab = v
            .iter()
            .find(|l| l.starts_with("OVERALL") && l.contains('B'))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            overall_ab.contains("A was 1.98x faster than B"),
            "{overall_ab}"
        );
        assert!(overall_ab.contains("left out: t2"), "{overall_ab}");
        let same: Vec<&String> = v
            .iter()
            .filter(|l| l.contains("no real difference"))
            .collect();
        assert!(!same.is_empty(), "{text}");
        for l in same {
            assert!(l.contains("between A and C"), "{l}");
        }
        assert!(
            v.iter()
                .any(|l| l.starts_with("OVERALL") && l.contains('C')),
            "{text}"
        );
    }
}
