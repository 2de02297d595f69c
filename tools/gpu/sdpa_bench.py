#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention on the shapes `weave bench kernels` times.

Reads the shapes (JSON from `weave bench kernels --dry-run`, or the file weave writes when it
runs this script), and for each prints one JSON line: {"name", "flash_us", "cudnn_us"}, the
median of the timed calls with FlashAttention-2 and with cuDNN, contiguous KV, GQA through
`enable_gqa` (heads repeated when a backend refuses it, which the line says). A backend that
refuses a shape gets null. Shapes whose sequences differ in length, or whose chunks sit on a
cached context, are not timed (SDPA has no varlen or paged form): their lines have nulls.
"""
import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", required=True)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        sys.exit("no CUDA device for PyTorch")
    dt = getattr(torch, a.dtype)
    shapes = json.load(open(a.shapes))
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name()}", file=sys.stderr)

    def time_us(fn):
        for _ in range(3):
            fn()
        ts = []
        for _ in range(a.iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) * 1e3)
        ts.sort()
        return ts[len(ts) // 2]

    for sh in shapes:
        out = {"name": sh["name"], "flash_us": None, "cudnn_us": None}
        seqs = sh["seqs"]
        same = all(tuple(s) == tuple(seqs[0]) for s in seqs)
        q_len, ctx = seqs[0]
        # Decode (one row seeing every key) or a prefill from position 0 (causal, aligned).
        if not same or (q_len > 1 and ctx > 0):
            print(json.dumps(out), flush=True)
            continue
        b, nq, nkv, d = len(seqs), sh["num_q_heads"], sh["num_kv_heads"], sh["head_dim"]
        kv_len = q_len + ctx
        q = torch.randn(b, nq, q_len, d, device="cuda", dtype=dt)
        k = torch.randn(b, nkv, kv_len, d, device="cuda", dtype=dt)
        v = torch.randn(b, nkv, kv_len, d, device="cuda", dtype=dt)
        causal = q_len > 1
        for key, backend in (("flash_us", SDPBackend.FLASH_ATTENTION), ("cudnn_us", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    out[key] = time_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True))
            except Exception as e:  # the backend refused GQA or the shape: repeat the heads
                try:
                    kr = k.repeat_interleave(nq // nkv, dim=1)
                    vr = v.repeat_interleave(nq // nkv, dim=1)
                    with sdpa_kernel(backend):
                        out[key] = time_us(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=causal))
                    out[key.replace("_us", "_note")] = "heads repeated (no enable_gqa)"
                except Exception as e2:
                    out[key.replace("_us", "_error")] = f"{type(e2).__name__}: {str(e2)[:120]}"
        print(json.dumps(out), flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
