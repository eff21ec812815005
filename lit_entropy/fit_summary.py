"""`FitSummary`: the reward and entropy of each RL iteration of a fit, and the line logged at its end.

``lit_entropy: <n> RL iterations; mean over the first / last <w>: reward <first> -> <last>, entropy <first> ->
<last> nats``, with windows ``w`` of up to 10 iterations, at most half the fit each, then the last validation's metrics when the fit
ran one: ``; last validation: val/accuracy <a>, val/pass@<k> <p>, ...``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


class FitSummary:
    """``(reward, entropy)`` per RL iteration of this fit (not checkpointed: a resumed fit summarises itself)."""

    def __init__(self) -> None:
        self.history: list[tuple[float, float]] = []

    def add(self, reward: float, entropy: float) -> None:
        """One iteration's mean reward and token-mean entropy; skipped when the entropy is not finite (a rollout
        without kept tokens has no mean entropy)."""
        if math.isfinite(entropy):
            self.history.append((reward, entropy))

    def message(self, metrics: Mapping[str, Any] | None = None) -> str | None:
        """The end-of-fit line (`fit_summary`), or None when no iteration was added."""
        return fit_summary(self.history, metrics or {})


def fit_summary(history: Sequence[tuple[float, float]], metrics: Mapping[str, Any]) -> str | None:
    """The end-of-fit line from ``(reward, entropy)`` per RL iteration and the trainer's metrics.

    ``metrics`` is ``trainer.callback_metrics`` (tensors or numbers): its ``val/*`` entries are those of the last
    validation of this fit, listed accuracy first, then pass@k by k, then the others by name. None when
    ``history`` is empty.
    """
    if not history:
        return None
    window = max(1, min(10, len(history) // 2))
    first, last = history[:window], history[-window:]
    line = (
        f"lit_entropy: {len(history)} RL iterations; mean over the first / last {window}: "
        f"reward {_mean(first, 0):.3f} -> {_mean(last, 0):.3f}, "
        f"entropy {_mean(first, 1):.3f} -> {_mean(last, 1):.3f} nats"
    )
    validation = sorted((key for key in metrics if key.startswith("val/")), key=_validation_order)
    if validation:
        line += "; last validation: " + ", ".join(f"{key} {float(metrics[key]):.3f}" for key in validation)
    return line


def _validation_order(key: str) -> tuple[int, int, str]:
    name = key.removeprefix("val/")
    if name == "accuracy":
        return (0, 0, name)
    if name.startswith("pass@") and name[5:].isdigit():
        return (1, int(name[5:]), name)
    return (2, 0, name)


def _mean(rows: Sequence[tuple[float, float]], column: int) -> float:
    return sum(row[column] for row in rows) / len(rows)


__all__ = ["FitSummary", "fit_summary"]
