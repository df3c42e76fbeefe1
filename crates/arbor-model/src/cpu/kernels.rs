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
/// model). `ARBOR_CPU_KERNELS=avx2` in the environment forces the AVX2 kernels whatever is
/// chosen here.
pub fn select(kernels: CpuKernels) {
    FORCE_AVX2.store(kernels == CpuKernels::Avx2, Ordering::Relaxed);
}

/// The environment variable that forces the AVX2 kernels in any process (`avx2`; `auto` or
/// unset leaves the choice to [`select`]). The test suite runs the model's reference tests
/// once more under it, so CI exercises the AVX2 paths end to end on a machine that has
/// AVX-512; `--cpu-kernels` reads the same variable.
pub const ENV: &str = "ARBOR_CPU_KERNELS";

fn forced_by_env() -> bool {
    static FORCED: OnceLock<bool> = OnceLock::new();
    *FORCED.get_or_init(|| env_forces_avx2(std::env::var(ENV).ok().as_deref()))
}

fn env_forces_avx2(value: Option<&str>) -> bool {
    value.is_some_and(|v| v.trim().eq_ignore_ascii_case("avx2"))
}

fn avx2_only() -> bool {
    FORCE_AVX2.load(Ordering::Relaxed) || forced_by_env()
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
    match (vnni(), avx512(), avx2) {
        (true, true, _) => "AVX-512 VNNI quantized dot products, AVX-512 attention",
        (true, false, _) => "AVX-512 VNNI quantized dot products, AVX2 attention",
        (false, true, _) => "AVX2 quantized dot products, AVX-512 attention",
        (false, false, true) => "AVX2 quantized dot products and attention",
        (false, false, false) => "portable scalar kernels",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_avx2_in_the_environment_forces_the_avx2_kernels() {
        assert!(env_forces_avx2(Some("avx2")));
        assert!(env_forces_avx2(Some(" AVX2\n")));
        assert!(!env_forces_avx2(Some("auto")));
        assert!(!env_forces_avx2(Some("")));
        assert!(!env_forces_avx2(None));
    }
}
