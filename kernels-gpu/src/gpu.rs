//! The target seam: the only module that knows which machine runs a kernel. Kernel bodies
//! use these functions and pointer handles. On nvptx they inline to the intrinsics, loads and
//! stores the kernels used directly before (the PTX does not change); on the host they run
//! under weave-simt, which checks barriers, warp masks, shared-memory races and every
//! access's bounds.
//!
//! [`kernel!`](macro@crate::kernel) gives a kernel its PTX entry point and, on the host, a module of
//! the same name with `launch(&Launch, args...)`.
//!
//! Every kernel is written over it ([`crate::kernels`]); nothing else in the crate uses an
//! intrinsic or inline PTX.

use crate::elem::Elem;
use crate::kernel::Dtype;
use core::marker::PhantomData;

#[cfg(target_arch = "nvptx64")]
mod imp {
    use core::arch::nvptx::*;

    unsafe extern "C" {
        #[link_name = "llvm.nvvm.shfl.sync.bfly.f32"]
        fn shfl_bfly_f32(mask: u32, v: f32, lane_mask: u32, clamp: u32) -> f32;
        #[link_name = "llvm.nvvm.shfl.sync.bfly.i32"]
        fn shfl_bfly_i32(mask: u32, v: i32, lane_mask: u32, clamp: u32) -> i32;
        #[link_name = "llvm.nvvm.shfl.sync.idx.f32"]
        fn shfl_idx(mask: u32, v: f32, lane: u32, clamp: u32) -> f32;
    }

    // The block's dynamic shared memory, sized by each launch.
    core::arch::global_asm!(".extern .shared .align 16 .b8 WEAVE_SMEM[];");

    #[inline(always)]
    pub fn tid() -> u32 {
        unsafe { _thread_idx_x() as u32 }
    }
    #[inline(always)]
    pub fn bx() -> u32 {
        unsafe { _block_idx_x() as u32 }
    }
    #[inline(always)]
    pub fn by() -> u32 {
        unsafe { _block_idx_y() as u32 }
    }
    #[inline(always)]
    pub fn bz() -> u32 {
        unsafe { _block_idx_z() as u32 }
    }
    #[inline(always)]
    pub fn grid_dim_x() -> u32 {
        unsafe { _grid_dim_x() as u32 }
    }
    #[inline(always)]
    pub fn sync_threads() {
        unsafe { _syncthreads() }
    }
    #[inline(always)]
    pub fn shfl_xor_f32(mask: u32, v: f32, lane_mask: u32) -> f32 {
        unsafe { shfl_bfly_f32(mask, v, lane_mask, 0x1f) }
    }
    #[inline(always)]
    pub fn shfl_xor_u32(mask: u32, v: u32, lane_mask: u32) -> u32 {
        unsafe { shfl_bfly_i32(mask, v as i32, lane_mask, 0x1f) as u32 }
    }
    #[inline(always)]
    pub fn shfl_idx_f32(mask: u32, v: f32, src: u32) -> f32 {
        unsafe { shfl_idx(mask, v, src, 0x1f) }
    }
    /// Generic address of the dynamic shared memory.
    #[inline(always)]
    pub fn smem_base() -> *mut u8 {
        let p: u64;
        unsafe { core::arch::asm!("cvta.shared.u64 {p}, WEAVE_SMEM;", p = out(reg64) p) };
        p as *mut u8
    }
    /// `ld.global.nc.v4.u32`.
    #[inline(always)]
    pub unsafe fn ld_nc_v4(p: *const u32) -> [u32; 4] {
        let (a, b, c, d): (u32, u32, u32, u32);
        unsafe {
            core::arch::asm!(
                "{{ .reg .u64 g; cvta.to.global.u64 g, {p}; ld.global.nc.v4.u32 {{{a}, {b}, {c}, {d}}}, [g]; }}",
                p = in(reg64) p as u64,
                a = out(reg32) a,
                b = out(reg32) b,
                c = out(reg32) c,
                d = out(reg32) d,
            )
        };
        [a, b, c, d]
    }
    /// The shared window's 32-bit address of a generic pointer into shared memory.
    #[inline(always)]
    fn shared_addr(p: *const u8) -> u32 {
        let a: u32;
        unsafe {
            core::arch::asm!(
                "{{ .reg .u64 s; cvta.to.shared.u64 s, {p}; cvt.u32.u64 {a}, s; }}",
                p = in(reg64) p as u64,
                a = out(reg32) a,
            )
        };
        a
    }
    /// `ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16`.
    #[inline(always)]
    pub unsafe fn ldmatrix_x4_at(row: *const u8, trans: bool) -> [u32; 4] {
        let (a, b, c, d): (u32, u32, u32, u32);
        let s = shared_addr(row);
        unsafe {
            if trans {
                core::arch::asm!(
                    "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{{a}, {b}, {c}, {d}}}, [{s}];",
                    s = in(reg32) s, a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
                )
            } else {
                core::arch::asm!(
                    "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{a}, {b}, {c}, {d}}}, [{s}];",
                    s = in(reg32) s, a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
                )
            }
        };
        [a, b, c, d]
    }
    /// `cp.async.cg.shared.global` of 16 bytes.
    #[inline(always)]
    pub unsafe fn cp_async_16_at(dst: *mut u8, src: *const u8) {
        let s = shared_addr(dst);
        unsafe {
            core::arch::asm!(
                "{{ .reg .u64 g; cvta.to.global.u64 g, {src}; cp.async.cg.shared.global [{s}], [g], 16; }}",
                s = in(reg32) s,
                src = in(reg64) src as u64,
            )
        };
    }
    #[inline(always)]
    pub fn cp_async_commit() {
        unsafe { core::arch::asm!("cp.async.commit_group;") };
    }
    #[inline(always)]
    pub fn cp_async_wait_all() {
        unsafe { core::arch::asm!("cp.async.wait_all;") };
    }
    /// `mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{..}.f32`, in place on `d`.
    #[inline(always)]
    pub fn mma_m16n8k16(bf16: bool, d: &mut [f32; 4], a: [u32; 4], b: [u32; 2]) {
        macro_rules! mma {
            ($ty:literal) => {
                unsafe {
                    core::arch::asm!(
                        concat!(
                            "mma.sync.aligned.m16n8k16.row.col.f32.",
                            $ty,
                            ".",
                            $ty,
                            ".f32 {{{d0}, {d1}, {d2}, {d3}}}, {{{a0}, {a1}, {a2}, {a3}}}, {{{b0}, {b1}}}, {{{d0}, {d1}, {d2}, {d3}}};"
                        ),
                        d0 = inout(reg32) d[0],
                        d1 = inout(reg32) d[1],
                        d2 = inout(reg32) d[2],
                        d3 = inout(reg32) d[3],
                        a0 = in(reg32) a[0],
                        a1 = in(reg32) a[1],
                        a2 = in(reg32) a[2],
                        a3 = in(reg32) a[3],
                        b0 = in(reg32) b[0],
                        b1 = in(reg32) b[1],
                    )
                }
            };
        }
        if bf16 {
            mma!("bf16")
        } else {
            mma!("f16")
        }
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
    pub fn by() -> u32 {
        weave_simt::block_idx().y
    }
    pub fn bz() -> u32 {
        weave_simt::block_idx().z
    }
    pub fn grid_dim_x() -> u32 {
        weave_simt::grid_dim().x
    }
    #[track_caller]
    pub fn sync_threads() {
        weave_simt::sync_threads()
    }
    #[track_caller]
    pub fn shfl_xor_f32(mask: u32, v: f32, lane_mask: u32) -> f32 {
        weave_simt::shfl_xor_f32(mask, v, lane_mask)
    }
    #[track_caller]
    pub fn shfl_xor_u32(mask: u32, v: u32, lane_mask: u32) -> u32 {
        weave_simt::shfl_xor(mask, v, lane_mask)
    }
    #[track_caller]
    pub fn shfl_idx_f32(mask: u32, v: f32, src: u32) -> f32 {
        weave_simt::shfl_idx_f32(mask, v, src)
    }
    /// # Safety
    /// As `weave_simt::ld_v4` (checked against the launch's buffers).
    #[track_caller]
    pub unsafe fn ld_nc_v4(p: *const u32) -> [u32; 4] {
        unsafe { weave_simt::ld_v4(p) }
    }
    /// # Safety
    /// None on the host (the emulator checks the offsets); unsafe as on the device.
    #[track_caller]
    pub unsafe fn ldmatrix_x4_at(off: usize, trans: bool) -> [u32; 4] {
        weave_simt::ldmatrix(4, trans, off)
    }
    /// # Safety
    /// As `weave_simt::cp_async` (the source is checked against the launch's buffers).
    #[track_caller]
    pub unsafe fn cp_async_16_at(dst: usize, src: *const u8) {
        unsafe { weave_simt::cp_async(dst, src, 16) }
    }
    #[track_caller]
    pub fn cp_async_commit() {
        weave_simt::cp_async_commit()
    }
    #[track_caller]
    pub fn cp_async_wait_all() {
        weave_simt::cp_async_wait_all()
    }
    #[track_caller]
    pub fn mma_m16n8k16(bf16: bool, d: &mut [f32; 4], a: [u32; 4], b: [u32; 2]) {
        let ty = if bf16 { weave_simt::MmaType::Bf16 } else { weave_simt::MmaType::F16 };
        *d = weave_simt::mma_m16n8k16(ty, a, b, *d);
    }
}

pub use imp::*;

/// All 32 lanes.
pub const FULL: u32 = 0xffff_ffff;

/// `d += a * b` on tensor cores: one m16n8k16 MMA, 16-bit inputs (f16 or bf16 by `T`), f32
/// accumulators. `a` holds the 16x16 row-major fragment, `b` the 16x8 column-major one, in
/// PTX's per-lane layout (the emulator's `mma_m16n8k16` documents it). All 32 lanes take part.
#[inline(always)]
#[track_caller]
pub fn mma_16816<T: Elem>(d: &mut [f32; 4], a: [u32; 4], b: [u32; 2]) {
    imp::mma_m16n8k16(matches!(T::DTYPE, Dtype::Bf16), d, a, b)
}

/// `ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16`: four 8x8 matrices of 16-bit values
/// from shared memory; lane `8i + r` gives (in `row`) matrix `i`'s row `r`, 16 bytes, 16-byte
/// aligned. Lane `l` gets in register `i` matrix `i`'s row `l / 4`, columns `2 (l % 4)` and
/// `+1`; with `trans`, column `l / 4`, rows `2 (l % 4)` and `+1`. All 32 lanes take part.
///
/// # Safety
/// `row` is inside the launch's shared memory, written and ordered by a barrier.
#[inline(always)]
#[track_caller]
pub unsafe fn ldmatrix_x4<T>(row: Shared<T>, trans: bool) -> [u32; 4] {
    #[cfg(target_arch = "nvptx64")]
    return unsafe { imp::ldmatrix_x4_at(row.p as *const u8, trans) };
    #[cfg(not(target_arch = "nvptx64"))]
    return unsafe { imp::ldmatrix_x4_at(row.off, trans) };
}

/// `cp.async.cg.shared.global`: 16 bytes from global to shared memory, asynchronously; they
/// land at [`cp_async_wait_all`] (the emulator holds them back until then, so a read before
/// the wait shows).
///
/// # Safety
/// Both 16-byte aligned and inside their memories; no thread touches `dst` before the wait.
#[inline(always)]
#[track_caller]
pub unsafe fn cp_async_16<T, U>(dst: Shared<T>, src: Global<U>) {
    #[cfg(target_arch = "nvptx64")]
    unsafe {
        imp::cp_async_16_at(dst.p as *mut u8, src.0 as *const u8)
    };
    #[cfg(not(target_arch = "nvptx64"))]
    unsafe {
        imp::cp_async_16_at(dst.off, src.0 as *const u8)
    };
}

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
    /// The same address as a pointer to `U` (a wider or narrower view of the buffer).
    #[inline(always)]
    pub fn cast<U>(self) -> Global<U> {
        Global(self.0 as *mut U)
    }
    /// 16 bytes through the read-only (non-coherent) path: for data no thread of the launch
    /// writes, such as the KV cache during attention.
    ///
    /// # Safety
    /// 16-byte aligned and inside the buffer.
    #[inline(always)]
    #[track_caller]
    pub unsafe fn ld_nc_v4(self) -> [u32; 4] {
        unsafe { imp::ld_nc_v4(self.0 as *const u32) }
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
    /// The same address as `U`s.
    #[inline(always)]
    pub fn cast<U>(self) -> Shared<U> {
        #[cfg(target_arch = "nvptx64")]
        return Shared { p: self.p as *mut U, _t: PhantomData };
        #[cfg(not(target_arch = "nvptx64"))]
        return Shared { off: self.off, _t: PhantomData };
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

/// One kernel argument as a launch passes it, whatever the machine: a device address, or a
/// scalar of the parameter's width. The CUDA backend pushes these to the driver; the emulator
/// turns them back into the kernel's parameter types ([`KernelArg`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    Ptr(u64),
    U32(u32),
    U64(u64),
    F32(f32),
}

/// A kernel parameter type, from its [`Arg`] (host only: the emulator's side of a launch).
#[cfg(not(target_arch = "nvptx64"))]
pub trait KernelArg: Sized {
    /// What the parameter takes, for errors.
    const WHAT: &'static str;
    /// Whether the kernel may write through it (`*mut T`).
    const WRITES: bool;
    fn from_arg(a: Arg) -> Option<Self>;
}

#[cfg(not(target_arch = "nvptx64"))]
mod kernel_args {
    use super::{Arg, KernelArg};
    macro_rules! kernel_arg {
        ([$($g:ident)?] $t:ty, $variant:ident, $what:literal, $writes:literal, |$v:ident| $conv:expr) => {
            impl$(<$g>)? KernelArg for $t {
                const WHAT: &'static str = $what;
                const WRITES: bool = $writes;
                fn from_arg(a: Arg) -> Option<Self> {
                    if let Arg::$variant($v) = a { Some($conv) } else { None }
                }
            }
        };
    }
    kernel_arg!([T] *const T, Ptr, "a pointer", false, |p| p as usize as *const T);
    kernel_arg!([T] *mut T, Ptr, "a pointer", true, |p| p as usize as *mut T);
    kernel_arg!([] u32, U32, "a u32", false, |v| v);
    kernel_arg!([] u64, U64, "a u64", false, |v| v);
    kernel_arg!([] f32, F32, "an f32", false, |v| v);
}

/// One kernel, written once: `kernel!(fn name(arg: Type, ...) { body })` gives the PTX entry
/// point `name` on nvptx and, on the host, `name::launch(&weave_simt::Launch, args...)`,
/// which runs the same body under the emulator. Arguments are raw pointers and scalars, as a
/// kernel's parameters are.
/// The body runs in an unsafe context, as an `unsafe extern "ptx-kernel" fn`'s does: a kernel
/// is device code over raw pointers.
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
            #[allow(clippy::too_many_arguments, clippy::macro_metavars_in_unsafe)]
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

            /// The PTX entry's name.
            pub const NAME: &str = stringify!($name);

            /// Its parameters' names, in order (an emulated launch names its buffers by them).
            pub const PARAMS: &[&str] = &[$(stringify!($a)),*];

            /// Which parameters it may write through (`*mut`), in order.
            pub const WRITES: &[bool] = &[$(<$t as $crate::gpu::KernelArg>::WRITES),*];

            /// [`launch`] from the arguments as a launch passes them ([`crate::gpu::Arg`]),
            /// checked against the kernel's parameters: their number and each one's kind.
            pub fn launch_args(l: &weave_simt::Launch, args: &[$crate::gpu::Arg]) -> Result<weave_simt::Stats, weave_simt::EmuError> {
                let names = PARAMS;
                let bad = |detail: ::std::string::String| weave_simt::EmuError {
                    kind: weave_simt::ErrorKind::BadLaunch,
                    kernel: l.kernel.clone(),
                    block: weave_simt::Dim3::default(),
                    thread: None,
                    detail,
                };
                if args.len() != names.len() {
                    return Err(bad(::std::format!("{} takes {} arguments ({}), the launch gives {}", NAME, names.len(), names.join(", "), args.len())));
                }
                let mut i = 0;
                $(
                    let $a = match <$t as $crate::gpu::KernelArg>::from_arg(args[i]) {
                        Some(v) => v,
                        None => return Err(bad(::std::format!(
                            "{}'s parameter {} `{}` takes {}, the launch gives {:?}",
                            NAME, i, stringify!($a), <$t as $crate::gpu::KernelArg>::WHAT, args[i]
                        ))),
                    };
                    i += 1;
                )*
                let _ = i;
                launch(l, $($a),*)
            }
        }
    };
}
