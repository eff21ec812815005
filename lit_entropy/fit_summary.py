"""`FitSummary`: the reward and entropy of each RL iteration of a fit, and the line logged at its end.

``lit_entropy: <n> RL iterations; mean over the first / last <w>: reward <first> -> <last>, entropy <first> ->
<last> nats``, with windows ``w`` of up to 10 iterations, at most half the fit each.
"""

from __future__ import annotations

import math


class FitSummary:
    """``(reward, entropy)`` per RL iteration of this fit (not checkpointed: a resumed fit summarises itself)."""

    def __init__(self) -> None:
        self.history: list[tuple[float, float]] = []

    def add(self, reward: float, entropy: float) -> None:
        """One iteration's mean reward and token-mean entropy; skipped when the entropy is not finite (a rollout
        without kept tokens has no mean entropy)."""
        if math.isfinite(entropy):
            self.history.append((reward, entropy))

    def message(self) -> str | None:
        """The end-of-fit line, or None when no iteration was added."""
        if not self.history:
            return None
        window = max(1, min(10, len(self.history) // 2))
        first, last = self.history[:window], self.history[-window:]
        return (
            f"lit_entropy: {len(self.history)} RL iterations; mean over the first / last {window}: "
            f"reward {_mean(first, 0):.3f} -> {_mean(last, 0):.3f}, "
            f"entropy {_mean(first, 1):.3f} -> {_mean(last, 1):.3f} nats"
        )


def _mean(rows: list[tuple[float, float]], column: int) -> float:
    return sum(row[column] for row in rows) / len(rows)


__all__ = ["FitSummary"]
