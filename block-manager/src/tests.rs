use super::*;
use proptest::prelude::*;

fn bm(num_blocks: usize, block_size: usize, caching: bool) -> BlockManager {
    BlockManager::new(BlockManagerConfig {
        num_blocks,
        block_size,
        enable_prefix_caching: caching,
        watermark_blocks: 0,
        kv_groups: KvGroups::default(),
    })
    .unwrap()
}

fn hashes(tokens: &[u32], bs: usize) -> Vec<BlockHash> {
    let mut h = Vec::new();
    extend_block_hashes(&mut h, tokens, bs);
    h
}

#[test]
fn null_block_is_reserved() {
    let m = bm(5, 4, false);
    assert_eq!(m.num_usable_blocks(), 4);
    assert_eq!(m.num_free_blocks(), 4);
    assert!(BlockManager::new(BlockManagerConfig {
        num_blocks: 1,
        block_size: 4,
        enable_prefix_caching: false,
        watermark_blocks: 0,
        kv_groups: KvGroups::default(),
    })
    .is_err());
    assert!(BlockManager::new(BlockManagerConfig {
        num_blocks: 4,
        block_size: 0,
        enable_prefix_caching: false,
        watermark_blocks: 0,
        kv_groups: KvGroups::default(),
    })
    .is_err());
}

#[test]
fn allocate_grow_slots_and_free() {
    let mut m = bm(8, 4, false);
    m.allocate(7, &[], 6).unwrap();
    assert_eq!(m.block_table(7), &[1, 2]);
    // Growing to 8 tokens needs no new block; 9 needs one.
    assert_eq!(m.num_blocks_to_allocate(7, 8, &[]), 0);
    assert_eq!(m.num_blocks_to_allocate(7, 9, &[]), 1);
    m.allocate(7, &[], 9).unwrap();
    assert_eq!(m.block_table(7), &[1, 2, 3]);
    assert_eq!(m.slot(7, 0).unwrap(), 4);
    assert_eq!(m.slot(7, 5).unwrap(), 9);
    assert_eq!(m.slot(7, 8).unwrap(), 12);
    assert!(matches!(m.slot(7, 12), Err(BlockError::NoSlot { .. })));
    let mut slots = Vec::new();
    m.extend_slot_mapping(7, 0, 3, 3, &mut slots).unwrap();
    assert_eq!(slots, vec![7, 8, 9]);
    m.free(7).unwrap();
    assert_eq!(m.num_free_blocks(), 7);
    assert_eq!(m.free(7), Err(BlockError::UnknownSeq(7)));
    m.audit().unwrap();
}

#[test]
fn out_of_blocks_changes_nothing() {
    let mut m = bm(4, 2, false);
    m.allocate(0, &[], 4).unwrap();
    let err = m.allocate(1, &[], 3).unwrap_err();
    assert_eq!(err, BlockError::OutOfBlocks { needed: 2, free: 1 });
    assert!(!m.has_seq(1));
    assert_eq!(m.num_free_blocks(), 1);
    m.audit().unwrap();
}

#[test]
fn watermark_reserves_blocks() {
    let m = BlockManager::new(BlockManagerConfig {
        num_blocks: 11,
        block_size: 4,
        enable_prefix_caching: false,
        watermark_blocks: 2,
        kv_groups: KvGroups::default(),
    })
    .unwrap();
    assert!(m.can_allocate(8));
    assert!(!m.can_allocate(9));
}

#[test]
fn prefix_cache_hit_share_and_lru_eviction() {
    let bs = 4;
    let mut m = bm(6, bs, true);
    let a: Vec<u32> = (0..10).collect(); // 2 full blocks + 2 tokens
    let ha = hashes(&a, bs);
    assert!(m.lookup_prefix(&ha, a.len()).is_empty());
    m.allocate(0, &[], a.len()).unwrap();
    m.cache_full_blocks(0, &ha, a.len());
    // Same first 8 tokens, different tail: both full blocks hit and are shared.
    let mut b: Vec<u32> = (0..8).collect();
    b.extend([100, 101, 102]);
    let hb = hashes(&b, bs);
    let hit = m.lookup_prefix(&hb, b.len());
    assert_eq!(hit, m.block_table(0)[..2].to_vec());
    assert_eq!(m.num_blocks_to_allocate(1, b.len(), &hit), 1);
    m.allocate(1, &hit, b.len()).unwrap();
    assert_eq!(m.num_used_blocks(), 4);
    m.audit().unwrap();
    // A prompt that is exactly two blocks may reuse only one: its last token must be computed.
    let c: Vec<u32> = (0..8).collect();
    assert_eq!(m.lookup_prefix(&hashes(&c, bs), c.len()).len(), 1);
    // Free both: cached blocks stay reusable while free.
    m.free(0).unwrap();
    m.free(1).unwrap();
    assert_eq!(m.num_free_blocks(), 5);
    let hit = m.lookup_prefix(&ha, a.len());
    assert_eq!(hit.len(), 2);
    // Reviving free cached blocks takes them from the free pool.
    assert_eq!(m.num_blocks_to_allocate(2, a.len(), &hit), 3);
    // Filling the cache with unrelated blocks evicts the least recently freed first.
    m.allocate(3, &[], 5 * bs).unwrap();
    assert!(m.lookup_prefix(&ha, a.len()).is_empty());
    m.record_prefix_lookup(11, 2);
    m.record_prefix_lookup(10, 0);
    let s = m.prefix_cache_stats();
    assert_eq!((s.lookups, s.queried_tokens, s.hit_tokens), (2, 21, 8));
    assert!((s.hit_rate() - 8.0 / 21.0).abs() < 1e-12);
    m.audit().unwrap();
}

#[test]
fn caching_disabled_never_hits() {
    let mut m = bm(6, 4, false);
    let a: Vec<u32> = (0..12).collect();
    let ha = hashes(&a, 4);
    m.allocate(0, &[], 12).unwrap();
    m.cache_full_blocks(0, &ha, 12);
    assert!(m.lookup_prefix(&ha, 12).is_empty());
    m.record_prefix_lookup(12, 0);
    assert_eq!(m.prefix_cache_stats().lookups, 0);
}

#[test]
fn bad_prefix_is_rejected() {
    let mut m = bm(6, 4, true);
    assert_eq!(m.allocate(0, &[3], 8), Err(BlockError::NotCached(3)));
    m.allocate(0, &[], 4).unwrap();
    let h = hashes(&[1, 2, 3, 4], 4);
    m.cache_full_blocks(0, &h, 4);
    let hit = m.lookup_prefix(&h, 5);
    assert_eq!(m.allocate(0, &hit, 8), Err(BlockError::PrefixOnNonEmptyTable(0)));
    m.audit().unwrap();
}

#[test]
fn hashes_chain_over_parents() {
    let x = [1u32, 2, 3, 4];
    assert_eq!(hash_block(None, &x), hash_block(None, &x));
    assert_ne!(hash_block(None, &x), hash_block(Some(hash_block(None, &x)), &x));
    let mut h = Vec::new();
    extend_block_hashes(&mut h, &[1, 2, 3, 4, 1, 2, 3, 4, 9], 4);
    assert_eq!(h.len(), 2);
    assert_ne!(h[0], h[1]);
}

#[derive(Debug, Clone)]
enum Op {
    /// Start sequence `seq` with a prompt from token family `fam` of `len` tokens.
    Start {
        seq: u32,
        fam: u32,
        len: usize,
    },
    /// Grow sequence `seq` by `n` tokens.
    Grow {
        seq: u32,
        n: usize,
    },
    Free {
        seq: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u32..6, 0u32..3, 1usize..40).prop_map(|(seq, fam, len)| Op::Start { seq, fam, len }),
        (0u32..6, 1usize..10).prop_map(|(seq, n)| Op::Grow { seq, n }),
        (0u32..6).prop_map(|seq| Op::Free { seq }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// After every operation: nothing both free and used, ref counts equal table holders,
    /// free + used = total; and freeing everything leaks nothing.
    #[test]
    fn invariants_hold_under_random_ops(ops in prop::collection::vec(op(), 1..80), bs in 1usize..6, nb in 2usize..40, caching: bool) {
        let mut m = bm(nb, bs, caching);
        let mut tokens: Vec<Option<Vec<u32>>> = vec![None; 6];
        for op in ops {
            match op {
                Op::Start { seq, fam, len } => {
                    if tokens[seq as usize].is_some() { continue; }
                    // Families share content, so prefixes hit across sequences.
                    let t: Vec<u32> = (0..len as u32).map(|i| fam * 1000 + i).collect();
                    let h = hashes(&t, bs);
                    let hit = m.lookup_prefix(&h, t.len());
                    let need = m.num_blocks_to_allocate(seq, t.len(), &hit);
                    let free_before = m.num_free_blocks();
                    match m.allocate(seq, &hit, t.len()) {
                        Ok(()) => {
                            prop_assert_eq!(free_before - m.num_free_blocks(), need);
                            m.cache_full_blocks(seq, &h, t.len());
                            tokens[seq as usize] = Some(t);
                        }
                        Err(BlockError::OutOfBlocks { .. }) => {
                            prop_assert!(need > free_before);
                            prop_assert_eq!(m.num_free_blocks(), free_before);
                        }
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                Op::Grow { seq, n } => {
                    let Some(t) = tokens[seq as usize].as_mut() else { continue };
                    let new_len = t.len() + n;
                    if m.allocate(seq, &[], new_len).is_ok() {
                        let base = t.len() as u32;
                        t.extend((0..n as u32).map(|i| 50_000 + seq * 1000 + base + i));
                        m.cache_full_blocks(seq, &hashes(t, bs), new_len);
                        prop_assert_eq!(m.block_table(seq).len(), new_len.div_ceil(bs));
                    }
                }
                Op::Free { seq } => {
                    let had = tokens[seq as usize].take().is_some();
                    prop_assert_eq!(m.free(seq).is_ok(), had);
                }
            }
            if let Err(e) = m.audit() { prop_assert!(false, "{}", e); }
        }
        for (seq, t) in tokens.iter().enumerate() {
            if t.is_some() { m.free(seq as u32).unwrap(); }
        }
        prop_assert_eq!(m.num_free_blocks(), m.num_usable_blocks());
        prop_assert_eq!(m.num_used_blocks(), 0);
        if let Err(e) = m.audit() { prop_assert!(false, "{}", e); }
    }
}

fn windowed(num_blocks: usize, block_size: usize, full: usize, windowed: usize, window: usize) -> BlockManager {
    BlockManager::new(BlockManagerConfig {
        num_blocks,
        block_size,
        enable_prefix_caching: false,
        watermark_blocks: 0,
        kv_groups: KvGroups { full, windowed, window },
    })
    .unwrap()
}

#[test]
fn windowed_groups_release_what_no_query_sees() {
    // One full group and two windowed ones, window 6, blocks of 4.
    let mut m = windowed(40, 4, 1, 2, 6);
    m.allocate(0, &[], 10).unwrap();
    // Three blocks in each of the three groups.
    assert_eq!(m.num_used_blocks(), 9);
    assert_eq!(m.num_blocks_to_allocate(0, 13, &[]), 3);
    // A query at position 8 sees keys 3..=8: block 0 (keys 0..4) is still seen.
    assert_eq!(m.release_outside_window(0, 8), 0);
    // At 9 it sees 4..=9: block 0 of each windowed group goes back.
    assert_eq!(m.release_outside_window(0, 9), 2);
    assert_eq!(m.group_table(0, 1)[0], NULL_BLOCK);
    assert_eq!(m.group_table(0, 2)[0], NULL_BLOCK);
    assert_ne!(m.group_table(0, 0)[0], NULL_BLOCK, "the full group keeps every block");
    // Releasing again, or at an earlier position, frees nothing more.
    assert_eq!(m.release_outside_window(0, 9), 0);
    assert_eq!(m.release_outside_window(0, 2), 0);
    m.audit().unwrap();
    // The released positions have no slot in a windowed group, the live ones do.
    let mut slots = Vec::new();
    assert!(matches!(m.extend_slot_mapping(0, 1, 0, 2, &mut slots), Err(BlockError::NoSlot { .. })));
    m.extend_slot_mapping(0, 1, 9, 1, &mut slots).unwrap();
    assert_eq!(slots, vec![m.group_table(0, 1)[2] * 4 + 1]);
    // Growing keeps the tables the same length, released entries included.
    m.allocate(0, &[], 30).unwrap();
    assert!((0..3).all(|g| m.group_table(0, g).len() == 8));
    assert_eq!(m.release_outside_window(0, 29), 2 * 5, "blocks 1..6 of both windowed groups");
    assert_eq!(m.num_used_blocks(), 8 + 2 * 2);
    m.audit().unwrap();
    // Freeing the sequence returns the rest; nothing leaks, the null block stays reserved.
    m.free(0).unwrap();
    assert_eq!(m.num_free_blocks(), m.num_usable_blocks());
    m.audit().unwrap();
}

#[test]
fn windowed_groups_hold_a_window_and_a_chunk_at_most() {
    let m = windowed(400, 16, 1, 5, 512);
    // 4096 tokens: 256 blocks for the full group; a windowed group at most (511 + 256) / 16
    // rounded up, plus one.
    assert_eq!(m.blocks_to_hold(4096, 256), 256 + 5 * 49);
    assert_eq!(m.blocks_to_hold(100, 256), 6 * 7, "short sequences hold everything in every group");
    assert_eq!(m.num_blocks_to_admit(0, 4096, &[], 256), 256 + 5 * 49);
    // Without windows admission counts every block, as allocation does.
    let plain = bm(400, 16, false);
    assert_eq!(plain.num_blocks_to_admit(0, 4096, &[], 256), 256);
    assert_eq!(plain.blocks_to_hold(4096, 256), 256);
}

#[test]
fn windowed_groups_refuse_empty_windows() {
    let cfg = |window| BlockManagerConfig {
        num_blocks: 10,
        block_size: 4,
        enable_prefix_caching: true,
        watermark_blocks: 0,
        kv_groups: KvGroups { full: 1, windowed: 1, window },
    };
    assert!(matches!(BlockManager::new(cfg(0)), Err(BlockError::InvalidConfig(_))));
    assert!(BlockManager::new(cfg(8)).is_ok());
}

#[test]
fn windowed_prefix_hits_need_the_window_blocks_the_next_query_sees() {
    // One full group and one window group, window 6, blocks of 4.
    let mut m = BlockManager::new(BlockManagerConfig {
        num_blocks: 40,
        block_size: 4,
        enable_prefix_caching: true,
        watermark_blocks: 0,
        kv_groups: KvGroups { full: 1, windowed: 1, window: 6 },
    })
    .unwrap();
    let a: Vec<u32> = (0..21).collect();
    let ha = hashes(&a, 4);
    m.allocate(0, &[], 21).unwrap();
    m.cache_full_blocks(0, &ha, 21);
    // Five full blocks cached in both groups: a 21-token prompt may reuse all five (20 tokens).
    let hit = m.lookup_prefix(&ha, 21);
    assert_eq!(m.prefix_blocks(&hit), 5);
    assert_eq!(&hit[..5], m.group_table(0, 0)[..5].to_vec().as_slice());
    // The query at 20 sees keys 15..=20: the window group needs blocks 3 and 4 only.
    assert_eq!(&hit[5..], &[NULL_BLOCK, NULL_BLOCK, NULL_BLOCK, m.group_table(0, 1)[3], m.group_table(0, 1)[4]]);
    // Release the window group's old blocks (as a step at 20 would): they stay cached and
    // free, so a hit revives them and costs free blocks.
    m.release_outside_window(0, 20);
    m.free(0).unwrap();
    let hit = m.lookup_prefix(&ha, 21);
    assert_eq!(m.prefix_blocks(&hit), 5);
    assert_eq!(m.num_blocks_to_allocate(1, 21, &hit), 2 + 5 + 2, "a fresh block a group, and seven revived");
    m.allocate(1, &hit, 21).unwrap();
    assert_eq!(m.group_table(1, 1)[..3], [NULL_BLOCK; 3]);
    m.audit().unwrap();
    // A window group missing a block the next query needs shortens the hit, though the full
    // group keeps every block: a sequence holds its full blocks, its old window blocks are
    // released (cached, free), then taking every free block evicts them.
    m.free(1).unwrap();
    let hit = m.lookup_prefix(&ha, 21);
    m.allocate(3, &hit, 21).unwrap();
    assert_eq!(m.group_table(3, 0)[..5], hit[..5], "the full group holds the cached blocks");
    // A 13-token prompt: 3 blocks, whose next query (at 12) sees window blocks 1 and 2.
    assert_eq!(m.prefix_blocks(&m.lookup_prefix(&ha, 13)), 3);
    let free = m.num_free_blocks();
    m.allocate(4, &[], free / 2 * 4).unwrap();
    assert!(m.num_free_blocks() <= 1);
    assert_eq!(m.prefix_blocks(&m.lookup_prefix(&ha, 13)), 0, "window blocks 0..3 are gone");
    m.audit().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Windowed groups under random growth, releases and frees: the invariants hold after every
    /// operation, a windowed group never holds more than its window and the last growth, every
    /// position a query can still see has a live slot, and nothing leaks.
    #[test]
    fn windowed_invariants_hold_under_random_ops(
        ops in prop::collection::vec((0u32..4, 1usize..12, any::<bool>()), 1..80),
        bs in 1usize..6, window in 1usize..20, full in 1usize..3, win_groups in 1usize..4, caching: bool,
    ) {
        let mut m = BlockManager::new(BlockManagerConfig {
            num_blocks: 200,
            block_size: bs,
            enable_prefix_caching: caching,
            watermark_blocks: 0,
            kv_groups: KvGroups { full, windowed: win_groups, window },
        })
        .unwrap();
        let groups = full + win_groups;
        // Every sequence's tokens are 0, 1, 2, ...: prefixes hit across sequences.
        let toks: Vec<u32> = (0..2000).collect();
        let mut len = [0usize; 4];
        for (seq, n, free) in ops {
            let s = seq as usize;
            if free {
                prop_assert_eq!(m.free(seq).is_ok(), len[s] > 0);
                len[s] = 0;
            } else if len[s] == 0 {
                // A new sequence of n + 30 tokens: reuse what the cache has, then compute the rest.
                let t = &toks[..n + 30];
                let h = hashes(t, bs);
                let hit = m.lookup_prefix(&h, t.len());
                let k = m.prefix_blocks(&hit);
                prop_assert_eq!(hit.len(), k * groups);
                let need = m.num_blocks_to_allocate(seq, t.len(), &hit);
                let free_before = m.num_free_blocks();
                if m.allocate(seq, &hit, t.len()).is_ok() {
                    prop_assert_eq!(free_before - m.num_free_blocks(), need);
                    // Every block the next query (at k * bs) sees is live in every group.
                    let first_seen = (k * bs + 1).saturating_sub(window);
                    for g in 0..groups {
                        let lo = if g >= full { first_seen / bs } else { 0 };
                        prop_assert!(m.group_table(seq, g)[lo..].iter().all(|&b| b != NULL_BLOCK));
                    }
                    m.cache_full_blocks(seq, &h, t.len());
                    len[s] = t.len();
                }
            } else {
                // A step computing n tokens from len: release first, as the scheduler does.
                m.release_outside_window(seq, len[s]);
                if m.allocate(seq, &[], len[s] + n).is_ok() {
                    m.cache_full_blocks(seq, &hashes(&toks[..len[s] + n], bs), len[s] + n);
                    let first_seen = (len[s] + 1).saturating_sub(window);
                    for g in 0..full + win_groups {
                        let mut slots = Vec::new();
                        m.extend_slot_mapping(seq, g, first_seen, len[s] + n - first_seen, &mut slots).unwrap();
                        prop_assert!(slots.iter().all(|&sl| sl as usize / bs != NULL_BLOCK as usize));
                        let live = m.group_table(seq, g).iter().filter(|&&b| b != NULL_BLOCK).count();
                        if g >= full {
                            // The window, this step's tokens, and a block of misalignment at
                            // each end (a sequence admitted with a cached prefix holds its
                            // first step's worth).
                            prop_assert!(live <= (window - 1 + n.max(30)).div_ceil(bs) + 1, "{} live blocks", live);
                        }
                    }
                    len[s] += n;
                }
            }
            if let Err(e) = m.audit() { prop_assert!(false, "{}", e); }
        }
        for (seq, &l) in len.iter().enumerate() {
            if l > 0 { m.free(seq as u32).unwrap(); }
        }
        prop_assert_eq!(m.num_free_blocks(), m.num_usable_blocks());
    }
}
