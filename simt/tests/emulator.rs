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
    assert!(e.detail.contains("word 3 (byte 12)"), "{e}");
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
    assert!(e.detail.contains("data is [") && e.detail.contains("offset 128"), "{e}");
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

trait First {
    fn into_first(self) -> Dim3;
}
impl First for Dim3 {
    /// `Dim3::x(i)` as an index: `(i, 0, 0)`.
    fn into_first(self) -> Dim3 {
        Dim3::new(self.x, 0, 0)
    }
}
