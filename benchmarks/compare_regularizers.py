"""The comparison set on the embedded task: baseline GRPO against each entropy method, several seeds each.

Every run uses the same warmed-up model (cached), the same budget and validation schedule; runs differ only in the
recipe (one callback, or clip-higher) and the seed. Validation logs greedy accuracy, sampled reward, pass@k and
distinct correct answers, so `lit-entropy report` can draw the figures and fit the entropy-performance law.
Runs go to ``<out>/<recipe>/seed<k>``; finished runs are skipped, so an interrupted comparison resumes.

    .venv/bin/python benchmarks/compare_regularizers.py --seeds 0 1 2 --iterations 100   # CPU, ~1 min per run
    .venv/bin/lit-entropy report runs/compare/* --out docs/results
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "embedded"
RUNS = ["grpo", "clip_higher", "entropy_constraint", "clip_cov", "kl_cov", "repo", "adapo", "entropy_bonus"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=100, help="RL iterations per run (2 updates each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--val-every", type=int, default=10, help="RL iterations between validations")
    parser.add_argument(
        "--samples", type=int, default=8, help="sampled completions per validation prompt (n)"
    )
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--cache", default=".cache/lit_entropy", help="embedded model cache (built once)")
    parser.add_argument("--runs", nargs="*", default=RUNS, help="recipe names under recipes/embedded")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (1: tiny models gain little from more, and "
        "two jobs with 2 OpenMP threads each on 2 cores slow each other down several times)",
    )
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32) if k <= args.samples})
    for seed in args.seeds:
        for name in args.runs:
            out = Path(args.out) / name / f"seed{seed}"
            if (out / "adapter" / "adapter_config.json").exists():
                continue
            started = time.perf_counter()
            command = [
                sys.executable,
                "-m",
                "lit_entropy",
                "fit",
                "--config",
                str(RECIPES / f"{name}.yaml"),
                "--seed_everything",
                str(seed),
                "--trainer.max_steps",
                str(2 * args.iterations),
                "--trainer.val_check_interval",
                str(args.val_every),
                "--trainer.default_root_dir",
                str(out),
                "--trainer.enable_progress_bar",
                "false",
                "--model.init_args.seed",
                str(seed),
                "--model.init_args.val_num_samples",
                str(args.samples),
                "--model.init_args.pass_at_k",
                str(ks),
                "--model.init_args.policy.embedded.cache_dir",
                args.cache,
                "--model.init_args.adapter_dir",
                str(out / "adapter"),
            ]
            result = subprocess.run(command, capture_output=True, text=True, env=env)
            if result.returncode:
                print(result.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{name} seed {seed} failed")
            print(f"{name} seed {seed}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
