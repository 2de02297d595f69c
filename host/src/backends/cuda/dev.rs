//! The one seam between the CUDA backend and a device: what the backend asks of one (memory,
//! copies, a kernel launch by [`Kernel`] with its arguments as [`Arg`]s, a GEMM, ordering and
//! timing, graph capture). Two implement it: `cudarc_dev` (a GPU through the driver and
//! cuBLAS) and `emu` (the SIMT emulator, GEMMs on the CPU), so every line of the backend above
//! this seam (metadata packing, tile lists, the split-KV choice, padded decode steps, device
//! sampling, the profiling pass) runs in `cargo test` on a machine without a GPU.
//!
//! Device memory is addressed as the kernels see it: a `u64` device address. A [`DBuf`] owns
//! an allocation and knows its element type and length, so every copy through it is checked
//! against its bounds on the host before the device sees it.

use super::CudaError;
use std::marker::PhantomData;
use weave_kernels_gpu::gpu::Arg;
use weave_kernels_gpu::{Dtype, Kernel, LaunchDims};

/// One allocation of device memory; freed when dropped.
pub trait Mem: Send + std::fmt::Debug {
    /// Its device address.
    fn addr(&self) -> u64;
}

/// A point in a device's stream of work, for timing.
#[derive(Debug)]
pub enum Event {
    Cuda(cudarc::driver::CudaEvent),
    /// The emulator runs each launch to its end before returning: host time is device time.
    Host(std::time::Instant),
}

/// A recorded sequence of launches, replayed as one (a CUDA graph).
pub trait Graph {
    fn launch(&self) -> Result<(), CudaError>;
}

/// `c (+)= x * w^T` for `n` rows: `x` is `n x in_dim`, `w` is `out_dim x in_dim` (row-major,
/// a block of a larger matrix's rows when its address is offset), both in `dtype`; `c` is
/// `n x out_dim` in `dtype`, or f32 when `c_f32` (the logits). Accumulates in f32.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub x: u64,
    pub w: u64,
    pub c: u64,
    pub n: usize,
    pub out_dim: usize,
    pub in_dim: usize,
    pub accumulate: bool,
    pub c_f32: bool,
    pub dtype: Dtype,
}

/// What the CUDA backend asks of a device. Work is ordered as submitted (one stream); a copy
/// to the host returns when its data is there.
pub trait Device: Send + Sync + std::fmt::Debug {
    /// E.g. `NVIDIA H200`.
    fn name(&self) -> String;
    /// The PTX target it runs, e.g. `sm_90`, or `emu`.
    fn arch(&self) -> String;
    /// Streaming multiprocessors (the split-KV choice fills them).
    fn num_sms(&self) -> u32;
    /// Makes this device current on the calling thread (a server steps on a thread of its own).
    fn bind_to_thread(&self) -> Result<(), CudaError>;
    /// `bytes` of zeroed memory.
    fn alloc_zeroed(&self, bytes: usize) -> Result<Box<dyn Mem>, CudaError>;
    /// Copies `src` to device address `dst`; `src` may be reused when this returns.
    fn htod(&self, src: &[u8], dst: u64) -> Result<(), CudaError>;
    /// Copies device memory at `src` to `dst`, waiting for the work before it.
    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<(), CudaError>;
    fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<(), CudaError>;
    /// Launches `kernel` with `dims` and `args` (its parameters in order).
    fn launch(&self, kernel: Kernel, dims: LaunchDims, args: &[Arg]) -> Result<(), CudaError>;
    fn gemm(&self, g: &Gemm) -> Result<(), CudaError>;
    /// Waits for all submitted work.
    fn sync(&self) -> Result<(), CudaError>;
    fn record(&self) -> Result<Event, CudaError>;
    /// Seconds from `a` to `b` (both recorded, `b` after `a`, and waited for).
    fn elapsed(&self, a: &Event, b: &Event) -> Result<f64, CudaError>;
    /// `(free, total)` bytes of device memory.
    fn mem_info(&self) -> Result<(usize, usize), CudaError>;
    /// Whether [`Self::begin_capture`] records graphs; where not, the backend runs the steps a
    /// graph would replay eagerly, padded the same way.
    fn graphs(&self) -> bool;
    /// From here to [`Self::end_capture`], launches are recorded, not run.
    fn begin_capture(&self) -> Result<(), CudaError>;
    /// The recorded launches, instantiated (`None` when nothing was recorded).
    fn end_capture(&self) -> Result<Option<Box<dyn Graph>>, CudaError>;
    /// The device itself, for what only one kind has (the emulator's statistics).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// `n` elements of `T` in device memory, owned (freed when dropped).
#[derive(Debug)]
pub struct DBuf<T> {
    mem: Box<dyn Mem>,
    len: usize,
    _t: PhantomData<T>,
}

/// `len` elements of `T` at a device address, borrowed from a [`DBuf`].
#[derive(Debug)]
pub struct DView<'a, T> {
    addr: u64,
    len: usize,
    _t: PhantomData<&'a T>,
}

impl<T> Clone for DView<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DView<'_, T> {}

impl<T: bytemuck::Pod> DBuf<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The device address of element 0.
    pub fn addr(&self) -> u64 {
        self.mem.addr()
    }
    pub fn as_view(&self) -> DView<'_, T> {
        DView { addr: self.addr(), len: self.len, _t: PhantomData }
    }
    /// Elements `r` (panics outside the buffer, as a slice does).
    pub fn slice(&self, r: std::ops::Range<usize>) -> DView<'_, T> {
        assert!(r.start <= r.end && r.end <= self.len, "device slice {r:?} of a buffer of {} elements", self.len);
        DView { addr: self.addr() + (r.start * size_of::<T>()) as u64, len: r.len(), _t: PhantomData }
    }
}

impl<T> DView<'_, T> {
    pub fn addr(&self) -> u64 {
        self.addr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A device's memory helpers, typed: what the launch wrappers and the backend use.
impl dyn Device {
    /// `n` zeroed elements (at least one: no zero-sized device buffers).
    pub fn zeros<T: bytemuck::Pod>(&self, n: usize) -> Result<DBuf<T>, CudaError> {
        let mem = self.alloc_zeroed(n.max(1) * size_of::<T>())?;
        Ok(DBuf { mem, len: n.max(1), _t: PhantomData })
    }
    pub fn upload<T: bytemuck::Pod>(&self, v: &[T]) -> Result<DBuf<T>, CudaError> {
        let b = self.zeros::<T>(v.len())?;
        if !v.is_empty() {
            self.htod(bytemuck::cast_slice(v), b.addr())?;
        }
        Ok(b)
    }
    /// Writes `v` into `dst` from element `at` on.
    pub fn write<T: bytemuck::Pod>(&self, v: &[T], dst: &DBuf<T>, at: usize) -> Result<(), CudaError> {
        if at + v.len() > dst.len() {
            return Err(CudaError::Shape("a copy to the device past its buffer's end"));
        }
        if v.is_empty() {
            return Ok(());
        }
        self.htod(bytemuck::cast_slice(v), dst.addr() + (at * size_of::<T>()) as u64)
    }
    pub fn download<T: bytemuck::Pod>(&self, d: &DBuf<T>) -> Result<Vec<T>, CudaError> {
        self.read(d.as_view())
    }
    pub fn read<T: bytemuck::Pod>(&self, d: DView<'_, T>) -> Result<Vec<T>, CudaError> {
        let mut v = vec![T::zeroed(); d.len()];
        // No zero-byte copies reach a device (the driver's rules for them vary by call).
        if !v.is_empty() {
            self.dtoh(d.addr(), bytemuck::cast_slice_mut(&mut v))?;
        }
        Ok(v)
    }
    /// Copies all of `src` to the start of `dst`.
    pub fn copy<T: bytemuck::Pod>(&self, src: &DBuf<T>, dst: &DBuf<T>) -> Result<(), CudaError> {
        if src.len() > dst.len() {
            return Err(CudaError::Shape("a device copy into a smaller buffer"));
        }
        self.dtod(src.addr(), dst.addr(), src.len() * size_of::<T>())
    }
}
