//! The per-step log every engine run can write, and the batch-composition summary over it.

use serde::{Deserialize, Serialize};
use std::io::Write;

/// One scheduled sequence in a step record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduledRecord {
    pub id: serde_json::Value,
    pub num_tokens: u32,
    pub is_prefill: bool,
    pub num_computed_tokens_before: u32,
    /// Whether this sequence sampled a token this step.
    #[serde(default)]
    pub samples: bool,
}

/// One line of the step log (JSONL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    /// Start of the step on the run's clock (seconds; steps for the null backend).
    pub time: f64,
    /// Step duration on the same clock.
    pub duration: f64,
    pub scheduled: Vec<ScheduledRecord>,
    pub preempted: Vec<serde_json::Value>,
    pub finished: Vec<serde_json::Value>,
    pub num_running: usize,
    pub num_waiting: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub num_seqs: usize,
    pub num_prefill_seqs: usize,
    pub num_partial_prefills: usize,
    pub token_budget: usize,
    /// Where the step's wall time went, for backends on the wall clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phases: Option<Phases>,
}

/// A step's wall time by phase, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Phases {
    /// The scheduler building the batch.
    pub schedule: f64,
    /// The backend preparing the step's inputs (a device backend's metadata upload; 0 on the
    /// CPU, whose ops read the batch where it is).
    pub prepare: f64,
    /// The model's forward pass.
    pub forward: f64,
    /// Sampling, and logprobs when asked for.
    pub sample: f64,
    /// The scheduler taking the step's tokens, and the engine's bookkeeping of them.
    pub update: f64,
    /// On a GPU, from CUDA events: the device's time from the step's first queued work to its
    /// last (0 elsewhere).
    pub gpu_busy: f64,
    /// On a GPU: the device's idle time between the previous step's last work and this step's
    /// first, while the host scheduled, prepared and sampled (the "kernel gaps" view).
    pub gpu_gap: f64,
    /// Structured outputs: the mask workers' time for this step's guided rows (off the step
    /// thread, overlapping the forward pass; 0 when no row was guided).
    pub mask: f64,
    /// Of `sample`: the time the step thread waited for masks still being computed.
    pub mask_wait: f64,
}

impl Phases {
    pub const NAMES: [&'static str; 5] = ["schedule", "prepare", "forward", "sample", "update"];

    /// The phases in [`Self::NAMES`] order.
    pub fn values(&self) -> [f64; 5] {
        [self.schedule, self.prepare, self.forward, self.sample, self.update]
    }
}

/// `--profile`'s table: each phase's mean, p50 and p99 over the steps that recorded phases,
/// and its share of the steps' summed wall time. `None` when no step recorded phases.
pub fn phase_table(steps: &[StepRecord]) -> Option<String> {
    let ph: Vec<(Phases, f64)> = steps.iter().filter_map(|s| s.phases.map(|p| (p, s.duration))).collect();
    if ph.is_empty() {
        return None;
    }
    let total: f64 = ph.iter().map(|(_, d)| d).sum();
    // One row: a quantity's per-step values (ms) as mean, p50, p99, and its sum's share of
    // `whole` seconds.
    let line = |name: &str, mut v: Vec<f64>, whole: f64| {
        let sum: f64 = v.iter().sum();
        let mean = sum / v.len() as f64;
        v.sort_by(f64::total_cmp);
        let q = |f: f64| v[((v.len() - 1) as f64 * f).round() as usize];
        format!(
            "  {:<9} {:>9.3} {:>9.3} {:>9.3} {:>6.1}%\n",
            name,
            mean,
            q(0.5),
            q(0.99),
            100.0 * sum / 1e3 / whole.max(1e-12)
        )
    };
    let mut out = format!("phases over {} steps (ms)\n", ph.len());
    out += &format!("  {:<9} {:>9} {:>9} {:>9} {:>7}\n", "phase", "mean", "p50", "p99", "share");
    for (i, name) in Phases::NAMES.iter().enumerate() {
        out += &line(name, ph.iter().map(|(p, _)| p.values()[i] * 1e3).collect(), total);
    }
    out += &line("step", ph.iter().map(|(_, d)| d * 1e3).collect(), total);
    if ph.iter().any(|(p, _)| p.mask > 0.0) {
        // Masks are computed beside the step: their time is the workers'; only the wait is
        // the step's (and is inside `sample`).
        out += "  structured outputs (mask workers' time; the wait is inside sample)\n";
        out += &line("mask", ph.iter().map(|(p, _)| p.mask * 1e3).collect(), total);
        out += &line("mask wait", ph.iter().map(|(p, _)| p.mask_wait * 1e3).collect(), total);
    }
    if ph.iter().any(|(p, _)| p.gpu_busy > 0.0) {
        // The device's own clock: its busy time per step, and the gaps in which it waited on
        // the host, each as a share of the device timeline (busy + gaps).
        let timeline: f64 = ph.iter().map(|(p, _)| p.gpu_busy + p.gpu_gap).sum();
        out += "  on the GPU (CUDA events)\n";
        out += &line("gpu busy", ph.iter().map(|(p, _)| p.gpu_busy * 1e3).collect(), timeline);
        out += &line("gpu gap", ph.iter().map(|(p, _)| p.gpu_gap * 1e3).collect(), timeline);
    }
    Some(out)
}

impl StepRecord {
    pub fn total_tokens(&self) -> usize {
        self.prefill_tokens + self.decode_tokens
    }
    /// Sequences that sampled a token this step.
    pub fn sampled_rows(&self) -> usize {
        self.scheduled.iter().filter(|x| x.samples).count()
    }
    /// Each scheduled sequence's `(query rows, cached context)`: what a cost model sees.
    pub fn seq_shapes(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.scheduled.iter().map(|x| (x.num_tokens as f64, x.num_computed_tokens_before as f64))
    }
}

/// Mean / min / max of a per-step quantity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stat {
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(xs: impl IntoIterator<Item = f64>) -> Stat {
        let (mut n, mut sum, mut min, mut max) = (0usize, 0.0, f64::INFINITY, f64::NEG_INFINITY);
        for x in xs {
            n += 1;
            sum += x;
            min = min.min(x);
            max = max.max(x);
        }
        if n == 0 {
            return Stat::default();
        }
        Stat { mean: sum / n as f64, min, max }
    }
}

/// The textbook batch-composition summary of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub summary: bool,
    pub clock: String,
    pub steps: usize,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub total_tokens: usize,
    pub prefill_tokens_per_step: Stat,
    pub decode_tokens_per_step: Stat,
    pub total_tokens_per_step: Stat,
    pub seqs_per_step: Stat,
    /// Shares of all scheduled tokens.
    pub prefill_ratio: f64,
    pub decode_ratio: f64,
    /// Mean of scheduled tokens / token budget.
    pub budget_utilization: f64,
    pub kv_usage: Stat,
    pub preemptions: usize,
    pub finished: usize,
    pub rejected: usize,
    pub prefix_cache_hit_rate: f64,
    pub duration: f64,
}

impl Summary {
    pub fn from_steps(steps: &[StepRecord], clock: &str) -> Summary {
        let f = |g: fn(&StepRecord) -> f64| Stat::of(steps.iter().map(g));
        let prefill: usize = steps.iter().map(|s| s.prefill_tokens).sum();
        let decode: usize = steps.iter().map(|s| s.decode_tokens).sum();
        let total = prefill + decode;
        let ratio = |x: usize| if total == 0 { 0.0 } else { x as f64 / total as f64 };
        Summary {
            summary: true,
            clock: clock.to_string(),
            steps: steps.len(),
            prefill_tokens: prefill,
            decode_tokens: decode,
            total_tokens: total,
            prefill_tokens_per_step: f(|s| s.prefill_tokens as f64),
            decode_tokens_per_step: f(|s| s.decode_tokens as f64),
            total_tokens_per_step: f(|s| s.total_tokens() as f64),
            seqs_per_step: f(|s| s.num_seqs as f64),
            prefill_ratio: ratio(prefill),
            decode_ratio: ratio(decode),
            budget_utilization: f(|s| s.total_tokens() as f64 / s.token_budget.max(1) as f64).mean,
            kv_usage: f(|s| s.kv_blocks_used as f64 / s.kv_blocks_total.max(1) as f64),
            preemptions: steps.iter().map(|s| s.preempted.len()).sum(),
            finished: steps.iter().map(|s| s.finished.len()).sum(),
            rejected: 0,
            prefix_cache_hit_rate: 0.0,
            duration: steps.iter().map(|s| s.duration).sum(),
        }
    }

    /// Human-readable lines.
    pub fn render(&self) -> String {
        let st = |s: &Stat| format!("mean {:8.1}  min {:6}  max {:6}", s.mean, s.min, s.max);
        format!(
            "batch composition ({} steps, clock: {})\n\
             \x20 tokens            prefill {} + decode {} = {}\n\
             \x20 prefill/step      {}\n\
             \x20 decode/step       {}\n\
             \x20 total/step        {}\n\
             \x20 seqs/step         {}\n\
             \x20 ratios            prefill {:.1}%  decode {:.1}%\n\
             \x20 budget used       {:.1}% of the token budget on average\n\
             \x20 KV usage          mean {:.1}%  max {:.1}%\n\
             \x20 requests          {} finished, {} rejected, {} preemptions\n\
             \x20 prefix cache      {:.1}% of queried tokens hit\n",
            self.steps,
            self.clock,
            self.prefill_tokens,
            self.decode_tokens,
            self.total_tokens,
            st(&self.prefill_tokens_per_step),
            st(&self.decode_tokens_per_step),
            st(&self.total_tokens_per_step),
            st(&self.seqs_per_step),
            100.0 * self.prefill_ratio,
            100.0 * self.decode_ratio,
            100.0 * self.budget_utilization,
            100.0 * self.kv_usage.mean,
            100.0 * self.kv_usage.max,
            self.finished,
            self.rejected,
            self.preemptions,
            100.0 * self.prefix_cache_hit_rate,
        )
    }
}

/// A step log being written (JSONL, `-` = stdout). Event callbacks cannot return errors, so
/// the first write error is kept and reported by [`StepLogWriter::finish`].
pub struct StepLogWriter {
    w: Option<Box<dyn std::io::Write + Send>>,
    err: Option<anyhow::Error>,
}

impl std::fmt::Debug for StepLogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepLogWriter").field("open", &self.w.is_some()).finish()
    }
}

impl StepLogWriter {
    /// `None` writes nothing; `-` is stdout.
    pub fn open(path: Option<&std::path::Path>) -> anyhow::Result<StepLogWriter> {
        use anyhow::Context;
        let w: Option<Box<dyn std::io::Write + Send>> = match path {
            None => None,
            Some(p) if p.as_os_str() == "-" => Some(Box::new(std::io::stdout())),
            Some(p) => Some(Box::new(std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| format!("cannot create step log {}", p.display()))?,
            ))),
        };
        Ok(StepLogWriter { w, err: None })
    }

    /// Whether lines go anywhere.
    pub fn is_open(&self) -> bool {
        self.w.is_some()
    }

    /// Appends one JSON line.
    pub fn line(&mut self, v: &impl Serialize) {
        if let Some(w) = self.w.as_mut() {
            if let Err(e) =
                serde_json::to_writer(&mut *w, v).map_err(anyhow::Error::from).and_then(|_| Ok(writeln!(w)?))
            {
                self.err.get_or_insert(e);
            }
        }
    }

    /// Writes the final summary line, or reports the first error.
    pub fn finish(mut self, summary: Option<&impl Serialize>) -> anyhow::Result<()> {
        if let Some(s) = summary {
            self.line(s);
        }
        if let Some(e) = self.err {
            return Err(e.context("writing the step log"));
        }
        if let Some(w) = self.w.as_mut() {
            w.flush().map_err(|e| anyhow::Error::from(e).context("writing the step log"))?;
        }
        Ok(())
    }
}
