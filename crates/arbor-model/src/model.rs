//! The model the engine runs, on whichever backend it was loaded for, and its KV memory.
//!
//! [`Model`] and [`KvCache`] are the engine's view: one forward step over a batch of
//! [`SeqStep`]s, and a KV pool of token slots made for that model. The CPU backend is
//! [`Llama`] with [`KvPool`]; with the `cuda` feature, [`crate::cuda::CudaLlama`] with
//! [`crate::cuda::CudaKvPool`].

use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv_pool::KvPool;
use crate::llama::{Llama, SeqStep};

#[derive(Debug, Clone)]
pub enum Model {
    Cpu(Arc<Llama>),
    #[cfg(feature = "cuda")]
    Cuda(Arc<crate::cuda::CudaLlama>),
}

pub enum KvCache {
    Cpu(KvPool),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaKvPool),
}

impl From<Llama> for Model {
    fn from(m: Llama) -> Self {
        Model::Cpu(Arc::new(m))
    }
}

impl From<Arc<Llama>> for Model {
    fn from(m: Arc<Llama>) -> Self {
        Model::Cpu(m)
    }
}

#[cfg(feature = "cuda")]
impl From<crate::cuda::CudaLlama> for Model {
    fn from(m: crate::cuda::CudaLlama) -> Self {
        Model::Cuda(Arc::new(m))
    }
}

/// What sizing a KV pool needs to know about a model.
pub trait KvBudget {
    fn config(&self) -> &ModelConfig;
    /// Bytes of memory the KV pool may take by default (`None`: unknown).
    fn kv_budget_bytes(&self) -> Option<usize>;
}

/// Share of the host memory available at start that the default CPU KV pool may take: the
/// rest is for the weights' working buffers, the OS and whatever else runs on the machine.
const CPU_KV_MEMORY_SHARE: f64 = 0.4;
/// Share of the GPU memory free after loading the weights: the rest is for activations and
/// cuBLAS workspaces.
#[cfg(feature = "cuda")]
const GPU_KV_MEMORY_SHARE: f64 = 0.85;

impl KvBudget for Llama {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn kv_budget_bytes(&self) -> Option<usize> {
        crate::available_memory_bytes().map(|m| (m as f64 * CPU_KV_MEMORY_SHARE) as usize)
    }
}

impl<T: KvBudget> KvBudget for Arc<T> {
    fn config(&self) -> &ModelConfig {
        (**self).config()
    }
    fn kv_budget_bytes(&self) -> Option<usize> {
        (**self).kv_budget_bytes()
    }
}

#[cfg(feature = "cuda")]
impl KvBudget for crate::cuda::CudaLlama {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn kv_budget_bytes(&self) -> Option<usize> {
        self.free_memory_bytes()
            .map(|m| (m as f64 * GPU_KV_MEMORY_SHARE) as usize)
    }
}

impl KvBudget for Model {
    fn config(&self) -> &ModelConfig {
        match self {
            Model::Cpu(m) => &m.config,
            #[cfg(feature = "cuda")]
            Model::Cuda(m) => &m.config,
        }
    }
    fn kv_budget_bytes(&self) -> Option<usize> {
        match self {
            Model::Cpu(m) => m.kv_budget_bytes(),
            #[cfg(feature = "cuda")]
            Model::Cuda(m) => m.kv_budget_bytes(),
        }
    }
}

impl Model {
    pub fn config(&self) -> &ModelConfig {
        KvBudget::config(self)
    }

    /// "cpu" or "cuda:N", for logs.
    pub fn device_name(&self) -> String {
        match self {
            Model::Cpu(_) => "cpu".into(),
            #[cfg(feature = "cuda")]
            Model::Cuda(m) => format!("{:?}", m.device().location()),
        }
    }

    /// A KV pool of `slots` token slots for this model.
    pub fn new_kv(&self, slots: usize) -> Result<KvCache> {
        Ok(match self {
            Model::Cpu(m) => KvCache::Cpu(KvPool::new(&m.config, slots)),
            #[cfg(feature = "cuda")]
            Model::Cuda(m) => KvCache::Cuda(crate::cuda::CudaKvPool::new(m, slots)?),
        })
    }

    /// One forward step (see [`Llama::forward`]).
    pub fn forward(&self, batch: &[SeqStep], kv: &mut KvCache) -> Result<Vec<Vec<f32>>> {
        match (self, kv) {
            (Model::Cpu(m), KvCache::Cpu(kv)) => m.forward(batch, kv),
            #[cfg(feature = "cuda")]
            (Model::Cuda(m), KvCache::Cuda(kv)) => m.forward(batch, kv),
            #[cfg(feature = "cuda")]
            _ => Err(crate::error::ModelError::BadBatch(
                "the KV pool belongs to another backend".into(),
            )),
        }
    }
}
