//! `weave bench serve`: a load generator for any OpenAI-compatible server, after
//! `vllm bench serve`. Requests arrive by a Poisson or gamma process (or all at once), each
//! streams its completion, and the client times every chunk: TTFT, ITL, TPOT and end-to-end
//! latency, request and token throughput, and goodput under SLOs.
//!
//! Tokens are counted from the `usage` the server sends at the end of the stream
//! (`stream_options.include_usage`); a server that sends none is counted by its content
//! chunks, and the report says so.

use crate::sampling::Rng;
use crate::workload::{Lengths, WorkItem, Workload};
use anyhow::{bail, Context};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to send and how.
#[derive(Debug, Clone)]
pub struct BenchServeConfig {
    /// e.g. `http://127.0.0.1:8000`.
    pub base_url: String,
    /// `/v1/completions` (default) or `/v1/chat/completions`.
    pub endpoint: String,
    /// The model name to send; `None` asks the server's `/v1/models`.
    pub model: Option<String>,
    pub num_prompts: usize,
    /// Requests per second; infinity sends them all at once.
    pub request_rate: f64,
    /// Gamma shape of the gaps: 1 = Poisson, < 1 burstier.
    pub burstiness: f64,
    pub max_concurrency: Option<usize>,
    pub random_input_len: usize,
    pub random_output_len: usize,
    /// Lengths are drawn uniformly within ± this fraction.
    pub random_range_ratio: f64,
    /// JSONL with `prompt` (or, for the chat endpoint, `messages`) and `max_tokens` (or
    /// `output_len`) per line, instead of random prompts.
    pub dataset: Option<PathBuf>,
    /// SLOs in milliseconds: (`ttft` | `tpot` | `e2el`, limit).
    pub goodput: Vec<(String, f64)>,
    pub seed: u64,
    /// Ask the server to ignore EOS, so that each request produces its full output length.
    pub ignore_eos: bool,
    /// Per-request timeout.
    pub timeout: Duration,
    pub progress: bool,
}

/// One prompt to send.
#[derive(Debug, Clone)]
pub struct BenchPrompt {
    pub prompt: String,
    /// A whole conversation (chat endpoint only), sent instead of `prompt` as one user turn.
    pub messages: Option<Value>,
    pub max_tokens: usize,
    /// Seconds after the start.
    pub send_at: f64,
}

/// What became of one request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestResult {
    pub success: bool,
    pub error: Option<String>,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Whether `output_tokens` came from the server's `usage` (else: content chunks).
    pub usage_reported: bool,
    /// When it was sent, seconds from the benchmark's start (with its TTFT, the arrival
    /// trace a simulator can replay).
    pub sent_s: f64,
    pub ttft: f64,
    pub itl: Vec<f64>,
    pub latency: f64,
}

/// Mean, median, p99 and standard deviation, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub mean: f64,
    pub median: f64,
    pub p99: f64,
    pub std: f64,
}

impl Stats {
    pub fn of_ms(xs: &[f64]) -> Stats {
        if xs.is_empty() {
            return Stats::default();
        }
        let mut v: Vec<f64> = xs.iter().map(|x| x * 1e3).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let q = |p: f64| {
            let r = p * (n - 1.0);
            let (lo, hi) = (r.floor() as usize, r.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (r - lo as f64)
        };
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        Stats { mean, median: q(0.5), p99: q(0.99), std }
    }
}

/// The benchmark's result, as printed and as written by `--result-file`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchServeReport {
    pub base_url: String,
    pub model: String,
    pub request_rate: f64,
    pub burstiness: f64,
    pub max_concurrency: Option<usize>,
    pub num_prompts: usize,
    pub duration_s: f64,
    pub completed: usize,
    pub failed: usize,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    /// Whether every completed request's tokens came from `usage`.
    pub usage_reported: bool,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    /// Requests per second that met every `--goodput` SLO (None without SLOs).
    pub goodput: Option<f64>,
    pub ttft_ms: Stats,
    pub tpot_ms: Stats,
    pub itl_ms: Stats,
    pub e2el_ms: Stats,
    /// The first few errors, for the report.
    pub errors: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<RequestResult>,
}

/// Parses `ttft:MS`, `tpot:MS`, `e2el:MS`.
pub fn parse_goodput(s: &str) -> Result<(String, f64), String> {
    let (k, v) = s.split_once(':').ok_or_else(|| format!("bad --goodput {s:?}: use ttft:MS, tpot:MS or e2el:MS"))?;
    if !["ttft", "tpot", "e2el"].contains(&k) {
        return Err(format!("bad --goodput metric {k:?}: use ttft, tpot or e2el"));
    }
    let ms: f64 = v.parse().map_err(|_| format!("bad --goodput {s:?}: {v:?} is not a number of milliseconds"))?;
    if ms.is_nan() || ms <= 0.0 {
        return Err(format!("bad --goodput {s:?}: the limit must be positive"));
    }
    Ok((k.to_string(), ms))
}

/// Common English words that most BPE vocabularies hold as one token each (with their
/// leading space), so that a prompt of N words is close to N tokens.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he",
    "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you", "were", "their",
    "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will", "would", "who", "so", "no",
    "time", "people", "year", "way", "day", "man", "thing", "woman", "life", "child", "world", "school", "state",
    "family", "student", "group", "country", "problem", "hand", "part", "place", "case", "week", "company", "system",
    "program", "question", "work", "number", "night", "point", "home", "water", "room", "mother", "area", "money",
    "story", "fact", "month", "lot", "right", "study", "book", "eye", "job", "word", "business", "issue", "side",
];

/// The prompts to send: from `--dataset`, or random words of the asked lengths.
pub fn prompts(cfg: &BenchServeConfig) -> anyhow::Result<Vec<BenchPrompt>> {
    let r = cfg.random_range_ratio;
    if !(0.0..1.0).contains(&r) {
        bail!("--random-range-ratio must be in [0, 1), got {r}");
    }
    let span = |n: usize| {
        let lo = ((n as f64) * (1.0 - r)).round().max(1.0) as usize;
        let hi = ((n as f64) * (1.0 + r)).round().max(1.0) as usize;
        if lo == hi {
            Lengths::Fixed(lo)
        } else {
            Lengths::Uniform(lo, hi)
        }
    };
    let rate = if cfg.request_rate > 0.0 { cfg.request_rate } else { f64::INFINITY };
    let chat = cfg.endpoint.contains("chat");
    if cfg.burstiness.is_nan() || cfg.burstiness <= 0.0 {
        bail!("--burstiness must be positive, got {}", cfg.burstiness);
    }
    let items: Vec<WorkItem> = Workload {
        num_requests: cfg.num_prompts,
        rate,
        burstiness: cfg.burstiness,
        prompt: span(cfg.random_input_len),
        output: span(cfg.random_output_len),
        seed: cfg.seed,
    }
    .items();
    let send_at = |i: usize| if rate.is_finite() { items[i].arrival_s } else { 0.0 };
    if let Some(path) = &cfg.dataset {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read --dataset {}", path.display()))?;
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{}: line {}: not valid JSON", path.display(), i + 1))?;
            let messages = match v.get("messages") {
                None => None,
                Some(m @ Value::Array(_)) if chat => Some(m.clone()),
                Some(Value::Array(_)) => bail!(
                    "{}: line {}: has \"messages\", which only --endpoint /v1/chat/completions sends",
                    path.display(),
                    i + 1
                ),
                Some(_) => bail!("{}: line {}: \"messages\" must be a list", path.display(), i + 1),
            };
            let prompt = match (v.get("prompt").and_then(Value::as_str), &messages) {
                (Some(p), _) => p,
                (None, Some(_)) => "",
                (None, None) => bail!(
                    "{}: line {}: needs a string field \"prompt\" (or a list \"messages\" for chat)",
                    path.display(),
                    i + 1
                ),
            };
            let max_tokens = v
                .get("max_tokens")
                .or_else(|| v.get("output_len"))
                .and_then(Value::as_u64)
                .map_or(cfg.random_output_len, |x| x as usize);
            rows.push((prompt.to_string(), messages, max_tokens));
        }
        if rows.is_empty() {
            bail!("--dataset {} holds no prompts", path.display());
        }
        // Cycle through the file to make num_prompts requests.
        return Ok((0..cfg.num_prompts)
            .map(|i| {
                let (p, msgs, m) = &rows[i % rows.len()];
                BenchPrompt { prompt: p.clone(), messages: msgs.clone(), max_tokens: *m, send_at: send_at(i) }
            })
            .collect());
    }
    let mut rng = Rng::new(cfg.seed ^ 0x5eed_0f70_6b65);
    Ok(items
        .iter()
        .enumerate()
        .map(|(i, it)| {
            // Random words: no two prompts share a prefix beyond chance.
            let words: Vec<&str> =
                (0..it.prompt_len).map(|_| WORDS[(rng.next_u64() % WORDS.len() as u64) as usize]).collect();
            BenchPrompt { prompt: words.join(" "), messages: None, max_tokens: it.output_len, send_at: send_at(i) }
        })
        .collect())
}

/// The server's first model, from `/v1/models`.
pub async fn first_model(client: &reqwest::Client, base_url: &str) -> anyhow::Result<String> {
    let url = format!("{}/v1/models", base_url.trim_end_matches('/'));
    let v: Value = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .error_for_status()
        .with_context(|| format!("GET {url}"))?
        .json()
        .await
        .with_context(|| format!("GET {url}: not JSON"))?;
    v["data"][0]["id"].as_str().map(String::from).with_context(|| format!("GET {url}: no model listed in {v}"))
}

/// Sends one streamed request and times its chunks.
pub async fn send_one(
    client: &reqwest::Client,
    url: &str,
    chat: bool,
    model: &str,
    p: &BenchPrompt,
    ignore_eos: bool,
) -> RequestResult {
    let mut body = json!({
        "model": model,
        "max_tokens": p.max_tokens,
        "temperature": 0.0,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": ignore_eos,
    });
    if let (true, Some(m)) = (chat, &p.messages) {
        body["messages"] = m.clone();
    } else if chat {
        body["messages"] = json!([{"role": "user", "content": p.prompt}]);
    } else {
        body["prompt"] = json!(p.prompt);
    }
    let t0 = Instant::now();
    let mut out = RequestResult::default();
    let resp = match client.post(url).json(&body).send().await {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(format!("request failed: {e}"));
            return out;
        }
    };
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        out.error = Some(format!("HTTP {status}: {}", text.chars().take(300).collect::<String>()));
        return out;
    }
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut last = t0;
    let mut chunks = 0usize;
    let mut done = false;
    while let Some(item) = stream.next().await {
        let bytes = match item {
            Ok(b) => b,
            Err(e) => {
                out.error = Some(format!("stream broke: {e}"));
                return out;
            }
        };
        buf.extend_from_slice(&bytes);
        // SSE events end with a blank line.
        while let Some(end) = find_event_end(&buf) {
            let event: Vec<u8> = buf.drain(..end.1).collect();
            let text = String::from_utf8_lossy(&event[..end.0]).into_owned();
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data:") else { continue };
                let data = data.trim();
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = match serde_json::from_str(data) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                if let Some(e) = v.get("error") {
                    out.error = Some(format!("server error in stream: {e}"));
                    return out;
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    out.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                    out.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
                    out.usage_reported = true;
                }
                let c = &v["choices"][0];
                let content = if chat { c["delta"]["content"].as_str() } else { c["text"].as_str() };
                if content.is_some_and(|s| !s.is_empty()) {
                    let now = Instant::now();
                    if chunks == 0 {
                        out.ttft = (now - t0).as_secs_f64();
                    } else {
                        out.itl.push((now - last).as_secs_f64());
                    }
                    last = now;
                    chunks += 1;
                }
            }
        }
    }
    out.latency = t0.elapsed().as_secs_f64();
    if !done && out.error.is_none() {
        out.error = Some("the stream ended without [DONE]".into());
        return out;
    }
    if !out.usage_reported {
        out.output_tokens = chunks;
    }
    if chunks == 0 {
        out.ttft = out.latency;
    }
    out.success = true;
    out
}

/// Where the first SSE event in `buf` ends: (end of its text, end including the separator).
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    for i in 0..buf.len() {
        if buf[i..].starts_with(b"\n\n") {
            return Some((i, i + 2));
        }
        if buf[i..].starts_with(b"\r\n\r\n") {
            return Some((i, i + 4));
        }
    }
    None
}

/// Runs the benchmark. `on_done` is told of each finished request (for a progress bar).
pub async fn run(cfg: &BenchServeConfig, on_done: Arc<dyn Fn() + Send + Sync>) -> anyhow::Result<BenchServeReport> {
    let client = reqwest::Client::builder()
        .timeout(cfg.timeout)
        .pool_max_idle_per_host(cfg.max_concurrency.unwrap_or(256).min(1024))
        .build()?;
    let base = cfg.base_url.trim_end_matches('/').to_string();
    let model = match &cfg.model {
        Some(m) => m.clone(),
        None => first_model(&client, &base).await?,
    };
    let chat = cfg.endpoint.contains("chat");
    let url = format!("{base}{}", cfg.endpoint);
    let prompts = prompts(cfg)?;
    let limit = cfg.max_concurrency.map(|n| Arc::new(tokio::sync::Semaphore::new(n.max(1))));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(prompts.len());
    for p in prompts {
        let wait = p.send_at - t0.elapsed().as_secs_f64();
        if wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
        let (client, url, model, limit, done) =
            (client.clone(), url.clone(), model.clone(), limit.clone(), on_done.clone());
        let ignore_eos = cfg.ignore_eos;
        tasks.push(tokio::spawn(async move {
            let _permit = match &limit {
                Some(s) => Some(s.clone().acquire_owned().await.expect("semaphore open")),
                None => None,
            };
            let sent_s = t0.elapsed().as_secs_f64();
            let r = RequestResult { sent_s, ..send_one(&client, &url, chat, &model, &p, ignore_eos).await };
            done();
            r
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await?);
    }
    let duration = t0.elapsed().as_secs_f64();
    Ok(report(cfg, &model, duration, results))
}

/// The report over the results of a run that took `duration` seconds.
pub fn report(cfg: &BenchServeConfig, model: &str, duration: f64, results: Vec<RequestResult>) -> BenchServeReport {
    let ok: Vec<&RequestResult> = results.iter().filter(|r| r.success).collect();
    let tpot = |r: &RequestResult| (r.output_tokens > 1).then(|| (r.latency - r.ttft) / (r.output_tokens - 1) as f64);
    let ttfts: Vec<f64> = ok.iter().map(|r| r.ttft).collect();
    let tpots: Vec<f64> = ok.iter().filter_map(|r| tpot(r)).collect();
    let itls: Vec<f64> = ok.iter().flat_map(|r| r.itl.iter().copied()).collect();
    let e2el: Vec<f64> = ok.iter().map(|r| r.latency).collect();
    let total_in: usize = ok.iter().map(|r| r.prompt_tokens).sum();
    let total_out: usize = ok.iter().map(|r| r.output_tokens).sum();
    let goodput = (!cfg.goodput.is_empty()).then(|| {
        let good = ok
            .iter()
            .filter(|r| {
                cfg.goodput.iter().all(|(k, ms)| {
                    let x = match k.as_str() {
                        "ttft" => r.ttft,
                        "tpot" => tpot(r).unwrap_or(0.0),
                        _ => r.latency,
                    };
                    x * 1e3 <= *ms
                })
            })
            .count();
        good as f64 / duration
    });
    BenchServeReport {
        base_url: cfg.base_url.clone(),
        model: model.to_string(),
        request_rate: cfg.request_rate,
        burstiness: cfg.burstiness,
        max_concurrency: cfg.max_concurrency,
        num_prompts: results.len(),
        duration_s: duration,
        completed: ok.len(),
        failed: results.len() - ok.len(),
        total_input_tokens: total_in,
        total_output_tokens: total_out,
        usage_reported: ok.iter().all(|r| r.usage_reported),
        request_throughput: ok.len() as f64 / duration,
        output_throughput: total_out as f64 / duration,
        total_token_throughput: (total_in + total_out) as f64 / duration,
        goodput,
        ttft_ms: Stats::of_ms(&ttfts),
        tpot_ms: Stats::of_ms(&tpots),
        itl_ms: Stats::of_ms(&itls),
        e2el_ms: Stats::of_ms(&e2el),
        errors: results.iter().filter_map(|r| r.error.clone()).take(5).collect(),
        requests: results,
    }
}

impl BenchServeReport {
    /// The report as `vllm bench serve` lays it out.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let line = |s: &mut String, k: &str, v: String| s.push_str(&format!("{k:<40}{v:>12}\n"));
        s.push_str(&format!("{:=^52}\n", " Serving Benchmark Result "));
        line(&mut s, "Successful requests:", self.completed.to_string());
        line(&mut s, "Failed requests:", self.failed.to_string());
        let rate = if self.request_rate.is_finite() && self.request_rate > 0.0 {
            format!("{}", self.request_rate)
        } else {
            "inf".into()
        };
        line(&mut s, "Request rate configured (RPS):", rate);
        line(&mut s, "Benchmark duration (s):", format!("{:.2}", self.duration_s));
        line(&mut s, "Total input tokens:", self.total_input_tokens.to_string());
        line(&mut s, "Total generated tokens:", self.total_output_tokens.to_string());
        line(&mut s, "Request throughput (req/s):", format!("{:.2}", self.request_throughput));
        if let Some(g) = self.goodput {
            line(&mut s, "Request goodput (req/s):", format!("{g:.2}"));
        }
        line(&mut s, "Output token throughput (tok/s):", format!("{:.2}", self.output_throughput));
        line(&mut s, "Total token throughput (tok/s):", format!("{:.2}", self.total_token_throughput));
        for (title, name, st) in [
            ("Time to First Token", "TTFT", self.ttft_ms),
            ("Time per Output Token (excl. 1st token)", "TPOT", self.tpot_ms),
            ("Inter-token Latency", "ITL", self.itl_ms),
            ("End-to-end Latency", "E2EL", self.e2el_ms),
        ] {
            s.push_str(&format!("{:-^52}\n", format!(" {title} ")));
            line(&mut s, &format!("Mean {name} (ms):"), format!("{:.2}", st.mean));
            line(&mut s, &format!("Median {name} (ms):"), format!("{:.2}", st.median));
            line(&mut s, &format!("P99 {name} (ms):"), format!("{:.2}", st.p99));
        }
        s.push_str(&format!("{:=^52}\n", ""));
        if !self.usage_reported {
            s.push_str("note: the server sent no usage; output tokens were counted as content chunks\n");
        }
        for e in &self.errors {
            s.push_str(&format!("error: {e}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BenchServeConfig {
        BenchServeConfig {
            base_url: "http://127.0.0.1:1".into(),
            endpoint: "/v1/completions".into(),
            model: Some("m".into()),
            num_prompts: 50,
            request_rate: 10.0,
            burstiness: 1.0,
            max_concurrency: None,
            random_input_len: 100,
            random_output_len: 20,
            random_range_ratio: 0.5,
            dataset: None,
            goodput: vec![],
            seed: 0,
            ignore_eos: true,
            timeout: Duration::from_secs(1),
            progress: false,
        }
    }

    /// A dataset line may carry a whole conversation for the chat endpoint, and only there.
    #[test]
    fn dataset_messages_go_to_chat_only() {
        let dir = std::env::temp_dir().join(format!("weave-bench-ds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ds.jsonl");
        std::fs::write(
            &path,
            "{\"messages\": [{\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": 7}\n{\"prompt\": \"plain\"}\n",
        )
        .unwrap();
        let chat = BenchServeConfig { endpoint: "/v1/chat/completions".into(), dataset: Some(path.clone()), ..cfg() };
        let ps = prompts(&chat).unwrap();
        assert_eq!(ps[0].messages.as_ref().unwrap()[0]["content"], "S");
        assert_eq!(ps[0].max_tokens, 7);
        assert!(ps[1].messages.is_none());
        assert_eq!(ps[1].prompt, "plain");
        let err = prompts(&BenchServeConfig { dataset: Some(path.clone()), ..cfg() }).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("/v1/chat/completions"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn prompts_follow_the_rate_and_lengths() {
        let ps = prompts(&cfg()).unwrap();
        assert_eq!(ps.len(), 50);
        assert!(ps.windows(2).all(|w| w[0].send_at <= w[1].send_at));
        let last = ps.last().unwrap().send_at;
        assert!((2.0..10.0).contains(&last), "50 requests at 10/s end near 5 s, got {last}");
        for p in &ps {
            let words = p.prompt.split(' ').count();
            assert!((50..=150).contains(&words), "{words}");
            assert!((10..=30).contains(&p.max_tokens), "{}", p.max_tokens);
        }
        assert_ne!(ps[0].prompt, ps[1].prompt);
        let all_at_once = prompts(&BenchServeConfig { request_rate: f64::INFINITY, ..cfg() }).unwrap();
        assert!(all_at_once.iter().all(|p| p.send_at == 0.0));
        assert!(prompts(&BenchServeConfig { random_range_ratio: 1.5, ..cfg() }).is_err());
    }

    #[test]
    fn stats_and_goodput() {
        let s = Stats::of_ms(&[0.001, 0.002, 0.003, 0.004]);
        assert!((s.mean - 2.5).abs() < 1e-9 && (s.median - 2.5).abs() < 1e-9, "{s:?}");
        assert!(s.p99 > 3.9 && s.p99 <= 4.0);
        let r = |ttft: f64, latency: f64| RequestResult {
            success: true,
            output_tokens: 11,
            usage_reported: true,
            ttft,
            latency,
            ..Default::default()
        };
        let mut c = cfg();
        c.goodput = vec![parse_goodput("ttft:100").unwrap(), parse_goodput("tpot:20").unwrap()];
        // tpot = (latency - ttft) / 10.
        let rep = report(&c, "m", 2.0, vec![r(0.05, 0.2), r(0.2, 0.3), r(0.05, 0.5), RequestResult::default()]);
        assert_eq!((rep.completed, rep.failed), (3, 1));
        assert_eq!(rep.goodput, Some(0.5), "only the first meets both SLOs");
        assert_eq!(rep.total_output_tokens, 33);
        assert!(parse_goodput("ttft").is_err() && parse_goodput("foo:1").is_err() && parse_goodput("e2el:-1").is_err());
    }

    #[test]
    fn sse_events_are_split_on_blank_lines() {
        assert_eq!(find_event_end(b"data: x\n\ndata: y"), Some((7, 9)));
        assert_eq!(find_event_end(b"data: x\r\n\r\n"), Some((7, 11)));
        assert_eq!(find_event_end(b"data: x\n"), None);
    }
}
