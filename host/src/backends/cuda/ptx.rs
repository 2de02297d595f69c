//! Where the PTX is looked for, and [`Kernels`]: weave's kernels on one [`Device`].

use super::dev::{DBuf, Device};
use super::CudaError;
use std::path::PathBuf;

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

/// weave's kernels on one device, and the device: the launch wrappers (`launch.rs`) are its
/// methods, the device's memory helpers (`zeros`, `upload`, `download`, ...) are reached
/// through it.
#[derive(Debug)]
pub struct Kernels {
    pub dev: Box<dyn Device>,
    pub name: String,
    pub arch: String,
    /// Streaming multiprocessors (the split-KV choice fills them).
    pub num_sms: u32,
}

impl Kernels {
    /// GPU `ordinal` with the PTX of the newest arch not above its compute capability.
    pub fn load(ordinal: usize) -> Result<Kernels, CudaError> {
        Ok(Kernels::on(Box::new(super::cudarc_dev::CudaDev::load(ordinal)?)))
    }

    /// The SIMT emulator with `total` bytes of device memory and every check on.
    pub fn emulated(total: usize) -> Kernels {
        Kernels::on(Box::new(super::emu::EmuDev::new(total)))
    }

    /// The kernels of the device `exec` names (`Cuda`: device 0; `Emu`: the emulator with
    /// [`EMU_MEMORY`] bytes, or `$WEAVE_EMU_MEMORY_MIB` MiB).
    pub fn open(exec: super::ExecDevice) -> Result<Kernels, CudaError> {
        match exec {
            super::ExecDevice::Emu => {
                let mib = std::env::var("WEAVE_EMU_MEMORY_MIB").ok().and_then(|v| v.parse::<usize>().ok());
                Ok(Kernels::emulated(mib.map_or(EMU_MEMORY, |m| m << 20)))
            }
            _ => Kernels::load(0),
        }
    }

    pub fn on(dev: Box<dyn Device>) -> Kernels {
        Kernels { name: dev.name(), arch: dev.arch(), num_sms: dev.num_sms(), dev }
    }

    pub fn upload<T: bytemuck::Pod>(&self, v: &[T]) -> Result<DBuf<T>, CudaError> {
        self.dev.upload(v)
    }
    pub fn download<T: bytemuck::Pod>(&self, d: &DBuf<T>) -> Result<Vec<T>, CudaError> {
        self.dev.download(d)
    }
    pub fn zeros<T: bytemuck::Pod>(&self, n: usize) -> Result<DBuf<T>, CudaError> {
        self.dev.zeros(n)
    }
    pub fn sync(&self) -> Result<(), CudaError> {
        self.dev.sync()
    }
}

/// The emulated device's memory unless `$WEAVE_EMU_MEMORY_MIB` says otherwise: room for a
/// small model's weights and a KV cache (the host pages it in only where written).
pub const EMU_MEMORY: usize = 1 << 30;
