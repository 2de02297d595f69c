//! weave's GPU kernels on the CPU, under the SIMT emulator (weave-simt): each ported family
//! against a plain f64 reference, at the tolerances the GPU tests use, with every barrier,
//! shuffle mask, shared-memory access and global access checked. Runs on any machine.
//!
//! Ported so far: the norm family (kernels-gpu's `kernels::norm`). The other families join as
//! they move onto the `gpu` seam (issue 19).

mod common;

use weave_kernels_gpu::kernels::norm;
use weave_kernels_gpu::{Bf16, Elem, BLOCK_THREADS, F16};
use weave_simt::{Dim3, EmuError, Launch, Stats};

fn rnd(n: usize, seed: u64) -> Vec<f32> {
    let mut r = common::Rng(seed | 1);
    (0..n).map(|_| r.uniform() as f32).collect()
}

/// One shared f32 per warp: what the norm kernels need, and no more (an access past it is an
/// error).
fn launch(name: &str, rows: usize) -> Launch {
    Launch::new(name, Dim3::x(rows as u32), Dim3::x(BLOCK_THREADS)).smem(BLOCK_THREADS as usize / 32 * 4)
}

/// `x * w / sqrt(mean(x^2) + eps)` in f64.
fn rms_ref(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
    x.iter().zip(w).map(|(v, &g)| v * inv * g as f64).collect()
}

fn max_err<T: Elem>(got: &[T], want: &[f64]) -> f64 {
    got.iter().zip(want).map(|(g, w)| (g.to_f32() as f64 - w).abs()).fold(0.0, f64::max)
}

type RmsLaunch<T> = fn(&Launch, *mut T, *const T, *const f32, u32, f32) -> Result<Stats, EmuError>;
type FusedLaunch<T> = fn(&Launch, *mut T, *mut T, *const f32, u32, f32) -> Result<Stats, EmuError>;

fn norms<T: Elem>(rms: RmsLaunch<T>, fused: FusedLaunch<T>, tol: f64) {
    let eps = 1e-5;
    // SmolLM2's hidden size, one under a multiple of the block, and a row shorter than it.
    for (rows, n) in [(7usize, 576usize), (3, 127), (2, 100)] {
        let conv = |v: &[f32]| v.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>();
        let x = conv(&rnd(rows * n, 1 + n as u64));
        let w = rnd(n, 2 + n as u64);
        let mut out = vec![T::default(); rows * n];
        let l = launch(&format!("rms_norm_{}", T::NAME), rows).buffer("out", &out).buffer("x", &x).buffer("w", &w);
        let st = rms(&l, out.as_mut_ptr(), x.as_ptr(), w.as_ptr(), n as u32, eps).unwrap();
        assert_eq!((st.blocks, st.barriers), (rows as u64, rows as u64));
        let want: Vec<f64> = x
            .chunks(n)
            .flat_map(|r| rms_ref(&r.iter().map(|v| v.to_f32() as f64).collect::<Vec<_>>(), &w, eps as f64))
            .collect();
        let e = max_err(&out, &want);
        assert!(e < tol, "rms_norm_{} rows {rows} n {n}: {e}", T::NAME);

        // Fused: residual += x (stored as T), then x = rms_norm(residual).
        let mut xs = x.clone();
        let mut res = conv(&rnd(rows * n, 3 + n as u64));
        let res_new: Vec<T> = res.iter().zip(&xs).map(|(r, v)| T::from_f32(r.to_f32() + v.to_f32())).collect();
        let l = launch(&format!("fused_add_rms_norm_{}", T::NAME), rows)
            .buffer("x", &xs)
            .buffer("residual", &res)
            .buffer("w", &w);
        fused(&l, xs.as_mut_ptr(), res.as_mut_ptr(), w.as_ptr(), n as u32, eps).unwrap();
        assert!(res.iter().zip(&res_new).all(|(a, b)| a.to_f32() == b.to_f32()), "fused residual_{}", T::NAME);
        let want: Vec<f64> = res_new
            .chunks(n)
            .flat_map(|r| rms_ref(&r.iter().map(|v| v.to_f32() as f64).collect::<Vec<_>>(), &w, eps as f64))
            .collect();
        let e = max_err(&xs, &want);
        assert!(e < tol, "fused_add_rms_norm_{} rows {rows} n {n}: {e}", T::NAME);
    }
}

#[test]
fn norm_kernels_f32() {
    norms::<f32>(norm::rms_norm_f32::launch, norm::fused_add_rms_norm_f32::launch, 1e-4);
}

#[test]
fn norm_kernels_f16() {
    norms::<F16>(norm::rms_norm_f16::launch, norm::fused_add_rms_norm_f16::launch, 4e-3);
}

#[test]
fn norm_kernels_bf16() {
    norms::<Bf16>(norm::rms_norm_bf16::launch, norm::fused_add_rms_norm_bf16::launch, 3e-2);
}

/// The same kernel with each warp's lanes run last to first gives the same numbers (it leans
/// on no lane order), and a launch with too little shared memory is refused by name.
#[test]
fn norm_kernels_under_the_emulators_switches() {
    let (rows, n) = (4usize, 576usize);
    let x = rnd(rows * n, 9);
    let w = rnd(n, 10);
    let run = |l: Launch| {
        let mut out = vec![0f32; rows * n];
        let l = l.buffer("out", &out).buffer("x", &x).buffer("w", &w);
        norm::rms_norm_f32::launch(&l, out.as_mut_ptr(), x.as_ptr(), w.as_ptr(), n as u32, 1e-5).map(|_| out)
    };
    let fwd = run(launch("rms_norm_f32", rows)).unwrap();
    let checks = weave_simt::Checks { reverse_lanes: true, ..Default::default() };
    let rev = run(launch("rms_norm_f32", rows).checks(checks)).unwrap();
    let max = fwd.iter().zip(&rev).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max <= 1e-6, "lane order changed the result by {max}");
    let e = run(launch("rms_norm_f32", rows).smem(8)).unwrap_err();
    assert_eq!(e.kind, weave_simt::ErrorKind::OutOfBounds, "{e}");
    assert!(e.detail.contains("kernels/reduce.rs"), "the error names the line of the shared write: {e}");
}
