#!/usr/bin/env bash
# weave serve against llama.cpp's llama-server on the same GGUF, the same `weave bench serve`
# load at each request rate, servers taking turns (interleaved, so that machine drift hits both).
#
#   tools/serve/compare_llama_server.sh /path/to/llama-server [OUT_DIR]
#
# Env: RATES (default "2 4 8"), NUM_PROMPTS (64), INPUT_LEN (128), OUTPUT_LEN (64),
# THREADS (nproc), PARALLEL (16, llama-server's slots), REPEAT (1), MODEL (the reference GGUF).
# llama-server: build it outside the repo from PyPI's llama-cpp-python sdist (vendor/llama.cpp):
#   cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build --target llama-server
set -euo pipefail
LLAMA_SERVER=${1:?usage: $0 /path/to/llama-server [OUT_DIR]}
OUT=${2:-target/serve-compare}
RATES=${RATES:-2 4 8}
NUM_PROMPTS=${NUM_PROMPTS:-64}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-64}
THREADS=${THREADS:-$(nproc)}
PARALLEL=${PARALLEL:-16}
REPEAT=${REPEAT:-1}
MODEL=${MODEL:-${WEAVE_CACHE:-$HOME/.cache/weave}/models/SmolLM2-135M-Instruct.Q4_1.gguf}
cd "$(dirname "$0")/../.."
cargo build --release -p weave -q
WEAVE=target/release/weave
mkdir -p "$OUT"
KV=$((PARALLEL * 1024))

wait_up() { # URL
  for _ in $(seq 1 300); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "server at $1 did not come up" >&2; return 1
}

run_one() { # NAME REP RATE
  local name=$1 rep=$2 rate=$3 pid url
  if [ "$name" = weave ]; then
    url=http://127.0.0.1:8701
    "$WEAVE" serve --model "$MODEL" --port 8701 --threads "$THREADS" --kv-cache-tokens "$KV" \
      --max-model-len 1024 >"$OUT/server-weave.log" 2>&1 &
  else
    url=http://127.0.0.1:8702
    "$LLAMA_SERVER" -m "$MODEL" --port 8702 -t "$THREADS" --parallel "$PARALLEL" -c "$KV" \
      >"$OUT/server-llama.log" 2>&1 &
  fi
  pid=$!
  wait_up "$url"
  "$WEAVE" bench serve --base-url "$url" --num-prompts "$NUM_PROMPTS" --request-rate "$rate" \
    --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" --ignore-eos --seed "$rep" \
    --disable-progress --result-file "$OUT/$name-rate$rate-rep$rep.json" >"$OUT/$name-rate$rate-rep$rep.txt"
  kill -TERM "$pid"; wait "$pid" || true
  echo "  $name rate $rate rep $rep: $(grep 'Output token throughput' "$OUT/$name-rate$rate-rep$rep.txt")" >&2
}

for rep in $(seq 1 "$REPEAT"); do
  for rate in $RATES; do
    run_one weave "$rep" "$rate"
    run_one llama "$rep" "$rate"
  done
done

python3 - "$OUT" "$RATES" "$REPEAT" <<'PY'
import json, sys, statistics as st
out, rates, rep = sys.argv[1], sys.argv[2].split(), int(sys.argv[3])
def load(name, rate):
    return [json.load(open(f"{out}/{name}-rate{rate}-rep{r}.json")) for r in range(1, rep + 1)]
med = lambda rs, f: st.median(f(r) for r in rs)
print("| rate (req/s) | server | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT mean ms | failed |")
print("|---:|---|---:|---:|---:|---:|---:|")
rows = []
for rate in rates:
    w, l = load("weave", rate), load("llama", rate)
    for name, rs in (("weave", w), ("llama-server", l)):
        print(f"| {rate} | {name} | {med(rs, lambda r: r['output_throughput']):.1f} | {med(rs, lambda r: r['ttft_ms']['median']):.0f} | "
              f"{med(rs, lambda r: r['ttft_ms']['p99']):.0f} | {med(rs, lambda r: r['tpot_ms']['mean']):.1f} | {sum(r['failed'] for r in rs)} |")
    rows.append((rate, med(w, lambda r: r['output_throughput']) / med(l, lambda r: r['output_throughput']),
                 med(w, lambda r: r['ttft_ms']['p99']) / med(l, lambda r: r['ttft_ms']['p99']),
                 med(w, lambda r: r['ttft_ms']['median']) / med(l, lambda r: r['ttft_ms']['median']),
                 med(w, lambda r: r['tpot_ms']['mean']) / med(l, lambda r: r['tpot_ms']['mean'])))
print()
print("| rate (req/s) | throughput weave/llama | TTFT p50 weave/llama | TTFT p99 weave/llama | TPOT weave/llama |")
print("|---:|---:|---:|---:|---:|")
for rate, t, p99, p50, tp in rows:
    print(f"| {rate} | {t:.2f}x | {p50:.2f}x | {p99:.2f}x | {tp:.2f}x |")
PY
