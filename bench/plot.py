"""The plot in BENCHMARKS.md, from bench/results.json: CPU microseconds per request and p99
latency per configuration (medians, with min-max bars), mTLS and plain side by side.

Usage: plot.py results.json results.png  (make bench runs it with matplotlib installed
under .tools/bench-venv).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(source, target):
    with open(source) as f:
        results = json.load(f)
    cells = results["configurations"]
    labels = []
    for cell in cells.values():
        if cell["label"] not in labels:
            labels.append(cell["label"])
    labels.sort()  # "(a) …" to "(g) …": the configurations in report order
    modes = ["mtls", "plain"]
    width = 0.38
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for axis, field, title in (
        (axes[0], "cpu_us_per_req", "CPU µs per request (gateway processes)"),
        (axes[1], "p99_us", "p99 latency, µs"),
    ):
        for m, mode in enumerate(modes):
            xs, medians, lows, highs = [], [], [], []
            for i, label in enumerate(labels):
                cell = next(
                    (c for c in cells.values() if c["label"] == label and c["mode"] == mode),
                    None,
                )
                spread = cell and cell.get(field)
                if not spread:
                    continue
                xs.append(i + (m - 0.5) * width)
                medians.append(spread["median"])
                lows.append(spread["median"] - spread["min"])
                highs.append(spread["max"] - spread["median"])
            axis.bar(xs, medians, width, yerr=[lows, highs], capsize=3, label=mode)
        axis.set_xticks(range(len(labels)))
        axis.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
        axis.legend()
    rounds = results["settings"]["rounds"]
    fig.suptitle(
        f"make bench, {rounds} interleaved rounds (median, min-max), commit {results['git_commit']}"
    )
    fig.tight_layout()
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
