#!/usr/bin/env bash
# llama.cpp's command-line tools, the oracle weave's fixtures are made with (llama-quantize,
# llama-tokenize, llama-simple, llama-batched-bench, llama-server), built once outside the
# repo from PyPI's llama-cpp-python sdist (its vendor/llama.cpp), with cmake from PyPI too.
#
#   BIN=$(tools/golden/build_llama_cpp.sh)     # prints the folder that holds the tools
#
# Cached in ${WEAVE_CACHE:-~/.cache/weave}/llama.cpp/<version>/bin; a second call only prints
# it. About 15-25 minutes on 2 cores the first time. LLAMA_CPP_PYTHON_VERSION picks the sdist.
set -euo pipefail

VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
ROOT=${WEAVE_CACHE:-$HOME/.cache/weave}/llama.cpp/$VERSION
BIN=$ROOT/bin
TARGETS=(llama-quantize llama-tokenize llama-simple llama-batched-bench llama-server)

have_all() {
    for t in "${TARGETS[@]}"; do
        [ -x "$BIN/$t" ] || return 1
    done
}

if have_all; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$ROOT"
log=$ROOT/build.log
echo "building llama.cpp (llama-cpp-python $VERSION) into $BIN; log: $log" >&2
# From here on the steps' output goes to the log; a failing step ends the script (set -e) with
# the log's tail on the terminal.
exec 3>&1 4>&2 >"$log" 2>&1
trap 'echo "llama.cpp build failed; the last lines of $log:" >&4; tail -20 "$log" >&4' ERR

[ -x "$ROOT/venv/bin/cmake" ] || { python3 -m venv "$ROOT/venv" && "$ROOT/venv/bin/pip" install -q cmake; }
if [ ! -d "$ROOT/src/vendor/llama.cpp" ]; then
    rm -rf "$ROOT/sdist" "$ROOT/src"
    mkdir -p "$ROOT/sdist" "$ROOT/src"
    # The sdist file itself, from the package index's simple page: `pip download` would first
    # build the package's build backend (with --no-binary, its build tools too) from source.
    python3 - "$VERSION" "$ROOT/sdist/sdist.tar.gz" <<'PY'
import re, sys, urllib.parse, urllib.request
version, out = sys.argv[1:]
index = "https://pypi.org/simple/llama-cpp-python/"
page = urllib.request.urlopen(index).read().decode()
name = f"llama_cpp_python-{version}.tar.gz"
href = next((h for h in re.findall(r'href="([^"]+)"', page) if h.split("#")[0].endswith("/" + name)), None)
if href is None:
    sys.exit(f"{index}: no {name}")
urllib.request.urlretrieve(urllib.parse.urljoin(index, href.split("#")[0]), out)
PY
    tar -xzf "$ROOT/sdist/sdist.tar.gz" -C "$ROOT/src" --strip-components=1
fi
cd "$ROOT/src/vendor/llama.cpp"
"$ROOT/venv/bin/cmake" -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON
"$ROOT/venv/bin/cmake" --build build -j "$(nproc)" --target "${TARGETS[@]}"
mkdir -p "$BIN"
for t in "${TARGETS[@]}"; do
    cp build/bin/"$t" "$BIN/"
done
# The tools link llama.cpp's shared libraries when it builds them shared.
find build -name '*.so*' -exec cp -P {} "$BIN/" \;

exec 1>&3 2>&4
have_all || { echo "llama.cpp built, but not every tool is in $BIN (see $log)" >&2; exit 1; }
echo "$BIN"
