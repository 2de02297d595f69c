//! Every bundled trace replays to completion with consistent accounting.

use std::path::PathBuf;
use weave::replay::trace::Trace;

fn traces() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../traces");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    v.sort();
    assert!(v.len() >= 3, "expected the bundled example traces in {}", dir.display());
    v
}

#[test]
fn bundled_traces_replay_consistently() {
    for path in traces() {
        let t = Trace::load(&path).unwrap();
        let cfg = t.config.to_scheduler_config().unwrap();
        let (report, summary) = weave::replay::replay(&t, &mut |_| {}).unwrap();
        let name = path.display();
        assert_eq!(report.outcomes.len() + report.rejected.len(), t.requests.len(), "{name}");
        // Each finished request produced exactly max_tokens (nothing samples EOS in replay),
        // or stopped at max_model_len.
        for o in &report.outcomes {
            let r = t.requests.iter().find(|r| r.id == o.name).unwrap();
            let want = r.max_tokens.min(cfg.max_model_len - r.prompt_len);
            assert_eq!(o.output_tokens.len(), want, "{name}: request {}", o.name);
            assert!(o.arrival <= r.arrival_step as f64 + 1e-9, "{name}");
        }
        let mut prefill_needed = 0usize;
        for s in &report.steps {
            assert!(s.total_tokens() <= cfg.max_num_batched_tokens, "{name}: step {}", s.step);
            assert!(s.num_seqs <= cfg.max_num_seqs, "{name}");
            assert!(s.kv_blocks_used <= s.kv_blocks_total, "{name}");
            let sum: u32 = s.scheduled.iter().map(|x| x.num_tokens).sum();
            assert_eq!(sum as usize, s.total_tokens(), "{name}");
            prefill_needed += s.scheduled.iter().filter(|x| x.is_prefill).map(|x| x.num_tokens as usize).sum::<usize>();
        }
        assert_eq!(prefill_needed, summary.prefill_tokens, "{name}");
        assert_eq!(summary.finished, report.outcomes.len(), "{name}");
        assert_eq!(report.steps.last().map(|s| s.kv_blocks_used), Some(0), "{name}: blocks leaked");
        // Decode tokens: one per output token after the first (which a prefill samples);
        // after a preemption, the outputs so far are recomputed by the resume prefill instead.
        let outputs: usize = report.outcomes.iter().map(|o| o.output_tokens.len()).sum();
        if summary.preemptions == 0 {
            assert_eq!(summary.decode_tokens, outputs - report.outcomes.len(), "{name}");
        } else {
            assert!(summary.decode_tokens < outputs - report.outcomes.len(), "{name}");
            assert!(report.outcomes.iter().any(|o| o.num_preemptions > 0), "{name}");
        }
    }
}

#[test]
fn replay_is_deterministic() {
    let path = &traces()[0];
    let t = Trace::load(path).unwrap();
    let a = weave::replay::replay(&t, &mut |_| {}).unwrap().0.steps;
    let b = weave::replay::replay(&t, &mut |_| {}).unwrap().0.steps;
    assert_eq!(a, b);
}
