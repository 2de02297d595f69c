//! Cost of one scheduler step (`schedule()` + `update()`) in a steady state with `running`
//! decoding requests and 1000 waiting; finished requests are replaced so the load holds.
//! Also one block allocate + free. Compare with vLLM's Python scheduler (~3 ms per such
//! step on a 2-core machine): `cargo bench -p weave-scheduler`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::time::{Duration, Instant};
use weave_block_manager::{extend_block_hashes, BlockManager, BlockManagerConfig};
use weave_scheduler::{NewRequest, ScheduledBatch, Scheduler, SchedulerConfig, StepOutput};

const WAITING: usize = 1000;
const PROMPT: usize = 512;
const MAX_TOKENS: usize = 256;

struct Load {
    s: Scheduler,
    next_id: u64,
    batch: ScheduledBatch,
    out: StepOutput,
}

impl Load {
    fn new(running: usize) -> Self {
        let blocks_per_req = (PROMPT + MAX_TOKENS).div_ceil(16);
        let cfg = SchedulerConfig {
            max_num_seqs: running,
            max_num_batched_tokens: 8192,
            num_gpu_blocks: running * blocks_per_req + 64,
            max_model_len: 4096,
            ..Default::default()
        };
        let mut l = Load {
            s: Scheduler::new(cfg).unwrap(),
            next_id: 0,
            batch: ScheduledBatch::default(),
            out: StepOutput::default(),
        };
        l.fill();
        // Warm up until every running slot is decoding.
        for _ in 0..(running * PROMPT / 8192 + 4) {
            l.step();
        }
        l
    }
    fn fill(&mut self) {
        while self.s.num_waiting() < WAITING {
            let id = self.next_id;
            self.next_id += 1;
            // Staggered lengths so finishes (and admissions) spread over steps.
            let max_tokens = MAX_TOKENS / 2 + (id as usize * 37) % (MAX_TOKENS / 2);
            let prompt = (0..PROMPT as u32).map(|i| id as u32 * 4096 + i).collect();
            self.s.add_request(NewRequest::new(id, prompt, max_tokens)).unwrap();
        }
    }
    /// One step; returns the time of schedule + update only.
    fn step(&mut self) -> Duration {
        let t = Instant::now();
        self.s.schedule_into(&mut self.batch);
        self.out.sampled.clear();
        self.out.sampled.resize(self.batch.logits_indices.len(), 1);
        let u = self.s.update(&self.out).unwrap();
        let dt = t.elapsed();
        if !u.finished.is_empty() {
            self.fill();
        }
        dt
    }
}

fn bench_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("schedule_update");
    g.measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    for running in [32, 64, 128, 256, 512] {
        let mut load = Load::new(running);
        assert_eq!(load.s.num_running(), running);
        g.bench_with_input(BenchmarkId::new("running", running), &running, |b, _| {
            b.iter_custom(|iters| (0..iters).map(|_| load.step()).sum())
        });
    }
    g.finish();
}

fn bench_blocks(c: &mut Criterion) {
    let mut g = c.benchmark_group("block_manager");
    g.measurement_time(Duration::from_secs(3)).sample_size(30);
    for caching in [false, true] {
        let cfg = BlockManagerConfig {
            num_blocks: 4096,
            block_size: 16,
            enable_prefix_caching: caching,
            watermark_blocks: 0,
            kv_groups: Default::default(),
        };
        let mut m = BlockManager::new(cfg).unwrap();
        let tokens: Vec<u32> = (0..512).collect();
        let mut hashes = Vec::new();
        extend_block_hashes(&mut hashes, &tokens, 16);
        let name = if caching { "alloc_free_32_blocks_cached" } else { "alloc_free_32_blocks" };
        g.bench_function(name, |b| {
            b.iter(|| {
                let hit = m.lookup_prefix(&hashes, tokens.len());
                m.allocate(1, &hit, tokens.len()).unwrap();
                m.cache_full_blocks(1, &hashes, tokens.len());
                m.free(1).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_step, bench_blocks);
criterion_main!(benches);
