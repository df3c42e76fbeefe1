//! `arbor bench --spawn` end to end on the default model: the bench starts `arbor serve`,
//! runs short workloads against it, and writes results that show the cache at work.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn model() -> PathBuf {
    let dir = std::env::var_os("ARBOR_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} missing: the README's test command fetches it",
        path.display()
    );
    path
}

fn bench(name: &str, args: &[&str]) -> Value {
    let dir = std::env::temp_dir().join(format!("arbor-bench-e2e-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("results.json");
    let output = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .arg("bench")
        .arg("--spawn")
        .arg(format!("--spawn-arg=--model={}", model().display()))
        .arg("--spawn-arg=--kv-slots=16384")
        .args(args)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("Overall tok/s"), "{stdout}");
    let html = std::fs::read_to_string(out.with_extension("html")).unwrap();
    assert!(html.contains("<svg"));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    std::fs::remove_dir_all(dir).ok();
    v
}

fn records<'a>(v: &'a Value, test: &str) -> Vec<&'a Value> {
    v["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["test"] == test)
        .collect()
}

#[test]
fn multi_turn_conversations_reuse_their_history() {
    let v = bench(
        "multi",
        &[
            "--workload",
            "multi-turn",
            "--conversations",
            "2",
            "--turns",
            "3",
            "--max-tokens",
            "6",
            "--system-tokens",
            "120",
            "--repeats",
            "1",
        ],
    );
    assert_eq!(v["records"].as_array().unwrap().len(), 6);
    for r in v["records"].as_array().unwrap() {
        assert!(r["error"].is_null(), "{r}");
        assert_eq!(
            r["completion_tokens"], 6,
            "ignore_eos gives exactly max_tokens"
        );
        assert_eq!(r["prompt_source"], "usage");
    }
    // Turn 3 resends turns 1-2 and their replies: all of it but the new question is cached.
    for r in records(&v, "turn 3") {
        let (prompt, cached) = (
            r["prompt_tokens"].as_u64().unwrap(),
            r["cached_tokens"].as_u64().unwrap(),
        );
        assert!(cached * 10 >= prompt * 8, "{cached} of {prompt} cached");
    }
}

#[test]
fn reference_workload_shows_cached_cases() {
    let v = bench(
        "reference",
        &[
            "--workload",
            "reference",
            "--context-tokens",
            "400",
            "--max-tokens",
            "4",
            "--repeats",
            "2",
        ],
    );
    let notes = v["targets"][0]["notes"].to_string();
    assert!(notes.contains("on the target's tokenizer"), "{notes}");
    for (test, cached_expected) in [
        ("LARGE_CONTEXT_FRESH", false),
        ("LARGE_CONTEXT_CACHED_1", true),
        ("LARGE_CONTEXT_CACHED_2", true),
    ] {
        let rs = records(&v, test);
        assert_eq!(rs.len(), 2, "one per repeat");
        for r in rs {
            let (prompt, cached) = (
                r["prompt_tokens"].as_u64().unwrap(),
                r["cached_tokens"].as_u64().unwrap(),
            );
            assert!(prompt >= 400, "{test}: {prompt}");
            // Each repeat starts cold (its own nonce), then reuses the shared context.
            if cached_expected {
                assert!(cached * 10 >= prompt * 9, "{test}: {cached} of {prompt}");
            } else {
                assert!(cached * 10 < prompt, "{test}: {cached} of {prompt}");
            }
        }
    }
}
