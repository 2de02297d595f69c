#!/usr/bin/env bash
# Runs on the lent GPU machine (see tools/gpu/prepare.sh). Logs go to $OUT.
#   part1:  keeps the first half of the model in /tmp for the next call.
#   all:    the kernel tests, then the CUDA backend against the CPU backend on the same
#           prompts (greedy tokens, first divergence), and a first timing of SmolLM2 and of a
#           dummy llama-3-8b with --profile.
#   bench:  issue 10's speed proof: `weave bench generate --device cuda` (prompt 512, output
#           128, concurrency 1/8/64/256, with the ceilings and the decode roofline) on SmolLM2
#           and a dummy llama-3-8b, then transformers' generate on the same shapes.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/weave-out}"; mkdir -p "$OUT"
if [ "${1:-all}" = part1 ]; then cp target/gpu/model.part-aa /tmp/ && cp target/gpu/weave target/gpu/cuda_kernels /tmp/; echo "part 1 kept"; exit 0; fi
W=/tmp/weave; [ -x target/gpu/weave ] && W=target/gpu/weave
if [ "${1:-all}" = bench ]; then
  M=/tmp/weave-model.gguf; export WEAVE_PTX_DIR="$PWD/target/ptx"
  B="bench generate --device cuda --concurrency 1,8,64,256 --prompt-len 512 --output-len 128 --repeat 1 --max-num-batched-tokens 8192"
  [ -f "$M" ] && timeout 300 "$W" $B --model "$M" 2>&1 | tail -14 | tee "$OUT/bench-smollm2.txt"
  timeout 420 "$W" $B --load-format dummy --model-config llama-3-8b 2>&1 | tail -14 | tee "$OUT/bench-llama3-8b.txt"
  for m in smollm2-135m llama-3-8b; do
    "$W" model-config $m > "/tmp/$m.json"
    timeout 420 python3 tools/gpu/hf_baseline.py "/tmp/$m.json" --batch 1,8,64,256 --prompt-len 512 --output-len 128 2>&1 | tail -8 | tee "$OUT/hf-$m.txt"
  done
  exit 0
fi
K=/tmp/cuda_kernels; [ -x target/gpu/cuda_kernels ] && K=target/gpu/cuda_kernels
M=/tmp/weave-model.gguf
cat /tmp/model.part-aa target/gpu2/model.part-ab > "$M"
[ "$(sha256sum "$M" | cut -d' ' -f1)" = "$(cat target/gpu2/model.sha256)" ] || { echo "model parts do not match their hash"; exit 1; }
export WEAVE_PTX_DIR="$PWD/target/ptx"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
echo "== kernel tests"; "$K" 2>&1 | tail -5 | tee "$OUT/kernels.txt"
for dev in cpu cuda; do
  timeout 300 "$W" generate --model "$M" --device $dev --prompts-file examples/prompts.jsonl --temperature 0 \
    --max-tokens 32 --json --profile > "$OUT/generate-$dev.jsonl" 2> "$OUT/generate-$dev.err"; echo "generate $dev: rc $?"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def load(d):
    rows = [json.loads(l) for l in open(f"{out}/generate-{d}.jsonl") if l.startswith('{"id"')]
    return {str(r["id"]): r["output_token_ids"] for r in rows}
try:
    cpu, gpu = load("cpu"), load("cuda")
except Exception as e:
    print("no comparison:", e); sys.exit(0)
for k, a in cpu.items():
    b = gpu.get(k, [])
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    print(f"{k:10} greedy tokens equal for {same}/{len(a)}")
PY
echo "== speed: SmolLM2 (real weights), then dummy llama-3-8b"
timeout 240 "$W" generate --model "$M" --device cuda --prompts-file examples/prompts.jsonl --max-tokens 128 --profile 2>&1 | tail -14 | tee "$OUT/speed-smollm2.txt"
timeout 240 "$W" generate --load-format dummy --model-config llama-3-8b --device cuda --prompt "hello" --max-tokens 64 --profile 2>&1 | tail -14 | tee "$OUT/speed-llama3-8b.txt"
tail -3 "$OUT/generate-cuda.err"
