//! The block view of the prefix cache, as KV-aware routers consume it.
//!
//! Routers (NVIDIA Dynamo's KV router, llm-d) track each replica's cache as a set of
//! fixed-size *pages* (vLLM's blocks): page `k` of a sequence is its tokens
//! `[k·P, (k+1)·P)`, identified by a hash chained over the namespace, the previous page's hash
//! and the page's tokens, so one hash names a whole prefix. The radix tree is token-granular;
//! this module defines the page view of it and the events that keep a subscriber's copy of
//! that view exact:
//!
//! ```text
//!   cached sequence   [t0 ........ t15][t16 ....... t31][t32 .. t37]
//!   pages              h1 = H(ns, -, p0) h2 = H(ns, h1, p1)   partial: not a page
//! ```
//!
//! A page exists while all its tokens are cached. So a cache emits [`KvEvent::Stored`] when
//! an insert completes pages, [`KvEvent::Removed`] when eviction takes a page's last token,
//! and a publisher starts a stream with [`KvEvent::Cleared`]. Events are buffered in the
//! cache (no I/O under its lock) and drained by the engine once per step.

use std::hash::{Hash, Hasher};

use crate::radix::Namespace;

/// One change of the page view, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// Consecutive pages of one sequence became cached: `hashes[i]` names the page of
    /// `tokens[i·P..(i+1)·P]`; `parent` is the hash of the page before the first (`None`: the
    /// first is the sequence's first page).
    Stored {
        namespace: Namespace,
        parent: Option<u64>,
        hashes: Vec<u64>,
        tokens: Vec<u32>,
    },
    /// Pages left the cache.
    Removed {
        namespace: Namespace,
        hashes: Vec<u64>,
    },
    /// Nothing is cached (a stream's start, or a resynchronisation).
    Cleared,
}

/// The chained hash of a page: SipHash with fixed keys over the namespace, the parent page's
/// hash and the page's tokens, so it is the same in every run of the same build and equal
/// hashes mean equal whole prefixes (up to 64-bit collisions, which the block cache checks on
/// lookup and which a router tolerates as a wrong guess).
pub fn page_hash(ns: Namespace, parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ns.hash(&mut h);
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// Hashes of the whole pages of `tokens` (a sequence from its start), in order.
pub fn page_hashes(ns: Namespace, page_size: usize, tokens: &[u32]) -> Vec<u64> {
    let mut parent = None;
    tokens
        .chunks_exact(page_size)
        .map(|page| {
            let h = page_hash(ns, parent, page);
            parent = Some(h);
            h
        })
        .collect()
}

/// Events buffered by a cache until the engine drains them.
#[derive(Debug)]
pub(crate) struct EventLog {
    pub page_size: usize,
    pub events: Vec<KvEvent>,
}

impl EventLog {
    pub fn new(page_size: usize) -> Self {
        assert!(page_size > 0, "pages hold at least one token");
        Self {
            page_size,
            events: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlockCache, PrefixCache, RadixCache, SlotAllocator};
    use rand::{Rng, SeedableRng};
    use std::collections::{HashMap, HashSet};

    /// A subscriber's copy of the page view, rebuilt from events alone, checking each event
    /// against what it holds (a stored page is new and its parent known; a removed page is
    /// held and no held page descends from it).
    #[derive(Default)]
    struct View {
        pages: HashMap<u64, (Namespace, Option<u64>, Vec<u32>)>,
    }

    impl View {
        fn apply(&mut self, ev: &KvEvent, p: usize) {
            match ev {
                KvEvent::Stored {
                    namespace,
                    parent,
                    hashes,
                    tokens,
                } => {
                    assert_eq!(
                        tokens.len(),
                        hashes.len() * p,
                        "one page of tokens per hash"
                    );
                    if let Some(ph) = parent {
                        assert!(self.pages.contains_key(ph), "parent {ph:x} unknown");
                    }
                    let mut prev = *parent;
                    for (h, page) in hashes.iter().zip(tokens.chunks_exact(p)) {
                        let old = self.pages.insert(*h, (*namespace, prev, page.to_vec()));
                        assert!(old.is_none(), "page {h:x} stored twice");
                        prev = Some(*h);
                    }
                }
                KvEvent::Removed { hashes, .. } => {
                    for h in hashes {
                        assert!(self.pages.remove(h).is_some(), "page {h:x} removed unheld");
                    }
                    for h in hashes {
                        assert!(
                            !self
                                .pages
                                .values()
                                .any(|(_, parent, _)| parent == &Some(*h)),
                            "page {h:x} removed before its descendants"
                        );
                    }
                }
                KvEvent::Cleared => self.pages.clear(),
            }
        }

        /// Every page as (namespace, the whole prefix it ends), following parents.
        fn prefixes(&self) -> HashSet<(Namespace, Vec<u32>)> {
            self.pages
                .keys()
                .map(|&h| {
                    let mut chain = Vec::new();
                    let mut cur = Some(h);
                    while let Some(c) = cur {
                        let (_, parent, page) = &self.pages[&c];
                        chain.push(page.clone());
                        cur = *parent;
                    }
                    let ns = self.pages[&h].0;
                    (ns, chain.into_iter().rev().flatten().collect())
                })
                .collect()
        }
    }

    /// Random requests, evictions, locks over a 3-token vocabulary with 4-token pages (so
    /// edges split inside pages and pages straddle nodes): after every operation the view
    /// rebuilt from the events holds exactly the whole-page prefixes of what the tree caches,
    /// hashed as a fresh hash of each cached sequence says, and a snapshot rebuilds the same.
    #[test]
    fn events_rebuild_the_page_view_of_the_radix_tree() {
        const P: usize = 4;
        const TOTAL: usize = 120;
        for seed in 0..12u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut tree = RadixCache::new();
            tree.enable_events(P).unwrap();
            let mut alloc = SlotAllocator::new(TOTAL);
            let mut view = View::default();
            let mut locks = Vec::new();
            let mut events = Vec::new();
            let (mut stored, mut removed) = (0, 0);
            for _ in 0..1500 {
                let ns: Namespace = rng.random_range(0..2);
                let len = rng.random_range(1..22);
                let seq: Vec<u32> = (0..len).map(|_| rng.random_range(0..3)).collect();
                match rng.random_range(0..10) {
                    0..=4 => {
                        let prefix = tree.match_prefix(ns, &seq).slots;
                        let need = seq.len() - prefix.len();
                        if alloc.free_count() < need {
                            let freed = tree.evict(need - alloc.free_count());
                            alloc.free(&freed).unwrap();
                        }
                        let Ok(fresh) = alloc.allocate(need) else {
                            continue;
                        };
                        let slots: Vec<_> = prefix.iter().copied().chain(fresh).collect();
                        let cached = tree.insert(ns, &seq, &slots);
                        alloc.free(&slots[prefix.len()..cached]).unwrap();
                    }
                    5..=6 => {
                        if let Some(node) = tree.match_prefix(ns, &seq).node {
                            tree.lock(node);
                            locks.push(node);
                        }
                    }
                    7 => {
                        if !locks.is_empty() {
                            let i = rng.random_range(0..locks.len());
                            tree.unlock(locks.swap_remove(i));
                        }
                    }
                    _ => {
                        let freed = tree.evict(rng.random_range(1..30));
                        alloc.free(&freed).unwrap();
                    }
                }
                tree.drain_events(&mut events);
                for ev in events.drain(..) {
                    match &ev {
                        KvEvent::Stored { hashes, .. } => stored += hashes.len(),
                        KvEvent::Removed { hashes, .. } => removed += hashes.len(),
                        KvEvent::Cleared => {}
                    }
                    view.apply(&ev, P);
                }
                let mut want_prefixes = HashSet::new();
                let mut want_hashes = HashSet::new();
                for (ns, toks, _) in tree.cached_sequences() {
                    for k in 1..=toks.len() / P {
                        want_prefixes.insert((ns, toks[..k * P].to_vec()));
                    }
                    want_hashes.extend(page_hashes(ns, P, &toks));
                }
                assert_eq!(view.prefixes(), want_prefixes, "seed {seed}: prefixes");
                let held: HashSet<u64> = view.pages.keys().copied().collect();
                assert_eq!(held, want_hashes, "seed {seed}: hashes");
            }
            let mut fresh = View::default();
            for ev in tree.snapshot_events() {
                fresh.apply(&ev, P);
            }
            assert_eq!(fresh.pages, view.pages, "seed {seed}: snapshot");
            assert!(
                stored > 100 && removed > 50,
                "seed {seed}: {stored} / {removed}"
            );
        }
    }

    /// The block cache's events rebuild its blocks, and its snapshot the same view.
    #[test]
    fn events_rebuild_the_block_cache() {
        const P: usize = 4;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut cache = BlockCache::new(P);
        assert!(PrefixCache::enable_events(&mut cache, 16).is_err());
        PrefixCache::enable_events(&mut cache, P).unwrap();
        let mut alloc = SlotAllocator::new(100);
        let mut view = View::default();
        let mut events = Vec::new();
        for _ in 0..1000 {
            let ns: Namespace = rng.random_range(0..2);
            let seq: Vec<u32> = (0..rng.random_range(1..22))
                .map(|_| rng.random_range(0..3))
                .collect();
            if rng.random_bool(0.7) {
                let prefix = PrefixCache::match_prefix(&mut cache, ns, &seq).slots;
                let need = seq.len() - prefix.len();
                if alloc.free_count() < need {
                    let freed = PrefixCache::evict(&mut cache, need - alloc.free_count());
                    alloc.free(&freed).unwrap();
                }
                let Ok(fresh) = alloc.allocate(need) else {
                    continue;
                };
                let slots: Vec<_> = prefix.iter().copied().chain(fresh).collect();
                let ins = PrefixCache::insert(&mut cache, ns, &seq, &slots);
                alloc
                    .free(&slots[prefix.len()..ins.already_cached])
                    .unwrap();
                alloc.free(&slots[ins.cached_until..]).unwrap();
            } else {
                let freed = PrefixCache::evict(&mut cache, rng.random_range(1..30));
                alloc.free(&freed).unwrap();
            }
            PrefixCache::drain_events(&mut cache, &mut events);
            for ev in events.drain(..) {
                view.apply(&ev, P);
            }
            assert_eq!(view.pages.len() * P, PrefixCache::cached_slots(&cache));
        }
        let mut fresh = View::default();
        for ev in PrefixCache::snapshot_events(&cache) {
            fresh.apply(&ev, P);
        }
        assert_eq!(fresh.pages, view.pages);
        assert!(view.pages.len() > 5);
    }
}
