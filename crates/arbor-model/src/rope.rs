//! Rotary position embeddings applied in place to the new tokens' Q and K rows.

use crate::config::{ModelConfig, RopeStyle};

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    style: RopeStyle,
    head_dim: usize,
}

/// cos/sin of every (token, frequency) pair of one forward step, shared by all layers.
pub struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Self {
        Self {
            inv_freq: config.rope_inv_freq(),
            style: config.rope_style,
            head_dim: config.head_dim,
        }
    }

    pub fn tables(&self, positions: &[usize]) -> RopeTables {
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                // f32 like transformers (position * inv_freq in f32, then cos/sin).
                let theta = p as f32 * f;
                cos.push(theta.cos());
                sin.push(theta.sin());
            }
        }
        RopeTables { cos, sin }
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
