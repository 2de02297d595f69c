//! The emulator's rules, each with a kernel that keeps it and one that breaks it.

use std::time::Instant;
use weave_simt::*;

const FULL: u32 = 0xffff_ffff;

/// A raw pointer a kernel closure may capture (the blocks run on several OS threads, as a
/// GPU's do; the kernels write disjoint elements).
#[derive(Clone, Copy)]
struct P<T>(*mut T);
unsafe impl<T> Send for P<T> {}
unsafe impl<T> Sync for P<T> {}
impl<T> P<T> {
    /// Through a method, so that a closure captures the wrapper, not the bare pointer.
    fn get(self) -> *mut T {
        self.0
    }
}

fn tid() -> u32 {
    thread_idx().x
}

/// The sum over a block of 128 threads: warp sums by butterfly shuffles, one word per warp in
/// shared memory, a barrier, then warp 0 adds the four.
fn block_sum(v: f32) -> f32 {
    let mut s = v;
    let mut o = 16;
    while o > 0 {
        s += shfl_xor_f32(FULL, s, o);
        o >>= 1;
    }
    if lane_id() == 0 {
        smem_st_f32((tid() / 32) as usize, s);
    }
    sync_threads();
    (0..4).map(smem_ld_f32).sum()
}

#[test]
fn a_block_sum_over_a_grid_is_right() {
    let blocks = 16u32;
    let input: Vec<f32> = (0..blocks * 128).map(|i| (i % 97) as f32 * 0.5).collect();
    let mut out = vec![0f32; blocks as usize];
    let (pi, po) = (P(input.as_ptr() as *mut f32), P(out.as_mut_ptr()));
    let l =
        Launch::new("block_sum", Dim3::x(blocks), Dim3::x(128)).smem(16).buffer("input", &input).buffer("out", &out);
    let st = launch(&l, || {
        let b = block_idx().x;
        let v = unsafe { ld(pi.get().add((b * 128 + tid()) as usize)) };
        let s = block_sum(v);
        if tid() == 0 {
            unsafe { st(po.get().add(b as usize), s) };
        }
    })
    .unwrap();
    for b in 0..blocks as usize {
        let want: f32 = input[b * 128..(b + 1) * 128].iter().sum();
        assert!((out[b] - want).abs() < 1e-3, "block {b}: {} vs {want}", out[b]);
    }
    assert_eq!(st.blocks, blocks as u64);
    assert_eq!(st.barriers, blocks as u64, "one barrier a block");
    assert_eq!(st.warp_ops, blocks as u64 * 4 * 5, "five shuffles per warp");
}

#[test]
fn a_missing_barrier_is_a_race_naming_both_accesses() {
    let l = Launch::new("neighbour", Dim3::x(1), Dim3::x(64)).smem(64 * 4);
    let e = launch(&l, || {
        smem_st(tid() as usize, tid());
        sync_threads();
        smem_st(tid() as usize, tid() + 100);
        // sync_threads() belongs here.
        let _ = smem_ld(((tid() + 1) % 64) as usize);
    })
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::SharedRace, "{e}");
    // Thread 0 read word 1 in this interval; thread 1 then writes it.
    assert!(e.detail.contains("thread (0, 0, 0) read") && e.detail.contains("thread (1, 0, 0) writes"), "{e}");
    assert!(e.detail.contains("emulator.rs"), "the sites are named: {e}");
    // With the barrier, the same kernel passes.
    launch(&l, || {
        smem_st(tid() as usize, tid());
        sync_threads();
        assert_eq!(smem_ld(((tid() + 1) % 64) as usize), (tid() + 1) % 64);
    })
    .unwrap();
}

#[test]
fn a_write_after_others_read_without_a_barrier_is_a_race() {
    let l = Launch::new("war", Dim3::x(1), Dim3::x(64)).smem(4);
    let e = launch(&l, || {
        if tid() == 0 {
            smem_st(0, 7);
        }
        sync_threads();
        let _ = smem_ld(0);
        // A second barrier belongs here before thread 63 overwrites the word.
        if tid() == 63 {
            smem_st(0, 8);
        }
    })
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::SharedRace, "{e}");
    assert!(e.detail.contains("write-after-read"), "{e}");
}

#[test]
fn lanes_of_one_warp_are_ordered_by_a_warp_collective_not_across_warps() {
    // Lane 0 writes, __syncwarp, lane 5 reads: legal without a block barrier.
    let l = Launch::new("syncwarp", Dim3::x(1), Dim3::x(64)).smem(8);
    launch(&l, || {
        if tid() == 0 {
            smem_st(0, 42);
        }
        sync_warp(FULL);
        if tid() == 5 {
            assert_eq!(smem_ld(0), 42);
        }
    })
    .unwrap();
    // Without the __syncwarp it is a race.
    let e = launch(&l, || {
        if tid() == 0 {
            smem_st(0, 42);
        }
        if tid() == 5 {
            let _ = smem_ld(0);
        }
    })
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::SharedRace, "{e}");
    // A warp collective does not order lanes of different warps.
    let e = launch(&l, || {
        if tid() == 0 {
            smem_st(0, 42);
        }
        sync_warp(FULL);
        if tid() == 40 {
            let _ = smem_ld(0);
        }
    })
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::SharedRace, "{e}");
}

#[test]
#[allow(clippy::if_same_then_else)] // the same call at two sites is the point
fn threads_at_different_barriers_are_a_divergent_barrier() {
    let l = Launch::new("divergent", Dim3::x(2), Dim3::x(128));
    let e = launch(&l, || {
        if tid() < 64 {
            sync_threads();
        } else {
            sync_threads();
        }
    })
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::DivergentBarrier, "{e}");
    assert!(e.detail.contains("64 thread(s)"), "{e}");
    assert_eq!(e.block, Dim3::x(0).into_first(), "the lowest failing block is reported");
}

#[test]
fn a_barrier_waits_only_for_live_threads() {
    // Threads that have exited do not hold a barrier (as on sm_70+).
    let l = Launch::new("early_exit", Dim3::x(1), Dim3::x(64)).smem(4);
    launch(&l, || {
        if tid() >= 32 {
            return;
        }
        if tid() == 0 {
            smem_st(0, 1);
        }
        sync_threads();
        assert_eq!(smem_ld(0), 1);
    })
    .unwrap();
}

#[test]
fn warp_member_masks_are_checked() {
    let l = Launch::new("mask", Dim3::x(1), Dim3::x(32));
    // Every lane runs a shuffle whose mask leaves lane 0 out: lane 0 is not in its own mask.
    let e = launch(&l, || {
        let _ = shfl_xor(0xffff_fffe, tid(), 1);
    })
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::WarpMask, "{e}");
    assert!(e.detail.contains("leaves it out"), "{e}");
    // A lane of the mask has exited.
    let e = launch(&l, || {
        if tid() == 31 {
            return;
        }
        let _ = shfl_xor(FULL, tid(), 1);
    })
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::WarpMask, "{e}");
    assert!(e.detail.contains("lane 31") && e.detail.contains("exited"), "{e}");
    // A lane of the mask waits at a barrier instead.
    let e = launch(&Launch::new("mask", Dim3::x(1), Dim3::x(64)), || {
        if tid() == 3 {
            sync_threads();
        }
        let _ = shfl_xor(FULL, tid(), 1);
        if tid() != 3 {
            sync_threads();
        }
    })
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::WarpMask, "{e}");
    assert!(e.detail.contains("lane 3"), "{e}");
    // Half a warp shuffling among itself is fine, if the source lanes are in the mask.
    launch(&l, || {
        if tid() < 16 {
            let v = shfl_xor(0x0000_ffff, tid(), 1);
            assert_eq!(v, tid() ^ 1);
        }
    })
    .unwrap();
    let e = launch(&l, || {
        if tid() < 16 {
            let _ = shfl_idx(0x0000_ffff, tid(), 20);
        }
    })
    .unwrap_err();
    assert!(e.detail.contains("not in the member mask"), "{e}");
}

#[test]
fn shuffles_follow_ptx() {
    let mut out = vec![0u32; 32 * 4];
    let po = P(out.as_mut_ptr());
    let l = Launch::new("shfl", Dim3::x(1), Dim3::x(32)).buffer("out", &out);
    launch(&l, || {
        let t = tid();
        let v = 100 + t;
        let r = [shfl_xor(FULL, v, 5), shfl_idx(FULL, v, 7 + 32), shfl_up(FULL, v, 3), shfl_down(FULL, v, 3)];
        for (k, x) in r.iter().enumerate() {
            unsafe { st(po.get().add(k * 32 + t as usize), *x) };
        }
    })
    .unwrap();
    for t in 0..32u32 {
        assert_eq!(out[t as usize], 100 + (t ^ 5));
        assert_eq!(out[32 + t as usize], 107, "idx takes the source lane mod 32");
        assert_eq!(out[64 + t as usize], 100 + if t >= 3 { t - 3 } else { t });
        assert_eq!(out[96 + t as usize], 100 + if t + 3 <= 31 { t + 3 } else { t });
    }
}

#[test]
fn shared_memory_starts_poisoned() {
    let l = Launch::new("uninit", Dim3::x(1), Dim3::x(32)).smem(128);
    let e = launch(&l, || {
        if tid() == 9 {
            let _ = smem_ld(3);
        }
    })
    .unwrap_err();
    assert_eq!((e.kind, e.thread), (ErrorKind::UninitRead, Some(Dim3::x(9).into_first())), "{e}");
    assert!(e.detail.contains("bytes [12, 14)"), "{e}");
    // With the check off, the read gives the poison: a NaN that spoils any sum it enters.
    let l = l.checks(Checks { uninit_reads: false, ..Checks::default() });
    launch(&l, || {
        if tid() == 0 {
            assert_eq!(smem_ld(3), POISON);
            assert!(smem_ld_f32(3).is_nan());
        }
    })
    .unwrap();
}

#[test]
fn accesses_are_bounds_and_alignment_checked() {
    let l = Launch::new("oob", Dim3::x(1), Dim3::x(32)).smem(64);
    let e = launch(&l, || {
        if tid() == 0 {
            smem_st(16, 1);
        }
    })
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::OutOfBounds, "{e}");
    assert!(e.detail.contains("past the launch's 64 bytes"), "{e}");

    let data = vec![0u32; 32];
    let p = P(data.as_ptr() as *mut u32);
    let l = Launch::new("oob", Dim3::x(1), Dim3::x(33)).buffer("data", &data);
    let e = launch(&l, || {
        // An off-by-one: 33 threads over 32 elements.
        unsafe { st(p.get().add(tid() as usize), 1) };
    })
    .unwrap_err();
    assert_eq!((e.kind, e.thread), (ErrorKind::OutOfBounds, Some(Dim3::x(32).into_first())), "{e}");
    assert!(e.detail.contains("nearest: data is [") && e.detail.contains("the access at offset 128"), "{e}");
    let e = launch(&Launch::new("misaligned", Dim3::x(1), Dim3::x(1)).buffer("data", &data), || {
        let _ = unsafe { ld((p.get() as *const u8).add(2) as *const u32) };
    })
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Misaligned, "{e}");
}

#[test]
fn the_lane_order_switch_exposes_order_dependence() {
    // Every thread writes word 0 with no barrier: the last writer wins, and which one is last
    // is an order no hardware promises. The race check names it; with it off, the two lane
    // orders give different words.
    let l = Launch::new("last_writer", Dim3::x(1), Dim3::x(64)).smem(4);
    let k = || {
        smem_st(0, tid());
        sync_threads();
        let _ = smem_ld(0);
    };
    assert_eq!(launch(&l, k).unwrap_err().kind, ErrorKind::SharedRace);
    let mut seen = Vec::new();
    for reverse in [false, true] {
        let mut out = vec![0u32; 1];
        let po = P(out.as_mut_ptr());
        let checks = Checks { races: false, reverse_lanes: reverse, ..Checks::default() };
        launch(&l.clone().checks(checks).buffer("out", &out), || {
            smem_st(0, tid());
            sync_threads();
            if tid() == 0 {
                unsafe { st(po.get(), smem_ld(0)) };
            }
        })
        .unwrap();
        seen.push(out[0]);
    }
    assert_eq!(seen, vec![63, 32], "forward ends with thread 63, reversed warps end with lane 0 of warp 1");
}

#[test]
fn a_kernel_panic_is_reported_with_its_thread() {
    let l = Launch::new("panics", Dim3::x(1), Dim3::x(32));
    let e = launch(&l, || {
        assert!(tid() != 17, "thread 17 is unhappy");
    })
    .unwrap_err();
    assert_eq!((e.kind, e.thread), (ErrorKind::Panic, Some(Dim3::x(17).into_first())), "{e}");
    assert!(e.detail.contains("thread 17 is unhappy"), "{e}");
}

/// Throughput, for the record (printed, not asserted: machines here are shared and noisy).
#[test]
fn throughput_of_barriers_and_shuffles() {
    let (blocks, threads, rounds) = (64u32, 128u32, 32u32);
    let l = Launch::new("rounds", Dim3::x(blocks), Dim3::x(threads)).smem(threads as usize * 4);
    let t0 = Instant::now();
    let st = launch(&l, || {
        let mut acc = tid();
        for r in 0..rounds {
            smem_st(tid() as usize, acc);
            sync_threads();
            acc = acc.wrapping_add(smem_ld(((tid() + r) % 128) as usize));
            acc = shfl_xor(FULL, acc, 1 + r % 16);
            sync_threads();
        }
    })
    .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(st.barriers, (blocks * rounds * 2) as u64);
    assert_eq!(st.warp_ops, (blocks * rounds * threads / 32) as u64);
    let lane_barriers = (st.threads * rounds as u64 * 2) as f64;
    println!(
        "weave-simt: {} blocks x {} threads x {} barriers + {} shuffles in {:.3} s: {:.2e} lane-barriers/s, {:.2e} switches/s",
        blocks,
        threads,
        rounds * 2,
        rounds,
        secs,
        lane_barriers / secs,
        st.switches as f64 / secs
    );
}

/// 16-bit values as the bits of `ty`.
fn bits(ty: MmaType, x: f32) -> u16 {
    match ty {
        MmaType::F16 => half::f16::from_f32(x).to_bits(),
        MmaType::Bf16 => half::bf16::from_f32(x).to_bits(),
    }
}
fn val(ty: MmaType, b: u16) -> f32 {
    match ty {
        MmaType::F16 => half::f16::from_bits(b).to_f32(),
        MmaType::Bf16 => half::bf16::from_bits(b).to_f32(),
    }
}

/// Small pseudo-random values, exact in both 16-bit types.
fn sample(i: usize) -> f32 {
    ((i * 37 + 11) % 29) as f32 / 8.0 - 1.75
}

/// D = A B + C through one emulated `mma.sync`, the fragments built by the test from the PTX
/// ISA's layout (written here independently of the emulator), optionally with two A
/// registers swapped as a kernel bug would.
fn mma_through_emulator(ty: MmaType, swap_a12: bool) -> (Vec<f32>, Vec<f32>) {
    let a: Vec<u16> = (0..256).map(|i| bits(ty, sample(i))).collect(); // 16x16 row-major
    let b: Vec<u16> = (0..128).map(|i| bits(ty, sample(i + 300))).collect(); // 16x8, b[k * 8 + n]
    let c: Vec<f32> = (0..128).map(|i| sample(i + 700)).collect(); // 16x8 row-major
    let mut d = vec![0f32; 128];
    let (pa, pb, pc, pd) =
        (P(a.as_ptr() as *mut u16), P(b.as_ptr() as *mut u16), P(c.as_ptr() as *mut f32), P(d.as_mut_ptr()));
    let l = Launch::new("mma", Dim3::x(1), Dim3::x(32)).buffer("a", &a).buffer("b", &b).buffer("c", &c).buffer("d", &d);
    launch(&l, || {
        let (g, t) = ((lane_id() / 4) as usize, (lane_id() % 4) as usize);
        let at = |r: usize, col: usize| unsafe { ld(pa.get().add(r * 16 + col)) as u32 };
        let bt = |k: usize, n: usize| unsafe { ld(pb.get().add(k * 8 + n)) as u32 };
        // A: a0a1 row g cols 2t,2t+1; a2a3 row g+8; a4a5 row g cols +8; a6a7 row g+8 cols +8.
        let mut fa = [0u32; 4];
        for (r, f) in fa.iter_mut().enumerate() {
            let (row, col) = (g + if r % 2 == 1 { 8 } else { 0 }, 2 * t + if r >= 2 { 8 } else { 0 });
            *f = at(row, col) | at(row, col + 1) << 16;
        }
        if swap_a12 {
            fa.swap(1, 2);
        }
        // B: b0b1 rows 2t,2t+1 of column g; b2b3 rows 2t+8,2t+9.
        let fb = [bt(2 * t, g) | bt(2 * t + 1, g) << 16, bt(2 * t + 8, g) | bt(2 * t + 9, g) << 16];
        // C/D: c0c1 row g cols 2t,2t+1; c2c3 row g+8.
        let idx = |i: usize| (g + 8 * (i / 2)) * 8 + 2 * t + i % 2;
        let fc = [0, 1, 2, 3].map(|i| unsafe { ld(pc.get().add(idx(i))) });
        let fd = mma_m16n8k16(ty, fa, fb, fc);
        for (i, v) in fd.iter().enumerate() {
            unsafe { st(pd.get().add(idx(i)), *v) };
        }
    })
    .unwrap();
    let mut want = vec![0f32; 128];
    for r in 0..16 {
        for n in 0..8 {
            let s: f64 = (0..16).map(|k| val(ty, a[r * 16 + k]) as f64 * val(ty, b[k * 8 + n]) as f64).sum();
            want[r * 8 + n] = (s + c[r * 8 + n] as f64) as f32;
        }
    }
    (d, want)
}

#[test]
fn mma_follows_the_ptx_fragment_layouts() {
    for ty in [MmaType::F16, MmaType::Bf16] {
        let (d, want) = mma_through_emulator(ty, false);
        for (i, (x, y)) in d.iter().zip(&want).enumerate() {
            assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "{ty:?} [{i}]: {x} vs {y}");
        }
        // A kernel that swaps two fragment registers gets wrong numbers, not a lucky pass.
        let (d, want) = mma_through_emulator(ty, true);
        let wrong = d.iter().zip(&want).filter(|(x, y)| (*x - *y).abs() > 1e-3).count();
        assert!(wrong > 64, "{ty:?}: swapped registers changed only {wrong} of 128 results");
    }
}

#[test]
fn mma_needs_the_whole_warp() {
    let l = Launch::new("mma_half", Dim3::x(1), Dim3::x(32));
    let e = launch(&l, || {
        if lane_id() < 16 {
            let _ = mma_m16n8k16(MmaType::F16, [0; 4], [0; 2], [0.0; 4]);
        }
    })
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::WarpMask, "{e}");
}

/// `ldmatrix.x4` over a row-major 16x16 tile in shared memory gives exactly mma's A fragment
/// (lanes 0-15 give rows 0-15 at column 0, lanes 16-31 the same rows at column 8); `.trans`
/// gives the transposed 8x8 blocks.
#[test]
fn ldmatrix_loads_fragments() {
    let tile: Vec<u16> = (0..256).map(|i| i as u16).collect();
    let mut out = vec![0u32; 32 * 8];
    let (pt, po) = (P(tile.as_ptr() as *mut u16), P(out.as_mut_ptr()));
    let l = Launch::new("ldmatrix", Dim3::x(1), Dim3::x(32)).smem(512).buffer("tile", &tile).buffer("out", &out);
    launch(&l, || {
        let lane = lane_id() as usize;
        for k in 0..8 {
            let i = lane * 8 + k;
            smem_write::<u16>(2 * i, unsafe { ld(pt.get().add(i)) });
        }
        sync_threads();
        let (row, col) = (lane % 16, 8 * (lane / 16));
        let r = ldmatrix(4, false, 2 * (row * 16 + col));
        let rt = ldmatrix(4, true, 2 * (row * 16 + col));
        for i in 0..4 {
            unsafe { st(po.get().add(lane * 8 + i), r[i]) };
            unsafe { st(po.get().add(lane * 8 + 4 + i), rt[i]) };
        }
    })
    .unwrap();
    let el = |r: usize, c: usize| (r * 16 + c) as u32;
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        for reg in 0..4 {
            let (row, col) = (g + 8 * (reg % 2), 2 * t + 8 * (reg / 2));
            assert_eq!(out[lane * 8 + reg], el(row, col) | el(row, col + 1) << 16, "lane {lane} reg {reg}");
            // .trans: matrix `reg` (rows 8 (reg % 2).., cols 8 (reg / 2)..) read by columns.
            let (r0, c0) = (8 * (reg % 2), 8 * (reg / 2));
            let want = el(r0 + 2 * t, c0 + g) | el(r0 + 2 * t + 1, c0 + g) << 16;
            assert_eq!(out[lane * 8 + 4 + reg], want, "lane {lane} trans reg {reg}");
        }
    }
}

#[test]
fn cp_async_lands_only_at_the_wait() {
    let src: Vec<u32> = (0..64).map(|i| 1000 + i).collect();
    let ps = P(src.as_ptr() as *mut u32);
    let l = Launch::new("cp_async", Dim3::x(1), Dim3::x(16)).smem(256).buffer("src", &src);
    // Reading before the wait is reading memory no copy has reached yet.
    let e = launch(&l, || {
        let t = thread_idx().x as usize;
        unsafe { cp_async(16 * t, ps.get().add(4 * t) as *const u8, 16) };
        cp_async_commit();
        let _ = smem_read::<u32>(16 * t);
    })
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::UninitRead, "{e}");
    // Two groups: wait_group 1 lands the older only.
    launch(&l, || {
        let t = thread_idx().x as usize;
        unsafe { cp_async(16 * t, ps.get().add(4 * t) as *const u8, 8) };
        cp_async_commit();
        unsafe { cp_async(16 * t + 8, ps.get().add(4 * t + 2) as *const u8, 8) };
        cp_async_commit();
        cp_async_wait(1);
        assert_eq!(smem_read::<u32>(16 * t), 1000 + 4 * t as u32);
        cp_async_wait(0);
        assert_eq!(smem_read::<[u32; 2]>(16 * t + 8), [1002 + 4 * t as u32, 1003 + 4 * t as u32]);
    })
    .unwrap();
}

#[test]
fn halves_of_one_word_are_separate_for_the_race_check() {
    // 64 threads write adjacent 16-bit values (two per word) in one interval: no conflict on
    // the GPU, none here.
    let l = Launch::new("halves", Dim3::x(1), Dim3::x(64)).smem(128);
    launch(&l, || {
        let t = thread_idx().x;
        smem_write::<u16>(2 * t as usize, t as u16);
        sync_threads();
        if t % 2 == 0 {
            assert_eq!(smem_ld((t / 2) as usize), t | (t + 1) << 16);
        }
    })
    .unwrap();
    // A 16-byte load must be 16-byte aligned.
    let data = vec![0u32; 8];
    let p = P(data.as_ptr() as *mut u32);
    let e = launch(&Launch::new("v4", Dim3::x(1), Dim3::x(1)).buffer("data", &data), || {
        let _ = unsafe { ld_v4(p.get().add(1)) };
    })
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Misaligned, "{e}");
}

trait First {
    fn into_first(self) -> Dim3;
}
impl First for Dim3 {
    /// `Dim3::x(i)` as an index: `(i, 0, 0)`.
    fn into_first(self) -> Dim3 {
        Dim3::new(self.x, 0, 0)
    }
}
