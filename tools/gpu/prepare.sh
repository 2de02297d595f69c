#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything tools/gpu/check.sh runs on a lent GPU machine
# (which has no Rust toolchain and no network), into target/gpu/:
#   weave (stripped release binary), cuda_kernels (the kernel test binary), the PTX, and the
#   reference model split in two parts, 40 MiB beside the binaries and the rest alone (a call
#   carries at most 64 MiB, the PTX included).
# Then, with the device tool:
#   call 1: carry ["target/gpu", "target/ptx"], command: bash tools/gpu/check.sh part1
#   call 2: carry ["target/gpu2", "target/ptx"], command: bash tools/gpu/check.sh all
# (part 1 of the model waits in /tmp between the calls while the machine stays warm.)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo xtask build-ptx
cargo build --release -p weave
test_bin=$(cargo test --release -p weave-tests --test cuda_kernels --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "cuda_kernels" in m["executable"]:
        print(m["executable"])')
rm -rf target/gpu target/gpu2 && mkdir -p target/gpu target/gpu2
cp target/release/weave "$test_bin" target/gpu/
mv "target/gpu/$(basename "$test_bin")" target/gpu/cuda_kernels
strip target/gpu/weave target/gpu/cuda_kernels
model="${WEAVE_MODEL:-$HOME/.cache/weave/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
head -c 40M "$model" > target/gpu/model.part-aa
tail -c +$((40 * 1024 * 1024 + 1)) "$model" > target/gpu2/model.part-ab
sha256sum "$model" | cut -d' ' -f1 > target/gpu2/model.sha256
du -sh target/gpu target/gpu2 target/ptx
for d in target/gpu target/gpu2; do
  total=$(( $(du -sb "$d" | cut -f1) + $(du -sb target/ptx | cut -f1) ))
  [ "$total" -lt $((64 * 1024 * 1024)) ] || { echo "$d with the PTX is $total bytes: over the 64 MiB a call carries"; exit 1; }
done
