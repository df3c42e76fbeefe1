//! The parallel driver shared by the batch-invariant matmul kernels (`qmatmul`, `dense`).
//!
//! The output is split into parallel tasks (by rows for a prefill, by columns for a decode);
//! within a task, a kernel computes a tile of up to `C` columns by `R` activation rows at a
//! time. How the work is split never changes an output element: the kernels compute each
//! element on its own.

use rayon::prelude::*;

/// Activation rows that share one pass over a weight row (the dense kernel, the ggml block
/// kernel).
pub(crate) const ROW_TILE: usize = 4;
/// Output columns of the tiled block kernel: one i32 lane each in a 512-bit register.
pub(crate) const TILE_COLS: usize = 16;
/// Activation rows per pass of the tiled block kernel: a weight block unpacked once serves
/// this many rows, each with its accumulator in a register.
pub(crate) const TILE_ROWS: usize = 8;

/// Returns `y`, `[m, n]` row-major. `tile(c, r0, out)` writes `y[r0 + i][c]` into `out[i]` for
/// `i < out.len()` (at most [`ROW_TILE`] rows).
pub(crate) fn par_columns(
    m: usize,
    n: usize,
    tile: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    drive::<1, ROW_TILE>(m, n, |c, r0, rows, out| {
        let mut column = [0f32; ROW_TILE];
        tile(c, r0, &mut column[..rows]);
        for (o, v) in out.iter_mut().zip(&column[..rows]) {
            o[0] = *v;
        }
    })
}

/// Returns `y`, `[m, n]` row-major, for kernels that compute [`TILE_COLS`] columns at once:
/// `tile(c0, r0, rows, out)` writes `y[r0 + i][c0 + j]` into `out[i][j]` for `i < rows` (at
/// most [`TILE_ROWS`]) and every `j`; columns past `n` (the last tile's padding) are dropped.
pub(crate) fn par_tiles(
    m: usize,
    n: usize,
    tile: impl Fn(usize, usize, usize, &mut [[f32; TILE_COLS]; TILE_ROWS]) + Sync,
) -> Vec<f32> {
    drive::<TILE_COLS, TILE_ROWS>(m, n, tile)
}

/// Rows at or above which the work is split by rows rather than by columns.
const ROW_SPLIT_MIN: usize = 32;

/// Columns in groups of `C`, rows in tiles of `R`.
///
/// Many rows (prefill): each task owns a slab of whole rows of `y` and writes it in place,
/// visiting every column group once and all the slab's row tiles under it, so a group's
/// weights stay in L1 while they serve the slab. Few rows (decode): tasks own column ranges,
/// so that both cores share the weights, which are then read once per step.
fn drive<const C: usize, const R: usize>(
    m: usize,
    n: usize,
    tile: impl Fn(usize, usize, usize, &mut [[f32; C]; R]) + Sync,
) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    if m >= ROW_SPLIT_MIN {
        // Whole row tiles per task, enough tasks to balance the cores, at most 64 rows so a
        // slab's quantized activations stay in L2.
        let rows_per_task = (m / (4 * rayon::current_num_threads()))
            .clamp(R, 64)
            .next_multiple_of(R);
        y.par_chunks_mut(rows_per_task * n)
            .enumerate()
            .for_each(|(task, slab)| {
                let first = task * rows_per_task;
                let slab_rows = slab.len() / n;
                let mut buf = [[0f32; C]; R];
                for c in (0..n).step_by(C) {
                    let cols = C.min(n - c);
                    for r0 in (0..slab_rows).step_by(R) {
                        let rows = R.min(slab_rows - r0);
                        tile(c, first + r0, rows, &mut buf);
                        for (i, row) in buf[..rows].iter().enumerate() {
                            let at = (r0 + i) * n + c;
                            slab[at..at + cols].copy_from_slice(&row[..cols]);
                        }
                    }
                }
            });
        return y;
    }
    // Output columns per parallel task: enough work to amortise scheduling, enough tasks to
    // keep every core busy; a whole number of column groups.
    let cols_per_task = (n / (4 * rayon::current_num_threads()))
        .clamp(8, 256)
        .next_multiple_of(C);
    let parts: Vec<(usize, Vec<f32>)> = (0..n)
        .step_by(cols_per_task)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|c0| {
            let c1 = (c0 + cols_per_task).min(n);
            let width = c1 - c0;
            let mut out = vec![0f32; m * width];
            let mut buf = [[0f32; C]; R];
            for c in (c0..c1).step_by(C) {
                let cols = C.min(c1 - c);
                for r0 in (0..m).step_by(R) {
                    let rows = R.min(m - r0);
                    tile(c, r0, rows, &mut buf);
                    for (i, row) in buf[..rows].iter().enumerate() {
                        let at = (r0 + i) * width + (c - c0);
                        out[at..at + cols].copy_from_slice(&row[..cols]);
                    }
                }
            }
            (c0, out)
        })
        .collect();
    for (c0, out) in parts {
        let width = out.len() / m.max(1);
        for r in 0..m {
            y[r * n + c0..r * n + c0 + width].copy_from_slice(&out[r * width..(r + 1) * width]);
        }
    }
    y
}
