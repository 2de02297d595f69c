//! The `weave` binary's behaviour on good and bad input.

use std::process::Command;

fn weave(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weave")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn trace(name: &str) -> String {
    format!("{}/../traces/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn temp(name: &str, text: &str) -> String {
    let dir = std::env::temp_dir().join(format!("weave-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn replay_prints_summary_and_names_bad_requests() {
    let (code, out, err) = weave(&["replay", "--trace", &trace("mixed.json")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("batch composition"), "{out}");
    assert!(out.contains("11 finished, 2 rejected"), "{out}");
    assert!(err.contains("request \"too-long\": the prompt has 4000 tokens, over max_model_len 2048"), "{err}");
    assert!(err.contains("request \"zero-out\": max_tokens is 0"), "{err}");
}

#[test]
fn step_log_has_one_line_per_step_then_summary() {
    let (code, out, _) = weave(&["replay", "--trace", &trace("mixed.json"), "--step-log", "-"]);
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let last = lines.last().unwrap();
    assert_eq!(last["summary"], true);
    assert_eq!(last["steps"].as_u64().unwrap() as usize, lines.len() - 1);
    for k in [
        "step",
        "scheduled",
        "preempted",
        "finished",
        "num_running",
        "num_waiting",
        "kv_blocks_used",
        "prefill_tokens",
        "decode_tokens",
    ] {
        assert!(lines[0].get(k).is_some(), "missing {k}");
    }
}

#[test]
fn malformed_trace_names_line_and_column() {
    let p = temp("bad.json", "{\"config\": {},\n  \"requests\": [\n    {\"id\": 1 \"arrival_step\": 0}\n]}");
    let (code, _, err) = weave(&["replay", "--trace", &p]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.json: not a valid trace") && err.contains("line 3 column"), "{err}");
}

#[test]
fn cache_too_small_for_every_request_is_an_error() {
    let p = temp(
        "small.json",
        r#"{"config": {"num_gpu_blocks": 3, "block_size": 16},
            "requests": [{"id": "a", "arrival_step": 0, "prompt_len": 100, "max_tokens": 4}]}"#,
    );
    let (code, _, err) = weave(&["replay", "--trace", &p]);
    assert_eq!(code, 1);
    assert!(err.contains("request \"a\": it may grow to 104 tokens but the KV cache holds 32"), "{err}");
    assert!(err.contains("every request was rejected"), "{err}");
    let (code, _, err) = weave(&["replay", "--trace", "/nonexistent/t.json"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/t.json: cannot read"), "{err}");
}
