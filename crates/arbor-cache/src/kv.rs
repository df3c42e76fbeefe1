//! KV ownership: the [`KvManager`] owns the slot allocator and the prefix-cache policy, and
//! hands each sequence a [`SeqKv`] handle that owns the sequence's slots.
//!
//! A handle holds the slots of a sequence's computed tokens, in token order. The first
//! `cached_len` of them belong to the prefix cache and are locked through the handle; the rest
//! are the sequence's own. Every change of ownership goes through the handle:
//!
//! ```text
//!   acquire(ns, prompt)   match the longest cached prefix and lock it      -> SeqKv
//!   grow(n)               take n slots (evicting unlocked cached prefixes)
//!   truncate(len)         give back the slots past len (a step that failed)
//!   commit(tokens)        hand the computed tokens to the cache now; the cache's slots
//!                         replace duplicates, and the lock moves to the longer prefix
//!   release(tokens)       the same, then unlock and free what the cache did not take
//!   drop                  without release: free the own slots, unlock (nothing is cached)
//! ```
//!
//! So the engine does no slot arithmetic, and a sequence dropped on any path (a cancelled
//! request, a panic unwinding through the engine) cannot leak its slots. The handle and the
//! manager share the state behind a mutex: the engine runs on one thread, so the lock is never
//! contended; it is what lets a handle give its slots back on drop.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::events::KvEvent;
use crate::policy::PrefixCache;
use crate::radix::{Namespace, NodeId};
use crate::slots::{SlotAllocator, SlotError, SlotId};

struct KvState {
    slots: SlotAllocator,
    cache: Box<dyn PrefixCache>,
    /// Slots owned by live handles (not the cache's): counted from the handles' own changes,
    /// not derived from the allocator, so a leak shows as free + cached + held < total.
    held_by_handles: usize,
}

impl KvState {
    /// Takes `n` slots, evicting cached prefixes first if the free list is short.
    fn take(&mut self, n: usize) -> Result<Vec<SlotId>, SlotError> {
        if self.slots.free_count() < n {
            let freed = self.cache.evict(n - self.slots.free_count());
            self.slots
                .free(&freed)
                .expect("evicted slots were owned by the cache alone");
        }
        let taken = self.slots.allocate(n)?;
        self.held_by_handles += n;
        Ok(taken)
    }

    fn give_back(&mut self, slots: &[SlotId]) {
        self.slots
            .free(slots)
            .expect("a handle owns the slots past its cached prefix exclusively");
        self.held_by_handles -= slots.len();
    }
}

/// Where the pool's slots are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvUsage {
    pub total: usize,
    /// In the allocator, owned by no one.
    pub free: usize,
    /// Held only by the prefix cache: evictable.
    pub evictable: usize,
    /// Cached prefixes locked by live handles.
    pub locked: usize,
    /// Owned by live handles (past their cached prefixes).
    pub held_by_handles: usize,
}

/// Owns the slot allocator and the prefix-cache policy; see the module docs.
pub struct KvManager {
    state: Arc<Mutex<KvState>>,
}

/// The state behind the lock. A panic while it was held poisons it; the engine treats any
/// panic outside a request's own processing as fatal, so reading it on is only for dropping.
fn lock(state: &Mutex<KvState>) -> MutexGuard<'_, KvState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl KvManager {
    pub fn new(total_slots: usize, cache: Box<dyn PrefixCache>) -> Self {
        Self {
            state: Arc::new(Mutex::new(KvState {
                slots: SlotAllocator::new(total_slots),
                cache,
                held_by_handles: 0,
            })),
        }
    }

    pub fn usage(&self) -> KvUsage {
        let s = lock(&self.state);
        KvUsage {
            total: s.slots.total(),
            free: s.slots.free_count(),
            evictable: s.cache.evictable_slots(),
            locked: s.cache.locked_slots(),
            held_by_handles: s.held_by_handles,
        }
    }

    pub fn total(&self) -> usize {
        lock(&self.state).slots.total()
    }

    /// Slots that are free or can be freed by evicting unlocked cached prefixes.
    pub fn available(&self) -> usize {
        let s = lock(&self.state);
        s.slots.free_count() + s.cache.evictable_slots()
    }

    /// Length of the longest cached prefix of `tokens`, without side effects (for scheduling).
    pub fn peek_prefix_len(&self, ns: Namespace, tokens: &[u32]) -> usize {
        lock(&self.state).cache.peek_prefix_len(ns, tokens)
    }

    /// Starts logging the prefix cache's page view (see [`crate::events`]); before anything is
    /// cached.
    pub fn enable_events(&self, page_size: usize) -> Result<(), String> {
        lock(&self.state).cache.enable_events(page_size)
    }

    /// Moves the page-view changes logged since the last drain to `out`.
    pub fn drain_events(&self, out: &mut Vec<KvEvent>) {
        lock(&self.state).cache.drain_events(out)
    }

    /// `Stored` events for every page cached now (for a subscriber to resynchronise from).
    pub fn snapshot_events(&self) -> Vec<KvEvent> {
        lock(&self.state).cache.snapshot_events()
    }

    /// A handle for a sequence of namespace `ns` starting with `tokens`: its longest cached
    /// prefix, locked (so growing this or any other sequence cannot evict it).
    pub fn acquire(&self, ns: Namespace, tokens: &[u32]) -> SeqKv {
        let mut s = lock(&self.state);
        let hit = s.cache.match_prefix(ns, tokens);
        if let Some(node) = hit.node {
            s.cache.lock(node);
        }
        SeqKv {
            state: self.state.clone(),
            namespace: ns,
            cached_len: hit.slots.len(),
            slots: hit.slots,
            node: hit.node,
        }
    }
}

/// One sequence's KV slots; see the module docs. Frees what it owns when dropped.
pub struct SeqKv {
    state: Arc<Mutex<KvState>>,
    namespace: Namespace,
    /// Slots of the computed tokens, in token order.
    slots: Vec<SlotId>,
    /// The first `cached_len` slots are the cache's, locked through `node`.
    cached_len: usize,
    node: Option<NodeId>,
}

impl std::fmt::Debug for SeqKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqKv")
            .field("namespace", &self.namespace)
            .field("computed", &self.slots.len())
            .field("cached_len", &self.cached_len)
            .finish()
    }
}

impl SeqKv {
    /// Tokens whose K/V these slots hold.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The slots, in token order (what attention reads).
    pub fn slots(&self) -> &[SlotId] {
        &self.slots
    }

    /// Leading tokens whose slots belong to the prefix cache.
    pub fn cached_len(&self) -> usize {
        self.cached_len
    }

    /// Slots this sequence owns (not the cache's).
    pub fn own_len(&self) -> usize {
        self.slots.len() - self.cached_len
    }

    /// Takes `n` more slots for the next tokens, evicting unlocked cached prefixes if the free
    /// list is short; all or nothing.
    pub fn grow(&mut self, n: usize) -> Result<(), SlotError> {
        let taken = lock(&self.state).take(n)?;
        self.slots.extend(taken);
        Ok(())
    }

    /// Gives back the slots of tokens `len..` (a step that failed); never below the cached
    /// prefix.
    pub fn truncate(&mut self, len: usize) {
        let len = len.max(self.cached_len);
        if len >= self.slots.len() {
            return;
        }
        let gone = self.slots.split_off(len);
        lock(&self.state).give_back(&gone);
    }

    /// Hands the computed tokens (`tokens`, one per slot) to the prefix cache now, so that
    /// requests arriving meanwhile reuse them. Where the cache already held the same tokens
    /// (another sequence computed them meanwhile), its slots replace this sequence's, whose
    /// duplicates are freed; the lock moves to the longer prefix.
    pub fn commit(&mut self, tokens: &[u32]) {
        assert_eq!(tokens.len(), self.slots.len(), "one token per slot");
        let mut s = lock(&self.state);
        let ins = s.cache.insert(self.namespace, tokens, &self.slots);
        if ins.cached_until <= self.cached_len {
            return;
        }
        let hit = s.cache.match_prefix(self.namespace, tokens);
        debug_assert_eq!(
            hit.slots.len(),
            ins.cached_until,
            "what was just cached matches"
        );
        if let Some(node) = hit.node {
            s.cache.lock(node);
        }
        if let Some(old) = std::mem::replace(&mut self.node, hit.node) {
            s.cache.unlock(old);
        }
        // Ours for positions the cache already had are duplicates; the cache now owns ours
        // from there up to `cached_until`.
        let dup = &self.slots[self.cached_len.min(ins.already_cached)..ins.already_cached];
        s.give_back(dup);
        let adopted = ins.cached_until - ins.already_cached.max(self.cached_len);
        s.held_by_handles -= adopted;
        self.slots[..hit.slots.len()].copy_from_slice(&hit.slots);
        self.cached_len = hit.slots.len();
    }

    /// Ends the sequence: its computed tokens (`tokens`, one per slot) go into the prefix
    /// cache, what the cache does not take goes back to the pool, and the lock is released.
    pub fn release(mut self, tokens: &[u32]) {
        assert_eq!(tokens.len(), self.slots.len(), "one token per slot");
        let mut s = lock(&self.state);
        let slots = std::mem::take(&mut self.slots);
        let ins = s.cache.insert(self.namespace, tokens, &slots);
        // Our slots for positions the cache already had are duplicates; the cache owns ours
        // up to `cached_until`.
        s.give_back(&slots[self.cached_len.min(ins.already_cached)..ins.already_cached]);
        let own_from = ins.cached_until.max(self.cached_len);
        s.held_by_handles -= own_from - ins.already_cached.max(self.cached_len).min(own_from);
        if let Some(node) = self.node.take() {
            s.cache.unlock(node);
        }
        s.give_back(&slots[own_from..]);
        self.cached_len = 0;
    }
}

impl Drop for SeqKv {
    /// A handle dropped without [`SeqKv::release`]: its own slots go back to the pool and its
    /// lock is released; nothing is cached.
    fn drop(&mut self) {
        if self.slots.is_empty() && self.node.is_none() {
            return;
        }
        let mut s = lock(&self.state);
        let own = self.slots.split_off(self.cached_len);
        s.give_back(&own);
        if let Some(node) = self.node.take() {
            s.cache.unlock(node);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlockCache, RadixCache};
    use rand::{Rng, SeedableRng};
    use std::collections::HashSet;

    type NewCache = fn() -> Box<dyn PrefixCache>;

    fn caches() -> Vec<(&'static str, NewCache)> {
        vec![
            ("radix", || Box::new(RadixCache::new())),
            ("blocks", || Box::new(BlockCache::new(2))),
        ]
    }

    #[test]
    fn a_second_sequence_reuses_the_first_ones_prefix_and_drop_frees() {
        for (name, cache) in caches() {
            let m = KvManager::new(32, cache());
            let prompt = [1, 2, 3, 4, 5, 6];
            let mut a = m.acquire(0, &prompt);
            assert!(a.is_empty());
            a.grow(6).unwrap();
            a.commit(&prompt);
            assert_eq!(m.usage().held_by_handles, a.own_len(), "{name}");
            let b = m.acquire(0, &prompt);
            assert_eq!(b.len(), 6, "{name}: the whole prompt is cached");
            assert_eq!(&b.slots()[..4], &a.slots()[..4], "{name}: shared slots");
            a.release(&prompt);
            drop(b);
            let u = m.usage();
            assert_eq!((u.locked, u.held_by_handles), (0, 0), "{name}");
            assert_eq!(u.free + u.evictable, 32, "{name}");
            // Another namespace shares nothing.
            assert!(m.acquire(1, &prompt).is_empty(), "{name}");
        }
    }

    /// Interleaved sequences on random token streams, with random commits, truncations,
    /// releases and drops, on both policies. After every operation: every slot is free,
    /// cached or held by exactly one handle; the counts add up; every live handle's cached
    /// prefix is still cached with the same slots (a locked prefix is never evicted).
    #[test]
    fn handles_conserve_slots_and_keep_locked_prefixes() {
        const TOTAL: usize = 96;
        let mut checked = 0;
        for (name, cache) in caches() {
            for seed in 0..12u64 {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let m = KvManager::new(TOTAL, cache());
                // (handle, its tokens: prompt then generated)
                let mut live: Vec<(SeqKv, Vec<u32>)> = Vec::new();
                for _ in 0..1500 {
                    match rng.random_range(0..10) {
                        0..=2 if live.len() < 8 => {
                            let ns = rng.random_range(0..2);
                            let len = rng.random_range(1..12);
                            let toks: Vec<u32> = (0..len).map(|_| rng.random_range(0..3)).collect();
                            let kv = m.acquire(ns, &toks[..toks.len() - 1]);
                            live.push((kv, toks));
                        }
                        3..=5 if !live.is_empty() => {
                            // Compute a few more tokens of one sequence, if memory allows.
                            let i = rng.random_range(0..live.len());
                            let (kv, toks) = &mut live[i];
                            if kv.len() == toks.len() {
                                toks.push(rng.random_range(0..3));
                            }
                            let n = rng.random_range(1..=toks.len() - kv.len());
                            if m.available() >= n {
                                kv.grow(n).unwrap();
                                if rng.random_bool(0.5) {
                                    let l = kv.len();
                                    kv.commit(&toks[..l]);
                                }
                            } else {
                                assert!(kv.grow(n).is_err() || m.available() < n);
                            }
                        }
                        6 if !live.is_empty() => {
                            let i = rng.random_range(0..live.len());
                            let (kv, _) = &mut live[i];
                            let to = rng.random_range(0..=kv.len());
                            kv.truncate(to);
                        }
                        7..=8 if !live.is_empty() => {
                            let (kv, toks) = live.swap_remove(rng.random_range(0..live.len()));
                            let l = kv.len();
                            kv.release(&toks[..l]);
                        }
                        9 if !live.is_empty() => {
                            drop(live.swap_remove(rng.random_range(0..live.len())));
                        }
                        _ => {}
                    }
                    // Conservation and no double ownership among handles' own slots.
                    let u = m.usage();
                    let own: usize = live.iter().map(|(kv, _)| kv.own_len()).sum();
                    assert_eq!(u.held_by_handles, own, "{name}/{seed}: held count drifted");
                    assert_eq!(
                        u.free + u.evictable + u.locked + own,
                        TOTAL,
                        "{name}/{seed}: slots leaked or double counted"
                    );
                    let mut seen = HashSet::new();
                    for (kv, _) in &live {
                        for s in &kv.slots()[kv.cached_len()..] {
                            assert!(seen.insert(*s), "{name}/{seed}: slot {s} owned twice");
                        }
                    }
                    // Locked prefixes are still cached, with the same slots.
                    for (kv, toks) in &live {
                        let c = kv.cached_len();
                        let peek = m.peek_prefix_len(kv.namespace, &toks[..c]);
                        assert_eq!(peek, c, "{name}/{seed}: a locked prefix was evicted");
                    }
                    checked += 1;
                }
                for (kv, toks) in live.drain(..) {
                    let l = kv.len();
                    kv.release(&toks[..l]);
                }
                let u = m.usage();
                assert_eq!((u.locked, u.held_by_handles), (0, 0));
                assert_eq!(u.free + u.evictable, TOTAL);
            }
        }
        assert_eq!(checked, 2 * 12 * 1500);
    }
}
