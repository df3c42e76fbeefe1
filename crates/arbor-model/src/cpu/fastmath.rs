//! Vectorisable elementwise math for the CPU forward pass.
//!
//! `exp` is on the hot path twice: softmax (one per query-key pair: billions for a 4k-token
//! prefill) and SiLU. libm's `expf` is a scalar call; [`exp`] below is plain f32 arithmetic that
//! LLVM turns into SIMD when mapped over a slice, and that gives bit-identical results in the
//! vector and scalar forms (explicit fused multiply-adds, no reassociation), which keeps the
//! forward pass batch-invariant.

/// e^x, within 2 ulp of the exact value for x in [-87, 88]; clamped outside (the softmax only
/// sees x <= 0, where anything below e^-87 is zero for all purposes).
///
/// Cody-Waite reduction `x = k ln2 + r`, |r| <= ln2/2, then the Taylor series of e^r to degree
/// 7 (truncation error below 6e-9 relative) by Horner's rule, then scaling by 2^k through the
/// exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let k = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = k.mul_add(-LN2_LO, k.mul_add(-LN2_HI, x));
    let mut p = EXP_TAYLOR[0];
    for c in &EXP_TAYLOR[1..] {
        p = p.mul_add(r, *c);
    }
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    p * scale
}

/// Where [`exp`] clamps its argument.
pub const EXP_MIN: f32 = -87.0;
pub const EXP_MAX: f32 = 88.0;
/// ln 2 split so that k * LN2_HI is exact for |k| < 2^10: 0.693145751953125 (12 significant
/// bits) and the f32 nearest to the remainder, 1.4286068e-6.
pub const LN2_HI: f32 = f32::from_bits(0x3f31_7200);
pub const LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
/// The Taylor coefficients of e^r from degree 7 down, in Horner's order. The SIMD kernels'
/// copies of [`exp`] (`cpu/attention`) take the same constants, so they give the same bits.
pub const EXP_TAYLOR: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// x * sigmoid(x).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut x = -87.0f32;
        let mut worst = 0f64;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        // 2 ulp of f32 = 2 * 2^-23 relative.
        assert!(
            worst < 2.0 * f32::EPSILON as f64,
            "worst relative error {worst}"
        );
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1000.0), exp(-87.0));
    }

    #[test]
    fn silu_matches_its_definition() {
        for x in [-20.0f32, -3.5, -0.1, 0.0, 0.7, 4.0, 30.0] {
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            assert!(
                (silu(x) as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{x}"
            );
        }
    }
}
