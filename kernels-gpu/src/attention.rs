//! Paged mixed prefill/decode attention: the decomposition the device kernel uses, and a host
//! driver that walks the same grid (tiles x KV heads x splits, then the reduce) with the
//! same math, so the CPU can check the kernel's logic and the CPU backend can run it.
//!
//! Layouts (row-major):
//! - `q`, `out`: `[num_tokens][num_q_heads][head_dim]`, the batch's packed query tokens.
//! - `k_cache`, `v_cache`: `[num_blocks * block_size][num_kv_heads][head_dim]`: one token
//!   slot holds all KV heads, so a warp reading one (slot, head) row of `head_dim` elements
//!   reads contiguous memory, and staging a block for one head reads `block_size` such rows.
//! - Metadata from `ScheduledBatch`: `query_start_loc`, `context_lens`, padded
//!   `block_tables` (`max_blocks_per_seq` per row).

#[cfg(not(target_arch = "nvptx64"))]
use crate::elem::Elem;
#[cfg(not(target_arch = "nvptx64"))]
use crate::softmax::SoftmaxState;

/// Query rows (token x query head) one thread block handles: 4 warps x 4 rows each.
pub const ROWS_PER_TILE: u32 = 16;
/// One lane per key of a staged block, so blocks hold at most a warp's width of tokens.
pub const MAX_BLOCK_SIZE: u32 = 32;

/// Shapes and scalars of one attention launch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    pub num_q_heads: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub block_size: u32,
    pub max_blocks_per_seq: u32,
    /// KV blocks per split of the context (flash-decoding); 0 = one split.
    pub blocks_per_split: u32,
    pub scale: f32,
}

impl AttnShape {
    /// Query heads per KV head (GQA group size).
    pub fn group(&self) -> u32 {
        self.num_q_heads / self.num_kv_heads
    }
    /// Query tokens per tile: as many as fit `ROWS_PER_TILE` rows with the whole group.
    pub fn tokens_per_tile(&self) -> u32 {
        (ROWS_PER_TILE / self.group()).max(1)
    }
    /// Splits needed for contexts up to `max_seq_len` tokens.
    pub fn num_splits(&self, max_seq_len: u32) -> u32 {
        if self.blocks_per_split == 0 {
            1
        } else {
            max_seq_len.div_ceil(self.block_size).div_ceil(self.blocks_per_split).max(1)
        }
    }
    /// Offset of `(slot, kv_head)` in a KV cache.
    #[inline(always)]
    pub fn kv_offset(&self, slot: u32, kv_head: u32) -> usize {
        (slot as usize * self.num_kv_heads as usize + kv_head as usize) * self.head_dim as usize
    }
    /// Whether the kernels support this shape; `Err` says what is wrong.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.num_kv_heads == 0 || self.num_q_heads % self.num_kv_heads != 0 {
            return Err("query heads must be a multiple of KV heads");
        }
        if self.group() > ROWS_PER_TILE {
            return Err("GQA group larger than 16 query heads per KV head");
        }
        if self.head_dim != 64 && self.head_dim != 128 {
            return Err("head_dim must be 64 or 128");
        }
        if self.block_size == 0 || self.block_size > MAX_BLOCK_SIZE {
            return Err("block_size must be 1..=32");
        }
        Ok(())
    }
    /// Floats per partial result row in the split workspace: `m`, `l`, then `head_dim`.
    pub fn partial_stride(&self) -> usize {
        self.head_dim as usize + 2
    }
}

#[cfg(not(target_arch = "nvptx64"))]
/// Number of tiles of `tokens_per_tile` query tokens; tiles never cross sequences.
pub fn count_tiles(query_start_loc: &[u32], tokens_per_tile: u32) -> usize {
    query_start_loc.windows(2).map(|w| (w[1] - w[0]).div_ceil(tokens_per_tile) as usize).sum()
}

#[cfg(not(target_arch = "nvptx64"))]
/// Writes `(seq, first query index in seq)` of every tile into `out` (2 u32 per tile).
pub fn fill_tiles(query_start_loc: &[u32], tokens_per_tile: u32, out: &mut [u32]) {
    let mut k = 0;
    for (seq, w) in query_start_loc.windows(2).enumerate() {
        let mut q0 = 0;
        while q0 < w[1] - w[0] {
            out[k] = seq as u32;
            out[k + 1] = q0;
            k += 2;
            q0 += tokens_per_tile;
        }
    }
}

/// Query tokens per thread block of the tensor-core kernel (`paged_attention_mma_*`): four
/// warps of 16 rows, one query head.
pub const MMA_TILE_TOKENS: u32 = 64;

/// The tiles of a batch split by kernel: `(seq, first query)` pairs of `tokens_per_tile`
/// tokens for the sequences that bring one token (decode rows, for the CUDA-core kernel) and
/// of [`MMA_TILE_TOKENS`] for those that bring more (prefill chunks, for the tensor-core one).
#[cfg(not(target_arch = "nvptx64"))]
pub fn split_tiles(query_start_loc: &[u32], tokens_per_tile: u32) -> (std::vec::Vec<u32>, std::vec::Vec<u32>) {
    let (mut small, mut big) = (std::vec::Vec::new(), std::vec::Vec::new());
    for (seq, w) in query_start_loc.windows(2).enumerate() {
        let n = w[1] - w[0];
        let (out, step) = if n <= 1 { (&mut small, tokens_per_tile) } else { (&mut big, MMA_TILE_TOKENS) };
        let mut q0 = 0;
        while q0 < n {
            out.extend([seq as u32, q0]);
            q0 += step;
        }
    }
    (small, big)
}

/// The most splits a decode row is cut into; with [`split_rows_bound`] it sizes the partials
/// workspace.
pub const MAX_SPLITS: u32 = 32;

/// Fewest KV blocks a split is given: below this, merging costs more than it spreads.
pub const MIN_BLOCKS_PER_SPLIT: u32 = 4;

/// Flash-decoding's choice for a decode-only batch of `num_seqs` rows whose longest context
/// spans `max_blocks` KV blocks: the `blocks_per_split` that gives the device about two thread
/// blocks per SM (`num_seqs * num_kv_heads * splits >= 2 * num_sms`), 0 (no split) when the
/// batch fills the device by itself or the contexts are short. Splits past a row's own
/// length are empty and exit at once.
pub fn choose_blocks_per_split(num_seqs: u32, num_kv_heads: u32, max_blocks: u32, num_sms: u32) -> u32 {
    let work = num_seqs.max(1) * num_kv_heads.max(1);
    let target = 2 * num_sms;
    if work >= target {
        return 0;
    }
    let splits = target.div_ceil(work).min(max_blocks / MIN_BLOCKS_PER_SPLIT).min(MAX_SPLITS);
    if splits <= 1 {
        return 0;
    }
    max_blocks.div_ceil(splits)
}

/// An upper bound on `splits * num_seqs` over every choice [`choose_blocks_per_split`] makes
/// for up to `max_seqs` rows: the rows of partials a workspace needs.
pub fn split_rows_bound(max_seqs: u32, num_kv_heads: u32, num_sms: u32) -> u32 {
    // splits <= ceil(2 sms / (seqs kv)) <= 2 sms / (seqs kv) + 1, so splits * seqs is at
    // most 2 sms / kv + seqs, and never more than MAX_SPLITS * seqs.
    ((2 * num_sms).div_ceil(num_kv_heads.max(1)) + max_seqs).min(MAX_SPLITS * max_seqs)
}

/// KV block range `[first, end)` of `split` for keys `[0, visible)`.
#[inline(always)]
pub fn split_blocks(split: u32, blocks_per_split: u32, block_size: u32, visible: u32) -> (u32, u32) {
    let nblocks = crate::udiv_ceil(visible, block_size);
    if blocks_per_split == 0 {
        return (if split == 0 { 0 } else { nblocks }, nblocks);
    }
    let first = (split * blocks_per_split).min(nblocks);
    (first, ((split + 1) * blocks_per_split).min(nblocks))
}

/// Batch metadata the kernel reads (slices of a `ScheduledBatch`).
#[derive(Debug, Clone, Copy)]
pub struct BatchMeta<'a> {
    pub query_start_loc: &'a [u32],
    pub context_lens: &'a [u32],
    pub block_tables: &'a [u32],
}

#[cfg(not(target_arch = "nvptx64"))]
/// Attention of one query row (scaled, f32) over KV blocks `[first, end)` of one sequence,
/// keys past `visible` masked, block by block exactly as a thread block stages them.
#[allow(clippy::too_many_arguments)]
pub fn attend_blocks<T: Elem>(
    shape: &AttnShape,
    q: &[f32],
    k_cache: &[T],
    v_cache: &[T],
    table: &[u32],
    kv_head: u32,
    range: (u32, u32),
    visible: u32,
    scores: &mut [f32],
    state: &mut SoftmaxState,
    acc: &mut [f32],
) {
    let d = shape.head_dim as usize;
    attend_blocks_with(
        shape,
        table,
        kv_head,
        range,
        visible,
        scores,
        state,
        acc,
        |o| crate::dot_f32_elem(q, &k_cache[o..o + d]),
        |o, p, acc| {
            for (a, x) in acc.iter_mut().zip(&v_cache[o..o + d]) {
                *a += p * x.to_f32();
            }
        },
    )
}

/// [`attend_blocks`] with the cache reads left to the caller: `score(o)` is the query's dot
/// product with the key row at cache offset `o`, `add_v(o, p, acc)` adds `p` times the value
/// row at `o`. The block walk, the causal mask and the online softmax stay here.
#[cfg(not(target_arch = "nvptx64"))]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn attend_blocks_with(
    shape: &AttnShape,
    table: &[u32],
    kv_head: u32,
    (first, end): (u32, u32),
    visible: u32,
    scores: &mut [f32],
    state: &mut SoftmaxState,
    acc: &mut [f32],
    score: impl Fn(usize) -> f32,
    mut add_v: impl FnMut(usize, f32, &mut [f32]),
) {
    let bs = shape.block_size;
    for j in first..end {
        let phys = table[j as usize];
        let n = bs as usize;
        for (t, s) in scores[..n].iter_mut().enumerate() {
            let key = j * bs + t as u32;
            *s = if key < visible { score(shape.kv_offset(phys * bs + t as u32, kv_head)) } else { f32::NEG_INFINITY };
        }
        state.update_block_with(&scores[..n], acc, |t, p, acc| {
            add_v(shape.kv_offset(phys * bs + t as u32, kv_head), p, acc)
        });
    }
}

/// The whole launch on the host: for every tile, KV head and split, every row's partial;
/// then the reduce over splits (or the direct write when there is one split).
/// `partials` needs `num_splits * num_tokens * num_q_heads * partial_stride()` floats.
#[cfg(not(target_arch = "nvptx64"))]
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_host<T: Elem>(
    shape: &AttnShape,
    meta: BatchMeta<'_>,
    max_seq_len: u32,
    q: &[T],
    k_cache: &[T],
    v_cache: &[T],
    out: &mut [T],
    partials: &mut [f32],
) {
    extern crate std;
    use std::vec;
    let (nq, d) = (shape.num_q_heads as usize, shape.head_dim as usize);
    let num_tokens = *meta.query_start_loc.last().unwrap_or(&0) as usize;
    let splits = shape.num_splits(max_seq_len);
    let tq = shape.tokens_per_tile();
    let g = shape.group();
    let ps = shape.partial_stride();
    let mut tiles = vec![0u32; 2 * count_tiles(meta.query_start_loc, tq)];
    fill_tiles(meta.query_start_loc, tq, &mut tiles);
    let (mut qrow, mut scores, mut acc) = (vec![0f32; d], vec![0f32; shape.block_size as usize], vec![0f32; d]);
    for tile in tiles.chunks(2) {
        let (seq, q0) = (tile[0] as usize, tile[1]);
        let qstart = meta.query_start_loc[seq];
        let qlen = meta.query_start_loc[seq + 1] - qstart;
        let ctx = meta.context_lens[seq];
        let ntok = tq.min(qlen - q0);
        let tile_visible = ctx + q0 + ntok;
        let table = &meta.block_tables[seq * shape.max_blocks_per_seq as usize..][..shape.max_blocks_per_seq as usize];
        for kv_head in 0..shape.num_kv_heads {
            for split in 0..splits {
                let range = split_blocks(split, shape.blocks_per_split, shape.block_size, tile_visible);
                for r in 0..ntok * g {
                    let (tok, head) = (r / g, kv_head * g + r % g);
                    let token = (qstart + q0 + tok) as usize;
                    let visible = ctx + q0 + tok + 1;
                    let qo = (token * nq + head as usize) * d;
                    for (x, v) in qrow.iter_mut().zip(&q[qo..qo + d]) {
                        *x = v.to_f32() * shape.scale;
                    }
                    let mut st = SoftmaxState::EMPTY;
                    acc.fill(0.0);
                    attend_blocks(
                        shape,
                        &qrow,
                        k_cache,
                        v_cache,
                        table,
                        kv_head,
                        range,
                        visible,
                        &mut scores,
                        &mut st,
                        &mut acc,
                    );
                    if splits == 1 {
                        for (o, a) in out[qo..qo + d].iter_mut().zip(&acc) {
                            *o = T::from_f32(a / st.l);
                        }
                    } else {
                        let po = ((split as usize * num_tokens + token) * nq + head as usize) * ps;
                        partials[po] = st.m;
                        partials[po + 1] = st.l;
                        partials[po + 2..po + ps].copy_from_slice(&acc);
                    }
                }
            }
        }
    }
    if splits > 1 {
        let mut merged = vec![0f32; d];
        for token in 0..num_tokens {
            for head in 0..nq {
                let parts = (0..splits as usize).map(|s| {
                    let po = ((s * num_tokens + token) * nq + head) * ps;
                    (SoftmaxState { m: partials[po], l: partials[po + 1] }, &partials[po + 2..po + ps])
                });
                crate::softmax::merge_partials(parts, &mut merged);
                let qo = (token * nq + head) * d;
                for (o, m) in out[qo..qo + d].iter_mut().zip(&merged) {
                    *o = T::from_f32(*m);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "nvptx64"))]
/// Scatters this step's K and V rows (`[num_tokens][num_kv_heads][head_dim]`) into the
/// cache through the slot mapping; slot `u32::MAX` marks a padding token to skip.
pub fn reshape_and_cache_host<T: Elem>(
    shape: &AttnShape,
    k: &[T],
    v: &[T],
    slot_mapping: &[u32],
    k_cache: &mut [T],
    v_cache: &mut [T],
) {
    let row = shape.num_kv_heads as usize * shape.head_dim as usize;
    for (t, &slot) in slot_mapping.iter().enumerate() {
        if slot == u32::MAX {
            continue;
        }
        let o = shape.kv_offset(slot, 0);
        k_cache[o..o + row].copy_from_slice(&k[t * row..(t + 1) * row]);
        v_cache[o..o + row].copy_from_slice(&v[t * row..(t + 1) * row]);
    }
}

#[cfg(test)]
mod split_tests {
    use super::*;

    #[test]
    fn splits_fill_the_device_only_when_the_batch_does_not() {
        // 256 sequences x 8 KV heads already give 2048 thread blocks for 132 SMs.
        assert_eq!(choose_blocks_per_split(256, 8, 128, 132), 0);
        // Short contexts are not split.
        assert_eq!(choose_blocks_per_split(1, 8, 6, 132), 0);
        for (seqs, kv, blocks) in [(1u32, 8u32, 512u32), (8, 8, 512), (4, 3, 64), (1, 1, 10_000), (64, 8, 256)] {
            let bps = choose_blocks_per_split(seqs, kv, blocks, 132);
            if bps == 0 {
                assert!(seqs * kv >= 264 || blocks / MIN_BLOCKS_PER_SPLIT <= 1, "{seqs} {kv} {blocks}");
                continue;
            }
            let splits = blocks.div_ceil(bps);
            assert!(bps >= MIN_BLOCKS_PER_SPLIT - 1 && splits <= MAX_SPLITS, "{seqs} {kv} {blocks}: {bps}");
            // Every block is covered, and the device gets about two blocks per SM.
            assert!(splits * bps >= blocks);
            assert!(seqs * kv * splits >= 264 || splits == MAX_SPLITS || bps <= MIN_BLOCKS_PER_SPLIT + 1);
            assert!(splits * seqs <= split_rows_bound(seqs, kv, 132), "{seqs} {kv} {blocks}");
        }
        // The bound holds for every batch size up to the workspace's.
        for seqs in 1..300 {
            let bps = choose_blocks_per_split(seqs, 8, 512, 132);
            let splits = if bps == 0 { 1 } else { 512u32.div_ceil(bps) };
            assert!(splits * seqs <= split_rows_bound(300, 8, 132).max(seqs), "{seqs}");
        }
    }
}

#[cfg(test)]
mod mma_tile_tests {
    use super::*;

    #[test]
    fn decode_rows_and_chunks_get_their_own_tiles() {
        // seq 0: 1 token, seq 1: 130 tokens, seq 2: 1 token, seq 3: 2 tokens.
        let qsl = [0, 1, 131, 132, 134];
        let (small, big) = split_tiles(&qsl, 4);
        assert_eq!(small, [0, 0, 2, 0]);
        assert_eq!(big, [1, 0, 1, 64, 1, 128, 3, 0]);
    }
}
