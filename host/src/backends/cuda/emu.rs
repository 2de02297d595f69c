//! [`Device`] on the CPU: weave's kernels under the SIMT emulator (`weave-simt`), GEMMs by the
//! gemm crate in f32 with the 16-bit rounding cuBLAS applies, memory from the host heap.
//!
//! What it checks beyond a GPU: every launch registers exactly the allocations its pointer
//! arguments point into, so a kernel that reads past its buffer into a neighbour's fails here
//! with both named (a GPU would read the neighbour silently); copies and GEMM operands are
//! checked against the live allocations the same way; shared memory starts poisoned and
//! races are reported (`weave_simt::Checks`). What it does not model: time (each launch runs
//! to its end before `launch` returns, so events give host time) and graphs (the backend runs
//! the padded steps a graph would replay eagerly).

use super::dev::{Device, Event, Gemm, Graph, Mem};
use super::CudaError;
use std::alloc::Layout;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use weave_kernels_gpu::gpu::Arg;
use weave_kernels_gpu::{Bf16, Dtype, Elem, Kernel, LaunchDims, F16};
use weave_simt::{Checks, Dim3};

/// What `cudaMalloc` promises (and the 16-byte vector loads need).
const ALIGN: usize = 256;

/// Live allocations, and GEMM weights widened to f32.
type Registry = Arc<Mutex<Memory>>;

#[derive(Debug, Default)]
struct Memory {
    /// Start address -> the allocation.
    live: BTreeMap<usize, Alloc>,
    /// Weights a GEMM widened to f32, by their address and dtype: kept while their allocation
    /// is not written (its `written` stamp unchanged), so a model's weights widen once, not at
    /// every step. At most [`WIDEN_CACHE_BYTES`].
    widened: std::collections::HashMap<WidenKey, (u64, Arc<Vec<f32>>)>,
    widened_bytes: usize,
    /// The source of `written` stamps: never reused, so a stamp names one write to one
    /// allocation (a new allocation at a freed one's address gets a new stamp).
    clock: u64,
}

/// Weights by device address, element count and dtype.
type WidenKey = (u64, usize, Dtype);

#[derive(Debug, Clone, Copy)]
struct Alloc {
    len: usize,
    /// When it was last written (or allocated), on `Memory::clock`.
    written: u64,
}

impl Memory {
    fn used(&self) -> usize {
        self.live.values().map(|a| a.len).sum()
    }
    /// The start and record of the allocation holding `[addr, addr + bytes)`.
    fn holding(&self, addr: u64, bytes: usize) -> Option<(usize, Alloc)> {
        let a = addr as usize;
        let (&s, &al) = self.live.range(..=a).next_back()?;
        (a + bytes <= s + al.len).then_some((s, al))
    }
    /// Marks the allocation holding `addr` written now.
    fn touch(&mut self, addr: u64) {
        self.clock += 1;
        if let Some((s, _)) = self.holding(addr, 0) {
            let clock = self.clock;
            self.live.get_mut(&s).expect("held").written = clock;
        }
    }
}

/// The widened weights kept between GEMMs: SmolLM2-135M's take 0.5 GiB.
const WIDEN_CACHE_BYTES: usize = 1 << 30;

/// The emulated device.
#[derive(Debug)]
pub struct EmuDev {
    live: Registry,
    total: usize,
    checks: Checks,
    stats: EmuStats,
}

/// What the emulator has run, for throughput figures.
#[derive(Debug, Default)]
pub struct EmuStats {
    pub launches: AtomicU64,
    pub threads: AtomicU64,
    pub switches: AtomicU64,
    pub barriers: AtomicU64,
    pub warp_ops: AtomicU64,
    /// Nanoseconds in launches.
    pub launch_ns: AtomicU64,
    pub gemms: AtomicU64,
    pub gemm_ns: AtomicU64,
    /// Weight matrices widened to f32 (once each while unwritten).
    pub widens: AtomicU64,
}

impl EmuStats {
    /// One line: what ran, and the emulator's throughput.
    pub fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let secs = g(&self.launch_ns) as f64 / 1e9;
        format!(
            "{} launches ran {} threads ({} coroutine switches, {} barriers, {} warp collectives) in {:.2} s: {:.1} M switches/s; {} GEMMs on the CPU in {:.2} s",
            g(&self.launches),
            g(&self.threads),
            g(&self.switches),
            g(&self.barriers),
            g(&self.warp_ops),
            secs,
            g(&self.switches) as f64 / secs.max(1e-9) / 1e6,
            g(&self.gemms),
            g(&self.gemm_ns) as f64 / 1e9
        )
    }
}

/// The device says what it ran when it goes (stderr): the emulator's throughput, for the run
/// that used it.
impl Drop for EmuDev {
    fn drop(&mut self) {
        if self.stats.launches.load(Ordering::Relaxed) > 0 {
            eprintln!("weave: SIMT emulator: {}", self.stats.summary());
        }
    }
}

#[derive(Debug)]
struct EmuMem {
    ptr: *mut u8,
    layout: Layout,
    live: Registry,
}

// SAFETY: the allocation is plain memory owned by this value; the device reads and writes it
// only during calls made through the backend, which holds the buffers.
unsafe impl Send for EmuMem {}

impl Mem for EmuMem {
    fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl Drop for EmuMem {
    fn drop(&mut self) {
        let mut m = self.live.lock().unwrap_or_else(|p| p.into_inner());
        m.live.remove(&(self.ptr as usize));
        let (start, end) = (self.ptr as u64, self.ptr as u64 + self.layout.size() as u64);
        let gone: Vec<_> = m.widened.keys().filter(|k| k.0 >= start && k.0 < end).copied().collect();
        for k in gone {
            if let Some((_, v)) = m.widened.remove(&k) {
                m.widened_bytes -= 4 * v.len();
            }
        }
        // SAFETY: allocated in `alloc_zeroed` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

impl EmuDev {
    /// An emulated device of `total` bytes of memory, with every check on.
    pub fn new(total: usize) -> EmuDev {
        EmuDev { live: Default::default(), total, checks: Checks::default(), stats: Default::default() }
    }

    /// The same device with `checks` (e.g. lanes run in reverse).
    pub fn with_checks(mut self, checks: Checks) -> EmuDev {
        self.checks = checks;
        self
    }

    pub fn stats(&self) -> &EmuStats {
        &self.stats
    }

    fn touch(&self, addr: u64) {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).touch(addr);
    }

    /// GEMM `g`'s weights in f32: from the cache while their allocation is unwritten, else
    /// from `widen` (and kept, room allowing).
    fn widened(&self, g: &Gemm, widen: impl FnOnce() -> Vec<f32>) -> Arc<Vec<f32>> {
        let key = (g.w, g.out_dim * g.in_dim, g.dtype);
        let stamp = |m: &Memory| m.holding(g.w, 0).map_or(0, |(_, al)| al.written);
        {
            let m = self.live.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, v)) = m.widened.get(&key) {
                if *at == stamp(&m) {
                    return v.clone();
                }
            }
        }
        self.stats.widens.fetch_add(1, Ordering::Relaxed);
        let v = Arc::new(widen());
        let mut m = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let at = stamp(&m);
        if let Some((_, old)) = m.widened.remove(&key) {
            m.widened_bytes -= 4 * old.len();
        }
        if m.widened_bytes + 4 * v.len() <= WIDEN_CACHE_BYTES {
            m.widened_bytes += 4 * v.len();
            m.widened.insert(key, (at, v.clone()));
        }
        v
    }

    /// The allocation `[start, start + len)` holding `[addr, addr + bytes)`, or an error naming
    /// `what`.
    fn find(&self, addr: u64, bytes: usize, what: &str) -> Result<(usize, usize), CudaError> {
        match self.live.lock().unwrap_or_else(|p| p.into_inner()).holding(addr, bytes) {
            Some((s, al)) => Ok((s, al.len)),
            None => Err(CudaError::Memory(format!(
                "{what}: {bytes} bytes at {addr:#x} are not inside one allocation of the emulated device"
            ))),
        }
    }
}

impl Device for EmuDev {
    fn name(&self) -> String {
        format!("SIMT emulator ({} CPU threads)", std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
    fn arch(&self) -> String {
        "emu".into()
    }
    /// An H200's count, so that the split-KV choice splits as it would there.
    fn num_sms(&self) -> u32 {
        132
    }
    fn bind_to_thread(&self) -> Result<(), CudaError> {
        Ok(())
    }
    fn alloc_zeroed(&self, bytes: usize) -> Result<Box<dyn Mem>, CudaError> {
        let bytes = bytes.max(1);
        let mut m = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let used = m.used();
        if used + bytes > self.total {
            return Err(CudaError::Memory(format!(
                "out of memory: {bytes} bytes asked, {} of the emulated device's {} free",
                self.total - used,
                self.total
            )));
        }
        let layout = Layout::from_size_align(bytes, ALIGN).map_err(|e| CudaError::Memory(e.to_string()))?;
        // SAFETY: a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(CudaError::Memory(format!("the host could not give {bytes} bytes")));
        }
        m.clock += 1;
        let written = m.clock;
        m.live.insert(ptr as usize, Alloc { len: bytes, written });
        Ok(Box::new(EmuMem { ptr, layout, live: self.live.clone() }))
    }
    fn htod(&self, src: &[u8], dst: u64) -> Result<(), CudaError> {
        self.find(dst, src.len(), "copy to the device")?;
        self.touch(dst);
        // SAFETY: inside a live allocation (checked), which no kernel runs on now.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }
    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<(), CudaError> {
        self.find(src, dst.len(), "copy from the device")?;
        // SAFETY: as `htod`.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
    fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<(), CudaError> {
        self.find(src, bytes, "device copy source")?;
        self.find(dst, bytes, "device copy destination")?;
        self.touch(dst);
        // SAFETY: both inside live allocations (checked); `copy` allows overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }
    fn launch(&self, kernel: Kernel, dims: LaunchDims, args: &[Arg]) -> Result<(), CudaError> {
        let (gx, gy, gz) = dims.grid;
        let mut l = weave_simt::Launch::new(kernel.name(), Dim3::new(gx, gy, gz), Dim3::x(dims.block))
            .smem(dims.smem as usize)
            .checks(self.checks);
        let entry = kernel.emu_entry();
        let params = entry.params;
        // Each pointer argument may touch the allocation it points into, from its address on
        // (as a kernel handed a view may), and nothing else.
        for (i, a) in args.iter().enumerate() {
            if let Arg::Ptr(p) = *a {
                let (s, len) = self.find(p, 0, &format!("{} argument {i}", kernel.name()))?;
                let start = p as usize;
                let name = params.get(i).copied().unwrap_or("an extra argument");
                l.buffers.push(weave_simt::Buffer { name, start, len: s + len - start });
            }
        }
        let t = std::time::Instant::now();
        let st = (entry.launch)(&l, args);
        // What the kernel may have written: its `*mut` parameters' allocations. (A read-only
        // one, such as a tied embedding the LM head's GEMM also reads, keeps its stamp.)
        for (a, &w) in args.iter().zip(entry.writes) {
            if let (Arg::Ptr(p), true) = (*a, w) {
                self.touch(p);
            }
        }
        let st = st.map_err(CudaError::Emulator)?;
        let s = &self.stats;
        s.launch_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        s.launches.fetch_add(1, Ordering::Relaxed);
        s.threads.fetch_add(st.threads, Ordering::Relaxed);
        s.switches.fetch_add(st.switches, Ordering::Relaxed);
        s.barriers.fetch_add(st.barriers, Ordering::Relaxed);
        s.warp_ops.fetch_add(st.warp_ops, Ordering::Relaxed);
        Ok(())
    }
    fn gemm(&self, g: &Gemm) -> Result<(), CudaError> {
        let t = std::time::Instant::now();
        let (n, o, i) = (g.n, g.out_dim, g.in_dim);
        self.find(g.x, 2 * n * i, "GEMM input x")?;
        self.find(g.w, 2 * o * i, "GEMM weight w")?;
        self.find(g.c, if g.c_f32 { 4 } else { 2 } * n * o, "GEMM output c")?;
        // SAFETY: each operand lies inside a live allocation (checked above) and no kernel
        // runs now; x and w are read-only here, c is written after they are read.
        let (x16, w16) = unsafe {
            (std::slice::from_raw_parts(g.x as *const u16, n * i), std::slice::from_raw_parts(g.w as *const u16, o * i))
        };
        let widen = |v: &[u16]| -> Vec<f32> {
            match g.dtype {
                Dtype::F16 => v.iter().map(|&b| F16(b).to_f32()).collect(),
                _ => v.iter().map(|&b| Bf16(b).to_f32()).collect(),
            }
        };
        let x = widen(x16);
        let w = self.widened(g, || widen(w16));
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        if g.c_f32 {
            // SAFETY: checked above; `c` does not overlap `x` or `w` (distinct allocations).
            let c = unsafe { std::slice::from_raw_parts_mut(g.c as *mut f32, n * o) };
            crate::backends::cpu::gemm_xwt(&x, n, &w[..], o, i, c, g.accumulate, threads);
        } else {
            // SAFETY: as above.
            let c16 = unsafe { std::slice::from_raw_parts_mut(g.c as *mut u16, n * o) };
            let mut c = if g.accumulate { widen(c16) } else { vec![0f32; n * o] };
            crate::backends::cpu::gemm_xwt(&x, n, &w[..], o, i, &mut c, g.accumulate, threads);
            // Rounded once, from the f32 accumulator, as cuBLAS's f32 compute type does.
            for (d, v) in c16.iter_mut().zip(c) {
                *d = match g.dtype {
                    Dtype::F16 => F16::from_f32(v).0,
                    _ => Bf16::from_f32(v).0,
                };
            }
        }
        self.touch(g.c);
        self.stats.gemms.fetch_add(1, Ordering::Relaxed);
        self.stats.gemm_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn sync(&self) -> Result<(), CudaError> {
        Ok(())
    }
    fn record(&self) -> Result<Event, CudaError> {
        Ok(Event::Host(std::time::Instant::now()))
    }
    fn elapsed(&self, a: &Event, b: &Event) -> Result<f64, CudaError> {
        match (a, b) {
            (Event::Host(a), Event::Host(b)) => Ok(b.saturating_duration_since(*a).as_secs_f64()),
            _ => Err(CudaError::Graph("events of another device".into())),
        }
    }
    fn mem_info(&self) -> Result<(usize, usize), CudaError> {
        let used = self.live.lock().unwrap_or_else(|p| p.into_inner()).used();
        Ok((self.total - used, self.total))
    }
    fn graphs(&self) -> bool {
        false
    }
    fn begin_capture(&self) -> Result<(), CudaError> {
        Err(CudaError::Graph("the emulator records no graphs".into()))
    }
    fn end_capture(&self) -> Result<Option<Box<dyn Graph>>, CudaError> {
        Err(CudaError::Graph("the emulator records no graphs".into()))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::super::{DBuf, Kernels};
    use super::*;

    fn emu_stats(k: &Kernels) -> &EmuStats {
        let d: &dyn std::any::Any = k.dev.as_any();
        d.downcast_ref::<EmuDev>().expect("the emulator").stats()
    }

    fn bf16(v: &[f32]) -> Vec<u16> {
        v.iter().map(|&x| Bf16::from_f32(x).0).collect()
    }

    /// `x * w^T` on the host from the device's current bits.
    fn want(k: &Kernels, x: &DBuf<u16>, w: &DBuf<u16>, n: usize, o: usize, i: usize) -> Vec<f32> {
        let (x, w) = (k.download(x).unwrap(), k.download(w).unwrap());
        let f = |b: u16| Bf16(b).to_f32();
        (0..n)
            .flat_map(|r| (0..o).map(move |c| (r, c)))
            .map(|(r, c)| (0..i).map(|j| f(x[r * i + j]) * f(w[c * i + j])).sum())
            .collect()
    }

    /// The widened weights are reused only while nothing wrote them: a copy or a kernel that
    /// writes the weights' buffer makes the next GEMM widen them again.
    #[test]
    fn a_gemm_sees_weights_written_since_the_last_one() {
        let k = Kernels::emulated(1 << 20);
        let (n, o, i) = (2usize, 3usize, 8usize);
        let x = k.upload(&bf16(&(0..n * i).map(|v| v as f32 * 0.25).collect::<Vec<_>>())).unwrap();
        let mut w = k.upload(&bf16(&vec![1.0; o * i])).unwrap();
        let c = k.zeros::<f32>(n * o).unwrap();
        let g = Gemm {
            x: x.addr(),
            w: w.addr(),
            c: c.addr(),
            n,
            out_dim: o,
            in_dim: i,
            accumulate: false,
            c_f32: true,
            dtype: Dtype::Bf16,
        };
        for round in 0..2 {
            k.dev.gemm(&g).unwrap();
            assert_eq!(k.download(&c).unwrap(), want(&k, &x, &w, n, o, i), "round {round}");
        }
        k.dev.write(&bf16(&vec![-2.0; o * i]), &w, 0).unwrap();
        k.dev.gemm(&g).unwrap();
        assert_eq!(k.download(&c).unwrap(), want(&k, &x, &w, n, o, i), "after a copy to the weights");
        // A kernel that only reads the weights (a gather with them as the table, as a tied
        // embedding is) leaves them widened; one that writes them does not.
        let widens = || emu_stats(&k).widens.load(Ordering::Relaxed);
        let before = widens();
        let rows = k.zeros::<u16>(i).unwrap();
        k.embedding::<Bf16>(&mut { rows }, &w, k.upload(&[1u32]).unwrap().as_view(), 1, i as u32).unwrap();
        k.dev.gemm(&g).unwrap();
        assert_eq!(widens(), before, "a kernel that only read the weights made them widen again");
        k.fill_dummy::<Bf16>(&mut w, 9, 0.5).unwrap();
        k.dev.gemm(&g).unwrap();
        let got = k.download(&c).unwrap();
        assert_eq!(got, want(&k, &x, &w, n, o, i), "after a kernel wrote the weights");
        assert_eq!(widens(), before + 1);
        assert!(got.iter().any(|&v| v != -2.0 * got.len() as f32), "the fill changed nothing");
    }
}
