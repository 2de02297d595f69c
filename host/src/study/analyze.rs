//! `weave analyze`: step logs (from replay, generate or simulate) summarised, compared, plotted,
//! and exported as Chrome/Perfetto traces.

use crate::engine::steplog::{Stat, StepRecord};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: cannot read: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: line {line}: {msg}")]
    Line { path: String, line: usize, msg: String },
    #[error("{path}: no step records")]
    Empty { path: String },
}

/// Reads a step log (JSONL); summary lines (`"summary": true`) are skipped. A malformed or
/// truncated line is an error naming the line and what is wrong with it.
pub fn read_log(path: &Path) -> Result<Vec<StepRecord>, LogError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| LogError::Io { path: p.clone(), source })?;
    parse_log(&text, &p)
}

pub fn parse_log(text: &str, origin: &str) -> Result<Vec<StepRecord>, LogError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |msg: String| LogError::Line { path: origin.into(), line: i + 1, msg };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| err(format!("not valid JSON ({e})")))?;
        if v.get("summary").and_then(|s| s.as_bool()) == Some(true) {
            continue;
        }
        let r: StepRecord = serde_json::from_value(v).map_err(|e| err(format!("not a step record: {e}")))?;
        out.push(r);
    }
    if out.is_empty() {
        return Err(LogError::Empty { path: origin.into() });
    }
    Ok(out)
}

/// Percentile (nearest rank) of `xs`.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let k = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize - 1;
    v[k.min(v.len() - 1)]
}

/// The analyzer's view of one log.
#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    pub name: String,
    pub steps: usize,
    pub prefill_tokens_per_step: Stat,
    pub decode_tokens_per_step: Stat,
    pub total_tokens_per_step: Stat,
    pub seqs_per_step: Stat,
    pub prefill_seqs_per_step: Stat,
    pub prefill_ratio: f64,
    pub decode_ratio: f64,
    pub budget_utilization: f64,
    pub kv_usage: Stat,
    pub queue_depth: Stat,
    pub running: Stat,
    pub step_time_p50: f64,
    pub step_time_p99: f64,
    pub step_time_mean: f64,
    pub preemptions: usize,
    pub finished: usize,
    pub duration: f64,
}

pub fn analyze(name: &str, steps: &[StepRecord]) -> Analysis {
    let s = crate::engine::steplog::Summary::from_steps(steps, "");
    let f = |g: fn(&StepRecord) -> f64| Stat::of(steps.iter().map(g));
    let durations: Vec<f64> = steps.iter().map(|r| r.duration).collect();
    Analysis {
        name: name.into(),
        steps: steps.len(),
        prefill_tokens_per_step: s.prefill_tokens_per_step,
        decode_tokens_per_step: s.decode_tokens_per_step,
        total_tokens_per_step: s.total_tokens_per_step,
        seqs_per_step: s.seqs_per_step,
        prefill_seqs_per_step: f(|r| r.num_prefill_seqs as f64),
        prefill_ratio: s.prefill_ratio,
        decode_ratio: s.decode_ratio,
        budget_utilization: s.budget_utilization,
        kv_usage: s.kv_usage,
        queue_depth: f(|r| r.num_waiting as f64),
        running: f(|r| r.num_running as f64),
        step_time_p50: percentile(&durations, 50.0),
        step_time_p99: percentile(&durations, 99.0),
        step_time_mean: Stat::of(durations.iter().copied()).mean,
        preemptions: s.preemptions,
        finished: s.finished,
        duration: s.duration,
    }
}

/// Side-by-side table of several analyses.
pub fn render(all: &[Analysis]) -> String {
    let mut out = String::new();
    let w = all.iter().map(|a| a.name.len()).max().unwrap_or(0).clamp(14, 40);
    out += &format!("{:<28}", "");
    for a in all {
        out += &format!(" {:>w$}", a.name, w = w);
    }
    out += "\n";
    let mut row = |label: &str, f: &dyn Fn(&Analysis) -> String| {
        out += &format!("{label:<28}");
        for a in all {
            out += &format!(" {:>w$}", f(a), w = w);
        }
        out += "\n";
    };
    let mmm = |s: &Stat| format!("{:.1} / {} / {}", s.mean, s.min, s.max);
    row("steps", &|a| a.steps.to_string());
    row("prefill tok/step mean/min/max", &|a| mmm(&a.prefill_tokens_per_step));
    row("decode tok/step mean/min/max", &|a| mmm(&a.decode_tokens_per_step));
    row("total tok/step mean/min/max", &|a| mmm(&a.total_tokens_per_step));
    row("seqs/step mean/min/max", &|a| mmm(&a.seqs_per_step));
    row("prefill / decode ratio", &|a| format!("{:.1}% / {:.1}%", 100.0 * a.prefill_ratio, 100.0 * a.decode_ratio));
    row("budget utilization", &|a| format!("{:.1}%", 100.0 * a.budget_utilization));
    row("KV usage mean / max", &|a| format!("{:.1}% / {:.1}%", 100.0 * a.kv_usage.mean, 100.0 * a.kv_usage.max));
    row("queue depth mean / max", &|a| format!("{:.1} / {}", a.queue_depth.mean, a.queue_depth.max));
    row("step time p50 / p99", &|a| format!("{} / {}", fmt_time(a.step_time_p50), fmt_time(a.step_time_p99)));
    row("preemptions", &|a| a.preemptions.to_string());
    row("finished requests", &|a| a.finished.to_string());
    out
}

fn fmt_time(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3}")
    } else {
        format!("{:.2}ms", s * 1e3)
    }
}

/// Chrome trace-event JSON (chrome://tracing, Perfetto): one slice per step, with its phases
/// (schedule, prepare, forward, sample, update) nested under it when the log has them, and
/// counters for tokens, queues and KV blocks. Times in microseconds of the log's clock.
pub fn chrome_trace(steps: &[StepRecord]) -> serde_json::Value {
    let mut ev = Vec::with_capacity(steps.len() * 4);
    for s in steps {
        let ts = s.time * 1e6;
        ev.push(serde_json::json!({
            "name": format!("step {}", s.step), "ph": "X", "ts": ts, "dur": s.duration * 1e6, "pid": 1, "tid": 1,
            "args": {"prefill_tokens": s.prefill_tokens, "decode_tokens": s.decode_tokens, "seqs": s.num_seqs,
                     "preempted": s.preempted.len(), "finished": s.finished.len()}
        }));
        if let Some(p) = s.phases {
            let mut t = ts;
            for (name, d) in crate::engine::steplog::Phases::NAMES.iter().zip(p.values()) {
                ev.push(serde_json::json!({"name": name, "ph": "X", "ts": t, "dur": d * 1e6, "pid": 1, "tid": 1}));
                t += d * 1e6;
            }
            if p.gpu_busy > 0.0 {
                // The device on a track of its own: busy from the end of scheduling (its first
                // work is the step's upload), and before that the gap in which it waited on the
                // host. Placed on the host's clock, so approximate to the launch latency.
                let busy_at = ts + p.schedule * 1e6;
                ev.push(serde_json::json!({"name": "gpu waits on host", "ph": "X", "ts": busy_at - p.gpu_gap * 1e6,
                    "dur": p.gpu_gap * 1e6, "pid": 1, "tid": 2}));
                ev.push(serde_json::json!({"name": "gpu busy", "ph": "X", "ts": busy_at, "dur": p.gpu_busy * 1e6,
                    "pid": 1, "tid": 2}));
            }
        }
        ev.push(serde_json::json!({"name": "tokens", "ph": "C", "ts": ts, "pid": 1,
            "args": {"prefill": s.prefill_tokens, "decode": s.decode_tokens}}));
        ev.push(serde_json::json!({"name": "queue", "ph": "C", "ts": ts, "pid": 1,
            "args": {"running": s.num_running, "waiting": s.num_waiting}}));
        ev.push(
            serde_json::json!({"name": "kv_blocks", "ph": "C", "ts": ts, "pid": 1, "args": {"used": s.kv_blocks_used}}),
        );
    }
    serde_json::json!({"traceEvents": ev, "displayTimeUnit": "ms"})
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"step":0,"time":0.0,"duration":1.0,"scheduled":[],"preempted":[],"finished":[],"num_running":1,"num_waiting":3,"kv_blocks_used":4,"kv_blocks_total":10,"prefill_tokens":100,"decode_tokens":2,"num_seqs":3,"num_prefill_seqs":1,"num_partial_prefills":1,"token_budget":512}"#;

    #[test]
    fn bad_lines_are_named() {
        let e = parse_log(&format!("{LINE}\n{{\"step\": 1, \"time\""), "log.jsonl").unwrap_err().to_string();
        assert!(e.starts_with("log.jsonl: line 2: not valid JSON"), "{e}");
        let e = parse_log(&format!("{LINE}\n{{\"step\": 1}}"), "log.jsonl").unwrap_err().to_string();
        assert!(e.starts_with("log.jsonl: line 2: not a step record: missing field"), "{e}");
        assert!(parse_log("{\"summary\": true}", "x").unwrap_err().to_string().contains("no step records"));
        let ok = parse_log(&format!("{LINE}\n\n{{\"summary\": true, \"steps\": 1}}\n"), "x").unwrap();
        assert_eq!(ok.len(), 1);
        let a = analyze("x", &ok);
        assert_eq!((a.queue_depth.mean, a.prefill_ratio), (3.0, 100.0 / 102.0));
        let t = chrome_trace(&ok);
        assert_eq!(t["traceEvents"].as_array().unwrap().len(), 4);
        assert_eq!(t["traceEvents"][0]["dur"], 1e6);
        // A step with phases: five slices under the step, back to back.
        let phased = LINE.replace(
            "\"token_budget\":512",
            "\"token_budget\":512,\"phases\":{\"schedule\":0.1,\"prepare\":0.0,\"forward\":0.6,\"sample\":0.2,\"update\":0.1}",
        );
        let steps = parse_log(&phased, "x").unwrap();
        let p = steps[0].phases.expect("phases read back");
        assert_eq!(p.values(), [0.1, 0.0, 0.6, 0.2, 0.1]);
        let t = chrome_trace(&steps);
        let ev = t["traceEvents"].as_array().unwrap();
        assert_eq!(ev.len(), 4 + 5);
        assert_eq!((ev[3]["name"].as_str(), ev[3]["ts"].as_f64()), (Some("forward"), Some(0.1e6)));
        let table = crate::engine::steplog::phase_table(&steps).unwrap();
        assert!(table.contains("forward") && table.contains("60.0%"), "{table}");
        assert!(!table.contains("gpu gap"), "no GPU events, no GPU rows: {table}");
        assert_eq!(crate::engine::steplog::phase_table(&ok), None, "no phases, no table");
        // A GPU step: 0.75 s busy, 0.25 s waiting on the host.
        let gpu = phased.replace("\"update\":0.1}", "\"update\":0.1,\"gpu_busy\":0.75,\"gpu_gap\":0.25}");
        let gpu_steps = parse_log(&gpu, "x").unwrap();
        let t = chrome_trace(&gpu_steps);
        let ev = t["traceEvents"].as_array().unwrap();
        let busy = ev.iter().find(|e| e["name"] == "gpu busy").expect("a GPU track");
        assert_eq!(
            (busy["tid"].as_u64(), busy["ts"].as_f64(), busy["dur"].as_f64()),
            (Some(2), Some(0.1e6), Some(0.75e6))
        );
        let table = crate::engine::steplog::phase_table(&gpu_steps).unwrap();
        let gap = table.lines().find(|l| l.trim_start().starts_with("gpu gap")).expect(&table);
        assert!(gap.contains("250.000") && gap.ends_with("25.0%"), "{table}");
    }

    #[test]
    fn percentiles() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 50.0), 50.0);
        assert_eq!(percentile(&xs, 99.0), 99.0);
        assert_eq!(percentile(&xs, 100.0), 100.0);
        assert_eq!(percentile(&[5.0], 99.0), 5.0);
    }
}
