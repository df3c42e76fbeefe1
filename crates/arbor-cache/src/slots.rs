//! The free list of KV token slots.

/// Index of one token slot in the KV pool.
pub type SlotId = u32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SlotError {
    #[error("KV pool exhausted: asked for {requested} slots, {free} of {total} are free")]
    Exhausted {
        requested: usize,
        free: usize,
        total: usize,
    },
    #[error("slot {0} freed twice or never allocated")]
    NotAllocated(SlotId),
    #[error("slot {slot} is outside the pool of {total} slots")]
    OutOfRange { slot: SlotId, total: usize },
}

/// Hands out slot indices of a pool of fixed size.
///
/// Allocation pops from a stack of free slots, so recently freed (cache-warm) slots are reused
/// first. `in_use` is tracked per slot so that a double free is an error rather than a silent
/// corruption of the free list (two sequences writing the same slot).
#[derive(Debug, Clone)]
pub struct SlotAllocator {
    free: Vec<SlotId>,
    in_use: Vec<bool>,
}

impl SlotAllocator {
    pub fn new(total: usize) -> Self {
        assert!(
            total <= SlotId::MAX as usize,
            "a pool of {total} slots does not fit 32-bit slot ids"
        );
        // Reverse so that slot 0 is handed out first: easier to read in logs and tests.
        let free = (0..total as SlotId).rev().collect();
        Self {
            free,
            in_use: vec![false; total],
        }
    }

    pub fn total(&self) -> usize {
        self.in_use.len()
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    pub fn used_count(&self) -> usize {
        self.total() - self.free_count()
    }

    /// Takes `n` slots, all or nothing.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<SlotId>, SlotError> {
        if n > self.free.len() {
            return Err(SlotError::Exhausted {
                requested: n,
                free: self.free.len(),
                total: self.total(),
            });
        }
        let slots = self.free.split_off(self.free.len() - n);
        for &s in &slots {
            self.in_use[s as usize] = true;
        }
        Ok(slots)
    }

    /// Returns slots to the pool. Either every slot is returned or, on error, none is.
    pub fn free(&mut self, slots: &[SlotId]) -> Result<(), SlotError> {
        for (i, &s) in slots.iter().enumerate() {
            let check = match self.in_use.get(s as usize) {
                None => Err(SlotError::OutOfRange {
                    slot: s,
                    total: self.total(),
                }),
                Some(false) => Err(SlotError::NotAllocated(s)),
                Some(true) => Ok(()),
            };
            if let Err(e) = check {
                // Roll back what this call already returned so the caller's state stays valid.
                for &r in &slots[..i] {
                    self.in_use[r as usize] = true;
                }
                self.free.truncate(self.free.len() - i);
                return Err(e);
            }
            self.in_use[s as usize] = false;
            self.free.push(s);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn exhaustion_is_an_error_not_a_partial_allocation() {
        let mut a = SlotAllocator::new(4);
        let first = a.allocate(3).unwrap();
        assert_eq!(
            a.allocate(2),
            Err(SlotError::Exhausted {
                requested: 2,
                free: 1,
                total: 4
            })
        );
        assert_eq!(a.free_count(), 1);
        a.free(&first).unwrap();
        assert_eq!(a.free_count(), 4);
    }

    #[test]
    fn double_free_is_rejected_and_rolled_back() {
        let mut a = SlotAllocator::new(8);
        let s = a.allocate(3).unwrap();
        a.free(&s[..1]).unwrap();
        // s[1] is valid, s[0] was already freed: nothing of this call may take effect.
        assert_eq!(a.free(&[s[1], s[0]]), Err(SlotError::NotAllocated(s[0])));
        assert_eq!(a.used_count(), 2);
        assert_eq!(
            a.free(&[99]),
            Err(SlotError::OutOfRange { slot: 99, total: 8 })
        );
        a.free(&s[1..]).unwrap();
        assert_eq!(a.used_count(), 0);
    }

    #[test]
    fn random_allocations_never_hand_out_a_slot_twice() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut a = SlotAllocator::new(64);
        let mut held: Vec<Vec<SlotId>> = Vec::new();
        for _ in 0..10_000 {
            if rng.random_bool(0.55) {
                let n = rng.random_range(0..10);
                if let Ok(s) = a.allocate(n) {
                    held.push(s);
                }
            } else if !held.is_empty() {
                let i = rng.random_range(0..held.len());
                let s = held.swap_remove(i);
                a.free(&s).unwrap();
            }
            let mut seen = [false; 64];
            for &s in held.iter().flatten() {
                assert!(!seen[s as usize], "slot {s} owned twice");
                seen[s as usize] = true;
            }
            assert_eq!(a.used_count(), held.iter().map(Vec::len).sum::<usize>());
        }
    }
}
