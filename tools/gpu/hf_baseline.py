#!/usr/bin/env python3
"""The PyTorch baseline for `weave bench generate --device cuda`: transformers' `generate` on
the same model shape (random bf16 weights, as weave's `--load-format dummy`), prompt and output
lengths and batch sizes, plus the device's ceilings measured in the same run (device-to-device
copy bandwidth counting bytes read and written; an 8192^3 bf16 matmul's rate on random data).

    weave model-config llama-3-8b > /tmp/llama-3-8b.json
    python3 tools/gpu/hf_baseline.py /tmp/llama-3-8b.json --batch 1,8,64,256 --prompt-len 512 --output-len 128

Prints one JSON line per measurement and a table last. Runs on the CPU too (float32, for a
smoke test of a small shape), but its numbers are for the GPU.
"""
import argparse
import json
import statistics
import time

import torch


def timed(fn, reps, dev):
    """Median seconds of `reps` calls after one warm-up."""
    fn()
    ts = []
    for _ in range(reps):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def ceilings(dev, dtype):
    n = (1 << 29) if dev == "cuda" else (1 << 24)
    src = torch.randn(n, device=dev, dtype=dtype)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), 9, dev)
    copy_gbs = 2 * src.numel() * src.element_size() / t / 1e9
    del src, dst
    m = 8192 if dev == "cuda" else 512
    a = torch.randn(m, m, device=dev, dtype=dtype)
    b = torch.randn(m, m, device=dev, dtype=dtype)
    t = timed(lambda: a @ b, 9, dev)
    return {"copy_gbs": copy_gbs, "gemm_tflops": 2 * m**3 / t / 1e12}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("profile", help="a model shape as `weave model-config NAME` prints it")
    ap.add_argument("--batch", default="1,8,64,256")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    p = json.load(open(args.profile))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    ceil = ceilings(dev, dtype)
    print(json.dumps({"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", **ceil}), flush=True)
    cfg = LlamaConfig(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        head_dim=p["head_dim"],
        rope_theta=p["rope_theta"],
        rms_norm_eps=p["rms_eps"],
        max_position_embeddings=p["context_length"],
        tie_word_embeddings=p["tied_embeddings"],
    )
    torch.manual_seed(0)
    # Random weights made on the device, in the run's dtype (nothing crosses from the host).
    with torch.device(dev):
        torch.set_default_dtype(dtype)
        model = LlamaForCausalLM(cfg).eval()
    rows = []
    for b in [int(x) for x in args.batch.split(",")]:
        ids = torch.randint(0, p["vocab"], (b, args.prompt_len), device=dev)
        gen = lambda: model.generate(  # noqa: E731
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.output_len,
            min_new_tokens=args.output_len,
            do_sample=False,
            pad_token_id=0,
        )
        try:
            with torch.inference_mode():
                t = timed(gen, 1, dev)
        except torch.OutOfMemoryError as e:
            print(json.dumps({"batch": b, "error": f"out of memory: {e}"[:200]}), flush=True)
            torch.cuda.empty_cache()
            continue
        row = {"model": p["name"], "batch": b, "wall_s": t, "output_tok_s": b * args.output_len / t}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"transformers {p['name']} on {dev}: copy {ceil['copy_gbs']:.0f} GB/s, GEMM {ceil['gemm_tflops']:.0f} TFLOP/s")
    print(f"{'batch':>6} {'wall s':>8} {'output tok/s':>13}")
    for r in rows:
        print(f"{r['batch']:>6} {r['wall_s']:>8.2f} {r['output_tok_s']:>13.1f}")


if __name__ == "__main__":
    main()
