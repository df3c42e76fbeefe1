# Build environment for the CUDA backend on a machine with no GPU and no CUDA install
# (shared/cuda/README.md has the facts). Source it: `source scripts/cuda/env.sh`.
#
# - The CUDA 13.0 toolchain comes from pip into .cuda-toolchain (nvvm pinned: a newer one
#   emits PTX the 13.0 ptxas rejects).
# - libcuda.so (the driver) is not on pip: a link-time stub stands in; the GPU machine's real
#   driver is used at run time.
# - RUSTFLAGS replaces .cargo/config.toml's flags, so the CPU target level is repeated here;
#   keep this file the only place that sets them (changing them rebuilds candle's kernels).
_ARBOR_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TC="${ARBOR_CUDA_TOOLCHAIN:-$_ARBOR_ROOT/.cuda-toolchain}"
CUDA_HOME_DIR="$TC/nvidia/cu13"
if [ ! -x "$CUDA_HOME_DIR/bin/nvcc" ]; then
    echo "installing the CUDA 13.0 toolchain into $TC (pip) ..." >&2
    python3 -m pip install --quiet --disable-pip-version-check --target "$TC" \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 \
        nvidia-cublas==13.0.2.14 nvidia-curand nvidia-cuda-nvrtc==13.0.88 \
        'nvidia-cuda-cccl==13.0.*' nvidia-cuda-crt==13.0.88 >&2
fi
# The pip libraries carry versioned names only; the linker wants the plain ones.
for l in cublas cublasLt cudart nvrtc; do
    ln -sf "lib$l.so.13" "$CUDA_HOME_DIR/lib/lib$l.so"
done
ln -sf libcurand.so.10 "$CUDA_HOME_DIR/lib/libcurand.so"
# The libcuda stub: every cu* entry point cuda.h declares, plain and versioned (_v2, _v3 ...).
STUB="$TC/libcuda-stub"
if [ ! -f "$STUB/libcuda.so" ]; then
    mkdir -p "$STUB"
    {
        grep -oE '\bcu[A-Z][A-Za-z0-9_]*\b' "$CUDA_HOME_DIR/include/cuda.h" | sort -u |
            sed 's/.*/int &(void) { return 0; }/'
    } > "$STUB/stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so" "$STUB/stub.c"
    ln -sf libcuda.so "$STUB/libcuda.so.1"
fi
export PATH="$CUDA_HOME_DIR/bin:$PATH"
export CUDA_ROOT="$CUDA_HOME_DIR" CUDA_PATH="$CUDA_HOME_DIR" CUDA_HOME="$CUDA_HOME_DIR"
export CUDA_COMPUTE_CAP=90
export LIBRARY_PATH="$CUDA_HOME_DIR/lib:$STUB${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="-C target-cpu=x86-64-v3 -L $CUDA_HOME_DIR/lib -L $STUB"
# A separate target folder: the CPU build keeps its own artefacts.
export CARGO_TARGET_DIR="$_ARBOR_ROOT/target/cuda"
