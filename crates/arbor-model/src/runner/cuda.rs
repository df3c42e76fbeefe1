//! The CUDA backend: [`CudaLlama`] over a GPU [`CudaKvPool`]; logits are copied to the host and
//! sampled there (GPU sampling replaces this backend's runner with one that samples on the
//! device).

use std::sync::Arc;

use super::host::LogitsBackend;
use crate::config::ModelConfig;
use crate::cuda::{CudaKvPool, CudaLlama};
use crate::error::Result;
use crate::step::{LogitsWanted, SeqStep};

/// Share of the GPU memory free after loading the weights that the default KV pool takes: the
/// rest is for activations and cuBLAS workspaces.
const GPU_KV_MEMORY_SHARE: f64 = 0.85;

pub struct CudaBackend {
    model: Arc<CudaLlama>,
    pool: CudaKvPool,
}

impl CudaBackend {
    /// The model with a pool of `kv_slots` slots (default: 85% of the GPU memory left after
    /// the weights); fails when the pool does not fit.
    pub fn new(model: Arc<CudaLlama>, kv_slots: Option<usize>) -> Result<Self> {
        let budget = model
            .free_memory_bytes()
            .map(|m| (m as f64 * GPU_KV_MEMORY_SHARE) as usize);
        let slots = kv_slots.unwrap_or_else(|| super::default_kv_slots(&model.config, budget));
        let pool = CudaKvPool::new(&model, slots)?;
        Ok(Self { model, pool })
    }

    pub fn model(&self) -> &Arc<CudaLlama> {
        &self.model
    }
}

impl LogitsBackend for CudaBackend {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn device_name(&self) -> String {
        format!("{:?}", self.model.device().location())
    }

    fn kv_slots(&self) -> usize {
        self.pool.num_slots()
    }

    fn forward(&mut self, batch: &[SeqStep]) -> Result<Vec<Vec<f32>>> {
        self.model.forward(batch, &mut self.pool)
    }

    fn logits_from_scratch(&self, tokens: &[u32], which: LogitsWanted) -> Result<Vec<Vec<f32>>> {
        let mut pool = CudaKvPool::new(&self.model, tokens.len())?;
        let slots: Vec<u32> = (0..tokens.len() as u32).collect();
        let step = SeqStep {
            tokens,
            slots: &slots,
            logits: which,
        };
        self.model.forward(&[step], &mut pool)
    }
}
