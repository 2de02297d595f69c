//! `weave bench kernels`: the paged attention kernel timed on the GPU over the shapes of the
//! kernels issue (decode at 1 to 256 sequences over contexts of 512 to 8192, prefill chunks of
//! 128 to 4096 tokens, and a mixed batch), against the device's copy bandwidth and GEMM rate
//! measured in the same run, and against PyTorch's `scaled_dot_product_attention` (its
//! FlashAttention-2 and cuDNN backends) where Python with PyTorch is there.
//!
//! The shapes, their paged layouts and their byte and FLOP counts are plain data, built and
//! tested on any machine; only [`run`] needs a GPU.

use serde::{Deserialize, Serialize};

/// What a shape exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Decode,
    Prefill,
    Mixed,
}

/// One attention launch's shape: heads, and each sequence's query tokens and the context
/// cached before them (causal within the chunk, as the kernel always is).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelShape {
    pub name: String,
    pub kind: Kind,
    pub num_q_heads: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    /// `(query tokens, cached context)` per sequence.
    pub seqs: Vec<(u32, u32)>,
}

impl KernelShape {
    fn new(name: String, kind: Kind, heads: (u32, u32, u32), seqs: Vec<(u32, u32)>) -> KernelShape {
        KernelShape { name, kind, num_q_heads: heads.0, num_kv_heads: heads.1, head_dim: heads.2, seqs }
    }

    pub fn num_tokens(&self) -> u32 {
        self.seqs.iter().map(|s| s.0).sum()
    }

    /// The longest sequence (context and chunk).
    pub fn max_seq_len(&self) -> u32 {
        self.seqs.iter().map(|s| s.0 + s.1).max().unwrap_or(0)
    }

    /// Bytes a launch must move at least: each sequence's K and V once per KV head (its
    /// context and its chunk), the queries read and the output written, at `elem` bytes a value.
    pub fn bytes(&self, elem: usize) -> f64 {
        let (nq, nkv, d) = (self.num_q_heads as f64, self.num_kv_heads as f64, self.head_dim as f64);
        let kv: f64 = self.seqs.iter().map(|&(q, c)| (q + c) as f64).sum::<f64>() * 2.0 * nkv * d;
        let qo = 2.0 * self.num_tokens() as f64 * nq * d;
        (kv + qo) * elem as f64
    }

    /// FLOPs of the causal attention: each query row scores and sums its visible keys
    /// (`2d` for QK^T and `2d` for PV per key).
    pub fn flops(&self) -> f64 {
        let per_key = 4.0 * self.head_dim as f64 * self.num_q_heads as f64;
        self.seqs
            .iter()
            .map(|&(q, c)| {
                // Row i sees c + i + 1 keys.
                let (q, c) = (q as f64, c as f64);
                q * c + q * (q + 1.0) / 2.0
            })
            .sum::<f64>()
            * per_key
    }

    /// Whether every sequence brings one token.
    pub fn decode_only(&self) -> bool {
        self.seqs.iter().all(|s| s.0 == 1)
    }
}

/// The shapes timed: the kernels issue's table and its sweep. `quick` keeps one context per
/// decode batch size and the smaller prefills.
pub fn shapes(quick: bool) -> Vec<KernelShape> {
    let llama = (32, 8, 128);
    let mut v = Vec::new();
    let contexts: &[u32] = if quick { &[2048] } else { &[512, 1024, 2048, 4096, 8192] };
    for &n in &[1u32, 8, 64, 256] {
        for &ctx in contexts {
            // A decode row at position ctx - 1 sees ctx keys.
            v.push(KernelShape::new(format!("decode {n}x{ctx}"), Kind::Decode, llama, vec![(1, ctx - 1); n as usize]));
        }
    }
    v.push(KernelShape::new("decode smollm2 256x1024".into(), Kind::Decode, (9, 3, 64), vec![(1, 1023); 256]));
    let chunks: &[u32] = if quick { &[128, 512] } else { &[128, 512, 1024, 4096] };
    for &c in chunks {
        v.push(KernelShape::new(format!("prefill 1x{c}"), Kind::Prefill, llama, vec![(c, 0)]));
    }
    v.push(KernelShape::new("prefill 8x512".into(), Kind::Prefill, llama, vec![(512, 0); 8]));
    // Mixed: a 512-token chunk at context 1536 beside 255 decodes at 2048, and its two halves
    // alone (the mixed launch should take no longer than the two added).
    let chunk = (512, 1536);
    let decodes = vec![(1, 2047); 255];
    let mut mixed = vec![chunk];
    mixed.extend(&decodes);
    v.push(KernelShape::new("mixed 512@1536 + 255x2048".into(), Kind::Mixed, llama, mixed));
    v.push(KernelShape::new("  its chunk alone".into(), Kind::Prefill, llama, vec![chunk]));
    v.push(KernelShape::new("  its decodes alone".into(), Kind::Decode, llama, decodes));
    v
}

/// A shape's paged batch: query offsets, cached contexts, and block tables whose physical
/// blocks are shuffled over the cache (as after a server's churn), block 0 left as the null
/// block.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub query_start_loc: Vec<u32>,
    pub context_lens: Vec<u32>,
    pub block_tables: Vec<u32>,
    pub max_blocks_per_seq: u32,
    /// Blocks the cache needs, the null block included.
    pub num_blocks: u32,
}

pub fn layout(s: &KernelShape, block_size: u32, seed: u64) -> Layout {
    let per_seq: Vec<u32> = s.seqs.iter().map(|&(q, c)| (q + c).div_ceil(block_size)).collect();
    let max_b = per_seq.iter().copied().max().unwrap_or(1).max(1);
    let total: u32 = per_seq.iter().sum();
    // Fisher-Yates over 1..=total with a fixed stream.
    let mut phys: Vec<u32> = (1..=total).collect();
    let mut r = crate::sampling::Rng::new(seed);
    for i in (1..phys.len()).rev() {
        let j = (r.next_u64() % (i as u64 + 1)) as usize;
        phys.swap(i, j);
    }
    let mut tables = vec![0u32; s.seqs.len() * max_b as usize];
    let mut next = 0;
    for (i, &b) in per_seq.iter().enumerate() {
        for j in 0..b as usize {
            tables[i * max_b as usize + j] = phys[next];
            next += 1;
        }
    }
    let mut qsl = vec![0u32];
    for &(q, _) in &s.seqs {
        qsl.push(qsl.last().unwrap() + q);
    }
    Layout {
        query_start_loc: qsl,
        context_lens: s.seqs.iter().map(|&(_, c)| c).collect(),
        block_tables: tables,
        max_blocks_per_seq: max_b,
        num_blocks: total + 1,
    }
}

/// One timed launch configuration of one shape.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub shape: String,
    pub kind: Kind,
    /// The kernel and split choice timed, e.g. `split auto (8 blocks)`.
    pub variant: String,
    /// Median of the timed launches.
    pub us: f64,
    /// Bytes over time (K, V, Q read and the output written), TB/s.
    pub tb_s: f64,
    pub tflop_s: f64,
    /// Of the measured ceiling: copy bandwidth for decode, GEMM rate otherwise.
    pub roofline_share: f64,
    /// PyTorch SDPA on the same shape, where it ran: FlashAttention-2 and cuDNN (µs).
    pub torch_flash_us: Option<f64>,
    pub torch_cudnn_us: Option<f64>,
}

impl Row {
    /// The best PyTorch time over weave's (above 1: weave is faster).
    pub fn speed_vs_torch(&self) -> Option<f64> {
        let best = match (self.torch_flash_us, self.torch_cudnn_us) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(best / self.us)
    }
}

/// The table `weave bench kernels` prints.
pub fn table(rows: &[Row], copy_gbs: f64, gemm_tflops: f64) -> String {
    let mut out = format!(
        "ceilings measured in this run: copy {:.0} GB/s (read + write), bf16 GEMM {:.0} TFLOP/s\n",
        copy_gbs, gemm_tflops
    );
    out += &format!(
        "{:<28} {:<24} {:>10} {:>7} {:>8} {:>9} {:>9} {:>9} {:>8}\n",
        "shape", "variant", "us", "TB/s", "TFLOP/s", "of roof", "FA2 us", "cuDNN us", "vs torch"
    );
    let opt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.0}"));
    for r in rows {
        out += &format!(
            "{:<28} {:<24} {:>10.1} {:>7.2} {:>8.1} {:>8.0}% {:>9} {:>9} {:>8}\n",
            r.shape,
            r.variant,
            r.us,
            r.tb_s,
            r.tflop_s,
            100.0 * r.roofline_share,
            opt(r.torch_flash_us),
            opt(r.torch_cudnn_us),
            r.speed_vs_torch().map_or("-".to_string(), |x| format!("{x:.2}x")),
        );
    }
    out
}

/// What `tools/gpu/sdpa_bench.py` prints for one shape (µs; `None` where a backend refused).
#[derive(Debug, Clone, Deserialize)]
pub struct TorchResult {
    pub name: String,
    pub flash_us: Option<f64>,
    pub cudnn_us: Option<f64>,
}

/// Runs `script` (PyTorch SDPA on `shapes`) and reads its results; `Err` says why not.
pub fn torch_baseline(
    script: &std::path::Path,
    shapes: &[KernelShape],
    dtype: &str,
) -> Result<Vec<TorchResult>, String> {
    let dir = std::env::temp_dir().join(format!("weave-sdpa-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let input = dir.join("shapes.json");
    std::fs::write(&input, serde_json::to_string(shapes).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg("--shapes")
        .arg(&input)
        .args(["--dtype", dtype])
        .output()
        .map_err(|e| format!("cannot run python3 {}: {e}", script.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        ));
    }
    text.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{}: bad line {l:?}: {e}", script.display())))
        .collect()
}

/// Times every shape of `shapes` on the GPU (`dtype` f16 or bf16): `iters` launches after
/// three warm-ups, each between two CUDA events, the median kept. Decode shapes run without a
/// split and with the split the CUDA backend would choose; the others without.
pub fn run(
    k: &crate::backends::cuda::Kernels,
    shapes: &[KernelShape],
    dtype: weave_kernels_gpu::Dtype,
    iters: usize,
    copy_gbs: f64,
    gemm_tflops: f64,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Row>, crate::backends::cuda::CudaError> {
    use weave_kernels_gpu::{Bf16, Dtype, F16};
    let mut rows = Vec::new();
    for s in shapes {
        progress(&s.name);
        let rs = match dtype {
            Dtype::F16 => time_shape::<F16>(k, s, iters, copy_gbs, gemm_tflops)?,
            _ => time_shape::<Bf16>(k, s, iters, copy_gbs, gemm_tflops)?,
        };
        rows.extend(rs);
    }
    Ok(rows)
}

fn time_shape<T: crate::backends::cuda::DevElem>(
    k: &crate::backends::cuda::Kernels,
    s: &KernelShape,
    iters: usize,
    copy_gbs: f64,
    gemm_tflops: f64,
) -> Result<Vec<Row>, crate::backends::cuda::CudaError> {
    use crate::backends::cuda::{AttnKernel, AttnMeta};
    use weave_kernels_gpu::attention::{choose_blocks_per_split, AttnShape, MAX_SPLITS};
    let bs = 16u32;
    let lay = layout(s, bs, 7);
    let (nq, nkv, d) = (s.num_q_heads, s.num_kv_heads, s.head_dim);
    let n = s.num_tokens() as usize;
    let elem = std::mem::size_of::<T::Bits>();
    // Values from the dummy stream, made on the device: the caches reach gigabytes.
    let mut q = k.zeros::<T::Bits>(n * (nq * d) as usize)?;
    let mut kc = k.zeros::<T::Bits>((lay.num_blocks * bs * nkv * d) as usize)?;
    let mut vc = k.zeros::<T::Bits>((lay.num_blocks * bs * nkv * d) as usize)?;
    k.fill_dummy::<T>(&mut q, 1, 1.0)?;
    k.fill_dummy::<T>(&mut kc, 2, 1.0)?;
    k.fill_dummy::<T>(&mut vc, 3, 1.0)?;
    let mut out = k.zeros::<T::Bits>(n * (nq * d) as usize)?;
    let base = AttnShape {
        num_q_heads: nq,
        num_kv_heads: nkv,
        head_dim: d,
        block_size: bs,
        max_blocks_per_seq: lay.max_blocks_per_seq,
        blocks_per_split: 0,
        scale: 1.0 / (d as f32).sqrt(),
    };
    let tq = base.tokens_per_tile();
    let qsl_d = k.upload(&lay.query_start_loc)?;
    let (ctx_d, tables_d) = (k.upload(&lay.context_lens)?, k.upload(&lay.block_tables)?);
    let max_seq_len = s.max_seq_len();
    let mut splits = vec![("no split".to_string(), 0u32)];
    if s.decode_only() {
        let bps = choose_blocks_per_split(s.seqs.len() as u32, nkv, lay.max_blocks_per_seq, k.num_sms);
        if bps > 0 {
            splits.push((format!("split {bps}"), bps));
        }
    }
    // Each split choice with each CUDA-core kernel; the tensor-core one where there are chunks.
    let mut variants: Vec<(String, u32, AttnKernel)> = splits
        .iter()
        .flat_map(|(name, bps)| {
            [(AttnKernel::Staged, "staged"), (AttnKernel::Pipelined, "pipelined")]
                .map(|(kind, kn)| (format!("{kn}, {name}"), *bps, kind))
        })
        .collect();
    if !s.decode_only() && AttnKernel::mma_ok(T::DTYPE, bs) {
        variants.push(("tensor cores (+ staged decode)".into(), 0, AttnKernel::TensorCore));
    }
    if AttnKernel::mma_ok(T::DTYPE, bs) {
        // Tensor cores for chunks and the decode kernel for decode rows, with its own split
        // choice (thread blocks per query head).
        let bps = if s.decode_only() {
            choose_blocks_per_split(s.seqs.len() as u32, nq, lay.max_blocks_per_seq, k.num_sms)
        } else {
            0
        };
        let name = if bps > 0 { format!("fast, split {bps}") } else { "fast, no split".into() };
        variants.push((name, bps, AttnKernel::Fast));
    }
    let (qsl_v, ctx_v, tables_v) = (qsl_d.as_view(), ctx_d.as_view(), tables_d.as_view());
    let mut partials = k.zeros::<f32>(MAX_SPLITS as usize * n * nq as usize * (d as usize + 2))?;
    let mut rows = Vec::new();
    for (name, bps, kind) in variants {
        let shape = AttnShape { blocks_per_split: bps, ..base };
        if shape.num_splits(max_seq_len) > MAX_SPLITS {
            continue;
        }
        // The variant's tiles, as the model builds them (decode rows apart with tensor cores).
        let (small, big) = kind.tiles(T::DTYPE, bs, &lay.query_start_loc, tq);
        let up = |v: &[u32]| k.upload(if v.is_empty() { &[0, 0] } else { v });
        let (small_d, big_d) = (up(&small)?, up(&big)?);
        let (small_v, big_v) = (small_d.as_view(), big_d.as_view());
        let meta = |tiles, len: usize| AttnMeta {
            tiles,
            num_tiles: len / 2,
            query_start_loc: qsl_v,
            num_tokens: n as u32,
            context_lens: ctx_v,
            block_tables: tables_v,
        };
        let (small_m, big_m) = (meta(small_v, small.len()), meta(big_v, big.len()));
        let mut launch = || {
            k.paged_attention_split::<T>(
                kind,
                &shape,
                small_m,
                big_m,
                max_seq_len,
                &q,
                &kc,
                &vc,
                &mut out,
                &mut partials,
            )
        };
        for _ in 0..3 {
            launch()?;
        }
        let mut ts = Vec::with_capacity(iters);
        for _ in 0..iters.max(1) {
            let a = k.dev.record()?;
            launch()?;
            let b = k.dev.record()?;
            ts.push(k.dev.elapsed(&a, &b)? * 1e6);
        }
        ts.sort_by(f64::total_cmp);
        let us = ts[ts.len() / 2];
        let tb_s = s.bytes(elem) / (us * 1e-6) / 1e12;
        let tflop_s = s.flops() / (us * 1e-6) / 1e12;
        let roofline_share =
            if s.kind == Kind::Decode { tb_s * 1e3 / copy_gbs } else { tflop_s / gemm_tflops.max(1e-9) };
        rows.push(Row {
            shape: s.name.clone(),
            kind: s.kind,
            variant: name,
            us,
            tb_s,
            tflop_s,
            roofline_share,
            torch_flash_us: None,
            torch_cudnn_us: None,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_cover_the_issue_table() {
        let all = shapes(false);
        for name in ["decode 256x2048", "decode 64x4096", "decode 8x8192", "prefill 1x4096", "prefill 8x512"] {
            assert!(all.iter().any(|s| s.name == name), "{name}");
        }
        let mixed = all.iter().find(|s| s.kind == Kind::Mixed).unwrap();
        assert_eq!((mixed.num_tokens(), mixed.seqs.len()), (512 + 255, 256));
        assert!(shapes(true).len() < all.len());
    }

    #[test]
    fn bytes_and_flops_by_hand() {
        // One decode row seeing 4 keys, heads 2/1, d 64: K and V 4 x 64 each, q and out 2 x 64.
        let s = KernelShape::new("t".into(), Kind::Decode, (2, 1, 64), vec![(1, 3)]);
        assert_eq!(s.bytes(2), ((4 * 64 * 2) + 2 * 2 * 64) as f64 * 2.0);
        assert_eq!(s.flops(), 4.0 * 4.0 * 64.0 * 2.0);
        // Causal prefill of 3 tokens: 1 + 2 + 3 keys.
        let p = KernelShape::new("p".into(), Kind::Prefill, (1, 1, 64), vec![(3, 0)]);
        assert_eq!(p.flops(), 6.0 * 4.0 * 64.0);
    }

    #[test]
    fn layouts_give_each_sequence_its_own_shuffled_blocks() {
        let s = KernelShape::new("m".into(), Kind::Mixed, (4, 2, 64), vec![(40, 10), (1, 70), (1, 0)]);
        let l = layout(&s, 16, 3);
        assert_eq!(l.query_start_loc, [0, 40, 41, 42]);
        assert_eq!(l.context_lens, [10, 70, 0]);
        // 50 -> 4 blocks, 71 -> 5, 1 -> 1.
        assert_eq!((l.max_blocks_per_seq, l.num_blocks), (5, 11));
        let used: Vec<u32> = l.block_tables.iter().copied().filter(|&b| b != 0).collect();
        let mut sorted = used.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (1..=10).collect::<Vec<_>>(), "each block once");
        assert_ne!(used, sorted, "shuffled, not in order");
        assert_eq!(layout(&s, 16, 3), l, "a seed gives one layout");
    }

    #[test]
    fn the_table_prints_ratios_against_torch() {
        let r = Row {
            shape: "decode 1x512".into(),
            kind: Kind::Decode,
            variant: "no split".into(),
            us: 10.0,
            tb_s: 1.0,
            tflop_s: 0.1,
            roofline_share: 0.25,
            torch_flash_us: Some(20.0),
            torch_cudnn_us: Some(15.0),
        };
        assert_eq!(r.speed_vs_torch(), Some(1.5));
        let t = table(&[r], 4000.0, 800.0);
        assert!(t.contains("1.50x") && t.contains("25%") && t.contains("4000 GB/s"), "{t}");
    }
}
