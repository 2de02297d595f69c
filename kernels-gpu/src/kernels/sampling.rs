//! Token choice on the device: `argmax_f32` (greedy) and `sample_f32` (temperature, top-k,
//! top-p and a seeded draw, `crate::sample::sample_row`'s rule with block reductions), and
//! `mask_logits_f32` (structured outputs: a row's packed token mask, `crate::sample::mask_row`).
//! One thread block (128 threads) a row of logits.

use super::reduce::{block_argmax, block_sum_sync};
use crate::fmath::{exp, ln};
use crate::gpu::{self, Global};
use crate::ops::argmax_pick;
use crate::sample::{
    bisect_key, mask_allows, ord_key, race_score, top_p_key, uniform_open, weight, RowParams, NO_MASK, PARAM_WORDS,
};

const THREADS: u32 = crate::BLOCK_THREADS;

#[inline(always)]
unsafe fn argmax(out: Global<u32>, logits: Global<f32>, vocab: u32) {
    let base = (gpu::bx() * vocab) as usize;
    let mut best = (f32::NEG_INFINITY, u32::MAX);
    let mut i = gpu::tid();
    while i < vocab {
        best = argmax_pick(best, (unsafe { logits.add(base + i as usize).read() }, i));
        i += THREADS;
    }
    let b = unsafe { block_argmax(best) };
    if gpu::tid() == 0 {
        unsafe { out.add(gpu::bx() as usize).write(b.1) };
    }
}

/// One row: writes the token and its logprob under the raw logits.
#[inline(always)]
unsafe fn sample(out: Global<u32>, out_logprob: Global<f32>, logits: Global<f32>, params: Global<u32>, vocab: u32) {
    let r = gpu::bx() as usize;
    let row = unsafe { logits.add(r * vocab as usize) };
    let pw = unsafe { params.add(r * PARAM_WORDS) };
    let word = |i: usize| unsafe { pw.add(i).read() };
    let p = RowParams::from_words(&[word(0), word(1), word(2), word(3), word(4), word(5)]);
    let at = |i: u32| unsafe { row.add(i as usize).read() };
    let tid = gpu::tid();
    let mut best = (f32::NEG_INFINITY, u32::MAX);
    let mut i = tid;
    while i < vocab {
        best = argmax_pick(best, (at(i), i));
        i += THREADS;
    }
    let best = unsafe { block_argmax(best) };
    let m = best.0;
    let mut s = 0.0;
    let mut i = tid;
    while i < vocab {
        s += exp(at(i) - m);
        i += THREADS;
    }
    let lse = m + ln(unsafe { block_sum_sync(s) });
    let mut tok = best.1;
    if !p.greedy() {
        // Every branch below depends only on the row's parameters and block-wide results,
        // so all threads take it together and meet at each reduction's barriers.
        let tau_k = if p.top_k > 0 && p.top_k < vocab {
            bisect_key(0, |c| {
                let mut n = 0u32;
                let mut i = tid;
                while i < vocab {
                    n += u32::from(ord_key(at(i)) >= c);
                    i += THREADS;
                }
                (unsafe { block_sum_sync(n as f32) }) >= p.top_k as f32
            })
        } else {
            0
        };
        let inv_t = 1.0 / p.temperature;
        let mass = |c: u32| {
            let mut acc = 0.0;
            let mut i = tid;
            while i < vocab {
                let x = at(i);
                if ord_key(x) >= c {
                    acc += weight(x, m, inv_t);
                }
                i += THREADS;
            }
            unsafe { block_sum_sync(acc) }
        };
        let tau = top_p_key(tau_k, p.top_p, mass);
        let mut win = (f32::NEG_INFINITY, u32::MAX);
        let mut i = tid;
        while i < vocab {
            let x = at(i);
            if ord_key(x) >= tau {
                win = argmax_pick(win, (race_score(x, m, inv_t, uniform_open(p.seed, p.counter, i)), i));
            }
            i += THREADS;
        }
        tok = unsafe { block_argmax(win) }.1;
    }
    // A row of NaNs has no winner: token 0, as the host reference.
    if tok >= vocab {
        tok = 0;
    }
    if tid == 0 {
        unsafe {
            out.add(r).write(tok);
            out_logprob.add(r).write(at(tok) - lse);
        }
    }
}

/// Row `bx` of `logits`: `-inf` wherever its mask (row `mask_rows[bx]` of `masks`, `words`
/// words a row) does not allow a token; a row whose entry is `NO_MASK` is left as it is.
#[inline(always)]
unsafe fn mask_logits(logits: Global<f32>, masks: Global<u32>, mask_rows: Global<u32>, words: u32, vocab: u32) {
    let r = gpu::bx() as usize;
    let m = unsafe { mask_rows.add(r).read() };
    if m == NO_MASK {
        return;
    }
    let row = unsafe { logits.add(r * vocab as usize) };
    let mrow = unsafe { masks.add(m as usize * words as usize) };
    let mut i = gpu::tid();
    while i < vocab {
        let w = if i / 32 < words { unsafe { mrow.add((i / 32) as usize).read() } } else { 0 };
        if !mask_allows(w, i) {
            unsafe { row.add(i as usize).write(f32::NEG_INFINITY) };
        }
        i += THREADS;
    }
}

crate::kernel! {
    fn mask_logits_f32(logits: *mut f32, masks: *const u32, mask_rows: *const u32, words: u32, vocab: u32) {
        mask_logits(Global::new(logits), Global::new(masks), Global::new(mask_rows), words, vocab)
    }
}

crate::kernel! {
    fn argmax_f32(out: *mut u32, logits: *const f32, vocab: u32) {
        argmax(Global::new(out), Global::new(logits), vocab)
    }
}

crate::kernel! {
    fn sample_f32(out: *mut u32, out_logprob: *mut f32, logits: *const f32, params: *const u32, vocab: u32) {
        sample(Global::new(out), Global::new(out_logprob), Global::new(logits), Global::new(params), vocab)
    }
}
