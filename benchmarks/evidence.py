"""The evidence runs: does each entropy method keep entropy alive, at what cost, against a collapsing baseline?

Five stages, each resumable (a finished run, one whose adapter was exported, is skipped):

1. ``tune``: every method's main knob, over a small grid, on a seed that is never reported (``--tune-seed``).
   The value kept is the one with the highest final entropy whose final reward is at least the baseline's
   minus ``--reward-tolerance`` on that seed (else the one with the highest reward). Written to
   ``<out>/<model>/tuning.json``.
2. ``compare``: each method at its tuned value, and the baseline, on the reported seeds (``--seeds``); with
   ``--all-variants``, every value of the grid (one label each). A run records its command in
   ``command.json``; a finished run found under a different command is an error, never reused.
3. ``final``: each compared run's final adapter validated once with ``--final-samples`` sampled answers per
   prompt (pass@k, distinct answers), for a model whose runs validate greedily only (SmolLM2 on a CPU).
4. ``transfer``: each compared run's final adapter trained on a second task for a fixed budget (trainability
   after training: how fast reward rises when the policy has to learn something new).
5. ``report``: `lit-entropy report` over the compared runs and over the transfer runs, and the table of the
   final validations (``report/final.md``).

Models (``--model``):

- ``embedded``: the embedded countdown task and tiny model, with 8 optimizer updates per rollout (4 epochs x 2
  mini-batches: the covariance methods act only on off-policy updates). Second task: countdown over 4 numbers
  with 3-4 term solutions. About 2-3 min per run on one core.
- ``smollm2``: SmolLM2-135M-Instruct on "What is a + b?" (``recipes/cpu/smollm2-arithmetic.yaml``), 4 updates
  per rollout. Second task: "What is a * b?". About 10 min per run on 2 cores.

    .venv/bin/python benchmarks/evidence.py --model embedded --jobs 2          # all four stages
    .venv/bin/python benchmarks/evidence.py --model embedded --stage report    # the tables and figures only

Every run's command line is printed before it starts, so any single run can be repeated by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def callback(class_path: str, **init_args: object) -> dict:
    return {"class_path": f"lit_entropy.callbacks.{class_path}", "init_args": init_args}


@dataclass(frozen=True)
class Method:
    """One method of the comparison: its label, and its variants, one per value of its main knob.

    Each variant is ``(knob value as text, callbacks, extra command-line options)``; the first is the
    papers' default. A method with one variant is not tuned, nor is one that takes another method's kept
    variant (``tuned_as``: a switch on that method, compared at the same knob value).
    """

    label: str
    variants: list[tuple[str, list[dict], list[str]]] = field(default_factory=list)
    tuned_as: str | None = None


def entropy_constraint(label: str, initial: float, tuned_as: str | None = None, **options: object) -> Method:
    """The constraint's grid: targets scheduled from 0.8 to 0.5 and from 0.9 to 0.7 of ``initial`` nats;
    ``options`` add to or replace the constraint's other arguments."""
    return Method(
        label,
        [
            (
                f"target={start}->{end}",
                [
                    callback(
                        "EntropyConstraint",
                        **{
                            "target_start": start,
                            "target_end": end,
                            "schedule": "linear",
                            "decay_steps": 25,
                            "lr_lambda": 0.5,
                            "lambda_max": 10.0,
                            **options,
                        },
                    )
                ],
                [],
            )
            for start, end in (
                (round(0.8 * initial, 2), round(0.5 * initial, 2)),
                (round(0.9 * initial, 2), round(0.7 * initial, 2)),
            )
        ],
        tuned_as,
    )


def adaptive_bonus(
    label: str, initial: float, delta: float, coef_max: float, tuned_as: str | None = None
) -> Method:
    """The adaptive bonus's grid: targets of 0.7 and 0.9 of ``initial`` nats, at one step and cap."""
    return Method(
        label,
        [
            (
                f"target={t}",
                [callback("AdaptiveEntropyBonus", target=t, delta=delta, coef_max=coef_max)],
                [],
            )
            for t in (round(0.7 * initial, 2), round(0.9 * initial, 2))
        ],
        tuned_as,
    )


def methods(model: str) -> list[Method]:
    """The comparison set. Knob grids are the papers' defaults and one stronger setting."""
    # the scale of the entropy targets (nats): the embedded baseline's first-iteration entropy; for SmolLM2 a
    # first guess, above the 0.60-0.70 nats its baseline measures on the first iteration at T = 0.7
    initial = 0.63 if model == "embedded" else 0.82
    return [
        Method("GRPO", [("-", [], [])]),
        Method(
            "clip-higher",
            [(f"eps_high={e}", [], ["--model.init_args.loss.eps_high", str(e)]) for e in (0.28, 0.4)],
        ),
        entropy_constraint("EntropyConstraint", initial),
        # held at the target from above too (the one-sided constraint overshoots on SmolLM2), at the target the
        # one-sided constraint's tuning kept: the two labels differ by the switch alone
        entropy_constraint(
            "EntropyConstraint-two-sided", initial, tuned_as="EntropyConstraint", two_sided=True
        ),
        # the two-sided constraint with a proportional-integral multiplier (PID Lagrangian, Stooke et al. 2020):
        # both dual-ascent forms lag the entropy by 2-3 iterations and overshoot; half the integral gain, and a
        # proportional term that follows the violation at once. One setting of the gains, not tuned.
        entropy_constraint(
            "EntropyConstraint-PI",
            initial,
            tuned_as="EntropyConstraint",
            two_sided=True,
            lr_lambda=0.25,
            lambda_kp=1.0,
        ),
        Method(
            "ClipCov",
            [(f"ratio={r}", [callback("ClipCov", ratio=r, cov_lb=0.0, cov_ub=5.0)], []) for r in (0.02, 0.1)],
        ),
        Method(
            "KLCov", [(f"kl_coef={k}", [callback("KLCov", ratio=0.02, kl_coef=k)], []) for k in (1.0, 4.0)]
        ),
        Method(
            "REPO-R",
            [(f"zeta_max={z}", [callback("REPO", variant="R", zeta_max=z)], []) for z in (0.05, 0.2)],
        ),
        Method(
            "ADAPO",
            [
                (f"eps_high_max={e}", [callback("ADAPO", eps_high_init=0.28, eps_high_max=e)], [])
                for e in (0.4, 0.6)
            ],
        ),
        adaptive_bonus("AdaptiveEntropyBonus", initial, delta=0.002, coef_max=0.05),
        # the same targets with a step 25x larger and TRL's cap: at delta 0.002 the coefficient reaches 0.03 in
        # 16 iterations, a tenth of the constraint's multiplier at its peak; at 0.05 it reached 0.3 by the 8th-10th
        # iteration, about the rate at which the constraint's multiplier rises. Compared at the kept target.
        adaptive_bonus(
            "AdaptiveEntropyBonus-fast", initial, tuned_as="AdaptiveEntropyBonus", delta=0.05, coef_max=1.0
        ),
        Method(
            "GSPO",
            [
                (
                    f"eps={low}/{high}",
                    [],
                    [
                        "--model.init_args.loss.importance_sampling_level",
                        "sequence",
                        "--model.init_args.loss.eps_low",
                        str(low),
                        "--model.init_args.loss.eps_high",
                        str(high),
                    ],
                )
                for low, high in ((3e-4, 4e-4), (3e-3, 4e-3))
            ],
        ),
        Method(
            "DynamicSampling",
            [("max_rounds=4", [], ["--model.init_args.dynamic_sampling", '{"max_rounds": 4}'])],
        ),
    ]


@dataclass(frozen=True)
class Setting:
    """A model's recipe and the options that put it in the collapsing regime."""

    recipe: str
    updates_per_iteration: int
    options: list[str]
    transfer_options: list[str]
    transfer_updates_per_iteration: int
    threads: int


def setting(model: str, iterations: int, val_every: int, samples: int) -> Setting:
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32) if k <= samples})
    validation = [
        "--trainer.val_check_interval",
        str(val_every),
        "--model.init_args.val_num_samples",
        str(samples),
        "--model.init_args.pass_at_k",
        json.dumps(ks),
    ]
    if model == "embedded":
        return Setting(
            recipe="recipes/embedded/grpo.yaml",
            updates_per_iteration=8,
            options=["--model.init_args.ppo_epochs", "4", *validation],
            transfer_options=[
                "--data.init_args.num_numbers",
                "4",
                "--data.init_args.min_terms",
                "3",
                "--data.init_args.max_terms",
                "4",
                "--model.init_args.ppo_epochs",
                "1",
                "--trainer.val_check_interval",
                str(val_every),
                "--model.init_args.val_num_samples",
                "0",
            ],
            transfer_updates_per_iteration=2,
            threads=1,
        )
    return Setting(
        recipe="recipes/cpu/smollm2-arithmetic.yaml",
        updates_per_iteration=4,
        options=[
            "--model.init_args.ppo_epochs",
            "2",
            "--model.init_args.minibatch_size",
            "32",
            "--data.init_args.num_val",
            "64",
            *validation,
        ],
        transfer_options=[
            "--data.init_args.operations",
            '["*"]',
            "--data.init_args.max_operand",
            "12",
            "--data.init_args.num_val",
            "64",
            "--trainer.val_check_interval",
            str(val_every),
            "--model.init_args.val_num_samples",
            "0",
        ],
        transfer_updates_per_iteration=1,
        threads=2,
    )


COMMAND_FILE = "command.json"  # the arguments a run was started with, checked when it is found finished


@dataclass(frozen=True)
class Run:
    """One subprocess: a fit (finished once its adapter is exported) or a validate (once its log is written)."""

    label: str
    knob: str
    seed: int
    folder: Path
    command: list[str]

    def finished(self) -> bool:
        """Whether the run is done; a done run made by a different command (a changed grid, a changed tuning
        choice) is an error rather than a result silently reused for another setting."""
        if self.command[3] == "validate":
            done = any((self.folder / "validate").glob("version_*/metrics.csv"))
        else:
            done = (self.folder / "adapter" / "adapter_config.json").exists()
        recorded = self.folder / COMMAND_FILE
        if done and recorded.exists():
            before = json.loads(recorded.read_text())
            if before != self.arguments():
                raise SystemExit(
                    f"{self.folder} holds a finished run of a different command:\n  recorded: "
                    f"{shlex.join(before)}\n  asked:    {shlex.join(self.arguments())}\n"
                    "remove the folder to rerun it, or give --out another folder"
                )
        return done

    def title(self) -> str:
        """The label, its knob where the label does not already name it, and the seed."""
        knob = "" if self.knob == "-" or self.knob in self.label else f" {self.knob}"
        return f"{self.label}{knob} seed {self.seed}"

    def arguments(self) -> list[str]:
        """The command less the interpreter's path (a run's identity, wherever the environment lives)."""
        return self.command[1:]


def fit_command(
    setting_: Setting,
    folder: Path,
    seed: int,
    iterations: int,
    callbacks: list[dict],
    extra: list[str],
    transfer_from: Path | None = None,
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "lit_entropy",
        "fit",
        "--config",
        str(ROOT / setting_.recipe),
        "--seed_everything",
        str(seed),
        "--model.init_args.seed",
        str(seed),
        "--trainer.default_root_dir",
        str(folder),
        "--trainer.enable_progress_bar",
        "false",
        "--model.init_args.adapter_dir",
        str(folder / "adapter"),
    ]
    if transfer_from is None:
        command += setting_.options
        command += ["--trainer.max_steps", str(iterations * setting_.updates_per_iteration)]
        if callbacks:
            command += ["--trainer.callbacks", json.dumps(callbacks)]
        command += extra
    else:
        command += setting_.transfer_options
        command += ["--trainer.max_steps", str(iterations * setting_.transfer_updates_per_iteration)]
        command += ["--model.init_args.policy.adapter_path", str(transfer_from)]
    return command


def execute(run: Run, threads: int) -> None:
    """Run one fit, skipped when finished; print its command and its wall time."""
    if run.finished():
        return
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # one write per line (message and newline together): two runs at a time must not interleave their lines
    sys.stderr.write(f"[{run.title()}] {shlex.join(run.command)}\n")
    sys.stderr.flush()
    started = time.perf_counter()
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / COMMAND_FILE).write_text(json.dumps(run.arguments(), indent=1) + "\n")
    with (run.folder / "fit.log").open("w") as log:
        result = subprocess.run(run.command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - started
    if result.returncode:
        tail = (run.folder / "fit.log").read_text()[-3000:]
        raise SystemExit(f"{run.title()} failed ({run.folder / 'fit.log'}):\n{tail}")
    sys.stderr.write(f"[{run.title()}] done in {elapsed:.0f} s\n")
    sys.stderr.flush()


def execute_all(runs: list[Run], jobs: int, threads: int) -> None:
    """Run ``jobs`` fits at a time; a model's threads are shared among them (2 threads, 2 jobs: 1 each)."""
    threads = max(1, threads // jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda run: execute(run, threads), runs))


def final_window(args: argparse.Namespace) -> int:
    """The iterations a final value averages: the last quarter of a run, at least 3 (10 of 40, 3 of 8)."""
    return max(3, round(args.iterations / 4))


def final(run: Run, name: str, last: int) -> float:
    from lit_entropy.run_log import load_run

    values = load_run(run.folder).values(name)
    if not values:
        raise SystemExit(f"{run.folder} logged no {name}")
    return statistics.fmean(values[-last:])


def tuning_runs(args: argparse.Namespace, setting_: Setting, out: Path) -> dict[str, list[Run]]:
    """Every variant of every tuned method (and the baseline) on the tuning seed, by label."""
    runs: dict[str, list[Run]] = {}
    for method in methods(args.model):
        if method.label != "GRPO" and (
            len(method.variants) == 1
            or method.tuned_as
            or (args.methods and method.label not in args.methods)
        ):
            continue
        runs[method.label] = [
            Run(
                method.label,
                knob,
                args.tune_seed,
                out / "tune" / method.label / f"v{index}",
                fit_command(
                    setting_,
                    out / "tune" / method.label / f"v{index}",
                    args.tune_seed,
                    args.iterations,
                    callbacks,
                    extra,
                ),
            )
            for index, (knob, callbacks, extra) in enumerate(method.variants)
        ]
    return runs


def tune(args: argparse.Namespace, setting_: Setting, out: Path) -> dict[str, int]:
    """Run every variant on the tuning seed; return and save the index of the kept variant per method."""
    runs = tuning_runs(args, setting_, out)
    execute_all([run for group in runs.values() for run in group], args.jobs, setting_.threads)
    last = final_window(args)
    baseline_reward = final(runs["GRPO"][0], "rollout/reward_mean", last)
    chosen: dict[str, int] = {}
    lines = [
        f"tuning seed {args.tune_seed}, final values over the last {last} iterations; GRPO: final reward "
        f"{baseline_reward:.4f}, entropy {final(runs['GRPO'][0], 'train/entropy', last):.4f}"
    ]
    for label, group in runs.items():
        if label == "GRPO":
            continue
        scores = [
            (final(run, "train/entropy", last), final(run, "rollout/reward_mean", last)) for run in group
        ]
        eligible = [
            i for i, (_, reward) in enumerate(scores) if reward >= baseline_reward - args.reward_tolerance
        ]
        if eligible:
            chosen[label] = max(eligible, key=lambda i: scores[i][0])
        else:
            chosen[label] = max(range(len(group)), key=lambda i: scores[i][1])
        for i, (run, (entropy, reward)) in enumerate(zip(group, scores)):
            mark = " kept" if i == chosen[label] else ""
            lines.append(f"{label} {run.knob}: entropy {entropy:.4f}, reward {reward:.4f}{mark}")
    previous = json.loads((out / "tuning.json").read_text()) if (out / "tuning.json").exists() else {}
    chosen = {**previous, **chosen}  # a tuning of some methods (--methods) keeps the others' choices
    (out / "tuning.json").write_text(json.dumps(chosen, indent=2) + "\n")
    (out / "tuning.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr)
    return chosen


def compared_runs(
    args: argparse.Namespace, setting_: Setting, out: Path, chosen: dict[str, int]
) -> list[Run]:
    """Each method at its kept variant on every reported seed, under ``compare/<label>``; with
    ``--all-variants``, its other variants too, each a label of its own (``KLCov kl_coef=4.0``) under
    ``compare/<label>-<knob>``: a setting the tuning rule did not keep, measured on the same seeds.
    ``--methods`` names methods (``KLCov``) or single variants (``KLCov kl_coef=4.0``)."""
    runs = []
    for seed in args.seeds:
        for method in methods(args.model):
            kept = chosen.get(method.tuned_as or method.label, 0)
            for index, (knob, callbacks, extra) in enumerate(method.variants):
                label = method.label if index == kept else f"{method.label} {knob}"
                named = bool(args.methods) and label in args.methods
                method_wanted = not args.methods or method.label in args.methods
                if not (named or (method_wanted and (index == kept or args.all_variants))):
                    continue
                name = method.label if index == kept else f"{method.label}-{knob}"
                folder = out / "compare" / name / f"seed{seed}"
                runs.append(
                    Run(
                        label,
                        knob,
                        seed,
                        folder,
                        fit_command(setting_, folder, seed, args.iterations, callbacks, extra),
                    )
                )
    return runs


def transfer_runs(args: argparse.Namespace, setting_: Setting, out: Path, sources: list[Run]) -> list[Run]:
    runs = []
    for source in sources:
        folder = out / "transfer" / source.folder.parent.name / f"seed{source.seed}"  # compare's folder name
        runs.append(
            Run(
                source.label,
                source.knob,
                source.seed,
                folder,
                fit_command(
                    setting_,
                    folder,
                    source.seed,
                    args.transfer_iterations,
                    [],
                    [],
                    transfer_from=source.folder / "adapter",
                ),
            )
        )
    return runs


TUNING_SEED = "(tuning seed)"  # the suffix of a tuning run's label in the final validations

VALIDATION_KEYS = (
    "--trainer.val_check_interval",
    "--model.init_args.val_num_samples",
    "--model.init_args.pass_at_k",
)


def without(options: list[str], keys: tuple[str, ...]) -> list[str]:
    """``options`` (``--key value`` pairs) less the pairs whose key is in ``keys``."""
    pairs = zip(options[::2], options[1::2], strict=True)
    return [item for key, value in pairs if key not in keys for item in (key, value)]


def final_runs(args: argparse.Namespace, setting_: Setting, sources: list[Run]) -> list[Run]:
    """`lit-entropy validate` of each compared run's final adapter, with ``--final-samples`` sampled answers.

    It measures pass@k and answer diversity once, at the end, where sampling at every validation of the run
    would cost too much (SmolLM2 on a CPU). Logged under ``<run>/final/validate/version_0``.
    """
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= args.final_samples]
    runs = []
    for source in sources:
        folder = source.folder / "final"
        command = [
            sys.executable,
            "-m",
            "lit_entropy",
            "validate",
            "--config",
            str(ROOT / setting_.recipe),
            "--seed_everything",
            str(source.seed),
            "--model.init_args.seed",
            str(source.seed),
            "--trainer.default_root_dir",
            str(folder),
            "--trainer.enable_progress_bar",
            "false",
            *without(setting_.options, VALIDATION_KEYS),
            "--model.init_args.val_num_samples",
            str(args.final_samples),
            "--model.init_args.pass_at_k",
            json.dumps(ks),
            "--model.init_args.policy.adapter_path",
            str(source.folder / "adapter"),
        ]
        runs.append(Run(source.label, source.knob, source.seed, folder, command))
    return runs


def validated_runs(args: argparse.Namespace, tuned: dict[str, list[Run]], compared: list[Run]) -> list[Run]:
    """The finished runs whose final adapters are validated: the compared ones, then the tuning ones.

    The tuning runs are rows of their own: a variant the rule did not keep is still a measured setting (a
    stronger knob's pass@k, on the seed that is never reported). A run on the tuning seed, compared or tuned,
    is labelled as such, so that the table sets it against the baseline's run on that seed alone.
    """
    on_tuning_seed = [
        replace(run, label=f"{run.label} {TUNING_SEED}") if run.seed == args.tune_seed else run
        for run in compared
        if run.finished()
    ]
    return on_tuning_seed + [
        replace(
            run,
            label=f"{run.label} {run.knob} {TUNING_SEED}" if run.label != "GRPO" else f"GRPO {TUNING_SEED}",
        )
        for group in tuned.values()
        for run in group
        if run.finished()
    ]


def final_table(runs: list[Run], destination: Path, baseline: str = "GRPO") -> None:
    """A markdown table of the final validations: mean ± std over seeds per label, and pass@k against the
    baseline's (the difference of the means, and whether it exceeds both labels' seed spreads)."""
    from lit_entropy.report import _cell, _mean_std
    from lit_entropy.run_log import find_metrics_csv, read_metrics

    if not runs:
        print(f"no final validations for {destination}: nothing to tabulate", file=sys.stderr)
        return
    values: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        metrics = read_metrics(find_metrics_csv(run.folder / "validate"))
        for name, points in metrics.items():
            if name.startswith("val/"):
                values.setdefault(run.label, {}).setdefault(name, []).append(points[-1][1])
    names = sorted({name for by_name in values.values() for name in by_name}, key=_metric_order)

    def cell(numbers: list[float]) -> str:
        return _cell(_mean_std(numbers), len(numbers))

    lines = [
        "| label | seeds | " + " | ".join(name.removeprefix("val/") for name in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for label, by_name in values.items():
        seeds = max(len(numbers) for numbers in by_name.values())
        lines.append(
            f"| {label} | {seeds} | " + " | ".join(cell(by_name.get(name, [])) for name in names) + " |"
        )
    passes = [name for name in names if name.startswith("val/pass@")]
    tuning_baseline = f"{baseline} {TUNING_SEED}"
    if passes and baseline in values:
        largest = passes[-1]
        lines += [
            "",
            f"{largest} against {baseline} (a tuning-seed row against {tuning_baseline}): difference of the "
            "means (spread: the larger seed std)",
            "",
        ]
        for label, by_name in values.items():
            # a tuning-seed row is one seed: only the baseline's run on that seed is comparable with it
            reference_label = tuning_baseline if label.endswith(TUNING_SEED) else baseline
            reference = values.get(reference_label, {}).get(largest, [])
            if label in (baseline, tuning_baseline) or not by_name.get(largest) or not reference:
                continue
            (ours, ours_std), (theirs, theirs_std) = _mean_std(by_name[largest]), _mean_std(reference)
            spread = max(ours_std, theirs_std)
            difference = ours - theirs
            if len(by_name[largest]) == 1 and len(reference) == 1:
                lines.append(f"- {label}: {difference:+.4f} (one seed each: no spread to judge it by)")
                continue
            verdict = "beyond the spread" if abs(difference) > spread else "within the spread"
            lines.append(f"- {label}: {difference:+.4f} ({verdict}, spread {spread:.4f})")
    destination.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    (destination / "final.md").write_text(text)
    print(text, file=sys.stderr)


def _metric_order(name: str) -> tuple[int, int, str]:
    """accuracy, reward, pass@1, pass@2, ..., then the rest by name."""
    if name.startswith("val/pass@"):
        return (1, int(name.removeprefix("val/pass@")), name)
    first = {"val/accuracy": -2, "val/reward": -1}
    return (0 if name in first else 2, first.get(name, 0), name)


def report(runs: list[Run], destination: Path, last: int) -> None:
    if not runs:
        print(f"no finished runs for {destination}: nothing to report", file=sys.stderr)
        return
    command = [
        sys.executable,
        "-m",
        "lit_entropy",
        "report",
        *(str(run.folder) for run in runs),
        "--labels",
        *(run.label for run in runs),
        "--out",
        str(destination),
        "--last",
        str(last),
    ]
    print(" ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["embedded", "smollm2"], default="embedded")
    parser.add_argument(
        "--stage", choices=["all", "tune", "compare", "final", "transfer", "report"], default="all"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/evidence"))
    parser.add_argument(
        "--iterations", type=int, help="RL iterations per run (default: 50 embedded, 10 smollm2)"
    )
    parser.add_argument("--transfer-iterations", type=int, help="RL iterations on the second task")
    parser.add_argument("--val-every", type=int, help="RL iterations between validations")
    parser.add_argument("--samples", type=int, help="sampled completions per validation prompt (pass@k)")
    parser.add_argument(
        "--final-samples",
        type=int,
        help="sampled answers per prompt when each final adapter is validated (pass@k; default 0 embedded, whose "
        "runs sample at every validation, 8 smollm2; 0 = no final validation)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tune-seed", type=int, default=100)
    parser.add_argument(
        "--reward-tolerance",
        type=float,
        default=0.03,
        help="a tuned value may cost at most this much final reward against the baseline",
    )
    parser.add_argument(
        "--methods",
        nargs="*",
        help="methods to compare (KLCov), or single variants of them ('KLCov kl_coef=4.0'); default: all",
    )
    parser.add_argument(
        "--all-variants",
        action="store_true",
        help="compare every variant of each method on the reported seeds, not only the one tuning kept",
    )
    parser.add_argument(
        "--tuning",
        type=Path,
        help="a tuning.json to use instead of this model's own (e.g. the embedded one's)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    args = parser.parse_args()
    embedded = args.model == "embedded"
    args.iterations = args.iterations or (40 if embedded else 8)
    args.transfer_iterations = args.transfer_iterations or (20 if embedded else 6)
    args.val_every = args.val_every or (3 if embedded else 2)
    args.samples = args.samples if args.samples is not None else (16 if embedded else 0)
    if args.final_samples is None:
        args.final_samples = 0 if embedded else 8
    setting_ = setting(args.model, args.iterations, args.val_every, args.samples)
    out = args.out.resolve() / args.model
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tuning = args.tuning or out / "tuning.json"
    if args.stage in ("all", "tune"):
        chosen = tune(args, setting_, out)
    else:
        chosen = json.loads(tuning.read_text()) if tuning.exists() else {}
    compared = compared_runs(args, setting_, out, chosen)
    if args.stage in ("all", "compare"):
        execute_all(compared, args.jobs, setting_.threads)
    finals = final_runs(args, setting_, validated_runs(args, tuning_runs(args, setting_, out), compared))
    if args.stage in ("all", "final") and args.final_samples > 0:
        execute_all(finals, args.jobs, setting_.threads)
    transferred = transfer_runs(args, setting_, out, compared)
    if args.stage in ("all", "transfer"):
        execute_all(transferred, args.jobs, setting_.threads)
    if args.stage in ("all", "report"):
        last = final_window(args)
        report([run for run in compared if run.finished()], out / "report", last=last)
        report([run for run in transferred if run.finished()], out / "report_transfer", last=min(last, 5))
        final_table([run for run in finals if run.finished()], out / "report")
    print(
        f"evidence ({args.model}, stage {args.stage}): {time.perf_counter() - started:.0f} s", file=sys.stderr
    )


if __name__ == "__main__":
    main()
