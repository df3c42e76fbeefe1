//! The forward pass against llama.cpp to the last bit, with the block matmuls on llama.cpp's
//! own arithmetic (`ARBOR_CPU_KERNELS=ggml`). Alone in its test binary because the kernel
//! choice is per process and is read before the model loads.

mod common;

use common::ids;

/// Where llama.cpp's arithmetic and Arbor's coincide operation for operation (short inputs,
/// see docs/CORRECTNESS.md), the logits must agree to the last bits: this pins the embedding,
/// RMSNorm, RoPE angles, f16 attention and (in the ggml definition) the block matmul to
/// llama.cpp's.
#[test]
fn short_sequences_match_llama_cpp_bit_for_bit() {
    // Set before anything reads it (the only test of this binary).
    std::env::set_var(arbor_model::cpu::kernels::ENV, "ggml");
    assert!(arbor_model::cpu::kernels::ggml_blocks());
    let m = common::default_model();
    let fx = common::read_fixture("llamacpp_smollm2.json");
    let cases = common::cases(&fx, "short", 7);
    for case in cases {
        let tokens = ids(&case["ids"]);
        let ours = common::logits_all(m, &tokens).pop().unwrap();
        for e in case["top20"].as_array().unwrap() {
            let id = e[0].as_u64().unwrap() as usize;
            let want = e[1].as_f64().unwrap() as f32;
            // JSON carries the f32 as a decimal: allow one ulp of the round trip.
            assert!(
                (ours[id] - want).abs() <= want.abs() * 2e-7,
                "{tokens:?} token {id}: arbor {} llama.cpp {want}",
                ours[id]
            );
        }
    }
}
