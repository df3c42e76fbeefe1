//! The block-hash prefix cache, for comparison with the radix tree: vLLM's automatic prefix
//! caching, on the same slot pool.
//!
//! Tokens are cut into fixed blocks of `block_size` (16, as in vLLM). A block is identified by
//! a hash chained over its namespace, its parent block's hash and its own tokens, so equal
//! hashes mean equal whole prefixes. Only whole blocks are cached and reused: a request reuses
//! the longest run of blocks it shares exactly, and a partial last block is always recomputed.
//! Unreferenced blocks are evicted least recently used first, leaves before their parents.
//!
//! ```text
//!   tokens  [t0 .. t15][t16 .. t31][t32 .. t37]
//!   hashes   h1 = H(ns, -, b0)  h2 = H(ns, h1, b1)   (partial block: not cached)
//! ```

use std::collections::{BinaryHeap, HashMap};

use crate::events::{page_hash, EventLog, KvEvent};
use crate::radix::{Namespace, NodeId};
use crate::slots::SlotId;

#[derive(Debug)]
struct Block {
    hash: u64,
    parent: Option<NodeId>,
    namespace: Namespace,
    tokens: Vec<u32>,
    slots: Vec<SlotId>,
    children: u32,
    lock_ref: u32,
    last_access: u64,
}

#[derive(Debug)]
pub struct BlockCache {
    block_size: usize,
    blocks: Vec<Option<Block>>,
    free_ids: Vec<NodeId>,
    by_hash: HashMap<u64, NodeId>,
    clock: u64,
    cached: usize,
    locked: usize,
    /// Block changes since the last drain (`None`: KV events off). A block is a page.
    events: Option<EventLog>,
}

// The page hash of the KV events: a block's identity is the page a router sees. Collisions
// are checked on lookup.
use page_hash as chain_hash;

impl BlockCache {
    pub fn new(block_size: usize) -> Self {
        assert!(block_size > 0, "blocks hold at least one token");
        Self {
            block_size,
            blocks: Vec::new(),
            free_ids: Vec::new(),
            by_hash: HashMap::new(),
            clock: 0,
            cached: 0,
            locked: 0,
            events: None,
        }
    }

    /// Turns on block events; pages must be the blocks, and nothing may be cached yet.
    pub fn enable_events(&mut self, page_size: usize) -> Result<(), String> {
        if page_size != self.block_size {
            return Err(format!(
                "the block cache's blocks are {} tokens: KV event pages must be too, not {page_size}",
                self.block_size
            ));
        }
        if self.cached > 0 {
            return Err("KV events must be enabled before anything is cached".into());
        }
        self.events = Some(EventLog::new(page_size));
        Ok(())
    }

    pub fn drain_events(&mut self, out: &mut Vec<KvEvent>) {
        if let Some(log) = &mut self.events {
            out.append(&mut log.events);
        }
    }

    /// `Stored` events for every cached block, parents before children.
    pub fn snapshot_events(&self) -> Vec<KvEvent> {
        if self.events.is_none() {
            return Vec::new();
        }
        let mut live: Vec<(usize, &Block)> = Vec::new();
        for b in self.blocks.iter().flatten() {
            let mut depth = 0;
            let mut cur = b.parent;
            while let Some(p) = cur {
                depth += 1;
                cur = self.block(p).parent;
            }
            live.push((depth, b));
        }
        live.sort_by_key(|&(d, _)| d);
        live.into_iter()
            .map(|(_, b)| KvEvent::Stored {
                namespace: b.namespace,
                parent: b.parent.map(|p| self.block(p).hash),
                hashes: vec![b.hash],
                tokens: b.tokens.clone(),
            })
            .collect()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    fn block(&self, id: NodeId) -> &Block {
        self.blocks[id.index()]
            .as_ref()
            .expect("a block id handed out by this cache is live until evicted")
    }

    fn block_mut(&mut self, id: NodeId) -> &mut Block {
        self.blocks[id.index()]
            .as_mut()
            .expect("a block id handed out by this cache is live until evicted")
    }

    /// The cached block for `tokens` after `parent`, if any.
    fn find(&self, ns: Namespace, parent: Option<NodeId>, tokens: &[u32]) -> Option<NodeId> {
        let parent_hash = parent.map(|p| self.block(p).hash);
        let id = *self.by_hash.get(&chain_hash(ns, parent_hash, tokens))?;
        let b = self.block(id);
        (b.parent == parent && b.tokens == tokens).then_some(id)
    }

    /// Whole cached blocks at the start of `tokens`: the last block and the slots.
    pub fn match_prefix(&mut self, ns: Namespace, tokens: &[u32]) -> (Option<NodeId>, Vec<SlotId>) {
        self.clock += 1;
        let now = self.clock;
        let (mut last, mut slots) = (None, Vec::new());
        for chunk in tokens.chunks_exact(self.block_size) {
            let Some(id) = self.find(ns, last, chunk) else {
                break;
            };
            let b = self.block_mut(id);
            b.last_access = now;
            slots.extend_from_slice(&b.slots);
            last = Some(id);
        }
        (last, slots)
    }

    pub fn peek_prefix_len(&self, ns: Namespace, tokens: &[u32]) -> usize {
        let mut last = None;
        let mut n = 0;
        for chunk in tokens.chunks_exact(self.block_size) {
            let Some(id) = self.find(ns, last, chunk) else {
                break;
            };
            last = Some(id);
            n += chunk.len();
        }
        n
    }

    /// Caches the whole blocks of `tokens`. Returns (tokens already cached, tokens cached now
    /// in all): the cache owns `slots[already..until]` afterwards; the partial last block's
    /// slots stay the caller's.
    pub fn insert(&mut self, ns: Namespace, tokens: &[u32], slots: &[SlotId]) -> (usize, usize) {
        assert_eq!(tokens.len(), slots.len(), "one slot per token");
        self.clock += 1;
        let now = self.clock;
        let bs = self.block_size;
        let mut last: Option<NodeId> = None;
        let mut already = 0;
        let mut pos = 0;
        while pos + bs <= tokens.len() {
            let chunk = &tokens[pos..pos + bs];
            let id = match self.find(ns, last, chunk) {
                Some(id) => {
                    if already == pos {
                        already += bs;
                    }
                    id
                }
                None => {
                    let parent_hash = last.map(|p| self.block(p).hash);
                    let hash = chain_hash(ns, parent_hash, chunk);
                    if let Some(log) = &mut self.events {
                        log.events.push(KvEvent::Stored {
                            namespace: ns,
                            parent: parent_hash,
                            hashes: vec![hash],
                            tokens: chunk.to_vec(),
                        });
                    }
                    let block = Block {
                        hash,
                        parent: last,
                        namespace: ns,
                        tokens: chunk.to_vec(),
                        slots: slots[pos..pos + bs].to_vec(),
                        children: 0,
                        lock_ref: 0,
                        last_access: now,
                    };
                    let id = match self.free_ids.pop() {
                        Some(id) => {
                            self.blocks[id.index()] = Some(block);
                            id
                        }
                        None => {
                            self.blocks.push(Some(block));
                            NodeId::from_index(self.blocks.len() - 1)
                        }
                    };
                    // A colliding hash of a different prefix: the newer block wins the index.
                    self.by_hash.insert(hash, id);
                    if let Some(p) = last {
                        self.block_mut(p).children += 1;
                    }
                    self.cached += bs;
                    id
                }
            };
            self.block_mut(id).last_access = now;
            last = Some(id);
            pos += bs;
        }
        (already, pos)
    }

    pub fn lock(&mut self, node: NodeId) {
        let mut cur = Some(node);
        while let Some(id) = cur {
            let b = self.block_mut(id);
            b.lock_ref += 1;
            let (first, len, parent) = (b.lock_ref == 1, b.slots.len(), b.parent);
            if first {
                self.locked += len;
            }
            cur = parent;
        }
    }

    pub fn unlock(&mut self, node: NodeId) {
        let mut cur = Some(node);
        while let Some(id) = cur {
            let b = self.block_mut(id);
            assert!(b.lock_ref > 0, "unlock without a matching lock");
            b.lock_ref -= 1;
            let (now_free, len, parent) = (b.lock_ref == 0, b.slots.len(), b.parent);
            if now_free {
                self.locked -= len;
            }
            cur = parent;
        }
    }

    pub fn evict(&mut self, wanted: usize) -> Vec<SlotId> {
        let mut heap: BinaryHeap<std::cmp::Reverse<(u64, NodeId)>> = self
            .blocks
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let b = b.as_ref()?;
                (b.children == 0 && b.lock_ref == 0)
                    .then_some(std::cmp::Reverse((b.last_access, NodeId::from_index(i))))
            })
            .collect();
        let mut freed = Vec::new();
        while freed.len() < wanted {
            let Some(std::cmp::Reverse((_, id))) = heap.pop() else {
                break;
            };
            let b = self.blocks[id.index()]
                .take()
                .expect("heap holds live blocks only");
            self.free_ids.push(id);
            if self.by_hash.get(&b.hash) == Some(&id) {
                self.by_hash.remove(&b.hash);
            }
            self.cached -= b.slots.len();
            freed.extend_from_slice(&b.slots);
            if let Some(log) = &mut self.events {
                log.events.push(KvEvent::Removed {
                    namespace: b.namespace,
                    hashes: vec![b.hash],
                });
            }
            if let Some(p) = b.parent {
                let pb = self.block_mut(p);
                pb.children -= 1;
                if pb.children == 0 && pb.lock_ref == 0 {
                    heap.push(std::cmp::Reverse((pb.last_access, p)));
                }
            }
        }
        freed
    }

    pub fn cached_slots(&self) -> usize {
        self.cached
    }

    pub fn locked_slots(&self) -> usize {
        self.locked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_blocks_are_cached_and_reused() {
        let mut c = BlockCache::new(4);
        let toks: Vec<u32> = (0..10).collect();
        let slots: Vec<SlotId> = (100..110).collect();
        assert_eq!(c.insert(0, &toks, &slots), (0, 8));
        assert_eq!(c.cached_slots(), 8);
        // Shares 6 tokens: only the first whole block is reused.
        let other = [0, 1, 2, 3, 4, 5, 99, 98, 97];
        let (node, hit) = c.match_prefix(0, &other);
        assert_eq!(hit, vec![100, 101, 102, 103]);
        assert!(node.is_some());
        assert_eq!(c.peek_prefix_len(0, &toks), 8);
        assert!(
            c.match_prefix(1, &toks).1.is_empty(),
            "namespaces never share"
        );
        // Re-inserting the same tokens with other slots: all already cached.
        let dup: Vec<SlotId> = (200..210).collect();
        assert_eq!(c.insert(0, &toks, &dup), (8, 8));
    }

    /// Random inserts, matches, locks, unlocks and evictions: slots conserved, never owned
    /// twice, locked prefixes kept, matches whole blocks of the brute-force common prefix.
    #[test]
    fn invariants_hold_under_random_operations() {
        use crate::slots::SlotAllocator;
        use rand::{Rng, SeedableRng};
        const TOTAL: usize = 120;
        for seed in 0..10u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut c = BlockCache::new(2);
            let mut alloc = SlotAllocator::new(TOTAL);
            let mut locks: Vec<(Namespace, Vec<u32>, Vec<SlotId>, NodeId)> = Vec::new();
            let (mut checked_probes, mut nonempty_matches) = (0, 0);
            for _ in 0..2000 {
                let ns: Namespace = rng.random_range(0..2);
                let seq: Vec<u32> = (0..rng.random_range(1..9))
                    .map(|_| rng.random_range(0..2))
                    .collect();
                match rng.random_range(0..10) {
                    0..=3 => {
                        let (_, hit) = c.match_prefix(ns, &seq);
                        let need = seq.len() - hit.len();
                        if alloc.free_count() < need {
                            let freed = c.evict(need - alloc.free_count());
                            alloc.free(&freed).unwrap();
                        }
                        let Ok(fresh) = alloc.allocate(need) else {
                            continue;
                        };
                        let slots: Vec<SlotId> = hit.iter().copied().chain(fresh).collect();
                        let (already, until) = c.insert(ns, &seq, &slots);
                        assert!(already >= hit.len() && until == seq.len() / 2 * 2);
                        alloc.free(&slots[hit.len()..already]).unwrap();
                        alloc.free(&slots[until..]).unwrap();
                    }
                    4..=5 => {
                        let (node, hit) = c.match_prefix(ns, &seq);
                        if let Some(n) = node {
                            c.lock(n);
                            locks.push((ns, seq[..hit.len()].to_vec(), hit, n));
                        }
                    }
                    6..=7 => {
                        if !locks.is_empty() {
                            let (_, _, _, n) = locks.swap_remove(rng.random_range(0..locks.len()));
                            c.unlock(n);
                        }
                    }
                    _ => {
                        let freed = c.evict(rng.random_range(1..12));
                        alloc.free(&freed).unwrap();
                    }
                }
                let mut owned: Vec<SlotId> = c
                    .blocks
                    .iter()
                    .flatten()
                    .flat_map(|b| b.slots.iter().copied())
                    .collect();
                owned.sort_unstable();
                let n = owned.len();
                owned.dedup();
                assert_eq!(owned.len(), n, "seed {seed}: a slot owned twice");
                assert_eq!(n, c.cached_slots());
                assert_eq!(
                    alloc.free_count() + c.cached_slots(),
                    TOTAL,
                    "seed {seed}: slots leaked"
                );
                for (ns, toks, slots, _) in &locks {
                    assert_eq!(
                        &c.match_prefix(*ns, toks).1,
                        slots,
                        "seed {seed}: locked prefix lost"
                    );
                }
                // A match is exactly the longest whole-block prefix of the probe among the
                // block chains still cached (brute force: each live block's full token path,
                // its namespace recovered from its chained hash).
                let probe: Vec<u32> = (0..rng.random_range(0..9))
                    .map(|_| rng.random_range(0..2))
                    .collect();
                let pns: Namespace = rng.random_range(0..2);
                let mut live_paths = 0;
                let want = c
                    .blocks
                    .iter()
                    .flatten()
                    .filter_map(|b| {
                        let mut path = b.tokens.clone();
                        let mut cur = b.parent;
                        while let Some(p) = cur {
                            let pb = c.block(p);
                            path.splice(0..0, pb.tokens.iter().copied());
                            cur = pb.parent;
                        }
                        live_paths += 1;
                        let parent_hash = b.parent.map(|p| c.block(p).hash);
                        let in_ns = chain_hash(pns, parent_hash, &b.tokens) == b.hash;
                        (in_ns && probe.starts_with(&path)).then_some(path.len())
                    })
                    .max()
                    .unwrap_or(0);
                assert_eq!(live_paths, c.blocks.iter().flatten().count());
                let got = c.peek_prefix_len(pns, &probe);
                assert_eq!(got, want, "seed {seed}: probe {probe:?} in namespace {pns}");
                checked_probes += 1;
                nonempty_matches += usize::from(got > 0);
                assert_eq!(c.match_prefix(pns, &probe).1.len(), got);
            }
            assert_eq!(checked_probes, 2000);
            // The probes exercised real matches, not just empty ones.
            assert!(
                nonempty_matches > 200,
                "seed {seed}: {nonempty_matches} non-empty matches"
            );
        }
    }

    #[test]
    fn locks_protect_and_eviction_goes_leaf_first() {
        let mut c = BlockCache::new(2);
        c.insert(0, &[1, 2, 3, 4], &[0, 1, 2, 3]);
        c.insert(0, &[5, 6], &[4, 5]);
        let (node, _) = c.match_prefix(0, &[1, 2]);
        c.lock(node.unwrap());
        let mut freed = c.evict(100);
        freed.sort();
        // [1 2] is locked; its child [3 4] and the unrelated [5 6] go.
        assert_eq!(freed, vec![2, 3, 4, 5]);
        c.unlock(node.unwrap());
        assert_eq!(c.evict(100), vec![0, 1]);
        assert_eq!(c.cached_slots(), 0);
    }
}
