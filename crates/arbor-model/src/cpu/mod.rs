//! The CPU backend: the Llama-family forward pass ([`llama`]) over a host KV pool
//! ([`kv_pool`]), with Arbor's batch-invariant kernels: block-quantized matmuls ([`qmatmul`],
//! picked per weight format by [`linear`]), dense f32 ones ([`dense`]), attention over slot
//! lists ([`attention`]) and the exp/silu approximations they share ([`fastmath`]).

pub mod attention;
mod columns;
pub mod dense;
pub mod fastmath;
pub mod kv_pool;
pub mod linear;
pub mod llama;
pub mod load;
pub mod qmatmul;
