//! The radix prefix cache: every prefix the engine has computed, keyed by token ids, with the
//! KV slots that hold it.
//!
//! The design follows SGLang's RadixAttention: a radix tree with page size 1 (a match may end at
//! any token), nodes own the slot indices of their edge, running requests lock their prefix by
//! reference count along the path so it can never be evicted, and eviction frees unlocked
//! leaves in least-recently-used order (a parent becomes evictable when its last child goes).
//!
//! ```text
//!   namespace root
//!    └─ [1 5 9]            slots [40 41 42]
//!        ├─ [7 7]          slots [43 44]        <- "1 5 9 7 7" cached
//!        └─ [2]            slots [60]           <- "1 5 9 2" cached
//!
//!   match_prefix([1 5 3]) ends inside [1 5 9]: the edge is split first
//!    └─ [1 5]              slots [40 41]        <- match returns this node, 2 tokens
//!        └─ [9]            slots [42]
//!            ├─ [7 7] ...
//!            └─ [2] ...
//! ```
//!
//! Namespaces (a tenant, an adapter) get separate roots, so different namespaces never share
//! KV. The tree only accounts for slots; the K/V tensors live in the model's pool.

use std::collections::{BinaryHeap, HashMap};

use crate::slots::SlotId;

/// Which cache a request may share KV with: different namespaces never share a prefix.
pub type Namespace = u64;

/// Index of a node in a cache's arena (a radix node or a block), the handle that locks a
/// cached prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u32);

impl NodeId {
    pub(crate) fn index(self) -> usize {
        self.0 as usize
    }

    pub(crate) fn from_index(i: usize) -> Self {
        Self(u32::try_from(i).expect("fewer than 2^32 nodes"))
    }
}

#[derive(Debug)]
struct Node {
    /// Token ids of the edge from the parent to this node.
    key: Vec<u32>,
    /// One slot per token of `key`.
    slots: Vec<SlotId>,
    parent: Option<NodeId>,
    /// Children by the first token of their edge.
    children: HashMap<u32, NodeId>,
    /// Running requests whose prefix passes through this node.
    lock_ref: u32,
    /// Logical time of the last match or insert that reached this node.
    last_access: u64,
}

/// The result of [`RadixCache::match_prefix`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixMatch {
    /// The deepest node of the match: lock it to keep the prefix while it is used.
    pub node: NodeId,
    /// Slots of the matched prefix, in token order.
    pub slots: Vec<SlotId>,
}

impl PrefixMatch {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[derive(Debug, Default)]
pub struct RadixCache {
    nodes: Vec<Option<Node>>,
    free_nodes: Vec<NodeId>,
    roots: HashMap<Namespace, NodeId>,
    clock: u64,
    /// Slots owned by the tree.
    cached: usize,
    /// Of those, slots on locked nodes (not evictable).
    locked: usize,
}

impl RadixCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Slots the tree owns (cached prefixes, locked or not).
    pub fn cached_slots(&self) -> usize {
        self.cached
    }

    /// Slots the tree owns on paths locked by running requests.
    pub fn locked_slots(&self) -> usize {
        self.locked
    }

    /// Slots that [`RadixCache::evict`] could free now.
    pub fn evictable_slots(&self) -> usize {
        self.cached - self.locked
    }

    fn node(&self, id: NodeId) -> &Node {
        self.nodes[id.0 as usize]
            .as_ref()
            .expect("a NodeId handed out by this tree is live until evicted")
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        self.nodes[id.0 as usize]
            .as_mut()
            .expect("a NodeId handed out by this tree is live until evicted")
    }

    fn alloc_node(&mut self, node: Node) -> NodeId {
        if let Some(id) = self.free_nodes.pop() {
            self.nodes[id.0 as usize] = Some(node);
            id
        } else {
            self.nodes.push(Some(node));
            NodeId(self.nodes.len() as u32 - 1)
        }
    }

    fn root(&mut self, ns: Namespace) -> NodeId {
        if let Some(&r) = self.roots.get(&ns) {
            return r;
        }
        let r = self.alloc_node(Node {
            key: Vec::new(),
            slots: Vec::new(),
            parent: None,
            children: HashMap::new(),
            // Roots are never evicted.
            lock_ref: 1,
            last_access: 0,
        });
        self.roots.insert(ns, r);
        r
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Splits `id`'s edge after `at` tokens (0 < at < len): a new parent takes the first `at`
    /// tokens and slots, `id` keeps the rest. Returns the new parent.
    fn split(&mut self, id: NodeId, at: usize) -> NodeId {
        let (parent, key_head, slots_head, lock_ref, last_access) = {
            let n = self.node_mut(id);
            let key_tail = n.key.split_off(at);
            let slots_tail = n.slots.split_off(at);
            let key_head = std::mem::replace(&mut n.key, key_tail);
            let slots_head = std::mem::replace(&mut n.slots, slots_tail);
            (n.parent, key_head, slots_head, n.lock_ref, n.last_access)
        };
        let first_rest = self.node(id).key[0];
        let first_head = key_head[0];
        let mid = self.alloc_node(Node {
            key: key_head,
            slots: slots_head,
            parent,
            children: HashMap::from([(first_rest, id)]),
            // Every lock through `id` also passes through the new parent.
            lock_ref,
            last_access,
        });
        self.node_mut(id).parent = Some(mid);
        let p = parent
            .expect("only roots have no parent, and roots have empty edges that are never split");
        self.node_mut(p).children.insert(first_head, mid);
        mid
    }

    /// The longest cached prefix of `tokens` in namespace `ns`. A match ending inside an edge
    /// splits it so the returned node covers exactly the match.
    pub fn match_prefix(&mut self, ns: Namespace, tokens: &[u32]) -> PrefixMatch {
        let now = self.tick();
        let mut node = self.root(ns);
        self.node_mut(node).last_access = now;
        let mut slots = Vec::new();
        let mut pos = 0;
        while let Some((child, common)) = self.descend(node, &tokens[pos..], now) {
            slots.extend_from_slice(&self.node(child).slots);
            pos += common;
            node = child;
        }
        PrefixMatch { node, slots }
    }

    /// Length of the longest cached prefix of `tokens`, without splitting nodes or touching
    /// access times (for scheduling decisions).
    pub fn peek_prefix_len(&self, ns: Namespace, tokens: &[u32]) -> usize {
        let Some(&root) = self.roots.get(&ns) else {
            return 0;
        };
        let (mut node, mut pos) = (root, 0);
        while let Some(&child) = tokens
            .get(pos)
            .and_then(|t| self.node(node).children.get(t))
        {
            let key = &self.node(child).key;
            let common = key
                .iter()
                .zip(&tokens[pos..])
                .take_while(|(a, b)| a == b)
                .count();
            pos += common;
            if common < key.len() {
                break;
            }
            node = child;
        }
        pos
    }

    /// One step down from `node` along `rest` (non-empty): the child whose edge starts with
    /// `rest[0]`, split so that its whole edge matches, and the number of tokens matched.
    /// `None` when no edge starts with `rest[0]` (or `rest` is empty).
    fn descend(&mut self, node: NodeId, rest: &[u32], now: u64) -> Option<(NodeId, usize)> {
        let &child = self.node(node).children.get(rest.first()?)?;
        let key = &self.node(child).key;
        let common = key.iter().zip(rest).take_while(|(a, b)| a == b).count();
        let child = if common < key.len() {
            self.split(child, common)
        } else {
            child
        };
        self.node_mut(child).last_access = now;
        Some((child, common))
    }

    /// Caches `tokens` with their `slots` (same length). Returns how many leading tokens were
    /// already cached: the tree keeps its own slots for those, so the caller's slots at
    /// `..returned` that differ from the tree's are duplicates for the caller to free; the
    /// tree takes ownership of `slots[returned..]`.
    pub fn insert(&mut self, ns: Namespace, tokens: &[u32], slots: &[SlotId]) -> usize {
        assert_eq!(tokens.len(), slots.len(), "one slot per token");
        let now = self.tick();
        let mut node = self.root(ns);
        let mut pos = 0;
        while pos < tokens.len() {
            match self.descend(node, &tokens[pos..], now) {
                Some((child, common)) => {
                    pos += common;
                    node = child;
                }
                None => {
                    let leaf = self.alloc_node(Node {
                        key: tokens[pos..].to_vec(),
                        slots: slots[pos..].to_vec(),
                        parent: Some(node),
                        children: HashMap::new(),
                        lock_ref: 0,
                        last_access: now,
                    });
                    self.node_mut(node).children.insert(tokens[pos], leaf);
                    self.cached += tokens.len() - pos;
                    return pos;
                }
            }
        }
        pos
    }

    /// Protects the path from `node` to its root from eviction (one more running request).
    pub fn lock(&mut self, node: NodeId) {
        let mut cur = Some(node);
        while let Some(id) = cur {
            let n = self.node_mut(id);
            let newly_locked = n.lock_ref == 0;
            n.lock_ref += 1;
            let (len, parent) = (n.slots.len(), n.parent);
            if newly_locked {
                self.locked += len;
            }
            cur = parent;
        }
    }

    /// Releases a [`RadixCache::lock`].
    pub fn unlock(&mut self, node: NodeId) {
        let mut cur = Some(node);
        while let Some(id) = cur {
            let n = self.node_mut(id);
            assert!(n.lock_ref > 0, "unlock without a matching lock");
            n.lock_ref -= 1;
            let (now_free, len, parent) = (n.lock_ref == 0, n.slots.len(), n.parent);
            if now_free {
                self.locked -= len;
            }
            cur = parent;
        }
    }

    /// Frees at least `wanted` slots if it can, evicting unlocked leaves, least recently used
    /// first; a parent whose last child goes becomes a candidate in turn. Returns the freed
    /// slots (fewer than `wanted` when not enough are evictable).
    pub fn evict(&mut self, wanted: usize) -> Vec<SlotId> {
        let mut freed = Vec::new();
        // Min-heap on last access (Reverse), then node id for a deterministic order.
        let mut heap: BinaryHeap<std::cmp::Reverse<(u64, NodeId)>> = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let n = n.as_ref()?;
                (n.children.is_empty() && n.lock_ref == 0 && n.parent.is_some())
                    .then_some(std::cmp::Reverse((n.last_access, NodeId(i as u32))))
            })
            .collect();
        while freed.len() < wanted {
            let Some(std::cmp::Reverse((_, id))) = heap.pop() else {
                break;
            };
            let node = self.nodes[id.0 as usize]
                .take()
                .expect("heap holds live nodes only");
            self.free_nodes.push(id);
            self.cached -= node.slots.len();
            freed.extend_from_slice(&node.slots);
            let parent = node.parent.expect("roots are never evicted");
            let p = self.node_mut(parent);
            p.children.remove(&node.key[0]);
            if p.children.is_empty() && p.lock_ref == 0 && p.parent.is_some() {
                heap.push(std::cmp::Reverse((p.last_access, parent)));
            }
        }
        freed
    }

    /// Every cached sequence that ends at a leaf, with its slots, per namespace (tests and
    /// debugging; walks the whole tree).
    pub fn cached_sequences(&self) -> Vec<(Namespace, Vec<u32>, Vec<SlotId>)> {
        let mut out = Vec::new();
        for (&ns, &root) in &self.roots {
            let mut stack = vec![(root, Vec::new(), Vec::new())];
            while let Some((id, toks, slots)) = stack.pop() {
                let n = self.node(id);
                if n.children.is_empty() && n.parent.is_some() {
                    out.push((ns, toks.clone(), slots.clone()));
                }
                for &c in n.children.values() {
                    let cn = self.node(c);
                    let mut t = toks.clone();
                    t.extend_from_slice(&cn.key);
                    let mut s = slots.clone();
                    s.extend_from_slice(&cn.slots);
                    stack.push((c, t, s));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::SlotAllocator;
    use rand::{Rng, SeedableRng};
    use std::collections::HashSet;

    #[test]
    fn split_on_partial_match_and_reuse() {
        let mut t = RadixCache::new();
        assert_eq!(t.insert(0, &[1, 5, 9, 7, 7], &[40, 41, 42, 43, 44]), 0);
        assert_eq!(t.insert(0, &[1, 5, 9, 2], &[50, 51, 52, 60]), 3);
        let m = t.match_prefix(0, &[1, 5, 3]);
        assert_eq!(m.slots, vec![40, 41]);
        let m = t.match_prefix(0, &[1, 5, 9, 2, 8]);
        assert_eq!(m.slots, vec![40, 41, 42, 60]);
        // Another namespace shares nothing.
        assert!(t.match_prefix(1, &[1, 5, 9]).is_empty());
        assert_eq!(t.cached_slots(), 6);
    }

    #[test]
    fn locked_prefix_survives_eviction_and_parents_become_evictable() {
        let mut t = RadixCache::new();
        t.insert(0, &[1, 2, 3], &[0, 1, 2]);
        t.insert(0, &[1, 2, 4, 5], &[0, 1, 3, 4]);
        let m = t.match_prefix(0, &[1, 2, 4]);
        t.lock(m.node);
        assert_eq!(t.locked_slots(), 3);
        // Only [3] (slot 2) and [5] (slot 4) are evictable.
        let mut freed = t.evict(100);
        freed.sort();
        assert_eq!(freed, vec![2, 4]);
        assert_eq!(t.match_prefix(0, &[1, 2, 4, 5]).slots, vec![0, 1, 3]);
        t.unlock(m.node);
        let mut freed = t.evict(100);
        freed.sort();
        assert_eq!(freed, vec![0, 1, 3]);
        assert_eq!(t.cached_slots(), 0);
    }

    #[test]
    fn eviction_is_least_recently_used_first() {
        let mut t = RadixCache::new();
        t.insert(0, &[1, 1], &[0, 1]);
        t.insert(0, &[2, 2], &[2, 3]);
        t.insert(0, &[3, 3], &[4, 5]);
        t.match_prefix(0, &[1, 1]);
        assert_eq!(t.evict(1), vec![2, 3]);
        assert_eq!(t.evict(1), vec![4, 5]);
        assert_eq!(t.evict(1), vec![0, 1]);
    }

    /// Random inserts, matches, locks, unlocks and evictions over a 3-token vocabulary, checking
    /// after every operation that slot accounting is conserved, no slot is owned twice, locked
    /// prefixes stay cached with their slots, every cached prefix keeps the slots it was first
    /// cached with, and every match equals a brute-force longest common prefix.
    #[test]
    fn invariants_hold_under_random_operations() {
        const TOTAL: usize = 160;
        for seed in 0..20u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut tree = RadixCache::new();
            let mut alloc = SlotAllocator::new(TOTAL);
            // The slot the tree gave each (namespace, prefix) when it was first cached.
            let mut owner: HashMap<(Namespace, Vec<u32>), SlotId> = HashMap::new();
            // Running requests: (namespace, locked prefix, its slots, node).
            let mut locks: Vec<(Namespace, Vec<u32>, Vec<SlotId>, NodeId)> = Vec::new();
            for _ in 0..3000 {
                let ns: Namespace = rng.random_range(0..2);
                let len = rng.random_range(1..10);
                let seq: Vec<u32> = (0..len).map(|_| rng.random_range(0..3)).collect();
                match rng.random_range(0..10) {
                    0..=3 => {
                        // A request: reuse the cached prefix (or not), compute the rest, cache it.
                        let reuse = rng.random_bool(0.7);
                        let prefix = if reuse {
                            tree.match_prefix(ns, &seq).slots
                        } else {
                            Vec::new()
                        };
                        let need = seq.len() - prefix.len();
                        if alloc.free_count() < need {
                            let freed = tree.evict(need - alloc.free_count());
                            for s in &freed {
                                owner.retain(|_, v| v != s);
                            }
                            alloc.free(&freed).unwrap();
                        }
                        let Ok(fresh) = alloc.allocate(need) else {
                            continue;
                        };
                        let slots: Vec<SlotId> = prefix.iter().copied().chain(fresh).collect();
                        let cached = tree.insert(ns, &seq, &slots);
                        assert!(cached >= prefix.len());
                        // Duplicates: our own slots for positions the tree already had.
                        alloc.free(&slots[prefix.len()..cached]).unwrap();
                        for i in cached..seq.len() {
                            owner.insert((ns, seq[..=i].to_vec()), slots[i]);
                        }
                    }
                    4..=5 => {
                        let m = tree.match_prefix(ns, &seq);
                        tree.lock(m.node);
                        let toks = seq[..m.len()].to_vec();
                        locks.push((ns, toks, m.slots, m.node));
                    }
                    6..=7 => {
                        if !locks.is_empty() {
                            let i = rng.random_range(0..locks.len());
                            let (_, _, _, node) = locks.swap_remove(i);
                            tree.unlock(node);
                        }
                    }
                    _ => {
                        let freed = tree.evict(rng.random_range(1..20));
                        for s in &freed {
                            owner.retain(|_, v| v != s);
                        }
                        alloc.free(&freed).unwrap();
                    }
                }

                // Conservation: every slot is free or owned by the tree, exactly once.
                let seqs = tree.cached_sequences();
                let mut tree_slots = HashSet::new();
                for (ns, toks, slots) in &seqs {
                    for (i, s) in slots.iter().enumerate() {
                        assert_eq!(
                            owner.get(&(*ns, toks[..=i].to_vec())),
                            Some(s),
                            "seed {seed}: slot of a cached prefix changed"
                        );
                        tree_slots.insert(*s);
                    }
                }
                assert_eq!(
                    tree_slots.len(),
                    tree.cached_slots(),
                    "seed {seed}: slot owned twice or count drift"
                );
                assert_eq!(
                    alloc.free_count() + tree.cached_slots(),
                    TOTAL,
                    "seed {seed}: slots leaked"
                );
                assert!(tree.locked_slots() <= tree.cached_slots());
                // Locked prefixes are still cached with the same slots.
                for (ns, toks, slots, _) in &locks {
                    let m = tree.match_prefix(*ns, toks);
                    assert_eq!(&m.slots, slots, "seed {seed}: a locked prefix was evicted");
                }
                // Matches against brute force over the cached sequences.
                let probe: Vec<u32> = (0..rng.random_range(0..10))
                    .map(|_| rng.random_range(0..3))
                    .collect();
                let pns: Namespace = rng.random_range(0..2);
                let brute = seqs
                    .iter()
                    .filter(|(n, _, _)| *n == pns)
                    .map(|(_, t, _)| t.iter().zip(&probe).take_while(|(a, b)| a == b).count())
                    .max()
                    .unwrap_or(0);
                assert_eq!(
                    tree.match_prefix(pns, &probe).len(),
                    brute,
                    "seed {seed}: match {probe:?}"
                );
            }
            // With every lock released, everything is evictable and comes back.
            for (_, _, _, node) in locks.drain(..) {
                tree.unlock(node);
            }
            assert_eq!(tree.locked_slots(), 0);
            let freed = tree.evict(usize::MAX);
            alloc.free(&freed).unwrap();
            assert_eq!(alloc.free_count(), TOTAL);
        }
    }
}
