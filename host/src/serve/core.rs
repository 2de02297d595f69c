//! The engine thread: the only owner of the [`Engine`], fed by channels.
//!
//! HTTP handlers never touch the engine. They send [`Admit`]s through a bounded channel and
//! aborts through an unbounded one, and each request gets its tokens back on its own channel.
//! Between two steps the thread applies aborts first (so a gone client's blocks are free
//! before the next step), then admissions, then runs one step. A step never waits on a
//! socket: sending to a request's channel never blocks, and a send that fails (the client
//! left) aborts that request at once.
//!
//! The thread also owns what needs the whole output of a request: incremental detokenizing,
//! stop strings (text past a stop string is never sent: the tail that could still become one
//! is held back), and the metrics that are measured per token.

use super::metrics::Metrics;
use crate::engine::steplog::StepLogWriter;
use crate::engine::{AddError, Backend, Engine, Outcome, TokenLogprobs};
use crate::model::tokenizer::{StreamDecoder, WeaveTokenizer};
use crate::sampling::SamplingParams;
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;
use weave_scheduler::{FinishReason, NewRequest, RequestId, SchedError};

/// One sequence to run (a request with `n` samples is `n` of these).
#[derive(Debug)]
pub struct Admit {
    pub id: RequestId,
    /// Shown in the step log.
    pub name: String,
    pub request: NewRequest,
    pub sampling: SamplingParams,
    /// Its structured-output constraint, compiled by the handler.
    pub guide: Option<crate::structured::Guide>,
    pub stop: Vec<String>,
    pub events: UnboundedSender<SeqEvent>,
    pub arrived: Instant,
}

/// What a sequence's channel carries.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    /// The scheduler took it in.
    Admitted,
    /// The scheduler refused it (it could never run); nothing of it stays.
    Rejected(String),
    /// This step's tokens and the text that may be shown now.
    Tokens { text: String, tokens: Vec<u32>, logprobs: Vec<Option<TokenLogprobs>> },
    /// Its last event.
    Finished {
        reason: FinishReason,
        /// The rest of the text (up to a stop string, if one was seen).
        text: String,
        num_prompt_tokens: usize,
        num_output_tokens: usize,
        num_cached_tokens: usize,
    },
    /// The engine failed; the request is lost.
    Failed(String),
}

#[derive(Debug)]
enum Control {
    Abort(RequestId),
    /// Take no new requests; finish the running ones, then exit.
    Drain,
    /// Abort everything now and exit.
    Stop,
}

/// Counts the handlers read without asking the engine thread.
#[derive(Debug, Default)]
pub struct LiveStats {
    /// Sent to the engine thread and not yet taken in.
    pub queued: AtomicUsize,
    /// In the scheduler's waiting queue, as of the last step.
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    /// Set when the engine thread has exited (drained, stopped or failed).
    pub stopped: AtomicBool,
}

/// Why a sequence could not be handed to the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The waiting queue (or the channel into the engine) is full.
    Full,
    /// The engine is draining or gone.
    ShuttingDown,
}

/// The handlers' side of the engine thread.
#[derive(Debug)]
pub struct EngineHandle {
    add_tx: Sender<Admit>,
    ctl_tx: Sender<Control>,
    next_id: AtomicU64,
    pub stats: Arc<LiveStats>,
    /// Most sequences allowed to wait (queued + waiting) before new ones get 429.
    pub max_waiting: usize,
    draining: AtomicBool,
    join: Mutex<Option<std::thread::JoinHandle<anyhow::Result<()>>>>,
}

impl EngineHandle {
    /// Starts the engine thread. `capacity` bounds the channel of new sequences.
    pub fn spawn<B: Backend + Send + 'static>(
        engine: Engine<B>,
        tokenizer: Arc<WeaveTokenizer>,
        metrics: Arc<Metrics>,
        step_log: StepLogWriter,
        max_waiting: usize,
    ) -> anyhow::Result<EngineHandle> {
        let capacity = max_waiting.clamp(1, 65536);
        let (add_tx, add_rx) = crossbeam_channel::bounded(capacity);
        let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
        let stats = Arc::new(LiveStats::default());
        let st = stats.clone();
        let join = std::thread::Builder::new().name("weave-engine".into()).spawn(move || {
            let mut core = Core { engine, tok: tokenizer, metrics, stats: st.clone(), seqs: HashMap::new(), step_log };
            let r = core.run(&add_rx, &ctl_rx);
            if let Err(e) = &r {
                core.fail_all(&format!("{e:#}"));
                for a in add_rx.try_iter() {
                    let _ = a.events.send(SeqEvent::Failed(format!("the engine failed: {e:#}")));
                }
            }
            let r = r.and(core.step_log.finish(None::<&()>));
            st.stopped.store(true, Ordering::SeqCst);
            r
        })?;
        Ok(EngineHandle {
            add_tx,
            ctl_tx,
            next_id: AtomicU64::new(0),
            stats,
            max_waiting,
            draining: AtomicBool::new(false),
            join: Mutex::new(Some(join)),
        })
    }

    /// A fresh engine-wide request id.
    pub fn next_id(&self) -> RequestId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether `k` more sequences may be queued now.
    pub fn has_room(&self, k: usize) -> Result<(), SubmitError> {
        if self.is_draining() {
            return Err(SubmitError::ShuttingDown);
        }
        let waiting = self.stats.queued.load(Ordering::SeqCst) + self.stats.waiting.load(Ordering::SeqCst);
        if waiting + k > self.max_waiting {
            return Err(SubmitError::Full);
        }
        Ok(())
    }

    /// Hands a sequence to the engine thread without blocking.
    pub fn submit(&self, a: Admit) -> Result<(), SubmitError> {
        if self.is_draining() {
            return Err(SubmitError::ShuttingDown);
        }
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        match self.add_tx.try_send(a) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                match e {
                    TrySendError::Full(_) => Err(SubmitError::Full),
                    TrySendError::Disconnected(_) => Err(SubmitError::ShuttingDown),
                }
            }
        }
    }

    /// Aborts a sequence before the next step (a no-op if it already finished).
    pub fn abort(&self, id: RequestId) {
        let _ = self.ctl_tx.send(Control::Abort(id));
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst) || self.stats.stopped.load(Ordering::SeqCst)
    }

    /// Stops taking new sequences; the running ones go on to their end.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let _ = self.ctl_tx.send(Control::Drain);
    }

    /// Aborts whatever is left and waits for the thread to exit; its error, if it failed.
    pub fn stop(&self) -> anyhow::Result<()> {
        self.draining.store(true, Ordering::SeqCst);
        let _ = self.ctl_tx.send(Control::Stop);
        self.join()
    }

    /// Waits for the engine thread to exit.
    pub fn join(&self) -> anyhow::Result<()> {
        let h = self.join.lock().expect("join lock").take();
        match h {
            Some(h) => h.join().map_err(|_| anyhow::anyhow!("the engine thread panicked"))?,
            None => Ok(()),
        }
    }

    /// Waits up to `timeout` for the engine thread to exit by itself (after [`Self::drain`]).
    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while !self.stats.stopped.load(Ordering::SeqCst) {
            if t0.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

/// A sequence in flight, as the engine thread tracks it.
#[derive(Debug)]
struct Seq {
    events: UnboundedSender<SeqEvent>,
    decoder: StreamDecoder,
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    stop: Vec<String>,
    /// Bytes held back: the longest stop string less one.
    hold: usize,
    /// Where a stop string begins in `text`, once one was seen.
    stop_at: Option<usize>,
    num_prompt_tokens: usize,
    arrived: Instant,
    last_token: Option<Instant>,
}

impl Seq {
    /// Adds a token's text; true when a stop string has now appeared.
    fn push(&mut self, tok: &WeaveTokenizer, id: u32) -> bool {
        let piece = self.decoder.push(tok, id);
        let before = self.text.len();
        self.text.push_str(&piece);
        if self.stop.is_empty() || self.stop_at.is_some() {
            return self.stop_at.is_some();
        }
        // A new match must end in the new text; it may start up to `hold` bytes before it.
        let from = floor_char(&self.text, before.saturating_sub(self.hold));
        self.stop_at = self.stop.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|j| from + j)).min();
        self.stop_at.is_some()
    }

    /// The text that may be sent now, and marks it sent.
    fn take_sendable(&mut self, finished: bool) -> String {
        let end = match (self.stop_at, finished) {
            (Some(i), _) => i,
            (None, true) => self.text.len(),
            (None, false) => floor_char(&self.text, self.text.len().saturating_sub(self.hold)),
        };
        if end <= self.sent {
            return String::new();
        }
        let s = self.text[self.sent..end].to_string();
        self.sent = end;
        s
    }
}

/// The largest char boundary at or below `i`.
fn floor_char(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

struct Core<B> {
    engine: Engine<B>,
    tok: Arc<WeaveTokenizer>,
    metrics: Arc<Metrics>,
    stats: Arc<LiveStats>,
    seqs: HashMap<RequestId, Seq>,
    step_log: StepLogWriter,
}

impl<B: Backend> Core<B> {
    fn run(&mut self, add_rx: &Receiver<Admit>, ctl_rx: &Receiver<Control>) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let mut draining = false;
        let mut prefix_seen = (0u64, 0u64);
        loop {
            // Aborts first: a gone client's blocks are free before the next step.
            loop {
                match ctl_rx.try_recv() {
                    Ok(Control::Abort(id)) => self.abort(id, t0),
                    Ok(Control::Drain) => draining = true,
                    Ok(Control::Stop) | Err(TryRecvError::Disconnected) => {
                        let ids: Vec<RequestId> = self.seqs.keys().copied().collect();
                        for id in ids {
                            self.abort(id, t0);
                        }
                        self.refuse_queued(add_rx);
                        return Ok(());
                    }
                    Err(TryRecvError::Empty) => break,
                }
            }
            if draining {
                self.refuse_queued(add_rx);
            } else {
                let mut admitted = false;
                while let Ok(a) = add_rx.try_recv() {
                    self.admit(a, t0);
                    admitted = true;
                }
                if admitted {
                    self.publish();
                }
            }
            if !self.engine.has_unfinished() {
                self.publish();
                if draining {
                    return Ok(());
                }
                // Idle: sleep until something comes.
                crossbeam_channel::select! {
                    recv(add_rx) -> m => if let Ok(a) = m {
                        self.admit(a, t0);
                        self.publish();
                    },
                    recv(ctl_rx) -> m => match m {
                        Ok(Control::Abort(id)) => self.abort(id, t0),
                        Ok(Control::Drain) => draining = true,
                        Ok(Control::Stop) | Err(_) => return Ok(()),
                    },
                }
                continue;
            }
            self.step(t0, &mut prefix_seen)?;
        }
    }

    fn refuse_queued(&mut self, add_rx: &Receiver<Admit>) {
        for a in add_rx.try_iter() {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            let _ = a.events.send(SeqEvent::Rejected("the server is shutting down".into()));
        }
    }

    fn admit(&mut self, a: Admit, t0: Instant) {
        self.stats.queued.fetch_sub(1, Ordering::SeqCst);
        let num_prompt_tokens = a.request.prompt.len();
        let guided = a.guide.is_some();
        let now = a.arrived.saturating_duration_since(t0).as_secs_f64();
        match self.engine.add_request(a.id, serde_json::json!(a.name), a.request, &a.sampling, a.guide, now) {
            Ok(()) => {
                if guided {
                    self.metrics.guided_requests.inc();
                }
                if a.events.send(SeqEvent::Admitted).is_err() {
                    // Its client left while it was queued.
                    self.engine.abort(a.id, now);
                    return;
                }
                let hold = a.stop.iter().map(|s| s.len()).max().unwrap_or(1).saturating_sub(1);
                self.seqs.insert(
                    a.id,
                    Seq {
                        events: a.events,
                        decoder: StreamDecoder::default(),
                        text: String::new(),
                        sent: 0,
                        stop: a.stop,
                        hold,
                        stop_at: None,
                        num_prompt_tokens,
                        arrived: a.arrived,
                        last_token: None,
                    },
                );
            }
            Err(e) => {
                let msg = match e {
                    AddError::Sched(SchedError::Rejected { reason, .. }) => reason.to_string(),
                    other => other.to_string(),
                };
                let _ = a.events.send(SeqEvent::Rejected(msg));
            }
        }
    }

    fn abort(&mut self, id: RequestId, t0: Instant) {
        if let Some(o) = self.engine.abort(id, t0.elapsed().as_secs_f64()) {
            // Gauges first: a client that sees its request end sees its blocks freed too.
            self.publish();
            self.finish(o);
        }
    }

    fn step(&mut self, t0: Instant, prefix_seen: &mut (u64, u64)) -> anyhow::Result<()> {
        let now = t0.elapsed().as_secs_f64();
        let (tok, seqs) = (&*self.tok, &mut self.seqs);
        let report = self.engine.step(now, &mut |id, out| {
            seqs.get_mut(&id).is_some_and(|s| s.push(tok, *out.last().expect("a new token")))
        })?;
        // Gauges before any event goes out: whoever sees a request end also sees its blocks
        // back in the pool.
        self.publish();
        let at = Instant::now();
        let m = &self.metrics;
        m.iteration_tokens.observe(report.record.total_tokens() as f64);
        if let Some(p) = report.record.phases.filter(|p| p.mask > 0.0) {
            m.mask_time.observe(p.mask);
            m.mask_wait.observe(p.mask_wait);
        }
        m.generation_tokens.inc_by(report.update.new_tokens.len() as u64);
        m.preemptions.inc_by(report.record.preempted.len() as u64);
        let pc = self.engine.sched.prefix_cache_stats();
        m.prefix_cache_queries.inc_by(pc.queried_tokens.saturating_sub(prefix_seen.0));
        m.prefix_cache_hits.inc_by(pc.hit_tokens.saturating_sub(prefix_seen.1));
        *prefix_seen = (pc.queried_tokens, pc.hit_tokens);
        // This step's tokens, by sequence.
        let mut fresh: HashMap<RequestId, (Vec<u32>, Vec<Option<TokenLogprobs>>)> = HashMap::new();
        for (&(id, t), lp) in report.update.new_tokens.iter().zip(&report.logprobs) {
            let Some(s) = self.seqs.get_mut(&id) else { continue };
            match s.last_token {
                None => {
                    m.ttft.observe(at.duration_since(s.arrived).as_secs_f64());
                    m.prompt_tokens.inc_by(s.num_prompt_tokens as u64);
                }
                Some(prev) => m.itl.observe(at.duration_since(prev).as_secs_f64()),
            }
            s.last_token = Some(at);
            let e = fresh.entry(id).or_default();
            e.0.push(t);
            e.1.push(lp.clone());
        }
        let mut gone = Vec::new();
        for mut o in report.finished {
            // Its last tokens go out with no text: `finish` sends the rest of the text.
            let (tokens, logprobs) = fresh.remove(&o.id).unwrap_or_default();
            if let Some(s) = self.seqs.get_mut(&o.id) {
                // The scheduler finished it on its last token, which `stop_check` never saw: show
                // it unless it is the stop token itself.
                if o.reason == FinishReason::Length && s.stop_at.is_none() {
                    if let Some(&last) = o.output_tokens.last() {
                        if s.push(&self.tok, last) {
                            o.reason = FinishReason::Stop;
                        }
                    }
                }
                if !tokens.is_empty() {
                    let _ = s.events.send(SeqEvent::Tokens { text: String::new(), tokens, logprobs });
                }
            }
            self.finish(o);
        }
        for (id, (tokens, logprobs)) in fresh {
            let Some(s) = self.seqs.get_mut(&id) else { continue };
            let text = s.take_sendable(false);
            if s.events.send(SeqEvent::Tokens { text, tokens, logprobs }).is_err() {
                gone.push(id);
            }
        }
        self.step_log.line(&report.record);
        for id in gone {
            self.abort(id, t0);
        }
        self.publish();
        Ok(())
    }

    /// A sequence left the engine: its last event and its metrics.
    fn finish(&mut self, o: Outcome) {
        let Some(mut s) = self.seqs.remove(&o.id) else { return };
        let text = s.take_sendable(true);
        let m = &self.metrics;
        m.e2e.observe(s.arrived.elapsed().as_secs_f64());
        m.request_success.with_label_values(&[o.reason.as_str()]).inc();
        let _ = s.events.send(SeqEvent::Finished {
            reason: o.reason,
            text,
            num_prompt_tokens: o.num_prompt_tokens,
            num_output_tokens: o.output_tokens.len(),
            num_cached_tokens: o.num_cached_tokens,
        });
    }

    /// Tells every sequence in flight that the engine failed.
    fn fail_all(&mut self, msg: &str) {
        for (_, s) in self.seqs.drain() {
            let _ = s.events.send(SeqEvent::Failed(format!("the engine failed: {msg}")));
        }
    }

    /// Gauges and the counts the handlers read.
    fn publish(&self) {
        let sched = &self.engine.sched;
        self.stats.waiting.store(sched.num_waiting(), Ordering::SeqCst);
        self.stats.running.store(sched.num_running(), Ordering::SeqCst);
        let m = &self.metrics;
        m.running.set(sched.num_running() as i64);
        m.waiting.set((sched.num_waiting() + self.stats.queued.load(Ordering::SeqCst)) as i64);
        let total = sched.block_manager().num_usable_blocks().max(1);
        m.kv_usage.set(sched.kv_blocks_used() as f64 / total as f64);
        m.lora_info.set(super::metrics::unix_now_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_char_stays_on_boundaries() {
        let s = "aé€b";
        assert_eq!(floor_char(s, 2), 1);
        assert_eq!(floor_char(s, 3), 3);
        assert_eq!(floor_char(s, 5), 3);
        assert_eq!(floor_char(s, 99), s.len());
    }
}
