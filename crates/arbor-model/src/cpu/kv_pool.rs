//! The KV pool: one slot per token, for every layer.
//!
//! ```text
//!   layer l:   k[l] = [ slot 0 | slot 1 | slot 2 | ... | slot N-1 ]   each slot: kv_heads x head_dim f16
//!              v[l] = [ slot 0 | slot 1 | slot 2 | ... | slot N-1 ]
//!
//!   sequence A = [7, 2, 9]        sequence B = [7, 2, 4, 5]   (B shares A's first two slots)
//! ```
//!
//! A sequence is only a list of slot indices (owned by the engine, allocated by
//! `arbor_cache::SlotAllocator`); attention reads K/V through that list in place, so a cached
//! prefix is shared by handing its slot indices to another sequence, never by copying tensors.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::config::ModelConfig;

#[derive(Debug)]
pub struct LayerKv {
    pub k: Vec<f16>,
    pub v: Vec<f16>,
}

#[derive(Debug)]
pub struct KvPool {
    layers: Vec<LayerKv>,
    kv_dim: usize,
    num_slots: usize,
}

impl KvPool {
    /// Allocates the pool. The memory is requested zeroed from the allocator (calloc), which
    /// maps it lazily: slots cost RAM only once written, so a large pool starts instantly.
    pub fn new(config: &ModelConfig, num_slots: usize) -> Self {
        Self::with_dims(config.num_layers, config.kv_dim(), num_slots)
    }

    /// A pool of `kv_dim` values per slot and layer (a tensor-parallel rank holds its own
    /// KV heads: a part of the model's `kv_dim`).
    pub fn with_dims(num_layers: usize, kv_dim: usize, num_slots: usize) -> Self {
        let layers = (0..num_layers)
            .map(|_| LayerKv {
                k: bytemuck::zeroed_vec(num_slots * kv_dim),
                v: bytemuck::zeroed_vec(num_slots * kv_dim),
            })
            .collect();
        Self {
            layers,
            kv_dim,
            num_slots,
        }
    }

    pub fn num_slots(&self) -> usize {
        self.num_slots
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    pub fn layer(&self, layer: usize) -> &LayerKv {
        &self.layers[layer]
    }

    /// Writes the K and V rows (`[slots.len(), kv_dim]`) of one layer into their slots, rounded
    /// to f16 (half the memory and bandwidth of f32, and what llama.cpp stores by default).
    pub fn write(&mut self, layer: usize, slots: &[u32], k: &[f32], v: &[f32]) {
        let d = self.kv_dim;
        let l = &mut self.layers[layer];
        for (i, &s) in slots.iter().enumerate() {
            let dst = s as usize * d..(s as usize + 1) * d;
            l.k[dst.clone()].convert_from_f32_slice(&k[i * d..(i + 1) * d]);
            l.v[dst].convert_from_f32_slice(&v[i * d..(i + 1) * d]);
        }
    }
}
