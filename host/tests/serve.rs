//! `weave serve` over real HTTP (reqwest against a server on a loopback port): every
//! endpoint, streamed and not, `n > 1`, logprobs, stop strings, each error code, a load test,
//! client disconnects and the drain on shutdown.
//!
//! Needs the reference model (`cargo xtask fetch-model`; CI fetches it first). Without it,
//! each test prints `skipped: ...`.

use futures_util::StreamExt;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use weave::generate::LoadedModel;
use weave::serve::http::App;
use weave::serve::ServeConfig;
use weave_scheduler::SchedulerConfig;

fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}

fn model() -> Option<&'static LoadedModel> {
    static M: OnceLock<Result<LoadedModel, String>> = OnceLock::new();
    let m = M.get_or_init(|| {
        let p = std::env::var_os("WEAVE_MODEL").map(PathBuf::from).unwrap_or_else(weave::paths::default_model_path);
        if !p.exists() {
            return Err(format!("reference model not found at {} (run `cargo xtask fetch-model`)", p.display()));
        }
        Ok(LoadedModel::load(&p).expect("reference model loads"))
    });
    match m {
        Ok(lm) => Some(lm),
        Err(why) => {
            skip(why);
            None
        }
    }
}

fn config() -> ServeConfig {
    ServeConfig {
        sched: SchedulerConfig {
            max_num_batched_tokens: 512,
            max_num_seqs: 64,
            max_model_len: 1024,
            block_size: 16,
            num_gpu_blocks: 1025,
            ..Default::default()
        },
        threads: 1,
        seed: 0,
        model_name: "smol".into(),
        max_waiting: 1024,
        max_n: 8,
        device: Default::default(),
        gpu_memory_utilization: 0.9,
        enforce_eager: false,
        metrics_prefix: "weave".into(),
    }
}

struct Server {
    url: String,
    app: Arc<App>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    http: reqwest::Client,
}

impl Server {
    async fn start(cfg: ServeConfig) -> Option<Server> {
        let lm = model()?;
        let app =
            weave::serve::start_cpu(lm, &cfg, weave::engine::steplog::StepLogWriter::open(None).unwrap()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(weave::serve::serve_until(
            app.clone(),
            listener,
            async move {
                let _ = rx.await;
            },
            Duration::from_secs(20),
        ));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
        Some(Server { url, app, stop: Some(tx), task, http })
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.http.post(format!("{}{path}", self.url)).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self.http.get(format!("{}{path}", self.url)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// The `data:` payloads of a streamed response, in order.
    async fn stream(&self, path: &str, body: Value) -> Vec<String> {
        let r = self.http.post(format!("{}{path}", self.url)).json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let text = r.text().await.unwrap();
        text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(String::from).collect()
    }

    async fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        metric_value(&text, name)
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(60), self.task).await.expect("server stops").unwrap().unwrap();
    }
}

/// The sum of a metric's samples (over its labels).
fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// The JSON chunks of a stream (all but `[DONE]`), checking that `[DONE]` ends it.
fn chunks(events: &[String]) -> Vec<Value> {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_match_generate_streamed_or_not() {
    let Some(s) = Server::start(config()).await else { return };
    let prompt = "The capital of France is";
    // The same request through `weave generate`'s library path.
    let lm = model().unwrap();
    let gcfg = weave::generate::GenerateConfig {
        sched: config().sched,
        default_max_tokens: 16,
        sampling: weave::sampling::SamplingParams::default(),
        chat: false,
        ignore_eos: false,
        threads: 1,
        device: Default::default(),
        gpu_memory_utilization: 0.9,
        enforce_eager: false,
        profile_layers: false,
    };
    let spec = weave::generate::PromptSpec { prompt: prompt.into(), ..Default::default() };
    let want = weave::generate::generate(lm, &gcfg, &[spec], &mut |_| {}).unwrap().completions[0].clone();

    let body = json!({"model": "smol", "prompt": prompt, "max_tokens": 16, "temperature": 0});
    let (code, v) = s.post("/v1/completions", body.clone()).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "smol");
    assert_eq!(v["choices"][0]["text"], want.text.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], want.finish_reason.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], want.prompt_token_ids.len());
    assert_eq!(v["usage"]["completion_tokens"], want.output_token_ids.len());
    assert_eq!(v["usage"]["total_tokens"], want.prompt_token_ids.len() + want.output_token_ids.len());

    // Streamed: the chunks add up to the same text; usage comes last when asked for.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let cs = chunks(&s.stream("/v1/completions", sb).await);
    let text: String = cs.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, want.text);
    let last = cs.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], want.output_token_ids.len());
    let finishes: Vec<&Value> = cs.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finishes, vec![&json!(want.finish_reason)]);
    // Without include_usage, no usage chunk.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let cs = chunks(&s.stream("/v1/completions", sb).await);
    assert!(cs.iter().all(|c| c.get("usage").is_none()), "{cs:?}");

    // A prompt as token ids is the same request.
    let (code, v2) =
        s.post("/v1/completions", json!({"prompt": want.prompt_token_ids, "max_tokens": 16, "temperature": 0})).await;
    assert_eq!(code, 200);
    assert_eq!(v2["choices"][0]["text"], v["choices"][0]["text"]);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streamed_and_not() {
    let Some(s) = Server::start(config()).await else { return };
    let body = json!({
        "model": "smol",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
        "max_completion_tokens": 12,
        "temperature": 0,
    });
    let (code, v) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let msg = &v["choices"][0]["message"];
    assert_eq!(msg["role"], "assistant");
    let content = msg["content"].as_str().unwrap();
    assert!(!content.is_empty());
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 12);
    // The prompt is the chat template's rendering, as /tokenize counts it.
    let (_, t) = s.post("/tokenize", json!({"messages": body["messages"]})).await;
    assert_eq!(v["usage"]["prompt_tokens"], t["count"]);

    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let cs = chunks(&s.stream("/v1/chat/completions", sb).await);
    assert_eq!(cs[0]["object"], "chat.completion.chunk");
    assert_eq!(cs[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = cs.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, content);
    assert_eq!(cs.last().unwrap()["choices"][0]["finish_reason"], v["choices"][0]["finish_reason"]);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_samples_share_the_prompt_and_seeds_repeat() {
    let Some(s) = Server::start(config()).await else { return };
    // 80 tokens of prompt: 5 full blocks of 16.
    let prompt: Vec<u32> = (0..80).map(|i| 1000 + i * 7).collect();
    let body = json!({"prompt": prompt, "n": 4, "max_tokens": 8, "temperature": 1.0, "seed": 42});
    let hits0 = s.metric("weave:prefix_cache_hits_total").await;
    let (code, a) = s.post("/v1/completions", body.clone()).await;
    assert_eq!(code, 200, "{a}");
    let texts = |v: &Value| -> Vec<String> {
        v["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(a["choices"].as_array().unwrap().len(), 4);
    assert_eq!(
        a["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    assert_eq!(a["usage"]["prompt_tokens"], 80, "the prompt counts once");
    assert_eq!(a["usage"]["completion_tokens"], 32);
    // The three later samples found the first one's full prompt blocks in the prefix cache
    // (79 tokens are looked up, as the last one must be computed): 4 blocks each.
    let hits = s.metric("weave:prefix_cache_hits_total").await - hits0;
    assert!(hits >= 3.0 * 64.0, "prefix-cache hits {hits}");
    let ta = texts(&a);
    assert!(ta.iter().collect::<std::collections::HashSet<_>>().len() > 1, "samples differ: {ta:?}");
    let (_, b) = s.post("/v1/completions", body).await;
    assert_eq!(texts(&b), ta, "same seed, same samples");
    // Streamed, each choice's chunks carry its index and end with its own finish_reason.
    let cs = chunks(
        &s.stream("/v1/completions", json!({"prompt": "Hi", "n": 3, "max_tokens": 4, "stream": true, "seed": 1})).await,
    );
    for i in 0..3 {
        let fin =
            cs.iter().filter(|c| c["choices"][0]["index"] == i && !c["choices"][0]["finish_reason"].is_null()).count();
        assert_eq!(fin, 1, "choice {i}");
    }
    assert_eq!(s.metric("weave:kv_cache_usage_perc").await, 0.0);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_for_completions_and_chat() {
    let Some(s) = Server::start(config()).await else { return };
    let (code, v) = s
        .post("/v1/completions", json!({"prompt": "1, 2, 3,", "max_tokens": 5, "temperature": 0, "logprobs": 3}))
        .await;
    assert_eq!(code, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n);
    assert_eq!(lp["text_offset"][0], 0);
    for k in 0..n {
        let l = lp["token_logprobs"][k].as_f64().unwrap();
        assert!(l <= 0.0);
        let top = lp["top_logprobs"][k].as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 3);
        // Greedy: the chosen token is the most likely one.
        let best = top.values().map(|x| x.as_f64().unwrap()).fold(f64::NEG_INFINITY, f64::max);
        assert!((best - l).abs() < 1e-6, "token {k}: {l} vs best {best}");
    }
    let text: String = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(text, v["choices"][0]["text"].as_str().unwrap());

    let (code, v) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 2}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len() as u64, v["usage"]["completion_tokens"].as_u64().unwrap());
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert!(content[0]["bytes"].is_array());
    // Without logprobs, none.
    let (_, v) = s.post("/v1/completions", json!({"prompt": "Hi", "max_tokens": 2})).await;
    assert!(v["choices"][0]["logprobs"].is_null());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_the_text_before_them() {
    let Some(s) = Server::start(config()).await else { return };
    let base = json!({"prompt": "Count: 1, 2, 3, 4, 5,", "max_tokens": 24, "temperature": 0});
    let (_, free) = s.post("/v1/completions", base.clone()).await;
    let full = free["choices"][0]["text"].as_str().unwrap().to_string();
    // Stop at the continuation's first comma (the model keeps counting: " 6, 7, ...").
    let first = full.find(',').expect("the model keeps counting");
    let mut body = base.clone();
    body["stop"] = json!([",", "never-seen"]);
    let (code, v) = s.post("/v1/completions", body.clone()).await;
    assert_eq!(code, 200);
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), &full[..first]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Streamed: the same text, and nothing past the stop string ever sent.
    body["stream"] = json!(true);
    let cs = chunks(&s.stream("/v1/completions", body).await);
    let text: String = cs.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, &full[..first]);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_metrics_tokenize_detokenize() {
    let Some(s) = Server::start(config()).await else { return };
    let (code, m) = s.get("/v1/models").await;
    assert_eq!(code, 200);
    let m: Value = serde_json::from_str(&m).unwrap();
    assert_eq!(m["data"][0]["id"], "smol");
    assert_eq!(m["data"][0]["max_model_len"], 1024);
    assert_eq!(s.get("/health").await.0, 200);
    let (_, t) = s.post("/tokenize", json!({"prompt": "hello world"})).await;
    let ids = t["tokens"].clone();
    assert_eq!(t["count"], ids.as_array().unwrap().len());
    assert_eq!(t["max_model_len"], 1024);
    let (_, d) = s.post("/detokenize", json!({"tokens": ids})).await;
    assert_eq!(d["prompt"], "hello world");
    let (code, metrics) = s.get("/metrics").await;
    assert_eq!(code, 200);
    for name in [
        "weave:num_requests_running",
        "weave:num_requests_waiting",
        "weave:kv_cache_usage_perc",
        "weave:num_preemptions_total",
        "weave:prefix_cache_queries_total",
        "weave:prefix_cache_hits_total",
        "weave:prompt_tokens_total",
        "weave:generation_tokens_total",
        "weave:time_to_first_token_seconds",
        "weave:inter_token_latency_seconds",
        "weave:e2e_request_latency_seconds",
        "weave:iteration_tokens_total",
    ] {
        assert!(metrics.contains(&format!("# TYPE {name} ")), "{name} missing");
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_naming_the_field() {
    let Some(s) = Server::start(config()).await else { return };
    let long: Vec<u32> = vec![1000; 1100];
    let cases = [
        ("/v1/completions", json!({"prompt": "hi", "temperature": -0.5}), 400, "temperature"),
        ("/v1/completions", json!({"prompt": "hi", "top_p": 0}), 400, "top_p"),
        ("/v1/completions", json!({"prompt": "hi", "max_tokens": 0}), 400, "max_tokens"),
        ("/v1/completions", json!({"prompt": "hi", "max_tokens": 2000}), 400, "max_tokens"),
        ("/v1/completions", json!({"prompt": long}), 400, "prompt"),
        ("/v1/completions", json!({"prompt": [1, 2, 99999999]}), 400, "prompt"),
        ("/v1/completions", json!({"prompt": 5}), 400, "prompt"),
        ("/v1/completions", json!({}), 400, "prompt"),
        ("/v1/completions", json!({"prompt": "hi", "n": 100}), 400, "n"),
        ("/v1/completions", json!({"prompt": "hi", "logprobs": 50}), 400, "logprobs"),
        ("/v1/completions", json!({"prompt": "hi", "stop": 7}), 400, "stop"),
        ("/v1/completions", json!({"prompt": "hi", "model": "gpt-4"}), 404, "model"),
        ("/v1/chat/completions", json!({"messages": []}), 400, "messages"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": 3}]}), 400, "messages[0].content"),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
            400,
            "top_logprobs",
        ),
        ("/detokenize", json!({"tokens": [99999999]}), 400, "tokens"),
    ];
    for (path, body, code, param) in cases {
        let (got, v) = s.post(path, body.clone()).await;
        assert_eq!(got, code, "{path} {body}: {v}");
        let e = &v["error"];
        assert_eq!(e["param"], param, "{body}: {v}");
        assert!(!e["message"].as_str().unwrap().is_empty());
        assert!(e["type"].is_string(), "{v}");
    }
    // The long prompt's message gives both lengths.
    let (_, v) = s.post("/v1/completions", json!({"prompt": long})).await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("1100") && msg.contains("1024"), "{msg}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // Not JSON at all.
    let r = s.http.post(format!("{}/v1/completions", s.url)).body("{oops").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("not valid JSON"), "{v}");
    // Unknown fields are ignored, and the server still serves.
    let (code, _) = s.post("/v1/completions", json!({"prompt": "hi", "max_tokens": 2, "frobnicate": true})).await;
    assert_eq!(code, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_gives_429_not_a_hang() {
    let mut cfg = config();
    cfg.max_waiting = 2;
    cfg.sched.max_num_seqs = 1;
    let Some(s) = Server::start(cfg).await else { return };
    let s = Arc::new(s);
    // One runs, two wait; the rest must be turned away at once.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let r = s
                .http
                .post(format!("{}/v1/completions", s.url))
                .json(&json!({"prompt": "Tell me a story", "max_tokens": 24, "ignore_eos": true}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").map(|h| h.to_str().unwrap().to_string());
            let body: Value = r.json().await.unwrap();
            (status, retry, body)
        }));
    }
    let t0 = Instant::now();
    let mut codes = Vec::new();
    for t in tasks {
        let (status, retry, body) = tokio::time::timeout(Duration::from_secs(120), t).await.unwrap().unwrap();
        if status == 429 {
            assert_eq!(retry.as_deref(), Some("1"));
            assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        }
        codes.push(status);
    }
    assert!(codes.iter().all(|&c| c == 200 || c == 429), "{codes:?}");
    assert!(codes.contains(&429), "{codes:?}");
    assert!(codes.iter().filter(|&&c| c == 200).count() >= 1, "{codes:?}");
    assert!(t0.elapsed() < Duration::from_secs(120));
    let s = Arc::into_inner(s).unwrap();
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_200_requests_at_20_per_second() {
    let Some(s) = Server::start(config()).await else { return };
    let cfg = weave::serve::bench::BenchServeConfig {
        base_url: s.url.clone(),
        endpoint: "/v1/completions".into(),
        model: None,
        num_prompts: 200,
        request_rate: 20.0,
        burstiness: 1.0,
        max_concurrency: None,
        random_input_len: 24,
        random_output_len: 6,
        random_range_ratio: 0.5,
        dataset: None,
        goodput: vec![],
        seed: 7,
        ignore_eos: true,
        timeout: Duration::from_secs(120),
        progress: false,
    };
    let t0 = Instant::now();
    let rep = tokio::time::timeout(Duration::from_secs(240), weave::serve::bench::run(&cfg, Arc::new(|| {})))
        .await
        .expect("the load test ends in time")
        .unwrap();
    eprintln!(
        "load: {} ok, {} failed in {:.1} s; {:.1} output tok/s; TTFT p50 {:.0} ms p99 {:.0} ms",
        rep.completed,
        rep.failed,
        t0.elapsed().as_secs_f64(),
        rep.output_throughput,
        rep.ttft_ms.median,
        rep.ttft_ms.p99
    );
    assert_eq!(rep.failed, 0, "{:?}", rep.errors);
    assert_eq!(rep.completed, 200);
    assert!(rep.usage_reported);
    let expected: usize = rep.requests.iter().map(|r| r.output_tokens).sum();
    assert_eq!(rep.total_output_tokens, expected);
    assert!(rep.requests.iter().all(|r| (3..=9).contains(&r.output_tokens)), "ignore_eos gives the asked lengths");
    assert_eq!(s.metric("weave:request_success_total").await, 200.0);
    assert_eq!(s.metric("weave:e2e_request_latency_seconds_count").await, 200.0);
    assert_eq!(s.metric("weave:generation_tokens_total").await, expected as f64);
    assert_eq!(s.metric("weave:num_requests_running").await, 0.0);
    assert_eq!(s.metric("weave:kv_cache_usage_perc").await, 0.0, "no blocks left held");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_streams_free_their_blocks_within_a_step() {
    let Some(s) = Server::start(config()).await else { return };
    let s = Arc::new(s);
    // 50 streams that would run long; each reads two chunks and hangs up.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let r = s
                .http
                .post(format!("{}/v1/completions", s.url))
                .json(&json!({"prompt": format!("Story number {i}:"), "max_tokens": 400, "ignore_eos": true, "stream": true}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            let mut body = r.bytes_stream();
            let mut seen = 0;
            while seen < 2 {
                let b = body.next().await.expect("stream open").unwrap();
                seen += String::from_utf8_lossy(&b).matches("data: ").count();
            }
            // Dropping the body closes the connection mid-stream.
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let steps_at_drop = s.metric("weave:iteration_tokens_total_count").await;
    let t0 = Instant::now();
    loop {
        if s.metric("weave:kv_cache_usage_perc").await == 0.0
            && s.metric("weave:num_requests_running").await == 0.0
            && s.metric("weave:request_success_total").await == 50.0
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "blocks still held 60 s after every client left");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let steps = s.metric("weave:iteration_tokens_total_count").await - steps_at_drop;
    eprintln!("disconnect: all 50 aborted {steps} step(s) after the last client left");
    // The step running when the last client left may finish; the next one must not start
    // with their blocks held. One more is allowed for the socket error to surface.
    assert!(steps <= 2.0, "{steps} steps ran after the clients left");
    assert_eq!(s.metric("weave:request_success_total").await, 50.0);
    let (_, metrics) = s.get("/metrics").await;
    assert!(metrics.contains("finished_reason=\"abort\""), "aborts are counted as such");
    assert!(s.metric("weave:generation_tokens_total").await < 50.0 * 400.0, "the streams were cut short");
    let s = Arc::into_inner(s).unwrap();
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_running_requests_and_refuses_new_ones() {
    let Some(s) = Server::start(config()).await else { return };
    let http = s.http.clone();
    let url = s.url.clone();
    let running = tokio::spawn({
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.post(format!("{url}/v1/completions"))
                // Long enough to still be running when the drain starts, on a fast backend too.
                .json(&json!({"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": true, "stream": true}))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    });
    // Wait until it is running.
    let t0 = Instant::now();
    while s.metric("weave:num_requests_running").await < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.app.engine.drain();
    let r = http.post(format!("{url}/v1/completions")).json(&json!({"prompt": "x"})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "shutting_down");
    assert_eq!(http.get(format!("{url}/health")).send().await.unwrap().status().as_u16(), 503);
    let text = running.await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "the running request finished: {text}");
    let finishes = text.matches("\"finish_reason\":\"length\"").count();
    assert_eq!(finishes, 1, "{text}");
    s.shutdown().await;
}

/// What vLLM's router asks of a worker: `/get_load`, the two render endpoints (the token ids
/// the real call would run, checked as it checks them), and the fields it adds to bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_worker_contract() {
    let Some(s) = Server::start(config()).await else { return };
    let (code, load) = s.get("/get_load").await;
    assert_eq!(code, 200);
    assert_eq!(serde_json::from_str::<Value>(&load).unwrap()["load"], 0);

    // Completions render: one entry per prompt, the ids /tokenize gives.
    let (_, t) = s.post("/tokenize", json!({"prompt": "hello world"})).await;
    let (code, r) = s.post("/v1/completions/render", json!({"model": "smol", "prompt": "hello world"})).await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(r.as_array().unwrap().len(), 1);
    assert_eq!(r[0]["token_ids"], t["tokens"]);
    assert_eq!(r[0]["model"], "smol");
    let (_, r2) = s.post("/v1/completions/render", json!({"prompt": ["a b", "c d e"], "max_tokens": 5})).await;
    assert_eq!(r2.as_array().unwrap().len(), 2);
    assert_eq!(r2[1]["sampling_params"]["max_tokens"], 5);
    // The same checks as the real call.
    let (code, e) = s.post("/v1/completions/render", json!({"prompt": "x", "temperature": -1})).await;
    assert_eq!((code, e["error"]["param"].as_str()), (400, Some("temperature")), "{e}");

    // Chat render: the conversation after the chat template, as the real call counts it.
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]);
    let (_, tm) = s.post("/tokenize", json!({"messages": messages})).await;
    let (code, cr) = s.post("/v1/chat/completions/render", json!({"messages": messages})).await;
    assert_eq!(code, 200, "{cr}");
    assert_eq!(cr["token_ids"], tm["tokens"]);
    // A body as the router rebuilds it: every field it adds is accepted.
    let chat_body = json!({
        "model": "smol", "messages": messages, "max_tokens": 4, "temperature": 0.0, "stream": false,
        "logprobs": false, "no_stop_trim": false, "ignore_eos": false, "continue_final_message": false,
        "skip_special_tokens": true, "separate_reasoning": true, "stream_reasoning": true,
        "return_hidden_states": false, "include_reasoning": true,
    });
    let (code, c) = s.post("/v1/chat/completions", chat_body).await;
    assert_eq!(code, 200, "{c}");
    assert_eq!(c["usage"]["prompt_tokens"], cr["token_ids"].as_array().unwrap().len());
    let (code, c) = s
        .post(
            "/v1/completions",
            json!({"model": "smol", "prompt": "The sky is", "max_tokens": 4, "temperature": 0.0, "echo": false,
                   "no_stop_trim": false, "ignore_eos": true, "skip_special_tokens": true,
                   "return_hidden_states": false, "stream": false}),
        )
        .await;
    assert_eq!(code, 200, "{c}");
    assert_eq!(c["usage"]["completion_tokens"], 4, "ignore_eos is honoured");
    // Without the generation prompt, the rendering stops after the last message.
    let (_, no_gen) = s.post("/tokenize", json!({"messages": messages, "add_generation_prompt": false})).await;
    assert!(no_gen["count"].as_u64().unwrap() < tm["count"].as_u64().unwrap(), "{no_gen} vs {tm}");
    // What weave cannot honour is refused by name.
    let (code, e) = s.post("/v1/chat/completions", json!({"messages": messages, "continue_final_message": true})).await;
    assert_eq!((code, e["error"]["param"].as_str()), (400, Some("continue_final_message")), "{e}");

    // The load counts a request while it runs.
    let http = s.http.clone();
    let url = format!("{}/v1/completions", s.url);
    let long = tokio::spawn(async move {
        http.post(url).json(&json!({"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": true})).send().await
    });
    let t0 = Instant::now();
    let mut seen = 0;
    while t0.elapsed() < Duration::from_secs(30) && seen == 0 {
        let (_, l) = s.get("/get_load").await;
        seen = serde_json::from_str::<Value>(&l).unwrap()["load"].as_u64().unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(seen, 1, "a running request shows in /get_load");
    long.await.unwrap().unwrap();

    // sglang-router's info endpoints and vLLM's /version.
    for path in ["/get_server_info", "/server_info"] {
        let (code, i) = s.get(path).await;
        let i: Value = serde_json::from_str(&i).unwrap();
        assert_eq!((code, &i["block_size"], &i["max_model_len"]), (200, &json!(16), &json!(1024)), "{path}: {i}");
    }
    for path in ["/get_model_info", "/model_info"] {
        let (code, i) = s.get(path).await;
        assert_eq!(code, 200);
        assert_eq!(serde_json::from_str::<Value>(&i).unwrap()["is_generation"], true, "{path}");
    }
    assert_eq!(s.get("/version").await.0, 200);
    s.shutdown().await;
}

/// `echo` (which vLLM's router always sends) puts the prompt's text before the completion,
/// streamed or not; with logprobs it is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_prepends_the_prompt() {
    let Some(s) = Server::start(config()).await else { return };
    let body = json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0.0});
    let (_, plain) = s.post("/v1/completions", body.clone()).await;
    let mut echo = body.clone();
    echo["echo"] = json!(true);
    let (code, e) = s.post("/v1/completions", echo.clone()).await;
    assert_eq!(code, 200, "{e}");
    let want = format!("The capital of France is{}", plain["choices"][0]["text"].as_str().unwrap());
    assert_eq!(e["choices"][0]["text"], want);
    echo["stream"] = json!(true);
    let text: String = chunks(&s.stream("/v1/completions", echo.clone()).await)
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str().map(String::from))
        .collect();
    assert_eq!(text, want);
    echo["stream"] = json!(false);
    echo["logprobs"] = json!(1);
    let (code, err) = s.post("/v1/completions", echo).await;
    assert_eq!((code, err["error"]["param"].as_str()), (400, Some("echo")), "{err}");
    s.shutdown().await;
}

/// `--metrics-prefix vllm`: the gauges the Kubernetes inference gateway scrapes, under
/// vLLM's exact names, with the KV usage a 0..1 fraction that moves with a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_metric_names_for_the_gateway() {
    let Some(s) = Server::start(ServeConfig { metrics_prefix: "vllm".into(), ..config() }).await else { return };
    let (_, text) = s.get("/metrics").await;
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:cache_config_info",
        "vllm:lora_requests_info",
        "vllm:prefix_cache_hits_total",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing from\n{text}");
    }
    assert!(!text.contains("weave:"), "{text}");
    let info = text.lines().find(|l| l.starts_with("vllm:cache_config_info{")).unwrap();
    assert!(info.contains("block_size=\"16\"") && info.contains("num_gpu_blocks=\"1025\""), "{info}");
    // KV usage while a long request runs is a fraction in (0, 1).
    let http = s.http.clone();
    let url = format!("{}/v1/completions", s.url);
    let long = tokio::spawn(async move {
        http.post(url).json(&json!({"prompt": "Once upon a time", "max_tokens": 150, "ignore_eos": true})).send().await
    });
    let t0 = Instant::now();
    let mut usage = 0.0;
    while t0.elapsed() < Duration::from_secs(30) && usage == 0.0 {
        usage = s.metric("vllm:kv_cache_usage_perc").await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(usage > 0.0 && usage < 1.0, "kv_cache_usage_perc {usage}");
    long.await.unwrap().unwrap();
    s.shutdown().await;
}

/// Whether `v` is an object with `keys`, each holding a value of the given JSON type.
fn has_typed_keys(v: &Value, keys: &[(&str, &str)]) -> bool {
    keys.iter().all(|(k, ty)| match (v.get(*k), *ty) {
        (Some(x), "string") => x.is_string(),
        (Some(x), "integer") => x.is_i64() || x.is_u64(),
        (Some(x), "number") => x.is_number(),
        (Some(x), "boolean") => x.is_boolean(),
        (Some(x), "array") => x.is_array(),
        (Some(x), "object") => x.is_object(),
        _ => false,
    })
}

/// `\d{3}-\d{4}` exactly.
fn is_phone(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 8 && b[3] == b'-' && b.iter().enumerate().all(|(i, c)| i == 3 || c.is_ascii_digit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_outputs_hold_beside_unconstrained_neighbours() {
    let Some(s) = Server::start(config()).await else { return };
    let plain: Vec<String> = (0..6).map(|i| format!("Story {i}: once upon a time")).collect();
    let free = |p: &str| json!({"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    // Alone first.
    let mut alone = Vec::new();
    for p in &plain {
        let (code, v) = s.post("/v1/completions", free(p)).await;
        assert_eq!(code, 200, "{v}");
        alone.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    // Then each beside guided requests of every kind, sampled at temperature 1.
    let person = json!({"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"], "additionalProperties": false});
    let flags = json!({"type": "object", "properties": {"ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}, "required": ["ok", "tags"], "additionalProperties": false});
    let guided = [
        (
            "completions",
            json!({"prompt": "A person:", "max_tokens": 60, "temperature": 1, "seed": 1, "guided_json": person}),
        ),
        (
            "completions",
            json!({"prompt": "Flags:", "max_tokens": 60, "temperature": 1, "seed": 2, "structured_outputs": {"json": flags}}),
        ),
        (
            "completions",
            json!({"prompt": "Call me at", "max_tokens": 20, "temperature": 1, "seed": 3, "guided_regex": "\\d{3}-\\d{4}"}),
        ),
        (
            "completions",
            json!({"prompt": "Pick:", "max_tokens": 20, "temperature": 1, "seed": 4, "guided_choice": ["left", "right", "up and down"]}),
        ),
        (
            "chat",
            json!({"messages": [{"role": "user", "content": "A small JSON object, please."}], "max_tokens": 400, "temperature": 1, "seed": 5, "response_format": {"type": "json_object"}}),
        ),
        (
            "chat",
            json!({"messages": [{"role": "user", "content": "A person."}], "max_tokens": 60, "temperature": 1, "seed": 6, "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": person, "strict": true}}}),
        ),
    ];
    let mut futs = Vec::new();
    for p in &plain {
        futs.push(s.post("/v1/completions", free(p)));
    }
    for (kind, body) in &guided {
        let path = if *kind == "chat" { "/v1/chat/completions" } else { "/v1/completions" };
        futs.push(s.post(path, body.clone()));
    }
    let out = futures_util::future::join_all(futs).await;
    for (i, (code, v)) in out.iter().enumerate() {
        assert_eq!(*code, 200, "request {i}: {v}");
    }
    for (i, want) in alone.iter().enumerate() {
        assert_eq!(
            out[i].1["choices"][0]["text"],
            want.as_str(),
            "unconstrained request {i} changed beside guided ones"
        );
    }
    let text = |k: usize| -> String {
        let c = &out[plain.len() + k].1["choices"][0];
        c["text"].as_str().or(c["message"]["content"].as_str()).unwrap().to_string()
    };
    let json_of = |k: usize| -> Value {
        serde_json::from_str(&text(k)).unwrap_or_else(|e| panic!("guided request {k}: {:?} is not JSON: {e}", text(k)))
    };
    let p = json_of(0);
    assert!(has_typed_keys(&p, &[("name", "string"), ("age", "integer")]) && p.as_object().unwrap().len() == 2, "{p}");
    assert!((0..=120).contains(&p["age"].as_i64().unwrap()), "{p}");
    assert!(p["name"].as_str().unwrap().chars().count() <= 12, "{p}");
    let f = json_of(1);
    assert!(has_typed_keys(&f, &[("ok", "boolean"), ("tags", "array")]), "{f}");
    assert!(f["tags"].as_array().unwrap().iter().all(|t| t == "a" || t == "b"), "{f}");
    assert!(is_phone(&text(2)), "{:?}", text(2));
    assert!(["left", "right", "up and down"].contains(&text(3).as_str()), "{:?}", text(3));
    // Any JSON object has no bound on its length: one that runs out of tokens (a sampled
    // path may on another CPU's numerics) must still have begun as an object.
    if out[plain.len() + 4].1["choices"][0]["finish_reason"] == "stop" {
        assert!(json_of(4).is_object());
    } else {
        assert!(text(4).starts_with('{'), "{:?}", text(4));
    }
    let p = json_of(5);
    assert!(has_typed_keys(&p, &[("name", "string"), ("age", "integer")]), "{p}");
    // A guided request that completes its grammar ends with "stop", not by length.
    for k in 2..4 {
        assert_eq!(out[plain.len() + k].1["choices"][0]["finish_reason"], "stop", "{}", out[plain.len() + k].1);
    }
    // Streamed, the chunks add up to a valid output too.
    let mut body = guided[0].1.clone();
    body["stream"] = json!(true);
    let cs = chunks(&s.stream("/v1/completions", body).await);
    let streamed: String = cs.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    let v: Value = serde_json::from_str(&streamed).unwrap_or_else(|e| panic!("{streamed:?}: {e}"));
    assert!(has_typed_keys(&v, &[("name", "string"), ("age", "integer")]), "{v}");
    // n > 1: each sample has its own matcher.
    let (code, v) = s
        .post("/v1/completions", json!({"prompt": "Numbers:", "n": 3, "max_tokens": 20, "temperature": 1, "seed": 7, "guided_regex": "\\d{3}-\\d{4}"}))
        .await;
    assert_eq!(code, 200, "{v}");
    let texts: Vec<&str> = v["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(texts.len(), 3);
    assert!(texts.iter().all(|t| is_phone(t)), "{texts:?}");
    // The server counted them and timed their masks.
    assert!(s.metric("weave:structured_output_requests_total").await >= 10.0);
    assert!(s.metric("weave:structured_output_mask_seconds_count").await > 0.0);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_constraints_are_400s_naming_the_field_before_they_run() {
    let Some(s) = Server::start(config()).await else { return };
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let cases = [
        ("/v1/completions", json!({"prompt": "x", "guided_regex": "(unclosed"}), "guided_regex", "unclosed"),
        ("/v1/completions", json!({"prompt": "x", "guided_json": {"type": "nope"}}), "guided_json", ""),
        (
            "/v1/completions",
            json!({"prompt": "x", "guided_grammar": "start: missing_rule"}),
            "guided_grammar",
            "missing_rule",
        ),
        ("/v1/completions", json!({"prompt": "x", "guided_choice": []}), "guided_choice", "empty"),
        ("/v1/completions", json!({"prompt": "x", "structured_outputs": {"regex": "(("}}), "structured_outputs", ""),
        (
            "/v1/completions",
            json!({"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}),
            "guided_choice",
            "guided_regex",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "response_format": {"type": "xml"}}),
            "response_format.type",
            "xml",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format.json_schema.schema",
            "required",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "tools": tool, "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            "tool_choice.function.name",
            "\"g\"",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "tools": tool, "tool_choice": "required", "guided_regex": "a"}),
            "tool_choice",
            "constrains",
        ),
    ];
    for (path, body, param, needle) in cases {
        let (code, v) = s.post(path, body.clone()).await;
        assert_eq!(code, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.starts_with(param.split('.').next().unwrap()) && msg.contains(needle), "{body}: {msg}");
    }
    // None of them reached the engine.
    assert_eq!(s.metric("weave:structured_output_requests_total").await, 0.0);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_named_and_required_streamed_and_not() {
    let Some(s) = Server::start(config()).await else { return };
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "add", "description": "Adds two integers", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"], "additionalProperties": false}}}
    ]);
    let msgs = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    let check_call = |c: &Value| {
        let f = &c["function"];
        let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
        match f["name"].as_str().unwrap() {
            "get_weather" => assert!(has_typed_keys(&args, &[("city", "string"), ("unit", "string")]), "{args}"),
            "add" => assert!(has_typed_keys(&args, &[("a", "integer"), ("b", "integer")]), "{args}"),
            other => panic!("call to {other}"),
        }
        assert!(c["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(c["type"], "function");
    };
    let named = json!({"type": "function", "function": {"name": "add"}});
    for choice in [named.clone(), json!("required")] {
        let body = json!({"messages": msgs, "tools": tools, "tool_choice": choice, "max_tokens": 120, "temperature": 1, "seed": 9, "parallel_tool_calls": false});
        let (code, v) = s.post("/v1/chat/completions", body.clone()).await;
        assert_eq!(code, 200, "{v}");
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{v}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert!(!calls.is_empty());
        calls.iter().for_each(check_call);
        if choice == named {
            assert_eq!(calls.len(), 1);
            assert_eq!(calls[0]["function"]["name"], "add");
        }
        // Streamed: the calls come as tool_calls deltas, then finish_reason tool_calls.
        let mut sb = body.clone();
        sb["stream"] = json!(true);
        let cs = chunks(&s.stream("/v1/chat/completions", sb).await);
        let deltas: Vec<&Value> =
            cs.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array()).flatten().collect();
        assert!(!deltas.is_empty(), "{cs:?}");
        deltas.iter().for_each(|d| check_call(d));
        assert_eq!(cs.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");
    }
    // tool_choice none: the model is not shown the tools, and no call is parsed.
    let (_, v) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": msgs, "tools": tools, "tool_choice": "none", "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert!(v["choices"][0]["message"].get("tool_calls").is_none(), "{v}");
    assert_eq!(v["choices"][0]["message"]["content"].as_str().map(|t| !t.is_empty()), Some(true));
    s.shutdown().await;
}
