//! Batch-invariant matmul on 32-wide GGUF blocks (Q4_0, Q4_1, Q8_0, and Q5_K's and Q6_K's
//! values in 32-wide blocks), CPU.
//!
//! `y = x · Wᵀ` with `W` kept in its GGUF block format (the same bytes, rearranged) and each
//! row of `x` quantized to 8 bits per 32-block (ggml's `quantize_row_q8_0` / `_q8_1`), then
//! integer dot products per block. Two definitions of an output element exist, each with its
//! own weight layout and kernels:
//!
//! - **Tiled** (the default, [`tiles`]): per block one exact i32 sum `Σ w·x` over its 32
//!   elements, then `acc = fma(d_w·d_x, isum, acc)` (and for Q4_1 `acc = fma(m, s, acc)`),
//!   blocks in order. Weights are repacked at load into tiles of 16 output columns, so one
//!   512-bit `vpdpbusd` computes 4 elements of 16 columns; a block of 16 columns and one
//!   activation row is 8 of them and a handful of float operations, about a quarter of the
//!   instructions the ggml definition needs (it keeps eight float lane sums per block and
//!   output, each converted, scaled and accumulated).
//! - **ggml** ([`ggml`], `--cpu-kernels ggml`): llama.cpp's AVX2 `vec_dot_q4_1_q8_1` /
//!   `vec_dot_q4_0_q8_0` / `vec_dot_q8_0_q8_0`, down to the order of the float accumulation,
//!   on rows in the file's layout. It exists to check the rest of the model against llama.cpp
//!   bit for bit (`tests/llama_cpp_exact.rs`); the two definitions differ only in how float
//!   sums are grouped (last bits; `tiled_and_ggml_definitions_differ_only_in_rounding`).
//!
//! Both are batch-invariant: every output element is computed by the same operations whatever
//! the number of rows, the other rows, the thread split or the SIMD path, so a token's logits
//! do not depend on what else is in the batch or on how a prompt was chunked, and the KV a
//! prefill writes is bit-identical to what a decode would write. That is what lets the prefix
//! cache (and batching) never change an output. The integer sums are exact on every path,
//! which is what makes the AVX2 and AVX-512 kernels agree bit for bit.
//!
//! Block layouts (ggml), as in the file:
//! ```text
//!   Q4_0 (18 B): d:f16 | qs[16]          element e: (qs[e%16] >> 4*(e/16)) & 15, value d*(q-8)
//!   Q4_1 (20 B): d:f16 m:f16 | qs[16]    element e as above, value d*q + m
//!   Q8_0 (34 B): d:f16 | qs:i8[32]       value d*q
//!   Q6K  (28 B): d:f16 sc:i8[2] | ql[16] | qh[8]
//!                element e: q = nibble of ql as Q4's | 2 bits of qh[4*(e/16) + e%4] at
//!                bit 2*((e%16)/4), shifted to bits 4-5; value d*sc[e/16]*(q-32)
//! ```
//!   Q5K  (26 B): d:f16 dmin:f16 sc:u8 m:u8 | ql[16] | qh[4]
//!                element e: q = nibble of ql as Q4's | bit p of qh[e%4] at bit 4, where
//!                p = (e%16)/4 + 4*(e/16); value d*sc*q - dmin*m
//!
//! Q6K and Q5K are not GGUF blocks: they are a K-quant super-block's values cut into its eight
//! 32-weight pieces ([`kquants::q6k_to_blocks`], [`kquants::q5k_to_blocks`]), each keeping the
//! super-block's f16 factors and its sub-blocks' integer scales (and mins), so nothing is
//! rounded. Q6K's integer block sum is `sc0·Σ(q−32)x + sc1·Σ(q−32)x` over its two 16-weight
//! halves, Q5K's `sc·Σqx` with Q4_1's `m·s` term for `m = −dmin·m` (exact in f32): exact in
//! i32 as the others. They exist in the tiled layout only (the ggml definition is llama.cpp's,
//! which has no such blocks).
//! The tiled layout, per tile of 16 columns and block (the same byte count as 16 blocks):
//! ```text
//!   d:f16[16] | m:f16[16] (Q4_1) | groups of 64 bytes: column j's 4 quant bytes at 4j
//!   Q4_0/Q4_1: 4 groups, group g = qs[4g..4g+4] (low nibbles: elements 4g.., high: 16+4g..)
//!   Q8_0:      8 groups, group g = qs[4g..4g+4] stored as q + 128 (unsigned for vpdpbusd)
//!   Q6K:       d:f16[16] | sc0:i8[16] sc1:i8[16] | 4 nibble groups as Q4 | 2 groups of 64
//!              bytes, h = 0, 1: column j's qh[4h..4h+4] at 4j (the high bits of half h)
//!   Q5K:       d:f16[16] | dmin:f16[16] | sc:u8[16] m:u8[16] | 4 nibble groups as Q4 | one
//!              group of 64 bytes: column j's qh[0..4] at 4j
//! ```

use half::f16;
use rayon::prelude::*;

use crate::cpu::columns::TILE_COLS;

mod ggml;
pub mod kquants;
mod tiles;

pub const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    Q4_0,
    Q4_1,
    Q8_0,
    /// Q6_K's values in 32-weight blocks (module docs); tiled layout only.
    Q6K,
    /// Q5_K's values in 32-weight blocks (module docs); tiled layout only.
    Q5K,
}

impl BlockFormat {
    /// Bytes per block in a GGUF file.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
            BlockFormat::Q6K => 28,
            BlockFormat::Q5K => 26,
        }
    }

    /// Offset of the quants in a block (Q6K: of `ql`).
    fn qs_offset(self) -> usize {
        match self {
            BlockFormat::Q4_0 | BlockFormat::Q8_0 => 2,
            BlockFormat::Q4_1 | BlockFormat::Q6K => 4,
            BlockFormat::Q5K => 6,
        }
    }

    /// Whether the ggml definition (the file's row layout) exists for the format.
    fn has_rows_layout(self) -> bool {
        !matches!(self, BlockFormat::Q6K | BlockFormat::Q5K)
    }

    /// Whether a block adds a minimum times the activations' sum (`m·s`).
    fn has_min(self) -> bool {
        matches!(self, BlockFormat::Q4_1 | BlockFormat::Q5K)
    }

    /// Offset of the quant groups in a tile block (after the scales, and Q4_1's minimums or
    /// Q6K's sub-block scales).
    fn tile_quants_offset(self) -> usize {
        match self {
            BlockFormat::Q4_0 | BlockFormat::Q8_0 => 2 * TILE_COLS,
            BlockFormat::Q4_1 | BlockFormat::Q6K => 4 * TILE_COLS,
            BlockFormat::Q5K => 6 * TILE_COLS,
        }
    }

    /// What the tiled layout adds to a quant to store it unsigned: the weight is
    /// `stored - bias`, so a block's integer sum is `Σ stored·x - bias·Σx`.
    fn tile_bias(self) -> i32 {
        match self {
            BlockFormat::Q4_0 => 8,
            BlockFormat::Q4_1 | BlockFormat::Q5K => 0,
            BlockFormat::Q8_0 => 128,
            BlockFormat::Q6K => 32,
        }
    }

    /// Bytes of one tile block: 16 columns of one block.
    fn tile_block_bytes(self) -> usize {
        TILE_COLS * self.block_bytes()
    }
}

/// Where a matrix's blocks lie, which is also which definition computes its products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The file's layout, row after row: the ggml definition.
    Rows,
    /// Tiles of 16 columns (the last one padded with zero blocks): the tiled definition.
    Tiles,
}

impl Layout {
    /// The layout the process's kernel choice asks for (`cpu::kernels`).
    pub fn selected() -> Self {
        if crate::cpu::kernels::ggml_blocks() {
            Layout::Rows
        } else {
            Layout::Tiles
        }
    }
}

/// A `[rows, cols]` weight matrix in one of the 32-block formats.
#[derive(Clone)]
pub struct BlockMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    layout: Layout,
    /// Rows: GGUF block bytes, row after row. Tiles: tile after tile, each block after block.
    data: Vec<u8>,
}

impl std::fmt::Debug for BlockMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BlockMatrix({:?}, {}x{}, {:?})",
            self.format, self.rows, self.cols, self.layout
        )
    }
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// One weight block's bytes, read through the layout of its format.
#[derive(Clone, Copy)]
struct WeightBlock<'a> {
    bytes: &'a [u8],
}

impl WeightBlock<'_> {
    #[inline]
    fn d(&self) -> f32 {
        f16_at(self.bytes, 0)
    }
    /// The term a block adds per unit of the activations' sum (formats with a minimum).
    #[inline]
    fn min(&self, format: BlockFormat) -> f32 {
        match format {
            BlockFormat::Q5K => -(f16_at(self.bytes, 2) * f32::from(self.bytes[5])),
            _ => f16_at(self.bytes, 2),
        }
    }
    /// The quant of element `e`: unsigned 0..15 for the 4-bit formats (Q4_0's -8 bias is
    /// applied by the caller), 0..63 for Q6K, signed for Q8_0.
    #[inline]
    fn quant(&self, format: BlockFormat, e: usize) -> i32 {
        let qs = &self.bytes[format.qs_offset()..];
        let nibble = if e < 16 {
            qs[e] & 0x0F
        } else {
            qs[e - 16] >> 4
        };
        match format {
            BlockFormat::Q8_0 => qs[e] as i8 as i32,
            BlockFormat::Q6K => {
                let high = (qs[16 + 4 * (e / 16) + e % 4] >> (2 * ((e % 16) / 4))) & 3;
                (nibble | (high << 4)) as i32
            }
            BlockFormat::Q5K => {
                let high = (qs[16 + e % 4] >> ((e % 16) / 4 + 4 * (e / 16))) & 1;
                (nibble | (high << 4)) as i32
            }
            _ => nibble as i32,
        }
    }
    /// The integer weight of element `e` (Q4_0's and Q6K's bias applied, and Q6K's sub-block
    /// scale): the block's value is `d` times it (plus Q4_1's `m`).
    #[inline]
    fn weight(&self, format: BlockFormat, e: usize) -> i32 {
        let q = self.quant(format, e);
        match format {
            BlockFormat::Q4_0 => q - 8,
            BlockFormat::Q6K => i32::from(self.bytes[2 + e / 16] as i8) * (q - 32),
            BlockFormat::Q5K => i32::from(self.bytes[4]) * q,
            _ => q,
        }
    }
}

/// Lays GGUF rows out in tiles of 16 columns (see the module docs).
fn tile_rows<R: AsRef<[u8]>>(format: BlockFormat, cols: usize, rows: &[R]) -> Vec<u8> {
    let (nb, bb) = (cols / QK, format.block_bytes());
    let tbb = format.tile_block_bytes();
    let qa = format.tile_quants_offset();
    let mut data = vec![0u8; rows.len().div_ceil(TILE_COLS) * nb * tbb];
    for (c, row) in rows.iter().enumerate() {
        let (t, j) = (c / TILE_COLS, c % TILE_COLS);
        for (b, src) in row.as_ref().chunks_exact(bb).enumerate() {
            let dst = &mut data[(t * nb + b) * tbb..(t * nb + b + 1) * tbb];
            dst[2 * j..2 * j + 2].copy_from_slice(&src[..2]);
            match format {
                BlockFormat::Q4_1 => dst[2 * TILE_COLS + 2 * j..2 * TILE_COLS + 2 * j + 2]
                    .copy_from_slice(&src[2..4]),
                BlockFormat::Q6K => {
                    dst[2 * TILE_COLS + j] = src[2];
                    dst[3 * TILE_COLS + j] = src[3];
                }
                BlockFormat::Q5K => {
                    dst[2 * TILE_COLS + 2 * j..2 * TILE_COLS + 2 * j + 2]
                        .copy_from_slice(&src[2..4]);
                    dst[4 * TILE_COLS + j] = src[4];
                    dst[5 * TILE_COLS + j] = src[5];
                }
                _ => {}
            }
            // Q6K's ql and then qh, as groups 0-3 and 4-5.
            let qs = &src[format.qs_offset()..];
            for (g, four) in qs.chunks_exact(4).enumerate() {
                let at = qa + g * 64 + 4 * j;
                for (k, &q) in four.iter().enumerate() {
                    dst[at + k] = if format == BlockFormat::Q8_0 {
                        q ^ 0x80
                    } else {
                        q
                    };
                }
            }
        }
    }
    data
}

impl BlockMatrix {
    /// Takes raw GGUF block data of a `[rows, cols]` tensor, laid out for the kernels the
    /// process uses ([`Layout::selected`]).
    pub fn from_gguf_bytes(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        data: &[u8],
    ) -> Option<Self> {
        Self::with_layout(format, rows, cols, data, Layout::selected())
    }

    /// [`Self::from_gguf_bytes`] with the layout (and so the definition) chosen by the caller.
    pub fn with_layout(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        data: &[u8],
        layout: Layout,
    ) -> Option<Self> {
        if cols == 0
            || !cols.is_multiple_of(QK)
            || data.len() != rows * cols / QK * format.block_bytes()
            || (layout == Layout::Rows && !format.has_rows_layout())
        {
            return None;
        }
        let row_bytes = cols / QK * format.block_bytes();
        let data = match layout {
            Layout::Rows => data.to_vec(),
            Layout::Tiles => {
                let rows: Vec<&[u8]> = data.chunks_exact(row_bytes).collect();
                tile_rows(format, cols, &rows)
            }
        };
        Some(Self {
            format,
            rows,
            cols,
            layout,
            data,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> BlockFormat {
        self.format
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    fn row_bytes(&self) -> usize {
        self.cols / QK * self.format.block_bytes()
    }

    /// Row `r` in the file's layout (only for [`Layout::Rows`]).
    fn row(&self, r: usize) -> &[u8] {
        debug_assert_eq!(self.layout, Layout::Rows);
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// Bytes of one tile (16 columns, every block).
    fn tile_bytes(&self) -> usize {
        self.cols / QK * self.format.tile_block_bytes()
    }

    /// Row `r` as the GGUF file holds it, whatever the layout.
    pub fn gguf_row(&self, r: usize) -> Vec<u8> {
        match self.layout {
            Layout::Rows => self.row(r).to_vec(),
            Layout::Tiles => {
                let (f, bb) = (self.format, self.format.block_bytes());
                let (t, j) = (r / TILE_COLS, r % TILE_COLS);
                let tile = &self.data[t * self.tile_bytes()..(t + 1) * self.tile_bytes()];
                let mut row = Vec::with_capacity(self.row_bytes());
                for blk in tile.chunks_exact(f.tile_block_bytes()) {
                    let start = row.len();
                    row.extend_from_slice(&blk[2 * j..2 * j + 2]);
                    match f {
                        BlockFormat::Q4_1 => {
                            let m = 2 * TILE_COLS + 2 * j;
                            row.extend_from_slice(&blk[m..m + 2]);
                        }
                        BlockFormat::Q6K => {
                            row.extend([blk[2 * TILE_COLS + j], blk[3 * TILE_COLS + j]]);
                        }
                        BlockFormat::Q5K => {
                            let m = 2 * TILE_COLS + 2 * j;
                            row.extend_from_slice(&blk[m..m + 2]);
                            row.extend([blk[4 * TILE_COLS + j], blk[5 * TILE_COLS + j]]);
                        }
                        _ => {}
                    }
                    let groups = match f {
                        BlockFormat::Q8_0 => 8,
                        BlockFormat::Q6K => 6,
                        BlockFormat::Q5K => 5,
                        _ => 4,
                    };
                    for g in 0..groups {
                        let at = f.tile_quants_offset() + g * 64 + 4 * j;
                        row.extend(blk[at..at + 4].iter().map(|&q| {
                            if f == BlockFormat::Q8_0 {
                                q ^ 0x80
                            } else {
                                q
                            }
                        }));
                    }
                    debug_assert_eq!(row.len() - start, bb);
                }
                row
            }
        }
    }

    /// Stacks matrices of the same format, width and layout: one matmul instead of several (Q,
    /// K and V; gate and up), with outputs side by side.
    pub fn concat_rows(parts: &[&BlockMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.format != first.format || p.cols != first.cols || p.layout != first.layout)
        {
            return None;
        }
        let rows: Vec<Vec<u8>> = parts
            .iter()
            .flat_map(|p| (0..p.rows).map(|r| p.gguf_row(r)))
            .collect();
        let data = match first.layout {
            Layout::Rows => rows.concat(),
            Layout::Tiles => tile_rows(first.format, first.cols, &rows),
        };
        Some(Self {
            format: first.format,
            rows: rows.len(),
            cols: first.cols,
            layout: first.layout,
            data,
        })
    }

    /// One row dequantized to f32.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let bb = self.format.block_bytes();
        for (bi, bytes) in self.gguf_row(row).chunks_exact(bb).enumerate() {
            let w = WeightBlock { bytes };
            for e in 0..QK {
                let q = w.weight(self.format, e) as f32;
                out[bi * QK + e] = match self.format {
                    BlockFormat::Q4_1 | BlockFormat::Q5K => w.d() * q + w.min(self.format),
                    BlockFormat::Q4_0 | BlockFormat::Q8_0 | BlockFormat::Q6K => w.d() * q,
                };
            }
        }
    }

    /// `x`: `[m, cols]` row-major; returns `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(
            x.len(),
            m * self.cols,
            "activation shape does not match the weight"
        );
        let nb = self.cols / QK;
        let with_sum = self.format.has_min();
        let acts: Vec<ActBlock> = if m > 1 {
            x.par_chunks(self.cols)
                .flat_map_iter(|row| quantize_row(row, with_sum))
                .collect()
        } else {
            quantize_row(x, with_sum).collect()
        };
        match self.layout {
            Layout::Rows => crate::cpu::columns::par_columns(m, self.rows, |c, r0, out| {
                let a = &acts[r0 * nb..(r0 + out.len()) * nb];
                ggml::dot_rows(self.format, self.row(c), a, nb, out);
            }),
            Layout::Tiles => {
                // The kernel path is chosen once per matmul, not per tile.
                let vnni = crate::cpu::kernels::vnni();
                let tb = self.tile_bytes();
                crate::cpu::columns::par_tiles(m, self.rows, |c0, r0, rows, out| {
                    let t = c0 / TILE_COLS;
                    let tile = &self.data[t * tb..(t + 1) * tb];
                    let a = &acts[r0 * nb..(r0 + rows) * nb];
                    tiles::dot_tile(self.format, tile, a, nb, rows, out, vnni);
                })
            }
        }
    }
}

/// An activation block quantized to 8 bits (ggml's Q8_0, or Q8_1 with `s = d * Σq`).
/// `d` and `s` hold the f16-rounded values ggml stores; `halves` the exact sums of the quants
/// of each half, packed (Q6K's two sub-blocks take a bias each), so that a block stays 44
/// bytes: measured, 48 made the other formats' prefill slower.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct ActBlock {
    qs: [i8; 32],
    d: f32,
    s: f32,
    /// `Σq` over elements 0-15 in the low 16 bits (two's complement), over 16-31 in the high
    /// 16: each at most 16·127 in magnitude.
    halves: i32,
}

impl ActBlock {
    /// `Σq` over the block, exact.
    #[inline(always)]
    fn sum(&self) -> i32 {
        self.halves as i16 as i32 + (self.halves >> 16)
    }
}

/// ggml's AVX2 `quantize_row_q8_0` / `quantize_row_q8_1`: scale by `127 / max|x|`, round half to
/// even. The quants stay in -127..=127.
fn quantize_row(x: &[f32], with_sum: bool) -> impl Iterator<Item = ActBlock> + '_ {
    x.chunks_exact(QK).map(move |chunk| {
        let chunk: &[f32; QK] = chunk.try_into().expect("chunks of QK");
        let amax = block_amax(chunk);
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let (qs, sum, first) = round_block(chunk, id);
        let d16 = f16::from_f32(d).to_f32();
        let s = if with_sum {
            f16::from_f32(d * sum as f32).to_f32()
        } else {
            0.0
        };
        ActBlock {
            qs,
            d: d16,
            s,
            halves: (first & 0xFFFF) | ((sum - first) << 16),
        }
    })
}

/// `max |x|` over a block, NaNs ignored (as `f32::max` does).
#[inline]
fn block_amax(x: &[f32; QK]) -> f32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    // SAFETY: AVX2 is enabled for the whole build; the loads read the 32 floats of `x`.
    unsafe {
        use std::arch::x86_64::*;
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let mut m = _mm256_setzero_ps();
        for i in 0..4 {
            let v = _mm256_and_ps(_mm256_loadu_ps(x.as_ptr().add(8 * i)), abs);
            // `maxps` returns its second operand when either is NaN: a NaN `v` leaves `m`.
            m = _mm256_max_ps(v, m);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        lanes.iter().fold(0f32, |a, &v| a.max(v))
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    x.iter().fold(0f32, |a, &v| a.max(v.abs()))
}

/// `round_ties_even(x * id)` as i8 for a block, the sum of the quants and the sum of the
/// first 16. `|x * id| <= 127` by the choice of `id`, so the conversions never saturate.
#[inline]
fn round_block(x: &[f32; QK], id: f32) -> ([i8; QK], i32, i32) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    // SAFETY: AVX2 is enabled for the whole build; the loads read the 32 floats of `x` and the
    // store writes the 32 bytes of `qs`.
    unsafe {
        use std::arch::x86_64::*;
        let scale = _mm256_set1_ps(id);
        // `cvtps` rounds to nearest even under the default rounding mode, as `round_ties_even`.
        let q: [__m256i; 4] = std::array::from_fn(|i| {
            _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(8 * i)), scale))
        });
        let (first, second) = (_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let mut lanes = [0i32; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, first);
        let half_sum: i32 = lanes.iter().sum();
        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, second);
        // packs work within 128-bit halves; the permutation restores element order.
        let packed = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let ordered =
            _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let mut qs = [0i8; QK];
        _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, ordered);
        (qs, half_sum + lanes.iter().sum::<i32>(), half_sum)
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    {
        let mut qs = [0i8; QK];
        for (q, &v) in qs.iter_mut().zip(x) {
            *q = (v * id).round_ties_even() as i8;
        }
        let sum = |qs: &[i8]| qs.iter().map(|&q| q as i32).sum::<i32>();
        (qs, sum(&qs), sum(&qs[..QK / 2]))
    }
}

/// The tiled definition of one output element (weight row `w` in the file's layout against one
/// activation row); the kernels of [`tiles`] must agree with it bit for bit.
#[cfg_attr(not(test), allow(dead_code))]
fn dot_tiled_definition(format: BlockFormat, w: &[u8], a: &[ActBlock]) -> f32 {
    let mut acc = 0f32;
    for (bytes, ab) in w.chunks_exact(format.block_bytes()).zip(a) {
        let wb = WeightBlock { bytes };
        let isum: i32 = (0..QK)
            .map(|e| wb.weight(format, e) * ab.qs[e] as i32)
            .sum();
        acc = (wb.d() * ab.d).mul_add(isum as f32, acc);
        if format.has_min() {
            acc = wb.min(format).mul_add(ab.s, acc);
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::columns::TILE_ROWS;
    use rand::{Rng, SeedableRng};

    /// Random GGUF bytes for a `[rows, cols]` matrix. With `extreme`, Q8_0 quants include -128
    /// and 127 (ggml's quantizer never writes -128, but a file may hold it).
    fn random_gguf(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        extreme: bool,
        rng: &mut impl Rng,
    ) -> Vec<u8> {
        let mut data = Vec::new();
        for _ in 0..rows * cols / QK {
            data.extend(f16::from_f32(rng.random_range(0.001..0.05)).to_le_bytes());
            match format {
                BlockFormat::Q4_1 => {
                    data.extend(f16::from_f32(rng.random_range(-0.2..0.2)).to_le_bytes())
                }
                // Sub-block scales over the whole i8 range, -128 and 127 included.
                BlockFormat::Q6K => data.extend((0..2).map(|_| match rng.random_range(0..8) {
                    0 => 0x80,
                    1 => 0x7F,
                    _ => rng.random::<u8>(),
                })),
                // dmin, then a 6-bit scale and min (63 included).
                BlockFormat::Q5K => {
                    data.extend(f16::from_f32(rng.random_range(0.0..0.01)).to_le_bytes());
                    data.extend((0..2).map(|_| match rng.random_range(0..6) {
                        0 => 63,
                        _ => rng.random_range(0..64u8),
                    }));
                }
                _ => {}
            }
            let n = match format {
                BlockFormat::Q8_0 => 32,
                BlockFormat::Q6K => 24,
                BlockFormat::Q5K => 20,
                _ => 16,
            };
            data.extend((0..n).map(|i| match format {
                BlockFormat::Q8_0 if extreme && i % 7 == 0 => {
                    if rng.random::<bool>() {
                        0x80
                    } else {
                        0x7F
                    }
                }
                BlockFormat::Q8_0 => rng.random_range(-127i8..=127) as u8,
                _ => rng.random::<u8>(),
            }));
        }
        data
    }

    fn acts_of(x: &[f32], k: usize, format: BlockFormat) -> Vec<ActBlock> {
        x.chunks(k)
            .flat_map(|r| quantize_row(r, format.has_min()))
            .collect()
    }

    const FORMATS: [BlockFormat; 5] = [
        BlockFormat::Q4_0,
        BlockFormat::Q4_1,
        BlockFormat::Q8_0,
        BlockFormat::Q6K,
        BlockFormat::Q5K,
    ];

    /// The layouts `format` exists in.
    fn layouts(format: BlockFormat) -> Vec<Layout> {
        [Layout::Tiles, Layout::Rows]
            .into_iter()
            .filter(|&l| l == Layout::Tiles || format.has_rows_layout())
            .collect()
    }

    /// The vectorised rounding of activations against `round_ties_even`, ties and extremes
    /// included.
    #[test]
    fn activation_rounding_is_round_half_to_even() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        for case in 0..2000 {
            let mut x = [0f32; QK];
            for v in x.iter_mut() {
                *v = match case % 3 {
                    // Exact halves: ties in both directions.
                    0 => rng.random_range(-254i32..=254) as f32 / 2.0,
                    _ => rng.random_range(-5.0f32..5.0),
                };
            }
            let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
            assert_eq!(block_amax(&x).to_bits(), amax.to_bits(), "case {case}");
            let id = if case % 3 == 0 {
                1.0
            } else if amax != 0.0 {
                127.0 / amax
            } else {
                0.0
            };
            let (qs, sum, half_sum) = round_block(&x, id);
            if case % 100 == 0 {
                let mut with_nan = x;
                with_nan[case % QK] = f32::NAN;
                let ignoring_nan = with_nan.iter().fold(0f32, |a, &v| a.max(v.abs()));
                assert_eq!(block_amax(&with_nan).to_bits(), ignoring_nan.to_bits());
            }
            let want: Vec<i8> = x.iter().map(|v| (v * id).round_ties_even() as i8).collect();
            assert_eq!(qs.to_vec(), want, "case {case}");
            assert_eq!(sum, want.iter().map(|&q| q as i32).sum::<i32>());
            assert_eq!(half_sum, want[..16].iter().map(|&q| q as i32).sum::<i32>());
        }
    }

    /// Every layout's matmul (whatever kernels this processor runs, several row tiles, a
    /// partial last tile of columns) against its scalar definition computed from the file's
    /// bytes, bit for bit.
    #[test]
    fn matmul_equals_its_definition_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for format in FORMATS {
            for layout in layouts(format) {
                // 41 rows: split by rows, with a partial slab and a partial row tile.
                let (n, k, m) = (37, 160, 41);
                let bytes = random_gguf(format, n, k, true, &mut rng);
                let w = BlockMatrix::with_layout(format, n, k, &bytes, layout).unwrap();
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0)).collect();
                let y = w.matmul(&x, m);
                if layout == Layout::Tiles {
                    // The portable path over the same tiles, which this processor never takes.
                    let (nb, tb) = (k / QK, w.tile_bytes());
                    for c0 in (0..n).step_by(TILE_COLS) {
                        let tile = &w.data[c0 / TILE_COLS * tb..][..tb];
                        for r0 in (0..m).step_by(TILE_ROWS) {
                            let rows = TILE_ROWS.min(m - r0);
                            let acts = acts_of(&x[r0 * k..(r0 + rows) * k], k, format);
                            let mut out = [[f32::NAN; TILE_COLS]; TILE_ROWS];
                            tiles::scalar(format, tile, &acts, nb, rows, &mut out);
                            for (i, row) in out[..rows].iter().enumerate() {
                                for (j, v) in row.iter().enumerate().take(n - c0) {
                                    assert_eq!(
                                        v.to_bits(),
                                        y[(r0 + i) * n + c0 + j].to_bits(),
                                        "{format:?} portable ({}, {})",
                                        r0 + i,
                                        c0 + j
                                    );
                                }
                            }
                        }
                    }
                }
                let row_bytes = k / QK * format.block_bytes();
                for r in 0..m {
                    let acts = acts_of(&x[r * k..(r + 1) * k], k, format);
                    for c in 0..n {
                        let wr = &bytes[c * row_bytes..(c + 1) * row_bytes];
                        let want = match layout {
                            Layout::Tiles => dot_tiled_definition(format, wr, &acts),
                            Layout::Rows => ggml::definition(format, wr, &acts),
                        };
                        assert_eq!(
                            y[r * n + c].to_bits(),
                            want.to_bits(),
                            "{format:?} {layout:?} row {r} col {c}"
                        );
                    }
                }
            }
        }
    }

    /// The AVX-512 VNNI and AVX2 tiled kernels against each other, bit for bit, on every format
    /// and row count, with extreme quants.
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    #[test]
    fn vnni_and_avx2_tile_kernels_agree_bit_for_bit() {
        if !crate::cpu::kernels::has_vnni() {
            eprintln!("no AVX-512 VNNI on this processor: only the AVX2 path is checked (above)");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(77);
        for format in FORMATS {
            let (n, k) = (TILE_COLS, 256);
            let nb = k / QK;
            let bytes = random_gguf(format, n, k, true, &mut rng);
            let w = BlockMatrix::with_layout(format, n, k, &bytes, Layout::Tiles).unwrap();
            for rows in 1..=TILE_ROWS {
                let x: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-4.0..4.0)).collect();
                let acts = acts_of(&x, k, format);
                let mut plain = [[f32::NAN; TILE_COLS]; TILE_ROWS];
                tiles::avx2::dot_tile(format, &w.data, &acts, nb, rows, &mut plain);
                let mut wide = [[f32::NAN; TILE_COLS]; TILE_ROWS];
                // SAFETY: has_vnni() (AVX-512 VNNI, F, BW, VL) checked above; shapes as asserted
                // by `tiles::dot_tile`.
                unsafe { tiles::avx512::dot_tile(format, &w.data, &acts, nb, rows, &mut wide) };
                for r in 0..rows {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&plain[r]),
                        bits(&wide[r]),
                        "{format:?} rows {rows} row {r}"
                    );
                }
            }
        }
    }

    /// The two definitions compute the same exact block sums and differ only in how the float
    /// terms are grouped: relative to the sum of the terms' magnitudes, a few f32 roundings.
    #[test]
    fn tiled_and_ggml_definitions_differ_only_in_rounding() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for format in FORMATS.into_iter().filter(|f| f.has_rows_layout()) {
            let (n, k, m) = (40, 576, 6);
            let bytes = random_gguf(format, n, k, false, &mut rng);
            let tiled = BlockMatrix::with_layout(format, n, k, &bytes, Layout::Tiles).unwrap();
            let ggml = BlockMatrix::with_layout(format, n, k, &bytes, Layout::Rows).unwrap();
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
            let (a, b) = (tiled.matmul(&x, m), ggml.matmul(&x, m));
            let mut row = vec![0f32; k];
            let mut differ = 0;
            for c in 0..n {
                ggml.dequantize_row(c, &mut row);
                for r in 0..m {
                    let xr = &x[r * k..(r + 1) * k];
                    let scale: f32 = row.iter().zip(xr).map(|(w, v)| (w * v).abs()).sum();
                    let (ya, yb) = (a[r * n + c], b[r * n + c]);
                    differ += (ya != yb) as usize;
                    assert!(
                        (ya - yb).abs() <= scale * 1e-6,
                        "{format:?} ({r}, {c}): tiled {ya} ggml {yb} (scale {scale})"
                    );
                }
            }
            // Not the same function under another name.
            assert!(
                differ > 0,
                "{format:?}: the two definitions agree everywhere"
            );
        }
    }

    #[test]
    fn matmul_is_close_to_the_dequantized_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for format in FORMATS {
            for layout in layouts(format) {
                let (n, k, m) = (37, 96, 5);
                let bytes = random_gguf(format, n, k, false, &mut rng);
                let w = BlockMatrix::with_layout(format, n, k, &bytes, layout).unwrap();
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                let y = w.matmul(&x, m);
                let mut row = vec![0f32; k];
                for c in 0..n {
                    w.dequantize_row(c, &mut row);
                    for r in 0..m {
                        let xr = &x[r * k..(r + 1) * k];
                        let exact: f32 = row.iter().zip(xr).map(|(a, b)| a * b).sum();
                        let scale: f32 = row.iter().zip(xr).map(|(a, b)| (a * b).abs()).sum();
                        // 8-bit activations: relative error per product below 1/127.
                        assert!(
                            (y[r * n + c] - exact).abs() <= scale / 100.0 + 1e-6,
                            "{format:?} {layout:?} {} vs {exact}",
                            y[r * n + c]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for format in FORMATS {
            for layout in layouts(format) {
                let bytes = random_gguf(format, 300, 64, false, &mut rng);
                let w = BlockMatrix::with_layout(format, 300, 64, &bytes, layout).unwrap();
                // Beyond the row count where tasks split rows instead of columns.
                let m = 45;
                let x: Vec<f32> = (0..m * 64).map(|_| rng.random_range(-1.0..1.0)).collect();
                let batch = w.matmul(&x, m);
                for r in 0..m {
                    let alone = w.matmul(&x[r * 64..(r + 1) * 64], 1);
                    assert_eq!(
                        alone,
                        batch[r * 300..(r + 1) * 300].to_vec(),
                        "{format:?} {layout:?}"
                    );
                }
            }
        }
    }

    /// Tiling keeps the file's bytes: rows read back (also after stacking matrices whose row
    /// counts are not multiples of the tile) are the rows given, and a stacked matmul is the
    /// parts' matmuls side by side.
    #[test]
    fn tiles_keep_the_file_bytes_and_stacking_keeps_outputs() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for format in FORMATS {
            let k = 64;
            let row_bytes = k / QK * format.block_bytes();
            let parts_bytes: Vec<(usize, Vec<u8>)> = [21, 5, 16]
                .into_iter()
                .map(|n| (n, random_gguf(format, n, k, true, &mut rng)))
                .collect();
            let parts: Vec<BlockMatrix> = parts_bytes
                .iter()
                .map(|(n, b)| BlockMatrix::with_layout(format, *n, k, b, Layout::Tiles).unwrap())
                .collect();
            let stacked = BlockMatrix::concat_rows(&parts.iter().collect::<Vec<_>>()).unwrap();
            let all: Vec<u8> = parts_bytes
                .iter()
                .flat_map(|(_, b)| b.iter().copied())
                .collect();
            assert_eq!(stacked.rows(), 42);
            for r in 0..42 {
                assert_eq!(
                    stacked.gguf_row(r),
                    all[r * row_bytes..(r + 1) * row_bytes],
                    "{format:?} row {r}"
                );
            }
            let x: Vec<f32> = (0..3 * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let y = stacked.matmul(&x, 3);
            let ys: Vec<Vec<f32>> = parts.iter().map(|p| p.matmul(&x, 3)).collect();
            for r in 0..3 {
                let side_by_side: Vec<f32> = parts
                    .iter()
                    .zip(&ys)
                    .flat_map(|(p, yp)| yp[r * p.rows()..(r + 1) * p.rows()].to_vec())
                    .collect();
                assert_eq!(y[r * 42..(r + 1) * 42], side_by_side[..], "{format:?}");
            }
        }
    }
}
