//! Batch-invariant matmul on f32 weights (Hugging Face folders, F16/BF16/F32 GGUF tensors).
//!
//! Each output element is one dot product in a fixed order (8 lanes by fused multiply-add,
//! lanes added in order, then the tail), whatever the number of rows or the thread split, so a
//! token's values do not depend on its batch: the same guarantee as the block kernel
//! (`qmatmul`). A general GEMM (candle's) picks its blocking from the matrix shape and sums in a
//! different order for different row counts, which would let the prefix cache or the batch
//! change an output in its last bits.
//!
//! Four activation rows share each weight chunk loaded, like the block kernel's row tile.

use crate::cpu::columns::ROW_TILE;

#[derive(Debug, Clone)]
pub struct DenseMatrix {
    rows: usize,
    cols: usize,
    /// `[rows, cols]` row-major.
    data: Vec<f32>,
}

impl DenseMatrix {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * cols, "a [rows, cols] matrix");
        Self { rows, cols, data }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `x`: `[m, cols]` row-major; returns `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        assert_eq!(x.len(), m * k, "activation shape does not match the weight");
        crate::cpu::columns::par_columns(m, n, |c, r0, out| {
            let xs = &x[r0 * k..(r0 + out.len()) * k];
            dot_rows(&self.data[c * k..(c + 1) * k], xs, out);
        })
    }
}

/// `w · x_r` for each of `out.len()` rows of `xs`, each in the order of [`dot`].
#[inline]
fn dot_rows(w: &[f32], xs: &[f32], out: &mut [f32]) {
    let k = w.len();
    let main = k / 8 * 8;
    let mut acc = [[0f32; 8]; ROW_TILE];
    for base in (0..main).step_by(8) {
        let wc = &w[base..base + 8];
        for (r, a) in acc.iter_mut().enumerate().take(out.len()) {
            let xc = &xs[r * k + base..r * k + base + 8];
            for l in 0..8 {
                a[l] = xc[l].mul_add(wc[l], a[l]);
            }
        }
    }
    for (r, o) in out.iter_mut().enumerate() {
        let mut sum = 0f32;
        for lane in acc[r] {
            sum += lane;
        }
        for i in main..k {
            sum += xs[r * k + i] * w[i];
        }
        *o = sum;
    }
}

/// The definition of one output element.
#[cfg(test)]
fn dot(w: &[f32], x: &[f32]) -> f32 {
    let mut out = [0f32];
    dot_rows(w, x, &mut out);
    out[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn rows_do_not_depend_on_the_batch_and_match_the_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        // 71 rows: the driver splits them into slabs (a partial one last).
        let (n, k, m) = (45, 77, 71);
        let w = DenseMatrix::new(
            n,
            k,
            (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect(),
        );
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let batch = w.matmul(&x, m);
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            assert_eq!(
                w.matmul(xr, 1),
                batch[r * n..(r + 1) * n].to_vec(),
                "row {r}"
            );
            for c in 0..n {
                let wc = &w.data[c * k..(c + 1) * k];
                assert_eq!(batch[r * n + c].to_bits(), dot(wc, xr).to_bits());
                let exact: f64 = wc.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                assert!((batch[r * n + c] as f64 - exact).abs() < 1e-4);
            }
        }
    }
}
