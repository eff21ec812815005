"""`RunLog`: one run's metrics, read from its Lightning CSVLogger ``metrics.csv`` and labelled from its
``config.yaml``, with the per-run views the report is built from (validation pairs, pass@k).
"""

from __future__ import annotations

import csv
import importlib
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lit_entropy.errors import DataError

__all__ = [
    "RunLog",
    "Series",
    "config_label",
    "find_metrics_csv",
    "last_pass_at_k",
    "load_run",
    "read_metrics",
    "validation_pairs",
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


def find_metrics_csv(run_dir: str | os.PathLike[str]) -> Path:
    """The newest training ``metrics.csv`` under ``run_dir`` (by modification time, then ``version_N``, then path).

    A ``metrics.csv`` without a ``train/entropy`` column (the log of a ``validate``, ``test`` or ``predict`` run
    beside the training run) is skipped while a training log is there.

    Raises:
        DataError: ``run_dir`` is not a folder or holds no ``metrics.csv``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run folder {str(run_dir)!r} does not exist")
    found = sorted(run_dir.glob("**/metrics.csv"), key=_newest_key)
    if not found:
        raise DataError(f"no metrics.csv under {str(run_dir)!r}: is it the log folder of a CSVLogger run?")
    training = [path for path in found if ENTROPY in _header(path)]
    return (training or found)[-1]


def _header(path: Path) -> list[str]:
    """The column names of a CSV file (none when it is empty or unreadable)."""
    try:
        with path.open(newline="") as handle:
            return next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


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


def load_run(run_dir: str | os.PathLike[str], label: str | None = None) -> RunLog:
    """Read the newest ``metrics.csv`` under ``run_dir`` and label it (``label``, else from ``config.yaml``).

    ``config.yaml`` is looked for next to ``metrics.csv``, then in its parents up to ``run_dir``; without one
    the run is the baseline, ``GRPO``.

    Raises:
        DataError: no ``metrics.csv``, no ``train/entropy`` in it, or an unreadable ``config.yaml``.
    """
    run_dir = Path(run_dir)
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


# --- per-run views -------------------------------------------------------------------------------------


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
