"""Evaluation maths: the unbiased pass@k estimator and answer diversity."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_entropy.errors import ConfigError


def pass_at_k(num_samples: int, num_correct: int | Tensor, k: int) -> float | Tensor:
    """Unbiased pass@k from ``n`` samples with ``c`` correct: ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (stable, no large binomials).
    """
    if not 1 <= k <= num_samples:
        raise ConfigError(f"pass@k needs 1 <= k <= n, got k={k}, n={num_samples}")
    correct = torch.as_tensor(num_correct, dtype=torch.float64)
    i = torch.arange(1, num_samples + 1, dtype=torch.float64)  # [n]
    factors = 1.0 - k / i  # [n]
    # the product runs over i in (n - c, n]
    use = i > (num_samples - correct)[..., None]  # [..., n]
    prod = torch.where(use, factors, torch.ones_like(factors)).prod(-1)
    result = (1.0 - prod).float()
    return float(result) if isinstance(num_correct, int) else result


def distinct_correct(completions: list[str], correct: list[bool]) -> int:
    """Number of distinct (stripped) completion texts among the correct ones."""
    return len({text.strip() for text, ok in zip(completions, correct) if ok})
