//! The CPU backend: the Llama-family forward pass ([`llama`]) over a host KV pool
//! ([`kv_pool`]), with Arbor's batch-invariant kernels: block-quantized matmuls ([`qmatmul`],
//! picked per weight format by [`linear`]), dense f32 ones ([`dense`]), attention over slot
//! lists ([`attention`]) and the exp/silu approximations they share ([`fastmath`]).

pub mod attention;
mod columns;
pub mod dense;
pub mod fastmath;
pub mod kernels;
pub mod kv_pool;
pub mod linear;
pub mod llama;
pub mod load;
pub mod qmatmul;

/// `MemAvailable` from /proc/meminfo (Linux); `None` elsewhere.
pub fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
