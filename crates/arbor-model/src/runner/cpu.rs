//! The CPU backend: [`Llama`] over a host [`KvPool`].

use std::sync::Arc;

use super::host::LogitsBackend;
use crate::config::ModelConfig;
use crate::cpu::kv_pool::KvPool;
use crate::cpu::llama::Llama;
use crate::error::Result;
use crate::step::{LogitsWanted, SeqStep};

/// Share of the host memory available at start that the default CPU KV pool may take: the
/// rest is for the weights' working buffers, the OS and whatever else runs on the machine.
pub(super) const CPU_KV_MEMORY_SHARE: f64 = 0.4;

pub struct CpuBackend {
    model: Arc<Llama>,
    pool: KvPool,
}

impl CpuBackend {
    /// The model with a pool of `kv_slots` slots (default: 40% of the memory available now, at
    /// least one full context). Pages come lazily, so this cannot fail.
    pub fn new(model: Arc<Llama>, kv_slots: Option<usize>) -> Self {
        let budget =
            crate::cpu::available_memory_bytes().map(|m| (m as f64 * CPU_KV_MEMORY_SHARE) as usize);
        let slots = kv_slots.unwrap_or_else(|| {
            super::default_kv_slots(&model.config, model.config.kv_bytes_per_slot(), budget)
        });
        let pool = model.new_kv_pool(slots);
        Self { model, pool }
    }

    pub fn model(&self) -> &Arc<Llama> {
        &self.model
    }
}

impl LogitsBackend for CpuBackend {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn device_name(&self) -> String {
        "cpu".into()
    }

    fn kv_slots(&self) -> usize {
        self.pool.num_slots()
    }

    fn forward(&mut self, batch: &[SeqStep]) -> Result<Vec<Vec<f32>>> {
        // The whole step runs on one of rayon's workers, so the ~150 parallel loops of a step
        // are forked from inside the pool (work stealing, the other workers still spinning
        // from the last loop) rather than each injected from the engine's thread, which then
        // sleeps and is woken once per loop: hundreds of context switches per decode step.
        let (model, pool) = (&self.model, &mut self.pool);
        rayon::scope(|_| model.forward(batch, pool))
    }

    fn logits_from_scratch(&self, tokens: &[u32], which: LogitsWanted) -> Result<Vec<Vec<f32>>> {
        let mut pool = self.model.new_kv_pool(tokens.len());
        let slots: Vec<u32> = (0..tokens.len() as u32).collect();
        let step = SeqStep {
            tokens,
            slots: &slots,
            logits: which,
        };
        self.model.forward(&[step], &mut pool)
    }
}
