"""The report's figures (PNG, drawn with matplotlib) and the curves they draw: smoothed, and aggregated over
seeds into a mean with a min-max band.

matplotlib is optional (``pip install 'lit-entropy[report]'``): `import_pyplot` imports it, the rest takes the
``pyplot`` module as an argument.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lit_entropy.callbacks.entropy_law import LawFit, predict
from lit_entropy.errors import ConfigError
from lit_entropy.run_log import ACCURACY, RunLog, Series, last_pass_at_k, validation_pairs

__all__ = [
    "accuracy_figure",
    "aggregate",
    "band_figure",
    "import_pyplot",
    "pass_at_k_figure",
    "rolling_mean",
]

# --- curves --------------------------------------------------------------------------------------------


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


# --- figures -------------------------------------------------------------------------------------------


def import_pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ConfigError("lit-entropy report needs matplotlib: pip install 'lit-entropy[report]'") from error
    matplotlib.use("Agg")  # files only: never open a window, works without a display
    import matplotlib.pyplot as plt

    return plt


# legends with more entries than this go to the right of the axes, where they hide no curve
LEGEND_INSIDE_MAX = 4

# matplotlib's default cycle of 10 colours (tab10); past it, the colours repeat with the next line style and marker
COLOURS = [f"C{i}" for i in range(10)]
LINE_STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D"]


def series_styles(count: int) -> list[dict[str, str]]:
    """One style per plotted label, no two alike: ten colours, then the ten again with the next line style and
    marker (a twelve-label figure otherwise draws its eleventh label in the first one's colour)."""
    styles = []
    for index in range(count):
        cycle = (index // len(COLOURS)) % len(LINE_STYLES)
        styles.append(
            {
                "color": COLOURS[index % len(COLOURS)],
                "linestyle": LINE_STYLES[cycle],
                "marker": MARKERS[cycle],
            }
        )
    return styles


def save_with_legend(plt: Any, figure: Any, axes: Any, path: Path, fontsize: str | None = None) -> None:
    """Save the figure with its legend: inside the axes for a few entries, outside on the right for more
    (the saved image widens to hold it), then close it."""
    figure.tight_layout()  # before the legend, which would otherwise squeeze the axes to make room for it
    entries = len(axes.get_legend_handles_labels()[1])
    if entries > LEGEND_INSIDE_MAX:
        axes.legend(
            loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=fontsize or "small"
        )
    else:
        axes.legend(fontsize=fontsize)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def band_figure(plt: Any, groups: dict[str, list[Series]], ylabel: str, title: str, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for (label, series), style in zip(groups.items(), series_styles(len(groups))):
        steps, mean, low, high = aggregate(series)
        axes.plot(
            steps,
            mean,
            color=style["color"],
            linestyle=style["linestyle"],
            label=f"{label} (n={len(series)})",
        )
        if len(series) > 1:
            axes.fill_between(steps, low, high, color=style["color"], alpha=0.2, linewidth=0)
    axes.set_xlabel("RL iteration (logged step)")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    save_with_legend(plt, figure, axes, path)


def law_text(fit: LawFit) -> str:
    """The fitted law as it reads: ``0.800 - 0.200 exp(H)``, or ``0.548 + 0.083 exp(H)`` when ``a < 0``."""
    sign = "-" if fit.a >= 0 else "+"
    return f"{fit.b:.3f} {sign} {abs(fit.a):.3f} exp(H)"


def accuracy_figure(
    plt: Any, groups: dict[str, list[RunLog]], fits: dict[str, LawFit | None], path: Path
) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for (label, runs), style in zip(groups.items(), series_styles(len(groups))):
        pairs = [pair for run in runs for pair in validation_pairs(run)]
        if not pairs:
            continue
        entropy = [h for h, _ in pairs]
        axes.scatter(
            entropy,
            [r for _, r in pairs],
            s=14,
            alpha=0.7,
            color=style["color"],
            marker=style["marker"],
            label=label,
        )
        fit = fits[label]
        if fit is not None:
            grid = torch.linspace(min(entropy), max(entropy), 100, dtype=torch.float64)
            axes.plot(
                grid.tolist(),
                predict(fit, grid).tolist(),
                color=style["color"],
                linestyle=style["linestyle"],
                label=f"{label}: {law_text(fit)}, R²={fit.r2:.3f}",
            )
    axes.set_xlabel("training entropy H (nats, mean since the previous validation)")
    axes.set_ylabel(ACCURACY)
    axes.set_title("Validation accuracy against entropy, with R = -a exp(H) + b")
    axes.grid(alpha=0.3)
    save_with_legend(plt, figure, axes, path, fontsize="small")


def pass_at_k_figure(plt: Any, groups: dict[str, list[RunLog]], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    all_k: set[int] = set()
    for (label, runs), style in zip(groups.items(), series_styles(len(groups))):
        per_run = [last_pass_at_k(run) for run in runs]
        ks = sorted({k for p in per_run for k in p})
        if not ks:
            continue
        all_k.update(ks)
        values = [[p[k] for p in per_run if k in p] for k in ks]
        mean = [statistics.fmean(v) for v in values]
        errors = [[m - min(v) for m, v in zip(mean, values)], [max(v) - m for m, v in zip(mean, values)]]
        axes.errorbar(ks, mean, yerr=errors, capsize=3, label=f"{label} (n={len(runs)})", **style)
    if all_k and max(all_k) / min(all_k) >= 8:
        axes.set_xscale("log", base=2)
    axes.set_xticks(sorted(all_k), [str(k) for k in sorted(all_k)])
    axes.set_xlabel("k")
    axes.set_ylabel("val/pass@k (last validation)")
    axes.set_title("pass@k (min-max over seeds)")
    axes.grid(alpha=0.3)
    save_with_legend(plt, figure, axes, path)
