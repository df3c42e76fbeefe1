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

/// Default of [`CudaOptions::decode_target_warps`]: decode attention cuts each context into
/// splits until about this many warps run (see the CUDA backend's launch planning).
pub const DEFAULT_DECODE_TARGET_WARPS: usize = 4096;

/// The CUDA backend's knobs, for A/B benchmarks; the defaults are what the measurements in
/// docs/BENCHMARKS.md chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaOptions {
    /// Attention on the CUDA-core kernels even where the tensor-core kernel fits the shape.
    pub force_cuda_core_attention: bool,
    /// One-row linear layers through Arbor's GEMV kernel instead of cuBLAS.
    pub gemv_for_one_row: bool,
    /// Decode attention splits each context until about this many warps run.
    pub decode_target_warps: usize,
    /// Time each phase of the forward pass (`arbor_model::diagnostics::take_gpu_profile`); it
    /// synchronizes after each phase, so it gives shares of a step, not its speed.
    pub profile: bool,
    /// Copy the logits to the host and sample there (the path before GPU sampling), instead
    /// of sampling on the GPU; for A/B benchmarks.
    pub host_sampling: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            force_cuda_core_attention: false,
            gemv_for_one_row: false,
            decode_target_warps: DEFAULT_DECODE_TARGET_WARPS,
            profile: false,
            host_sampling: false,
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
