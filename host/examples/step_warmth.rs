//! How a small step's time depends on the steps before it: times runs of back-to-back decode
//! steps of a few rows each after four disturbances (none, one large step, 200 ms idle, and
//! writing a buffer larger than the last-level cache), and prints each step's milliseconds.
//!
//! Why it exists: on a machine whose last-level cache holds the model's weights (a 260 MiB L3
//! holds SmolLM2's 98 MB), a one-row decode step runs up to 1.6x faster after a few of its
//! kind than after a large step or a cache flush, so a step-time model made of medians of
//! back-to-back repeats sits between the two. TUNING.md §6 quotes this probe.
//!
//! Usage: cargo run -p weave --release --example step_warmth -- [ROWS...] (default 1 4 8 16)
//! Env: WEAVE_THREADS (default 2), WEAVE_MODEL (default the reference model).

use anyhow::Context;
use weave::study::profile::{synthetic_batch, CpuTimer, ProfileSpec, SynthSeq};

/// Steps timed after each disturbance.
const STEPS: usize = 16;
/// The large step's tokens (a full default token budget of prefill-like rows).
const LARGE: usize = 1024;

fn main() -> anyhow::Result<()> {
    let rows: Vec<usize> = match std::env::args().skip(1).map(|a| a.parse::<usize>()).collect::<Result<Vec<_>, _>>() {
        Ok(r) if !r.is_empty() => r,
        Ok(_) => vec![1, 4, 8, 16],
        Err(e) => anyhow::bail!("step_warmth: ROWS must be whole numbers ({e})"),
    };
    anyhow::ensure!(rows.iter().all(|&r| (1..=LARGE).contains(&r)), "step_warmth: ROWS must be 1..={LARGE}");
    let threads = match std::env::var("WEAVE_THREADS") {
        Ok(t) => t.parse().with_context(|| format!("WEAVE_THREADS={t:?} is not a number"))?,
        Err(_) => 2,
    };
    let path = std::env::var_os("WEAVE_MODEL").map(Into::into).unwrap_or_else(weave::paths::default_model_path);
    let lm = weave::generate::LoadedModel::load(&path).with_context(|| format!("cannot load {}", path.display()))?;
    let spec = ProfileSpec { max_tokens: LARGE, max_seqs: 32, max_context: 64, block_size: 16, repeats: 1, threads };
    let mut timer = CpuTimer::new(&lm, &spec);
    // `n` one-token rows at context 0, the last one sampled: the profile's base shape.
    let base = |n: usize| {
        let seqs: Vec<SynthSeq> = (0..n).map(|i| SynthSeq { query: 1, context: 0, samples: i + 1 == n }).collect();
        synthetic_batch(&seqs, spec.block_size, 1000)
    };
    let large = base(LARGE);
    println!("{}; ms per step, {STEPS} steps back to back after each disturbance", timer.name);
    for &n in &rows {
        let b = base(n);
        for what in ["none", "large step", "idle 200 ms", "cache flush"] {
            match what {
                "large step" => drop(timer.time(&large)?),
                "idle 200 ms" => std::thread::sleep(std::time::Duration::from_millis(200)),
                "cache flush" => flush(),
                _ => {}
            }
            let t = (0..STEPS).map(|_| timer.time(&b)).collect::<anyhow::Result<Vec<f64>>>()?;
            let ms: Vec<String> = t.iter().map(|s| format!("{:.1}", s * 1e3)).collect();
            let (first, last) = (t[0], weave::study::bench::median(&t[STEPS - 4..]));
            println!("{n:>4} rows after {what:<11}: first/settled {:.2}x | {}", first / last, ms.join(" "));
        }
    }
    Ok(())
}

/// Writes 600 MiB, a line at a time: more than any last-level cache here, so it evicts the
/// weights.
fn flush() {
    let mut v = vec![1u8; 600 << 20];
    for i in (0..v.len()).step_by(64) {
        v[i] = v[i].wrapping_add(i as u8);
    }
    std::hint::black_box(&v);
}
