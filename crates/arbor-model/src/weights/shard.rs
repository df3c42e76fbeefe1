//! A tensor cut for tensor-parallel ranks: which part of each weight a [`Shard`] holds (by
//! the weight's role, see [`crate::parallel`]), and the cutting of stored tensors, GGUF blocks
//! included.
//!
//! Each weight is read from its source once and cut for every rank, so a model file is read
//! once whatever the number of ranks. Block-quantized weights are cut between blocks: a rank's
//! columns of a row-parallel weight must start and end on a block boundary (32 values for
//! Q4_0/Q4_1/Q8_0, 256 for the K-quants), or loading says which tensor does not allow the
//! size.

use std::borrow::Cow;
use std::ops::Range;

use candle_core::quantized::{QStorage, QTensor};

use super::{LayerWeight as L, Stored, Weight, WeightSource};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::parallel::Shard;

/// Which part of a weight a rank holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// All of it (norms, and everything at TP=1).
    Whole,
    /// Rows `r` (output features of a column-parallel projection, vocabulary rows).
    Rows(Range<usize>),
    /// Columns `c` (input features of a row-parallel projection).
    Columns(Range<usize>),
}

/// `w`'s part on `shard`.
pub fn part(w: Weight, c: &ModelConfig, shard: &Shard) -> Part {
    if shard.is_whole() {
        return Part::Whole;
    }
    match w {
        Weight::TokenEmbedding | Weight::LmHead => Part::Rows(shard.vocab.clone()),
        Weight::FinalNorm => Part::Whole,
        Weight::Layer(_, role) => match role {
            L::AttnNorm | L::FfnNorm => Part::Whole,
            L::Q | L::QBias => Part::Rows(shard.q_rows(c)),
            L::K | L::V | L::KBias | L::VBias => Part::Rows(shard.kv_rows(c)),
            L::O => Part::Columns(shard.q_rows(c)),
            L::Gate | L::Up => Part::Rows(shard.ffn.clone()),
            L::Down => Part::Columns(shard.ffn.clone()),
        },
    }
}

/// `w` read once from `src` and cut for each of `shards`, in their order.
pub fn get_parts(src: &mut dyn WeightSource, w: Weight, shards: &[Shard]) -> Result<Vec<Stored>> {
    let stored = src.get(w)?;
    let config = src.config();
    if let [only] = shards {
        if part(w, config, only) == Part::Whole {
            return Ok(vec![stored]);
        }
    }
    shards
        .iter()
        .map(|s| cut(&stored, &part(w, config, s), &w.gguf_name()))
        .collect()
}

/// The `part` of `t` (a copy). `name` names the tensor in errors.
pub fn cut(t: &Stored, part: &Part, name: &str) -> Result<Stored> {
    match t {
        Stored::Dense(t) => {
            let t = match part {
                Part::Whole => t.copy()?,
                Part::Rows(r) => t.narrow(0, r.start, r.len())?.contiguous()?,
                Part::Columns(c) => t.narrow(1, c.start, c.len())?.contiguous()?,
            };
            Ok(Stored::Dense(t))
        }
        Stored::Quantized(q) => cut_blocks(q, part, name).map(Stored::Quantized),
    }
}

/// A GGUF tensor's part, cut between blocks. Blocks run along a row (the last dimension).
fn cut_blocks(q: &QTensor, part: &Part, name: &str) -> Result<QTensor> {
    let dtype = q.dtype();
    let dims = q.shape().dims().to_vec();
    let data = q.data()?;
    let cols = *dims.last().expect("a tensor has a dimension");
    let (block, block_bytes) = (dtype.block_size(), dtype.type_size());
    let row_bytes = cols / block * block_bytes;
    let (bytes, new_dims): (Vec<u8>, Vec<usize>) = match part {
        Part::Whole => (data.to_vec(), dims.clone()),
        Part::Rows(r) => {
            if dims.len() != 2 {
                return Err(ModelError::BadShape {
                    name: name.into(),
                    actual: dims,
                    expected: vec![r.len(), cols],
                });
            }
            (
                data[r.start * row_bytes..r.end * row_bytes].to_vec(),
                vec![r.len(), cols],
            )
        }
        Part::Columns(c) => {
            if dims.len() != 2 {
                return Err(ModelError::BadShape {
                    name: name.into(),
                    actual: dims,
                    expected: vec![0, c.len()],
                });
            }
            if !c.start.is_multiple_of(block) || !c.end.is_multiple_of(block) {
                return Err(ModelError::InvalidOption(format!(
                    "tensor_parallel_size {}: {name} ({dtype:?}, blocks of {block} values) cannot be \
                     cut at columns {}..{}; this model's quantization does not allow that size",
                    cols / c.len(),
                    c.start,
                    c.end
                )));
            }
            let (from, to) = (c.start / block * block_bytes, c.end / block * block_bytes);
            let bytes = data
                .chunks_exact(row_bytes)
                .flat_map(|row| &row[from..to])
                .copied()
                .collect();
            (bytes, vec![dims[0], c.len()])
        }
    };
    let storage = QStorage::from_data(Cow::Owned(bytes), &q.device(), dtype)?;
    Ok(QTensor::new(storage, new_dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use candle_core::{Device, Tensor};

    fn values(rows: usize, cols: usize) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    fn dense(t: Stored) -> Vec<Vec<f32>> {
        t.to_dense(candle_core::DType::F32, &Device::Cpu)
            .unwrap()
            .to_vec2()
            .unwrap()
    }

    #[test]
    fn block_cuts_dequantize_to_the_same_cut_of_the_whole() {
        let t = values(6, 128);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let whole = dense(Stored::Quantized(QTensor::quantize(&t, dtype).unwrap()));
            let stored = Stored::Quantized(q);
            let rows = dense(cut(&stored, &Part::Rows(2..5), "w").unwrap());
            assert_eq!(rows, whole[2..5].to_vec(), "{dtype:?} rows");
            let cols = dense(cut(&stored, &Part::Columns(32..96), "w").unwrap());
            let expected: Vec<Vec<f32>> = whole.iter().map(|r| r[32..96].to_vec()).collect();
            assert_eq!(cols, expected, "{dtype:?} columns");
            // Dense tensors cut the same way.
            let d = Stored::Dense(t.clone());
            let d_cols = dense(cut(&d, &Part::Columns(32..96), "w").unwrap());
            let t_rows: Vec<Vec<f32>> = t.to_vec2().unwrap();
            let expected: Vec<Vec<f32>> = t_rows.iter().map(|r| r[32..96].to_vec()).collect();
            assert_eq!(d_cols, expected);
        }
    }

    #[test]
    fn a_cut_inside_a_block_names_the_tensor_and_the_size() {
        let q = QTensor::quantize(&values(4, 256), GgmlDType::Q4K).unwrap();
        let e = cut(
            &Stored::Quantized(q),
            &Part::Columns(0..128),
            "blk.0.attn_output.weight",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("tensor_parallel_size 2"), "{e}");
        assert!(e.contains("blk.0.attn_output.weight"), "{e}");
        assert!(e.contains("blocks of 256"), "{e}");
    }
}
