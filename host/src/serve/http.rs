//! The HTTP side: axum routes, request checking, and the responses and SSE streams.
//!
//! A handler checks its request (a bad field is a 400 that names it), tokenizes, hands its
//! sequences to the engine thread and waits only for its own tokens. Every way a request can
//! end early (client gone, stream dropped, a sibling rejected) drops its `AbortOnDrop`,
//! which aborts whatever of it is still in the engine.
//!
//! Beside the OpenAI routes, a replica answers what routers ask of their workers: vLLM's
//! router reads `/get_load` (power-of-two) and `/v1/completions/render` or
//! `/v1/chat/completions/render` (cache-aware: the prompt's token ids after the chat
//! template), and sglang-router `/get_server_info` and `/get_model_info`. The fields the
//! routers add to request bodies (`echo`, `ignore_eos`, `skip_special_tokens`,
//! `no_stop_trim`, `continue_final_message`, ...) are accepted; those weave can honour are.

use super::core::{Admit, EngineHandle, SeqEvent, SubmitError};
use super::metrics::Metrics;
use super::openai::{ErrorBody, ErrorDetail, Message, Prompt, Stop, StreamOptions, Usage};
use crate::engine::TokenLogprobs;
use crate::model::chat::ChatTemplate;
use crate::model::tokenizer::WeaveTokenizer;
use crate::sampling::{SamplingParams, MAX_LOGPROBS};
use crate::structured::tools::{self, Tool};
use crate::structured::{fields, Constraint, Guide, GuideFactory};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::UnboundedReceiverStream;
use weave_scheduler::{FinishReason, NewRequest, RequestId, SchedulerConfig};

/// What every handler shares.
#[derive(Debug)]
pub struct App {
    pub engine: EngineHandle,
    pub tokenizer: Arc<WeaveTokenizer>,
    pub chat: Option<ChatTemplate>,
    pub model_name: String,
    /// The scheduler's configuration (`max_model_len`, and the limits the info endpoints give).
    pub sched: SchedulerConfig,
    /// Where the model runs (`cpu`, `cuda`).
    pub device: &'static str,
    pub metrics: Arc<Metrics>,
    /// Unix time the server started (the model's `created`).
    pub created: u64,
    /// Most samples (`n`) one request may ask for.
    pub max_n: usize,
    pub next_request: AtomicU64,
    /// Compiles structured-output constraints over the model's tokens (the error says why a
    /// model cannot have them).
    pub guides: Result<Arc<GuideFactory>, String>,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        // What routers ask of a worker.
        .route("/v1/completions/render", post(completions_render))
        .route("/v1/chat/completions/render", post(chat_render))
        .route("/get_load", get(get_load))
        .route("/load", get(load))
        .route("/version", get(version))
        .route("/get_server_info", get(server_info))
        .route("/server_info", get(server_info))
        .route("/get_model_info", get(model_info))
        .route("/model_info", get(model_info))
        .with_state(app)
}

/// An error in OpenAI's shape, with its status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: (!param.is_empty()).then(|| param.to_string()),
            code: None,
        }
    }
    fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }
    fn model_not_found(name: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{name}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }
    fn full() -> ApiError {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "the server's waiting queue is full; retry later".into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
        }
    }
    fn shutting_down() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the server is shutting down".into(),
            kind: "service_unavailable",
            param: None,
            code: Some("shutting_down"),
        }
    }
    fn internal(message: String) -> ApiError {
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message, kind: "internal_error", param: None, code: None }
    }
    fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.into(),
                param: self.param.clone(),
                code: self.code.map(String::from),
            },
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> ApiError {
        match e {
            SubmitError::Full => ApiError::full(),
            SubmitError::ShuttingDown => ApiError::shutting_down(),
        }
    }
}

/// A structured-output or tool field that is wrong: a 400 naming it.
impl From<fields::FieldError> for ApiError {
    fn from(e: fields::FieldError) -> ApiError {
        ApiError::bad(&e.param, e.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The body as a JSON object.
fn parse_body(body: &Bytes) -> ApiResult<Value> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("", format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("", "the request body must be a JSON object"));
    }
    Ok(v)
}

/// One field, checked on its own so that a bad one is named.
fn field<T: DeserializeOwned>(v: &Value, name: &str) -> ApiResult<Option<T>> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => serde_json::from_value(x.clone()).map(Some).map_err(|e| {
            // serde's word for a value of no listed shape names no shape: say which are taken.
            let msg = match name {
                "prompt" => "prompt must be a string, a list of token ids, or a list of either".to_string(),
                "stop" => "stop must be a string or a list of strings".to_string(),
                _ => format!("{name}: {e}"),
            };
            ApiError::bad(name, msg)
        }),
    }
}

/// The checked request, whichever endpoint it came to.
#[derive(Debug)]
struct Plan {
    /// Each prompt's tokens (a request may carry several prompts).
    prompts: Vec<Vec<u32>>,
    n: usize,
    max_tokens: Option<usize>,
    sampling: SamplingParams,
    stop: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    stream: bool,
    include_usage: bool,
    /// Completions' `echo`: each choice's text starts with its prompt's.
    echo: bool,
    /// The prompt field's name, for errors ("prompt" or "messages").
    prompt_param: &'static str,
    /// Structured output: every sample starts from a copy of this.
    guide: Option<Guide>,
    /// Chat tools the model was shown (`tool_choice` not `none`): its output is searched
    /// for tool calls.
    tools: Vec<Tool>,
}

impl App {
    pub fn max_model_len(&self) -> usize {
        self.sched.max_model_len
    }

    /// A sequence's output budget: what the request asked, else what the context leaves.
    fn max_tokens_for(&self, plan: &Plan, prompt_len: usize) -> usize {
        plan.max_tokens.unwrap_or(self.max_model_len() - prompt_len)
    }

    fn check_model(&self, v: &Value) -> ApiResult<()> {
        match field::<String>(v, "model")? {
            Some(m) if m != self.model_name => Err(ApiError::model_not_found(&m)),
            _ => Ok(()),
        }
    }

    fn check_tokens(&self, ids: &[u32], param: &str) -> ApiResult<()> {
        let vocab = self.tokenizer.vocab_size();
        match ids.iter().find(|&&t| t as usize >= vocab) {
            Some(t) => {
                Err(ApiError::bad(param, format!("{param}: token id {t} is out of range (vocabulary size {vocab})")))
            }
            None => Ok(()),
        }
    }

    fn encode(&self, text: &str, param: &str) -> ApiResult<Vec<u32>> {
        self.tokenizer.encode(text).map_err(|e| ApiError::bad(param, format!("{param}: {e}")))
    }

    /// The conversation rendered through the model's chat template, ending with the
    /// assistant's turn opened when `add_generation_prompt`; `tools` are shown to the model
    /// (through the template when it takes them, else in a system message).
    fn render_chat(&self, messages: &[Message], tools: &[Tool], add_generation_prompt: bool) -> ApiResult<String> {
        if messages.is_empty() {
            return Err(ApiError::bad("messages", "messages: at least one message is needed"));
        }
        let mut turns = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let content = match &m.content {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                Value::Array(parts) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => s.push_str(t),
                            _ => {
                                return Err(ApiError::bad(
                                    &format!("messages[{i}].content"),
                                    format!("messages[{i}].content: only text parts are supported"),
                                ))
                            }
                        }
                    }
                    s
                }
                _ => {
                    return Err(ApiError::bad(
                        &format!("messages[{i}].content"),
                        format!("messages[{i}].content must be a string or a list of text parts"),
                    ))
                }
            };
            if m.role.is_empty() {
                return Err(ApiError::bad(&format!("messages[{i}].role"), format!("messages[{i}].role is empty")));
            }
            if !(m.tool_calls.is_null() || m.tool_calls.is_array()) {
                return Err(ApiError::bad(
                    &format!("messages[{i}].tool_calls"),
                    format!("messages[{i}].tool_calls must be a list"),
                ));
            }
            turns.push((m, content));
        }
        let Some(t) = &self.chat else {
            return Err(ApiError::bad("messages", "this model has no chat template; use /v1/completions"));
        };
        let err = |e: String| ApiError::bad("messages", format!("messages: {e}"));
        if !tools.is_empty() && t.takes_tools() {
            // The template shows the tools and the calls itself (arguments as objects, as
            // templates expect them).
            let msgs: Vec<Value> = turns
                .iter()
                .map(|(m, content)| {
                    let mut o = json!({"role": m.role, "content": content});
                    if let Some(calls) = m.tool_calls.as_array() {
                        let calls: Vec<Value> = calls
                            .iter()
                            .map(|c| {
                                let mut f = c.get("function").cloned().unwrap_or(json!({}));
                                if let Some(a) = f.get("arguments").and_then(Value::as_str) {
                                    f["arguments"] = serde_json::from_str(a).unwrap_or(json!(a));
                                }
                                json!({"type": "function", "id": c.get("id"), "function": f})
                            })
                            .collect();
                        o["tool_calls"] = Value::Array(calls);
                    }
                    if let Some(id) = &m.tool_call_id {
                        o["tool_call_id"] = json!(id);
                    }
                    o
                })
                .collect();
            let defs: Vec<Value> = tools
                .iter()
                .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}))
                .collect();
            return t.render_json(&msgs, Some(&Value::Array(defs)), add_generation_prompt).map_err(err);
        }
        // A template without tools: the Hermes conventions written into the turns.
        let mut pairs: Vec<(String, String)> = Vec::with_capacity(turns.len() + 1);
        for (m, content) in &turns {
            let mut content = content.clone();
            if m.tool_calls.is_array() {
                let calls = tools::render_calls(&m.tool_calls);
                if !calls.is_empty() {
                    content = if content.is_empty() { calls } else { format!("{content}\n{calls}") };
                }
            }
            if m.role == "tool" {
                content = format!("<tool_response>\n{content}\n</tool_response>");
            }
            pairs.push((m.role.clone(), content));
        }
        if !tools.is_empty() {
            let sys = tools::system_prompt(tools);
            match pairs.first_mut() {
                Some((role, content)) if role == "system" => *content = format!("{content}\n\n{sys}"),
                _ => pairs.insert(0, ("system".to_string(), sys)),
            }
        }
        t.render_with(&pairs, add_generation_prompt).map_err(err)
    }

    /// `c` compiled over the model's tokens; a bad one is a 400 naming `param`.
    fn compile(&self, c: &Constraint, param: &str) -> ApiResult<Guide> {
        let f = self.guides.as_ref().map_err(|e| {
            ApiError::bad(param, format!("{param}: structured output is not available for this model: {e}"))
        })?;
        f.compile(c).map_err(|e| ApiError::bad(param, format!("{param}: {e}")))
    }

    /// The fields both endpoints share, checked; `prompts` as already tokenized.
    fn plan(&self, v: &Value, prompts: Vec<Vec<u32>>, prompt_param: &'static str) -> ApiResult<Plan> {
        let max_tokens = match field::<i64>(v, "max_completion_tokens")? {
            Some(x) => Some(("max_completion_tokens", x)),
            None => field::<i64>(v, "max_tokens")?.map(|x| ("max_tokens", x)),
        };
        let max_tokens = match max_tokens {
            Some((p, x)) if x < 1 => return Err(ApiError::bad(p, format!("{p} must be at least 1, got {x}"))),
            Some((_, x)) => Some(x as usize),
            None => None,
        };
        let temperature = field::<f64>(v, "temperature")?.unwrap_or(1.0);
        if !(temperature >= 0.0 && temperature.is_finite()) {
            return Err(ApiError::bad("temperature", format!("temperature must be >= 0, got {temperature}")));
        }
        let top_p = field::<f64>(v, "top_p")?.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad("top_p", format!("top_p must be in (0, 1], got {top_p}")));
        }
        let top_k = field::<i64>(v, "top_k")?.unwrap_or(0);
        if top_k < -1 {
            return Err(ApiError::bad("top_k", format!("top_k must be -1 (off), 0 (off) or positive, got {top_k}")));
        }
        let n = field::<i64>(v, "n")?.unwrap_or(1);
        if n < 1 || n as usize > self.max_n {
            return Err(ApiError::bad("n", format!("n must be between 1 and {}, got {n}", self.max_n)));
        }
        let seed = field::<i64>(v, "seed")?.map(|s| s as u64);
        let stop = field::<Stop>(v, "stop")?.map(Stop::into_vec).unwrap_or_default();
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::bad("stop", "stop: a stop string is empty"));
        }
        let stop_token_ids = field::<Vec<u32>>(v, "stop_token_ids")?.unwrap_or_default();
        self.check_tokens(&stop_token_ids, "stop_token_ids")?;
        let stream = field::<bool>(v, "stream")?.unwrap_or(false);
        let include_usage = field::<StreamOptions>(v, "stream_options")?.is_some_and(|o| o.include_usage);
        let ignore_eos = field::<bool>(v, "ignore_eos")?.unwrap_or(false);
        for (i, p) in prompts.iter().enumerate() {
            let name = if prompts.len() > 1 { format!("{prompt_param}[{i}]") } else { prompt_param.to_string() };
            if p.is_empty() {
                return Err(ApiError::bad(prompt_param, format!("{name} is empty")));
            }
            if p.len() >= self.max_model_len() {
                return Err(ApiError::bad(
                    prompt_param,
                    format!(
                        "{name} has {} tokens, but this model's maximum context length is {} tokens (and at least one must be left for the completion)",
                        p.len(),
                        self.max_model_len()
                    ),
                )
                .code("context_length_exceeded"));
            }
            if let Some(m) = max_tokens {
                if p.len() + m > self.max_model_len() {
                    return Err(ApiError::bad(
                        "max_tokens",
                        format!(
                            "this model's maximum context length is {} tokens, but {} were asked for ({} in {name}, {m} in the completion); lower max_tokens",
                            self.max_model_len(),
                            p.len() + m,
                            p.len()
                        ),
                    )
                    .code("context_length_exceeded"));
                }
            }
        }
        Ok(Plan {
            prompts,
            n: n as usize,
            max_tokens,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_k: top_k.max(0) as usize,
                top_p: top_p as f32,
                seed,
                logprobs: None,
            },
            stop,
            stop_token_ids,
            ignore_eos,
            stream,
            include_usage,
            echo: false,
            prompt_param,
            guide: match fields::constraint(v)? {
                Some((c, param)) => Some(self.compile(&c, param)?),
                None => None,
            },
            tools: Vec::new(),
        })
    }
}

/// Aborts, when dropped, every sequence of a request that has not finished.
struct AbortOnDrop {
    app: Arc<App>,
    ids: Vec<RequestId>,
    done: Vec<bool>,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for (id, done) in self.ids.iter().zip(&self.done) {
            if !done {
                self.app.engine.abort(*id);
            }
        }
    }
}

/// A request's sequences in the engine: choice `i` is `rxs[i]`, of prompt `i / n`.
struct Running {
    guard: AbortOnDrop,
    rxs: Vec<UnboundedReceiver<SeqEvent>>,
    prompt_tokens: usize,
}

/// Hands every sequence of `plan` to the engine and waits until each is admitted (so that a
/// refusal is still a 400, streamed or not).
async fn start(app: &Arc<App>, plan: &Plan, kind: &str, req_no: u64) -> ApiResult<Running> {
    let total = plan.prompts.len() * plan.n;
    app.engine.has_room(total)?;
    let mut guard = AbortOnDrop { app: app.clone(), ids: Vec::with_capacity(total), done: Vec::new() };
    let mut rxs = Vec::with_capacity(total);
    let arrived = Instant::now();
    let tok = &app.tokenizer;
    for (pi, prompt) in plan.prompts.iter().enumerate() {
        for j in 0..plan.n {
            let id = app.engine.next_id();
            let max_tokens = app.max_tokens_for(plan, prompt.len());
            let mut req = NewRequest::new(id, prompt.clone(), max_tokens);
            req.ignore_eos = plan.ignore_eos;
            req.eos_token_id = tok.eos;
            req.stop_token_ids = if plan.ignore_eos { Vec::new() } else { tok.stop_ids.clone() };
            req.stop_token_ids.extend(&plan.stop_token_ids);
            let mut sampling = plan.sampling.clone();
            // Parallel samples of one seeded request differ from each other, and repeat.
            sampling.seed = plan.sampling.seed.map(|s| s.wrapping_add(j as u64));
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let name = format!("{kind}-{req_no}-{}", pi * plan.n + j);
            app.engine.submit(Admit {
                id,
                name,
                request: req,
                sampling,
                guide: plan.guide.clone(),
                stop: plan.stop.clone(),
                events: tx,
                arrived,
            })?;
            guard.ids.push(id);
            guard.done.push(false);
            rxs.push(rx);
        }
    }
    for (i, rx) in rxs.iter_mut().enumerate() {
        match rx.recv().await {
            Some(SeqEvent::Admitted) => {}
            Some(SeqEvent::Rejected(msg)) => {
                guard.done[i] = true;
                if app.engine.is_draining() {
                    return Err(ApiError::shutting_down());
                }
                return Err(ApiError::bad(plan.prompt_param, format!("request refused: {msg}")));
            }
            Some(SeqEvent::Failed(msg)) => return Err(ApiError::internal(msg)),
            Some(other) => return Err(ApiError::internal(format!("engine sent {other:?} before admitting"))),
            None => return Err(ApiError::shutting_down()),
        }
    }
    Ok(Running { guard, rxs, prompt_tokens: plan.prompts.iter().map(Vec::len).sum() })
}

/// What one choice produced.
#[derive(Debug, Default)]
struct Choice {
    text: String,
    tokens: Vec<u32>,
    logprobs: Vec<Option<TokenLogprobs>>,
    finish: Option<FinishReason>,
    num_output_tokens: usize,
}

/// Waits for every choice to finish.
async fn collect(mut run: Running) -> ApiResult<(Vec<Choice>, Usage)> {
    let mut choices: Vec<Choice> = (0..run.rxs.len()).map(|_| Choice::default()).collect();
    for (i, rx) in run.rxs.iter_mut().enumerate() {
        let c = &mut choices[i];
        loop {
            match rx.recv().await {
                Some(SeqEvent::Tokens { text, tokens, logprobs }) => {
                    c.text.push_str(&text);
                    c.tokens.extend(tokens);
                    c.logprobs.extend(logprobs);
                }
                Some(SeqEvent::Finished { reason, text, num_output_tokens, .. }) => {
                    c.text.push_str(&text);
                    c.finish = Some(reason);
                    c.num_output_tokens = num_output_tokens;
                    run.guard.done[i] = true;
                    break;
                }
                Some(SeqEvent::Failed(msg)) => return Err(ApiError::internal(msg)),
                Some(SeqEvent::Admitted) | Some(SeqEvent::Rejected(_)) => {}
                None => return Err(ApiError::shutting_down()),
            }
        }
    }
    let completion: usize = choices.iter().map(|c| c.num_output_tokens).sum();
    Ok((choices, Usage::new(run.prompt_tokens, completion)))
}

fn finish_str(r: Option<FinishReason>) -> Value {
    match r {
        None => Value::Null,
        Some(FinishReason::Abort) => json!("abort"),
        Some(r) => json!(r.as_str()),
    }
}

/// The legacy completions `logprobs` object for these tokens; `offset` is where their text
/// starts in the choice's text.
fn completion_logprobs(
    tok: &WeaveTokenizer,
    tokens: &[u32],
    lps: &[Option<TokenLogprobs>],
    offset: &mut usize,
) -> Value {
    let mut strs = Vec::new();
    let mut vals = Vec::new();
    let mut tops = Vec::new();
    let mut offs = Vec::new();
    for (t, lp) in tokens.iter().zip(lps) {
        let s = tok.decode(&[*t]);
        offs.push(*offset);
        *offset += s.len();
        strs.push(s);
        let lp = lp.clone().unwrap_or_default();
        vals.push(lp.logprob);
        let mut top = serde_json::Map::new();
        for (id, l) in &lp.top {
            top.insert(tok.decode(&[*id]), json!(l));
        }
        tops.push(Value::Object(top));
    }
    json!({"tokens": strs, "token_logprobs": vals, "top_logprobs": tops, "text_offset": offs})
}

/// The chat `logprobs.content` entries for these tokens.
fn chat_logprobs(tok: &WeaveTokenizer, tokens: &[u32], lps: &[Option<TokenLogprobs>]) -> Vec<Value> {
    let entry = |id: u32, l: f32| {
        let s = tok.decode(&[id]);
        json!({"token": s, "logprob": l, "bytes": s.as_bytes()})
    };
    tokens
        .iter()
        .zip(lps)
        .map(|(t, lp)| {
            let lp = lp.clone().unwrap_or_default();
            let mut e = entry(*t, lp.logprob);
            e["top_logprobs"] = Value::Array(lp.top.iter().map(|(id, l)| entry(*id, *l)).collect());
            e
        })
        .collect()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Which endpoint a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// A completions request, checked.
fn completion_plan(app: &App, v: &Value) -> ApiResult<Plan> {
    app.check_model(v)?;
    let echo = field::<bool>(v, "echo")?.unwrap_or(false);
    if field::<String>(v, "suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad("suffix", "suffix is not supported"));
    }
    let prompts = match field::<Prompt>(v, "prompt")? {
        None => return Err(ApiError::bad("prompt", "prompt is required")),
        Some(Prompt::Text(s)) => vec![app.encode(&s, "prompt")?],
        Some(Prompt::Tokens(t)) => vec![t],
        Some(Prompt::Texts(ts)) => ts.iter().map(|s| app.encode(s, "prompt")).collect::<ApiResult<_>>()?,
        Some(Prompt::TokenLists(ts)) => ts,
    };
    if prompts.is_empty() {
        return Err(ApiError::bad("prompt", "prompt is an empty list"));
    }
    for p in &prompts {
        app.check_tokens(p, "prompt")?;
    }
    let logprobs = field::<i64>(v, "logprobs")?;
    if let Some(k) = logprobs {
        if !(0..=MAX_LOGPROBS as i64).contains(&k) {
            return Err(ApiError::bad("logprobs", format!("logprobs must be between 0 and {MAX_LOGPROBS}, got {k}")));
        }
        if echo {
            return Err(ApiError::bad(
                "echo",
                "echo with logprobs would need the prompt's logprobs, which weave does not compute; drop one of them",
            ));
        }
    }
    let mut plan = app.plan(v, prompts, "prompt")?;
    plan.sampling.logprobs = logprobs.map(|k| k as usize);
    plan.echo = echo;
    Ok(plan)
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> ApiResult<Response> {
    let plan = completion_plan(&app, &parse_body(&body)?)?;
    respond(app, plan, Kind::Completion).await
}

/// A chat request's prompt tokens (through the chat template, showing `tools`), checked.
fn chat_prompt(app: &App, v: &Value, tools: &[Tool]) -> ApiResult<Vec<u32>> {
    let messages =
        field::<Vec<Message>>(v, "messages")?.ok_or_else(|| ApiError::bad("messages", "messages is required"))?;
    if field::<bool>(v, "continue_final_message")?.unwrap_or(false) {
        return Err(ApiError::bad(
            "continue_final_message",
            "continue_final_message is not supported: the chat template always closes the last message",
        ));
    }
    let add_generation_prompt = field::<bool>(v, "add_generation_prompt")?.unwrap_or(true);
    let text = app.render_chat(&messages, tools, add_generation_prompt)?;
    app.encode(&text, "messages")
}

/// A chat request, checked.
fn chat_plan(app: &App, v: &Value) -> ApiResult<Plan> {
    app.check_model(v)?;
    let (tools, choice) = tools::from_body(v)?;
    if let Some(format) = app.chat.as_ref().and_then(|t| t.foreign_tool_format()).filter(|_| !tools.is_empty()) {
        return Err(ApiError::bad(
            "tools",
            format!("tools: this model's chat template writes tool calls in {format} format; weave parses the Hermes <tool_call> format only"),
        ));
    }
    let prompt = chat_prompt(app, v, &tools)?;
    let want = field::<bool>(v, "logprobs")?.unwrap_or(false);
    let top = field::<i64>(v, "top_logprobs")?;
    if let Some(k) = top {
        if !(0..=MAX_LOGPROBS as i64).contains(&k) {
            return Err(ApiError::bad(
                "top_logprobs",
                format!("top_logprobs must be between 0 and {MAX_LOGPROBS}, got {k}"),
            ));
        }
        if !want {
            return Err(ApiError::bad("top_logprobs", "top_logprobs needs logprobs: true"));
        }
    }
    let mut plan = app.plan(v, vec![prompt], "messages")?;
    plan.sampling.logprobs = want.then(|| top.unwrap_or(0) as usize);
    let parallel = field::<bool>(v, "parallel_tool_calls")?.unwrap_or(true);
    if let Some(c) = tools::constraint(&tools, &choice, parallel) {
        if plan.guide.is_some() {
            return Err(ApiError::bad(
                "tool_choice",
                "tool_choice \"required\" or a named function constrains the output itself; drop response_format or the structured_outputs/guided_* field",
            ));
        }
        plan.guide = Some(app.compile(&c, "tools")?);
    }
    plan.tools = tools;
    Ok(plan)
}

async fn chat_completions(State(app): State<Arc<App>>, body: Bytes) -> ApiResult<Response> {
    let plan = chat_plan(&app, &parse_body(&body)?)?;
    respond(app, plan, Kind::Chat).await
}

/// One prompt as vLLM's render endpoints give it (a `GenerateRequest`): the token ids the
/// engine would run, and the sampling parameters checked as the real call checks them.
fn rendered(app: &App, plan: &Plan, prompt: &[u32], id: String) -> Value {
    let s = &plan.sampling;
    json!({
        "request_id": id,
        "token_ids": prompt,
        "features": null,
        "sampling_params": {
            "n": plan.n,
            "max_tokens": app.max_tokens_for(plan, prompt.len()),
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "seed": s.seed,
            "stop": plan.stop,
            "stop_token_ids": plan.stop_token_ids,
            "ignore_eos": plan.ignore_eos,
            "logprobs": s.logprobs,
        },
        "model": app.model_name,
        "stream": plan.stream,
    })
}

/// `POST /v1/completions/render`: each prompt's token ids (a list, one entry per prompt).
async fn completions_render(State(app): State<Arc<App>>, body: Bytes) -> ApiResult<Json<Value>> {
    let plan = completion_plan(&app, &parse_body(&body)?)?;
    let no = app.next_request.fetch_add(1, Ordering::Relaxed);
    let out: Vec<Value> =
        plan.prompts.iter().enumerate().map(|(i, p)| rendered(&app, &plan, p, format!("cmpl-{no}-{i}"))).collect();
    Ok(Json(Value::Array(out)))
}

/// `POST /v1/chat/completions/render`: the conversation's token ids after the chat template.
async fn chat_render(State(app): State<Arc<App>>, body: Bytes) -> ApiResult<Json<Value>> {
    let plan = chat_plan(&app, &parse_body(&body)?)?;
    let no = app.next_request.fetch_add(1, Ordering::Relaxed);
    Ok(Json(rendered(&app, &plan, &plan.prompts[0], format!("chatcmpl-{no}"))))
}

async fn respond(app: Arc<App>, plan: Plan, kind: Kind) -> ApiResult<Response> {
    let req_no = app.next_request.fetch_add(1, Ordering::Relaxed);
    let run = start(&app, &plan, if kind == Kind::Chat { "chat" } else { "cmpl" }, req_no).await?;
    let id = format!("{}-{req_no}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" });
    let created = unix_now();
    let want_logprobs = plan.sampling.logprobs.is_some();
    // With `echo`, each choice's text starts with its prompt's (choice i is of prompt i / n).
    let echoes: Vec<String> = if plan.echo {
        plan.prompts.iter().flat_map(|p| std::iter::repeat_n(app.tokenizer.decode(p), plan.n)).collect()
    } else {
        Vec::new()
    };
    if plan.stream {
        let tool_mode = !plan.tools.is_empty();
        return Ok(stream_response(app, run, id, created, kind, want_logprobs, plan.include_usage, echoes, tool_mode));
    }
    let (mut choices, usage) = collect(run).await?;
    for (c, e) in choices.iter_mut().zip(&echoes) {
        c.text.insert_str(0, e);
    }
    let tok = &app.tokenizer;
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| match kind {
            Kind::Completion => json!({
                "index": i,
                "text": c.text,
                "logprobs": if want_logprobs { completion_logprobs(tok, &c.tokens, &c.logprobs, &mut 0) } else { Value::Null },
                "finish_reason": finish_str(c.finish),
            }),
            Kind::Chat => {
                let (content, calls) =
                    if plan.tools.is_empty() { (c.text.clone(), Vec::new()) } else { tools::parse(&c.text) };
                let mut message = json!({"role": "assistant", "content": content});
                let mut finish = finish_str(c.finish);
                if !calls.is_empty() {
                    if content.is_empty() {
                        message["content"] = Value::Null;
                    }
                    message["tool_calls"] = Value::Array(
                        calls.iter().enumerate().map(|(k, t)| tool_call_json(t, &format!("{id}-{i}-{k}"), None)).collect(),
                    );
                    finish = json!("tool_calls");
                }
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": if want_logprobs { json!({"content": chat_logprobs(tok, &c.tokens, &c.logprobs)}) } else { Value::Null },
                    "finish_reason": finish,
                })
            }
        })
        .collect();
    let object = if kind == Kind::Chat { "chat.completion" } else { "text_completion" };
    Ok(Json(json!({
        "id": id,
        "object": object,
        "created": created,
        "model": app.model_name,
        "choices": choices,
        "usage": usage,
    }))
    .into_response())
}

/// One tool call as OpenAI returns it (with its place in the list, in a stream's delta).
fn tool_call_json(t: &tools::ToolCall, id: &str, index: Option<usize>) -> Value {
    let mut v = json!({
        "id": format!("call_{}", id.replace('-', "_")),
        "type": "function",
        "function": {"name": t.name, "arguments": t.arguments},
    });
    if let Some(k) = index {
        v["index"] = json!(k);
    }
    v
}

/// A streamed chat choice whose output may hold tool calls: its text so far, and how much of
/// it went out as content. Text from the first `<tool_call>` on is held back (and so is a
/// tail that could still begin one) until the choice ends and its calls are parsed.
#[derive(Debug, Default)]
struct ToolStream {
    text: String,
    sent: usize,
}

impl ToolStream {
    /// Adds text; returns what may go out as content now.
    fn push(&mut self, text: &str) -> String {
        self.text.push_str(text);
        let open = tools::OPEN;
        let end = match self.text.find(open) {
            Some(p) => p,
            None => {
                let t = &self.text;
                let held = (1..open.len()).rev().find(|&k| t.ends_with(&open[..k])).unwrap_or(0);
                t.len() - held
            }
        };
        if end <= self.sent {
            return String::new();
        }
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        out
    }
}

/// State of one SSE stream while it runs.
struct StreamState {
    app: Arc<App>,
    events: stream::SelectAll<stream::BoxStream<'static, (usize, SeqEvent)>>,
    guard: AbortOnDrop,
    id: String,
    created: u64,
    kind: Kind,
    want_logprobs: bool,
    include_usage: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// Text bytes sent so far, per choice (the completions `text_offset`).
    offsets: Vec<usize>,
    /// Chat with tools: each choice's text, searched for tool calls as it ends.
    tool_streams: Option<Vec<ToolStream>>,
    done: bool,
}

impl StreamState {
    fn chunk(&self, choices: Vec<Value>) -> Event {
        let object = if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut v = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.app.model_name,
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        Event::default().data(v.to_string())
    }

    fn choice(&mut self, i: usize, text: &str, tokens: &[u32], lps: &[Option<TokenLogprobs>], finish: Value) -> Value {
        let tok = &self.app.tokenizer;
        match self.kind {
            Kind::Completion => json!({
                "index": i,
                "text": text,
                "logprobs": if self.want_logprobs { completion_logprobs(tok, tokens, lps, &mut self.offsets[i]) } else { Value::Null },
                "finish_reason": finish,
            }),
            Kind::Chat => {
                let delta = if finish.is_null() || !text.is_empty() { json!({"content": text}) } else { json!({}) };
                json!({
                    "index": i,
                    "delta": delta,
                    "logprobs": if self.want_logprobs { json!({"content": chat_logprobs(tok, tokens, lps)}) } else { Value::Null },
                    "finish_reason": finish,
                })
            }
        }
    }

    /// The SSE events one engine event becomes.
    fn render(&mut self, i: usize, ev: SeqEvent) -> Vec<Event> {
        if let Some(ts) = self.tool_streams.as_mut() {
            match ev {
                SeqEvent::Tokens { text, tokens, logprobs } => {
                    let text = ts[i].push(&text);
                    return self.render_plain(i, SeqEvent::Tokens { text, tokens, logprobs });
                }
                SeqEvent::Finished { reason, text, num_prompt_tokens, num_output_tokens, num_cached_tokens } => {
                    ts[i].text.push_str(&text);
                    let (_, calls) = tools::parse(&ts[i].text);
                    if calls.is_empty() {
                        // No call after all: what was held back is content.
                        let rest = ts[i].text[ts[i].sent..].to_string();
                        ts[i].sent = ts[i].text.len();
                        let fin = SeqEvent::Finished {
                            reason,
                            text: rest,
                            num_prompt_tokens,
                            num_output_tokens,
                            num_cached_tokens,
                        };
                        return self.render_plain(i, fin);
                    }
                    self.guard.done[i] = true;
                    self.completion_tokens += num_output_tokens;
                    let id = self.id.clone();
                    let deltas: Vec<Value> = calls
                        .iter()
                        .enumerate()
                        .map(|(k, t)| tool_call_json(t, &format!("{id}-{i}-{k}"), Some(k)))
                        .collect();
                    let calls =
                        json!({"index": i, "delta": {"tool_calls": deltas}, "logprobs": null, "finish_reason": null});
                    let fin = json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": "tool_calls"});
                    return vec![self.chunk(vec![calls]), self.chunk(vec![fin])];
                }
                other => return self.render_plain(i, other),
            }
        }
        self.render_plain(i, ev)
    }

    /// [`Self::render`] for a choice whose text goes out as it comes.
    fn render_plain(&mut self, i: usize, ev: SeqEvent) -> Vec<Event> {
        match ev {
            SeqEvent::Tokens { text, tokens, logprobs } => {
                if text.is_empty() && (!self.want_logprobs || tokens.is_empty()) {
                    return Vec::new();
                }
                let c = self.choice(i, &text, &tokens, &logprobs, Value::Null);
                vec![self.chunk(vec![c])]
            }
            SeqEvent::Finished { reason, text, num_output_tokens, .. } => {
                self.guard.done[i] = true;
                self.completion_tokens += num_output_tokens;
                let c = self.choice(i, &text, &[], &[], finish_str(Some(reason)));
                vec![self.chunk(vec![c])]
            }
            SeqEvent::Failed(msg) => {
                let e = ApiError::internal(msg);
                vec![Event::default().data(serde_json::to_string(&e.body()).unwrap_or_default())]
            }
            SeqEvent::Admitted | SeqEvent::Rejected(_) => Vec::new(),
        }
    }

    /// The usage chunk (when asked for) and `[DONE]`.
    fn tail(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        if self.include_usage {
            let object = if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
            let v = json!({
                "id": self.id,
                "object": object,
                "created": self.created,
                "model": self.app.model_name,
                "choices": [],
                "usage": Usage::new(self.prompt_tokens, self.completion_tokens),
            });
            out.push(Event::default().data(v.to_string()));
        }
        out.push(Event::default().data("[DONE]"));
        out
    }
}

#[allow(clippy::too_many_arguments)]
fn stream_response(
    app: Arc<App>,
    run: Running,
    id: String,
    created: u64,
    kind: Kind,
    want_logprobs: bool,
    include_usage: bool,
    echoes: Vec<String>,
    tool_mode: bool,
) -> Response {
    let n = run.rxs.len();
    let events = stream::select_all(
        run.rxs.into_iter().enumerate().map(|(i, rx)| UnboundedReceiverStream::new(rx).map(move |e| (i, e)).boxed()),
    );
    let st = StreamState {
        app,
        events,
        guard: run.guard,
        id,
        created,
        kind,
        want_logprobs,
        include_usage,
        prompt_tokens: run.prompt_tokens,
        completion_tokens: 0,
        offsets: vec![0; n],
        tool_streams: (tool_mode && kind == Kind::Chat).then(|| (0..n).map(|_| ToolStream::default()).collect()),
        done: false,
    };
    // Chat streams open with the assistant's role, one chunk per choice.
    let head: Vec<Event> = if kind == Kind::Chat {
        (0..n)
            .map(|i| {
                st.chunk(vec![
                    json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
                ])
            })
            .collect()
    } else {
        // Completions with `echo` open with each choice's prompt text.
        echoes
            .iter()
            .enumerate()
            .map(|(i, e)| st.chunk(vec![json!({"index": i, "text": e, "logprobs": null, "finish_reason": null})]))
            .collect()
    };
    // Dropping this stream (the client left) drops `st.guard`, which aborts what is left.
    let body = stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        let evs = match st.events.next().await {
            Some((i, ev)) => st.render(i, ev),
            None => {
                st.done = true;
                st.tail()
            }
        };
        Some((stream::iter(evs), st))
    })
    .flatten();
    let all = stream::iter(head).chain(body).map(Ok::<Event, Infallible>);
    Sse::new(all).into_response()
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": app.model_name,
            "object": "model",
            "created": app.created,
            "owned_by": "weave",
            "root": app.model_name,
            "max_model_len": app.max_model_len(),
        }],
    }))
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.engine.is_draining() {
        ApiError::shutting_down().into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))],
        app.metrics.render(),
    )
        .into_response()
}

async fn tokenize(State(app): State<Arc<App>>, body: Bytes) -> ApiResult<Json<Value>> {
    let v = parse_body(&body)?;
    app.check_model(&v)?;
    // `messages` is parsed (and a bad one named) once, by `chat_prompt`.
    let has_messages = v.get("messages").is_some_and(|m| !m.is_null());
    let tokens = match (field::<String>(&v, "prompt")?, has_messages) {
        (Some(p), false) => app.encode(&p, "prompt")?,
        (None, true) => {
            let (tools, _) = tools::from_body(&v)?;
            chat_prompt(&app, &v, &tools)?
        }
        (Some(_), true) => return Err(ApiError::bad("prompt", "give prompt or messages, not both")),
        (None, false) => return Err(ApiError::bad("prompt", "prompt (or messages) is required")),
    };
    Ok(Json(json!({"count": tokens.len(), "max_model_len": app.max_model_len(), "tokens": tokens})))
}

async fn detokenize(State(app): State<Arc<App>>, body: Bytes) -> ApiResult<Json<Value>> {
    let v = parse_body(&body)?;
    app.check_model(&v)?;
    let tokens = field::<Vec<u32>>(&v, "tokens")?.ok_or_else(|| ApiError::bad("tokens", "tokens is required"))?;
    app.check_tokens(&tokens, "tokens")?;
    Ok(Json(json!({"prompt": app.tokenizer.decode(&tokens)})))
}

/// Sequences in the engine: running, waiting, and handed over but not yet taken in.
fn in_flight(app: &App) -> usize {
    let st = &app.engine.stats;
    st.running.load(Ordering::SeqCst) + st.waiting.load(Ordering::SeqCst) + st.queued.load(Ordering::SeqCst)
}

/// vLLM's router (power-of-two) reads a worker's load here.
async fn get_load(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"load": in_flight(&app)}))
}

/// vLLM's own load endpoint.
async fn load(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"server_load": in_flight(&app)}))
}

async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION"), "engine": "weave"}))
}

/// sglang-router's worker info: the model and the engine's limits.
async fn server_info(State(app): State<Arc<App>>) -> Json<Value> {
    let s = &app.sched;
    Json(json!({
        "model_path": app.model_name,
        "served_model_name": app.model_name,
        "tokenizer_path": app.model_name,
        "version": env!("CARGO_PKG_VERSION"),
        "engine": "weave",
        "device": app.device,
        "max_model_len": app.max_model_len(),
        "context_length": app.max_model_len(),
        "max_num_seqs": s.max_num_seqs,
        "max_running_requests": s.max_num_seqs,
        "max_num_batched_tokens": s.max_num_batched_tokens,
        "chunked_prefill_size": if s.enable_chunked_prefill { s.max_num_batched_tokens as i64 } else { -1 },
        "block_size": s.block_size,
        "page_size": s.block_size,
        "num_gpu_blocks": s.num_gpu_blocks,
        "enable_prefix_caching": s.enable_prefix_caching,
        "disable_radix_cache": !s.enable_prefix_caching,
        "dp_size": 1,
        "tp_size": 1,
    }))
}

/// sglang-router's model info.
async fn model_info(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({
        "model_path": app.model_name,
        "tokenizer_path": app.model_name,
        "is_generation": true,
        "max_model_len": app.max_model_len(),
    }))
}
