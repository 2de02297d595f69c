//! The packed CPU matrix kinds on the same weights, timed in the same run: Q8_0 data held as
//! `S8` (signed values, scales only) against `U8` (unsigned values, scales and offsets, the
//! kind a matrix that stacks Q8_0 with 4-bit parts takes), at SmolLM2's shapes, for one
//! activation row (decode) and 32 (a batch). Runs alternate; medians and their ratio.
//!
//! `cargo bench -p weave --bench qmatmul` (release build; 2 threads, as `weave` defaults on
//! this 2-core machine).

use std::time::Instant;
use weave::backends::cpu::qmatmul::{qmatmul, Isa, QActs};
use weave::model::blocks::quantize;
use weave::model::gguf::GgmlType;
use weave::model::packed::{QKind, QMatrixBuilder};
use weave::model::synth::Rng;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let threads = 2;
    for isa in Isa::missing_here() {
        println!("qmatmul: skipped: {} (this CPU lacks it)", isa.name());
    }
    for isa in Isa::all_here().into_iter().filter(|&i| i != Isa::Scalar) {
        run(isa, threads);
    }
}

fn run(isa: Isa, threads: usize) {
    println!("qmatmul: Q8_0 weights as S8 against U8, {} kernels, {threads} threads, medians of 41", isa.name());
    println!("{:>22} {:>4} {:>10} {:>10} {:>7}", "matrix (rows x cols)", "n", "U8 us", "S8 us", "U8/S8");
    for (name, rows, cols) in
        [("q/k/v 960 x 576", 960, 576), ("gate/up 3072 x 576", 3072, 576), ("down 576 x 1536", 576, 1536)]
    {
        let data = quantize(GgmlType::Q8_0, &Rng(rows as u64).vec(rows * cols, 0.0, 0.5)).unwrap();
        let build = |kind| {
            let mut b = QMatrixBuilder::new(kind, cols);
            b.push_ggml(GgmlType::Q8_0, rows, &data).unwrap();
            b.finish()
        };
        let (s8, u8) = (build(QKind::S8), build(QKind::U8));
        for n in [1, 32] {
            let mut a = QActs::default();
            a.quantize(isa, &Rng(7).vec(n * cols, 0.0, 0.5), n, cols);
            let mut out = vec![0f32; n * rows];
            let mut time = |w: &weave::model::packed::QMatrix| {
                let t = Instant::now();
                let reps = if n == 1 { 50 } else { 4 };
                for _ in 0..reps {
                    qmatmul(isa, std::slice::from_ref(w), &a, &mut out, false, threads);
                }
                t.elapsed().as_secs_f64() * 1e6 / reps as f64
            };
            time(&s8);
            time(&u8);
            let (mut ts, mut tu) = (Vec::new(), Vec::new());
            for _ in 0..41 {
                tu.push(time(&u8));
                ts.push(time(&s8));
            }
            let (mu, ms) = (median(tu), median(ts));
            println!("{name:>22} {n:>4} {mu:>10.1} {ms:>10.1} {:>6.2}x", mu / ms);
        }
    }
}
