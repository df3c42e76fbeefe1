//! Which SIMD kernels the CPU backend runs. The binary is built for x86-64-v3 (AVX2, FMA,
//! F16C) so it runs on any x86 server of the last decade; faster instructions are picked at run
//! time when the processor has them, once, and can be switched off to compare or to test the
//! AVX2 paths on a machine that has more.
//!
//! Today:
//! - AVX-512 VNNI (`vpdpbusd`) for the integer dot products of the block-quantized matmuls
//!   ([`crate::cpu::qmatmul`]), two weight rows per 512-bit register;
//! - AVX-512 F for attention ([`crate::cpu::attention`]): 16 keys per register in the scores of
//!   a prefill chunk, 32 registers to block queries and keys, V rows widened in registers.
//!
//! Both are bit-identical to the AVX2 paths by construction (each output element sees the same
//! operations in the same order; see the kernels' docs), so the switch changes speed, never an
//! output: the tests compare the two paths bit for bit on machines that have both.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

pub use crate::options::CpuKernels;

static FORCE_AVX2: AtomicBool = AtomicBool::new(false);

/// Chooses the kernels for the whole process (they are a property of the machine, not of one
/// model).
pub fn select(kernels: CpuKernels) {
    FORCE_AVX2.store(kernels == CpuKernels::Avx2, Ordering::Relaxed);
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
    has_avx512() && !FORCE_AVX2.load(Ordering::Relaxed)
}

/// Whether the quantized matmuls use VNNI now.
#[inline]
pub fn vnni() -> bool {
    has_vnni() && !FORCE_AVX2.load(Ordering::Relaxed)
}

/// The kernels in use, for the start-up log.
pub fn describe() -> &'static str {
    match (vnni(), avx512()) {
        (true, true) => return "AVX-512 VNNI quantized dot products, AVX-512 attention",
        (true, false) => return "AVX-512 VNNI quantized dot products, AVX2 attention",
        (false, true) => return "AVX2 quantized dot products, AVX-512 attention",
        (false, false) => {}
    }
    if cfg!(all(target_arch = "x86_64", target_feature = "avx2")) {
        "AVX2 quantized dot products and attention"
    } else {
        "portable scalar kernels"
    }
}
