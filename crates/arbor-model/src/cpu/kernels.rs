//! Which SIMD kernels the CPU backend runs. The binary is built for x86-64-v3 (AVX2, FMA,
//! F16C) so it runs on any x86 server of the last decade; faster instructions are picked at run
//! time when the processor has them, once, and can be switched off to compare or to test the
//! AVX2 paths on a machine that has more.
//!
//! Today: AVX-512 VNNI (`vpdpbusd`, with AVX-512 VL for 256-bit registers) for the integer dot
//! products of the block-quantized matmuls ([`crate::cpu::qmatmul`]), bit-identical to the AVX2
//! path by construction (see `dot_tile` there).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

pub use crate::options::CpuKernels;

static FORCE_AVX2: AtomicBool = AtomicBool::new(false);

/// Chooses the kernels for the whole process (they are a property of the machine, not of one
/// model).
pub fn select(kernels: CpuKernels) {
    FORCE_AVX2.store(kernels == CpuKernels::Avx2, Ordering::Relaxed);
}

/// Whether the processor has AVX-512 VNNI with AVX-512 VL (detected once).
pub fn has_vnni() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512vl")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether the quantized matmuls use VNNI now.
#[inline]
pub fn vnni() -> bool {
    has_vnni() && !FORCE_AVX2.load(Ordering::Relaxed)
}

/// The kernels in use, for the start-up log.
pub fn describe() -> &'static str {
    if vnni() {
        "AVX-512 VNNI quantized dot products"
    } else if cfg!(all(target_arch = "x86_64", target_feature = "avx2")) {
        "AVX2 quantized dot products"
    } else {
        "portable scalar kernels"
    }
}
