//! The radix cache at scale: per-step cost of the cache operations and resident memory, with
//! many short-lived namespaces (one `cache_salt` per request) and with a tree of a million
//! nodes. Run it on two commits to compare (docs/RELIABILITY.md has the numbers):
//!
//!     cargo run --release -p arbor-cache --example cache_scale
//!
//! It uses only the cache's public insert / match / evict calls, so the same file runs against
//! older versions of the crate.

use std::time::Instant;

use arbor_cache::{RadixCache, SlotAllocator};

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// A small deterministic generator (no dependency, same numbers on every commit).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u32) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as u32
    }
}

/// One request's cache work: match, take slots (evicting when short), insert.
fn request(tree: &mut RadixCache, alloc: &mut SlotAllocator, ns: u64, tokens: &[u32]) -> f64 {
    let t = Instant::now();
    let hit = tree.match_prefix(ns, tokens).slots.len();
    let need = tokens.len() - hit;
    if alloc.free_count() < need {
        let freed = tree.evict(need - alloc.free_count());
        alloc.free(&freed).expect("evicted slots were the tree's");
    }
    let mut slots = tree.match_prefix(ns, tokens).slots;
    slots.extend(
        alloc
            .allocate(tokens.len() - slots.len())
            .expect("room was made"),
    );
    let already = tree.insert(ns, tokens, &slots);
    alloc
        .free(&slots[hit..already])
        .expect("duplicates are ours");
    t.elapsed().as_secs_f64()
}

fn report(name: &str, mut times: Vec<f64>, rss_before: f64) {
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    println!(
        "{name}: {} steps, mean {:.1} us, p99 {:.1} us, max {:.1} us; RSS {:.1} MiB (+{:.1} MiB)",
        times.len(),
        mean * 1e6,
        p99 * 1e6,
        times[times.len() - 1] * 1e6,
        rss_mib(),
        rss_mib() - rss_before
    );
}

fn main() {
    let mut rng = Lcg(7);

    // 1. 100,000 distinct salts: every request its own namespace, a 64-token prompt, a
    //    100,000-slot pool (about 1,560 requests' worth stays cached).
    let rss0 = rss_mib();
    let mut tree = RadixCache::new();
    let mut alloc = SlotAllocator::new(100_000);
    let times: Vec<f64> = (0..100_000u64)
        .map(|i| {
            let prompt: Vec<u32> = (0..64).map(|_| rng.next(49_152)).collect();
            request(&mut tree, &mut alloc, i + 1, &prompt)
        })
        .collect();
    report("100k salts", times, rss0);
    drop(tree);

    // 2. A tree of a million nodes: 1,000 shared 16-token prefixes, each with 1,000 one-token
    //    continuations, in a pool that is full; then 2,000 steps that each add a continuation
    //    (so each evicts one least recently used leaf).
    let rss0 = rss_mib();
    let mut tree = RadixCache::new();
    let groups = 1_000u32;
    let per_group = 1_000u32;
    let total = (groups * 16 + groups * per_group) as usize;
    let mut alloc = SlotAllocator::new(total);
    let prefix = |g: u32| -> Vec<u32> { (0..16).map(|j| 50_000 + g * 16 + j).collect() };
    let build = Instant::now();
    for g in 0..groups {
        let mut toks = prefix(g);
        for k in 0..per_group {
            toks.truncate(16);
            toks.push(k);
            request(&mut tree, &mut alloc, 0, &toks);
        }
    }
    println!(
        "1M-node tree built in {:.2} s, {} slots cached, RSS {:.1} MiB",
        build.elapsed().as_secs_f64(),
        tree.cached_slots(),
        rss_mib()
    );
    let times: Vec<f64> = (0..2_000u32)
        .map(|i| {
            let mut toks = prefix(rng.next(groups));
            toks.push(per_group + i);
            request(&mut tree, &mut alloc, 0, &toks)
        })
        .collect();
    report("1M-node tree, full pool", times, rss0);
}
