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
//! KV. A root exists only while something is cached under it: when its last child is evicted,
//! the root goes too (every distinct `cache_salt` would otherwise leave a root forever). The
//! tree only accounts for slots; the K/V tensors live in the model's pool.
//!
//! Eviction candidates (unlocked leaves) are kept in an ordered set keyed by (last access,
//! node), updated as nodes are touched, locked and unlocked, so an eviction costs
//! O(log n) per leaf freed instead of a scan of the whole tree.

use std::collections::{BTreeSet, HashMap};

use crate::events::{page_hash, EventLog, KvEvent};
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
    /// The namespace whose tree this node is in (lets a root be unregistered in O(1)).
    namespace: Namespace,
    /// Position of `key[0]` in the sequence (the edge covers `start..start + key.len()`).
    start: usize,
    /// With KV events on: hashes of the pages whose last token is on this edge, in order (a
    /// page is gone when the node holding its last token is).
    pages: Vec<u64>,
}

/// The result of [`RadixCache::match_prefix`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixMatch {
    /// The deepest node of the match: lock it to keep the prefix while it is used (`None` for
    /// an empty match: there is nothing to keep).
    pub node: Option<NodeId>,
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
    /// Unlocked leaves (not roots) by (last access, id): the eviction order.
    evictable_leaves: BTreeSet<(u64, NodeId)>,
    /// The page view's changes since the last drain (`None`: KV events off).
    events: Option<EventLog>,
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

    /// Namespaces that have a root (something cached under them).
    pub fn namespaces(&self) -> usize {
        self.roots.len()
    }

    /// Live nodes, roots included.
    pub fn node_count(&self) -> usize {
        self.nodes.len() - self.free_nodes.len()
    }

    /// Whether `id` may be evicted now: a live, unlocked leaf that is not a root.
    fn is_evictable_leaf(n: &Node) -> bool {
        n.children.is_empty() && n.lock_ref == 0 && n.parent.is_some()
    }

    /// Puts `id` in the eviction order, or takes it out, as its state now says.
    fn sync_evictable(&mut self, id: NodeId) {
        let n = self.node(id);
        let key = (n.last_access, id);
        if Self::is_evictable_leaf(n) {
            self.evictable_leaves.insert(key);
        } else {
            self.evictable_leaves.remove(&key);
        }
    }

    /// Records an access to `id` at `now`, keeping the eviction order in step.
    fn touch(&mut self, id: NodeId, now: u64) {
        let old = self.node(id).last_access;
        if old == now {
            return;
        }
        let was = self.evictable_leaves.remove(&(old, id));
        self.node_mut(id).last_access = now;
        if was {
            self.evictable_leaves.insert((now, id));
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
            namespace: ns,
            start: 0,
            pages: Vec::new(),
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
        let page_size = self.page_size();
        let (parent, key_head, slots_head, pages_head, lock_ref, last_access, namespace, start) = {
            let n = self.node_mut(id);
            let key_tail = n.key.split_off(at);
            let slots_tail = n.slots.split_off(at);
            let key_head = std::mem::replace(&mut n.key, key_tail);
            let slots_head = std::mem::replace(&mut n.slots, slots_tail);
            // The head keeps the pages that end within its tokens.
            let head_pages = page_size.map_or(0, |p| (n.start + at) / p - n.start / p);
            let pages_tail = n.pages.split_off(head_pages);
            let pages_head = std::mem::replace(&mut n.pages, pages_tail);
            let start = n.start;
            n.start += at;
            (
                n.parent,
                key_head,
                slots_head,
                pages_head,
                n.lock_ref,
                n.last_access,
                n.namespace,
                start,
            )
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
            namespace,
            start,
            pages: pages_head,
        });
        self.node_mut(id).parent = Some(mid);
        let p = parent
            .expect("only roots have no parent, and roots have empty edges that are never split");
        self.node_mut(p).children.insert(first_head, mid);
        mid
    }

    /// The longest cached prefix of `tokens` in namespace `ns`. A match ending inside an edge
    /// splits it so the returned node covers exactly the match. A namespace with nothing
    /// cached gets no root from a match (only an insert creates one).
    pub fn match_prefix(&mut self, ns: Namespace, tokens: &[u32]) -> PrefixMatch {
        let Some(&root) = self.roots.get(&ns) else {
            return PrefixMatch {
                node: None,
                slots: Vec::new(),
            };
        };
        let now = self.tick();
        self.touch(root, now);
        let mut node = root;
        let mut slots = Vec::new();
        let mut pos = 0;
        while let Some((child, common)) = self.descend(node, &tokens[pos..], now) {
            slots.extend_from_slice(&self.node(child).slots);
            pos += common;
            node = child;
        }
        PrefixMatch {
            node: (node != root).then_some(node),
            slots,
        }
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
        self.touch(child, now);
        Some((child, common))
    }

    /// Caches `tokens` with their `slots` (same length). Returns how many leading tokens were
    /// already cached: the tree keeps its own slots for those, so the caller's slots at
    /// `..returned` that differ from the tree's are duplicates for the caller to free; the
    /// tree takes ownership of `slots[returned..]`.
    pub fn insert(&mut self, ns: Namespace, tokens: &[u32], slots: &[SlotId]) -> usize {
        assert_eq!(tokens.len(), slots.len(), "one slot per token");
        if tokens.is_empty() {
            return 0;
        }
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
                    let pages = self.store_pages(ns, node, tokens, pos);
                    let leaf = self.alloc_node(Node {
                        key: tokens[pos..].to_vec(),
                        slots: slots[pos..].to_vec(),
                        parent: Some(node),
                        children: HashMap::new(),
                        lock_ref: 0,
                        last_access: now,
                        namespace: ns,
                        start: pos,
                        pages,
                    });
                    self.node_mut(node).children.insert(tokens[pos], leaf);
                    // The parent stopped being a leaf; the new node is one.
                    self.sync_evictable(node);
                    self.sync_evictable(leaf);
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
                self.sync_evictable(id);
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
                self.sync_evictable(id);
            }
            cur = parent;
        }
    }

    /// Frees at least `wanted` slots if it can, evicting unlocked leaves, least recently used
    /// first; a parent whose last child goes becomes a candidate in turn, and a namespace root
    /// left with nothing under it is removed. Returns the freed slots (fewer than `wanted`
    /// when not enough are evictable).
    pub fn evict(&mut self, wanted: usize) -> Vec<SlotId> {
        let mut freed = Vec::new();
        while freed.len() < wanted {
            let Some((_, id)) = self.evictable_leaves.pop_first() else {
                break;
            };
            let node = self.nodes[id.0 as usize]
                .take()
                .expect("the eviction order holds live nodes only");
            self.free_nodes.push(id);
            self.cached -= node.slots.len();
            freed.extend_from_slice(&node.slots);
            if let Some(log) = &mut self.events {
                if !node.pages.is_empty() {
                    log.events.push(KvEvent::Removed {
                        namespace: node.namespace,
                        hashes: node.pages,
                    });
                }
            }
            let parent = node.parent.expect("roots are never evicted");
            let p = self.node_mut(parent);
            p.children.remove(&node.key[0]);
            if p.parent.is_none() {
                self.remove_root_if_empty(parent);
            } else {
                self.sync_evictable(parent);
            }
        }
        freed
    }

    /// Drops a namespace root with no children and no lock but its own.
    fn remove_root_if_empty(&mut self, root: NodeId) {
        let n = self.node(root);
        if !n.children.is_empty() || n.lock_ref != 1 {
            return;
        }
        let ns = n.namespace;
        self.nodes[root.0 as usize] = None;
        self.free_nodes.push(root);
        self.roots.remove(&ns);
        if self.roots.capacity() > 64 && self.roots.len() < self.roots.capacity() / 4 {
            self.roots.shrink_to_fit();
        }
    }

    /// Turns on the page view's events (see [`crate::events`]) with pages of `page_size`
    /// tokens. Only on an empty tree: pages already cached would have no `Stored` event.
    pub fn enable_events(&mut self, page_size: usize) -> Result<(), String> {
        if self.cached > 0 {
            return Err("KV events must be enabled before anything is cached".into());
        }
        if page_size == 0 {
            return Err("the KV event page size must be at least 1 token".into());
        }
        self.events = Some(EventLog::new(page_size));
        Ok(())
    }

    fn page_size(&self) -> Option<usize> {
        self.events.as_ref().map(|l| l.page_size)
    }

    /// Moves the events since the last drain to `out`.
    pub fn drain_events(&mut self, out: &mut Vec<KvEvent>) {
        if let Some(log) = &mut self.events {
            out.append(&mut log.events);
        }
    }

    /// The hash of the last page that ends on the path from the root to `node` (inclusive).
    fn last_page_on_path(&self, mut node: NodeId) -> Option<u64> {
        loop {
            let n = self.node(node);
            if let Some(&h) = n.pages.last() {
                return Some(h);
            }
            node = n.parent?;
        }
    }

    /// With events on: hashes the pages that a new leaf under `parent`, holding
    /// `tokens[pos..]`, completes, and logs them as stored. Returns the leaf's pages.
    fn store_pages(
        &mut self,
        ns: Namespace,
        parent: NodeId,
        tokens: &[u32],
        pos: usize,
    ) -> Vec<u64> {
        let Some(p) = self.page_size() else {
            return Vec::new();
        };
        // The page straddling `pos` (or starting there) is the first whose last token is new.
        let first_start = pos / p * p;
        if first_start + p > tokens.len() {
            return Vec::new();
        }
        // The page before it ends on the path to `parent`; the deepest node there holding a
        // page holds it, since no page ends between it and `pos`.
        let parent_hash = if first_start == 0 {
            None
        } else {
            self.last_page_on_path(parent)
        };
        let mut prev = parent_hash;
        let pages: Vec<u64> = tokens[first_start..]
            .chunks_exact(p)
            .map(|page| {
                let h = page_hash(ns, prev, page);
                prev = Some(h);
                h
            })
            .collect();
        let end = first_start + pages.len() * p;
        if let Some(log) = &mut self.events {
            log.events.push(KvEvent::Stored {
                namespace: ns,
                parent: parent_hash,
                hashes: pages.clone(),
                tokens: tokens[first_start..end].to_vec(),
            });
        }
        pages
    }

    /// `Stored` events for every page cached now, parents before children: what a subscriber
    /// that lost events rebuilds the view from (after a `Cleared`).
    pub fn snapshot_events(&self) -> Vec<KvEvent> {
        let mut out = Vec::new();
        let Some(p) = self.page_size() else {
            return out;
        };
        for (&ns, &root) in &self.roots {
            // (node, tokens of the path up to and including it, last page hash before it)
            let mut stack = vec![(root, Vec::new(), None)];
            while let Some((id, path, parent_hash)) = stack.pop() {
                let n = self.node(id);
                let mut last = parent_hash;
                if !n.pages.is_empty() {
                    let first_start = n.start / p * p;
                    let end = first_start + n.pages.len() * p;
                    out.push(KvEvent::Stored {
                        namespace: ns,
                        parent: parent_hash,
                        hashes: n.pages.clone(),
                        tokens: path[first_start..end].to_vec(),
                    });
                    last = n.pages.last().copied();
                }
                for &c in n.children.values() {
                    let mut t = path.clone();
                    t.extend_from_slice(&self.node(c).key);
                    stack.push((c, t, last));
                }
            }
        }
        out
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
        let node = m.node.unwrap();
        t.lock(node);
        assert_eq!(t.locked_slots(), 3);
        // Only [3] (slot 2) and [5] (slot 4) are evictable.
        let mut freed = t.evict(100);
        freed.sort();
        assert_eq!(freed, vec![2, 4]);
        assert_eq!(t.match_prefix(0, &[1, 2, 4, 5]).slots, vec![0, 1, 3]);
        t.unlock(node);
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
                        assert_eq!(m.node.is_none(), m.is_empty());
                        if let Some(node) = m.node {
                            tree.lock(node);
                            let toks = seq[..m.len()].to_vec();
                            locks.push((ns, toks, m.slots, node));
                        }
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
                tree.assert_index_consistent();
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
            assert_eq!(tree.namespaces(), 0, "seed {seed}: empty roots left behind");
            assert_eq!(tree.node_count(), 0, "seed {seed}: nodes left behind");
        }
    }

    /// A root lives only while something is cached under it: salts that come and go leave
    /// nothing behind, and a match in an unknown namespace creates nothing.
    #[test]
    fn namespace_roots_go_with_their_last_prefix() {
        let mut t = RadixCache::new();
        for ns in 1..=1000u64 {
            assert!(t.match_prefix(ns, &[1, 2, 3]).node.is_none());
            t.insert(ns, &[1, 2, 3], &[0, 1, 2]);
            assert_eq!(t.evict(3).len(), 3);
        }
        assert_eq!(t.namespaces(), 0);
        assert_eq!(t.node_count(), 0);
        // A locked prefix keeps its root; the root goes once the prefix is evicted.
        t.insert(7, &[4, 5], &[0, 1]);
        let m = t.match_prefix(7, &[4, 5]);
        t.lock(m.node.unwrap());
        assert!(t.evict(10).is_empty());
        assert_eq!(t.namespaces(), 1);
        t.unlock(m.node.unwrap());
        assert_eq!(t.evict(10).len(), 2);
        assert_eq!(t.namespaces(), 0);
    }

    impl RadixCache {
        /// The eviction index holds exactly the unlocked non-root leaves, at their access
        /// times, and every root is registered under its namespace (a full scan).
        fn assert_index_consistent(&self) {
            let scanned: BTreeSet<(u64, NodeId)> = self
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(i, n)| {
                    let n = n.as_ref()?;
                    Self::is_evictable_leaf(n).then_some((n.last_access, NodeId(i as u32)))
                })
                .collect();
            assert_eq!(scanned, self.evictable_leaves, "eviction index out of step");
            for (&ns, &r) in &self.roots {
                let n = self.node(r);
                assert!(n.parent.is_none() && n.namespace == ns);
                assert!(!n.children.is_empty(), "an empty root was kept");
            }
        }
    }
}
