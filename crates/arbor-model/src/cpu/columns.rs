//! The parallel driver shared by the batch-invariant matmul kernels (`qmatmul`, `dense`).
//!
//! Output columns (weight rows) are split into chunks run in parallel; within a chunk, each
//! weight row meets the activation rows `ROW_TILE` at a time. How the work is split never
//! changes an output element: the kernels compute each element on its own.

use rayon::prelude::*;

/// Activation rows that share one pass over a weight row.
pub(crate) const ROW_TILE: usize = 4;
/// Activation rows per pass for the two-column kernels: their 32 registers hold the running
/// sums of 8 rows, so a weight block unpacked once serves twice as many rows.
pub(crate) const PAIR_ROW_TILE: usize = 8;

/// Returns `y`, `[m, n]` row-major. `tile(c, r0, out)` writes `y[r0 + i][c]` into `out[i]` for
/// `i < out.len()` (at most [`ROW_TILE`] rows).
pub(crate) fn par_columns(
    m: usize,
    n: usize,
    tile: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    drive(m, n, 1, ROW_TILE, |c, _, r0, rows, out| {
        tile(c, r0, &mut out[0][..rows])
    })
}

/// [`par_columns`] for kernels that compute two output columns at once (one per half of a
/// 512-bit register): `tile(c, cols, r0, rows, out)` writes `y[r0 + i][c + j]` into
/// `out[j][i]` for `j < cols` (2, or 1 for a last odd column) and `i < rows` (at most
/// [`PAIR_ROW_TILE`]).
pub(crate) fn par_column_pairs(
    m: usize,
    n: usize,
    tile: impl Fn(usize, usize, usize, usize, &mut [[f32; PAIR_ROW_TILE]; 2]) + Sync,
) -> Vec<f32> {
    drive(m, n, 2, PAIR_ROW_TILE, tile)
}

/// Columns in groups of `step` (1 or 2), rows in tiles of `row_tile` (at most
/// [`PAIR_ROW_TILE`]).
fn drive(
    m: usize,
    n: usize,
    step: usize,
    row_tile: usize,
    tile: impl Fn(usize, usize, usize, usize, &mut [[f32; PAIR_ROW_TILE]; 2]) + Sync,
) -> Vec<f32> {
    // Output columns per parallel task: enough work to amortise scheduling, enough tasks to
    // keep every core busy; a whole number of column groups.
    let cols_per_task = (n / (4 * rayon::current_num_threads()))
        .clamp(8, 256)
        .next_multiple_of(step);
    let parts: Vec<(usize, Vec<f32>)> = (0..n)
        .step_by(cols_per_task)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|c0| {
            let c1 = (c0 + cols_per_task).min(n);
            let width = c1 - c0;
            let mut out = vec![0f32; m * width];
            let mut buf = [[0f32; PAIR_ROW_TILE]; 2];
            for c in (c0..c1).step_by(step) {
                let cols = step.min(c1 - c);
                for r0 in (0..m).step_by(row_tile) {
                    let rows = row_tile.min(m - r0);
                    tile(c, cols, r0, rows, &mut buf);
                    for (j, col) in buf[..cols].iter().enumerate() {
                        for (i, v) in col[..rows].iter().enumerate() {
                            out[(r0 + i) * width + (c + j - c0)] = *v;
                        }
                    }
                }
            }
            (c0, out)
        })
        .collect();
    let mut y = vec![0f32; m * n];
    for (c0, out) in parts {
        let width = out.len() / m.max(1);
        for r in 0..m {
            y[r * n + c0..r * n + c0 + width].copy_from_slice(&out[r * width..(r + 1) * width]);
        }
    }
    y
}
