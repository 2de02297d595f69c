//! Is there a usable GPU, and which device a command runs on.

use cudarc::driver::CudaContext;

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

/// Where a command runs its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecDevice {
    #[default]
    Cpu,
    /// The CUDA backend on device 0.
    Cuda,
    /// The CUDA backend on the SIMT emulator: the same code and kernels as `Cuda`, on the CPU,
    /// slowly and with every check on. For proving the GPU path without a GPU.
    Emu,
}

/// Resolves `--device` for a command: the device and a line saying which was picked and why.
/// `cuda_ok`: whether the command has a CUDA path (`weave generate` does; the others run on
/// the CPU backend only so far). `auto` takes the GPU when one works and the command can.
pub fn choose_device(want: &str, cuda_ok: bool) -> Result<(ExecDevice, String), String> {
    const CPU_ONLY: &str =
        "this command runs on the CPU backend only so far (the CUDA backend runs generate, bench generate, serve and logits)";
    match (want, no_gpu_reason()) {
        ("cpu", _) => Ok((ExecDevice::Cpu, "cpu".into())),
        ("emu", _) if !cuda_ok => Err(format!("--device emu: {CPU_ONLY}")),
        ("emu", _) => Ok((ExecDevice::Emu, "emu (the CUDA backend on the SIMT emulator)".into())),
        ("auto", Some(why)) => Ok((ExecDevice::Cpu, format!("cpu (auto: {why})"))),
        ("auto", None) if !cuda_ok => Ok((ExecDevice::Cpu, format!("cpu (auto: {CPU_ONLY})"))),
        ("auto", None) => Ok((ExecDevice::Cuda, "cuda (auto: a GPU is there)".into())),
        ("cuda", Some(why)) => Err(format!("--device cuda: {why}")),
        ("cuda", None) if !cuda_ok => Err(format!("--device cuda: {CPU_ONLY}")),
        ("cuda", None) => Ok((ExecDevice::Cuda, "cuda".into())),
        (other, _) => Err(format!("unknown device {other:?}; use cpu, cuda, auto or emu")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_there_and_bad_names_are_named() {
        assert_eq!(choose_device("cpu", true), Ok((ExecDevice::Cpu, "cpu".into())));
        assert!(choose_device("tpu", true).unwrap_err().contains("unknown device \"tpu\""));
        // The emulator is there on every machine, for the commands with a CUDA path.
        assert_eq!(choose_device("emu", true).map(|d| d.0), Ok(ExecDevice::Emu));
        assert!(choose_device("emu", false).unwrap_err().contains("CPU backend only"));
        match no_gpu_reason() {
            // Without a GPU, auto says why it fell back and cuda fails with the reason.
            Some(why) => {
                assert_eq!(choose_device("auto", true), Ok((ExecDevice::Cpu, format!("cpu (auto: {why})"))));
                assert_eq!(choose_device("cuda", true), Err(format!("--device cuda: {why}")));
            }
            None => {
                assert_eq!(choose_device("auto", true).map(|d| d.0), Ok(ExecDevice::Cuda));
                assert!(choose_device("cuda", false).unwrap_err().contains("CPU backend only"));
                assert_eq!(choose_device("auto", false).map(|d| d.0), Ok(ExecDevice::Cpu));
            }
        }
    }
}
