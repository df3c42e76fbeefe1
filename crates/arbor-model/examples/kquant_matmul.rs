//! Micro-benchmark: Q6_K and Q5_K weights through the block kernels as Q6K / Q5K blocks (their
//! own values) against the same weights re-quantized to Q8_0 (what they became before),
//! alternating in one process so that machine drift hits both alike.
//!
//! `cargo run --release -p arbor-model --example kquant_matmul [ROUNDS]`
//!
//! Shapes: SmolLM2-135M's `ffn_down` (576 outputs, 1536 inputs) and Llama-3-8B's (4096 x
//! 14336). Rows: 1 (a decode step) and 64 (a prefill chunk). Prints the median time of each
//! and their ratio.

use std::time::Instant;

use arbor_model::cpu::qmatmul::{kquants, BlockFormat, BlockMatrix};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

fn values(n: usize, mut seed: u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args().nth(1).map_or(Ok(15), |a| a.parse())?;
    println!("| weight | shape (out x in) | rows | as Q8_0 ms | own blocks ms | own / Q8_0 time | bytes own / Q8_0 |");
    println!("|---|---|---|---|---|---|---|");
    type Convert = fn(&[u8]) -> Option<Vec<u8>>;
    let kinds: [(GgmlDType, BlockFormat, Convert, f64); 2] = [
        (
            GgmlDType::Q6K,
            BlockFormat::Q6K,
            kquants::q6k_to_blocks,
            28.0,
        ),
        (
            GgmlDType::Q5K,
            BlockFormat::Q5K,
            kquants::q5k_to_blocks,
            26.0,
        ),
    ];
    for (dtype, format, convert, block_bytes) in kinds {
        for (out, inp) in [(576usize, 1536usize), (4096, 14336)] {
            let w = Tensor::from_vec(values(out * inp, 7), (out, inp), &Device::Cpu)?;
            let q = QTensor::quantize(&w, dtype)?;
            let blocks = convert(&q.data()?).expect("whole blocks");
            let native =
                BlockMatrix::from_gguf_bytes(format, out, inp, &blocks).expect("a block matrix");
            let q8 = QTensor::quantize(&q.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?;
            let requant = BlockMatrix::from_gguf_bytes(BlockFormat::Q8_0, out, inp, &q8.data()?)
                .expect("a Q8_0 matrix");
            for rows in [1usize, 64] {
                let x = values(rows * inp, 11);
                // Enough products per sample for a few milliseconds.
                let reps = (2_000_000_000 / (out * inp * rows)).clamp(1, 400);
                let time = |m: &BlockMatrix| {
                    let t = Instant::now();
                    for _ in 0..reps {
                        std::hint::black_box(m.matmul(&x, rows));
                    }
                    t.elapsed().as_secs_f64() * 1e3 / reps as f64
                };
                let (mut a, mut b) = (Vec::new(), Vec::new());
                time(&requant);
                time(&native);
                for _ in 0..rounds {
                    a.push(time(&requant));
                    b.push(time(&native));
                }
                let (a, b) = (median(a), median(b));
                println!(
                    "| {dtype:?} | {out} x {inp} | {rows} | {a:.3} | {b:.3} | {:.3} | {:.3} |",
                    b / a,
                    block_bytes / 34.0
                );
            }
        }
    }
    Ok(())
}
