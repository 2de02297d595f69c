//! The engine's guided requests and their token masks, computed off the step's critical path.
//!
//! A guided request's next mask depends only on the tokens it has consumed, so it is started
//! on a worker thread as soon as the request is admitted or has taken its last token, and
//! runs while the engine updates, schedules and the backend runs the forward pass. A backend
//! waits for a row's mask only when it is about to sample that row ([`StepMasks::wait`]); the
//! wait is what the step pays, and it is measured.
//!
//! A mask is one bit per token id of the logits row (bit set: allowed), 32 to a `u32` word.
//! Where the grammar allows EOS, every turn-ending token is allowed too (a chat model ends
//! with `<|im_end|>` where the grammar's EOS may be `<|endoftext|>`).

use super::{Guide, GuideFactory};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;
use weave_scheduler::RequestId;

/// One guided request: its matcher and its next mask.
#[derive(Debug)]
struct Slot {
    state: Mutex<SlotState>,
    ready: Condvar,
}

#[derive(Debug)]
struct SlotState {
    guide: Guide,
    /// The mask for the next token; `None` while a worker computes it.
    mask: Option<Arc<Vec<u32>>>,
    /// Seconds the worker took for `mask`.
    compute_s: f64,
    /// llguidance's error, when the matcher failed (the mask then allows only ending).
    error: Option<String>,
}

/// What taking a token did to a guided request.
#[derive(Debug, Clone, PartialEq)]
pub enum Advance {
    /// More output may follow.
    Continue,
    /// The grammar is complete and allows nothing more: the request ends here.
    Complete,
    /// The matcher failed (the token was not allowed, or a grammar limit was hit).
    Failed(String),
}

/// Every guided request in the engine, and the threads that compute their masks.
#[derive(Debug)]
pub struct Guides {
    slots: HashMap<RequestId, Arc<Slot>>,
    pool: Arc<rayon::ThreadPool>,
    shape: Arc<MaskShape>,
}

/// What turns llguidance's mask into a logits row's.
#[derive(Debug)]
struct MaskShape {
    /// Logits per row.
    vocab: usize,
    eos: u32,
    /// Allowed wherever EOS is.
    enders: Vec<u32>,
}

impl MaskShape {
    fn words(&self) -> usize {
        self.vocab.div_ceil(32)
    }

    fn only_enders(&self) -> Vec<u32> {
        let mut w = vec![0u32; self.words()];
        for &t in std::iter::once(&self.eos).chain(&self.enders) {
            set(&mut w, t as usize, self.vocab);
        }
        w
    }
}

fn set(words: &mut [u32], t: usize, vocab: usize) {
    if t < vocab {
        words[t / 32] |= 1 << (t % 32);
    }
}

fn allowed(words: &[u32], t: usize) -> bool {
    words.get(t / 32).is_some_and(|w| w >> (t % 32) & 1 == 1)
}

/// Mask workers beside a forward pass on `threads` threads: half of them (the pass keeps the
/// cores busy; a mask takes tens to hundreds of microseconds).
pub fn default_workers(threads: usize) -> usize {
    threads.div_ceil(2).max(1)
}

impl Guides {
    /// For the model `factory` was made for (its trie is as wide as a logits row), with
    /// `threads` mask workers.
    pub fn new(factory: &GuideFactory, threads: usize) -> Guides {
        let shape = MaskShape { vocab: factory.vocab_size(), eos: factory.eos(), enders: factory.stop_ids().to_vec() };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("weave-mask-{i}"))
            .build()
            .expect("a thread pool");
        Guides { slots: HashMap::new(), pool: Arc::new(pool), shape: Arc::new(shape) }
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// A request joins with its guide at the output's start; its first mask starts now.
    pub fn add(&mut self, id: RequestId, guide: Guide) {
        let slot = Arc::new(Slot {
            state: Mutex::new(SlotState { guide, mask: None, compute_s: 0.0, error: None }),
            ready: Condvar::new(),
        });
        self.spawn(slot.clone());
        self.slots.insert(id, slot);
    }

    /// The request left (a worker still computing for it finishes on its own copy).
    pub fn remove(&mut self, id: RequestId) {
        self.slots.remove(&id);
    }

    /// Starts computing `slot`'s next mask on a worker.
    fn spawn(&self, slot: Arc<Slot>) {
        let shape = self.shape.clone();
        self.pool.spawn(move || {
            let t0 = Instant::now();
            let mut st = slot.state.lock().expect("mask lock");
            let (mask, error) = match st.guide.matcher.compute_mask_or_eos() {
                Ok(v) => {
                    let src = v.as_slice();
                    let mut w = vec![0u32; shape.words()];
                    let n = w.len().min(src.len());
                    w[..n].copy_from_slice(&src[..n]);
                    // Bits past the logits row stay clear.
                    if !shape.vocab.is_multiple_of(32) {
                        if let Some(last) = w.last_mut() {
                            *last &= (1u32 << (shape.vocab % 32)) - 1;
                        }
                    }
                    if allowed(&w, shape.eos as usize) {
                        for &t in &shape.enders {
                            set(&mut w, t as usize, shape.vocab);
                        }
                    }
                    if w.iter().all(|&x| x == 0) {
                        (shape.only_enders(), Some("the grammar allows no token here".to_string()))
                    } else {
                        (w, None)
                    }
                }
                Err(e) => (shape.only_enders(), Some(e.to_string())),
            };
            st.mask = Some(Arc::new(mask));
            st.error = error;
            st.compute_s = t0.elapsed().as_secs_f64();
            drop(st);
            slot.ready.notify_all();
        });
    }

    /// `id` took `token` (the one its mask allowed): advances its matcher and starts its
    /// next mask. Not guided: [`Advance::Continue`].
    pub fn advance(&mut self, id: RequestId, token: u32) -> Advance {
        let Some(slot) = self.slots.get(&id).cloned() else { return Advance::Continue };
        let mut st = slot.state.lock().expect("mask lock");
        // Its mask was used to sample this token, so it is ready; wait all the same.
        while st.mask.is_none() {
            st = slot.ready.wait(st).expect("mask lock");
        }
        if let Some(e) = st.error.take() {
            return Advance::Failed(e);
        }
        // A turn-ending token the mask allowed in EOS's place ends the output as EOS would
        // (the matcher knows only its own EOS). It reaches here when the scheduler did not
        // stop on it (`ignore_eos`).
        let sh = &self.shape;
        if token != sh.eos && sh.enders.contains(&token) && st.mask.as_ref().is_some_and(|m| allowed(m, token as usize))
        {
            return Advance::Complete;
        }
        if let Err(e) = st.guide.matcher.consume_token(token) {
            return Advance::Failed(e.to_string());
        }
        if st.guide.matcher.is_stopped() {
            return Advance::Complete;
        }
        st.mask = None;
        drop(st);
        self.spawn(slot);
        Advance::Continue
    }

    /// The masks of a step's sampling rows (`ids` in row order; `None` for unguided rows).
    pub fn for_step(&self, ids: impl Iterator<Item = RequestId>) -> StepMasks {
        let rows: Vec<Option<Arc<Slot>>> = ids.map(|id| self.slots.get(&id).cloned()).collect();
        StepMasks { rows, shape: self.shape.clone(), wait_ns: AtomicU64::new(0), compute_ns: AtomicU64::new(0) }
    }
}

/// A step's masks, as a backend sees them: row `i` is the step's `i`th sampling row.
#[derive(Debug)]
pub struct StepMasks {
    rows: Vec<Option<Arc<Slot>>>,
    shape: Arc<MaskShape>,
    /// Time the step thread spent waiting for masks, and the workers' time for them.
    wait_ns: AtomicU64,
    compute_ns: AtomicU64,
}

impl StepMasks {
    /// Whether no row is guided.
    pub fn is_empty(&self) -> bool {
        self.rows.iter().all(Option::is_none)
    }

    /// `u32` words per row.
    pub fn words(&self) -> usize {
        self.shape.words()
    }

    /// Row `row`'s mask, waiting for its worker if it is not done; `None` for an unguided row.
    pub fn wait(&self, row: usize) -> Option<Arc<Vec<u32>>> {
        let slot = self.rows.get(row)?.as_ref()?;
        let t0 = Instant::now();
        let mut st = slot.state.lock().expect("mask lock");
        while st.mask.is_none() {
            st = slot.ready.wait(st).expect("mask lock");
        }
        self.wait_ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.compute_ns.fetch_add((st.compute_s * 1e9) as u64, Ordering::Relaxed);
        st.mask.clone()
    }

    /// Sets row `row`'s disallowed logits to -inf (nothing for an unguided row).
    pub fn apply(&self, row: usize, logits: &mut [f32]) {
        if let Some(m) = self.wait(row) {
            apply_mask(logits, &m);
        }
    }

    /// The masks packed for a device: each row's place among the guided rows' masks
    /// (`weave_kernels_gpu::sample::NO_MASK` for an unguided row), and those masks back to
    /// back, `words()` words each.
    pub fn packed(&self) -> (Vec<u32>, Vec<u32>) {
        let mut rows = Vec::with_capacity(self.rows.len());
        let mut words = Vec::new();
        for i in 0..self.rows.len() {
            match self.wait(i) {
                Some(m) => {
                    rows.push((words.len() / self.words()) as u32);
                    words.extend_from_slice(&m);
                }
                None => rows.push(weave_kernels_gpu::sample::NO_MASK),
            }
        }
        (rows, words)
    }

    /// Seconds the step thread waited for masks, and the workers spent computing them.
    pub fn times(&self) -> (f64, f64) {
        (self.wait_ns.load(Ordering::Relaxed) as f64 * 1e-9, self.compute_ns.load(Ordering::Relaxed) as f64 * 1e-9)
    }
}

/// `-inf` wherever `mask`'s bit is clear (ids past the mask too): the one definition, which
/// the device's `mask_logits_f32` kernel is tested against.
pub use weave_kernels_gpu::sample::mask_row as apply_mask;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::WeaveTokenizer;
    use crate::structured::Constraint;

    #[test]
    fn masks_follow_each_request_and_finish_it() {
        let f = GuideFactory::new(&WeaveTokenizer::bytes(), 300).unwrap();
        let mut g = Guides::new(&f, 2);
        g.add(1, f.compile(&Constraint::Choice(vec!["ab".into(), "ac".into()])).unwrap());
        g.add(2, f.compile(&Constraint::Regex("x+".into())).unwrap());
        let m = g.for_step([2, 9, 1].into_iter());
        assert_eq!(m.words(), 10);
        let mut row = vec![0f32; 300];
        m.apply(2, &mut row);
        let ok: Vec<usize> = (0..300).filter(|&t| row[t].is_finite()).collect();
        assert_eq!(ok, vec![b'a' as usize], "request 1 may start only with 'a'");
        let mut row = vec![0f32; 300];
        m.apply(1, &mut row);
        assert!(row.iter().all(|x| x.is_finite()), "an unguided row is untouched");
        let (rows, words) = m.packed();
        assert_eq!(rows, vec![0, weave_kernels_gpu::sample::NO_MASK, 1]);
        assert_eq!(words.len(), 2 * 10);
        assert_eq!(g.advance(1, b'a' as u32), Advance::Continue);
        assert_eq!(g.advance(2, b'x' as u32), Advance::Continue);
        let m = g.for_step([1].into_iter());
        let mut row = vec![0f32; 300];
        m.apply(0, &mut row);
        let ok: Vec<usize> = (0..300).filter(|&t| row[t].is_finite()).collect();
        assert_eq!(ok, vec![b'b' as usize, b'c' as usize]);
        assert_eq!(g.advance(1, b'c' as u32), Advance::Complete);
        // A token the mask did not allow fails the matcher.
        assert!(matches!(g.advance(2, b'y' as u32), Advance::Failed(_)));
        let (_, compute) = m.times();
        assert!(compute > 0.0);
    }

    #[test]
    fn a_turn_ending_token_where_eos_is_allowed_completes() {
        let mut t = WeaveTokenizer::bytes();
        (t.eos, t.stop_ids) = (Some(0), vec![0, 1]);
        let f = GuideFactory::new(&t, 256).unwrap();
        let mut g = Guides::new(&f, 1);
        for id in [1, 2, 3] {
            g.add(id, f.compile(&Constraint::Regex("a+".into())).unwrap());
        }
        // Before any 'a', EOS is not allowed: neither is the other turn ender.
        let m = g.for_step([1].into_iter());
        let mut row = vec![0f32; 256];
        m.apply(0, &mut row);
        assert!(row[0].is_infinite() && row[1].is_infinite());
        for id in [1, 2, 3] {
            assert_eq!(g.advance(id, b'a' as u32), Advance::Continue);
        }
        let m = g.for_step([1].into_iter());
        let mut row = vec![0f32; 256];
        m.apply(0, &mut row);
        assert!(row[0].is_finite() && row[1].is_finite() && row[b'a' as usize].is_finite());
        assert_eq!(g.advance(1, 1), Advance::Complete, "the other turn ender");
        assert_eq!(g.advance(2, 0), Advance::Complete, "the grammar's own EOS");
        assert_eq!(g.advance(3, b'a' as u32), Advance::Continue);
    }

    #[test]
    fn apply_mask_keeps_exactly_the_set_bits() {
        let mut mask = vec![0u32; 3];
        for t in [0usize, 31, 32, 33, 70] {
            set(&mut mask, t, 71);
        }
        let mut row = vec![1f32; 71];
        apply_mask(&mut row, &mask);
        let ok: Vec<usize> = (0..71).filter(|&t| row[t].is_finite()).collect();
        assert_eq!(ok, vec![0, 31, 32, 33, 70]);
    }
}
