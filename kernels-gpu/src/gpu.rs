//! The target seam: the only module that knows which machine runs a kernel. Kernel bodies
//! use these functions and pointer handles. On nvptx they inline to the intrinsics, loads and
//! stores the kernels used directly before (the PTX does not change); on the host they run
//! under weave-simt, which checks barriers, warp masks, shared-memory races and every
//! access's bounds.
//!
//! [`kernel!`](macro@crate::kernel) gives a kernel its PTX entry point and, on the host, a module of
//! the same name with `launch(&Launch, args...)`.
//!
//! Ported so far: the norm family ([`crate::kernels::norm`]). The other kernels still live in
//! `device.rs` (nvptx only) until their port.

use core::marker::PhantomData;

#[cfg(target_arch = "nvptx64")]
mod imp {
    use core::arch::nvptx::*;

    unsafe extern "C" {
        #[link_name = "llvm.nvvm.shfl.sync.bfly.f32"]
        fn shfl_bfly_f32(mask: u32, v: f32, lane_mask: u32, clamp: u32) -> f32;
    }

    #[inline(always)]
    pub fn tid() -> u32 {
        unsafe { _thread_idx_x() as u32 }
    }
    #[inline(always)]
    pub fn bx() -> u32 {
        unsafe { _block_idx_x() as u32 }
    }
    #[inline(always)]
    pub fn sync_threads() {
        unsafe { _syncthreads() }
    }
    #[inline(always)]
    pub fn shfl_xor_f32(mask: u32, v: f32, lane_mask: u32) -> f32 {
        unsafe { shfl_bfly_f32(mask, v, lane_mask, 0x1f) }
    }
    /// Generic address of the dynamic shared memory (`WEAVE_SMEM`, declared in device.rs).
    #[inline(always)]
    pub fn smem_base() -> *mut u8 {
        let p: u64;
        unsafe { core::arch::asm!("cvta.shared.u64 {p}, WEAVE_SMEM;", p = out(reg64) p) };
        p as *mut u8
    }
}

#[cfg(not(target_arch = "nvptx64"))]
mod imp {
    pub fn tid() -> u32 {
        weave_simt::thread_idx().x
    }
    pub fn bx() -> u32 {
        weave_simt::block_idx().x
    }
    #[track_caller]
    pub fn sync_threads() {
        weave_simt::sync_threads()
    }
    #[track_caller]
    pub fn shfl_xor_f32(mask: u32, v: f32, lane_mask: u32) -> f32 {
        weave_simt::shfl_xor_f32(mask, v, lane_mask)
    }
}

pub use imp::*;

/// All 32 lanes.
pub const FULL: u32 = 0xffff_ffff;

/// A pointer to global memory. On nvptx a bare pointer; on the host each access is checked
/// against the launch's buffers.
#[repr(transparent)]
#[derive(Debug)]
pub struct Global<T>(*mut T);

impl<T> Clone for Global<T> {
    #[inline(always)]
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Global<T> {}

impl<T: Copy> Global<T> {
    #[inline(always)]
    pub fn new(p: *const T) -> Global<T> {
        Global(p as *mut T)
    }
    /// `n` elements on.
    ///
    /// # Safety
    /// As `pointer::add`: the result stays inside the buffer.
    #[inline(always)]
    pub unsafe fn add(self, n: usize) -> Global<T> {
        Global(unsafe { self.0.add(n) })
    }
    /// # Safety
    /// The pointer is valid to read on the device.
    #[inline(always)]
    #[track_caller]
    pub unsafe fn read(self) -> T {
        #[cfg(target_arch = "nvptx64")]
        return unsafe { *self.0 };
        #[cfg(not(target_arch = "nvptx64"))]
        return unsafe { weave_simt::ld(self.0) };
    }
    /// # Safety
    /// The pointer is valid to write on the device, and no other thread writes it.
    #[inline(always)]
    #[track_caller]
    pub unsafe fn write(self, v: T) {
        #[cfg(target_arch = "nvptx64")]
        unsafe {
            *self.0 = v
        };
        #[cfg(not(target_arch = "nvptx64"))]
        unsafe {
            weave_simt::st(self.0, v)
        };
    }
}

/// A pointer into the block's dynamic shared memory. On nvptx a generic address; on the host
/// a byte offset whose every access the emulator checks (bounds, poison, races).
#[derive(Debug)]
pub struct Shared<T> {
    #[cfg(target_arch = "nvptx64")]
    p: *mut T,
    #[cfg(not(target_arch = "nvptx64"))]
    off: usize,
    _t: PhantomData<T>,
}

impl<T> Clone for Shared<T> {
    #[inline(always)]
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Shared<T> {}

impl<T: Copy> Shared<T> {
    /// The start of the dynamic shared memory, as `T`s.
    #[inline(always)]
    pub fn base() -> Shared<T> {
        #[cfg(target_arch = "nvptx64")]
        return Shared { p: imp::smem_base() as *mut T, _t: PhantomData };
        #[cfg(not(target_arch = "nvptx64"))]
        return Shared { off: 0, _t: PhantomData };
    }
    /// `n` elements on.
    ///
    /// # Safety
    /// As `pointer::add`: the result stays inside the launch's shared memory.
    #[inline(always)]
    pub unsafe fn add(self, n: usize) -> Shared<T> {
        #[cfg(target_arch = "nvptx64")]
        return Shared { p: unsafe { self.p.add(n) }, _t: PhantomData };
        #[cfg(not(target_arch = "nvptx64"))]
        return Shared { off: self.off + n * core::mem::size_of::<T>(), _t: PhantomData };
    }
    /// # Safety
    /// Inside the launch's shared memory, written before (and ordered by a barrier).
    #[inline(always)]
    #[track_caller]
    pub unsafe fn read(self) -> T {
        #[cfg(target_arch = "nvptx64")]
        return unsafe { *self.p };
        #[cfg(not(target_arch = "nvptx64"))]
        return weave_simt::smem_read::<T>(self.off);
    }
    /// # Safety
    /// Inside the launch's shared memory; no other thread touches it before the next barrier.
    #[inline(always)]
    #[track_caller]
    pub unsafe fn write(self, v: T) {
        #[cfg(target_arch = "nvptx64")]
        unsafe {
            *self.p = v
        };
        #[cfg(not(target_arch = "nvptx64"))]
        weave_simt::smem_write::<T>(self.off, v);
    }
}

/// One kernel, written once: `kernel!(fn name(arg: Type, ...) { body })` gives the PTX entry
/// point `name` on nvptx and, on the host, `name::launch(&weave_simt::Launch, args...)`,
/// which runs the same body under the emulator. Arguments are raw pointers and scalars, as a
/// kernel's parameters are.
#[macro_export]
macro_rules! kernel {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),* $(,)?) { $($body:tt)* }) => {
        $(#[$m])*
        #[cfg(target_arch = "nvptx64")]
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name($($a: $t),*) {
            unsafe { $($body)* }
        }

        $(#[$m])*
        #[cfg(not(target_arch = "nvptx64"))]
        #[allow(non_snake_case)]
        pub mod $name {
            #[allow(unused_imports)]
            use super::*;
            /// Runs the kernel under the SIMT emulator: every thread of every block of `l`.
            #[allow(clippy::too_many_arguments)]
            pub fn launch(l: &weave_simt::Launch, $($a: $t),*) -> Result<weave_simt::Stats, weave_simt::EmuError> {
                #[derive(Clone, Copy)]
                struct Args { $($a: $t),* }
                // SAFETY: the pointers go to the device code, which shares them between
                // threads as a GPU does; the emulator checks every access through them.
                unsafe impl Sync for Args {}
                impl Args {
                    // A method call makes the closure capture the whole (Sync) struct, not
                    // its bare pointer fields.
                    fn get(&self) -> Args {
                        *self
                    }
                }
                let args = Args { $($a),* };
                weave_simt::launch(l, || {
                    let Args { $($a),* } = args.get();
                    unsafe { $($body)* }
                })
            }
        }
    };
}
