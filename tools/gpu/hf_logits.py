#!/usr/bin/env python3
"""weave's logits against transformers' on the same GGUF weights (issue 10's third reference).

    weave logits --model M.gguf --device cuda --prompt "The capital of France is" --out weave.json
    python3 tools/gpu/hf_logits.py M.gguf weave.json [weave-cpu.json ...]

transformers reads the GGUF through the `gguf` package (dequantized to float32), runs the same
prompt token ids that weave ran (taken from nothing but the tokenizer in the GGUF: the ids are
re-encoded here and checked against weave's first greedy token's context), and greedy-decodes
as many tokens as the weave trace holds. For each weave trace it prints the first step's largest
logit difference, and how many greedy tokens agree (and where they part, transformers' top-2
gap). Exits 0 with a `skipped:` line when transformers, torch or gguf is missing.
"""
import json
import os
import sys


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    gguf_path, traces = sys.argv[1], sys.argv[2:]
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as e:
        print(f"skipped: transformers' reference needs torch, transformers and gguf ({e})")
        return
    d, f = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).to(dev).eval()
    for path in traces:
        t = json.load(open(path))
        prompt = t.get("prompt")
        ids = t.get("prompt_ids")
        if ids is None:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids], device=dev)
        ours = t["tokens"]
        theirs, gaps, first = [], [], None
        with torch.no_grad():
            for step in range(len(ours)):
                logits = model(x).logits[0, -1].float()
                if step == 0:
                    first = logits.cpu()
                top = torch.topk(logits, 2)
                theirs.append(int(top.indices[0]))
                gaps.append(float(top.values[0] - top.values[1]))
                x = torch.cat([x, top.indices[:1].view(1, 1)], dim=1)
        w = torch.tensor(t["first_logits"])
        n = min(len(w), len(first))
        diff = float((w[:n] - first[:n]).abs().max())
        part = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        line = f"{path} ({t.get('device')}) vs transformers (f32, {dev}): first step max |diff| {diff:.4f}; greedy equal for "
        if part is None:
            line += f"{len(ours)}/{len(ours)}"
        else:
            line += f"{part}/{len(ours)}; at step {part} transformers' top-2 gap is {gaps[part]:.4f}"
        print(line)


if __name__ == "__main__":
    main()
