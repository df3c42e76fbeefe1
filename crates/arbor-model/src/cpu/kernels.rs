//! Which SIMD kernels the CPU backend runs. The binary is built for x86-64-v3 (AVX2, FMA,
//! F16C) so it runs on any x86 server of the last decade; faster instructions are picked at run
//! time when the processor has them, once, and can be switched off to compare or to test the
//! AVX2 paths on a machine that has more.
//!
//! Today:
//! - AVX-512 VNNI (`vpdpbusd`) for the integer dot products of the block-quantized matmuls
//!   ([`crate::cpu::qmatmul`]): 4 elements of 16 output columns per instruction;
//! - AVX-512 F for attention ([`crate::cpu::attention`]): 16 keys per register in the scores of
//!   a prefill chunk, 32 registers to block queries and keys, V rows widened in registers.
//!
//! Both are bit-identical to the AVX2 paths by construction (each output element sees the same
//! operations in the same order; see the kernels' docs), so the switch changes speed, never an
//! output: the tests compare the two paths bit for bit on machines that have both.
//!
//! A third choice, `ggml`, is a check rather than a speed: the block matmuls take llama.cpp's
//! own arithmetic (AVX2, rows in the file's layout), so that the whole forward pass can be
//! compared with llama.cpp's to the last bit (`tests/llama_cpp_exact.rs`).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

pub use crate::options::CpuKernels;

static SELECTED: AtomicU8 = AtomicU8::new(CpuKernels::Auto as u8);

/// Chooses the kernels for the whole process (they are a property of the machine, not of one
/// model); call it before loading a model, whose block matrices are laid out for the choice.
/// `ARBOR_CPU_KERNELS` in the environment (`avx2`, `ggml`) overrides what is chosen here.
pub fn select(kernels: CpuKernels) {
    SELECTED.store(kernels as u8, Ordering::Relaxed);
}

/// The environment variable that forces a kernel choice in any process (`avx2`, `ggml`;
/// `auto` or unset leaves the choice to [`select`]). The test suite runs the model's reference
/// tests once more under `avx2`, so CI exercises the AVX2 paths end to end on a machine that
/// has AVX-512; `--cpu-kernels` reads the same variable.
pub const ENV: &str = "ARBOR_CPU_KERNELS";

fn forced_by_env() -> Option<CpuKernels> {
    static FORCED: OnceLock<Option<CpuKernels>> = OnceLock::new();
    *FORCED.get_or_init(|| parse_env(std::env::var(ENV).ok().as_deref()))
}

fn parse_env(value: Option<&str>) -> Option<CpuKernels> {
    match value?.trim().to_ascii_lowercase().as_str() {
        "avx2" => Some(CpuKernels::Avx2),
        "ggml" => Some(CpuKernels::Ggml),
        _ => None,
    }
}

/// The choice in force: the environment's, else [`select`]'s.
pub fn selected() -> CpuKernels {
    forced_by_env().unwrap_or(match SELECTED.load(Ordering::Relaxed) {
        x if x == CpuKernels::Avx2 as u8 => CpuKernels::Avx2,
        x if x == CpuKernels::Ggml as u8 => CpuKernels::Ggml,
        _ => CpuKernels::Auto,
    })
}

fn avx2_only() -> bool {
    selected() != CpuKernels::Auto
}

/// Whether block matrices are laid out for llama.cpp's arithmetic (`ggml`) rather than in
/// tiles for Arbor's.
pub fn ggml_blocks() -> bool {
    selected() == CpuKernels::Ggml
}

/// Whether the processor has AVX-512 VNNI with AVX-512 F, BW and VL (detected once; every
/// processor with the first has the others).
pub fn has_vnni() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether the processor has AVX-512 F and VL (with the F16C and FMA of the baseline).
pub fn has_avx512() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("f16c")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether attention uses the AVX-512 kernels now.
#[inline]
pub fn avx512() -> bool {
    has_avx512() && !avx2_only()
}

/// Whether the quantized matmuls use VNNI now.
#[inline]
pub fn vnni() -> bool {
    has_vnni() && !avx2_only()
}

/// The kernels in use, for the start-up log.
pub fn describe() -> &'static str {
    let avx2 = cfg!(all(target_arch = "x86_64", target_feature = "avx2"));
    match (ggml_blocks(), vnni(), avx512(), avx2) {
        (true, ..) => "llama.cpp's block arithmetic (ggml, AVX2), AVX2 attention",
        (false, true, true, _) => "AVX-512 VNNI tiled quantized matmuls, AVX-512 attention",
        (false, true, false, _) => "AVX-512 VNNI tiled quantized matmuls, AVX2 attention",
        (false, false, true, _) => "AVX2 tiled quantized matmuls, AVX-512 attention",
        (false, false, false, true) => "AVX2 tiled quantized matmuls and attention",
        (false, false, false, false) => "portable scalar kernels",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_names_a_choice_or_leaves_it() {
        assert_eq!(parse_env(Some("avx2")), Some(CpuKernels::Avx2));
        assert_eq!(parse_env(Some(" AVX2\n")), Some(CpuKernels::Avx2));
        assert_eq!(parse_env(Some("ggml")), Some(CpuKernels::Ggml));
        assert_eq!(parse_env(Some("auto")), None);
        assert_eq!(parse_env(Some("")), None);
        assert_eq!(parse_env(None), None);
    }
}
