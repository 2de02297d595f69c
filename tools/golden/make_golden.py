#!/usr/bin/env python3
"""Golden fixtures for weave's CPU backend: an independent reference of SmolLM2 on its GGUF.

- Token ids come from llama.cpp's tokenizer (`llama-tokenize`), a separate implementation of
  the GGUF's BPE and its "smollm" pre-tokenizer.
- Logits and greedy continuations come from a plain numpy (float64) Llama forward written
  from the architecture's definition: weights dequantized by the `gguf` package, Q/K rows
  un-permuted back to Hugging Face order and rotated with the half-split ("neox") rotary,
  as transformers does when it loads a GGUF; the full sequence is recomputed at every step.

Usage:
  python3 tools/golden/make_golden.py --model ~/.cache/weave/models/SmolLM2-135M-Instruct.Q4_1.gguf \
      --llama-tokenize /path/to/llama.cpp/build/bin/llama-tokenize \
      --out tests/fixtures/golden_smollm2.json
Needs: pip install numpy gguf jinja2.
"""
import argparse, ast, hashlib, json, subprocess
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

PROMPTS = [
    ("short", "The capital of France is", False),
    ("long", "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
             "combined movable metal type, oil-based inks and a wooden press adapted from wine making. "
             "Within a few decades presses had spread to more than two hundred cities across Europe, and "
             "the cost of books fell sharply. Historians argue that this change made possible the rapid "
             "spread of new ideas during the Reformation and the Scientific Revolution, because", False),
    ("chat", "What is the tallest mountain in the world?", True),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False),
    ("non_ascii", "Le café était délicieux à Zürich, puis nous sommes allés à 東京. Ensuite,", False),
]
N_GREEDY = 24
TOP = 32


def field(r, key):
    f = r.fields[key]
    return f.contents()


def load(path):
    r = GGUFReader(path)
    t = {x.name: x for x in r.tensors}
    W = lambda n: dequantize(t[n].data, t[n].tensor_type).astype(np.float64).reshape(
        [int(d) for d in reversed(t[n].shape)])
    cfg = dict(
        L=int(field(r, "llama.block_count")), H=int(field(r, "llama.embedding_length")),
        nh=int(field(r, "llama.attention.head_count")), nkv=int(field(r, "llama.attention.head_count_kv")),
        theta=float(field(r, "llama.rope.freq_base")), eps=float(field(r, "llama.attention.layer_norm_rms_epsilon")),
        template=field(r, "tokenizer.chat_template"),
    )
    cfg["hd"] = cfg["H"] // cfg["nh"]
    layers = []
    for i in range(cfg["L"]):
        p = f"blk.{i}."
        layers.append({k: W(p + k + ".weight") for k in
                       ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]})
    emb = W("token_embd.weight")
    return cfg, layers, emb, W("output_norm.weight")


def unpermute(x, n_heads, hd):
    """GGUF (llama.cpp) stores each head's rows as [hd/2][2]; Hugging Face order is [2][hd/2]."""
    T = x.shape[0]
    return x.reshape(T, n_heads, hd // 2, 2).swapaxes(2, 3).reshape(T, n_heads, hd)


def rope_neox(x, pos, theta):
    hd = x.shape[-1]
    inv = theta ** (-np.arange(0, hd // 2) * 2.0 / hd)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def forward(model, ids):
    cfg, layers, emb, onorm = model
    nh, nkv, hd, eps = cfg["nh"], cfg["nkv"], cfg["hd"], cfg["eps"]
    T = len(ids)
    pos = np.arange(T, dtype=np.float64)
    x = emb[ids]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in layers:
        h = rmsnorm(x, l["attn_norm"], eps)
        q = rope_neox(unpermute(h @ l["attn_q"].T, nh, hd), pos, cfg["theta"])
        k = rope_neox(unpermute(h @ l["attn_k"].T, nkv, hd), pos, cfg["theta"])
        v = (h @ l["attn_v"].T).reshape(T, nkv, hd)
        out = np.zeros((T, nh, hd))
        for head in range(nh):
            kv = head // (nh // nkv)
            s = q[:, head] @ k[:, kv].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + out.reshape(T, nh * hd) @ l["attn_output"].T
        h = rmsnorm(x, l["ffn_norm"], eps)
        g = h @ l["ffn_gate"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ l["ffn_up"].T)) @ l["ffn_down"].T
    return rmsnorm(x[-1:], onorm, eps) @ emb.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--llama-tokenize", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    model = load(a.model)
    import jinja2
    tmpl = jinja2.Environment().from_string(model[0]["template"])
    sha = hashlib.sha256(open(a.model, "rb").read()).hexdigest()
    out = {"model_sha256": sha, "n_greedy": N_GREEDY, "top": TOP, "prompts": []}
    for name, text, chat in PROMPTS:
        full = tmpl.render(messages=[{"role": "user", "content": text}], add_generation_prompt=True) if chat else text
        res = subprocess.run([a.llama_tokenize, "-m", a.model, "-p", full, "--ids", "--log-disable"],
                             capture_output=True, text=True, check=True)
        ids = ast.literal_eval(res.stdout.strip().splitlines()[-1])
        seq = list(ids)
        first = None
        for _ in range(N_GREEDY):
            logits = forward(model, np.array(seq))[0]
            if first is None:
                first = logits
            seq.append(int(np.argmax(logits)))
        top = np.argsort(-first)[:TOP]
        out["prompts"].append({
            "name": name, "text": text, "chat": chat, "prompt_ids": ids, "greedy": seq[len(ids):],
            "top_ids": [int(i) for i in top], "top_logits": [float(first[i]) for i in top],
        })
        print(name, len(ids), "tokens ->", seq[len(ids):][:10], "...")
    json.dump(out, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
