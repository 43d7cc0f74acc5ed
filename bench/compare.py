"""Compares the ratios of two `make bench` results: prints each ratio's median in both and how
far apart they are, and exits 1 if any differs by more than the tolerance (default 10 %).

Usage: compare.py first/results.json second/results.json [--tolerance 0.10]
"""

import json
import sys


def ratios(path):
    with open(path) as f:
        results = json.load(f)
    found = {key: value["median"] for key, value in results["ratios"].items()}
    for key, value in results.get("filter_cpu_us_per_req", {}).items():
        if value:
            found[f"filter cost µs {key}"] = value["median"]
    return found


def main(argv):
    tolerance = 0.10
    if "--tolerance" in argv:
        i = argv.index("--tolerance")
        tolerance = float(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    first, second = ratios(argv[0]), ratios(argv[1])
    worst = 0.0
    for key in sorted(first.keys() & second.keys()):
        a, b = first[key], second[key]
        apart = abs(b - a) / max(abs(a), 1e-9)
        worst = max(worst, apart) if not key.startswith("filter cost") else worst
        mark = "" if apart <= tolerance else "  <-- outside tolerance"
        print(f"{key:55} {a:8.2f} {b:8.2f} {apart * 100:6.1f} %{mark}")
    print(f"largest difference between the ratios: {worst * 100:.1f} % (tolerance {tolerance * 100:.0f} %)")
    return 0 if worst <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
