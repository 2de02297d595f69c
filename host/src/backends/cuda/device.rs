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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_there_and_bad_names_are_named() {
        assert_eq!(describe_device("cpu").as_deref(), Ok("cpu"));
        assert!(describe_device("tpu").unwrap_err().contains("unknown device \"tpu\""));
        match no_gpu_reason() {
            // Without a GPU, auto says why it fell back and cuda fails with the reason.
            Some(why) => {
                assert_eq!(describe_device("auto"), Ok(format!("cpu (auto: {why})")));
                assert_eq!(describe_device("cuda"), Err(format!("--device cuda: {why}")));
            }
            None => assert!(describe_device("cuda").unwrap_err().contains("not written yet")),
        }
    }
}
