//! The CUDA side's one error type.

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
    #[error("cuBLAS: {0}")]
    Blas(String),
    #[error("device memory: {0}")]
    Memory(String),
    #[error("emulated kernel: {0}")]
    Emulator(weave_simt::EmuError),
    #[error("not on this device: {0}")]
    Unsupported(&'static str),
    #[error("not on the CUDA backend: {0}")]
    UnsupportedModel(String),
    #[error("CUDA graph: {0}")]
    Graph(String),
}
