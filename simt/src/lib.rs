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
//! - global memory through [`ld`]/[`st`]: every access must fall inside one of the buffers
//!   the launch registered, aligned for its type (memcheck).
//!
//! A lane order switch ([`Checks::reverse_lanes`]) runs each warp's lanes last to first, so
//! code that leans on an order no hardware promises gives other results. Every error names the
//! kernel, the block, the thread, the address or site, and both accesses of a race.
//!
//! **Must not**: know weave's kernels, allocate device memory, or be needed on the GPU: the
//! kernels reach it through kernels-gpu's `gpu` facade on the host only (not ported yet), and
//! on nvptx they use the hardware's intrinsics.
//!
//! Not here yet: `mma.sync`, `ldmatrix` and `cp.async` (each a warp collective over this same
//! machinery, with the PTX ISA's fragment layouts), and the kernels' port to the facade.

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WarpKind {
    ShflBfly,
    ShflIdx,
    ShflUp,
    ShflDown,
    Sync,
}

#[derive(Debug, Clone, Copy)]
struct WarpReq {
    kind: WarpKind,
    mask: u32,
    value: u32,
    arg: u32,
    site: &'static Location<'static>,
}

/// One shared word's access record, for the race check.
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

/// The block being run on this OS thread.
struct BlockEmu {
    launch: *const Launch,
    block: Dim3,
    smem: Vec<u32>,
    shadow: Vec<Shadow>,
    /// Barriers released so far in this block.
    epoch: u32,
    /// Warp collectives resolved so far, per warp.
    warp_epoch: Vec<u32>,
    /// Each thread's yielder, set when its coroutine starts.
    yielders: Vec<*const Yielder<u32, Park>>,
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
    panic::panic_any(err)
}

fn park(p: Park) -> u32 {
    let y = with_emu(|e| e.yielders[CUR.get() as usize]);
    // SAFETY: the yielder belongs to the running coroutine (set when it started, on this OS
    // thread) and lives as long as it does; no `EMU` borrow is held across the switch.
    unsafe { (*y).suspend(p) }
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

#[track_caller]
fn warp_op(kind: WarpKind, mask: u32, value: u32, arg: u32) -> u32 {
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
    park(Park::Warp(WarpReq { kind, mask, value, arg, site: Location::caller() }))
}

/// `shfl.sync.bfly.b32`: the value of lane `lane ^ lane_mask`.
#[track_caller]
pub fn shfl_xor(mask: u32, value: u32, lane_mask: u32) -> u32 {
    warp_op(WarpKind::ShflBfly, mask, value, lane_mask)
}
/// `shfl.sync.idx.b32`: the value of lane `src & 31`.
#[track_caller]
pub fn shfl_idx(mask: u32, value: u32, src: u32) -> u32 {
    warp_op(WarpKind::ShflIdx, mask, value, src)
}
/// `shfl.sync.up.b32`: the value of lane `lane - delta`, or the lane's own below 0.
#[track_caller]
pub fn shfl_up(mask: u32, value: u32, delta: u32) -> u32 {
    warp_op(WarpKind::ShflUp, mask, value, delta)
}
/// `shfl.sync.down.b32`: the value of lane `lane + delta`, or the lane's own past 31.
#[track_caller]
pub fn shfl_down(mask: u32, value: u32, delta: u32) -> u32 {
    warp_op(WarpKind::ShflDown, mask, value, delta)
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
    warp_op(WarpKind::Sync, mask, 0, 0);
}

/// Reads shared word `word` (dynamic shared memory, 32-bit words).
#[track_caller]
pub fn smem_ld(word: usize) -> u32 {
    let site = Location::caller();
    let t = CUR.get();
    let r = with_emu(|e| {
        let l = launch_of(e);
        if word >= e.smem.len() {
            return Err((
                ErrorKind::OutOfBounds,
                format!(
                    "shared read of word {word} (byte {}) at {site}, past the launch's {} bytes",
                    word * 4,
                    l.smem_bytes
                ),
            ));
        }
        let (checks, epoch, wepoch) = (l.checks, e.epoch, e.warp_epoch[(t / WARP) as usize]);
        let s = &mut e.shadow[word];
        if checks.uninit_reads && !s.written {
            return Err((
                ErrorKind::UninitRead,
                format!("shared word {word} (byte {}) read at {site} before any thread wrote it", word * 4),
            ));
        }
        if checks.races && s.w_epoch == epoch && s.w_tid != t && !synced(s.w_tid, s.w_wepoch, t, wepoch) {
            return Err((
                ErrorKind::SharedRace,
                format!(
                    "read-after-write race on shared word {word} (byte {}): thread {} wrote it at {} and thread {} reads it at {site} with no barrier between",
                    word * 4,
                    l.block.at(s.w_tid as usize),
                    s.w_site.map_or("?".into(), |x| x.to_string()),
                    l.block.at(t as usize)
                ),
            ));
        }
        if s.r_epoch != epoch {
            (s.r_tid, s.r_epoch) = (t, epoch);
        } else if s.r_tid != t {
            s.r_tid = u32::MAX;
        }
        (s.r_wepoch, s.r_site) = (wepoch, Some(site));
        Ok(e.smem[word])
    });
    r.unwrap_or_else(|(k, d)| fail(k, d))
}

/// Writes shared word `word`.
#[track_caller]
pub fn smem_st(word: usize, value: u32) {
    let site = Location::caller();
    let t = CUR.get();
    let r = with_emu(|e| {
        let l = launch_of(e);
        if word >= e.smem.len() {
            return Err((
                ErrorKind::OutOfBounds,
                format!(
                    "shared write of word {word} (byte {}) at {site}, past the launch's {} bytes",
                    word * 4,
                    l.smem_bytes
                ),
            ));
        }
        let (checks, epoch, wepoch) = (l.checks, e.epoch, e.warp_epoch[(t / WARP) as usize]);
        let s = &mut e.shadow[word];
        if checks.races {
            if s.w_epoch == epoch && s.w_tid != t && !synced(s.w_tid, s.w_wepoch, t, wepoch) {
                return Err((
                    ErrorKind::SharedRace,
                    format!(
                        "write-after-write race on shared word {word} (byte {}): thread {} wrote it at {} and thread {} writes it at {site} with no barrier between",
                        word * 4,
                        l.block.at(s.w_tid as usize),
                        s.w_site.map_or("?".into(), |x| x.to_string()),
                        l.block.at(t as usize)
                    ),
                ));
            }
            let other_reader = s.r_epoch == epoch && s.r_tid != t;
            if other_reader && (s.r_tid == u32::MAX || !synced(s.r_tid, s.r_wepoch, t, wepoch)) {
                let who = if s.r_tid == u32::MAX {
                    "several threads".to_string()
                } else {
                    format!("thread {}", l.block.at(s.r_tid as usize))
                };
                return Err((
                    ErrorKind::SharedRace,
                    format!(
                        "write-after-read race on shared word {word} (byte {}): {who} read it (last at {}) and thread {} writes it at {site} with no barrier between",
                        word * 4,
                        s.r_site.map_or("?".into(), |x| x.to_string()),
                        l.block.at(t as usize)
                    ),
                ));
            }
        }
        *s = Shadow { written: true, w_tid: t, w_epoch: epoch, w_wepoch: wepoch, w_site: Some(site), ..*s };
        e.smem[word] = value;
        Ok(())
    });
    r.unwrap_or_else(|(k, d)| fail(k, d))
}

#[track_caller]
pub fn smem_ld_f32(word: usize) -> f32 {
    f32::from_bits(smem_ld(word))
}
#[track_caller]
pub fn smem_st_f32(word: usize, value: f32) {
    smem_st(word, value.to_bits())
}

/// Whether two accesses of one word by lanes of one warp are ordered by a warp collective.
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
        let near = l
            .buffers
            .iter()
            .map(|b| {
                let off = addr as i128 - b.start as i128;
                format!("{} is [{:#x}, {:#x}), the access at offset {off}", b.name, b.start, b.start + b.len)
            })
            .collect::<Vec<_>>()
            .join("; ");
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

// ------------------------------------------------------------------ the scheduler

#[derive(Debug, Clone, Copy)]
enum State {
    Runnable,
    Parked(Park),
    Done,
}

type Co = Coroutine<u32, Park, (), DefaultStack>;

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
        let mut stacks: Vec<DefaultStack> = Vec::new();
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
    let words = l.smem_bytes.div_ceil(4);
    EMU.with(|e| {
        *e.borrow_mut() = Some(BlockEmu {
            launch: l as *const Launch,
            block,
            smem: vec![POISON; words],
            shadow: vec![Shadow::FRESH; words],
            epoch: 0,
            warp_epoch: vec![0; nwarps],
            yielders: vec![std::ptr::null(); n],
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
    let mut input = vec![0u32; n];
    loop {
        let mut progressed = false;
        for &t in &order {
            if !matches!(state[t], State::Runnable) {
                continue;
            }
            CUR.set(t as u32);
            let co = cos[t].as_mut().expect("a runnable thread has its coroutine");
            let r = panic::catch_unwind(AssertUnwindSafe(|| co.resume(input[t])));
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
                resolve(&members, w, req, &state, &mut input).map_err(|d| err(ErrorKind::WarpMask, Some(t), d))?;
                for &m in &members {
                    state[m] = State::Runnable;
                }
                EMU.with(|e| {
                    if let Some(e) = e.borrow_mut().as_mut() {
                        e.warp_epoch[w] += 1;
                    }
                });
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

/// Computes a warp collective's result for each member lane (PTX ISA, `shfl.sync`: the source
/// lane must be in the member mask).
fn resolve(members: &[usize], w: usize, req: WarpReq, state: &[State], input: &mut [u32]) -> Result<(), String> {
    let value_of = |lane: u32| -> Option<u32> {
        match state.get(w * 32 + lane as usize) {
            Some(State::Parked(Park::Warp(o))) if req.mask & (1 << lane) != 0 => Some(o.value),
            _ => None,
        }
    };
    for &m in members {
        let lane = (m % 32) as u32;
        let State::Parked(Park::Warp(mine)) = state[m] else { unreachable!("members are parked at the operation") };
        let src = match req.kind {
            WarpKind::Sync => {
                input[m] = 0;
                continue;
            }
            WarpKind::ShflBfly => lane ^ (mine.arg & 31),
            WarpKind::ShflIdx => mine.arg & 31,
            WarpKind::ShflUp => lane.checked_sub(mine.arg).unwrap_or(lane),
            WarpKind::ShflDown => {
                if lane + mine.arg > 31 {
                    lane
                } else {
                    lane + mine.arg
                }
            }
        };
        input[m] = value_of(src).ok_or_else(|| {
            format!(
                "lane {lane} reads lane {src} in the shuffle at {}, which is not in the member mask {:#010x}",
                req.site, req.mask
            )
        })?;
    }
    Ok(())
}
