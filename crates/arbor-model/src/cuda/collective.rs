//! The sums a tensor-parallel forward pass makes across GPUs ([`DeviceAllReduce`]): NCCL
//! between GPUs ([`NcclGroup`]), or through the host when every rank shares one GPU
//! ([`StagedAllReduce`], the one-GPU check of the sharding).
//!
//! NCCL is opened at run time (`libnccl.so.2`, through `libloading`) rather than linked:
//! a binary that never runs tensor parallelism does not need the library, a machine without
//! it gets a clear message when `-tp` asks for it, and the build keeps candle's link settings
//! (candle's own `nccl` feature links it into every binary, and cudarc refuses its
//! dynamic-loading mode next to candle's dynamic linking). The API used is seven functions.
//!
//! A rank that fails never leaves another waiting forever: the host-staged sum waits on an
//! abortable barrier; under NCCL a rank waits for its GPU by polling ([`DeviceAllReduce::wait`])
//! and, when the group breaks, aborts its communicator, which ends the collective it was
//! stuck in.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr};

use super::*;
use crate::parallel::{AllReduce, HostAllReduce, RankGroup};

/// The sum over ranks after the embedding, O and down projections of a GPU rank.
pub trait DeviceAllReduce: RankGroup {
    /// `x` (bf16 `[rows, hidden]`, this rank's partial sums) summed over the group: a new
    /// tensor on `x`'s device. Every rank calls it with the same shape, in the same order.
    fn sum(&self, rank: usize, x: &Tensor) -> Result<Tensor>;
    /// Waits until `dev`'s stream has finished the work queued so far, or fails when the
    /// group breaks first.
    fn wait(&self, rank: usize, dev: &CudaDevice) -> Result<()>;
    /// Every rank's `x` (f32 `[rows, its columns]`, the rank's vocabulary slice of the
    /// logits) joined column-wise in rank order into `[rows, columns]` on rank 0's GPU;
    /// `None` on the other ranks.
    fn gather_columns(&self, rank: usize, x: &Tensor, columns: usize) -> Result<Option<Tensor>>;
    /// `buf[..len]` (bf16, this rank's partial sums) summed over the group in place, on
    /// `dev`'s stream: the decode path's persistent buffers ([`super::DecodeGraphs`]).
    fn sum_in_place(
        &self,
        rank: usize,
        dev: &CudaDevice,
        buf: &mut CudaSlice<bf16>,
        len: usize,
    ) -> Result<()>;
    /// Every rank's `send[..len]` (f32) into `receive[..size * len]` in rank order, on
    /// `dev`'s stream. Rank 0's `receive` is written; other ranks' may be.
    fn gather_into(
        &self,
        rank: usize,
        dev: &CudaDevice,
        send: &CudaSlice<f32>,
        len: usize,
        receive: &mut CudaSlice<f32>,
    ) -> Result<()>;
    /// Whether [`Self::sum_in_place`] and [`Self::gather_into`] only queue GPU work, never
    /// waiting on the host, so that a CUDA graph can record them.
    fn in_stream(&self) -> bool;
}

/// Every rank's part copied to the host and summed there in rank order (f32), then copied
/// back: ranks that share one GPU (NCCL refuses two ranks on one device). Slow, and only for
/// checking the sharding where one GPU is all there is.
pub struct StagedAllReduce {
    host: HostAllReduce,
}

impl StagedAllReduce {
    pub fn new(size: usize) -> Self {
        Self {
            host: HostAllReduce::new(size),
        }
    }
}

impl RankGroup for StagedAllReduce {
    fn abort(&self, why: &str) {
        self.host.abort(why);
    }

    fn aborted(&self) -> Option<String> {
        self.host.aborted()
    }
}

impl DeviceAllReduce for StagedAllReduce {
    fn sum(&self, rank: usize, x: &Tensor) -> Result<Tensor> {
        let mut buf = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.host.sum(rank, &mut buf)?;
        Ok(Tensor::from_vec(buf, x.shape(), x.device())?.to_dtype(DType::BF16)?)
    }

    fn wait(&self, _rank: usize, dev: &CudaDevice) -> Result<()> {
        // Every collective above already waited on the host; the GPU never waits for a peer.
        dev.cuda_stream().synchronize().map_err(cuda_err)
    }

    fn gather_columns(&self, rank: usize, x: &Tensor, columns: usize) -> Result<Option<Tensor>> {
        let rows = x.dims2()?.0;
        let part = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let Some(parts) = self.host.gather(rank, &part)? else {
            return Ok(None);
        };
        let mut joined = Vec::with_capacity(rows * columns);
        for r in 0..rows {
            for p in &parts {
                let width = p.len() / rows.max(1);
                joined.extend_from_slice(&p[r * width..(r + 1) * width]);
            }
        }
        if joined.len() != rows * columns {
            return Err(ModelError::RankFailed(format!(
                "gathered {} logits for {rows} rows of {columns}",
                joined.len()
            )));
        }
        Ok(Some(Tensor::from_vec(joined, (rows, columns), x.device())?))
    }

    fn sum_in_place(
        &self,
        rank: usize,
        dev: &CudaDevice,
        buf: &mut CudaSlice<bf16>,
        len: usize,
    ) -> Result<()> {
        let stream = dev.cuda_stream();
        let part = stream.clone_dtoh(&buf.slice(..len)).map_err(cuda_err)?;
        let mut sums: Vec<f32> = part.iter().map(|x| x.to_f32()).collect();
        self.host.sum(rank, &mut sums)?;
        // Rounded once, as `sum` rounds its f32 total.
        let back: Vec<bf16> = sums.into_iter().map(bf16::from_f32).collect();
        stream
            .memcpy_htod(&back, &mut buf.slice_mut(..len))
            .map_err(cuda_err)
    }

    fn gather_into(
        &self,
        rank: usize,
        dev: &CudaDevice,
        send: &CudaSlice<f32>,
        len: usize,
        receive: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let stream = dev.cuda_stream();
        let part = stream.clone_dtoh(&send.slice(..len)).map_err(cuda_err)?;
        let Some(parts) = self.host.gather(rank, &part)? else {
            return Ok(());
        };
        let joined = parts.concat();
        if joined.len() > receive.len() {
            return Err(ModelError::RankFailed(format!(
                "gathered {} values into room for {}",
                joined.len(),
                receive.len()
            )));
        }
        stream
            .memcpy_htod(&joined, &mut receive.slice_mut(..joined.len()))
            .map_err(cuda_err)
    }

    fn in_stream(&self) -> bool {
        false
    }
}

type NcclResult = c_int;
type NcclComm = *mut c_void;
/// `ncclBfloat16`, `ncclFloat32` and `ncclSum` in nccl.h's enums.
const NCCL_BFLOAT16: c_int = 9;
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;

/// The NCCL functions Arbor calls, from the library found at run time.
struct NcclLib {
    comm_init_all: unsafe extern "C" fn(*mut NcclComm, c_int, *const c_int) -> NcclResult,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        NcclComm,
        *mut c_void,
    ) -> NcclResult,
    all_gather: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        NcclComm,
        *mut c_void,
    ) -> NcclResult,
    comm_abort: unsafe extern "C" fn(NcclComm) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(NcclComm) -> NcclResult,
    error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    version: c_int,
    /// Keeps the function pointers above valid.
    _lib: libloading::Library,
}

impl NcclLib {
    fn open() -> Result<Self> {
        let missing = |e: libloading::Error| {
            ModelError::Cuda(format!(
                "tensor parallelism over several GPUs needs NCCL (libnccl.so.2), which was not \
                 found on the library path ({e}); install it (e.g. `pip install nvidia-nccl-cu13` \
                 and add its nvidia/nccl/lib to LD_LIBRARY_PATH)"
            ))
        };
        // Safety: loading NCCL runs its initializers, which have no preconditions; the symbols
        // are read with the signatures nccl.h declares (NCCL 2.x ABI).
        unsafe {
            let lib = libloading::Library::new("libnccl.so.2").map_err(missing)?;
            let get_version: libloading::Symbol<unsafe extern "C" fn(*mut c_int) -> NcclResult> =
                lib.get(b"ncclGetVersion\0").map_err(missing)?;
            let mut version = 0;
            get_version(&mut version);
            Ok(Self {
                comm_init_all: *lib.get(b"ncclCommInitAll\0").map_err(missing)?,
                all_reduce: *lib.get(b"ncclAllReduce\0").map_err(missing)?,
                all_gather: *lib.get(b"ncclAllGather\0").map_err(missing)?,
                comm_abort: *lib.get(b"ncclCommAbort\0").map_err(missing)?,
                comm_destroy: *lib.get(b"ncclCommDestroy\0").map_err(missing)?,
                error_string: *lib.get(b"ncclGetErrorString\0").map_err(missing)?,
                version,
                _lib: lib,
            })
        }
    }

    fn check(&self, what: &str, r: NcclResult) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        // Safety: NCCL returns a static C string for every result code.
        let text = unsafe { CStr::from_ptr((self.error_string)(r)) };
        Err(ModelError::Cuda(format!(
            "NCCL {what}: {} (code {r})",
            text.to_string_lossy()
        )))
    }
}

/// A rank's communicator; `None` once aborted or destroyed.
struct Comm(Option<NcclComm>);

// Safety: an NCCL communicator may be used from any thread, one call at a time; each rank's is
// used only by that rank's worker (behind its own mutex here).
unsafe impl Send for Comm {}

/// One NCCL communicator per GPU of this process (`ncclCommInitAll`), each used by its rank's
/// worker thread on its device's stream.
pub struct NcclGroup {
    lib: NcclLib,
    comms: Vec<Mutex<Comm>>,
    aborted: Mutex<Option<String>>,
}

impl NcclGroup {
    /// Communicators over `ordinals` (one rank per GPU, in rank order).
    pub fn new(ordinals: &[usize]) -> Result<Arc<Self>> {
        let lib = NcclLib::open()?;
        let devs: Vec<c_int> = ordinals.iter().map(|&o| o as c_int).collect();
        let mut comms: Vec<NcclComm> = vec![std::ptr::null_mut(); devs.len()];
        // Safety: `comms` has room for one communicator per device listed.
        let r =
            unsafe { (lib.comm_init_all)(comms.as_mut_ptr(), devs.len() as c_int, devs.as_ptr()) };
        lib.check(&format!("initialization over GPUs {ordinals:?}"), r)?;
        tracing::info!(
            "NCCL {}: {} ranks on GPUs {ordinals:?}",
            lib.version,
            devs.len()
        );
        Ok(Arc::new(Self {
            lib,
            comms: comms
                .into_iter()
                .map(|c| Mutex::new(Comm(Some(c))))
                .collect(),
            aborted: Mutex::new(None),
        }))
    }

    fn comm(&self, rank: usize) -> std::sync::MutexGuard<'_, Comm> {
        self.comms[rank]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn broken(&self) -> Result<()> {
        match self.aborted() {
            Some(why) => Err(ModelError::RankFailed(why)),
            None => Ok(()),
        }
    }

    /// One collective of `rank` reading `in_len` values of `x` (contiguous, on the rank's GPU)
    /// into a new buffer of `out_len` values: `call(send, receive, communicator, stream)`, on
    /// the rank's stream.
    fn collective<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
        &self,
        rank: usize,
        x: &Tensor,
        (in_len, out_len): (usize, usize),
        what: &str,
        call: impl FnOnce(*const c_void, *mut c_void, NcclComm, *mut c_void) -> NcclResult,
    ) -> Result<CudaSlice<T>> {
        self.broken()?;
        let dev = cuda_device(x.device())?;
        let stream = dev.cuda_stream();
        // Safety: the collective writes every element of the output.
        let mut out = unsafe { dev.alloc::<T>(out_len) }?;
        let (st, lay) = x.storage_and_layout();
        let input = slice_of::<T>(&st, lay)?;
        if input.len() < in_len {
            return Err(ModelError::Cuda(format!(
                "NCCL {what}: {} values to send, {in_len} expected",
                input.len()
            )));
        }
        let (src, read) = input.device_ptr(&stream);
        let (dst, written) = out.device_ptr_mut(&stream);
        self.enqueue(rank, dev, what, (src, dst), call)?;
        // The buffers' events record the collective on the stream.
        drop((read, written));
        Ok(out)
    }

    /// `call(send, receive, communicator, stream)` for `rank` on `dev`'s stream, with device
    /// addresses the caller keeps alive until the stream has run the call.
    fn enqueue(
        &self,
        rank: usize,
        dev: &CudaDevice,
        what: &str,
        (src, dst): (u64, u64),
        call: impl FnOnce(*const c_void, *mut c_void, NcclComm, *mut c_void) -> NcclResult,
    ) -> Result<()> {
        let stream = dev.cuda_stream();
        self.with_comm(rank, what, |c| {
            call(
                src as *const c_void,
                dst as *mut c_void,
                c,
                stream.cu_stream() as *mut c_void,
            )
        })
    }

    /// `call(communicator)` with `rank`'s communicator, unless the group broke or it was
    /// aborted; NCCL's result checked.
    fn with_comm(
        &self,
        rank: usize,
        what: &str,
        call: impl FnOnce(NcclComm) -> NcclResult,
    ) -> Result<()> {
        self.broken()?;
        let comm = self.comm(rank);
        let Some(c) = comm.0 else {
            return Err(ModelError::RankFailed(format!("rank {rank}: NCCL aborted")));
        };
        self.lib.check(what, call(c))
    }

    /// Aborts `rank`'s communicator, which ends any collective of it still running.
    fn abort_comm(&self, rank: usize) {
        if let Some(c) = self.comm(rank).0.take() {
            // Safety: `c` came from ncclCommInitAll and is not used after this.
            unsafe { (self.lib.comm_abort)(c) };
        }
    }
}

impl RankGroup for NcclGroup {
    fn abort(&self, why: &str) {
        let mut a = self.aborted.lock().unwrap_or_else(PoisonError::into_inner);
        a.get_or_insert_with(|| why.to_string());
    }

    fn aborted(&self) -> Option<String> {
        self.aborted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl DeviceAllReduce for NcclGroup {
    fn sum(&self, rank: usize, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let (rows, cols) = x.dims2()?;
        let out = self.collective::<bf16>(
            rank,
            &x,
            (rows * cols, rows * cols),
            "all-reduce",
            |src, dst, c, s| {
                // Safety: both buffers hold rows x cols bf16 values on this rank's GPU (checked
                // by `collective`) and stay alive until the stream's events record the call.
                unsafe {
                    (self.lib.all_reduce)(src, dst, rows * cols, NCCL_BFLOAT16, NCCL_SUM, c, s)
                }
            },
        )?;
        Ok(wrap(out, cuda_device(x.device())?, (rows, cols)))
    }

    fn gather_columns(&self, rank: usize, x: &Tensor, columns: usize) -> Result<Option<Tensor>> {
        self.broken()?;
        let size = self.comms.len();
        let (rows, width) = x.dims2()?;
        // NCCL gathers equal parts: every rank's slice padded to the widest (the last rank's
        // vocabulary slice may be narrower), cut off again after the join.
        let chunk = columns.div_ceil(size);
        let x = x.to_dtype(DType::F32)?;
        let x = if width < chunk {
            x.pad_with_zeros(1, 0, chunk - width)?
        } else {
            x
        }
        .contiguous()?;
        let dev = cuda_device(x.device())?;
        let out = self.collective::<f32>(
            rank,
            &x,
            (rows * chunk, size * rows * chunk),
            "all-gather",
            |src, dst, c, s| {
                // Safety: the input holds rows x chunk f32 values and the output size times that
                // (checked by `collective`), both on this rank's GPU, alive until the stream's
                // events record the call.
                unsafe { (self.lib.all_gather)(src, dst, rows * chunk, NCCL_FLOAT32, c, s) }
            },
        )?;
        if rank != 0 {
            return Ok(None);
        }
        // [rank, row, column] -> [row, rank, column]: each row's slices side by side.
        let storage = CudaStorage::wrap_cuda_slice(out, dev.clone());
        let all = Tensor::from_storage(
            Storage::Cuda(storage),
            (size, rows, chunk),
            BackpropOp::none(),
            false,
        );
        let joined = all
            .transpose(0, 1)?
            .contiguous()?
            .reshape((rows, size * chunk))?
            .narrow(1, 0, columns)?
            .contiguous()?;
        Ok(Some(joined))
    }

    fn sum_in_place(
        &self,
        rank: usize,
        dev: &CudaDevice,
        buf: &mut CudaSlice<bf16>,
        len: usize,
    ) -> Result<()> {
        if len > buf.len() {
            return Err(ModelError::Cuda(format!(
                "NCCL all-reduce of {len} values in a buffer of {}",
                buf.len()
            )));
        }
        let stream = dev.cuda_stream();
        let (ptr, written) = buf.device_ptr_mut(&stream);
        self.enqueue(rank, dev, "all-reduce", (ptr, ptr), |src, dst, c, s| {
            // Safety: `buf` holds at least `len` bf16 values on this rank's GPU (checked
            // above) and outlives the call, which is ordered on the rank's stream (NCCL allows
            // the input and output to be the same buffer).
            unsafe { (self.lib.all_reduce)(src, dst, len, NCCL_BFLOAT16, NCCL_SUM, c, s) }
        })?;
        drop(written);
        Ok(())
    }

    fn gather_into(
        &self,
        rank: usize,
        dev: &CudaDevice,
        send: &CudaSlice<f32>,
        len: usize,
        receive: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let size = self.comms.len();
        if len > send.len() || size * len > receive.len() {
            return Err(ModelError::Cuda(format!(
                "NCCL all-gather of {size} x {len} values: {} to send, room for {}",
                send.len(),
                receive.len()
            )));
        }
        let stream = dev.cuda_stream();
        let (src, read) = send.device_ptr(&stream);
        let (dst, written) = receive.device_ptr_mut(&stream);
        self.enqueue(rank, dev, "all-gather", (src, dst), |src, dst, c, s| {
            // Safety: `send` holds `len` and `receive` `size * len` f32 values on this rank's
            // GPU (checked above); both outlive the call, ordered on the rank's stream.
            unsafe { (self.lib.all_gather)(src, dst, len, NCCL_FLOAT32, c, s) }
        })?;
        drop((read, written));
        Ok(())
    }

    fn in_stream(&self) -> bool {
        true
    }

    fn wait(&self, rank: usize, dev: &CudaDevice) -> Result<()> {
        let stream = dev.cuda_stream();
        let done = stream.record_event(None).map_err(cuda_err)?;
        // A peer that failed before its collective leaves ours waiting on the GPU: poll, and
        // abort this rank's communicator when the group breaks.
        let mut spins = 0u32;
        loop {
            if done.try_is_complete().map_err(cuda_err)? {
                return Ok(());
            }
            if let Some(why) = self.aborted() {
                self.abort_comm(rank);
                return Err(ModelError::RankFailed(why));
            }
            spins += 1;
            if spins < 2000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        for c in &self.comms {
            let mut c = c.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(comm) = c.0.take() {
                // Safety: the workers are gone (the runner joins them first); nothing uses
                // the communicator after this.
                unsafe { (self.lib.comm_destroy)(comm) };
            }
        }
    }
}

/// A one-rank NCCL round trip on GPU `ordinal` (`arbor gpu-check --nccl`): the library loads,
/// a communicator forms, and an all-reduce of one rank copies its input exactly. NCCL refuses
/// two ranks on one GPU, so this is what one GPU can check of the binding.
pub fn nccl_self_check(ordinal: usize) -> Result<serde_json::Value> {
    let device = device(ordinal)?;
    let group = NcclGroup::new(&[ordinal])?;
    let values: Vec<f32> = (0..4096)
        .map(|i| ((i * 37 % 211) as f32 - 105.0) / 8.0)
        .collect();
    let x = Tensor::from_vec(values, (64, 64), &device)?.to_dtype(DType::BF16)?;
    let y = group.sum(0, &x)?;
    group.wait(0, cuda_device(&device)?)?;
    let want = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let got = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let same = want == got;
    Ok(serde_json::json!({
        "nccl_version": group.lib.version, "values": want.len(), "identical": same,
        "failed": u32::from(!same),
    }))
}
