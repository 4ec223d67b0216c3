"""Compare the metrics.jsonl of two training runs: the largest relative difference of each metric
over the steps they share, as JSON. Used to check that a refactoring changed no numbers:

    python benchmarks/compare_runs.py runs/a/metrics.jsonl runs/b/metrics.jsonl [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import sys


def compare(a_path: str, b_path: str) -> dict:
    a = {r["step"]: r for r in map(json.loads, open(a_path).read().splitlines())}
    b = {r["step"]: r for r in map(json.loads, open(b_path).read().splitlines())}
    steps = sorted(a.keys() & b.keys())
    out = {"a": a_path, "b": b_path, "steps": len(steps), "identical": True, "max_relative_difference": {}}
    for key in ("loss", "grad_norm", "lr", "val_perplexity", "val_loss", "val_mse"):
        pairs = [(a[s][key], b[s][key]) for s in steps if a[s].get(key) is not None and b[s].get(key) is not None]
        if pairs:
            out["max_relative_difference"][key] = max(abs(x - y) / max(abs(y), 1e-30) for x, y in pairs)
            out["identical"] &= all(x == y for x, y in pairs)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    result = json.dumps(compare(args.a, args.b), indent=1)
    if args.out:
        open(args.out, "w").write(result + "\n")
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
