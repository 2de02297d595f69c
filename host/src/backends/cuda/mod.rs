//! The CUDA side of weave: find a GPU at run time (cudarc loads libcuda dynamically, so this
//! builds and runs where there is none), load the PTX that `cargo xtask build-ptx` wrote, and
//! launch weave's kernels with the grid each one expects.
//!
//! Status: the kernels and these launch wrappers are exercised by `tests/tests/cuda_kernels.rs`
//! against the CPU reference when a GPU is present; the model-level CUDA backend (weights,
//! cuBLAS GEMMs, device KV cache, `--device cuda`) is not written yet.

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
};
use std::path::PathBuf;
use std::sync::Arc;
use weave_kernels_gpu::attention::{count_tiles, fill_tiles, AttnShape};
use weave_kernels_gpu::{attention_smem_bytes, Elem, BLOCK_THREADS, KERNELS};

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("no PTX for {arch} (looked in {searched}); build it with `cargo xtask build-ptx --arch {arch}`")]
    MissingPtx { arch: String, searched: String },
    #[error("{path} lacks kernel {kernel}: the PTX is stale; rebuild it with `cargo xtask build-ptx`")]
    StalePtx { path: String, kernel: String },
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("unsupported shape: {0}")]
    Shape(&'static str),
}

/// Why there is no usable GPU, when there is none.
pub fn no_gpu_reason() -> Option<String> {
    // SAFETY: only probes whether the library can be loaded; nothing is called through it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("no CUDA driver (libcuda) on this machine".into());
    }
    match CudaContext::device_count() {
        Ok(0) => Some("the CUDA driver reports no device".into()),
        Ok(_) => None,
        Err(e) => Some(format!("the CUDA driver failed to start: {e}")),
    }
}

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
    module: Arc<CudaModule>,
    pub name: String,
    pub arch: String,
    pub ptx_path: PathBuf,
}

impl Kernels {
    /// Device `ordinal` with the PTX of the newest arch not above its compute capability.
    pub fn load(ordinal: usize) -> Result<Kernels, CudaError> {
        let ctx = CudaContext::new(ordinal)?;
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
        for k in KERNELS {
            if !text.contains(&format!(".entry {k}(")) {
                return Err(CudaError::StalePtx { path: path.display().to_string(), kernel: (*k).into() });
            }
        }
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(text))?;
        let stream = ctx.default_stream();
        Ok(Kernels { ctx, stream, module, name, arch: format!("sm_{v}"), ptx_path: path })
    }

    pub fn function(&self, name: &str) -> Result<CudaFunction, CudaError> {
        Ok(self.module.load_function(name)?)
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

/// The suffix of a kernel name for storage type `T`.
fn tname<T: Elem>() -> &'static str {
    T::NAME
}

fn rows(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (BLOCK_THREADS, 1, 1), shared_mem_bytes: 32 }
}

/// Device buffers hold the kernels' storage types bit for bit: f32 as is, f16 and bf16 as u16.
pub trait DevElem: Elem {
    type Bits: DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy + Default + Unpin;
    fn to_bits(v: &[Self]) -> Vec<Self::Bits>;
    fn from_bits(v: &[Self::Bits]) -> Vec<Self>;
}

impl DevElem for weave_kernels_gpu::F16 {
    type Bits = u16;
    fn to_bits(v: &[Self]) -> Vec<u16> {
        v.iter().map(|x| x.0).collect()
    }
    fn from_bits(v: &[u16]) -> Vec<Self> {
        v.iter().map(|&b| weave_kernels_gpu::F16(b)).collect()
    }
}

impl DevElem for weave_kernels_gpu::Bf16 {
    type Bits = u16;
    fn to_bits(v: &[Self]) -> Vec<u16> {
        v.iter().map(|x| x.0).collect()
    }
    fn from_bits(v: &[u16]) -> Vec<Self> {
        v.iter().map(|&b| weave_kernels_gpu::Bf16(b)).collect()
    }
}

impl DevElem for f32 {
    type Bits = f32;
    fn to_bits(v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
    fn from_bits(v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
}

/// Launch wrappers: same arguments as the kernels, grids as `kernels-gpu` documents them.
impl Kernels {
    #[allow(clippy::too_many_arguments)]
    pub fn reshape_and_cache<T: DevElem>(
        &self,
        k: &CudaSlice<T::Bits>,
        v: &CudaSlice<T::Bits>,
        k_cache: &mut CudaSlice<T::Bits>,
        v_cache: &mut CudaSlice<T::Bits>,
        slots: &CudaSlice<u32>,
        num_tokens: usize,
        row: u32,
    ) -> Result<(), CudaError> {
        let f = self.function(&format!("reshape_and_cache_{}", tname::<T>()))?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(k).arg(v).arg(k_cache).arg(v_cache).arg(slots).arg(&row);
        // SAFETY: buffers sized by the caller for `num_tokens` rows and every slot in `slots`.
        unsafe { b.launch(LaunchConfig { shared_mem_bytes: 0, ..rows(num_tokens) }) }?;
        Ok(())
    }

    /// Paged attention over a packed batch, with the split-KV reduce when `blocks_per_split > 0`.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention<T: DevElem>(
        &self,
        shape: &AttnShape,
        query_start_loc: &[u32],
        context_lens: &CudaSlice<u32>,
        block_tables: &CudaSlice<u32>,
        max_seq_len: u32,
        q: &CudaSlice<T::Bits>,
        k_cache: &CudaSlice<T::Bits>,
        v_cache: &CudaSlice<T::Bits>,
        out: &mut CudaSlice<T::Bits>,
    ) -> Result<(), CudaError> {
        shape.check().map_err(CudaError::Shape)?;
        let d = shape.head_dim;
        let num_tokens = *query_start_loc.last().unwrap_or(&0);
        let tq = shape.tokens_per_tile();
        let mut tiles = vec![0u32; 2 * count_tiles(query_start_loc, tq)];
        fill_tiles(query_start_loc, tq, &mut tiles);
        let tiles_d = self.upload(&tiles)?;
        let qsl_d = self.upload(query_start_loc)?;
        let splits = shape.num_splits(max_seq_len);
        let mut partials = self.zeros::<f32>(if splits > 1 {
            splits as usize * num_tokens as usize * shape.num_q_heads as usize * shape.partial_stride()
        } else {
            1
        })?;
        let f = self.function(&format!("paged_attention_{}_d{d}", tname::<T>()))?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&mut *out)
            .arg(&mut partials)
            .arg(q)
            .arg(k_cache)
            .arg(v_cache)
            .arg(&tiles_d)
            .arg(&qsl_d)
            .arg(context_lens)
            .arg(block_tables);
        b.arg(&num_tokens)
            .arg(&shape.num_q_heads)
            .arg(&shape.num_kv_heads)
            .arg(&shape.block_size)
            .arg(&shape.max_blocks_per_seq)
            .arg(&shape.blocks_per_split)
            .arg(&splits)
            .arg(&shape.scale);
        let cfg = LaunchConfig {
            grid_dim: ((tiles.len() / 2) as u32, shape.num_kv_heads, splits),
            block_dim: (BLOCK_THREADS, 1, 1),
            shared_mem_bytes: attention_smem_bytes(d),
        };
        // SAFETY: shapes checked; buffers sized by the caller as AttnShape documents.
        unsafe { b.launch(cfg) }?;
        if splits > 1 {
            let f = self.function(&format!("attention_reduce_{}_d{d}", tname::<T>()))?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(out).arg(&partials).arg(&num_tokens).arg(&shape.num_q_heads).arg(&splits);
            let cfg = LaunchConfig {
                grid_dim: (num_tokens, shape.num_q_heads, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `partials` was filled for these dimensions by the launch above.
            unsafe { b.launch(cfg) }?;
        }
        Ok(())
    }

    pub fn rms_norm<T: DevElem>(
        &self,
        out: &mut CudaSlice<T::Bits>,
        x: &CudaSlice<T::Bits>,
        w: &CudaSlice<f32>,
        n_rows: usize,
        n: u32,
        eps: f32,
    ) -> Result<(), CudaError> {
        let f = self.function(&format!("rms_norm_{}", tname::<T>()))?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(out).arg(x).arg(w).arg(&n).arg(&eps);
        // SAFETY: `n_rows * n` elements in `out` and `x`, `n` weights.
        unsafe { b.launch(rows(n_rows)) }?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn fused_add_rms_norm<T: DevElem>(
        &self,
        x: &mut CudaSlice<T::Bits>,
        residual: &mut CudaSlice<T::Bits>,
        w: &CudaSlice<f32>,
        n_rows: usize,
        n: u32,
        eps: f32,
    ) -> Result<(), CudaError> {
        let f = self.function(&format!("fused_add_rms_norm_{}", tname::<T>()))?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(residual).arg(w).arg(&n).arg(&eps);
        // SAFETY: as for rms_norm.
        unsafe { b.launch(rows(n_rows)) }?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rotary_embedding<T: DevElem>(
        &self,
        q: &mut CudaSlice<T::Bits>,
        k: &mut CudaSlice<T::Bits>,
        positions: &CudaSlice<u32>,
        cos_sin: &CudaSlice<f32>,
        num_tokens: usize,
        dims: (u32, u32, u32, u32),
        layout: weave_kernels_gpu::ops::RopeLayout,
    ) -> Result<(), CudaError> {
        let (nq, nk, head_dim, rot_dim) = dims;
        let f = self.function(&format!("rotary_embedding_{}", tname::<T>()))?;
        let mut b = self.stream.launch_builder(&f);
        let layout = layout as u32;
        b.arg(q).arg(k).arg(positions).arg(cos_sin).arg(&nq).arg(&nk).arg(&head_dim).arg(&rot_dim).arg(&layout);
        // SAFETY: q/k hold `num_tokens` rows of nq/nk heads; the cos/sin cache covers every position.
        unsafe { b.launch(LaunchConfig { shared_mem_bytes: 0, ..rows(num_tokens) }) }?;
        Ok(())
    }

    pub fn silu_and_mul<T: DevElem>(
        &self,
        out: &mut CudaSlice<T::Bits>,
        x: &CudaSlice<T::Bits>,
        num_tokens: usize,
        inter: u32,
    ) -> Result<(), CudaError> {
        let f = self.function(&format!("silu_and_mul_{}", tname::<T>()))?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(out).arg(x).arg(&inter);
        // SAFETY: `x` holds 2 * inter per token, `out` inter per token.
        unsafe { b.launch(LaunchConfig { shared_mem_bytes: 0, ..rows(num_tokens) }) }?;
        Ok(())
    }

    pub fn embedding<T: DevElem>(
        &self,
        out: &mut CudaSlice<T::Bits>,
        table: &CudaSlice<T::Bits>,
        ids: &CudaSlice<u32>,
        num_tokens: usize,
        hidden: u32,
    ) -> Result<(), CudaError> {
        let f = self.function(&format!("embedding_{}", tname::<T>()))?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(out).arg(table).arg(ids).arg(&hidden);
        // SAFETY: every id indexes a row of `table`.
        unsafe { b.launch(LaunchConfig { shared_mem_bytes: 0, ..rows(num_tokens) }) }?;
        Ok(())
    }

    pub fn argmax(
        &self,
        out: &mut CudaSlice<u32>,
        logits: &CudaSlice<f32>,
        n_rows: usize,
        vocab: u32,
    ) -> Result<(), CudaError> {
        let f = self.function("argmax_f32")?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(out).arg(logits).arg(&vocab);
        // SAFETY: `logits` holds n_rows * vocab values, `out` n_rows.
        unsafe { b.launch(LaunchConfig { shared_mem_bytes: 64, ..rows(n_rows) }) }?;
        Ok(())
    }
}

/// Resolves `auto` and `cuda` device requests for the commands that run a model.
pub fn describe_device(want: &str) -> Result<String, String> {
    match (want, no_gpu_reason()) {
        ("cpu", _) => Ok("cpu".into()),
        ("auto", Some(why)) => Ok(format!("cpu (auto: {why})")),
        ("auto", None) | ("cuda", None) => {
            Err("the CUDA model backend is not written yet (the kernels are; see issue 5); use --device cpu".into())
        }
        ("cuda", Some(why)) => Err(format!("--device cuda: {why}")),
        (other, _) => Err(format!("unknown device {other:?}; use cpu, cuda or auto")),
    }
}
