//! Backend options that both the runner layer (`open`) and the backends read, kept below both
//! so that neither imports the other.

/// How GGUF weights run on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GgufWeights {
    /// Dequantized to bf16 at load; linear layers through cuBLAS.
    #[default]
    Bf16,
    /// Kept in their GGUF block format; linear layers through candle's quantized kernels
    /// (MMVQ for up to 8 rows, MMQ beyond), activations in bf16. Fewer bytes read per step;
    /// tensors in float formats stay dense.
    Quantized,
}

/// How the GPU's KV pool stores K and V (vLLM's `--kv-cache-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// bf16, as the model computes them.
    #[default]
    Bf16,
    /// FP8 E4M3, one byte an element, without scales (as vLLM's `fp8` when a checkpoint has
    /// none): half the memory, so twice the cached tokens, and half the bytes a decode step
    /// reads per token of context. Values are rounded to 3 mantissa bits and saturate at
    /// +-448; outputs differ from bf16's (docs/CORRECTNESS.md has the measured difference).
    Fp8E4m3,
}

impl KvCacheDtype {
    /// Bytes of one K or V element.
    pub fn element_bytes(self) -> usize {
        match self {
            KvCacheDtype::Bf16 => 2,
            KvCacheDtype::Fp8E4m3 => 1,
        }
    }
}

/// Default of [`CudaOptions::decode_stage_keys`].
pub const DEFAULT_DECODE_STAGE_KEYS: usize = 32;

/// The CUDA backend's knobs, for A/B benchmarks; the defaults are what the measurements in
/// docs/BENCHMARKS.md chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaOptions {
    /// Attention on the CUDA-core kernels even where the tensor-core kernel fits the shape.
    pub force_cuda_core_attention: bool,
    /// One-row linear layers through Arbor's GEMV kernel instead of cuBLAS (in decode steps
    /// launched as programmatic dependents: 4-5% faster at batch 1 on the H200).
    pub gemv_for_one_row: bool,
    /// Decode attention splits each context until about this many warps run; `None`: the
    /// measured rule (`cuda::attention::DecodeTuning::target_warps`).
    pub decode_target_warps: Option<usize>,
    /// Keys per shared-memory stage of the tensor-core decode kernel: 16, 32 or 64 (shorter
    /// stages fit more blocks on an SM).
    pub decode_stage_keys: usize,
    /// Time each phase of the forward pass (`arbor_model::diagnostics::take_gpu_profile`); it
    /// synchronizes after each phase, so it gives shares of a step, not its speed.
    pub profile: bool,
    /// Copy the logits to the host and sample there (the path before GPU sampling), instead
    /// of sampling on the GPU; for A/B benchmarks.
    pub host_sampling: bool,
    /// Replay decode steps as CUDA graphs (`cuda::DecodeGraphs`); off runs the same padded
    /// steps launch by launch, for A/B benchmarks.
    pub decode_graphs: bool,
    /// Tensor parallelism with every rank on the one GPU the device names, summing through
    /// the host: a check of the cut where there is no second GPU (NCCL refuses two ranks on
    /// one device). Slow; not for serving.
    pub tp_one_gpu: bool,
    /// Run through the tensor-parallel runner even at one rank (one NCCL rank on the device's
    /// GPU): the check that its path, with the collectives recorded in its decode graphs,
    /// gives what the one-GPU runner gives, and the A/B of what it costs. Not for serving.
    pub tp_runner: bool,
    /// How the KV pool stores K and V.
    pub kv_cache_dtype: KvCacheDtype,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            force_cuda_core_attention: false,
            gemv_for_one_row: true,
            decode_target_warps: None,
            decode_stage_keys: DEFAULT_DECODE_STAGE_KEYS,
            profile: false,
            host_sampling: false,
            decode_graphs: true,
            tp_one_gpu: false,
            tp_runner: false,
            kv_cache_dtype: KvCacheDtype::Bf16,
        }
    }
}

/// Which SIMD kernels the CPU backend uses (see `cpu::kernels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuKernels {
    /// The fastest the processor supports.
    #[default]
    Auto,
    /// The AVX2 paths only (the x86-64-v3 baseline), whatever the processor has.
    Avx2,
    /// llama.cpp's own block-matmul arithmetic (AVX2), to compare with llama.cpp bit for bit.
    Ggml,
}
