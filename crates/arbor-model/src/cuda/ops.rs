//! Fused operations and linear layers on the GPU: the linear layer types (cuBLAS, candle's
//! quantized kernels, Arbor's one-row GEMV), add + RMSNorm, SwiGLU + down projection, and the
//! helpers that hand candle's CUDA storage to Arbor's kernels.

use super::*;

/// A linear layer's weight, `[out, in]`.
#[derive(Debug)]
pub(crate) enum GpuLinear {
    Dense(Tensor),
    Quantized(candle_core::quantized::QMatMul),
}

/// Activation rows up to which [`CudaOptions::gemv_for_one_row`] runs dense linear layers
/// through Arbor's GEMV kernel (`arbor_gemv_m1`; `arbor_gemv_pdl_m1` in decode steps)
/// instead of cuBLAS (0.123 against 0.128 ms per 8B layer, and 4-5% a batch-1 decode step
/// with the programmatic dependent launch, docs/BENCHMARKS.md).
pub(crate) const GEMV_MAX_ROWS: usize = 1;

impl GpuLinear {
    /// `x [T, in] -> [T, out]`, bf16, through cuBLAS (or candle's quantized kernels).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, false)
    }

    /// [`GpuLinear::forward`], one-row dense layers through Arbor's GEMV kernel with `gemv`.
    pub(crate) fn forward_with(&self, x: &Tensor, gemv_enabled: bool) -> Result<Tensor> {
        use candle_core::Module;
        Ok(match self {
            Self::Dense(w) if gemv_enabled && gemv_fits(x, w) => gemv(x, w)?,
            Self::Dense(w) => x.matmul(&w.t()?)?,
            Self::Quantized(q) => q.forward(x)?,
        })
    }
}

/// Whether Arbor's GEMV kernels take the weight `w`: contiguous bf16 rows of whole 16-byte
/// pieces starting on a piece boundary.
pub(crate) fn weight_fits_gemv(w: &Tensor) -> bool {
    matches!(w.dims2(), Ok((_, k)) if k % 8 == 0)
        && w.dtype() == DType::BF16
        && w.is_contiguous()
        && w.layout().start_offset().is_multiple_of(8)
}

pub(crate) fn gemv_fits(x: &Tensor, w: &Tensor) -> bool {
    let (Ok((m, k)), Ok((_, wk))) = (x.dims2(), w.dims2()) else {
        return false;
    };
    // 16-byte loads: rows of whole 8-element pieces starting on a piece boundary.
    (1..=GEMV_MAX_ROWS).contains(&m)
        && k == wk
        && k % 8 == 0
        && x.dtype() == DType::BF16
        && w.dtype() == DType::BF16
        && w.is_contiguous()
        && w.layout().start_offset().is_multiple_of(8)
}

/// `x W^T` through `arbor_gemv_m{rows}` (see [`GEMV_MAX_ROWS`]).
pub(crate) fn gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dev = cuda_device(x.device())?;
    let (m, k) = x.dims2()?;
    let n = w.dims2()?.0;
    let x = if x.is_contiguous() && x.layout().start_offset().is_multiple_of(8) {
        x.clone()
    } else {
        x.copy()?
    };
    // Safety: the kernel writes all m x n outputs.
    let mut y = unsafe { dev.alloc::<bf16>(m * n) }?;
    {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (x_s, w_s) = (slice_of::<bf16>(&xs, xl)?, slice_of::<bf16>(&ws, wl)?);
        let func = dev.get_or_load_custom_func("arbor_gemv_m1", MODULE, PTX)?;
        let (ni, ki) = (n as i32, k as i32);
        let mut b = func.builder();
        b.arg(&x_s).arg(&w_s).arg(&mut y).arg(&ni).arg(&ki);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(4) as u32, 1, 1), // GEMV_WARPS rows per block
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // Safety: one warp per output row reads that row of w (k elements) and the m rows of
        // x; both are contiguous bf16 starting at 16-byte boundaries (checked by gemv_fits
        // and above), k % 8 == 0.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(wrap(y, dev, (m, n)))
}

/// `silu(gate) * up` of the fused gate/up output `gu [T, 2F]` (`arbor_silu_mul`), through the
/// down projection. (Fusing SwiGLU into a one-row down-projection GEMV cost 0.5 ms a step on
/// the H200: each of its 4,096 warps recomputed the 14,336 activations, bound by the
/// special-function units.)
pub(crate) fn swiglu_down(
    dev: &CudaDevice,
    gu: &Tensor,
    down: &GpuLinear,
    (t, ffn): (usize, usize),
    gemv: bool,
    prof: &mut Profiler,
) -> Result<Tensor> {
    // Safety: the kernel writes all T x F elements.
    let mut act = unsafe { dev.alloc::<bf16>(t * ffn) }?;
    {
        let (st, lay) = gu.storage_and_layout();
        silu_mul_into(dev, &slice_of::<bf16>(&st, lay)?, &mut act, (t, ffn))?;
    }
    prof.mark("silu_mul");
    let act = wrap(act, dev, (t, ffn));
    let down = down.forward_with(&act, gemv)?;
    prof.mark("matmul_down");
    Ok(down)
}

/// `x + y` and the RMSNorm of it with weight `w`, in one kernel: returns both, `[T, n]` bf16.
pub(crate) fn add_rms_norm(
    dev: &CudaDevice,
    x: &Tensor,
    y: &Tensor,
    w: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let (t, n) = x.dims2()?;
    // The kernel reads 16-byte pieces: each tensor must start on one.
    let aligned = |t: &Tensor| t.layout().start_offset().is_multiple_of(8);
    if !rms_norm_fits(n) || !aligned(x) || !aligned(y) || !aligned(w) {
        let sum = (x + y)?;
        let h = candle_nn::ops::rms_norm(&sum, w, eps)?;
        return Ok((sum, h));
    }
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    // Safety: the kernel writes every element of both outputs.
    let mut x_out = unsafe { dev.alloc::<bf16>(t * n) }?;
    let mut h_out = unsafe { dev.alloc::<bf16>(t * n) }?;
    {
        let (xs, xl) = x.storage_and_layout();
        let (ys, yl) = y.storage_and_layout();
        let (x_s, y_s) = (slice_of::<bf16>(&xs, xl)?, slice_of::<bf16>(&ys, yl)?);
        add_rms_norm_into(dev, &x_s, &y_s, w, &mut x_out, &mut h_out, (t, n), eps)?;
    }
    Ok((wrap(x_out, dev, (t, n)), wrap(h_out, dev, (t, n))))
}

/// The device slice behind a contiguous tensor, from its offset on.
pub(crate) fn slice_of<'a, T: candle_core::cuda_backend::CudaDType>(
    storage: &'a Storage,
    layout: &candle_core::Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let Storage::Cuda(cs) = storage else {
        return Err(ModelError::Cuda("expected a CUDA tensor".into()));
    };
    if !layout.is_contiguous() {
        return Err(ModelError::Cuda("expected a contiguous tensor".into()));
    }
    let s = cs.as_cuda_slice::<T>()?;
    Ok(s.slice(layout.start_offset()..))
}

pub(crate) fn wrap(slice: CudaSlice<bf16>, dev: &CudaDevice, shape: (usize, usize)) -> Tensor {
    let storage = CudaStorage::wrap_cuda_slice(slice, dev.clone());
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

// Keeps BackendStorage in scope for `device()` on storages in future kernels.
#[allow(dead_code)]
pub(crate) fn _storage_device(s: &CudaStorage) -> &CudaDevice {
    s.device()
}

/// Output types [`gemm_into`] writes: bf16 activations, f32 logits.
pub(crate) trait GemmOut: candle_core::cuda_backend::cudarc::driver::DeviceRepr {
    const TYPE: cublas_sys::cudaDataType;
}

impl GemmOut for bf16 {
    const TYPE: cublas_sys::cudaDataType = cublas_sys::cudaDataType::CUDA_R_16BF;
}

impl GemmOut for f32 {
    const TYPE: cublas_sys::cudaDataType = cublas_sys::cudaDataType::CUDA_R_32F;
}

use candle_core::cuda_backend::cudarc::cublas::sys as cublas_sys;

/// `y = x W^T` for the first `rows` rows of `x` (`[rows, in]`) into `y` (`[rows, out]`), with
/// a dense bf16 weight `W [out, in]`, through cuBLAS on the device's stream: no allocation,
/// so decode steps can be captured as CUDA graphs. f32 accumulation; `Y` is the output type.
pub(crate) fn gemm_into<Y: GemmOut>(
    dev: &CudaDevice,
    x: &CudaSlice<bf16>,
    rows: usize,
    w: &Tensor,
    y: &mut CudaSlice<Y>,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    let (out, inp) = w.dims2()?;
    if w.dtype() != DType::BF16 || x.len() < rows * inp || y.len() < rows * out {
        return Err(ModelError::Cuda(format!(
            "gemm of {rows} rows: buffers too small for a [{out}, {inp}] {:?} weight",
            w.dtype()
        )));
    }
    let (ws, wl) = w.storage_and_layout();
    let w_s = slice_of::<bf16>(&ws, wl)?;
    let stream = dev.cuda_stream();
    let blas = dev.cublas_handle();
    let (w_p, _w_sync) = w_s.device_ptr(&stream);
    let (x_p, _x_sync) = x.device_ptr(&stream);
    let (y_p, _y_sync) = y.device_ptr_mut(&stream);
    let (alpha, beta) = (1f32, 0f32);
    let as_int = |v: usize| v as std::ffi::c_int;
    // Column-major: y^T [out, rows] = W [out, in] (row-major, so transposed) x^T [in, rows].
    // Safety: cuBLAS reads out x in elements of W and rows x in of x and writes rows x out of
    // y (all checked above); the pointers stay alive for the call, which is ordered on the
    // stream like every other launch; alpha and beta are f32 as COMPUTE_32F requires.
    unsafe {
        candle_core::cuda_backend::cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            cublas_sys::cublasOperation_t::CUBLAS_OP_T,
            cublas_sys::cublasOperation_t::CUBLAS_OP_N,
            as_int(out),
            as_int(rows),
            as_int(inp),
            (&alpha) as *const f32 as *const std::ffi::c_void,
            w_p as *const std::ffi::c_void,
            cublas_sys::cudaDataType::CUDA_R_16BF,
            as_int(inp),
            x_p as *const std::ffi::c_void,
            cublas_sys::cudaDataType::CUDA_R_16BF,
            as_int(inp),
            (&beta) as *const f32 as *const std::ffi::c_void,
            y_p as *mut std::ffi::c_void,
            Y::TYPE,
            as_int(out),
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(cuda_err)
}

/// [`add_rms_norm`] into existing buffers: the first `rows` rows of `x + y` into `x_out` and
/// their RMSNorm with weight `w` into `h_out` (`[rows, n]` bf16, n % 8 == 0; see
/// [`rms_norm_fits`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_rms_norm_into(
    dev: &CudaDevice,
    x: &CudaView<bf16>,
    y: &CudaView<bf16>,
    w: &Tensor,
    x_out: &mut CudaSlice<bf16>,
    h_out: &mut CudaSlice<bf16>,
    (rows, n): (usize, usize),
    eps: f32,
) -> Result<()> {
    let need = rows * n;
    if !rms_norm_fits(n)
        || [x.len(), y.len(), x_out.len(), h_out.len()]
            .iter()
            .any(|&l| l < need)
    {
        return Err(ModelError::Cuda(format!(
            "add+RMSNorm of {rows} x {n}: bad buffers"
        )));
    }
    let (ws, wl) = w.storage_and_layout();
    let w_s = slice_of::<bf16>(&ws, wl)?;
    let func = dev.get_or_load_custom_func("arbor_add_rmsnorm", MODULE, PTX)?;
    let (ni, epsf) = (n as i32, eps);
    let mut b = func.builder();
    b.arg(x)
        .arg(y)
        .arg(&w_s)
        .arg(x_out)
        .arg(h_out)
        .arg(&ni)
        .arg(&epsf);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: ((n / 8).next_multiple_of(32).min(1024) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // Safety: one block per row reads and writes that row only, in 16-byte pieces (n % 8 == 0;
    // the buffers hold rows x n elements; the outputs start on allocation boundaries, the
    // inputs and w at multiples of 8 elements: callers' buffers, or tensors checked by
    // `add_rms_norm`); the block has at least pieces / 4 threads.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// Whether `arbor_add_rmsnorm` takes rows of `n` elements: whole 16-byte pieces, at most
/// RMS_PIECES (kernels.cu) per thread of a 1024-thread block.
pub(crate) fn rms_norm_fits(n: usize) -> bool {
    n.is_multiple_of(8) && n / 8 <= 4 * 1024
}

/// `silu(gate) * up` of the first `rows` rows of `gu [rows, 2F]` into `act [rows, F]`.
pub(crate) fn silu_mul_into(
    dev: &CudaDevice,
    gu: &CudaView<bf16>,
    act: &mut CudaSlice<bf16>,
    (rows, ffn): (usize, usize),
) -> Result<()> {
    if gu.len() < rows * 2 * ffn || act.len() < rows * ffn {
        return Err(ModelError::Cuda("SwiGLU: buffers too small".into()));
    }
    let func = dev.get_or_load_custom_func("arbor_silu_mul", MODULE, PTX)?;
    let (ti, fi) = (rows as i32, ffn as i32);
    let mut b = func.builder();
    b.arg(gu).arg(act).arg(&ti).arg(&fi);
    // Safety: one thread per output element; sizes checked above.
    unsafe { b.launch(LaunchConfig::for_num_elems((rows * ffn) as u32)) }.w()?;
    Ok(())
}

/// `y = x W^T` for one row through `arbor_gemv_pdl_m1`, launched as a programmatic dependent
/// of the kernel before it (Hopper's programmatic dependent launch): its blocks start while
/// that kernel finishes and stream their first weights before waiting for its output, which
/// hides the gap between kernels a one-row decode step is made of. `x [1, in]`, `W [out, in]`
/// dense bf16 (see [`gemv_fits`]), `y [1, out]`.
pub(crate) fn gemv_pdl_into(
    dev: &CudaDevice,
    x: &CudaSlice<bf16>,
    w: &Tensor,
    y: &mut CudaSlice<bf16>,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{sys, DevicePtr, DevicePtrMut};
    let (n, k) = w.dims2()?;
    if !weight_fits_gemv(w) || x.len() < k || y.len() < n {
        return Err(ModelError::Cuda(format!(
            "GEMV: bad operands for a [{n}, {k}] weight"
        )));
    }
    let func = dev.get_or_load_custom_func("arbor_gemv_pdl_m1", MODULE, PTX)?;
    let stream = dev.cuda_stream();
    let (ws, wl) = w.storage_and_layout();
    let w_s = slice_of::<bf16>(&ws, wl)?;
    let (w_p, _w_sync) = w_s.device_ptr(&stream);
    let (x_p, _x_sync) = x.device_ptr(&stream);
    let (y_p, _y_sync) = y.device_ptr_mut(&stream);
    let (n_i, k_i) = (n as i32, k as i32);
    let mut params = [
        (&x_p) as *const u64 as *mut std::ffi::c_void,
        (&w_p) as *const u64 as *mut std::ffi::c_void,
        (&y_p) as *const u64 as *mut std::ffi::c_void,
        (&n_i) as *const i32 as *mut std::ffi::c_void,
        (&k_i) as *const i32 as *mut std::ffi::c_void,
    ];
    // Safety: a plain-data C struct and union; every field the driver reads is set below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: n.div_ceil(4) as u32, // GEMV_WARPS rows per block
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: 128,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: 0,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    // Safety: the parameters match the kernel's signature (three device pointers, two ints)
    // and outlive the call, which copies them; one warp per output row reads that row of W
    // (k elements) and x (k elements) and writes one element of y, all checked above.
    let status = unsafe {
        sys::cuLaunchKernelEx(
            &config,
            func.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    if status != sys::CUresult::CUDA_SUCCESS {
        return Err(ModelError::Cuda(format!("launching the GEMV: {status:?}")));
    }
    Ok(())
}
