"""`lit-entropy report RUN_DIR [RUN_DIR ...] --out DIR [--labels ...]`: figures and a table from run logs.

Each ``RUN_DIR`` holds one run's Lightning CSVLogger output, possibly nested (``**/metrics.csv``; of several,
the newest file is used) with the ``config.yaml`` that LightningCLI saves next to it. A run is labelled by
its regularizers (the `lit_entropy.Regularizer` classes among ``trainer.callbacks`` in ``config.yaml``, joined
with ``+``), ``GRPO`` when it has none; ``--labels`` overrides. Runs sharing a label (seeds) are aggregated:
the mean, and the min-max band across seeds.

Written to ``--out``:

- ``entropy_vs_step.png``: ``train/entropy`` (nats) per RL iteration;
- ``reward_vs_step.png``: ``rollout/reward_mean``, a trailing rolling mean of ``--smooth`` iterations;
- ``accuracy_vs_entropy.png``: ``val/accuracy`` against the training entropy at each validation, with the law
  ``R = -a * exp(H) + b`` fitted per label (`lit_entropy.callbacks.entropy_law.fit_entropy_law`);
- ``pass_at_k.png``: the ``val/pass@K`` of the last validation against ``K``, when such columns exist;
- ``report.md``: per label, seeds, final entropy and reward (means of the last ``--last`` iterations),
  last ``val/accuracy``, pass@k at the largest k (mean ± sample std over seeds), and the law's a, b, ceiling
  and R^2; then a second table against the baseline label (``--baseline``, default ``GRPO``): the final
  entropy as a multiple of the baseline's, pass@k at every k, the answer diversity of the last validation
  (``val/distinct_correct``, ``val/distinct_answers``) and the error of the law fitted on each run's first 15%
  of validations over the remaining 85% (RMSE).

The entropy paired with a validation is the mean ``train/entropy`` of the iterations since the previous
validation, as `EntropyLaw` pairs them, so the table's a and b agree with the callback's ``law/*``. The x axis
is the CSV's ``step``, which Lightning advances once per training batch: one RL iteration.

matplotlib is optional (``pip install 'lit-entropy[report]'``); everything but the drawing is plain Python.

Runs are read by `lit_entropy.run_log`, the figures drawn by `lit_entropy.report_figures`; this module holds
the summary table, ``write_report`` and the command line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lit_entropy.callbacks.entropy_law import LawFit, fit_entropy_law, predict
from lit_entropy.errors import ConfigError, DataError
from lit_entropy.report_figures import (
    accuracy_figure,
    band_figure,
    import_pyplot,
    pass_at_k_figure,
    rolling_mean,
)
from lit_entropy.run_log import (
    ACCURACY,
    BASELINE_LABEL,
    ENTROPY,
    REWARD,
    RunLog,
    last_pass_at_k,
    load_run,
    validation_pairs,
)

__all__ = [
    "LabelSummary",
    "baseline_table",
    "early_law_error",
    "early_law_rmse",
    "fit_label",
    "main",
    "markdown_table",
    "summarize",
    "write_report",
]

#: Answer-diversity columns of the validation log, reported at the last validation.
DISTINCT_CORRECT = "val/distinct_correct"
DISTINCT_ANSWERS = "val/distinct_answers"

#: Fewer (entropy, val/accuracy) pairs than this make the law's fit a warning: two points fit any line exactly.
MIN_LAW_POINTS = 5

# --- summaries -----------------------------------------------------------------------------------------


def fit_label(runs: Sequence[RunLog]) -> LawFit | None:
    """The law fitted on the validation pairs of all ``runs`` pooled; None when it cannot be fitted."""
    pairs = [pair for run in runs for pair in validation_pairs(run)]
    if len(pairs) < 2:
        return None
    entropy = torch.tensor([h for h, _ in pairs], dtype=torch.float64)
    accuracy = torch.tensor([r for _, r in pairs], dtype=torch.float64)
    try:
        return fit_entropy_law(entropy, accuracy)
    except DataError:  # e.g. every entropy equal: no law to draw, the table says n/a
        return None


def _early_fit(run: RunLog, fraction: float) -> tuple[LawFit, list[tuple[float, float]]] | None:
    """The law fitted on the run's first ``max(2, round(fraction * V))`` of its ``V`` validation pairs, and the
    pairs after them; None when fewer than 3 pairs exist or the early pairs cannot be fitted."""
    pairs = validation_pairs(run)
    count = max(2, round(fraction * len(pairs)))
    if len(pairs) < 3 or count >= len(pairs):
        return None
    early = pairs[:count]
    try:
        fit = fit_entropy_law(
            torch.tensor([h for h, _ in early], dtype=torch.float64),
            torch.tensor([r for _, r in early], dtype=torch.float64),
        )
    except DataError:
        return None
    return fit, pairs[count:]


def early_law_error(run: RunLog, fraction: float = 0.15) -> float | None:
    """|predicted - observed| final accuracy of the law fitted on the run's first ``fraction`` of validations.

    The fit uses the first ``max(2, round(fraction * V))`` of the run's ``V`` validation pairs (the paper fits on
    the first ~15% of training); the prediction is the law at the last pair's entropy. None when fewer than 3 pairs
    exist or the early pairs cannot be fitted.
    """
    early = _early_fit(run, fraction)
    if early is None:
        return None
    fit, rest = early
    final_entropy, final_accuracy = rest[-1]
    return abs(float(predict(fit, final_entropy)) - final_accuracy)


def early_law_rmse(run: RunLog, fraction: float = 0.15) -> float | None:
    """Root-mean-square error, over every later validation, of the law fitted on the first ``fraction``.

    The same early fit as `early_law_error`; the prediction at each remaining pair's entropy is compared with
    its accuracy. None under the same conditions.
    """
    early = _early_fit(run, fraction)
    if early is None:
        return None
    fit, rest = early
    errors = [(float(predict(fit, entropy)) - accuracy) ** 2 for entropy, accuracy in rest]
    return statistics.fmean(errors) ** 0.5


@dataclass(frozen=True)
class LabelSummary:
    """The table row of one label. Each ``(mean, std)`` is over seeds (sample std; 0 with one seed); None
    where no run of the label logged the metric."""

    label: str
    seeds: int
    final_entropy: tuple[float, float]
    final_reward: tuple[float, float] | None
    last_accuracy: tuple[float, float] | None
    pass_at_k: tuple[int, float, float] | None  # (k, mean, std) at the largest k
    fit: LawFit | None
    early_law_error: tuple[float, float] | None = None  # |pred - obs| final accuracy, law fitted on first 15%
    law_points: int = 0  # the (entropy, val/accuracy) pairs the law was fitted on
    final_entropies: tuple[float, ...] = ()  # per seed, the mean of the last iterations
    pass_at_every_k: dict[int, tuple[float, float]] | None = None  # k -> (mean, std) at the last validation
    distinct_correct: tuple[float, float] | None = None  # last validation's val/distinct_correct
    distinct_answers: tuple[float, float] | None = None  # last validation's val/distinct_answers
    early_law_rmse: tuple[float, float] | None = None  # law fitted on the first 15%, RMSE over the rest

    @property
    def too_few_law_points(self) -> bool:
        """Whether the law was fitted on fewer than `MIN_LAW_POINTS` pairs (its R² then says little)."""
        return self.fit is not None and self.law_points < MIN_LAW_POINTS

    def law_warning(self) -> str:
        """What to tell the user about a fit on too few points ("" when there are enough)."""
        if not self.too_few_law_points:
            return ""
        return (
            f"label {self.label!r}: the law is fitted on {self.law_points} (entropy, val/accuracy) points; "
            f"below {MIN_LAW_POINTS} its a, b and R² say little (two points fit any line: R² = 1): validate "
            "more often (trainer.val_check_interval) or train longer"
        )


def _mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: Sequence[RunLog], last: int = 10) -> list[LabelSummary]:
    """One `LabelSummary` per label, in order of first appearance.

    Final entropy and reward are, per seed, the means of the last ``last`` logged values.
    """
    if last < 1:
        raise ConfigError(f"--last={last} must be >= 1")
    summaries = []
    for label, group in _by_label(runs).items():
        rewards = [statistics.fmean(run.values(REWARD)[-last:]) for run in group if run.values(REWARD)]
        accuracies = [run.values(ACCURACY)[-1] for run in group if run.values(ACCURACY)]
        pass_at = [last_pass_at_k(run) for run in group]
        every_k = sorted({k for p in pass_at for k in p})
        pass_at_every_k = {k: _mean_std([p[k] for p in pass_at if k in p]) for k in every_k}
        pass_row = (every_k[-1], *pass_at_every_k[every_k[-1]]) if every_k else None  # the largest k
        entropies = [statistics.fmean(run.values(ENTROPY)[-last:]) for run in group]
        entropy = _mean_std(entropies)
        assert entropy is not None  # load_run guarantees train/entropy
        summaries.append(
            LabelSummary(
                label=label,
                seeds=len(group),
                final_entropy=entropy,
                final_reward=_mean_std(rewards),
                last_accuracy=_mean_std(accuracies),
                pass_at_k=pass_row,
                fit=fit_label(group),
                law_points=sum(len(validation_pairs(run)) for run in group),
                early_law_error=_mean_std([e for run in group if (e := early_law_error(run)) is not None]),
                final_entropies=tuple(entropies),
                pass_at_every_k=pass_at_every_k or None,  # type: ignore[arg-type]
                distinct_correct=_mean_std(
                    [run.values(DISTINCT_CORRECT)[-1] for run in group if run.values(DISTINCT_CORRECT)]
                ),
                distinct_answers=_mean_std(
                    [run.values(DISTINCT_ANSWERS)[-1] for run in group if run.values(DISTINCT_ANSWERS)]
                ),
                early_law_rmse=_mean_std([e for run in group if (e := early_law_rmse(run)) is not None]),
            )
        )
    return summaries


def _by_label(runs: Sequence[RunLog]) -> dict[str, list[RunLog]]:
    groups: dict[str, list[RunLog]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    return groups


def _cell(value: tuple[float, float] | None, seeds: int) -> str:
    if value is None:
        return "n/a"
    mean, std = value
    return f"{mean:.4f}" if seeds == 1 else f"{mean:.4f} ± {std:.4f}"


def markdown_table(summaries: Sequence[LabelSummary], last: int = 10) -> str:
    """The markdown table of `summarize`'s rows (numbers to 4 decimals, ``n/a`` where missing)."""
    lines = [
        f"| label | seeds | final entropy (nats, last {last}) | final reward (last {last}) "
        "| last val/accuracy | pass@k (largest k) | a | b | ceiling (b - a) | R² "
        "| law on first 15%: abs. error of final accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summaries:
        if row.pass_at_k is None:
            pass_cell = "n/a"
        else:
            k, mean, std = row.pass_at_k
            pass_cell = f"{_cell((mean, std), row.seeds)} (k={k})"
        fit = (
            ["n/a"] * 4
            if row.fit is None
            else [f"{row.fit.a:.4f}", f"{row.fit.b:.4f}", f"{row.fit.ceiling:.4f}", f"{row.fit.r2:.4f}"]
        )
        if row.too_few_law_points:
            fit[-1] += f" ({row.law_points} points: too few)"
        cells = [
            row.label,
            str(row.seeds),
            _cell(row.final_entropy, row.seeds),
            _cell(row.final_reward, row.seeds),
            _cell(row.last_accuracy, row.seeds),
            pass_cell,
            *fit,
            _cell(row.early_law_error, row.seeds),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ratio_cell(value: tuple[float, float] | None, seeds: int) -> str:
    if value is None:
        return "n/a"
    mean, std = value
    return f"{mean:.2f}x" if seeds == 1 else f"{mean:.2f}x ± {std:.2f}"


def baseline_table(summaries: Sequence[LabelSummary], baseline: str = BASELINE_LABEL) -> str:
    """The markdown table that sets each label against ``baseline`` (a label of ``summaries``, or absent).

    ``entropy / baseline`` is, per seed, the final entropy divided by the baseline's mean final entropy, then
    mean ± std over seeds (``n/a`` without the baseline). pass@k has one column per k any run logged.
    """
    reference = next((row for row in summaries if row.label == baseline), None)
    ks = sorted({k for row in summaries for k in (row.pass_at_every_k or {})})
    lines = [
        f"| label | entropy / {baseline} | "
        + "".join(f"pass@{k} | " for k in ks)
        + "distinct correct | distinct answers | law on first 15%: RMSE on the rest |",
        "|---|---|" + "---|" * len(ks) + "---|---|---|",
    ]
    for row in summaries:
        ratio = None
        if reference is not None and reference.final_entropy[0] > 0:
            ratio = _mean_std([h / reference.final_entropy[0] for h in row.final_entropies])
        passes = row.pass_at_every_k or {}
        cells = [
            row.label,
            _ratio_cell(ratio, row.seeds),
            *(_cell(passes.get(k), row.seeds) for k in ks),
            _cell(row.distinct_correct, row.seeds),
            _cell(row.distinct_answers, row.seeds),
            _cell(row.early_law_rmse, row.seeds),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- writing -------------------------------------------------------------------------------------------


def write_report(
    runs: Sequence[RunLog], out: Path, smooth: int = 10, last: int = 10, baseline: str = BASELINE_LABEL
) -> list[Path]:
    """Write the figures and ``report.md`` for ``runs`` into ``out`` (created if needed).

    Returns:
        The files written. ``accuracy_vs_entropy.png`` is skipped when no run logged ``val/accuracy``,
        ``pass_at_k.png`` when none logged ``val/pass@K``.
    """
    if not runs:
        raise ConfigError("lit-entropy report needs at least one run folder")
    plt = import_pyplot()
    out.mkdir(parents=True, exist_ok=True)
    groups = _by_label(runs)
    summaries = summarize(runs, last=last)
    written = []

    path = out / "entropy_vs_step.png"
    entropy = {label: [run.metrics[ENTROPY] for run in group] for label, group in groups.items()}
    band_figure(plt, entropy, "train/entropy (nats)", "Token entropy (min-max over seeds)", path)
    written.append(path)

    reward = {
        label: [
            list(zip([s for s, _ in run.metrics[REWARD]], rolling_mean(run.values(REWARD), smooth)))
            for run in group
            if REWARD in run.metrics
        ]
        for label, group in groups.items()
    }
    reward = {label: series for label, series in reward.items() if series}
    if reward:
        path = out / "reward_vs_step.png"
        title = f"Rollout reward, rolling mean of {smooth} (min-max over seeds)"
        band_figure(plt, reward, REWARD, title, path)
        written.append(path)

    if any(ACCURACY in run.metrics for run in runs):
        path = out / "accuracy_vs_entropy.png"
        accuracy_figure(plt, groups, {row.label: row.fit for row in summaries}, path)
        written.append(path)

    if any(last_pass_at_k(run) for run in runs):
        path = out / "pass_at_k.png"
        pass_at_k_figure(plt, groups, path)
        written.append(path)

    path = out / "report.md"
    sources = "\n".join(f"- {run.label}: `{run.path}`" for run in runs)
    path.write_text(
        "# lit-entropy report\n\n"
        + markdown_table(summaries, last=last)
        + "\nMeans ± sample std over seeds. a, b: the law R = -a exp(H) + b fitted by least squares on the "
        "pooled (entropy, val/accuracy) pairs of a label's seeds; ceiling = b - a.\n"
        + "".join(f"\n**Warning:** {row.law_warning()}\n" for row in summaries if row.too_few_law_points)
        + f"\n## Against {baseline}\n\n"
        + baseline_table(summaries, baseline)
        + f"\nentropy / {baseline}: each seed's final entropy over the mean final entropy of {baseline}. pass@k, "
        "distinct correct and distinct answers (different completions per prompt among the validation samples): "
        "the last validation. The early law is fitted on each run's first 15% of validations and scored on the "
        "rest.\n" + "\n## Runs\n\n" + sources + "\n"
    )
    written.append(path)
    return written


# --- command line --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-entropy report",
        description="Figures (PNG) and a markdown table from the CSV logs of lit-entropy runs.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run's log folder")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs and report.md")
    parser.add_argument("--labels", nargs="+", help="one label per RUN_DIR (default: from config.yaml)")
    parser.add_argument("--smooth", type=int, default=10, help="rolling-mean window of the reward curve")
    parser.add_argument("--last", type=int, default=10, help="iterations averaged for the final values")
    parser.add_argument(
        "--baseline", default=BASELINE_LABEL, help="the label the second table compares against"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``lit-entropy report``; bad input raises `ConfigError` / `DataError`."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.labels is not None and len(args.labels) != len(args.run_dirs):
        raise ConfigError(
            f"--labels has {len(args.labels)} labels for {len(args.run_dirs)} run folders; "
            "give one per RUN_DIR"
        )
    if args.smooth < 1:
        raise ConfigError(f"--smooth={args.smooth} must be >= 1")
    import_pyplot()  # fail on a missing extra before reading any log
    labels = args.labels or [None] * len(args.run_dirs)
    runs = [load_run(run_dir, label) for run_dir, label in zip(args.run_dirs, labels)]
    if args.baseline not in {run.label for run in runs}:
        print(
            f"lit-entropy report: warning: no run is labelled {args.baseline!r} (--baseline): "
            "the entropy ratios are n/a",
            file=sys.stderr,
        )
    for path in write_report(runs, args.out, smooth=args.smooth, last=args.last, baseline=args.baseline):
        print(path)
    for row in summarize(runs, last=args.last):
        if row.too_few_law_points:
            print(f"lit-entropy report: warning: {row.law_warning()}", file=sys.stderr)


if __name__ == "__main__":
    main()
