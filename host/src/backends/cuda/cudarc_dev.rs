//! [`Device`] on a GPU: cudarc's driver API on one stream, weave's PTX module, cuBLAS.

use super::dev::{Device, Event, Gemm, Graph, Mem};
use super::CudaError;
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, PushKernelArg};
use std::path::PathBuf;
use std::sync::Arc;
use weave_kernels_gpu::gpu::Arg;
use weave_kernels_gpu::{Dtype, Kernel, LaunchDims, KERNELS};

/// One GPU, its stream, weave's kernels loaded from PTX, and a cuBLAS handle on the stream.
#[derive(Debug)]
pub struct CudaDev {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// Every kernel's function, in [`KERNELS`] order.
    functions: Vec<CudaFunction>,
    blas: CudaBlas,
    name: String,
    arch: String,
    num_sms: u32,
}

/// A device allocation and its address (taken once: event tracking is off, so cudarc's
/// per-use guards have nothing to do).
#[derive(Debug)]
struct CudaMem {
    _slice: CudaSlice<u8>,
    addr: u64,
}

impl Mem for CudaMem {
    fn addr(&self) -> u64 {
        self.addr
    }
}

struct CudaGraphExec(cudarc::driver::CudaGraph);

impl Graph for CudaGraphExec {
    fn launch(&self) -> Result<(), CudaError> {
        Ok(self.0.launch()?)
    }
}

impl CudaDev {
    /// Device `ordinal` with the PTX of the newest arch not above its compute capability.
    pub fn load(ordinal: usize) -> Result<CudaDev, CudaError> {
        let ctx = CudaContext::new(ordinal)?;
        // weave runs everything on one stream, so cudarc's per-buffer events (which order
        // uses across streams) only cost time, and they break CUDA-graph capture of cuBLAS
        // calls (TOOLCHAIN.md). Off before any buffer is made.
        // SAFETY: no buffer is shared between streams: all work goes to `stream` below.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability()?;
        let cc = major * 10 + minor;
        let name = ctx.name()?;
        let dirs = super::ptx_dirs();
        let mut found = None;
        for d in &dirs {
            let Ok(rd) = std::fs::read_dir(d) else { continue };
            let mut archs: Vec<(i32, PathBuf)> = rd
                .flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let v: i32 = n.strip_prefix("sm_")?.parse().ok()?;
                    let p = e.path().join("weave_kernels.ptx");
                    (v <= cc && p.exists()).then_some((v, p))
                })
                .collect();
            archs.sort();
            if let Some(best) = archs.pop() {
                found = Some(best);
                break;
            }
        }
        let (v, path) = found.ok_or_else(|| CudaError::MissingPtx {
            arch: format!("sm_{cc}"),
            searched: dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
        })?;
        let text = std::fs::read_to_string(&path)
            .map_err(|source| CudaError::Io { path: path.display().to_string(), source })?;
        let stale = |k: Kernel| CudaError::StalePtx { path: path.display().to_string(), kernel: k.name().into() };
        if let Some(k) = KERNELS.iter().find(|k| !text.contains(&format!(".entry {}(", k.name()))) {
            return Err(stale(*k));
        }
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(text))?;
        // Looked up once here, not at each of a step's launches.
        let functions =
            KERNELS.iter().map(|&k| module.load_function(k.name()).map_err(|_| stale(k))).collect::<Result<_, _>>()?;
        // A stream of its own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream()?;
        let num_sms =
            ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::Blas(e.to_string()))?;
        Ok(CudaDev { ctx, stream, functions, blas, name, arch: format!("sm_{v}"), num_sms })
    }
}

impl Device for CudaDev {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn arch(&self) -> String {
        self.arch.clone()
    }
    fn num_sms(&self) -> u32 {
        self.num_sms
    }
    fn bind_to_thread(&self) -> Result<(), CudaError> {
        Ok(self.ctx.bind_to_thread()?)
    }
    fn alloc_zeroed(&self, bytes: usize) -> Result<Box<dyn Mem>, CudaError> {
        let slice = self.stream.alloc_zeros::<u8>(bytes.max(1))?;
        let addr = slice.device_ptr(&self.stream).0;
        Ok(Box::new(CudaMem { addr, _slice: slice }))
    }
    fn htod(&self, src: &[u8], dst: u64) -> Result<(), CudaError> {
        // From pageable memory the driver stages `src` before returning, so the caller may
        // reuse it at once.
        // SAFETY: `dst` is inside a live allocation for `src.len()` bytes (`DBuf` checks).
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }?;
        Ok(())
    }
    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<(), CudaError> {
        // SAFETY: as `htod`; the sync makes the data land before `dst` is read.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }?;
        Ok(self.stream.synchronize()?)
    }
    fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<(), CudaError> {
        // SAFETY: both ranges inside live allocations (`DBuf` checks).
        unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }?;
        Ok(())
    }
    fn launch(&self, kernel: Kernel, dims: LaunchDims, args: &[Arg]) -> Result<(), CudaError> {
        let f = &self.functions[kernel.index()];
        let mut b = self.stream.launch_builder(f);
        // Each argument's value as the parameter's width: a pointer is its 64-bit address.
        for a in args {
            match a {
                Arg::Ptr(p) | Arg::U64(p) => b.arg(p),
                Arg::U32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: dims.grid,
            block_dim: (dims.block, 1, 1),
            shared_mem_bytes: dims.smem,
        };
        // SAFETY: the launch wrappers (launch.rs) pass the kernel's parameters in order, with
        // buffers sized as each kernel documents; the emulator checks the same launches'
        // arity, kinds and every access in `cargo test`.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
    fn gemm(&self, g: &Gemm) -> Result<(), CudaError> {
        // In cuBLAS's column-major terms: `C (out x n) = W^T (W is in x out, column-major)
        // * X (in x n)`.
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        use blas_sys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F};
        let t16 = if g.dtype == Dtype::F16 { CUDA_R_16F } else { CUDA_R_16BF };
        let (alpha, beta) = (1f32, if g.accumulate { 1f32 } else { 0f32 });
        // SAFETY: the pointers come from live device buffers sized for these dimensions by
        // the caller; alpha and beta are f32, as the f32 compute type requires.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                CUBLAS_OP_T,
                CUBLAS_OP_N,
                g.out_dim as i32,
                g.n as i32,
                g.in_dim as i32,
                (&alpha) as *const f32 as *const _,
                g.w as *const _,
                t16,
                g.in_dim as i32,
                g.x as *const _,
                t16,
                g.in_dim as i32,
                (&beta) as *const f32 as *const _,
                g.c as *mut _,
                if g.c_f32 { CUDA_R_32F } else { t16 },
                g.out_dim as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| CudaError::Blas(e.to_string()))
    }
    fn sync(&self) -> Result<(), CudaError> {
        Ok(self.stream.synchronize()?)
    }
    fn record(&self) -> Result<Event, CudaError> {
        let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        Ok(Event::Cuda(self.stream.record_event(timed)?))
    }
    fn elapsed(&self, a: &Event, b: &Event) -> Result<f64, CudaError> {
        match (a, b) {
            (Event::Cuda(a), Event::Cuda(b)) => Ok(a.elapsed_ms(b)? as f64 / 1e3),
            _ => Err(CudaError::Graph("events of another device".into())),
        }
    }
    fn mem_info(&self) -> Result<(usize, usize), CudaError> {
        Ok(self.ctx.mem_get_info()?)
    }
    fn graphs(&self) -> bool {
        true
    }
    fn begin_capture(&self) -> Result<(), CudaError> {
        use cudarc::driver::sys::CUstreamCaptureMode;
        self.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        Ok(())
    }
    fn end_capture(&self) -> Result<Option<Box<dyn Graph>>, CudaError> {
        use cudarc::driver::sys::CUgraphInstantiate_flags;
        let Some(g) = self.stream.end_capture(CUgraphInstantiate_flags(0))? else { return Ok(None) };
        g.upload()?;
        Ok(Some(Box::new(CudaGraphExec(g))))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
