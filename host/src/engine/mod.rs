//! The engine: one step at a time, `schedule()` -> backend -> `update()` -> events.
//!
//! [`Engine`] is a step object in the manner of vLLM's `EngineCore`: requests come in through
//! [`Engine::add_request`] and leave through [`Engine::abort`] between steps, and
//! [`Engine::step`] runs one step and says what it produced. `replay`, `simulate` and
//! `generate` drive it through [`Engine::run`] (every arrival known up front, one clock);
//! `serve` drives it from its own thread as requests arrive. Whatever drives it, the
//! scheduler being studied is the scheduler being shipped.

mod backend;
pub mod nvtx;
pub mod steplog;

use crate::sampling::SamplingParams;
use crate::structured::masks::{Advance, Guides};
use crate::structured::{Guide, GuideFactory};
pub use backend::{Backend, StepResult, TokenLogprobs};
use std::collections::HashMap;
use std::time::Instant;
use steplog::{ScheduledRecord, StepRecord};
use weave_scheduler::{
    FinishReason, FinishedRequest, NewRequest, RequestId, SchedError, ScheduledBatch, Scheduler, StepUpdate,
};

/// How the run's time advances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// Time is the step number; arrivals are step numbers (replay).
    Steps,
    /// Seconds: the backend's own (simulator) or wall time (real model).
    Seconds,
}

impl Clock {
    pub fn name(self) -> &'static str {
        match self {
            Clock::Steps => "steps",
            Clock::Seconds => "seconds",
        }
    }
}

/// A request waiting to arrive.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// On the run's clock.
    pub at: f64,
    /// The caller's name for it, echoed in logs (a trace's `id`).
    pub name: serde_json::Value,
    pub request: NewRequest,
    pub sampling: crate::sampling::SamplingParams,
    /// Its structured-output constraint, compiled (see [`crate::structured`]).
    pub guide: Option<Guide>,
}

/// Why [`Engine::add_request`] refused a request; nothing of it stays.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error(transparent)]
    Sched(#[from] SchedError),
    /// It asks for structured output this engine cannot give.
    #[error("{0}")]
    Guide(String),
}

/// What became of one request.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The engine's id for it.
    pub id: RequestId,
    pub name: serde_json::Value,
    pub arrival: f64,
    pub first_token: Option<f64>,
    pub finish: f64,
    pub num_prompt_tokens: usize,
    pub output_tokens: Vec<u32>,
    pub reason: FinishReason,
    pub num_cached_tokens: usize,
    pub num_preemptions: u32,
}

impl Outcome {
    pub fn ttft(&self) -> Option<f64> {
        self.first_token.map(|t| t - self.arrival)
    }
    /// Mean time per output token after the first.
    pub fn tpot(&self) -> Option<f64> {
        let n = self.output_tokens.len();
        match self.first_token {
            Some(f) if n > 1 => Some((self.finish - f) / (n - 1) as f64),
            _ => None,
        }
    }
}

/// Something the caller may want to show as it happens.
#[derive(Debug)]
pub enum Event<'a> {
    Rejected { name: &'a serde_json::Value, message: &'a str },
    Step { record: &'a StepRecord, update: &'a StepUpdate },
    Finished(&'a Outcome),
}

#[derive(Debug)]
struct Live {
    name: serde_json::Value,
    arrival: f64,
    first_token: Option<f64>,
    last_token: f64,
    /// Output tokens so far (what `stop_check` sees).
    output: Vec<u32>,
}

/// Result of a run.
#[derive(Debug, Default)]
pub struct RunReport {
    /// Every step's record, when the engine keeps them (`keep_steps`).
    pub steps: Vec<StepRecord>,
    pub num_steps: usize,
    /// Gaps between consecutive tokens of a request (seconds), when `collect_itl` is set.
    pub itl: Vec<f64>,
    pub outcomes: Vec<Outcome>,
    pub rejected: Vec<(serde_json::Value, String)>,
    /// Clock time from the first arrival to the last finish.
    pub makespan: f64,
}

/// What one [`Engine::step`] did.
#[derive(Debug)]
pub struct StepReport {
    /// The step-log line (its `scheduled` list is empty unless `keep_steps`).
    pub record: StepRecord,
    /// The scheduler's view: each new token with its request, and what finished on a stop
    /// condition it checks itself (length, EOS, stop ids).
    pub update: StepUpdate,
    /// Beside `update.new_tokens`: each token's logprobs, when its request asked for them.
    pub logprobs: Vec<Option<TokenLogprobs>>,
    /// Every request that left this step (the scheduler's finishes and `stop_check`'s).
    pub finished: Vec<Outcome>,
    /// Inter-token gaps of this step's tokens (seconds), when `collect_itl` is set.
    pub itl: Vec<f64>,
    /// When the step ended, on the engine's clock.
    pub end: f64,
}

/// The engine: a scheduler, a backend and the requests in flight. Requests have engine-wide
/// ids chosen by the caller; their names (any JSON) are what logs show.
#[derive(Debug)]
pub struct Engine<B> {
    pub sched: Scheduler,
    pub backend: B,
    pub clock: Clock,
    /// Keep every step record in the report (the step log). On by default; the simulator
    /// turns it off for large runs.
    pub keep_steps: bool,
    /// Record inter-token latencies.
    pub collect_itl: bool,
    /// The next step's number.
    pub next_step: u64,
    live: HashMap<RequestId, Live>,
    /// Reused from step to step.
    batch: ScheduledBatch,
    /// Structured outputs: the guided requests' matchers and mask workers, once enabled.
    guides: Option<Guides>,
}

impl<B: Backend> Engine<B> {
    pub fn new(sched: Scheduler, backend: B, clock: Clock) -> Self {
        Engine {
            sched,
            backend,
            clock,
            keep_steps: true,
            collect_itl: false,
            next_step: 0,
            live: HashMap::new(),
            batch: ScheduledBatch::default(),
            guides: None,
        }
    }

    /// Lets requests bring a [`Guide`] (structured output) compiled by `factory`, with
    /// `threads` workers computing their masks beside the steps.
    pub fn enable_guides(&mut self, factory: &GuideFactory, threads: usize) {
        self.guides = Some(Guides::new(factory, threads));
    }

    /// Admits a request that arrived at `now` (its `id` field is replaced by `id`), held to
    /// `guide` when it has one. A request that could never run is refused here, and nothing
    /// of it stays.
    pub fn add_request(
        &mut self,
        id: RequestId,
        name: serde_json::Value,
        mut request: NewRequest,
        sampling: &SamplingParams,
        guide: Option<Guide>,
        now: f64,
    ) -> Result<(), AddError> {
        request.id = id;
        if guide.is_some() {
            if self.guides.is_none() {
                return Err(AddError::Guide("structured output is not enabled on this engine".into()));
            }
            if !self.backend.applies_masks() {
                return Err(AddError::Guide(format!(
                    "the {} backend does not sample real logits, so it cannot hold output to a grammar",
                    self.backend.name()
                )));
            }
        }
        self.sched.add_request(request)?;
        self.backend.add_request(id, sampling);
        if let (Some(g), Some(guides)) = (guide, self.guides.as_mut()) {
            guides.add(id, g);
        }
        self.live
            .insert(id, Live { name, arrival: now.max(0.0), first_token: None, last_token: 0.0, output: Vec::new() });
        Ok(())
    }

    /// Ends a request now (its client left), freeing its blocks. `None` if it is not in flight.
    pub fn abort(&mut self, id: RequestId, now: f64) -> Option<Outcome> {
        let f = self.sched.abort(id)?;
        Some(self.retire(f, now))
    }

    pub fn has_unfinished(&self) -> bool {
        self.sched.has_unfinished()
    }

    /// Requests in flight (waiting or running).
    pub fn num_unfinished(&self) -> usize {
        self.live.len()
    }

    /// One step starting at `now`: schedule, execute, update. `stop_check` sees each request's
    /// new token with its output so far and may end it (stop strings).
    pub fn step(
        &mut self,
        now: f64,
        stop_check: &mut dyn FnMut(RequestId, &[u32]) -> bool,
    ) -> anyhow::Result<StepReport> {
        let t0 = Instant::now();
        let r = nvtx::range(c"schedule");
        self.sched.schedule_into(&mut self.batch);
        drop(r);
        let t_scheduled = t0.elapsed().as_secs_f64();
        anyhow::ensure!(
            !self.batch.is_empty(),
            "scheduler stalled with {} unfinished requests",
            self.sched.num_unfinished()
        );
        // Guided rows' masks, already being computed: the backend waits for each as it
        // samples that row.
        let masks = self
            .guides
            .as_ref()
            .filter(|g| !g.is_empty())
            .map(|g| std::sync::Arc::new(g.for_step(self.batch.sampling_request_ids())))
            .filter(|m| !m.is_empty());
        if masks.is_some() {
            self.backend.set_masks(masks.clone());
        }
        let result = self.backend.execute(&self.batch);
        if masks.is_some() {
            self.backend.set_masks(None);
        }
        let result = result?;
        let t_update = Instant::now();
        let _update_range = nvtx::range(c"update");
        let update = self.sched.update(&result.output)?;
        let duration = result.duration_s.unwrap_or_else(|| t0.elapsed().as_secs_f64());
        let end = now + duration;
        let mut record = self.record(now, duration);
        let mut phases = result.phases.map(|p| crate::engine::steplog::Phases { schedule: t_scheduled, ..p });
        if let (Some(p), Some(m)) = (phases.as_mut(), &masks) {
            (p.mask_wait, p.mask) = m.times();
        }
        // Logprobs come per sampled row, in batch order; tokens are listed by request.
        let logprobs = if result.logprobs.is_empty() {
            vec![None; update.new_tokens.len()]
        } else {
            let by_id: HashMap<RequestId, TokenLogprobs> =
                self.batch.sampling_request_ids().zip(result.logprobs).filter_map(|(id, l)| Some((id, l?))).collect();
            update.new_tokens.iter().map(|(id, _)| by_id.get(id).cloned()).collect()
        };
        let mut itl = Vec::new();
        let mut finished_now = update.finished.clone();
        for &(id, tok) in &update.new_tokens {
            let Some(l) = self.live.get_mut(&id) else { continue };
            if l.first_token.is_some() && self.collect_itl {
                itl.push(end - l.last_token);
            }
            l.first_token.get_or_insert(end);
            l.last_token = end;
            l.output.push(tok);
            if finished_now.iter().any(|f| f.id == id) {
                continue;
            }
            // Every token goes by `stop_check` (a server detokenizes there), then the guide.
            if stop_check(id, &l.output) {
                finished_now.extend(self.sched.finish_request(id, FinishReason::Stop));
                continue;
            }
            match self.guides.as_mut().map_or(Advance::Continue, |g| g.advance(id, tok)) {
                Advance::Continue => {}
                // The grammar is complete: nothing but EOS could follow.
                Advance::Complete => finished_now.extend(self.sched.finish_request(id, FinishReason::Stop)),
                Advance::Failed(e) => {
                    eprintln!("weave: request {}: structured output failed: {e}; ending it", l.name);
                    finished_now.extend(self.sched.finish_request(id, FinishReason::Abort));
                }
            }
        }
        // Counts after the stop-string finishes.
        record.num_running = self.sched.num_running();
        record.num_waiting = self.sched.num_waiting();
        record.kv_blocks_used = self.sched.kv_blocks_used();
        let mut finished = Vec::with_capacity(finished_now.len());
        for f in finished_now {
            let o = self.retire(f, end);
            if self.keep_steps {
                record.finished.push(o.name.clone());
            }
            finished.push(o);
        }
        if let Some(p) = phases.as_mut() {
            p.update = t_update.elapsed().as_secs_f64();
        }
        record.phases = phases;
        self.next_step += 1;
        Ok(StepReport { record, update, logprobs, finished, itl, end })
    }

    /// The step-log line for the batch just run.
    fn record(&self, now: f64, duration: f64) -> StepRecord {
        let name = |id: &RequestId| self.live.get(id).map(|l| l.name.clone()).unwrap_or_default();
        let b = &self.batch;
        StepRecord {
            step: self.next_step,
            time: now,
            duration,
            scheduled: if self.keep_steps {
                b.seqs
                    .iter()
                    .map(|q| ScheduledRecord {
                        id: name(&q.request_id),
                        num_tokens: q.num_query_tokens,
                        is_prefill: q.is_prefill,
                        num_computed_tokens_before: q.context_len,
                        samples: q.samples,
                    })
                    .collect()
            } else {
                Vec::new()
            },
            preempted: b.preempted.iter().map(name).collect(),
            finished: Vec::new(),
            num_running: self.sched.num_running(),
            num_waiting: self.sched.num_waiting(),
            kv_blocks_used: self.sched.kv_blocks_used(),
            kv_blocks_total: self.sched.block_manager().num_usable_blocks(),
            prefill_tokens: b.num_prefill_tokens,
            decode_tokens: b.num_decode_tokens,
            num_seqs: b.seqs.len(),
            num_prefill_seqs: b.num_prefill_seqs,
            num_partial_prefills: b.num_partial_prefills,
            token_budget: self.sched.config().max_num_batched_tokens,
            phases: None,
        }
    }

    /// The one way out for a request that left the scheduler: the backend forgets it and its
    /// outcome is made.
    fn retire(&mut self, f: FinishedRequest, end: f64) -> Outcome {
        let l = self.live.remove(&f.id).expect("finished request was live");
        self.backend.remove_request(f.id);
        if let Some(g) = self.guides.as_mut() {
            g.remove(f.id);
        }
        Outcome {
            id: f.id,
            name: l.name,
            arrival: l.arrival,
            first_token: l.first_token,
            finish: end,
            num_prompt_tokens: f.num_prompt_tokens,
            output_tokens: f.output_tokens,
            reason: f.reason,
            num_cached_tokens: f.num_cached_tokens,
            num_preemptions: f.num_preemptions,
        }
    }

    /// Runs `arrivals` (any order) to completion on one clock: a driver over [`Self::step`].
    /// Requests get ids by arrival order. `stop_check` sees each request's new token with its
    /// output so far and may end it (stop strings); `on_event` sees everything.
    pub fn run(
        &mut self,
        mut arrivals: Vec<Arrival>,
        stop_check: &mut dyn FnMut(RequestId, &[u32]) -> bool,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> anyhow::Result<RunReport> {
        arrivals.sort_by(|a, b| a.at.total_cmp(&b.at));
        let mut pending = arrivals.into_iter().enumerate().peekable();
        let mut report = RunReport::default();
        let wall0 = Instant::now();
        let mut now = 0.0f64;
        let first_arrival = pending.peek().map(|(_, a)| a.at).unwrap_or(0.0);
        loop {
            if self.clock == Clock::Seconds && self.backend.wall_clock() {
                now = wall0.elapsed().as_secs_f64();
            }
            while let Some((_, a)) = pending.peek() {
                if a.at > now {
                    break;
                }
                let (k, a) = pending.next().expect("peeked");
                let at = a.at;
                if let Err(e) = self.add_request(k as RequestId, a.name.clone(), a.request, &a.sampling, a.guide, at) {
                    let message = match &e {
                        AddError::Sched(SchedError::Rejected { reason, .. }) => format!("request {}: {reason}", a.name),
                        other => format!("request {}: {other}", a.name),
                    };
                    on_event(Event::Rejected { name: &a.name, message: &message });
                    report.rejected.push((a.name, message));
                }
            }
            if !self.sched.has_unfinished() {
                match pending.peek() {
                    None => break,
                    Some((_, a)) => {
                        // Idle until the next arrival (really waiting, on a wall clock).
                        if self.backend.wall_clock() && a.at > now {
                            std::thread::sleep(std::time::Duration::from_secs_f64(a.at - now));
                        }
                        now = now.max(a.at);
                        if self.clock == Clock::Steps {
                            self.next_step = now as u64;
                        }
                        continue;
                    }
                }
            }
            let step = self.step(now, stop_check)?;
            for o in &step.finished {
                on_event(Event::Finished(o));
            }
            on_event(Event::Step { record: &step.record, update: &step.update });
            report.num_steps += 1;
            report.itl.extend(step.itl);
            report.outcomes.extend(step.finished);
            if self.keep_steps {
                report.steps.push(step.record);
            }
            now = step.end;
        }
        report.makespan = report.outcomes.iter().map(|o| o.finish).fold(0.0, f64::max) - first_arrival;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::null::{NullBackend, NULL_TOKEN};
    use weave_scheduler::SchedulerConfig;

    fn engine() -> Engine<NullBackend> {
        let cfg = SchedulerConfig {
            max_num_batched_tokens: 64,
            max_num_seqs: 8,
            max_model_len: 256,
            block_size: 4,
            num_gpu_blocks: 65,
            ..Default::default()
        };
        Engine::new(Scheduler::new(cfg).unwrap(), NullBackend, Clock::Steps)
    }

    fn add(e: &mut Engine<NullBackend>, id: RequestId, prompt: usize, max_tokens: usize) {
        let req = NewRequest::new(0, (1..=prompt as u32).collect(), max_tokens);
        e.add_request(id, serde_json::json!(id), req, &SamplingParams::default(), None, 0.0).unwrap();
    }

    #[test]
    fn steps_one_at_a_time_and_finishes_by_length() {
        let mut e = engine();
        add(&mut e, 7, 10, 3);
        let s = e.step(0.0, &mut |_, _| false).unwrap();
        assert_eq!(s.record.step, 0);
        assert_eq!(s.record.prefill_tokens, 10);
        assert_eq!(s.update.new_tokens, vec![(7, NULL_TOKEN)]);
        assert_eq!(s.end, 1.0);
        assert!(s.finished.is_empty());
        e.step(1.0, &mut |_, _| false).unwrap();
        let s = e.step(2.0, &mut |_, _| false).unwrap();
        assert_eq!(s.record.step, 2);
        assert_eq!(s.finished.len(), 1);
        let o = &s.finished[0];
        assert_eq!((o.id, o.reason, o.output_tokens.len()), (7, FinishReason::Length, 3));
        assert_eq!((o.first_token, o.finish), (Some(1.0), 3.0));
        assert!(!e.has_unfinished());
        assert_eq!(e.sched.kv_blocks_used(), 0);
    }

    #[test]
    fn abort_between_steps_frees_everything() {
        let mut e = engine();
        add(&mut e, 1, 30, 50);
        add(&mut e, 2, 30, 50);
        e.step(0.0, &mut |_, _| false).unwrap();
        assert!(e.sched.kv_blocks_used() > 0);
        let o = e.abort(1, 1.0).expect("in flight");
        assert_eq!((o.reason, o.output_tokens.len(), o.finish), (FinishReason::Abort, 1, 1.0));
        assert!(e.abort(1, 1.0).is_none(), "aborting twice is a no-op");
        let s = e.step(1.0, &mut |_, _| false).unwrap();
        assert!(s.update.new_tokens.iter().all(|&(id, _)| id == 2));
        e.abort(2, 2.0).unwrap();
        assert_eq!(e.num_unfinished(), 0);
        assert_eq!(e.sched.kv_blocks_used(), 0);
        e.sched.block_manager().audit().unwrap();
    }

    #[test]
    fn stop_check_ends_a_request_and_sees_its_output() {
        let mut e = engine();
        add(&mut e, 3, 5, 100);
        let mut seen = Vec::new();
        let mut finished = Vec::new();
        for t in 0..10 {
            let s = e
                .step(t as f64, &mut |id, out| {
                    seen.push((id, out.len()));
                    out.len() == 4
                })
                .unwrap();
            finished.extend(s.finished);
            if !e.has_unfinished() {
                break;
            }
        }
        assert_eq!(seen, vec![(3, 1), (3, 2), (3, 3), (3, 4)]);
        assert_eq!(finished.len(), 1);
        assert_eq!((finished[0].reason, finished[0].output_tokens.len()), (FinishReason::Stop, 4));
    }

    #[test]
    fn a_refused_request_leaves_nothing_behind() {
        let mut e = engine();
        let req = NewRequest::new(0, vec![1; 300], 4);
        let err = e.add_request(9, serde_json::json!("big"), req, &SamplingParams::default(), None, 0.0).unwrap_err();
        assert!(err.to_string().contains("max_model_len"), "{err}");
        assert!(!e.has_unfinished());
        assert!(e.abort(9, 0.0).is_none());
    }
}
