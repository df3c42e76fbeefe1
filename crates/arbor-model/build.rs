//! With the `cuda` feature, compiles src/cuda/kernels.cu and sampler.cu to PTX with nvcc (found on PATH or
//! under CUDA_ROOT; scripts/cuda/env.sh sets both up). The CPU build compiles nothing.

fn main() {
    println!("cargo:rerun-if-changed=src/cuda/kernels.cu");
    println!("cargo:rerun-if-changed=src/cuda/sampler.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("CUDA_ROOT")
        .map(|r| std::path::Path::new(&r).join("bin/nvcc"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| "nvcc".into());
    // The sampler keeps IEEE expf/logf and division: its greedy path must match the CPU's
    // adjusted logits to the bit, and its probabilities the CPU's closely.
    for (src, ptx, fast_math) in [
        ("src/cuda/kernels.cu", "arbor_kernels.ptx", true),
        ("src/cuda/sampler.cu", "arbor_sampler.ptx", false),
    ] {
        let mut cmd = std::process::Command::new(&nvcc);
        cmd.args(["--ptx", "-O3", &format!("-arch=sm_{cap}")]);
        if fast_math {
            cmd.arg("--use_fast_math");
        }
        let status = cmd
            .arg(src)
            .arg("-o")
            .arg(out_dir.join(ptx))
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "running {}: {e} (source scripts/cuda/env.sh)",
                    nvcc.display()
                )
            });
        assert!(status.success(), "nvcc failed on {src}");
    }
}
