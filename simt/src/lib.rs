//! weave-simt: a SIMT emulator on the CPU, so that weave's GPU kernels can be run and checked
//! in `cargo test` on a machine without a GPU (issue 19; see ARCHITECTURE.md, "One kernel
//! source, two machines").
//!
//! **Owns**: running a grid of thread blocks, each block's threads as stackful coroutines
//! (`corosensei`) on one OS thread, blocks spread over the cores; the device-side operations a
//! kernel needs from the hardware, each checked as strictly as the hardware's rules allow:
//! - `sync_threads`: releases when every live thread of the block has reached it; threads
//!   waiting at different barrier sites are a divergent barrier, named with both sites;
//! - warp collectives (`shfl_sync` in four modes, `sync_warp`): the warp's lanes park and the
//!   result is computed once for the group; every lane of the member mask must arrive at the
//!   same operation with the same mask, and a lane's own bit must be in its mask;
//! - dynamic shared memory (words of 32 bits): starts poisoned (a NaN pattern); reading a word
//!   no thread wrote is an error (CUDA's initcheck), and two threads touching one word between
//!   two barriers, one of them writing, is a race (racecheck), unless they are lanes of one warp
//!   and a warp collective came between them; every access is bounds-checked;
//! - tensor-core and copy operations as the PTX ISA defines them: [`mma_m16n8k16`] (f16/bf16
//!   in, f32 accumulators) and [`ldmatrix`] (x1/x2/x4, `.trans`) as warp collectives over the
//!   documented fragment layouts, so a kernel that puts a value in the wrong register gets
//!   wrong numbers; [`cp_async`] whose data lands in shared memory only at its
//!   [`cp_async_wait`]; 16-byte read-only loads ([`ld_v4`]);
//! - global memory through [`ld`]/[`st`]: every access must fall inside one of the buffers
//!   the launch registered, aligned for its type (memcheck).
//!
//! A lane order switch ([`Checks::reverse_lanes`]) runs each warp's lanes last to first, so
//! code that leans on an order no hardware promises gives other results. Every error names the
//! kernel, the block, the thread, the address or site, and both accesses of a race.
//!
//! **Must not**: know weave's kernels, allocate device memory, or be needed on the GPU: the
//! kernels reach it through kernels-gpu's `gpu` seam on the host only, and on nvptx they use
//! the hardware's intrinsics.
//!
//! Kernels reach it through kernels-gpu's `gpu` seam (the norm family so far); a conformance
//! kernel that checks this model of the hardware on a real GPU is still to come.

use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, CoroutineResult, Yielder};
use std::cell::{Cell, RefCell};
use std::fmt;
use std::panic::{self, AssertUnwindSafe, Location};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Lanes in a warp.
pub const WARP: u32 = 32;
/// Each emulated thread's stack. Kernels keep their state in registers-as-locals, a few KiB.
const STACK_BYTES: usize = 64 * 1024;
/// What a never-written shared word holds: a quiet NaN with a recognizable payload.
pub const POISON: u32 = 0x7fc0_dead;

/// A grid or block size, or an index into one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

impl Dim3 {
    pub const fn new(x: u32, y: u32, z: u32) -> Dim3 {
        Dim3 { x, y, z }
    }
    /// `(x, 1, 1)`.
    pub const fn x(x: u32) -> Dim3 {
        Dim3 { x, y: 1, z: 1 }
    }
    pub fn count(self) -> usize {
        self.x as usize * self.y as usize * self.z as usize
    }
    /// The index of linear position `i` in a space of these dimensions (x fastest).
    fn at(self, i: usize) -> Dim3 {
        let (x, y) = (self.x as usize, self.y as usize);
        Dim3 { x: (i % x) as u32, y: ((i / x) % y) as u32, z: (i / (x * y)) as u32 }
    }
}

impl fmt::Display for Dim3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {}, {})", self.x, self.y, self.z)
    }
}

/// Which checks a launch runs. All are on by default, as in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checks {
    /// A read of a shared word no thread wrote is an error (else it reads [`POISON`]).
    pub uninit_reads: bool,
    /// Two threads on one shared word between barriers, one writing, is an error.
    pub races: bool,
    /// Run each warp's lanes from 31 down to 0.
    pub reverse_lanes: bool,
}

impl Default for Checks {
    fn default() -> Checks {
        Checks { uninit_reads: true, races: true, reverse_lanes: false }
    }
}

/// A global buffer a launch may touch: `[start, start + len)` in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub name: &'static str,
    pub start: usize,
    pub len: usize,
}

/// One kernel launch: its name (for errors), grid, block, dynamic shared memory, the global
/// buffers it may touch, and the checks.
#[derive(Debug, Clone)]
pub struct Launch {
    pub kernel: String,
    pub grid: Dim3,
    pub block: Dim3,
    pub smem_bytes: usize,
    pub buffers: Vec<Buffer>,
    pub checks: Checks,
}

impl Launch {
    pub fn new(kernel: &str, grid: Dim3, block: Dim3) -> Launch {
        Launch {
            kernel: kernel.to_string(),
            grid,
            block,
            smem_bytes: 0,
            buffers: Vec::new(),
            checks: Checks::default(),
        }
    }
    pub fn smem(mut self, bytes: usize) -> Launch {
        self.smem_bytes = bytes;
        self
    }
    /// Lets the kernel touch `data` (read or write) through [`ld`]/[`st`].
    pub fn buffer<T>(mut self, name: &'static str, data: &[T]) -> Launch {
        self.buffers.push(Buffer { name, start: data.as_ptr() as usize, len: std::mem::size_of_val(data) });
        self
    }
    pub fn checks(mut self, checks: Checks) -> Launch {
        self.checks = checks;
        self
    }
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Threads of one block wait at different `sync_threads` sites.
    DivergentBarrier,
    /// A lane of a `.sync` warp operation's member mask did not join it (exited, waits at a
    /// barrier, or runs another warp operation), or a lane is missing from its own mask.
    WarpMask,
    /// Two threads touched one shared word between barriers, at least one writing.
    SharedRace,
    /// A read of a shared word no thread wrote.
    UninitRead,
    /// A shared or global access outside what the launch has.
    OutOfBounds,
    /// A global access not aligned for its type.
    Misaligned,
    /// No thread can go on, and no rule above names why.
    Deadlock,
    /// The kernel panicked (an assertion in the kernel, an arithmetic overflow, ...).
    Panic,
    /// The launch itself is wrong: its arguments do not match the kernel's parameters.
    BadLaunch,
}

/// An error, naming where it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmuError {
    pub kind: ErrorKind,
    pub kernel: String,
    pub block: Dim3,
    /// The thread that hit it, where one did.
    pub thread: Option<Dim3>,
    pub detail: String,
}

impl fmt::Display for EmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} in kernel {} block {}", self.kind, self.kernel, self.block)?;
        if let Some(t) = self.thread {
            write!(f, " thread {t}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

impl std::error::Error for EmuError {}

/// What a launch did: for throughput figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub blocks: u64,
    pub threads: u64,
    /// Coroutine resumes.
    pub switches: u64,
    /// Barriers released (per block).
    pub barriers: u64,
    /// Warp collectives resolved (per group).
    pub warp_ops: u64,
}

// ------------------------------------------------------------------ the device side

/// Where a parked thread waits.
#[derive(Debug, Clone, Copy)]
enum Park {
    Barrier(&'static Location<'static>),
    Warp(WarpReq),
}

/// A 16-bit floating-point type of `mma.sync`'s inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmaType {
    F16,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WarpKind {
    ShflBfly,
    ShflIdx,
    ShflUp,
    ShflDown,
    Sync,
    /// `mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32`.
    Mma(MmaType),
    /// `ldmatrix.sync.aligned.m8n8.x{n}{.trans}.shared.b16`.
    LdMatrix {
        num: u32,
        trans: bool,
    },
}

/// A warp collective a lane waits at. Its operands are in the block's per-lane registers
/// (`BlockEmu::io`), where the result goes too.
#[derive(Debug, Clone, Copy)]
struct WarpReq {
    kind: WarpKind,
    mask: u32,
    arg: u32,
    site: &'static Location<'static>,
}

/// The race check's unit of shared memory: two bytes, the smallest access weave's kernels
/// make (so two threads writing the two halves of one word do not conflict, as on the GPU).
const UNIT: usize = 2;

/// One shared unit's access record, for the race check.
#[derive(Debug, Clone, Copy)]
struct Shadow {
    written: bool,
    /// Last writer: thread, block epoch, and that thread's warp epoch at the write.
    w_tid: u32,
    w_epoch: u32,
    w_wepoch: u32,
    w_site: Option<&'static Location<'static>>,
    /// Readers in `r_epoch`: one thread, or `u32::MAX` for several.
    r_tid: u32,
    r_epoch: u32,
    r_wepoch: u32,
    r_site: Option<&'static Location<'static>>,
}

const NO_EPOCH: u32 = u32::MAX;

impl Shadow {
    const FRESH: Shadow = Shadow {
        written: false,
        w_tid: 0,
        w_epoch: NO_EPOCH,
        w_wepoch: 0,
        w_site: None,
        r_tid: 0,
        r_epoch: NO_EPOCH,
        r_wepoch: 0,
        r_site: None,
    };
}

/// An asynchronous copy issued and not yet landed.
#[derive(Debug, Clone)]
struct AsyncCopy {
    /// Commit group; `u32::MAX` while uncommitted.
    group: u32,
    dst: usize,
    data: [u8; 16],
    len: usize,
    site: &'static Location<'static>,
}

/// The block being run on this OS thread.
struct BlockEmu {
    launch: *const Launch,
    block: Dim3,
    smem: Vec<u8>,
    shadow: Vec<Shadow>,
    /// Barriers released so far in this block.
    epoch: u32,
    /// Warp collectives resolved so far, per warp.
    warp_epoch: Vec<u32>,
    /// Each thread's yielder, set when its coroutine starts.
    yielders: Vec<*const Yielder<u32, Park>>,
    /// Each thread's operand and result registers for warp collectives.
    io: Vec<[u32; 16]>,
    /// Each thread's `cp.async` copies in flight, and its next commit group.
    copies: Vec<Vec<AsyncCopy>>,
    next_group: Vec<u32>,
}

thread_local! {
    static EMU: RefCell<Option<BlockEmu>> = const { RefCell::new(None) };
    static CUR: Cell<u32> = const { Cell::new(0) };
}

fn with_emu<R>(f: impl FnOnce(&mut BlockEmu) -> R) -> R {
    EMU.with(|e| {
        let mut e = e.borrow_mut();
        f(e.as_mut().expect("a weave-simt device function was called outside an emulated launch"))
    })
}

fn launch_of<'a>(e: &BlockEmu) -> &'a Launch {
    // SAFETY: `launch` points at the `Launch` that `launch()` borrows for as long as the
    // block runs; the pointer is cleared (the `BlockEmu` dropped) before it returns, and no
    // reference from here outlives the device function that took it.
    unsafe { &*e.launch }
}

/// Stops the current thread with an error; the scheduler turns it into the launch's result.
fn fail(kind: ErrorKind, detail: String) -> ! {
    let err = with_emu(|e| EmuError {
        kind,
        kernel: launch_of(e).kernel.clone(),
        block: e.block,
        thread: Some(launch_of(e).block.at(CUR.get() as usize)),
        detail,
    });
    // An unwind without the panic hook: the error reaches the launch's result, and the test
    // output shows it once, not also as a thread's panic message.
    panic::resume_unwind(Box::new(err))
}

fn park(p: Park) {
    let y = with_emu(|e| e.yielders[CUR.get() as usize]);
    // SAFETY: the yielder belongs to the running coroutine (set when it started, on this OS
    // thread) and lives as long as it does; no `EMU` borrow is held across the switch.
    unsafe { (*y).suspend(p) };
}

/// This thread's index in its block.
pub fn thread_idx() -> Dim3 {
    with_emu(|e| launch_of(e).block.at(CUR.get() as usize))
}
/// This block's index in the grid.
pub fn block_idx() -> Dim3 {
    with_emu(|e| e.block)
}
pub fn block_dim() -> Dim3 {
    with_emu(|e| launch_of(e).block)
}
pub fn grid_dim() -> Dim3 {
    with_emu(|e| launch_of(e).grid)
}
/// This thread's lane in its warp (threads are numbered x fastest, as on the GPU).
pub fn lane_id() -> u32 {
    CUR.get() % WARP
}

/// `__syncthreads()`.
#[track_caller]
pub fn sync_threads() {
    park(Park::Barrier(Location::caller()));
}

/// Parks this lane at a warp collective with `operands` in its registers; its results.
#[track_caller]
fn warp_op(kind: WarpKind, mask: u32, arg: u32, operands: &[u32]) -> [u32; 16] {
    let lane = lane_id();
    if mask & (1 << lane) == 0 {
        fail(
            ErrorKind::WarpMask,
            format!(
                "lane {lane} runs a .sync warp operation at {} whose member mask {mask:#010x} leaves it out",
                Location::caller()
            ),
        );
    }
    let t = CUR.get() as usize;
    with_emu(|e| e.io[t][..operands.len()].copy_from_slice(operands));
    park(Park::Warp(WarpReq { kind, mask, arg, site: Location::caller() }));
    with_emu(|e| e.io[t])
}

/// `shfl.sync.bfly.b32`: the value of lane `lane ^ lane_mask`.
#[track_caller]
pub fn shfl_xor(mask: u32, value: u32, lane_mask: u32) -> u32 {
    warp_op(WarpKind::ShflBfly, mask, lane_mask, &[value])[0]
}
/// `shfl.sync.idx.b32`: the value of lane `src & 31`.
#[track_caller]
pub fn shfl_idx(mask: u32, value: u32, src: u32) -> u32 {
    warp_op(WarpKind::ShflIdx, mask, src, &[value])[0]
}
/// `shfl.sync.up.b32`: the value of lane `lane - delta`, or the lane's own below 0.
#[track_caller]
pub fn shfl_up(mask: u32, value: u32, delta: u32) -> u32 {
    warp_op(WarpKind::ShflUp, mask, delta, &[value])[0]
}
/// `shfl.sync.down.b32`: the value of lane `lane + delta`, or the lane's own past 31.
#[track_caller]
pub fn shfl_down(mask: u32, value: u32, delta: u32) -> u32 {
    warp_op(WarpKind::ShflDown, mask, delta, &[value])[0]
}
#[track_caller]
pub fn shfl_xor_f32(mask: u32, value: f32, lane_mask: u32) -> f32 {
    f32::from_bits(shfl_xor(mask, value.to_bits(), lane_mask))
}
#[track_caller]
pub fn shfl_idx_f32(mask: u32, value: f32, src: u32) -> f32 {
    f32::from_bits(shfl_idx(mask, value.to_bits(), src))
}
/// `__syncwarp(mask)`.
#[track_caller]
pub fn sync_warp(mask: u32) {
    warp_op(WarpKind::Sync, mask, 0, &[]);
}

/// `mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 d, a, b, c`: the whole warp computes
/// D (16x8, f32) = A (16x16) * B (16x8) + C. Each lane passes and gets its fragments in the
/// layouts of the PTX ISA, section "Matrix Fragments for mma.m16n8k16 with floating point
/// type" (9.7.14.5.8 in ISA 8.x): with `g = lane / 4` and `t = lane % 4`,
/// - `a[r]` holds A's row `g + 8 (r & 1)`, columns `2t + 8 (r >> 1)` and `+1` (low half first);
/// - `b[r]` holds B's column `g`, rows `2t + 8r` and `+1`;
/// - `c[i]` and the result's `[i]` are row `g + 8 (i >> 1)`, column `2t + (i & 1)`.
#[track_caller]
pub fn mma_m16n8k16(ty: MmaType, a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4] {
    let ops = [a[0], a[1], a[2], a[3], b[0], b[1], c[0].to_bits(), c[1].to_bits(), c[2].to_bits(), c[3].to_bits()];
    let r = warp_op(WarpKind::Mma(ty), u32::MAX, 0, &ops);
    [f32::from_bits(r[0]), f32::from_bits(r[1]), f32::from_bits(r[2]), f32::from_bits(r[3])]
}

/// `ldmatrix.sync.aligned.m8n8.x{num}{.trans}.shared.b16`: `num` (1, 2 or 4) 8x8 matrices of
/// 16-bit values from shared memory, lane `8i + r` giving the byte offset of matrix `i`'s row
/// `r` (16 bytes, 16-byte aligned). Lane `l` gets in its register `i` matrix `i`'s row `l / 4`,
/// columns `2 (l % 4)` and `+1` (PTX ISA, "Warp-level matrix load instruction: ldmatrix");
/// with `trans`, column `l / 4`, rows `2 (l % 4)` and `+1`. Registers past `num` are 0.
#[track_caller]
pub fn ldmatrix(num: u32, trans: bool, row_offset: usize) -> [u32; 4] {
    assert!(matches!(num, 1 | 2 | 4), "ldmatrix takes 1, 2 or 4 matrices, not {num}");
    let r = warp_op(WarpKind::LdMatrix { num, trans }, u32::MAX, 0, &[row_offset as u32]);
    [r[0], r[1], r[2], r[3]]
}

/// Checks (and records, for the race check) thread `t`'s access of `size` shared bytes at
/// byte `off`.
fn smem_check(
    e: &mut BlockEmu,
    t: u32,
    off: usize,
    size: usize,
    write: bool,
    site: &'static Location<'static>,
) -> Result<(), (ErrorKind, String)> {
    let l = launch_of(e);
    let what = if write { "write" } else { "read" };
    if off + size > e.smem.len() {
        return Err((
            ErrorKind::OutOfBounds,
            format!(
                "shared {what} of bytes [{off}, {}) at {site}, past the launch's {} bytes",
                off + size,
                l.smem_bytes
            ),
        ));
    }
    if size % UNIT != 0 || off % size.min(16) != 0 {
        return Err((
            ErrorKind::Misaligned,
            format!("shared {what} of {size} bytes at byte {off} ({site}) is not aligned to its size"),
        ));
    }
    let (checks, epoch, wepoch) = (l.checks, e.epoch, e.warp_epoch[(t / WARP) as usize]);
    let who = |tid: u32| format!("thread {}", l.block.at(tid as usize));
    let at = |x: Option<&'static Location<'static>>| x.map_or("?".to_string(), |x| x.to_string());
    // Formatted only for an error: this loop runs on every shared access.
    let bytes = |u: usize| format!("bytes [{}, {})", u * UNIT, u * UNIT + UNIT);
    for u in off / UNIT..(off + size) / UNIT {
        let s = &mut e.shadow[u];
        if !write && checks.uninit_reads && !s.written {
            return Err((
                ErrorKind::UninitRead,
                format!("shared {} read at {site} before any thread wrote them", bytes(u)),
            ));
        }
        if checks.races {
            let wrote_other = s.w_epoch == epoch && s.w_tid != t && !synced(s.w_tid, s.w_wepoch, t, wepoch);
            if wrote_other {
                let kind = if write { "write-after-write" } else { "read-after-write" };
                return Err((
                    ErrorKind::SharedRace,
                    format!(
                        "{kind} race on shared {}: {} wrote them at {} and {} {what}s them at {site} with no barrier between",
                        bytes(u),
                        who(s.w_tid),
                        at(s.w_site),
                        who(t)
                    ),
                ));
            }
            let read_other = s.r_epoch == epoch && s.r_tid != t;
            if write && read_other && (s.r_tid == u32::MAX || !synced(s.r_tid, s.r_wepoch, t, wepoch)) {
                let readers = if s.r_tid == u32::MAX { "several threads".to_string() } else { who(s.r_tid) };
                return Err((
                    ErrorKind::SharedRace,
                    format!(
                        "write-after-read race on shared {}: {readers} read them (last at {}) and {} writes them at {site} with no barrier between",
                        bytes(u),
                        at(s.r_site),
                        who(t)
                    ),
                ));
            }
        }
        if write {
            *s = Shadow { written: true, w_tid: t, w_epoch: epoch, w_wepoch: wepoch, w_site: Some(site), ..*s };
        } else {
            if s.r_epoch != epoch {
                (s.r_tid, s.r_epoch) = (t, epoch);
            } else if s.r_tid != t {
                s.r_tid = u32::MAX;
            }
            (s.r_wepoch, s.r_site) = (wepoch, Some(site));
        }
    }
    Ok(())
}

/// Reads a `T` (2, 4, 8 or 16 bytes, aligned to its size) at byte `off` of the dynamic
/// shared memory.
#[track_caller]
pub fn smem_read<T: Copy>(off: usize) -> T {
    let (site, t, size) = (Location::caller(), CUR.get(), std::mem::size_of::<T>());
    let r = with_emu(|e| {
        smem_check(e, t, off, size, false, site)?;
        // SAFETY: `off + size` is inside `smem` (checked); any bit pattern is a valid `T`
        // for the plain numeric types kernels keep in shared memory.
        Ok(unsafe { (e.smem.as_ptr().add(off) as *const T).read_unaligned() })
    });
    r.unwrap_or_else(|(k, d)| fail(k, d))
}

/// Writes a `T` at byte `off` of the dynamic shared memory.
#[track_caller]
pub fn smem_write<T: Copy>(off: usize, value: T) {
    let (site, t, size) = (Location::caller(), CUR.get(), std::mem::size_of::<T>());
    let r = with_emu(|e| {
        smem_check(e, t, off, size, true, site)?;
        // SAFETY: inside `smem` (checked).
        unsafe { (e.smem.as_mut_ptr().add(off) as *mut T).write_unaligned(value) };
        Ok(())
    });
    r.unwrap_or_else(|(k, d)| fail(k, d))
}

/// Reads shared word `word` (32 bits at byte `4 word`).
#[track_caller]
pub fn smem_ld(word: usize) -> u32 {
    smem_read::<u32>(word * 4)
}
/// Writes shared word `word`.
#[track_caller]
pub fn smem_st(word: usize, value: u32) {
    smem_write::<u32>(word * 4, value)
}
#[track_caller]
pub fn smem_ld_f32(word: usize) -> f32 {
    smem_read::<f32>(word * 4)
}
#[track_caller]
pub fn smem_st_f32(word: usize, value: f32) {
    smem_write::<f32>(word * 4, value)
}

/// `cp.async.ca.shared.global` of `len` (4, 8 or 16) bytes from global `src` to shared byte
/// `dst`. The source is read (and bounds-checked) now; the shared bytes change only when a
/// [`cp_async_wait`] lands the copy's group, so a kernel that reads them before waiting
/// reads what was there (or poison).
///
/// # Safety
/// As [`ld`].
#[track_caller]
pub unsafe fn cp_async(dst: usize, src: *const u8, len: usize) {
    assert!(matches!(len, 4 | 8 | 16), "cp.async copies 4, 8 or 16 bytes, not {len}");
    check_global(src as usize, len, len, "cp.async read");
    let mut data = [0u8; 16];
    // SAFETY: inside a registered buffer (checked).
    unsafe { std::ptr::copy_nonoverlapping(src, data.as_mut_ptr(), len) };
    let (t, site) = (CUR.get() as usize, Location::caller());
    with_emu(|e| e.copies[t].push(AsyncCopy { group: u32::MAX, dst, data, len, site }));
}

/// `cp.async.commit_group`: the copies issued since the last commit form a group.
pub fn cp_async_commit() {
    let t = CUR.get() as usize;
    with_emu(|e| {
        let g = e.next_group[t];
        e.next_group[t] += 1;
        for c in e.copies[t].iter_mut().filter(|c| c.group == u32::MAX) {
            c.group = g;
        }
    });
}

/// `cp.async.wait_group n`: lands every committed group but the newest `n`, as this thread's
/// writes now.
#[track_caller]
pub fn cp_async_wait(n: u32) {
    let t = CUR.get();
    let r = with_emu(|e| {
        let newest = e.next_group[t as usize];
        let land_below = newest.saturating_sub(n);
        let copies = std::mem::take(&mut e.copies[t as usize]);
        let (land, keep): (Vec<_>, Vec<_>) = copies.into_iter().partition(|c| c.group < land_below);
        e.copies[t as usize] = keep;
        for c in land {
            smem_check(e, t, c.dst, c.len, true, c.site)?;
            e.smem[c.dst..c.dst + c.len].copy_from_slice(&c.data[..c.len]);
        }
        Ok(())
    });
    r.unwrap_or_else(|(k, d)| fail(k, d))
}

/// `cp.async.wait_all`: commits and lands everything.
#[track_caller]
pub fn cp_async_wait_all() {
    cp_async_commit();
    cp_async_wait(0);
}

/// Whether two accesses by lanes of one warp are ordered by a warp collective between them.
fn synced(a_tid: u32, a_wepoch: u32, b_tid: u32, b_wepoch: u32) -> bool {
    a_tid / WARP == b_tid / WARP && b_wepoch > a_wepoch
}

#[track_caller]
fn check_global(addr: usize, size: usize, align: usize, what: &str) {
    let site = Location::caller();
    let r = with_emu(|e| {
        let l = launch_of(e);
        if addr % align != 0 {
            return Err((
                ErrorKind::Misaligned,
                format!("global {what} of {size} bytes at {addr:#x} ({site}) is not {align}-byte aligned"),
            ));
        }
        if l.buffers.iter().any(|b| addr >= b.start && addr + size <= b.start + b.len) {
            return Ok(());
        }
        // The nearest buffer (by distance from its ends): the one an off-by-one or a stale
        // index most likely meant.
        let dist = |b: &Buffer| {
            if addr < b.start {
                b.start - addr
            } else {
                (addr + size).saturating_sub(b.start + b.len)
            }
        };
        let near = match l.buffers.iter().min_by_key(|b| dist(b)) {
            Some(b) => format!(
                "nearest: {} is [{:#x}, {:#x}), {} bytes, the access at offset {}",
                b.name,
                b.start,
                b.start + b.len,
                b.len,
                addr as i128 - b.start as i128
            ),
            None => "the launch registered no buffer".to_string(),
        };
        Err((
            ErrorKind::OutOfBounds,
            format!("global {what} of {size} bytes at {addr:#x} ({site}) is in none of the launch's buffers ({near})"),
        ))
    });
    r.unwrap_or_else(|(k, d)| fail(k, d))
}

/// A checked global load.
///
/// # Safety
/// `p` must be valid to read as on the GPU; the emulator checks it against the launch's
/// buffers first and fails the launch if it is not inside one.
#[track_caller]
pub unsafe fn ld<T: Copy>(p: *const T) -> T {
    check_global(p as usize, std::mem::size_of::<T>(), std::mem::align_of::<T>(), "read");
    // SAFETY: inside a registered buffer and aligned (checked above).
    unsafe { p.read() }
}

/// A checked global store.
///
/// # Safety
/// As [`ld`]; concurrent writes to one address from several blocks are the kernel's race.
#[track_caller]
pub unsafe fn st<T: Copy>(p: *mut T, v: T) {
    check_global(p as usize, std::mem::size_of::<T>(), std::mem::align_of::<T>(), "write");
    // SAFETY: inside a registered buffer and aligned (checked above).
    unsafe { p.write(v) }
}

/// `ld.global.nc.v4.u32`: 16 bytes, 16-byte aligned, through the read-only path.
///
/// # Safety
/// As [`ld`].
#[track_caller]
pub unsafe fn ld_v4(p: *const u32) -> [u32; 4] {
    check_global(p as usize, 16, 16, "16-byte read");
    // SAFETY: inside a registered buffer and aligned (checked above).
    unsafe { (p as *const [u32; 4]).read() }
}

// ------------------------------------------------------------------ the scheduler

#[derive(Debug, Clone, Copy)]
enum State {
    Runnable,
    Parked(Park),
    Done,
}

type Co = Coroutine<u32, Park, (), DefaultStack>;

/// Coroutine stacks kept between launches (at most [`POOL_MAX`]: 64 MiB of address space).
static STACK_POOL: Mutex<Vec<DefaultStack>> = Mutex::new(Vec::new());
const POOL_MAX: usize = 1024;

/// Runs `kernel` once per thread of every block of `l`'s grid; blocks go to the cores in
/// parallel (as a GPU runs them: in no promised order), threads of a block interleave at
/// barriers and warp operations. Returns the first error any block hit.
pub fn launch<F: Fn() + Sync>(l: &Launch, kernel: F) -> Result<Stats, EmuError> {
    let nblocks = l.grid.count();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(nblocks).max(1);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first_err: Mutex<Option<(usize, EmuError)>> = Mutex::new(None);
    let totals = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
    let work = || {
        // Stacks from earlier launches: a model's step makes hundreds of launches, and an
        // mmap and munmap per thread each time cost more than the kernels.
        let mut stacks: Vec<DefaultStack> = {
            let mut pool = STACK_POOL.lock().unwrap_or_else(|p| p.into_inner());
            let keep = pool.len().saturating_sub(l.block.count());
            pool.split_off(keep)
        };
        let mut st = Stats::default();
        loop {
            let b = next.fetch_add(1, Ordering::Relaxed);
            if b >= nblocks || stop.load(Ordering::Relaxed) {
                break;
            }
            if let Err(e) = run_block(l, &kernel, l.grid.at(b), &mut stacks, &mut st) {
                stop.store(true, Ordering::Relaxed);
                let mut g = first_err.lock().unwrap_or_else(|p| p.into_inner());
                // The lowest block's error, so that a failure reads the same run to run.
                if g.as_ref().is_none_or(|(fb, _)| b < *fb) {
                    *g = Some((b, e));
                }
            }
        }
        {
            let mut pool = STACK_POOL.lock().unwrap_or_else(|p| p.into_inner());
            let room = POOL_MAX.saturating_sub(pool.len());
            pool.extend(stacks.into_iter().take(room));
        }
        for (t, v) in totals.iter().zip([st.blocks, st.switches, st.barriers, st.warp_ops]) {
            t.fetch_add(v, Ordering::Relaxed);
        }
    };
    if workers == 1 {
        work();
    } else {
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(work);
            }
        });
    }
    if let Some((_, e)) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let blocks = totals[0].load(Ordering::Relaxed);
    Ok(Stats {
        blocks,
        threads: blocks * l.block.count() as u64,
        switches: totals[1].load(Ordering::Relaxed),
        barriers: totals[2].load(Ordering::Relaxed),
        warp_ops: totals[3].load(Ordering::Relaxed),
    })
}

/// Clears this OS thread's block state however `run_block` leaves.
struct EmuGuard;
impl Drop for EmuGuard {
    fn drop(&mut self) {
        EMU.with(|e| *e.borrow_mut() = None);
    }
}

fn run_block<F: Fn() + Sync>(
    l: &Launch,
    kernel: &F,
    block: Dim3,
    stacks: &mut Vec<DefaultStack>,
    st: &mut Stats,
) -> Result<(), EmuError> {
    let n = l.block.count();
    let nwarps = n.div_ceil(WARP as usize);
    let bytes = l.smem_bytes.div_ceil(4) * 4;
    EMU.with(|e| {
        *e.borrow_mut() = Some(BlockEmu {
            launch: l as *const Launch,
            block,
            smem: POISON.to_le_bytes().iter().copied().cycle().take(bytes).collect(),
            shadow: vec![Shadow::FRESH; bytes / UNIT],
            epoch: 0,
            warp_epoch: vec![0; nwarps],
            yielders: vec![std::ptr::null(); n],
            io: vec![[0; 16]; n],
            copies: vec![Vec::new(); n],
            next_group: vec![0; n],
        })
    });
    let _guard = EmuGuard;
    let err = |kind, thread: Option<usize>, detail: String| EmuError {
        kind,
        kernel: l.kernel.clone(),
        block,
        thread: thread.map(|t| l.block.at(t)),
        detail,
    };
    // The kernel outlives every coroutine below (they finish or are dropped before this
    // function returns), so each may call it through a plain address.
    let kaddr = kernel as *const F as usize;
    let mut cos: Vec<Option<Co>> = (0..n)
        .map(|t| {
            let stack = stacks.pop().unwrap_or_else(|| DefaultStack::new(STACK_BYTES).expect("a coroutine stack"));
            Some(Coroutine::with_stack(stack, move |y: &Yielder<u32, Park>, _: u32| {
                EMU.with(|e| {
                    if let Some(e) = e.borrow_mut().as_mut() {
                        e.yielders[t] = y as *const _;
                    }
                });
                // SAFETY: see `kaddr`.
                let k = unsafe { &*(kaddr as *const F) };
                k();
            }))
        })
        .collect();
    let order: Vec<usize> = if l.checks.reverse_lanes {
        (0..nwarps).flat_map(|w| (w * 32..((w + 1) * 32).min(n)).rev()).collect()
    } else {
        (0..n).collect()
    };
    let mut state = vec![State::Runnable; n];
    loop {
        let mut progressed = false;
        for &t in &order {
            if !matches!(state[t], State::Runnable) {
                continue;
            }
            CUR.set(t as u32);
            let co = cos[t].as_mut().expect("a runnable thread has its coroutine");
            let r = panic::catch_unwind(AssertUnwindSafe(|| co.resume(0)));
            st.switches += 1;
            progressed = true;
            match r {
                Ok(CoroutineResult::Yield(p)) => state[t] = State::Parked(p),
                Ok(CoroutineResult::Return(())) => {
                    state[t] = State::Done;
                    if let Some(co) = cos[t].take() {
                        stacks.push(co.into_stack());
                    }
                }
                Err(payload) => {
                    return Err(match payload.downcast::<EmuError>() {
                        Ok(e) => *e,
                        Err(p) => {
                            let msg = p
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_else(|| "a panic with no message".into());
                            err(ErrorKind::Panic, Some(t), msg)
                        }
                    });
                }
            }
        }
        if state.iter().all(|s| matches!(s, State::Done)) {
            st.blocks += 1;
            return Ok(());
        }
        // Warp collectives whose every member has arrived.
        for w in 0..nwarps {
            let lanes = w * 32..((w + 1) * 32).min(n);
            for t in lanes.clone() {
                let State::Parked(Park::Warp(req)) = state[t] else { continue };
                let mut members = Vec::with_capacity(32);
                let mut waiting = false;
                for lane in 0..32u32 {
                    if req.mask & (1 << lane) == 0 {
                        continue;
                    }
                    let m = w * 32 + lane as usize;
                    if m >= n {
                        return Err(err(ErrorKind::WarpMask, Some(t), format!("the warp operation at {} names lane {lane} in its mask {:#010x}, but the block has {n} threads", req.site, req.mask)));
                    }
                    match state[m] {
                        State::Parked(Park::Warp(o)) if o.kind == req.kind && o.mask == req.mask => members.push(m),
                        State::Parked(Park::Warp(o)) => {
                            return Err(err(ErrorKind::WarpMask, Some(m), format!("lane {lane} is at the warp operation at {} (mask {:#010x}) while lanes of its mask {:#010x} wait at {}", o.site, o.mask, req.mask, req.site)))
                        }
                        State::Parked(Park::Barrier(site)) => {
                            return Err(err(ErrorKind::WarpMask, Some(m), format!("lane {lane} of the member mask {:#010x} of the warp operation at {} waits at the barrier at {site} instead", req.mask, req.site)))
                        }
                        State::Done => {
                            return Err(err(ErrorKind::WarpMask, Some(m), format!("lane {lane} of the member mask {:#010x} of the warp operation at {} has exited", req.mask, req.site)))
                        }
                        State::Runnable => waiting = true,
                    }
                }
                if waiting {
                    continue;
                }
                with_emu(|e| {
                    resolve(e, &members, w, req, &state)?;
                    e.warp_epoch[w] += 1;
                    Ok(())
                })
                .map_err(|(k, d)| err(k, Some(t), d))?;
                for &m in &members {
                    state[m] = State::Runnable;
                }
                st.warp_ops += 1;
                progressed = true;
            }
        }
        if progressed {
            continue;
        }
        // Nothing runs and no warp operation can resolve: a barrier, or nothing can go on.
        let mut sites: Vec<(&'static Location<'static>, Vec<usize>)> = Vec::new();
        for (t, s) in state.iter().enumerate() {
            match s {
                State::Parked(Park::Barrier(site)) => match sites.iter_mut().find(|(x, _)| x == site) {
                    Some((_, ts)) => ts.push(t),
                    None => sites.push((site, vec![t])),
                },
                State::Done => {}
                _ => {
                    return Err(err(ErrorKind::Deadlock, Some(t), format!("no thread can go on; this one is {s:?}")));
                }
            }
        }
        if sites.len() > 1 {
            let parts: Vec<String> = sites
                .iter()
                .map(|(site, ts)| format!("{} thread(s) from {} at {site}", ts.len(), l.block.at(ts[0])))
                .collect();
            return Err(err(
                ErrorKind::DivergentBarrier,
                Some(sites[1].1[0]),
                format!("threads wait at different barriers: {}", parts.join("; ")),
            ));
        }
        for s in state.iter_mut() {
            if let State::Parked(Park::Barrier(_)) = s {
                *s = State::Runnable;
            }
        }
        EMU.with(|e| {
            if let Some(e) = e.borrow_mut().as_mut() {
                e.epoch += 1;
            }
        });
        st.barriers += 1;
    }
}

/// Computes a warp collective's results into its members' registers.
// The fragment loops index by lane, register and row as the PTX ISA's layout formulas do.
#[allow(clippy::needless_range_loop)]
fn resolve(
    e: &mut BlockEmu,
    members: &[usize],
    w: usize,
    req: WarpReq,
    state: &[State],
) -> Result<(), (ErrorKind, String)> {
    let base = w * 32;
    let bad = |d: String| (ErrorKind::WarpMask, d);
    match req.kind {
        WarpKind::Sync => {}
        WarpKind::ShflBfly | WarpKind::ShflIdx | WarpKind::ShflUp | WarpKind::ShflDown => {
            // PTX ISA, shfl.sync: the source lane must be in the member mask.
            let vals: Vec<u32> = members.iter().map(|&m| e.io[m][0]).collect();
            let value_of = |lane: u32| members.iter().position(|&m| m == base + lane as usize).map(|i| vals[i]);
            for &m in members {
                let lane = (m % 32) as u32;
                let State::Parked(Park::Warp(mine)) = state[m] else { unreachable!("members are parked") };
                let src = match req.kind {
                    WarpKind::ShflBfly => lane ^ (mine.arg & 31),
                    WarpKind::ShflIdx => mine.arg & 31,
                    WarpKind::ShflUp => lane.checked_sub(mine.arg).unwrap_or(lane),
                    _ => {
                        if lane + mine.arg > 31 {
                            lane
                        } else {
                            lane + mine.arg
                        }
                    }
                };
                e.io[m][0] = value_of(src).ok_or_else(|| {
                    bad(format!(
                        "lane {lane} reads lane {src} in the shuffle at {}, which is not in the member mask {:#010x}",
                        req.site, req.mask
                    ))
                })?;
            }
        }
        WarpKind::Mma(ty) => {
            if members.len() != 32 {
                return Err(bad(format!("mma.sync.aligned at {} needs all 32 lanes of the warp", req.site)));
            }
            let half = |x: u32| match ty {
                MmaType::F16 => half::f16::from_bits(x as u16).to_f32(),
                MmaType::Bf16 => half::bf16::from_bits(x as u16).to_f32(),
            };
            let (mut a, mut b, mut c) = ([[0f32; 16]; 16], [[0f32; 8]; 16], [[0f32; 8]; 16]);
            for lane in 0..32 {
                let (g, t, io) = (lane / 4, lane % 4, e.io[base + lane]);
                for r in 0..4 {
                    let (row, col) = (g + 8 * (r & 1), 2 * t + 8 * (r >> 1));
                    a[row][col] = half(io[r]);
                    a[row][col + 1] = half(io[r] >> 16);
                }
                for r in 0..2 {
                    let k = 2 * t + 8 * r;
                    b[k][g] = half(io[4 + r]);
                    b[k + 1][g] = half(io[4 + r] >> 16);
                }
                for i in 0..4 {
                    c[g + 8 * (i >> 1)][2 * t + (i & 1)] = f32::from_bits(io[6 + i]);
                }
            }
            for lane in 0..32 {
                let (g, t) = (lane / 4, lane % 4);
                for i in 0..4 {
                    let (row, col) = (g + 8 * (i >> 1), 2 * t + (i & 1));
                    // 16-bit products are exact in f32; the hardware's order of the sum is
                    // not specified, so k order here.
                    let mut acc = c[row][col];
                    for (k, bk) in b.iter().enumerate() {
                        acc += a[row][k] * bk[col];
                    }
                    e.io[base + lane][i] = acc.to_bits();
                }
            }
        }
        WarpKind::LdMatrix { num, trans } => {
            let need = 8 * num as usize;
            if (0..need).any(|l| !members.contains(&(base + l))) {
                return Err(bad(format!(
                    "ldmatrix.x{num} at {} needs lanes 0..{need} to give row addresses",
                    req.site
                )));
            }
            let mut m = [[[0u16; 8]; 8]; 4];
            for i in 0..num as usize {
                for r in 0..8 {
                    let lane = base + 8 * i + r;
                    let off = e.io[lane][0] as usize;
                    if off % 16 != 0 {
                        return Err((
                            ErrorKind::Misaligned,
                            format!(
                                "ldmatrix at {}: lane {} gives row address {off}, not 16-byte aligned",
                                req.site,
                                8 * i + r
                            ),
                        ));
                    }
                    smem_check(e, lane as u32, off, 16, false, req.site)?;
                    for (cidx, v) in m[i][r].iter_mut().enumerate() {
                        *v = u16::from_le_bytes([e.smem[off + 2 * cidx], e.smem[off + 2 * cidx + 1]]);
                    }
                }
            }
            for &mm in members {
                let l = mm % 32;
                let (q, p) = (l / 4, 2 * (l % 4));
                for i in 0..4 {
                    e.io[mm][i] = if i >= num as usize {
                        0
                    } else if trans {
                        m[i][p][q] as u32 | (m[i][p + 1][q] as u32) << 16
                    } else {
                        m[i][q][p] as u32 | (m[i][q][p + 1] as u32) << 16
                    };
                }
            }
        }
    }
    Ok(())
}
