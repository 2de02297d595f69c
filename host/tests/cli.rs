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
    temp_bytes(name, text.as_bytes())
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

/// A minimal GGUF: the given string metadata and no tensors.
fn gguf_with(meta: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        b.extend((k.len() as u64).to_le_bytes());
        b.extend(k.as_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend((v.len() as u64).to_le_bytes());
        b.extend(v.as_bytes());
    }
    b
}

fn temp_bytes(name: &str, bytes: &[u8]) -> String {
    let dir = std::env::temp_dir().join(format!("weave-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

#[test]
fn generate_names_bad_model_files() {
    let (code, _, err) = weave(&["generate", "--model", "/nonexistent/m.gguf", "--prompt", "hi"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/m.gguf does not exist") && err.contains("cargo xtask fetch-model"), "{err}");
    let full = gguf_with(&[("general.architecture", "llama")]);
    let p = temp_bytes("trunc.gguf", &full[..full.len() - 3]);
    let (code, _, err) = weave(&["generate", "--model", &p, "--prompt", "hi"]);
    assert_eq!(code, 1);
    assert!(err.contains("trunc.gguf: truncated"), "{err}");
    let p = temp_bytes("mamba.gguf", &gguf_with(&[("general.architecture", "mamba")]));
    let (code, _, err) = weave(&["generate", "--model", &p, "--prompt", "hi"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("mamba.gguf: architecture \"mamba\" is not supported (supported: llama, qwen2, qwen3, gemma3)"),
        "{err}"
    );
    let p = temp_bytes("notgguf.gguf", b"PK\x03\x04 this is a zip");
    let (_, _, err) = weave(&["generate", "--model", &p, "--prompt", "hi"]);
    assert!(err.contains("notgguf.gguf: not a GGUF file"), "{err}");
}

#[test]
fn generate_rejects_bad_requests_and_runs_the_rest() {
    let model = weave::paths::default_model_path();
    if !model.exists() {
        skip(&format!("reference model not found at {} (run `cargo xtask fetch-model`)", model.display()));
        return;
    }
    let long = "word ".repeat(40);
    let (code, out, err) = weave(&[
        "generate",
        "--prompt",
        "Hello, my name is",
        "--prompt",
        "   ",
        "--prompt",
        &long,
        "--max-model-len",
        "32",
        "--max-tokens",
        "4",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("request 1: the prompt is empty"), "{err}");
    assert!(err.contains("request 2: the prompt has") && err.contains("tokens, over max_model_len 32"), "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "one completion and the summary");
    assert_eq!(lines[0]["id"], 0);
    assert_eq!(lines[0]["output_token_ids"].as_array().unwrap().len(), 4);
    assert_eq!(lines[1]["rejected"], 2);
}

#[test]
fn dummy_weights_run_without_a_model_file_and_repeat() {
    let args = [
        "generate",
        "--load-format",
        "dummy",
        "--model-config",
        "smollm2-135m",
        "--prompt",
        "hello",
        "--max-tokens",
        "3",
    ];
    let run = || {
        let (code, out, err) = weave(&[&args[..], &["--temperature", "0", "--json", "--threads", "2"]].concat());
        assert_eq!(code, 0, "{err}");
        let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        assert_eq!(first["prompt_token_ids"].as_array().unwrap().len(), 5, "one token a byte");
        first["output_token_ids"].clone()
    };
    let ids = run();
    assert_eq!(ids.as_array().unwrap().len(), 3);
    // --profile: where the steps' time went; the step log carries the phases.
    let log = std::env::temp_dir().join(format!("weave-dummy-steps-{}.jsonl", std::process::id()));
    let (code, out, err) = weave(&[&args[..], &["--profile", "--step-log", log.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("phases over 3 steps") && out.contains("forward") && out.contains("sample"), "{out}");
    let first: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&log).unwrap().lines().next().unwrap()).unwrap();
    assert!(first["phases"]["forward"].as_f64().unwrap() > 0.0, "{first}");
    assert_eq!(ids, run(), "the same seed makes the same model");
    let (code, _, err) = weave(&["generate", "--load-format", "dummy", "--prompt", "x"]);
    assert!(code != 0 && err.contains("needs --model-config"), "{err}");
    let (code, _, err) = weave(&["generate", "--model-config", "smollm2-135m", "--prompt", "x"]);
    assert!(code != 0 && err.contains("add --load-format dummy"), "{err}");
    let (code, _, err) = weave(&["generate", "--load-format", "dummy", "--model-config", "gpt-5", "--prompt", "x"]);
    assert!(code != 0 && err.contains("unknown model profile \"gpt-5\""), "{err}");
}

#[test]
fn analyze_summarises_plots_and_names_bad_lines() {
    let log = std::env::temp_dir().join(format!("weave-cli-{}-steps.jsonl", std::process::id()));
    let (code, _, _) = weave(&["replay", "--trace", &trace("mixed.json"), "--step-log", log.to_str().unwrap()]);
    assert_eq!(code, 0);
    let svg = log.with_extension("svg");
    let perfetto = log.with_extension("trace.json");
    let (code, out, err) = weave(&[
        "analyze",
        log.to_str().unwrap(),
        log.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
        "--trace",
        perfetto.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("prefill / decode ratio") && out.contains("step time p50 / p99"), "{out}");
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.starts_with("<svg") && svg_text.contains("tokens per step"), "not an SVG plot");
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&perfetto).unwrap()).unwrap();
    assert!(t["traceEvents"].as_array().unwrap().len() > 100);
    // A truncated last line is named.
    let text = std::fs::read_to_string(&log).unwrap();
    let bad = temp("bad-steps.jsonl", &format!("{}{{\"step\": 3, \"ti", &text[..text.find('\n').unwrap() + 1]));
    let (code, _, err) = weave(&["analyze", &bad]);
    assert_eq!(code, 1);
    assert!(err.contains("bad-steps.jsonl: line 2: not valid JSON"), "{err}");
}

#[test]
fn simulate_reports_metrics_and_names_unknown_profiles() {
    let (code, out, err) = weave(&["simulate", "--num-requests", "300", "--rate", "20", "--json"]);
    assert_eq!(code, 0, "{err}");
    let m: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(m["requests"], 300);
    assert!(m["ttft"]["p99"].as_f64().unwrap() >= m["ttft"]["p50"].as_f64().unwrap());
    assert!(m["output_tokens_per_s"].as_f64().unwrap() > 0.0);
    let (code, _, err) = weave(&["simulate", "--gpu", "v100"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown GPU profile \"v100\"; known: a100-80gb, h100-sxm, h200"), "{err}");
    let (code, _, err) = weave(&["simulate", "--model-profile", "gpt-9"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("unknown model profile \"gpt-9\"; known: llama-3-8b, llama-2-7b, mistral-7b, smollm2-135m"),
        "{err}"
    );
}

/// Says `skipped: <reason>` where the test output shows it: straight to stderr, since the test
/// harness captures `println!`/`eprintln!` of passing tests.
fn skip(reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {reason}");
}

/// `weave serve` as a process: SIGTERM refuses new work, lets the running stream finish, and
/// the server exits 0.
#[test]
#[cfg(unix)]
fn serve_drains_and_exits_0_on_sigterm() {
    use std::io::{BufRead, BufReader, Read, Write};
    let model =
        std::env::var_os("WEAVE_MODEL").map(std::path::PathBuf::from).unwrap_or_else(weave::paths::default_model_path);
    if !model.exists() {
        let _ = writeln!(std::io::stderr(), "skipped: reference model not found at {}", model.display());
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_weave"))
        .args(["serve", "--port", "0", "--threads", "1", "--kv-cache-tokens", "4096"])
        .arg("--model")
        .arg(&model)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "serve exited before listening");
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let post = |body: &str| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        s
    };
    // Long enough to be running when the signal lands (48 tokens finished first once the CPU
    // backend got faster), short enough to drain well within the 30 s allowed.
    let mut stream = post(r#"{"prompt": "Once upon a time", "max_tokens": 600, "ignore_eos": true, "stream": true}"#);
    // Wait for the first token's event, not just the headers (they can come before the
    // engine has taken the request), so that the request is running when the signal comes.
    let mut head = String::new();
    let mut buf = [0u8; 256];
    while !head.contains("data: ") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended before its first token: {head}");
        head += &String::from_utf8_lossy(&buf[..n]);
    }
    assert!(head.contains("200 OK"), "{head}");
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("\"finish_reason\":\"length\"") && rest.contains("data: [DONE]"), "{rest}");
    let status = child.wait().unwrap();
    let mut log = String::new();
    err.read_to_string(&mut log).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("shutting down; draining 1 request"), "{log}");
}

#[test]
fn bench_kernels_lists_its_shapes_without_a_gpu_and_says_why_it_cannot_time_them() {
    let (code, out, err) = weave(&["bench", "kernels", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("decode 256x2048") && out.contains("prefill 1x4096"), "{out}");
    // The last line is the JSON the PyTorch script reads.
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(json.as_array().unwrap().iter().any(|s| s["kind"] == "mixed"));
    if weave::backends::cuda::no_gpu_reason().is_some() {
        let (code, _, err) = weave(&["bench", "kernels", "--quick"]);
        assert_ne!(code, 0);
        assert!(err.contains("needs a GPU") && err.contains("--dry-run"), "{err}");
    } else {
        eprintln!("skipped: a GPU is present; tools/gpu/check.sh runs the timed bench");
    }
}
