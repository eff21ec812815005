"""The figures of one GRPO run from its ``metrics.csv``: reward and entropy early vs late, every validation.

Prints, per RL iteration, ``rollout/reward_mean`` (mean reward of the B*G sampled completions),
``train/entropy`` (mean per-token entropy of the policy on them, nats), ``rollout/completion_length``
(tokens) and ``rollout/truncated_frac``; then the means of the first and last ``--window`` iterations, and
``val/accuracy`` at each validation. Usage:

    .venv/bin/python benchmarks/run_summary.py runs/lightning_logs/version_N [--window 5]
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

COLUMNS = {
    "reward": "rollout/reward_mean",
    "entropy": "train/entropy",
    "length": "rollout/completion_length",
    "truncated": "rollout/truncated_frac",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("run_dir", type=Path, help="a Lightning CSVLogger folder with metrics.csv")
    parser.add_argument("--window", type=int, default=5, help="iterations averaged at each end")
    args = parser.parse_args()
    rows = list(csv.DictReader((args.run_dir / "metrics.csv").open()))
    iterations = [row for row in rows if row.get(COLUMNS["reward"])]
    validations = [row for row in rows if row.get("val/accuracy")]
    if not iterations:
        raise SystemExit(f"{args.run_dir / 'metrics.csv'}: no {COLUMNS['reward']} rows")

    print("step  " + "  ".join(f"{name:>9}" for name in COLUMNS))
    for row in iterations:
        print(f"{int(row['step']):>4}  " + "  ".join(f"{float(row[c]):9.3f}" for c in COLUMNS.values()))
    k = min(args.window, len(iterations))
    for label, part in (("first", iterations[:k]), ("last", iterations[-k:])):
        means = {name: statistics.fmean(float(row[c]) for row in part) for name, c in COLUMNS.items()}
        print(f"{label} {k} iterations: " + ", ".join(f"{name} {value:.3f}" for name, value in means.items()))
    for row in validations:
        # Lightning logs a validation with the step of the last training batch before it (0-based).
        print(f"val/accuracy after {int(row['step']) + 1} iterations: {float(row['val/accuracy']):.3f}")


if __name__ == "__main__":
    main()
