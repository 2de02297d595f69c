//! NVTX ranges, so that an Nsight Systems (`nsys`) user sees a step's phases (schedule,
//! prepare, forward and its layers, sample, update) on the timeline beside the kernels.
//!
//! The library is loaded at run time (`libnvToolsExt.so.1`, or the file `$WEAVE_NVTX_LIB`
//! names), the way cudarc loads the driver: nothing CUDA is needed to build weave, and where
//! the library is absent every range is a no-op. Ranges are on only when asked for
//! ([`enable`]: `--nvtx`, or `WEAVE_NVTX=1`), so a run that is not profiled pays one atomic
//! load per range.

use std::ffi::{c_char, c_int, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

type Push = unsafe extern "C" fn(*const c_char) -> c_int;
type Pop = unsafe extern "C" fn() -> c_int;

struct Lib {
    push: Push,
    pop: Pop,
    _lib: libloading::Library,
}

static ON: AtomicBool = AtomicBool::new(false);
static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();

/// The library's file names, in the order tried.
fn candidates() -> Vec<String> {
    let mut v: Vec<String> = std::env::var("WEAVE_NVTX_LIB").ok().filter(|s| !s.is_empty()).into_iter().collect();
    v.extend(["libnvToolsExt.so.1", "libnvToolsExt.so"].map(String::from));
    v
}

fn load() -> Result<Lib, String> {
    let mut errs = Vec::new();
    for name in candidates() {
        // SAFETY: loading NVTX runs its (trivial) initialisers; the symbols are C functions
        // of the types NVTX's header gives them.
        match unsafe { libloading::Library::new(&name) } {
            Ok(lib) => unsafe {
                let push = *lib.get::<Push>(b"nvtxRangePushA\0").map_err(|e| format!("{name}: {e}"))?;
                let pop = *lib.get::<Pop>(b"nvtxRangePop\0").map_err(|e| format!("{name}: {e}"))?;
                return Ok(Lib { push, pop, _lib: lib });
            },
            Err(e) => errs.push(format!("{name}: {e}")),
        }
    }
    Err(errs.join("; "))
}

/// Turns ranges on. Returns why they will be no-ops, when the library cannot be loaded.
pub fn enable() -> Result<(), String> {
    ON.store(true, Ordering::Relaxed);
    match LIB.get_or_init(load) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("NVTX library not found, ranges are no-ops ({e})")),
    }
}

/// Whether ranges are on (`enable`, or `WEAVE_NVTX=1` in the environment).
pub fn enabled() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    ON.load(Ordering::Relaxed)
        || *ENV.get_or_init(|| {
            let on = std::env::var("WEAVE_NVTX").is_ok_and(|v| v == "1");
            if on {
                ON.store(true, Ordering::Relaxed);
            }
            on
        })
}

/// A range open until the guard drops.
#[derive(Debug)]
#[must_use = "the range closes when this guard drops"]
pub struct Range(bool);

/// Opens the range `name` (a no-op when ranges are off or the library is absent).
pub fn range(name: &CStr) -> Range {
    if !enabled() {
        return Range(false);
    }
    match LIB.get_or_init(load) {
        Ok(l) => {
            // SAFETY: `name` is a NUL-terminated string that outlives the call.
            unsafe { (l.push)(name.as_ptr()) };
            Range(true)
        }
        Err(_) => Range(false),
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        if self.0 {
            if let Some(Ok(l)) = LIB.get() {
                // SAFETY: pops the range this guard pushed.
                unsafe { (l.pop)() };
            }
        }
    }
}

/// `layer N` names for per-layer ranges, made once.
pub fn layer_name(l: usize) -> &'static CStr {
    static NAMES: OnceLock<Vec<std::ffi::CString>> = OnceLock::new();
    let names = NAMES.get_or_init(|| (0..256).map(|i| std::ffi::CString::new(format!("layer {i}")).unwrap()).collect());
    names.get(l).map_or(c"layer", |c| c.as_c_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_without_the_library_are_no_ops_and_say_why() {
        // No such file: enabling says so, and ranges still open and close.
        std::env::set_var("WEAVE_NVTX_LIB", "/nonexistent/libnvToolsExt.so.1");
        if let Err(e) = enable() {
            assert!(e.contains("/nonexistent/libnvToolsExt.so.1"), "{e}");
            let r = range(c"forward");
            assert!(!r.0);
        }
        assert!(enabled());
        assert_eq!(layer_name(3).to_str().unwrap(), "layer 3");
        assert_eq!(layer_name(10_000).to_str().unwrap(), "layer");
    }
}
