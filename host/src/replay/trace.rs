//! Replay traces: a scheduler config and synthetic requests (lengths, arrival steps).

use crate::engine::Arrival;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use weave_scheduler::{NewRequest, PolicyKind, SchedulerConfig};

/// Scheduler knobs of a trace; absent ones take vLLM's defaults ([`SchedulerConfig::default`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceConfig {
    pub max_num_batched_tokens: Option<usize>,
    pub max_num_seqs: Option<usize>,
    pub block_size: Option<usize>,
    pub num_gpu_blocks: Option<usize>,
    pub max_model_len: Option<usize>,
    pub enable_chunked_prefill: Option<bool>,
    pub long_prefill_token_threshold: Option<usize>,
    pub max_num_partial_prefills: Option<usize>,
    pub max_prefill_tokens_per_step: Option<usize>,
    pub enable_prefix_caching: Option<bool>,
    pub watermark_blocks: Option<usize>,
    pub policy: Option<String>,
}

impl TraceConfig {
    pub fn to_scheduler_config(&self) -> Result<SchedulerConfig, String> {
        let d = SchedulerConfig::default();
        let policy = match &self.policy {
            Some(p) => p.parse::<PolicyKind>()?,
            None => d.policy,
        };
        Ok(SchedulerConfig {
            max_num_batched_tokens: self.max_num_batched_tokens.unwrap_or(d.max_num_batched_tokens),
            max_num_seqs: self.max_num_seqs.unwrap_or(d.max_num_seqs),
            block_size: self.block_size.unwrap_or(d.block_size),
            num_gpu_blocks: self.num_gpu_blocks.unwrap_or(d.num_gpu_blocks),
            max_model_len: self.max_model_len.unwrap_or(d.max_model_len),
            enable_chunked_prefill: self.enable_chunked_prefill.unwrap_or(d.enable_chunked_prefill),
            long_prefill_token_threshold: self.long_prefill_token_threshold.unwrap_or(d.long_prefill_token_threshold),
            max_num_partial_prefills: self.max_num_partial_prefills.unwrap_or(d.max_num_partial_prefills),
            max_prefill_tokens_per_step: self.max_prefill_tokens_per_step.unwrap_or(d.max_prefill_tokens_per_step),
            enable_prefix_caching: self.enable_prefix_caching.unwrap_or(d.enable_prefix_caching),
            watermark_blocks: self.watermark_blocks.unwrap_or(d.watermark_blocks),
            policy,
            adaptive: d.adaptive,
            kv_groups: d.kv_groups,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRequest {
    pub id: serde_json::Value,
    pub arrival_step: u64,
    pub prompt_len: usize,
    pub max_tokens: usize,
    pub prefix_group: Option<serde_json::Value>,
    pub prefix_len: Option<usize>,
    #[serde(default)]
    pub priority: i32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trace {
    pub config: TraceConfig,
    pub requests: Vec<TraceRequest>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{path}: cannot read: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not a valid trace: {source}")]
    Json { path: String, source: serde_json::Error },
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
}

impl Trace {
    pub fn load(path: &Path) -> Result<Trace, TraceError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io { path: p.clone(), source })?;
        Self::parse(&text, &p)
    }

    /// Parses and checks a trace; `origin` names it in errors. serde_json's errors carry the
    /// line and column.
    pub fn parse(text: &str, origin: &str) -> Result<Trace, TraceError> {
        let t: Trace = serde_json::from_str(text).map_err(|source| TraceError::Json { path: origin.into(), source })?;
        let invalid = |msg: String| TraceError::Invalid { path: origin.into(), msg };
        t.config
            .to_scheduler_config()
            .map_err(|m| invalid(format!("config: {m}")))?
            .validate()
            .map_err(|e| invalid(e.to_string()))?;
        let mut seen = HashSet::new();
        for r in &t.requests {
            if !seen.insert(r.id.to_string()) {
                return Err(invalid(format!("request id {} appears more than once", r.id)));
            }
        }
        Ok(t)
    }

    /// The requests as engine arrivals with synthetic token ids: requests of one prefix group
    /// share their first `prefix_len` ids; every other id is unique in the trace. A request
    /// whose own fields are inconsistent is returned as an error line, the rest still run.
    pub fn arrivals(&self) -> (Vec<Arrival>, Vec<(serde_json::Value, String)>) {
        let mut next_id: u32 = 1;
        let mut groups: HashMap<String, (u32, usize)> = HashMap::new();
        // Size each group's shared id range by its longest prefix.
        for r in &self.requests {
            if let (Some(g), Some(p)) = (&r.prefix_group, r.prefix_len) {
                let e = groups.entry(g.to_string()).or_insert((0, 0));
                e.1 = e.1.max(p);
            }
        }
        for e in groups.values_mut() {
            e.0 = next_id;
            next_id += e.1 as u32;
        }
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        for r in &self.requests {
            let shared = match (&r.prefix_group, r.prefix_len) {
                (Some(g), Some(p)) => Some((groups[&g.to_string()].0, p)),
                (Some(_), None) | (None, Some(_)) => {
                    bad.push((r.id.clone(), format!("request {}: prefix_group and prefix_len go together", r.id)));
                    continue;
                }
                (None, None) => None,
            };
            if let Some((_, p)) = shared {
                if p > r.prompt_len {
                    bad.push((
                        r.id.clone(),
                        format!("request {}: prefix_len {} is over prompt_len {}", r.id, p, r.prompt_len),
                    ));
                    continue;
                }
            }
            let p = shared.map_or(0, |s| s.1);
            let mut prompt: Vec<u32> = shared.map_or(Vec::new(), |(base, p)| (base..base + p as u32).collect());
            prompt.extend(next_id..next_id + (r.prompt_len - p) as u32);
            next_id += (r.prompt_len - p) as u32;
            let mut req = NewRequest::new(0, prompt, r.max_tokens);
            req.priority = r.priority;
            ok.push(Arrival {
                at: r.arrival_step as f64,
                name: r.id.clone(),
                request: req,
                sampling: Default::default(),
                guide: None,
            });
        }
        (ok, bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_json_names_line_and_column() {
        let err = Trace::parse("{\"config\": {},\n \"requests\": [ {\"id\": 1,, } ]}", "t.json").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("t.json: not a valid trace:"), "{msg}");
        assert!(msg.contains("line 2 column"), "{msg}");
    }

    #[test]
    fn unknown_fields_and_duplicates_are_named() {
        let e = Trace::parse(r#"{"config": {"max_num_batched_token": 5}, "requests": []}"#, "t").unwrap_err();
        assert!(e.to_string().contains("max_num_batched_token"), "{e}");
        let dup = r#"{"config": {}, "requests": [
            {"id": "a", "arrival_step": 0, "prompt_len": 4, "max_tokens": 1},
            {"id": "a", "arrival_step": 1, "prompt_len": 4, "max_tokens": 1}]}"#;
        let e = Trace::parse(dup, "t").unwrap_err();
        assert!(e.to_string().contains("request id \"a\" appears more than once"), "{e}");
        let e = Trace::parse(r#"{"config": {"policy": "lifo"}, "requests": []}"#, "t").unwrap_err();
        assert!(e.to_string().contains("unknown policy"), "{e}");
    }

    #[test]
    fn prefix_groups_share_ids_and_others_are_distinct() {
        let t = Trace::parse(
            r#"{"config": {}, "requests": [
            {"id": 1, "arrival_step": 0, "prompt_len": 6, "max_tokens": 1, "prefix_group": "sys", "prefix_len": 4},
            {"id": 2, "arrival_step": 0, "prompt_len": 5, "max_tokens": 1, "prefix_group": "sys", "prefix_len": 4},
            {"id": 3, "arrival_step": 0, "prompt_len": 5, "max_tokens": 1},
            {"id": 4, "arrival_step": 0, "prompt_len": 3, "max_tokens": 1, "prefix_group": "x", "prefix_len": 9}]}"#,
            "t",
        )
        .unwrap();
        let (a, bad) = t.arrivals();
        assert_eq!(a.len(), 3);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].1.contains("prefix_len 9 is over prompt_len 3"));
        let p: Vec<&Vec<u32>> = a.iter().map(|x| &x.request.prompt).collect();
        assert_eq!(p[0][..4], p[1][..4]);
        assert_ne!(p[0][4..], p[1][4..5]);
        let mut all: Vec<u32> = p[0].iter().chain(p[2]).copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 11);
    }
}
