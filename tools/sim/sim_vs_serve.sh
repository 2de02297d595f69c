#!/usr/bin/env bash
# The simulator against `weave serve` as users drive it: the same check as
# `weave experiment sim-vs-real`, by another path. `weave calibrate --profile` measures the
# step-time model; `weave bench serve` loads a real `weave serve` (HTTP, tokenizing,
# streaming) at a rate and lengths; `weave simulate --cost-model` runs the same rate and
# lengths, twice: from the generator (same seed: the same arrivals and lengths, prompts in
# words rather than tokens) and from the benchmark's own trace (when each request was sent,
# its prompt's token count, its output tokens). Prints real (median and spread of REPEAT
# runs) against simulated mean step time, mean TTFT and p99 ITL.
#
#   tools/sim/sim_vs_serve.sh [OUT_DIR]
#
# Env: LOAD (0.5: the rate as a fraction of the capacity the profile predicts; or RATE in
# req/s), NUM_PROMPTS (32), INPUT_LEN (128), OUTPUT_LEN (64), RANGE (0.5: lengths within
# +-50%), BUDGET (512), MAX_SEQS (32), THREADS (nproc), REPEAT (3), SEED (7).
set -euo pipefail
OUT=${1:-target/sim-vs-serve}
LOAD=${LOAD:-0.5}
NUM_PROMPTS=${NUM_PROMPTS:-32}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-64}
RANGE=${RANGE:-0.5}
BUDGET=${BUDGET:-512}
MAX_SEQS=${MAX_SEQS:-32}
THREADS=${THREADS:-$(nproc)}
REPEAT=${REPEAT:-3}
SEED=${SEED:-7}
PORT=${PORT:-8711}
cd "$(dirname "$0")/../.."
cargo build --release -p weave -q
W=target/release/weave
mkdir -p "$OUT"
# The bounds `weave bench serve` draws from (Rust rounds halves away from zero; Python's
# round() would round them to even and part from it).
lo() { python3 -c "import math; print(max(1, math.floor($1 * (1 - $RANGE) + 0.5)))"; }
hi() { python3 -c "import math; print(max(1, math.floor($1 * (1 + $RANGE) + 0.5)))"; }
PROMPT="uniform:$(lo "$INPUT_LEN"):$(hi "$INPUT_LEN")"
OUTPUT="uniform:$(lo "$OUTPUT_LEN"):$(hi "$OUTPUT_LEN")"
SIM=(--max-num-batched-tokens "$BUDGET" --max-num-seqs "$MAX_SEQS" --max-model-len 2048 --kv-cache-tokens 32768)

echo "profiling (weave calibrate --profile) ..." >&2
"$W" calibrate --profile --threads "$THREADS" --max-tokens "$BUDGET" --max-seqs "$MAX_SEQS" --max-context 1024 \
  --out "$OUT/profile.json" | tee "$OUT/profile.txt" >&2
if [ -z "${RATE:-}" ]; then
  CAP=$("$W" simulate --cost-model "$OUT/profile.json" "${SIM[@]}" --rate 0 --num-requests "$NUM_PROMPTS" \
    --prompt-len "$PROMPT" --output-len "$OUTPUT" --seed "$SEED" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests_per_s"])')
  RATE=$(python3 -c "print(round($LOAD * $CAP, 4))")
  echo "capacity $CAP req/s predicted; rate $RATE req/s (load $LOAD)" >&2
fi

wait_up() {
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "weave serve did not come up; see $OUT/server.log" >&2; return 1
}
for rep in $(seq 1 "$REPEAT"); do
  "$W" serve --port "$PORT" --threads "$THREADS" "${SIM[@]}" --no-prefix-caching \
    --step-log "$OUT/steps-serve-$rep.jsonl" >"$OUT/server.log" 2>&1 &
  pid=$!
  wait_up
  "$W" bench serve --base-url "http://127.0.0.1:$PORT" --num-prompts "$NUM_PROMPTS" --request-rate "$RATE" \
    --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" --random-range-ratio "$RANGE" \
    --ignore-eos --seed "$SEED" --disable-progress --result-file "$OUT/bench-$rep.json" >"$OUT/bench-$rep.txt"
  kill -TERM "$pid"; wait "$pid" || true
  # The trace the server saw: send times, prompt tokens, output tokens.
  python3 - "$OUT/bench-$rep.json" >"$OUT/trace-$rep.jsonl" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for q in sorted(r["requests"], key=lambda q: q["sent_s"]):
    print(json.dumps({"arrival_s": q["sent_s"], "prompt_len": q["prompt_tokens"], "output_len": q["output_tokens"]}))
PY
  "$W" simulate --cost-model "$OUT/profile.json" "${SIM[@]}" --workload "$OUT/trace-$rep.jsonl" \
    --step-log "$OUT/steps-sim-trace-$rep.jsonl" --json >"$OUT/sim-trace-$rep.json"
  echo "  run $rep: $(grep -i 'mean ttft' "$OUT/bench-$rep.txt" | head -1)" >&2
done
"$W" simulate --cost-model "$OUT/profile.json" "${SIM[@]}" --rate "$RATE" --num-requests "$NUM_PROMPTS" \
  --prompt-len "$PROMPT" --output-len "$OUTPUT" --seed "$SEED" --step-log "$OUT/steps-sim-gen.jsonl" \
  --json >"$OUT/sim-gen.json"

python3 - "$OUT" "$REPEAT" "$RATE" <<'PY'
import json, sys, statistics as st
out, rep, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def mean_step(path):
    d = [json.loads(l)["duration"] for l in open(path) if '"duration"' in l]
    return st.mean(d)
real = []
for r in range(1, rep + 1):
    b = json.load(open(f"{out}/bench-{r}.json"))
    real.append((mean_step(f"{out}/steps-serve-{r}.jsonl"), b["ttft_ms"]["mean"] / 1e3, b["itl_ms"]["p99"] / 1e3))
def sim(path, steps):
    m = json.load(open(path))
    return (mean_step(steps), m["ttft"]["mean"], m["itl"]["p99"])
trace = [sim(f"{out}/sim-trace-{r}.json", f"{out}/steps-sim-trace-{r}.jsonl") for r in range(1, rep + 1)]
gen = sim(f"{out}/sim-gen.json", f"{out}/steps-sim-gen.jsonl")
names = ["mean step", "mean TTFT", "p99 ITL"]
print(f"weave serve at {rate} req/s, {rep} runs, against weave simulate --cost-model\n")
print("| figure | real: median (spread) | simulated, benchmark's trace | error | simulated, generator | error |")
print("|---|---:|---:|---:|---:|---:|")
for i, n in enumerate(names):
    xs = [r[i] for r in real]
    m = st.median(xs)
    t = st.median(x[i] for x in trace)
    print(f"| {n} | {m*1e3:.1f} ms (±{(max(xs)-min(xs))/m*50:.0f}%) | {t*1e3:.1f} ms | {(t-m)/m*100:+.1f}% | "
          f"{gen[i]*1e3:.1f} ms | {(gen[i]-m)/m*100:+.1f}% |")
PY
