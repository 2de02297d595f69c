//! Finding and loading the PTX, and its functions by [`Kernel`].

use super::CudaError;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr};
use std::path::PathBuf;
use std::sync::Arc;
use weave_kernels_gpu::{Kernel, KERNELS};

/// Directories searched for `<arch>/weave_kernels.ptx`: `$WEAVE_PTX_DIR`, then
/// `target/ptx` beside the running executable's target directory, then `./target/ptx`.
pub fn ptx_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os("WEAVE_PTX_DIR").filter(|d| !d.is_empty()) {
        v.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/{release,debug}/weave or target/{..}/deps/test-binary
        for up in exe.ancestors().skip(1).take(3) {
            if up.file_name().is_some_and(|n| n == "target") {
                v.push(up.join("ptx"));
            }
        }
    }
    v.push(PathBuf::from("target/ptx"));
    v
}

/// The loaded kernels on one device.
#[derive(Debug)]
pub struct Kernels {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// Every kernel's function, in [`KERNELS`] order.
    functions: Vec<CudaFunction>,
    pub name: String,
    pub arch: String,
    pub ptx_path: PathBuf,
    /// Streaming multiprocessors (the split-KV choice fills them).
    pub num_sms: u32,
}

impl Kernels {
    /// Device `ordinal` with the PTX of the newest arch not above its compute capability.
    pub fn load(ordinal: usize) -> Result<Kernels, CudaError> {
        let ctx = CudaContext::new(ordinal)?;
        // weave runs everything on one stream, so cudarc's per-buffer events (which order
        // uses across streams) only cost time, and they break CUDA-graph capture of cuBLAS
        // calls (TOOLCHAIN.md). Off before any buffer is made.
        // SAFETY: no buffer is shared between streams: all work goes to `stream` below.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability()?;
        let cc = major * 10 + minor;
        let name = ctx.name()?;
        let dirs = ptx_dirs();
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
        Ok(Kernels { ctx, stream, functions, name, arch: format!("sm_{v}"), ptx_path: path, num_sms })
    }

    pub fn function(&self, k: Kernel) -> &CudaFunction {
        &self.functions[k.index()]
    }

    pub fn upload<T: DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>, CudaError> {
        Ok(self.stream.clone_htod(v)?)
    }
    pub fn download<T: DeviceRepr + Default + Clone>(&self, d: &CudaSlice<T>) -> Result<Vec<T>, CudaError> {
        Ok(self.stream.clone_dtoh(d)?)
    }
    pub fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>, CudaError> {
        Ok(self.stream.alloc_zeros::<T>(n.max(1))?)
    }
    pub fn sync(&self) -> Result<(), CudaError> {
        Ok(self.stream.synchronize()?)
    }
}
