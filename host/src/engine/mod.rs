//! The one engine loop: arrivals -> `schedule()` -> backend -> `update()` -> events.
//!
//! `replay`, `simulate` and `generate` all run this loop with a different backend and clock,
//! so the scheduler being studied is the scheduler being shipped.

mod backend;
pub mod steplog;

pub use backend::{Backend, StepResult};
use std::collections::HashMap;
use std::time::Instant;
use steplog::{ScheduledRecord, StepRecord};
use weave_scheduler::{FinishReason, NewRequest, RequestId, SchedError, Scheduler, StepUpdate};

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
}

/// What became of one request.
#[derive(Debug, Clone)]
pub struct Outcome {
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

/// The loop. Requests get engine-wide ids, so callers' names may be anything.
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
    live: HashMap<RequestId, Live>,
}

impl<B: Backend> Engine<B> {
    pub fn new(sched: Scheduler, backend: B, clock: Clock) -> Self {
        Engine { sched, backend, clock, keep_steps: true, collect_itl: false, live: HashMap::new() }
    }

    /// Runs `arrivals` (any order) to completion. `stop_check` sees each request's new token
    /// with its output so far and may end it (stop strings); `on_event` sees everything.
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
        let mut step: u64 = 0;
        let first_arrival = pending.peek().map(|(_, a)| a.at).unwrap_or(0.0);
        let mut outputs: HashMap<RequestId, Vec<u32>> = HashMap::new();
        let mut batch = weave_scheduler::ScheduledBatch::default();
        loop {
            if self.clock == Clock::Seconds && self.backend.wall_clock() {
                now = wall0.elapsed().as_secs_f64();
            }
            while let Some((_, a)) = pending.peek() {
                if a.at > now {
                    break;
                }
                let (k, a) = pending.next().expect("peeked");
                let mut req = a.request;
                req.id = k as RequestId;
                match self.sched.add_request(req) {
                    Ok(()) => {
                        self.backend.add_request(k as RequestId, &a.sampling);
                        self.live.insert(
                            k as RequestId,
                            Live { name: a.name, arrival: a.at.max(0.0), first_token: None, last_token: 0.0 },
                        );
                    }
                    Err(e) => {
                        let message = match &e {
                            SchedError::Rejected { reason, .. } => format!("request {}: {reason}", a.name),
                            other => format!("request {}: {other}", a.name),
                        };
                        on_event(Event::Rejected { name: &a.name, message: &message });
                        report.rejected.push((a.name, message));
                    }
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
                            step = now as u64;
                        }
                        continue;
                    }
                }
            }
            let t0 = Instant::now();
            self.sched.schedule_into(&mut batch);
            anyhow::ensure!(
                !batch.is_empty(),
                "scheduler stalled with {} unfinished requests",
                self.sched.num_unfinished()
            );
            let result = self.backend.execute(&batch)?;
            let upd = self.sched.update(&result.output)?;
            let duration = result.duration_s.unwrap_or_else(|| t0.elapsed().as_secs_f64());
            let end = now + duration;
            let name = |id: &RequestId| self.live.get(id).map(|l| l.name.clone()).unwrap_or_default();
            let keep = self.keep_steps;
            let mut record = StepRecord {
                step,
                time: now,
                duration,
                scheduled: if keep {
                    batch
                        .seqs
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
                preempted: batch.preempted.iter().map(name).collect(),
                finished: Vec::new(),
                num_running: self.sched.num_running(),
                num_waiting: self.sched.num_waiting(),
                kv_blocks_used: self.sched.kv_blocks_used(),
                kv_blocks_total: self.sched.block_manager().num_usable_blocks(),
                prefill_tokens: batch.num_prefill_tokens,
                decode_tokens: batch.num_decode_tokens,
                num_seqs: batch.seqs.len(),
                num_prefill_seqs: batch.num_prefill_seqs,
                num_partial_prefills: batch.num_partial_prefills,
                token_budget: self.sched.config().max_num_batched_tokens,
            };
            let mut finished = upd.finished.clone();
            for &(id, tok) in &upd.new_tokens {
                if let Some(l) = self.live.get_mut(&id) {
                    if l.first_token.is_some() && self.collect_itl {
                        report.itl.push(end - l.last_token);
                    }
                    l.first_token.get_or_insert(end);
                    l.last_token = end;
                }
                let out = outputs.entry(id).or_default();
                out.push(tok);
                if !finished.iter().any(|f| f.id == id) && stop_check(id, out) {
                    finished.extend(self.sched.finish_request(id, FinishReason::Stop));
                }
            }
            // Counts after the stop-string finishes.
            record.num_running = self.sched.num_running();
            record.num_waiting = self.sched.num_waiting();
            record.kv_blocks_used = self.sched.kv_blocks_used();
            for f in finished {
                let l = self.live.remove(&f.id).expect("finished request was live");
                self.backend.remove_request(f.id);
                outputs.remove(&f.id);
                if keep {
                    record.finished.push(l.name.clone());
                }
                let o = Outcome {
                    name: l.name,
                    arrival: l.arrival,
                    first_token: l.first_token,
                    finish: end,
                    num_prompt_tokens: f.num_prompt_tokens,
                    output_tokens: f.output_tokens,
                    reason: f.reason,
                    num_cached_tokens: f.num_cached_tokens,
                    num_preemptions: f.num_preemptions,
                };
                on_event(Event::Finished(&o));
                report.outcomes.push(o);
            }
            on_event(Event::Step { record: &record, update: &upd });
            report.num_steps += 1;
            if keep {
                report.steps.push(record);
            }
            now = end;
            step += 1;
        }
        report.makespan = report.outcomes.iter().map(|o| o.finish).fold(0.0, f64::max) - first_arrival;
        Ok(report)
    }
}
