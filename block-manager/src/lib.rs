//! Paged KV-cache bookkeeping: which physical blocks hold which sequence's keys and values.
//!
//! **Owns**: the pool of `num_blocks` blocks of `block_size` token slots, one block table per
//! sequence (per layer group, for sliding-window models), reference counts, the prefix cache (full blocks identified by a hash chained over
//! the parent block's hash and the block's token ids) and the LRU queue of free blocks, some of
//! which still hold a cached prefix until they are needed.
//!
//! **Must not**: know about requests' sampling, queues or policies, time, I/O or threads. It
//! answers "how many blocks would this take", does the allocation, and maps token positions to
//! cache slots; the scheduler decides who gets them.
//!
//! Main types: [`BlockManager`], [`BlockManagerConfig`], [`BlockError`]; [`hash_block`] for the
//! chained block hashes, which callers keep per sequence and pass back in.
//!
//! As in vLLM, block 0 is the *null block*: it is never handed out (padding rows of a block
//! table point at it), so `num_blocks - 1` blocks are usable.
//!
//! **Sliding-window models** ([`KvGroups`], vLLM's hybrid allocator): the layers are split into
//! groups of equal size, some attending to everything (full) and some through a window. A
//! block is one group's layers for `block_size` tokens, all groups draw from the one pool, and
//! each sequence has one table per group. A windowed group's blocks that no later query can
//! see are given back ([`BlockManager::release_outside_window`]) and their table entries point
//! at the null block, so a window layer holds about `window` tokens whatever the length.
//! Prefix caching then keys each group's blocks apart, and a hit of `k` blocks needs every
//! full group's first `k` and each window group's blocks that the next query can see; a
//! prefix is passed around group after group, `k` entries each (null where a window group
//! needs none).

mod free_queue;

use free_queue::FreeQueue;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Block hashes are xxh3 outputs, already uniformly mixed: hashing them again (SipHash) only
/// costs time on the scheduler's hot path.
#[derive(Debug, Default, Clone, Copy)]
struct PassThroughHasher(u64);
impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}
type HashToBlock = HashMap<BlockHash, BlockId, BuildHasherDefault<PassThroughHasher>>;

/// Index of a physical KV block.
pub type BlockId = u32;
/// Caller-chosen dense id of a sequence (the scheduler's slot index); tables live in a `Vec`.
pub type SeqId = u32;
/// Hash identifying a full block's content together with everything before it.
pub type BlockHash = u64;

/// The block reserved as padding target; never allocated.
pub const NULL_BLOCK: BlockId = 0;

const ROOT_SEED: u64 = 0x5745_4156_455f_4b56; // "WEAVE_KV"

/// Hash of one full block, chained over its parent's hash so equal blocks at different
/// prefixes differ. `tokens` must be exactly one block's token ids.
pub fn hash_block(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let seed = parent.map_or(ROOT_SEED, |p| p.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15);
    xxhash_rust::xxh3::xxh3_64_with_seed(bytemuck::cast_slice(tokens), seed)
}

/// Extends `hashes` with the hashes of every full block of `tokens` not yet hashed.
pub fn extend_block_hashes(hashes: &mut Vec<BlockHash>, tokens: &[u32], block_size: usize) {
    let full = tokens.len() / block_size;
    for i in hashes.len()..full {
        let parent = i.checked_sub(1).map(|p| hashes[p]);
        let h = hash_block(parent, &tokens[i * block_size..(i + 1) * block_size]);
        hashes.push(h);
    }
}

/// How the layers share the pool: `full` groups that keep every token and `windowed` groups
/// whose layers see only the last `window` tokens (the query's own included). Every group
/// holds the same number of layers, so one block size in bytes serves them all. Groups
/// `0..full` are the full ones, the rest windowed. The default, one full group, is a model
/// without windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGroups {
    pub full: usize,
    pub windowed: usize,
    /// Keys a windowed layer's query sees, itself included (unused when `windowed` is 0).
    pub window: usize,
}

impl Default for KvGroups {
    fn default() -> Self {
        KvGroups { full: 1, windowed: 0, window: 0 }
    }
}

impl KvGroups {
    pub fn len(&self) -> usize {
        self.full + self.windowed
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether group `g` attends through the window.
    pub fn is_windowed(&self, g: usize) -> bool {
        g >= self.full
    }
    /// Blocks one windowed group may hold at once for a sequence that computes at most
    /// `chunk` tokens a step: the window before the step's first query, the chunk, and one
    /// block of misalignment at each end.
    pub fn window_blocks(&self, chunk: usize, block_size: usize) -> usize {
        (self.window.saturating_sub(1) + chunk).div_ceil(block_size) + 1
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockManagerConfig {
    /// Blocks in the pool, the null block included.
    pub num_blocks: usize,
    /// Token slots per block.
    pub block_size: usize,
    pub enable_prefix_caching: bool,
    /// Blocks that [`BlockManager::can_allocate`] keeps in reserve so that running sequences
    /// can keep decoding after a new one is admitted. 0 matches vLLM V1.
    pub watermark_blocks: usize,
    /// The layer groups sharing the pool (one full group for a model without windows).
    pub kv_groups: KvGroups,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("invalid block manager config: {0}")]
    InvalidConfig(String),
    #[error("not enough free KV blocks: {needed} needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("sequence {0} has no block table")]
    UnknownSeq(SeqId),
    #[error("cached prefix blocks can only be given to a sequence with no blocks yet (sequence {0})")]
    PrefixOnNonEmptyTable(SeqId),
    #[error("block {0} was offered as a cached prefix block but is not cached")]
    NotCached(BlockId),
    #[error("position {pos} of sequence {seq} has no slot: its table covers {capacity} tokens")]
    NoSlot { seq: SeqId, pos: usize, capacity: usize },
}

/// Prefix-cache counters, in tokens, as vLLM counts them: every lookup queries the request's
/// whole known length and hits the tokens covered by reused blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    pub lookups: u64,
    pub queried_tokens: u64,
    pub hit_tokens: u64,
}

impl PrefixCacheStats {
    pub fn hit_rate(&self) -> f64 {
        if self.queried_tokens == 0 {
            0.0
        } else {
            self.hit_tokens as f64 / self.queried_tokens as f64
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Table {
    /// A windowed group's leading entries are [`NULL_BLOCK`] once released.
    blocks: Vec<BlockId>,
    /// Leading blocks already registered in (or taken from) the prefix cache, released ones
    /// included.
    num_cached: usize,
    /// Leading entries released (windowed groups).
    num_released: usize,
}

/// A sequence's tables, one per group. Every group covers the same token positions, so all
/// tables have the same length.
type Tables = Vec<Table>;

/// The pool, the tables and the prefix cache. See the crate docs.
#[derive(Debug, Clone)]
pub struct BlockManager {
    cfg: BlockManagerConfig,
    ref_cnt: Vec<u32>,
    block_hash: Vec<Option<BlockHash>>,
    free: FreeQueue,
    cached: HashToBlock,
    tables: Vec<Option<Tables>>,
    stats: PrefixCacheStats,
}

impl BlockManager {
    pub fn new(cfg: BlockManagerConfig) -> Result<Self, BlockError> {
        if cfg.block_size == 0 {
            return Err(BlockError::InvalidConfig("block_size must be at least 1".into()));
        }
        if cfg.num_blocks < 2 {
            return Err(BlockError::InvalidConfig(format!(
                "num_blocks is {}; at least 2 are needed (block 0 is the reserved null block)",
                cfg.num_blocks
            )));
        }
        if cfg.num_blocks > u32::MAX as usize - 1 {
            return Err(BlockError::InvalidConfig("num_blocks does not fit in u32".into()));
        }
        let g = cfg.kv_groups;
        if g.full == 0 && g.windowed == 0 {
            return Err(BlockError::InvalidConfig("kv_groups has no group".into()));
        }
        if g.windowed > 0 && g.window == 0 {
            return Err(BlockError::InvalidConfig("kv_groups: windowed groups need a window of at least 1".into()));
        }

        let n = cfg.num_blocks;
        Ok(BlockManager {
            cfg,
            ref_cnt: vec![0; n],
            block_hash: vec![None; n],
            free: FreeQueue::new(n, 1..n as BlockId),
            cached: HashToBlock::default(),
            tables: Vec::new(),
            stats: PrefixCacheStats::default(),
        })
    }

    pub fn config(&self) -> &BlockManagerConfig {
        &self.cfg
    }
    pub fn block_size(&self) -> usize {
        self.cfg.block_size
    }
    /// Blocks that can ever be handed out (the null block excluded).
    pub fn num_usable_blocks(&self) -> usize {
        self.cfg.num_blocks - 1
    }
    /// Free blocks, including free blocks that still hold a cached prefix.
    pub fn num_free_blocks(&self) -> usize {
        self.free.len()
    }
    /// Blocks referenced by at least one table.
    pub fn num_used_blocks(&self) -> usize {
        self.num_usable_blocks() - self.num_free_blocks()
    }
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.stats
    }
    /// Blocks that hold `num_tokens` tokens (in one group).
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.cfg.block_size)
    }

    /// Blocks of all groups that one sequence of `num_tokens` tokens, computed at most `chunk`
    /// tokens a step, can hold at once: every group's `blocks_for` without windows; a
    /// windowed group holds no more than its window and a chunk.
    pub fn blocks_to_hold(&self, num_tokens: usize, chunk: usize) -> usize {
        let g = self.cfg.kv_groups;
        let all = self.blocks_for(num_tokens);
        g.full * all + g.windowed * all.min(g.window_blocks(chunk, self.cfg.block_size))
    }

    pub fn kv_groups(&self) -> KvGroups {
        self.cfg.kv_groups
    }

    /// Blocks per group in a prefix (see the crate docs: `k` entries a group, group after group).
    pub fn prefix_blocks(&self, prefix: &[BlockId]) -> usize {
        prefix.len() / self.cfg.kv_groups.len()
    }

    /// The cache key of group `g`'s block of content hash `h` (group 0's is the hash itself).
    fn key(g: usize, h: BlockHash) -> BlockHash {
        if g == 0 {
            h
        } else {
            (h ^ (g as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).rotate_left(23)
        }
    }

    /// Leading blocks a window group can drop once `computed` tokens are done: those that no
    /// query at `computed` or later sees.
    fn dead_blocks(&self, computed: usize) -> usize {
        (computed + 1).saturating_sub(self.cfg.kv_groups.window) / self.cfg.block_size
    }

    /// Whether `num_blocks` new blocks can be taken while keeping the watermark in reserve.
    pub fn can_allocate(&self, num_blocks: usize) -> bool {
        num_blocks + self.cfg.watermark_blocks <= self.num_free_blocks()
    }

    /// The longest run of cached full blocks that begins `hashes` and covers at most
    /// `num_tokens - 1` tokens: at least the last known token is always computed, because its
    /// logits are needed. Pure; see [`Self::record_prefix_lookup`].
    ///
    /// With layer groups: the longest `k` for which every full group has its first `k` blocks
    /// cached and every window group the blocks among them that the query at `k * block_size`
    /// sees; returned group after group, `k` each, null where a window group needs none.
    pub fn lookup_prefix(&self, hashes: &[BlockHash], num_tokens: usize) -> Vec<BlockId> {
        if !self.cfg.enable_prefix_caching {
            return Vec::new();
        }
        let max_blocks = (num_tokens.saturating_sub(1) / self.cfg.block_size).min(hashes.len());
        let g = self.cfg.kv_groups;
        let get = |grp: usize, j: usize| self.cached.get(&Self::key(grp, hashes[j])).copied();
        if g.len() == 1 && g.windowed == 0 {
            return (0..max_blocks).map_while(|j| get(0, j)).collect();
        }
        // Full groups: every block of the prefix.
        let mut k = (0..max_blocks).take_while(|&j| (0..g.full).all(|grp| get(grp, j).is_some())).count();
        // Window groups: the blocks the next query sees; shorter hits need other blocks, so
        // try each length down to 0 (which needs none).
        while k > 0
            && !(self.dead_blocks(k * self.cfg.block_size)..k)
                .all(|j| (g.full..g.len()).all(|grp| get(grp, j).is_some()))
        {
            k -= 1;
        }
        let dead = self.dead_blocks(k * self.cfg.block_size);
        let mut out = Vec::with_capacity(k * g.len());
        for grp in 0..g.len() {
            for j in 0..k {
                let needed = !g.is_windowed(grp) || j >= dead;
                out.push(if needed { get(grp, j).expect("checked above") } else { NULL_BLOCK });
            }
        }
        out
    }

    /// Counts one admitted lookup: `num_tokens` queried, `hit_blocks` reused. Callers record
    /// once per admission, so a request that waits several steps is not counted each time.
    pub fn record_prefix_lookup(&mut self, num_tokens: usize, hit_blocks: usize) {
        if self.cfg.enable_prefix_caching {
            self.stats.lookups += 1;
            self.stats.queried_tokens += num_tokens as u64;
            self.stats.hit_tokens += (hit_blocks * self.cfg.block_size) as u64;
        }
    }

    /// Blocks that giving `seq` slots for `total_tokens` tokens would take from the free pool,
    /// `prefix` being cached blocks it would reuse (free cached ones count: reusing them takes
    /// them out of the free queue).
    pub fn num_blocks_to_allocate(&self, seq: SeqId, total_tokens: usize, prefix: &[BlockId]) -> usize {
        let have = self.table(seq).map_or(0, |t| t[0].blocks.len()) + self.prefix_blocks(prefix);
        let fresh = self.blocks_for(total_tokens).saturating_sub(have);
        fresh * self.cfg.kv_groups.len() + self.revived(prefix)
    }

    /// Prefix blocks that are free (cached, unreferenced): reusing them takes them from the
    /// free queue.
    fn revived(&self, prefix: &[BlockId]) -> usize {
        prefix.iter().filter(|&&b| b != NULL_BLOCK && self.ref_cnt[b as usize] == 0).count()
    }

    /// Blocks that admitting `seq` for all its `total_tokens`, `chunk` tokens a step, can come
    /// to take from the free pool at once (counted as [`Self::num_blocks_to_allocate`], a
    /// windowed group capped at its window and a chunk): what admission reserves.
    pub fn num_blocks_to_admit(&self, seq: SeqId, total_tokens: usize, prefix: &[BlockId], chunk: usize) -> usize {
        let g = self.cfg.kv_groups;
        if g.windowed == 0 {
            return self.num_blocks_to_allocate(seq, total_tokens, prefix);
        }
        let k = self.prefix_blocks(prefix);
        let have = self.table(seq).map_or(0, |t| t[0].blocks.len()) + k;
        let fresh = self.blocks_for(total_tokens).saturating_sub(have);
        let held_window = self.table(seq).map_or(0, |t| t[g.full].blocks.len() - t[g.full].num_released)
            + prefix[g.full * k..(g.full + 1) * k].iter().filter(|&&b| b != NULL_BLOCK).count();
        let window_room = g.window_blocks(chunk, self.cfg.block_size).saturating_sub(held_window);
        g.full * fresh + g.windowed * fresh.min(window_room) + self.revived(prefix)
    }

    /// Gives `seq` (creating its table if needed) the cached `prefix` blocks and enough new
    /// blocks to hold `total_tokens` tokens. All or nothing: on error nothing changed.
    pub fn allocate(&mut self, seq: SeqId, prefix: &[BlockId], total_tokens: usize) -> Result<(), BlockError> {
        let has_blocks = self.table(seq).is_some_and(|t| !t[0].blocks.is_empty());
        if !prefix.is_empty() && has_blocks {
            return Err(BlockError::PrefixOnNonEmptyTable(seq));
        }
        if let Some(&b) = prefix.iter().find(|&&b| b != NULL_BLOCK && self.block_hash[b as usize].is_none()) {
            return Err(BlockError::NotCached(b));
        }
        let needed = self.num_blocks_to_allocate(seq, total_tokens, prefix);
        if needed > self.num_free_blocks() {
            return Err(BlockError::OutOfBlocks { needed, free: self.num_free_blocks() });
        }
        for &b in prefix.iter().filter(|&&b| b != NULL_BLOCK) {
            if self.ref_cnt[b as usize] == 0 {
                self.free.remove(b);
            }
            self.ref_cnt[b as usize] += 1;
        }
        let idx = seq as usize;
        if idx >= self.tables.len() {
            self.tables.resize_with(idx + 1, || None);
        }
        let groups = self.cfg.kv_groups.len();
        let mut tables = self.tables[idx].take().unwrap_or_else(|| vec![Table::default(); groups]);
        let k = self.prefix_blocks(prefix);
        if k > 0 {
            for (table, part) in tables.iter_mut().zip(prefix.chunks_exact(k)) {
                table.blocks.extend_from_slice(part);
                table.num_cached = k;
                table.num_released = part.iter().take_while(|&&b| b == NULL_BLOCK).count();
            }
        }
        let want = self.blocks_for(total_tokens);
        for table in &mut tables {
            while table.blocks.len() < want {
                let b = self.free.pop_front().expect("free count checked above");
                if let Some(h) = self.block_hash[b as usize].take() {
                    // Evict: the block's old content is about to be overwritten.
                    if self.cached.get(&h) == Some(&b) {
                        self.cached.remove(&h);
                    }
                }
                self.ref_cnt[b as usize] = 1;
                table.blocks.push(b);
            }
        }
        self.tables[idx] = Some(tables);
        Ok(())
    }

    /// Gives back the windowed groups' blocks of `seq` that no query at position `computed`
    /// or later can see (a query at `p` sees keys from `p + 1 - window`); their entries then
    /// point at the null block. Returns the blocks freed. Nothing to do without windows.
    pub fn release_outside_window(&mut self, seq: SeqId, computed: usize) -> usize {
        let g = self.cfg.kv_groups;
        if g.windowed == 0 {
            return 0;
        }
        // Block i ends at (i + 1) * bs: unseen once that is at most the first visible key.
        let dead = self.dead_blocks(computed);
        let Some(tables) = self.tables.get_mut(seq as usize).and_then(Option::as_mut) else {
            return 0;
        };
        let mut freed = 0;
        for table in &mut tables[g.full..] {
            let upto = dead.min(table.blocks.len());
            for b in &mut table.blocks[table.num_released.min(upto)..upto] {
                let rc = &mut self.ref_cnt[*b as usize];
                *rc -= 1;
                if *rc == 0 {
                    self.free.push_back(*b);
                    freed += 1;
                }
                *b = NULL_BLOCK;
            }
            table.num_released = table.num_released.max(upto);
        }
        freed
    }

    /// Registers the full blocks among the first `num_tokens` tokens of `seq` in the prefix
    /// cache. `hashes` are the sequence's chained block hashes ([`extend_block_hashes`]).
    /// A block whose content is already cached under another block stays private.
    pub fn cache_full_blocks(&mut self, seq: SeqId, hashes: &[BlockHash], num_tokens: usize) {
        if !self.cfg.enable_prefix_caching {
            return;
        }
        let bs = self.cfg.block_size;
        let Some(tables) = self.tables.get_mut(seq as usize).and_then(Option::as_mut) else {
            return;
        };
        for (grp, table) in tables.iter_mut().enumerate() {
            let full = (num_tokens / bs).min(hashes.len()).min(table.blocks.len());
            // Released window blocks are null here: they were registered before release.
            let start = table.num_cached.max(table.num_released).min(full);
            for (&b, &h) in table.blocks[start..full].iter().zip(&hashes[start..full]) {
                let key = Self::key(grp, h);
                if self.block_hash[b as usize].is_none() {
                    if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(key) {
                        e.insert(b);
                        self.block_hash[b as usize] = Some(key);
                    }
                }
            }
            table.num_cached = table.num_cached.max(full);
        }
    }

    /// Frees every block of `seq`. Blocks whose count drops to zero join the free queue's tail
    /// in reverse table order, so a sequence's last blocks are evicted before its first ones
    /// (the first ones are the likelier shared prefix).
    pub fn free(&mut self, seq: SeqId) -> Result<(), BlockError> {
        let tables = self.tables.get_mut(seq as usize).and_then(Option::take).ok_or(BlockError::UnknownSeq(seq))?;
        for table in &tables {
            for &b in table.blocks[table.num_released..].iter().rev() {
                let rc = &mut self.ref_cnt[b as usize];
                *rc -= 1;
                if *rc == 0 {
                    self.free.push_back(b);
                }
            }
        }
        Ok(())
    }

    pub fn has_seq(&self, seq: SeqId) -> bool {
        self.table(seq).is_some()
    }

    /// The block table of `seq` in group 0 (empty if it has none).
    pub fn block_table(&self, seq: SeqId) -> &[BlockId] {
        self.group_table(seq, 0)
    }

    /// The block table of `seq` in group `group` (empty if it has none).
    pub fn group_table(&self, seq: SeqId, group: usize) -> &[BlockId] {
        self.table(seq).and_then(|t| t.get(group)).map_or(&[], |t| &t.blocks)
    }

    /// The flat cache slot (`block * block_size + offset`) of token `pos` of `seq` in group 0.
    pub fn slot(&self, seq: SeqId, pos: usize) -> Result<u32, BlockError> {
        let blocks = self.table(seq).ok_or(BlockError::UnknownSeq(seq))?;
        let bs = self.cfg.block_size;
        let b = blocks[0].blocks.get(pos / bs).ok_or(BlockError::NoSlot {
            seq,
            pos,
            capacity: blocks[0].blocks.len() * bs,
        })?;
        Ok(*b * bs as u32 + (pos % bs) as u32)
    }

    /// Appends the slots of positions `start..start + n` of `seq` in group `group` to `out`.
    /// A position whose block was released (outside a window) has no slot.
    pub fn extend_slot_mapping(
        &self,
        seq: SeqId,
        group: usize,
        start: usize,
        n: usize,
        out: &mut Vec<u32>,
    ) -> Result<(), BlockError> {
        let table = self.table(seq).and_then(|t| t.get(group)).ok_or(BlockError::UnknownSeq(seq))?;
        let bs = self.cfg.block_size;
        if start + n > table.blocks.len() * bs {
            return Err(BlockError::NoSlot { seq, pos: start + n - 1, capacity: table.blocks.len() * bs });
        }
        if n > 0 && start / bs < table.num_released {
            return Err(BlockError::NoSlot { seq, pos: start, capacity: table.blocks.len() * bs });
        }
        out.extend((start..start + n).map(|p| table.blocks[p / bs] * bs as u32 + (p % bs) as u32));
        Ok(())
    }

    fn table(&self, seq: SeqId) -> Option<&Tables> {
        self.tables.get(seq as usize).and_then(Option::as_ref)
    }

    /// Checks every structural invariant; `Err` names the first broken one. For tests.
    pub fn audit(&self) -> Result<(), String> {
        let n = self.cfg.num_blocks;
        let mut holders = vec![0u32; n];
        for tables in self.tables.iter().flatten() {
            if tables.len() != self.cfg.kv_groups.len() {
                return Err(format!("a sequence has {} tables for {} groups", tables.len(), self.cfg.kv_groups.len()));
            }
            if tables.iter().any(|t| t.blocks.len() != tables[0].blocks.len()) {
                return Err("a sequence's group tables differ in length".into());
            }
            for (g, t) in tables.iter().enumerate() {
                if t.num_released > 0 && !self.cfg.kv_groups.is_windowed(g) {
                    return Err(format!("full group {g} has released blocks"));
                }
                for (i, &b) in t.blocks.iter().enumerate() {
                    if i < t.num_released {
                        if b != NULL_BLOCK {
                            return Err(format!("released entry {i} of group {g} holds block {b}"));
                        }
                        continue;
                    }
                    if b == NULL_BLOCK || b as usize >= n {
                        return Err(format!("table holds invalid block {b}"));
                    }
                    holders[b as usize] += 1;
                }
            }
        }
        let mut free_seen = 0;
        for b in self.free.iter() {
            free_seen += 1;
            if holders[b as usize] != 0 {
                return Err(format!("block {b} is free and in use"));
            }
        }
        if free_seen != self.free.len() {
            return Err("free queue length mismatch".into());
        }
        for (b, &held) in holders.iter().enumerate().skip(1) {
            if held != self.ref_cnt[b] {
                return Err(format!("block {b}: ref count {} but {held} tables", self.ref_cnt[b]));
            }
            if (self.ref_cnt[b] == 0) != self.free.contains(b as BlockId) {
                return Err(format!(
                    "block {b}: ref count {} but free = {}",
                    self.ref_cnt[b],
                    self.free.contains(b as BlockId)
                ));
            }
        }
        if self.free.contains(NULL_BLOCK) || self.ref_cnt[0] != 0 {
            return Err("null block was handed out".into());
        }
        let in_use = holders.iter().filter(|&&h| h > 0).count();
        if self.num_free_blocks() + in_use != self.num_usable_blocks() {
            return Err(format!(
                "free {} + used {in_use} != usable {}",
                self.num_free_blocks(),
                self.num_usable_blocks()
            ));
        }
        for (h, &b) in &self.cached {
            if self.block_hash[b as usize] != Some(*h) {
                return Err(format!("cache maps a hash to block {b}, which holds another"));
            }
        }
        let hashed = self.block_hash.iter().filter(|h| h.is_some()).count();
        if hashed != self.cached.len() {
            return Err("hashed blocks and cache entries differ".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
