#!/usr/bin/env python3
"""Fixture for weave's GGUF dequantizer: random blocks of each storage type weave reads, and
what llama.cpp's own `gguf` Python package (gguf-py, from the llama.cpp repository) decodes
them to.

The blocks are random bytes, except the f16 scales and offsets, which are set to finite,
modest values (the bits around them, the 6-bit K-quant scales and every high bit, stay random).
The rows are short and few, so the committed file stays small; `tests/tests/ggml_blocks.rs`
checks `weave::model::blocks::dequantize` against it value for value, and the packed CPU
matrices against it to one rounding.

Usage:
  python3 tools/golden/ggml_blocks.py --out tests/fixtures/ggml_blocks.json
Needs: pip install numpy gguf.
"""
import argparse
import json
from importlib.metadata import version

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

# type: (rows, elements a row, byte offsets of f16 scales, of f16 offsets/mins)
TYPES = {
    T.Q4_0: (5, 64, [0], []),
    T.Q4_1: (5, 64, [0], [2]),
    T.Q5_0: (5, 64, [0], []),
    T.Q5_1: (5, 64, [0], [2]),
    T.Q8_0: (5, 64, [0], []),
    T.Q4_K: (3, 256, [0], [2]),
    T.Q5_K: (3, 256, [0], [2]),
    T.Q6_K: (3, 256, [208], []),
}


def blocks(rng, ty):
    rows, cols, scales, offsets = TYPES[ty]
    block, size = GGML_QUANT_SIZES[ty]
    n = rows * cols // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for at in scales:
        d = rng.uniform(0.0005, 0.02, size=n).astype(np.float16)
        # A few negative scales: the formats allow them and a sign slip must show.
        d[::3] *= -1
        raw[:, at : at + 2] = d.view(np.uint8).reshape(n, 2)
    for at in offsets:
        m = rng.uniform(-0.05, 0.05, size=n).astype(np.float16)
        raw[:, at : at + 2] = m.view(np.uint8).reshape(n, 2)
    data = raw.reshape(rows, -1)
    want = dequantize(data, ty)
    assert want.shape == (rows, cols) and want.dtype == np.float32, (ty.name, want.shape)
    assert np.isfinite(want).all()
    return {
        "type": ty.name,
        "ggml_type": int(ty),
        "rows": rows,
        "cols": cols,
        "data_hex": data.tobytes().hex(),
        # The f32 values' little-endian bits: exact, no decimal round trip.
        "want_f32_hex": want.astype("<f4").tobytes().hex(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=20261204)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    fixture = {
        "made_by": f"tools/golden/ggml_blocks.py --seed {args.seed} with gguf {version('gguf')}, numpy {np.__version__}",
        "blocks": [blocks(rng, ty) for ty in TYPES],
    }
    with open(args.out, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
