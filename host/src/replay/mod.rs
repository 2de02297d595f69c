//! `weave replay`: the real scheduler and block manager driven by a trace, no model.

pub mod trace;

use crate::backends::null::NullBackend;
use crate::engine::steplog::Summary;
use crate::engine::{Clock, Engine, Event, RunReport};
use crate::replay::trace::Trace;
use weave_scheduler::Scheduler;

/// Replays `trace`; `on_event` sees rejections and steps as they happen.
pub fn replay(trace: &Trace, on_event: &mut dyn FnMut(Event<'_>)) -> anyhow::Result<(RunReport, Summary)> {
    let cfg = trace.config.to_scheduler_config().map_err(anyhow::Error::msg)?;
    let sched = Scheduler::new(cfg)?;
    let (arrivals, bad) = trace.arrivals();
    for (name, message) in &bad {
        on_event(Event::Rejected { name, message });
    }
    let mut engine = Engine::new(sched, NullBackend, Clock::Steps);
    let mut report = engine.run(arrivals, &mut |_, _| false, on_event)?;
    report.rejected.splice(0..0, bad);
    let mut summary = Summary::from_steps(&report.steps, Clock::Steps.name());
    summary.rejected = report.rejected.len();
    summary.prefix_cache_hit_rate = engine.sched.prefix_cache_stats().hit_rate();
    Ok((report, summary))
}
