//! With the `cuda` feature, compiles src/cuda/kernels.cu to PTX with nvcc (found on PATH or
//! under CUDA_ROOT; scripts/cuda/env.sh sets both up). The CPU build compiles nothing.

fn main() {
    println!("cargo:rerun-if-changed=src/cuda/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"))
        .join("arbor_kernels.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("CUDA_ROOT")
        .map(|r| std::path::Path::new(&r).join("bin/nvcc"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| "nvcc".into());
    let status = std::process::Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            "--use_fast_math",
            &format!("-arch=sm_{cap}"),
            "src/cuda/kernels.cu",
            "-o",
        ])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "running {}: {e} (source scripts/cuda/env.sh)",
                nvcc.display()
            )
        });
    assert!(status.success(), "nvcc failed on src/cuda/kernels.cu");
}
