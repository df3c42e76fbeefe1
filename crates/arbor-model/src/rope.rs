//! Rotary position embeddings applied in place to the new tokens' Q and K rows.

use crate::config::{ModelConfig, RopeStyle};

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    style: RopeStyle,
    head_dim: usize,
    /// GGUF models: angles computed like ggml (see [`Rope::tables`]).
    ggml_angles: Option<GgmlAngles>,
}

/// ggml's `rope_cache_init`: `theta_0 = p`, `theta_{i+1} = theta_i * base^(-2/d)` in f32, each
/// divided by a frequency factor (and scaled by `freq_scale`). It differs from
/// `p * base^(-2i/d)` in the last bits; through the 8-bit activation quantization of the next
/// matmul those bits can flip a rounding, so GGUF models follow llama.cpp exactly.
#[derive(Debug, Clone)]
struct GgmlAngles {
    theta_scale: f32,
    freq_scale: f32,
    freq_factors: Option<Vec<f32>>,
}

/// cos/sin of every (token, frequency) pair of one forward step, shared by all layers.
pub struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Self {
        use crate::config::RopeScaling;
        let ggml_angles = config.ggml_rope_angles.then(|| GgmlAngles {
            theta_scale: config.rope_theta.powf(-2.0 / config.head_dim as f32),
            freq_scale: match config.rope_scaling {
                RopeScaling::Linear { factor } => 1.0 / factor,
                _ => 1.0,
            },
            freq_factors: match &config.rope_scaling {
                RopeScaling::FreqFactors(f) => Some(f.clone()),
                _ => None,
            },
        });
        Self {
            inv_freq: config.rope_inv_freq(),
            style: config.rope_style,
            head_dim: config.head_dim,
            ggml_angles,
        }
    }

    pub fn tables(&self, positions: &[usize]) -> RopeTables {
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            match &self.ggml_angles {
                Some(g) => {
                    let mut theta = p as f32;
                    for i in 0..half {
                        let ff = g.freq_factors.as_ref().map_or(1.0, |f| f[i]);
                        let t = g.freq_scale * (theta / ff);
                        cos.push(t.cos());
                        sin.push(t.sin());
                        theta *= g.theta_scale;
                    }
                }
                None => {
                    for &f in &self.inv_freq {
                        // f32 like transformers (position * inv_freq in f32, then cos/sin).
                        let theta = p as f32 * f;
                        cos.push(theta.cos());
                        sin.push(theta.sin());
                    }
                }
            }
        }
        RopeTables { cos, sin }
    }

    /// cos and sin for every position below `max_pos`, `[max_pos, head_dim / 2]` each (the
    /// CUDA backend's tables, the same angles as the CPU path).
    pub fn full_tables(&self, max_pos: usize) -> (Vec<f32>, Vec<f32>) {
        let positions: Vec<usize> = (0..max_pos).collect();
        let t = self.tables(&positions);
        (t.cos, t.sin)
    }

    /// `x`: `[tokens, n_heads * head_dim]`, rotated in place.
    pub fn apply(&self, x: &mut [f32], n_heads: usize, t: &RopeTables) {
        let d = self.head_dim;
        let half = d / 2;
        for (tok, row) in x.chunks_exact_mut(n_heads * d).enumerate() {
            let cos = &t.cos[tok * half..(tok + 1) * half];
            let sin = &t.sin[tok * half..(tok + 1) * half];
            for head in row.chunks_exact_mut(d) {
                match self.style {
                    RopeStyle::Interleaved => {
                        for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                            let (a, b) = (pair[0], pair[1]);
                            pair[0] = a * cos[i] - b * sin[i];
                            pair[1] = a * sin[i] + b * cos[i];
                        }
                    }
                    RopeStyle::Halves => {
                        let (lo, hi) = head.split_at_mut(half);
                        for i in 0..half {
                            let (a, b) = (lo[i], hi[i]);
                            lo[i] = a * cos[i] - b * sin[i];
                            hi[i] = a * sin[i] + b * cos[i];
                        }
                    }
                }
            }
        }
    }
}
