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
  and R^2.

The entropy paired with a validation is the mean ``train/entropy`` of the iterations since the previous
validation, as `EntropyLaw` pairs them, so the table's a and b agree with the callback's ``law/*``. The x axis
is the CSV's ``step``, which Lightning advances once per training batch: one RL iteration.

matplotlib is optional (``pip install 'lit-entropy[report]'``); everything but the drawing is plain Python.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import math
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from lit_entropy.callbacks.entropy_law import LawFit, fit_entropy_law, predict
from lit_entropy.errors import ConfigError, DataError

__all__ = [
    "LabelSummary",
    "RunLog",
    "aggregate",
    "config_label",
    "find_metrics_csv",
    "load_run",
    "main",
    "markdown_table",
    "read_metrics",
    "rolling_mean",
    "summarize",
    "validation_pairs",
    "write_report",
]

BASELINE_LABEL = "GRPO"
ENTROPY = "train/entropy"
REWARD = "rollout/reward_mean"
ACCURACY = "val/accuracy"
_PASS_AT = re.compile(r"^val/pass@(\d+)$")
_VERSION = re.compile(r"version_(\d+)$")

#: one metric's points of one run, ``(step, value)`` in step order
Series = list[tuple[int, float]]


# --- reading logs --------------------------------------------------------------------------------------


def find_metrics_csv(run_dir: Path) -> Path:
    """The newest ``metrics.csv`` under ``run_dir`` (by modification time, then ``version_N``, then path).

    Raises:
        DataError: ``run_dir`` is not a folder or holds no ``metrics.csv``.
    """
    if not run_dir.is_dir():
        raise DataError(f"run folder {str(run_dir)!r} does not exist")
    found = sorted(run_dir.glob("**/metrics.csv"), key=_newest_key)
    if not found:
        raise DataError(f"no metrics.csv under {str(run_dir)!r}: is it the log folder of a CSVLogger run?")
    return found[-1]


def _newest_key(path: Path) -> tuple[float, int, str]:
    version = _VERSION.search(path.parent.name)
    return (path.stat().st_mtime, int(version.group(1)) if version else -1, str(path))


def read_metrics(path: Path) -> dict[str, Series]:
    """Every metric column of a CSVLogger ``metrics.csv`` as ``(step, value)`` points, empty cells skipped.

    Raises:
        DataError: the file has no ``step`` column, or a cell that is not a number.
    """
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise DataError(f"{path} has no 'step' column: is it a Lightning CSVLogger metrics.csv?")
        series: dict[str, Series] = {name: [] for name in reader.fieldnames if name not in ("step", "epoch")}
        for line, row in enumerate(reader, start=2):
            try:
                step = int(float(row["step"]))
                for name in series:
                    cell = row.get(name)
                    if cell not in (None, ""):
                        series[name].append((step, float(cell)))
            except ValueError as error:
                raise DataError(f"{path} line {line}: {error}") from None
    for points in series.values():
        points.sort(key=lambda point: point[0])  # stable: rows of one step keep their order
    return {name: points for name, points in series.items() if points}


def config_label(config: dict[str, Any]) -> str:
    """The label of a run from its LightningCLI ``config.yaml``: its regularizers' class names, or ``GRPO``.

    A callback counts as a regularizer when its class imports and subclasses `lit_entropy.Regularizer`;
    a class that does not import counts too, unless it comes from Lightning (it may be a user's regularizer
    whose package is not installed here).
    """
    callbacks = ((config or {}).get("trainer") or {}).get("callbacks") or []
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    names = []
    for callback in callbacks:
        class_path = callback.get("class_path") if isinstance(callback, dict) else callback
        if isinstance(class_path, str) and _is_regularizer(class_path):
            names.append(class_path.rsplit(".", 1)[-1])
    return "+".join(names) or BASELINE_LABEL


def _is_regularizer(class_path: str) -> bool:
    from lit_entropy.regularizer import Regularizer

    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        return not class_path.startswith(("lightning.", "pytorch_lightning."))
    return isinstance(cls, type) and issubclass(cls, Regularizer)


@dataclass
class RunLog:
    """One run's metrics.

    Attributes:
        label: the run's label (its regularizers, or ``--labels``).
        path: the ``metrics.csv`` read.
        metrics: metric name -> ``(step, value)`` points.
    """

    label: str
    path: Path
    metrics: dict[str, Series] = field(repr=False)

    def values(self, name: str) -> list[float]:
        return [value for _, value in self.metrics.get(name, [])]


def load_run(run_dir: Path, label: str | None = None) -> RunLog:
    """Read the newest ``metrics.csv`` under ``run_dir`` and label it (``label``, else from ``config.yaml``).

    ``config.yaml`` is looked for next to ``metrics.csv``, then in its parents up to ``run_dir``; without one
    the run is the baseline, ``GRPO``.

    Raises:
        DataError: no ``metrics.csv``, no ``train/entropy`` in it, or an unreadable ``config.yaml``.
    """
    path = find_metrics_csv(run_dir)
    metrics = read_metrics(path)
    if ENTROPY not in metrics:
        raise DataError(f"{path} has no {ENTROPY!r} values: is it the log of a lit_entropy training run?")
    if label is None:
        label = BASELINE_LABEL
        for folder in [path.parent, *path.parent.parents]:
            config_path = folder / "config.yaml"
            if config_path.is_file():
                try:
                    label = config_label(yaml.safe_load(config_path.read_text()))
                except yaml.YAMLError as error:
                    raise DataError(f"{config_path} is not valid YAML: {error}") from None
                break
            if folder == run_dir:
                break
    return RunLog(label=label, path=path, metrics=metrics)


# --- pure computations ---------------------------------------------------------------------------------


def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean of ``window`` values (fewer at the start): ``out[i] = mean(v[i-w+1 : i+1])``."""
    if window < 1:
        raise ConfigError(f"rolling window={window} must be >= 1")
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def aggregate(series: Sequence[Series]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean, min and max across runs at every step any run has (each over the runs that have that step).

    Returns:
        ``(steps, mean, low, high)``, in step order.
    """
    by_step: dict[int, list[float]] = {}
    for points in series:
        for step, value in points:
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return (
        steps,
        [statistics.fmean(by_step[s]) for s in steps],
        [min(by_step[s]) for s in steps],
        [max(by_step[s]) for s in steps],
    )


def validation_pairs(run: RunLog) -> list[tuple[float, float]]:
    """``(entropy, accuracy)`` per validation: each ``val/accuracy`` at step ``s`` with the mean
    ``train/entropy`` of the steps in ``(s_prev, s]`` (``s_prev``: the previous validation), as `EntropyLaw`
    pairs them. A validation with no training step in its window gives no pair."""
    entropy = run.metrics.get(ENTROPY, [])
    pairs, previous = [], -math.inf
    for step, accuracy in run.metrics.get(ACCURACY, []):
        window = [value for s, value in entropy if previous < s <= step]
        if window:
            pairs.append((statistics.fmean(window), accuracy))
        previous = step
    return pairs


def last_pass_at_k(run: RunLog) -> dict[int, float]:
    """``{K: val/pass@K}`` at the run's last validation that logged any pass@K."""
    columns = {int(m.group(1)): name for name in run.metrics if (m := _PASS_AT.match(name))}
    if not columns:
        return {}
    last = max(run.metrics[name][-1][0] for name in columns.values())
    return {
        k: [value for step, value in run.metrics[name] if step == last][-1]
        for k, name in sorted(columns.items())
        if any(step == last for step, _ in run.metrics[name])
    }


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


def early_law_error(run: RunLog, fraction: float = 0.15) -> float | None:
    """|predicted - observed| final accuracy of the law fitted on the run's first ``fraction`` of validations.

    The fit uses the first ``max(2, round(fraction * V))`` of the run's ``V`` validation pairs (the paper fits on
    the first ~15% of training); the prediction is the law at the last pair's entropy. None when fewer than 3 pairs
    exist or the early pairs cannot be fitted.
    """
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
    final_entropy, final_accuracy = pairs[-1]
    return abs(float(predict(fit, final_entropy)) - final_accuracy)


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
        largest = max((max(p) for p in pass_at if p), default=None)
        pass_row = None
        if largest is not None:
            mean_std = _mean_std([p[largest] for p in pass_at if largest in p])
            assert mean_std is not None
            pass_row = (largest, *mean_std)
        entropy = _mean_std([statistics.fmean(run.values(ENTROPY)[-last:]) for run in group])
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
                early_law_error=_mean_std([e for run in group if (e := early_law_error(run)) is not None]),
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


# --- figures -------------------------------------------------------------------------------------------


def _import_pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ConfigError("lit-entropy report needs matplotlib: pip install 'lit-entropy[report]'") from error
    matplotlib.use("Agg")  # files only: never open a window, works without a display
    import matplotlib.pyplot as plt

    return plt


def _band_figure(plt: Any, groups: dict[str, list[Series]], ylabel: str, title: str, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, series in groups.items():
        steps, mean, low, high = aggregate(series)
        (line,) = axes.plot(steps, mean, label=f"{label} (n={len(series)})")
        if len(series) > 1:
            axes.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set_xlabel("RL iteration (logged step)")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _accuracy_figure(
    plt: Any, groups: dict[str, list[RunLog]], fits: dict[str, LawFit | None], path: Path
) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, runs in groups.items():
        pairs = [pair for run in runs for pair in validation_pairs(run)]
        if not pairs:
            continue
        entropy = [h for h, _ in pairs]
        points = axes.scatter(entropy, [r for _, r in pairs], s=14, alpha=0.7, label=label)
        fit = fits[label]
        if fit is not None:
            grid = torch.linspace(min(entropy), max(entropy), 100, dtype=torch.float64)
            axes.plot(
                grid.tolist(),
                predict(fit, grid).tolist(),
                color=points.get_facecolor()[0],
                label=f"{label}: {fit.b:.3f} - {fit.a:.3f} exp(H), R²={fit.r2:.3f}",
            )
    axes.set_xlabel("training entropy H (nats, mean since the previous validation)")
    axes.set_ylabel(ACCURACY)
    axes.set_title("Validation accuracy against entropy, with R = -a exp(H) + b")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _pass_at_k_figure(plt: Any, groups: dict[str, list[RunLog]], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    all_k: set[int] = set()
    for label, runs in groups.items():
        per_run = [last_pass_at_k(run) for run in runs]
        ks = sorted({k for p in per_run for k in p})
        if not ks:
            continue
        all_k.update(ks)
        values = [[p[k] for p in per_run if k in p] for k in ks]
        mean = [statistics.fmean(v) for v in values]
        errors = [[m - min(v) for m, v in zip(mean, values)], [max(v) - m for m, v in zip(mean, values)]]
        axes.errorbar(ks, mean, yerr=errors, marker="o", capsize=3, label=f"{label} (n={len(runs)})")
    if all_k and max(all_k) / min(all_k) >= 8:
        axes.set_xscale("log", base=2)
    axes.set_xticks(sorted(all_k), [str(k) for k in sorted(all_k)])
    axes.set_xlabel("k")
    axes.set_ylabel("val/pass@k (last validation)")
    axes.set_title("pass@k (min-max over seeds)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(runs: Sequence[RunLog], out: Path, smooth: int = 10, last: int = 10) -> list[Path]:
    """Write the figures and ``report.md`` for ``runs`` into ``out`` (created if needed).

    Returns:
        The files written. ``accuracy_vs_entropy.png`` is skipped when no run logged ``val/accuracy``,
        ``pass_at_k.png`` when none logged ``val/pass@K``.
    """
    if not runs:
        raise ConfigError("lit-entropy report needs at least one run folder")
    plt = _import_pyplot()
    out.mkdir(parents=True, exist_ok=True)
    groups = _by_label(runs)
    summaries = summarize(runs, last=last)
    written = []

    path = out / "entropy_vs_step.png"
    entropy = {label: [run.metrics[ENTROPY] for run in group] for label, group in groups.items()}
    _band_figure(plt, entropy, "train/entropy (nats)", "Token entropy (min-max over seeds)", path)
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
        _band_figure(plt, reward, REWARD, title, path)
        written.append(path)

    if any(ACCURACY in run.metrics for run in runs):
        path = out / "accuracy_vs_entropy.png"
        _accuracy_figure(plt, groups, {row.label: row.fit for row in summaries}, path)
        written.append(path)

    if any(last_pass_at_k(run) for run in runs):
        path = out / "pass_at_k.png"
        _pass_at_k_figure(plt, groups, path)
        written.append(path)

    path = out / "report.md"
    sources = "\n".join(f"- {run.label}: `{run.path}`" for run in runs)
    path.write_text(
        "# lit-entropy report\n\n"
        + markdown_table(summaries, last=last)
        + "\nMeans ± sample std over seeds. a, b: the law R = -a exp(H) + b fitted by least squares on the "
        "pooled (entropy, val/accuracy) pairs of a label's seeds; ceiling = b - a.\n\n## Runs\n\n"
        + sources
        + "\n"
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
    _import_pyplot()  # fail on a missing extra before reading any log
    labels = args.labels or [None] * len(args.run_dirs)
    runs = [load_run(run_dir, label) for run_dir, label in zip(args.run_dirs, labels)]
    for path in write_report(runs, args.out, smooth=args.smooth, last=args.last):
        print(path)


if __name__ == "__main__":
    main()
