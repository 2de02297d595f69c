//! The conformance kernel: one launch that puts inputs through every primitive of the
//! [`gpu`](crate::gpu) seam (indices, barriers, shared memory, shuffles, 16-byte read-only
//! loads, `ldmatrix`, `cp.async`, `mma.sync` in f16 and bf16) and writes what each thread saw.
//! A GPU's output is compared with the emulator's on the same inputs (`tools/gpu/check.sh`
//! runs it first): bit for bit, but for the MMAs' sums, whose order the hardware does not
//! promise. So the first run on a new GPU proves the emulator's model of that hardware, and the
//! emulator's tests check the same kernel against the PTX ISA's definitions.
//!
//! Launch: [`GRID`] blocks of 128 threads, [`SMEM_BYTES`] of shared memory; `inp` is
//! [`input`]'s words, `out` [`OUT_WORDS`] words a thread.

use crate::gpu::{self, cp_async_16, ldmatrix_x4, mma_16816, Global, Shared, FULL};
use crate::{Bf16, F16};

/// Thread blocks of the launch.
pub const GRID: u32 = 2;
const THREADS: u32 = crate::BLOCK_THREADS;
/// Threads of the launch.
pub const NTHREADS: usize = (GRID * THREADS) as usize;
/// Words each thread writes.
pub const OUT_WORDS: usize = 32;
/// Dynamic shared memory of the launch.
pub const SMEM_BYTES: u32 = 4096;

/// Word offsets of the input's regions.
pub mod region {
    use super::NTHREADS;
    /// A random word a thread: shuffles, shared memory, `ldmatrix`'s matrices.
    pub const INTS: usize = 0;
    /// A random f32 bit pattern a thread (NaNs included: shuffles move bits).
    pub const FLOATS: usize = INTS + NTHREADS;
    /// A random word a thread, whose low 5 bits pick a `shfl.idx` source lane.
    pub const LANES: usize = FLOATS + NTHREADS;
    /// 64 16-byte vectors for the read-only loads.
    pub const V4: usize = LANES + NTHREADS;
    /// 16 bytes a thread of a block for `cp.async`.
    pub const ASYNC: usize = V4 + 256;
    /// The MMAs' fragments: A (4 words a thread) and B (2) of packed f16, then of bf16, then
    /// C (4 f32 a thread).
    pub const A16: usize = ASYNC + 4 * 128;
    pub const B16: usize = A16 + 4 * NTHREADS;
    pub const ABF: usize = B16 + 2 * NTHREADS;
    pub const BBF: usize = ABF + 4 * NTHREADS;
    pub const C: usize = BBF + 2 * NTHREADS;
    pub const END: usize = C + 4 * NTHREADS;
}

/// Word offsets of each thread's output sections.
pub mod slot {
    /// `tid | bx << 8 | grid_dim_x << 16`.
    pub const INDEX: usize = 0;
    /// `shfl.bfly` of INTS by 1, 2, 4, 8, 16.
    pub const XOR: usize = 1;
    /// `shfl.bfly.f32` of FLOATS by 1 and 16.
    pub const XOR_F32: usize = 6;
    /// `shfl.idx.f32` of FLOATS from lane `LANES % 32`.
    pub const IDX: usize = 8;
    /// Shared word `(7 tid + 3) % 128` after every thread wrote `INTS ^ 0x5a5a5a5a` at `tid`.
    pub const SHARED: usize = 9;
    /// The 16-byte vector `tid % 64` of V4.
    pub const V4: usize = 10;
    /// `ldmatrix.x4`, then `.x4.trans`, over the block's INTS as four 8x8 matrices, lane `l`
    /// pointing at row `(5 l + warp) % 32`.
    pub const LDMATRIX: usize = 14;
    pub const LDMATRIX_T: usize = 18;
    /// After every thread's `cp.async` of its 16 ASYNC bytes: word `tid % 4` of thread
    /// `(tid + 1) % 128`'s copy.
    pub const ASYNC: usize = 22;
    /// `mma.m16n8k16` f16 then bf16: the 4 f32 of D.
    pub const MMA_F16: usize = 23;
    pub const MMA_BF16: usize = 27;
    /// [`super::MARK`]: the thread got to the end.
    pub const END: usize = 31;
}

/// The last word of every thread's output.
pub const MARK: u32 = 0xC0FF_EE00;

/// Byte offsets in shared memory.
const SM_WORDS: usize = 0; // 128 words: the shared-memory section
const SM_MATRIX: usize = 512; // 512 bytes: four 8x8 matrices of 16-bit values
const SM_ASYNC: usize = 1024; // 128 x 16 bytes

#[inline(always)]
unsafe fn conformance(inp: Global<u32>, out: Global<u32>) {
    let (t, bx) = (gpu::tid(), gpu::bx());
    let gt = (bx * THREADS + t) as usize;
    let (lane, warp) = (t % 32, t / 32);
    let o = unsafe { out.add(gt * OUT_WORDS) };
    let word = |i: usize| unsafe { inp.add(i).read() };
    unsafe {
        o.add(slot::INDEX).write(t | bx << 8 | gpu::grid_dim_x() << 16);
        let v = word(region::INTS + gt);
        let mut m = 1;
        for k in 0..5 {
            o.add(slot::XOR + k).write(gpu::shfl_xor_u32(FULL, v, m));
            m <<= 1;
        }
        let f = f32::from_bits(word(region::FLOATS + gt));
        o.add(slot::XOR_F32).write(gpu::shfl_xor_f32(FULL, f, 1).to_bits());
        o.add(slot::XOR_F32 + 1).write(gpu::shfl_xor_f32(FULL, f, 16).to_bits());
        o.add(slot::IDX).write(gpu::shfl_idx_f32(FULL, f, word(region::LANES + gt) % 32).to_bits());

        // Shared memory across warps, ordered by barriers.
        let sw = Shared::<u32>::base().add(SM_WORDS / 4);
        sw.add(t as usize).write(v ^ 0x5a5a_5a5a);
        gpu::sync_threads();
        o.add(slot::SHARED).write(sw.add(((7 * t + 3) % THREADS) as usize).read());

        let x = inp.add(region::V4 + 4 * (t % 64) as usize).ld_nc_v4();
        for (k, w) in x.iter().enumerate() {
            o.add(slot::V4 + k).write(*w);
        }

        // ldmatrix: the block's INTS words as 256 16-bit values, four 8x8 matrices.
        let sm = Shared::<u32>::base().add(SM_MATRIX / 4);
        sm.add(t as usize).write(word(region::INTS + (bx * THREADS) as usize + t as usize));
        gpu::sync_threads();
        let row = Shared::<u8>::base().add(SM_MATRIX + 16 * ((5 * lane + warp) % 32) as usize);
        let r = ldmatrix_x4(row, false);
        let rt = ldmatrix_x4(row, true);
        for k in 0..4 {
            o.add(slot::LDMATRIX + k).write(r[k]);
            o.add(slot::LDMATRIX_T + k).write(rt[k]);
        }

        // cp.async: each thread's 16 bytes, read back by its neighbour after the wait.
        let sa = Shared::<u32>::base().add(SM_ASYNC / 4);
        cp_async_16(sa.add(4 * t as usize), inp.add(region::ASYNC + 4 * t as usize));
        gpu::cp_async_commit();
        gpu::cp_async_wait_all();
        gpu::sync_threads();
        o.add(slot::ASYNC).write(sa.add((4 * ((t + 1) % THREADS) + t % 4) as usize).read());

        // One MMA a warp in each 16-bit type.
        let frag4 = |base: usize| {
            [word(base + 4 * gt), word(base + 4 * gt + 1), word(base + 4 * gt + 2), word(base + 4 * gt + 3)]
        };
        let c = frag4(region::C).map(f32::from_bits);
        let mut d = c;
        mma_16816::<F16>(&mut d, frag4(region::A16), [word(region::B16 + 2 * gt), word(region::B16 + 2 * gt + 1)]);
        let mut e = c;
        mma_16816::<Bf16>(&mut e, frag4(region::ABF), [word(region::BBF + 2 * gt), word(region::BBF + 2 * gt + 1)]);
        for k in 0..4 {
            o.add(slot::MMA_F16 + k).write(d[k].to_bits());
            o.add(slot::MMA_BF16 + k).write(e[k].to_bits());
        }
        o.add(slot::END).write(MARK);
    }
}

crate::kernel! {
    fn gpu_conformance(inp: *const u32, out: *mut u32) {
        conformance(Global::new(inp), Global::new(out))
    }
}

/// The launch's inputs for `seed` ([`region::END`] words): random words, and for the MMAs
/// 16-bit values in [-2, 2] and f32 accumulators in [-1, 1].
#[cfg(not(target_arch = "nvptx64"))]
pub fn input(seed: u64) -> std::vec::Vec<u32> {
    use crate::Elem;
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut v: std::vec::Vec<u32> = (0..region::END).map(|_| next() as u32).collect();
    let mut unit = || (next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
    for i in region::A16..region::ABF {
        v[i] = F16::from_f32(2.0 * unit()).0 as u32 | (F16::from_f32(2.0 * unit()).0 as u32) << 16;
    }
    for i in region::ABF..region::C {
        v[i] = Bf16::from_f32(2.0 * unit()).0 as u32 | (Bf16::from_f32(2.0 * unit()).0 as u32) << 16;
    }
    for w in &mut v[region::C..region::END] {
        *w = unit().to_bits();
    }
    v
}

/// Compares two runs' outputs (`GRID * 128 * OUT_WORDS` words): every section bit for bit,
/// the MMAs' within `1e-3` relative to their magnitude. Names each differing section with
/// its first differing thread, and counts them.
#[cfg(not(target_arch = "nvptx64"))]
pub fn compare(a: &[u32], b: &[u32]) -> Result<(), std::string::String> {
    use std::format;
    let sections: [(&str, usize, usize, bool); 11] = [
        ("index", slot::INDEX, 1, false),
        ("shfl.bfly.b32", slot::XOR, 5, false),
        ("shfl.bfly.f32", slot::XOR_F32, 2, false),
        ("shfl.idx.f32", slot::IDX, 1, false),
        ("shared memory", slot::SHARED, 1, false),
        ("ld.global.nc.v4", slot::V4, 4, false),
        ("ldmatrix.x4", slot::LDMATRIX, 4, false),
        ("ldmatrix.x4.trans", slot::LDMATRIX_T, 4, false),
        ("cp.async", slot::ASYNC, 1, false),
        ("mma f16", slot::MMA_F16, 4, true),
        ("mma bf16", slot::MMA_BF16, 4, true),
    ];
    if a.len() != NTHREADS * OUT_WORDS || b.len() != a.len() {
        return Err(format!("outputs of {} and {} words, want {}", a.len(), b.len(), NTHREADS * OUT_WORDS));
    }
    let mut bad = std::vec::Vec::new();
    for t in 0..NTHREADS {
        for r in [a, b] {
            if r[t * OUT_WORDS + slot::END] != MARK {
                return Err(format!("thread {t} did not reach the end of the kernel"));
            }
        }
    }
    for (name, at, n, approx) in sections {
        let mut first = None;
        let mut count = 0;
        for t in 0..NTHREADS {
            for k in at..at + n {
                let (x, y) = (a[t * OUT_WORDS + k], b[t * OUT_WORDS + k]);
                let same = if approx {
                    let (x, y) = (f32::from_bits(x), f32::from_bits(y));
                    (x - y).abs() <= 1e-3 * (1.0 + x.abs().max(y.abs()))
                } else {
                    x == y
                };
                if !same {
                    count += 1;
                    first.get_or_insert((t, k - at, x, y));
                }
            }
        }
        if let Some((t, k, x, y)) = first {
            bad.push(format!("{name}: {count} words differ, first thread {t} word {k}: {x:#010x} vs {y:#010x}"));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("; "))
    }
}
