//! The emulator's own side of the kernel tests: kernels launched on it directly (not through
//! the CUDA backend's launchers, which `cuda_kernels.rs` runs on the emulator and on a GPU):
//! the norms with the emulator's switches (lanes reversed, too little shared memory named),
//! the conformance kernel against the PTX ISA's definitions, and a launch by kernel type with
//! its arguments checked.

mod common;

use common::rnd;
use weave_kernels_gpu::gpu::Arg;
use weave_kernels_gpu::kernels::norm;
use weave_kernels_gpu::{Bf16, Dtype, Elem, Kernel, LaunchDims, BLOCK_THREADS, F16};
use weave_simt::{Dim3, EmuError, Launch, Stats};

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

// ------------------------------------------------------------------ launches

/// The emulator's launch for a kernel with the backend's shape.
fn emu(k: Kernel, d: LaunchDims) -> Launch {
    Launch::new(k.name(), Dim3::new(d.grid.0, d.grid.1, d.grid.2), Dim3::x(d.block)).smem(d.smem as usize)
}

/// A buffer as a kernel argument (read only).
fn ptr<T>(v: &[T]) -> Arg {
    Arg::Ptr(v.as_ptr() as u64)
}

/// A buffer the kernel writes, as a kernel argument.
fn ptr_mut<T>(v: &mut [T]) -> Arg {
    Arg::Ptr(v.as_mut_ptr() as u64)
}

/// The conformance kernel under the emulator against the PTX ISA's definitions of each
/// primitive, computed here from the inputs alone (a GPU run compares its output with the
/// emulator's: `cuda_kernels.rs`, first in `tools/gpu/check.sh`).
#[test]
fn conformance_kernel_follows_the_ptx_definitions() {
    use weave_kernels_gpu::kernels::conformance::{self as cf, region, slot, GRID, NTHREADS, OUT_WORDS};
    let inp = cf::input(7);
    let run = |checks: weave_simt::Checks| {
        let mut out = vec![0u32; NTHREADS * OUT_WORDS];
        let k = Kernel::GpuConformance;
        let l = emu(k, k.rows(GRID)).buffer("inp", &inp).buffer("out", &out).checks(checks);
        cf::gpu_conformance::launch(&l, inp.as_ptr(), out.as_mut_ptr()).unwrap_or_else(|e| panic!("{e}"));
        out
    };
    let out = run(Default::default());
    // Lane order changes nothing, bit for bit.
    let rev = run(weave_simt::Checks { reverse_lanes: true, ..Default::default() });
    assert_eq!(cf::compare(&out, &rev), Ok(()));
    let at = |t: usize, s: usize| out[t * OUT_WORDS + s];
    let h16 = |w: u32, hi: bool| if hi { w >> 16 } else { w & 0xffff };
    for gt in 0..NTHREADS {
        let (t, bx) = (gt % 128, gt / 128);
        let (lane, warp) = (t % 32, t / 32);
        let wbase = gt - lane; // the warp's first thread in the launch
        assert_eq!(at(gt, slot::INDEX), t as u32 | (bx as u32) << 8 | GRID << 16);
        for (k, m) in [1usize, 2, 4, 8, 16].into_iter().enumerate() {
            assert_eq!(at(gt, slot::XOR + k), inp[region::INTS + wbase + (lane ^ m)], "shfl.bfly {m} thread {gt}");
        }
        assert_eq!(at(gt, slot::XOR_F32), inp[region::FLOATS + wbase + (lane ^ 1)]);
        assert_eq!(at(gt, slot::XOR_F32 + 1), inp[region::FLOATS + wbase + (lane ^ 16)]);
        let src = inp[region::LANES + gt] as usize % 32;
        assert_eq!(at(gt, slot::IDX), inp[region::FLOATS + wbase + src], "shfl.idx thread {gt}");
        let peer = 128 * bx + (7 * t + 3) % 128;
        assert_eq!(at(gt, slot::SHARED), inp[region::INTS + peer] ^ 0x5a5a_5a5a);
        for k in 0..4 {
            assert_eq!(at(gt, slot::V4 + k), inp[region::V4 + 4 * (t % 64) + k]);
        }
        // ldmatrix: the block's 128 INTS words as 32 rows of 16 bytes (4 words); lane `8i + r`
        // points at row (5 (8i + r) + warp) % 32, which is matrix i's row r.
        let row_of = |i: usize, r: usize| (5 * (8 * i + r) + warp) % 32;
        let half_at = |row: usize, col: usize| h16(inp[region::INTS + 128 * bx + 4 * row + col / 2], col % 2 == 1);
        for i in 0..4 {
            // Register i: matrix i's row lane / 4, columns 2 (lane % 4) and + 1.
            let r = row_of(i, lane / 4);
            let want = half_at(r, 2 * (lane % 4)) | half_at(r, 2 * (lane % 4) + 1) << 16;
            assert_eq!(at(gt, slot::LDMATRIX + i), want, "ldmatrix thread {gt} register {i}");
            // .trans: column lane / 4, rows 2 (lane % 4) and + 1.
            let (r0, r1) = (row_of(i, 2 * (lane % 4)), row_of(i, 2 * (lane % 4) + 1));
            let want = half_at(r0, lane / 4) | half_at(r1, lane / 4) << 16;
            assert_eq!(at(gt, slot::LDMATRIX_T + i), want, "ldmatrix.trans thread {gt} register {i}");
        }
        assert_eq!(at(gt, slot::ASYNC), inp[region::ASYNC + 4 * ((t + 1) % 128) + t % 4], "cp.async thread {gt}");
    }
    // mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"):
    // with g = lane / 4 and c = lane % 4, a[r] holds A's row g + 8 (r & 1), columns
    // 2c + 8 (r >> 1) and + 1; b[r] holds B's column g, rows 2c + 8r and + 1; c[i] and d[i]
    // are row g + 8 (i >> 1), column 2c + (i & 1).
    for (a_reg, b_reg, d_slot, wide) in [
        (region::A16, region::B16, slot::MMA_F16, (|h: u32| F16(h as u16).to_f32()) as fn(u32) -> f32),
        (region::ABF, region::BBF, slot::MMA_BF16, |h: u32| Bf16(h as u16).to_f32()),
    ] {
        for w0 in (0..NTHREADS).step_by(32) {
            let (mut a, mut b, mut c) = ([[0f32; 16]; 16], [[0f32; 8]; 16], [[0f32; 8]; 16]);
            for lane in 0..32 {
                let (g, q) = (lane / 4, lane % 4);
                for r in 0..4 {
                    let w = inp[a_reg + 4 * (w0 + lane) + r];
                    let (row, col) = (g + 8 * (r & 1), 2 * q + 8 * (r >> 1));
                    a[row][col] = wide(h16(w, false));
                    a[row][col + 1] = wide(h16(w, true));
                }
                for r in 0..2 {
                    let w = inp[b_reg + 2 * (w0 + lane) + r];
                    b[2 * q + 8 * r][g] = wide(h16(w, false));
                    b[2 * q + 8 * r + 1][g] = wide(h16(w, true));
                }
                for i in 0..4 {
                    c[g + 8 * (i >> 1)][2 * q + (i & 1)] = f32::from_bits(inp[region::C + 4 * (w0 + lane) + i]);
                }
            }
            for lane in 0..32 {
                let (g, q) = (lane / 4, lane % 4);
                for i in 0..4 {
                    let (row, col) = (g + 8 * (i >> 1), 2 * q + (i & 1));
                    let want: f64 =
                        c[row][col] as f64 + (0..16).map(|k| a[row][k] as f64 * b[k][col] as f64).sum::<f64>();
                    let got = f32::from_bits(out[(w0 + lane) * OUT_WORDS + d_slot + i]) as f64;
                    assert!(
                        (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "mma warp {} lane {lane} d[{i}]: {got} vs {want}",
                        w0 / 32
                    );
                }
            }
        }
    }
}

/// A kernel by type with its arguments as a launch passes them (`Kernel::emulate`, what a
/// device seam over the emulator calls): the same result as the typed launch, and a launch
/// whose arguments do not fit the kernel is refused, naming the parameter.
#[test]
fn kernels_launch_by_type_with_checked_arguments() {
    let (nrows, n) = (3usize, 300usize);
    let x = rnd(nrows * n, 31);
    let w = rnd(n, 32);
    let k = Kernel::RmsNorm(Dtype::F32);
    let (mut a, mut b) = (vec![0f32; nrows * n], vec![0f32; nrows * n]);
    let l = |out: &[f32]| emu(k, k.rows(nrows as u32)).buffer("out", out).buffer("x", &x).buffer("w", &w);
    norm::rms_norm_f32::launch(&l(&a), a.as_mut_ptr(), x.as_ptr(), w.as_ptr(), n as u32, 1e-5).unwrap();
    let args = [ptr_mut(&mut b), ptr(&x), ptr(&w), Arg::U32(n as u32), Arg::F32(1e-5)];
    k.emulate(&l(&b), &args).unwrap();
    assert_eq!(a, b);
    assert!(b.iter().any(|&v| v != 0.0));
    // A u32 where the kernel takes an f32, and an argument short.
    let mut wrong = args;
    wrong[4] = Arg::U32(1);
    let e = k.emulate(&l(&b), &wrong).unwrap_err();
    assert_eq!(e.kind, weave_simt::ErrorKind::BadLaunch);
    assert!(e.detail.contains("parameter 4 `eps` takes an f32"), "{e}");
    let e = k.emulate(&l(&b), &args[..4]).unwrap_err();
    assert!(e.detail.contains("rms_norm_f32 takes 5 arguments (out, x, w, n, eps), the launch gives 4"), "{e}");
}
