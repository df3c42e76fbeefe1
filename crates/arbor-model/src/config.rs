//! The shape of a Llama-family decoder, whatever file it was loaded from.

use crate::error::{ModelError, Result};

/// Which pairs of a head's dimensions RoPE rotates together.
///
/// llama.cpp's converter permutes Llama Q/K weights so that rotating adjacent pairs
/// (`x[2i], x[2i+1]`) equals Hugging Face's rotate-half (`x[i], x[i + d/2]`) on the original
/// weights. GGUF Llama files therefore need `Interleaved`; Qwen2 GGUFs and every Hugging Face
/// folder use `Halves`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    Interleaved,
    Halves,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f32,
    },
    /// Llama 3.1's frequency-dependent scaling (Hugging Face `rope_type: "llama3"`).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Per-frequency divisors read from a GGUF `rope_freqs.weight` tensor (llama.cpp bakes
    /// Llama 3 scaling into it).
    FreqFactors(Vec<f32>),
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// As the file names it: "llama", "mistral", "qwen2", ...
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Qwen2 has biases on the Q, K and V projections.
    pub qkv_bias: bool,
    /// Compute RoPE angles the way ggml does (GGUF models), see `rope::Rope`.
    pub ggml_rope_angles: bool,
}

impl ModelConfig {
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Bytes of KV memory one token slot takes (f16 or bf16 K and V for every layer).
    pub fn kv_bytes_per_slot(&self) -> usize {
        self.kv_bytes_per_slot_of(std::mem::size_of::<half::f16>())
    }

    /// Bytes of KV memory one token slot takes at `element_bytes` per element (1 for an FP8
    /// cache).
    pub fn kv_bytes_per_slot_of(&self, element_bytes: usize) -> usize {
        2 * self.num_layers * self.kv_dim() * element_bytes
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::BadConfig(m));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.head_dim == 0 {
            return bad(format!(
                "heads {} / kv heads {} / head dim {} must be non-zero",
                self.num_heads, self.num_kv_heads, self.head_dim
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} attention heads are not a multiple of {} KV heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dim {} must be even for RoPE", self.head_dim));
        }
        if self.num_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return bad("layers, hidden size and vocabulary must be non-zero".into());
        }
        if let RopeScaling::FreqFactors(f) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                return bad(format!(
                    "rope_freqs has {} entries, expected head_dim/2 = {}",
                    f.len(),
                    self.head_dim / 2
                ));
            }
        }
        Ok(())
    }

    /// RoPE inverse frequencies for each pair of a head's dimensions, scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let mut inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f32 / d as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::FreqFactors(factors) => {
                inv.iter_mut().zip(factors).for_each(|(f, s)| *f /= s)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen < high_wavelen {
                        // high frequency: unchanged
                    } else if wavelen > low_wavelen {
                        *f /= factor;
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        inv
    }
}
