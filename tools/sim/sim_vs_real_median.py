#!/usr/bin/env python3
"""The median of several `weave experiment sim-vs-real` runs, against the targets.

One run of the experiment already runs each workload for real three times; on a shared
machine its whole profile can still land on a slow or fast hour, so the claim in
docs/TUNING.md rests on the median of whole runs:

    for i in 1 2 3; do weave experiment sim-vs-real --out runs/$i; done
    python3 tools/sim/sim_vs_real_median.py runs/1 runs/2 runs/3

Each argument is an `--out` folder (or its `sim-vs-real/` subfolder). Prints a markdown table:
each workload's error of simulated against real per run and their median, for mean step time,
mean TTFT and p99 ITL, and whether the median meets the targets (10%, 10%, 15%). Exits 1 when
a folder holds no table or the runs do not hold the same workloads. Standard library only.
"""
import json
import os
import statistics
import sys

# (column, the simulated row's extra key, target)
METRICS = [
    ("mean step", "step_time_error", 0.10),
    ("mean TTFT", "ttft_error", 0.10),
    ("p99 ITL", "itl_p99_error", 0.15),
]
SIMULATED = " (simulated)"


def load(folder):
    path = os.path.join(folder, "table.json")
    if not os.path.exists(path):
        path = os.path.join(folder, "sim-vs-real", "table.json")
    if not os.path.exists(path):
        sys.exit(f"{folder}: no table.json here or in sim-vs-real/; pass `weave experiment sim-vs-real --out` folders")
    with open(path) as f:
        table = json.load(f)
    if table.get("name") != "sim-vs-real":
        sys.exit(f"{path}: a {table.get('name')!r} table, not sim-vs-real")
    rows = {}
    for row in table["rows"]:
        if row["setting"].endswith(SIMULATED):
            rows[row["setting"][: -len(SIMULATED)]] = row["extra"]
    noisy = [f for f in table["findings"] if "NOISY" in f]
    return path, rows, noisy


def main(folders):
    if not folders:
        sys.exit(__doc__)
    runs = [load(f) for f in folders]
    workloads = list(runs[0][1])
    for path, rows, _ in runs[1:]:
        if list(rows) != workloads:
            sys.exit(f"{path}: other workloads than {runs[0][0]}: {list(rows)} vs {workloads}")
    head = "| workload | " + " | ".join(f"{m} error: runs / median" for m, _, _ in METRICS) + " | meets targets |"
    print(head)
    print("|---|" + "---:|" * len(METRICS) + "---|")
    all_met = True
    for w in workloads:
        cells, misses = [], []
        for name, key, target in METRICS:
            errs = [rows[w][key] for _, rows, _ in runs]
            med = statistics.median(errs)
            cells.append(" ".join(f"{e * 100:+.1f}" for e in errs) + f" / **{med * 100:+.1f}%**")
            if abs(med) > target:
                misses.append(f"{name} {med * 100:+.1f}% (target {target * 100:.0f}%)")
        all_met &= not misses
        print(f"| {w} | " + " | ".join(cells) + f" | {'yes' if not misses else 'no: ' + ', '.join(misses)} |")
    print()
    print(f"Median of {len(runs)} runs of `weave experiment sim-vs-real`; each run's real figures are themselves the median of its repeats.")
    for path, _, noisy in runs:
        for w in workloads:
            if any(f.startswith(w + ":") for f in noisy):
                print(f"- {path}: {w.split(':')[0]} flagged NOISY (the machine changed speed during its runs, twice)")
    print(f"\nAll targets met: {'yes' if all_met else 'no'}.")


if __name__ == "__main__":
    main(sys.argv[1:])
