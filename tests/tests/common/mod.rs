//! Random paged-attention batches shared by the CPU-reference and GPU kernel tests.
#![allow(dead_code)]

use proptest::prelude::*;
use weave_kernels_gpu::attention::{reshape_and_cache_host, AttnShape};
use weave_kernels_gpu::Elem;

#[derive(Debug, Clone)]
pub struct Case {
    /// (context tokens, query tokens) per sequence.
    pub seqs: Vec<(u32, u32)>,
    pub block_size: u32,
    pub head_dim: u32,
    pub num_kv_heads: u32,
    pub group: u32,
    pub blocks_per_split: u32,
    pub seed: u64,
}

pub fn case() -> impl Strategy<Value = Case> {
    let seq = prop_oneof![
        (1u32..90, Just(1u32)), // decode
        (Just(0u32), 1u32..50), // first chunk (incl. one-token prompts)
        (1u32..70, 2u32..40),   // later chunk, starting anywhere in a block
    ];
    (
        prop::collection::vec(seq, 1..5),
        prop::sample::select(vec![1u32, 4, 5, 16, 32]),
        prop::sample::select(vec![64u32, 128]),
        1u32..3,
        prop::sample::select(vec![1u32, 3, 8]),
        prop::sample::select(vec![0u32, 1, 2, 3]),
        any::<u64>(),
    )
        .prop_map(|(seqs, block_size, head_dim, num_kv_heads, group, blocks_per_split, seed)| Case {
            seqs,
            block_size,
            head_dim,
            num_kv_heads,
            group,
            blocks_per_split,
            seed,
        })
}

pub struct Rng(pub u64);
impl Rng {
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// A packed mixed batch with its paged KV cache.
pub struct Batch<T> {
    pub shape: AttnShape,
    pub qsl: Vec<u32>,
    pub ctx: Vec<u32>,
    pub tables: Vec<u32>,
    pub max_seq_len: u32,
    pub q: Vec<T>,
    /// This step's K/V rows, their slots (`u32::MAX` = padding), and the caches before and
    /// after the host's KV write.
    pub k_new: Vec<T>,
    pub v_new: Vec<T>,
    pub slots: Vec<u32>,
    pub kc_before: Vec<T>,
    pub vc_before: Vec<T>,
    pub kc: Vec<T>,
    pub vc: Vec<T>,
}

pub fn build<T: Elem>(c: &Case) -> Batch<T> {
    let bs = c.block_size as usize;
    let nkv = c.num_kv_heads;
    let shape0 = AttnShape {
        num_q_heads: nkv * c.group,
        num_kv_heads: nkv,
        head_dim: c.head_dim,
        block_size: c.block_size,
        max_blocks_per_seq: 0,
        blocks_per_split: c.blocks_per_split,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
    };
    let (nq, d) = (shape0.num_q_heads as usize, c.head_dim as usize);
    let lens: Vec<usize> = c.seqs.iter().map(|&(ctx, q)| (ctx + q) as usize).collect();
    let mbs = lens.iter().map(|l| l.div_ceil(bs)).max().unwrap();
    let shape = AttnShape { max_blocks_per_seq: mbs as u32, ..shape0 };
    assert!(shape.check().is_ok());
    // Physical blocks shuffled across sequences; block 0 stays unused (the null block).
    let total_blocks: usize = lens.iter().map(|l| l.div_ceil(bs)).sum::<usize>() + 1;
    let mut rng = Rng(c.seed | 1);
    let mut phys: Vec<u32> = (1..total_blocks as u32).collect();
    for i in (1..phys.len()).rev() {
        let j = ((rng.uniform() + 1.0) * 0.5 * (i + 1) as f64) as usize % (i + 1);
        phys.swap(i, j);
    }
    let mut tables = vec![0u32; c.seqs.len() * mbs];
    let mut next = 0;
    for (s, l) in lens.iter().enumerate() {
        for b in 0..l.div_ceil(bs) {
            tables[s * mbs + b] = phys[next];
            next += 1;
        }
    }
    let row = nkv as usize * d;
    let cache_len = total_blocks * bs * row;
    let mut kc = vec![T::from_f32(f32::NAN); cache_len]; // never-written slots must never be read
    let mut vc = kc.clone();
    let mut rnd = |n: usize| -> Vec<T> { (0..n).map(|_| T::from_f32(rng.uniform() as f32)).collect() };
    let mut qsl = vec![0u32];
    let mut slots = Vec::new();
    let (mut k_new, mut v_new) = (Vec::new(), Vec::new());
    for (s, &(ctx, ql)) in c.seqs.iter().enumerate() {
        let slot = |pos: usize| tables[s * mbs + pos / bs] * c.block_size + (pos % bs) as u32;
        // Earlier steps' K/V already in the cache.
        for pos in 0..ctx as usize {
            let o = slot(pos) as usize * row;
            kc[o..o + row].copy_from_slice(&rnd(row));
            vc[o..o + row].copy_from_slice(&rnd(row));
        }
        // This step's tokens go through the KV-write kernel's logic.
        for pos in ctx as usize..(ctx + ql) as usize {
            slots.push(slot(pos));
            k_new.extend(rnd(row));
            v_new.extend(rnd(row));
        }
        qsl.push(qsl.last().unwrap() + ql);
    }
    slots.push(u32::MAX); // a padding token: skipped
    k_new.extend(rnd(row));
    v_new.extend(rnd(row));
    let (kc_before, vc_before) = (kc.clone(), vc.clone());
    reshape_and_cache_host(&shape, &k_new, &v_new, &slots, &mut kc, &mut vc);
    let num_tokens = *qsl.last().unwrap() as usize;
    let q = rnd(num_tokens * nq * d);
    let ctx: Vec<u32> = c.seqs.iter().map(|s| s.0).collect();
    let max_seq_len = *lens.iter().max().unwrap() as u32;
    Batch { shape, qsl, ctx, tables, max_seq_len, q, k_new, v_new, slots, kc_before, vc_before, kc, vc }
}

/// `n` values uniform in [-1, 1) from `seed`.
pub fn rnd(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng(seed | 1);
    (0..n).map(|_| r.uniform() as f32).collect()
}

/// The largest absolute difference, in f32.
pub fn max_abs<T: Elem>(a: &[T], b: &[T]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x.to_f32() as f64 - y.to_f32() as f64).abs()).fold(0.0, f64::max)
}

/// The batch's attention on the host (`paged_attention_host` over the caches after the KV
/// write): what every device kernel is held to.
pub fn host_attention<T: Elem>(b: &Batch<T>) -> Vec<T> {
    use weave_kernels_gpu::attention::{paged_attention_host, BatchMeta};
    let num_tokens = *b.qsl.last().unwrap() as usize;
    let mut want = vec![T::default(); b.q.len()];
    let splits = b.shape.num_splits(b.max_seq_len) as usize;
    let mut partials = vec![0f32; splits * num_tokens * b.shape.num_q_heads as usize * b.shape.partial_stride()];
    let meta = BatchMeta { query_start_loc: &b.qsl, context_lens: &b.ctx, block_tables: &b.tables };
    paged_attention_host(&b.shape, meta, b.max_seq_len, &b.q, &b.kc, &b.vc, &mut want, &mut partials);
    want
}

/// `silu(gate) * up` of each row of `gu` (`[gate; up]`, `2 n` a row), narrowed to `T`.
pub fn silu_and_mul_ref<T: Elem>(gu: &[T], n: usize) -> Vec<T> {
    gu.chunks(2 * n)
        .flat_map(|g| {
            let gf: Vec<f32> = g.iter().map(|v| v.to_f32()).collect();
            let mut of = vec![0f32; n];
            weave_kernels_gpu::ops::silu_and_mul_row(&gf, &mut of);
            of.into_iter().map(T::from_f32)
        })
        .collect()
}

/// Rotary embedding of `v` (`heads` heads of `hd` a token, one token per position) on the
/// host, with the cos/sin cache `cs` (`hd` a position).
pub fn rope_ref<T: Elem>(
    v: &[T],
    heads: usize,
    hd: usize,
    positions: &[u32],
    cs: &[f32],
    layout: weave_kernels_gpu::ops::RopeLayout,
) -> Vec<T> {
    let mut f: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
    for (t, tok) in f.chunks_mut(heads * hd).enumerate() {
        let p = positions[t] as usize;
        for h in tok.chunks_mut(hd) {
            weave_kernels_gpu::ops::rope_head(h, &cs[p * hd..(p + 1) * hd], hd, layout);
        }
    }
    f.into_iter().map(T::from_f32).collect()
}

/// The sampling rows both kernel tests draw: greedy, temperature alone, top-k, top-p, both,
/// `top_k = 1`, a one-token nucleus, and a cut near the whole vocabulary (`big_k`); `per`
/// rows of each, with their own counters.
pub fn sampling_params(per: u32, big_k: u32) -> Vec<weave_kernels_gpu::sample::RowParams> {
    use weave_kernels_gpu::sample::RowParams;
    let kinds = [
        (0.0f32, 0u32, 1.0f32),
        (1.0, 0, 1.0),
        (0.7, 50, 1.0),
        (0.7, 0, 0.9),
        (1.3, 200, 0.5),
        (1.0, 1, 1.0),
        (0.5, 0, 0.02),
        (2.0, big_k, 0.999),
    ];
    let mut params = Vec::new();
    for (i, (t, top_k, top_p)) in kinds.into_iter().enumerate() {
        for c in 0..per {
            params.push(RowParams { temperature: t, top_k, top_p, seed: 1000 + i as u64, counter: c });
        }
    }
    params
}
