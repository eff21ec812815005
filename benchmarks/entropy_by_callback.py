"""Entropy and reward at the end of a short embedded run: no callback against each entropy callback.

Every run uses the same seed, the same warmed-up model (cached) and the same budget; only the callback differs.
Prints a markdown table. Usage (CPU, about 1 minute per run on 2 idle cores):

    .venv/bin/python benchmarks/entropy_by_callback.py --iterations 100 [--out runs/compare]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "embedded"
RUNS = [
    "grpo",
    "entropy_bonus",
    "adaptive_entropy_bonus",
    "entropy_constraint",
    "clip_cov",
    "kl_cov",
    "repo",
    "adapo",
    "high_entropy_tokens",
]


def last_rows(metrics: Path, column: str, count: int) -> float:
    with metrics.open() as handle:
        values = [float(row[column]) for row in csv.DictReader(handle) if row.get(column)]
    return statistics.fmean(values[-count:])


def first_rows(metrics: Path, column: str, count: int) -> float:
    with metrics.open() as handle:
        values = [float(row[column]) for row in csv.DictReader(handle) if row.get(column)]
    return statistics.fmean(values[:count])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=100, help="RL iterations per run (2 updates each)")
    parser.add_argument("--window", type=int, default=10, help="iterations averaged at the start and the end")
    parser.add_argument("--out", default="runs/compare", help="where the runs' logs go")
    parser.add_argument("--cache", default=".cache/lit_entropy", help="embedded model cache (built once)")
    parser.add_argument("--runs", nargs="*", default=RUNS, help="recipe names under recipes/embedded")
    args = parser.parse_args()
    rows = []
    for name in args.runs:
        out = Path(args.out) / name
        started = time.perf_counter()
        command = [
            sys.executable,
            "-m",
            "lit_entropy",
            "fit",
            "--config",
            str(RECIPES / f"{name}.yaml"),
            "--trainer.max_steps",
            str(2 * args.iterations),
            "--trainer.default_root_dir",
            str(out),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.limit_val_batches",
            "0",
            "--model.init_args.policy.embedded.cache_dir",
            args.cache,
            "--model.init_args.adapter_dir",
            str(out / "adapter"),
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = sorted(out.glob("lightning_logs/version_*/metrics.csv"))[-1]
        rows.append(
            (
                name,
                first_rows(metrics, "train/entropy", args.window),
                last_rows(metrics, "train/entropy", args.window),
                first_rows(metrics, "rollout/reward_mean", args.window),
                last_rows(metrics, "rollout/reward_mean", args.window),
                time.perf_counter() - started,
            )
        )
        print(f"{name}: done in {rows[-1][-1]:.0f} s", file=sys.stderr)
    print(
        f"| run ({args.iterations} iterations) | entropy first {args.window} | entropy last {args.window} | "
        f"reward first {args.window} | reward last {args.window} | wall s |"
    )
    print("|---|---|---|---|---|---|")
    for name, h0, h1, r0, r1, wall in rows:
        print(f"| {name} | {h0:.3f} | {h1:.3f} | {r0:.3f} | {r1:.3f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
