//! One interface over the prefix-cache policies, so the engine, its kernels and its scheduler
//! are the same whichever is chosen and a benchmark measures the design difference alone.

use crate::blocks::BlockCache;
use crate::events::KvEvent;
use crate::radix::{Namespace, NodeId, RadixCache};
use crate::slots::SlotId;

/// A cached prefix found for a request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheHit {
    /// Lock it to keep the prefix while the request runs (`None`: nothing to lock).
    pub node: Option<NodeId>,
    /// Slots of the prefix, in token order.
    pub slots: Vec<SlotId>,
}

/// What an insert did with a sequence's tokens and slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    /// Leading tokens the cache already held: the caller's slots for those that differ from
    /// the cache's are duplicates for the caller to free.
    pub already_cached: usize,
    /// The cache owns the caller's slots in `already_cached..cached_until`; slots past it
    /// (a partial block, or everything when caching is off) stay the caller's.
    pub cached_until: usize,
}

pub trait PrefixCache: Send {
    /// The longest reusable cached prefix of `tokens`; may restructure the cache (radix splits).
    fn match_prefix(&mut self, ns: Namespace, tokens: &[u32]) -> CacheHit;
    /// Length of that prefix, without side effects (for scheduling order).
    fn peek_prefix_len(&self, ns: Namespace, tokens: &[u32]) -> usize;
    fn insert(&mut self, ns: Namespace, tokens: &[u32], slots: &[SlotId]) -> Inserted;
    fn lock(&mut self, node: NodeId);
    fn unlock(&mut self, node: NodeId);
    /// Frees at least `wanted` unlocked cached slots if it can, least recently used first.
    fn evict(&mut self, wanted: usize) -> Vec<SlotId>;
    fn cached_slots(&self) -> usize;
    fn locked_slots(&self) -> usize;
    fn evictable_slots(&self) -> usize {
        self.cached_slots() - self.locked_slots()
    }
    /// Starts logging the page view's changes (see [`crate::events`]) with pages of
    /// `page_size` tokens; an error says why this policy cannot.
    fn enable_events(&mut self, page_size: usize) -> Result<(), String>;
    /// Moves the changes logged since the last drain to `out`.
    fn drain_events(&mut self, _out: &mut Vec<KvEvent>) {}
    /// `Stored` events for every page cached now, parents first.
    fn snapshot_events(&self) -> Vec<KvEvent> {
        Vec::new()
    }
}

impl PrefixCache for RadixCache {
    fn match_prefix(&mut self, ns: Namespace, tokens: &[u32]) -> CacheHit {
        let m = RadixCache::match_prefix(self, ns, tokens);
        CacheHit {
            node: m.node,
            slots: m.slots,
        }
    }
    fn peek_prefix_len(&self, ns: Namespace, tokens: &[u32]) -> usize {
        RadixCache::peek_prefix_len(self, ns, tokens)
    }
    fn insert(&mut self, ns: Namespace, tokens: &[u32], slots: &[SlotId]) -> Inserted {
        let already_cached = RadixCache::insert(self, ns, tokens, slots);
        Inserted {
            already_cached,
            cached_until: tokens.len(),
        }
    }
    fn lock(&mut self, node: NodeId) {
        RadixCache::lock(self, node)
    }
    fn unlock(&mut self, node: NodeId) {
        RadixCache::unlock(self, node)
    }
    fn evict(&mut self, wanted: usize) -> Vec<SlotId> {
        RadixCache::evict(self, wanted)
    }
    fn cached_slots(&self) -> usize {
        RadixCache::cached_slots(self)
    }
    fn locked_slots(&self) -> usize {
        RadixCache::locked_slots(self)
    }
    fn enable_events(&mut self, page_size: usize) -> Result<(), String> {
        RadixCache::enable_events(self, page_size)
    }
    fn drain_events(&mut self, out: &mut Vec<KvEvent>) {
        RadixCache::drain_events(self, out)
    }
    fn snapshot_events(&self) -> Vec<KvEvent> {
        RadixCache::snapshot_events(self)
    }
}

impl PrefixCache for BlockCache {
    fn match_prefix(&mut self, ns: Namespace, tokens: &[u32]) -> CacheHit {
        let (node, slots) = BlockCache::match_prefix(self, ns, tokens);
        CacheHit { node, slots }
    }
    fn peek_prefix_len(&self, ns: Namespace, tokens: &[u32]) -> usize {
        BlockCache::peek_prefix_len(self, ns, tokens)
    }
    fn insert(&mut self, ns: Namespace, tokens: &[u32], slots: &[SlotId]) -> Inserted {
        let (already_cached, cached_until) = BlockCache::insert(self, ns, tokens, slots);
        Inserted {
            already_cached,
            cached_until,
        }
    }
    fn lock(&mut self, node: NodeId) {
        BlockCache::lock(self, node)
    }
    fn unlock(&mut self, node: NodeId) {
        BlockCache::unlock(self, node)
    }
    fn evict(&mut self, wanted: usize) -> Vec<SlotId> {
        BlockCache::evict(self, wanted)
    }
    fn cached_slots(&self) -> usize {
        BlockCache::cached_slots(self)
    }
    fn locked_slots(&self) -> usize {
        BlockCache::locked_slots(self)
    }
    fn enable_events(&mut self, page_size: usize) -> Result<(), String> {
        BlockCache::enable_events(self, page_size)
    }
    fn drain_events(&mut self, out: &mut Vec<KvEvent>) {
        BlockCache::drain_events(self, out)
    }
    fn snapshot_events(&self) -> Vec<KvEvent> {
        BlockCache::snapshot_events(self)
    }
}

/// No reuse: nothing is ever cached.
#[derive(Debug, Default)]
pub struct NoCache;

impl PrefixCache for NoCache {
    fn match_prefix(&mut self, _: Namespace, _: &[u32]) -> CacheHit {
        CacheHit::default()
    }
    fn peek_prefix_len(&self, _: Namespace, _: &[u32]) -> usize {
        0
    }
    fn insert(&mut self, _: Namespace, _: &[u32], _: &[SlotId]) -> Inserted {
        Inserted {
            already_cached: 0,
            cached_until: 0,
        }
    }
    fn lock(&mut self, _: NodeId) {}
    fn unlock(&mut self, _: NodeId) {}
    fn evict(&mut self, _: usize) -> Vec<SlotId> {
        Vec::new()
    }
    fn cached_slots(&self) -> usize {
        0
    }
    fn locked_slots(&self) -> usize {
        0
    }
    /// Nothing is ever cached, so the view is always empty: there is nothing to log.
    fn enable_events(&mut self, _: usize) -> Result<(), String> {
        Ok(())
    }
}
