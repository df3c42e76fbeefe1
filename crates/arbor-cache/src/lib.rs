//! KV memory accounting for Arbor, free of any tensor dependency.
//!
//! The KV cache is a pool of *token slots*: slot `i` holds one token's keys and values for every
//! layer (the tensors themselves live in `arbor-model`'s `KvPool`). A sequence is a list of slot
//! indices, so sequences of any length share one pool without fragmentation, and a cached prefix
//! can be handed from one request to the next by passing slot indices around.
//!
//! This crate owns which slots are free and which hold a cached prefix. [`SlotAllocator`] hands
//! out and takes back slot indices; [`RadixCache`] is the radix tree of cached prefixes
//! (SGLang's RadixAttention) whose nodes own slots; [`BlockCache`] is vLLM's block-hash policy
//! for comparison; [`PrefixCache`] is the interface over either (or [`NoCache`]). The engine
//! uses them through [`KvManager`], which owns the allocator and the policy and hands each
//! sequence a [`SeqKv`] handle that owns its slots and frees them on drop.

mod blocks;
pub mod events;
mod kv;
mod policy;
mod radix;
mod slots;

pub use blocks::BlockCache;
pub use events::KvEvent;
pub use kv::{KvManager, KvUsage, SeqKv};
pub use policy::{CacheHit, Inserted, NoCache, PrefixCache};
pub use radix::{Namespace, NodeId, PrefixMatch, RadixCache};
pub use slots::{SlotAllocator, SlotError, SlotId};
