"""`HighEntropyTokens`: keep the policy gradient only on the highest-entropy tokens ("Beyond the 80/20 rule").

"Beyond the 80/20 rule" (arXiv 2506.01939): token weight 1 on the kept tokens whose entropy is at least the
``(1 - rho)`` quantile of the kept tokens' entropy of the scope, 0 elsewhere; the token-mean normaliser stays
the count of all kept tokens.

The quantile, exactly: with ``n`` kept tokens, ``k = ceil(rho * n)`` (``rho * n`` rounded to 9 decimals first,
so ``0.3 * 10`` is 3, not 4) and the threshold is the ``k``-th largest kept entropy. Every kept token with
entropy ``>=`` the threshold is selected, so **ties at the threshold are all kept**: at least ``k`` tokens,
exactly ``k`` when the entropies are distinct. (TRL's linear-interpolation quantile selects
``floor(rho * (n - 1)) + 1`` distinct tokens, the same count as here for ``rho = 0.2``.)

Shapes: ``m`` sequences in the selection scope, ``n`` in the micro-batch, ``T`` completion length.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from typing_extensions import override

from lit_entropy.callbacks.covariance import Scope, ScopedRegularizer, check_fraction, check_scope
from lit_entropy.regularizer import Adjustment, MinibatchView

__all__ = ["HighEntropyTokens", "high_entropy_count", "high_entropy_mask", "high_entropy_threshold"]


def high_entropy_count(rho: float, num_tokens: int) -> int:
    """``ceil(rho * n)``, the number of top-entropy tokens the threshold is taken at (0 when ``n == 0``)."""
    if num_tokens <= 0:
        return 0
    return min(math.ceil(round(rho * num_tokens, 9)), num_tokens)


def high_entropy_threshold(entropy: Tensor, mask: Tensor, rho: float) -> Tensor:
    """The ``(1 - rho)`` quantile of the kept tokens' entropy: the ``ceil(rho * n)``-th largest of them.

    Args:
        entropy: ``[m, T]`` entropy in nats (detached here).
        mask: ``[m, T]`` keep-mask.
        rho: fraction of tokens to keep, in ``(0, 1]``.

    Returns:
        0-dim float32 threshold in nats; ``+inf`` when no token is kept.
    """
    kept = entropy.detach().float()[mask.bool()]  # [n]
    count = high_entropy_count(rho, kept.numel())
    if count == 0:
        return torch.tensor(float("inf"), device=entropy.device)
    return torch.topk(kept, count).values[-1]


def high_entropy_mask(entropy: Tensor, mask: Tensor, rho: float) -> Tensor:
    """Kept tokens whose entropy is ``>=`` `high_entropy_threshold` (ties at the threshold included).

    Takes the full set of tokens of the scope; across ranks the ``[m, T]`` inputs would be all-gathered
    first (see `lit_entropy.callbacks.covariance.token_scope`).

    Args:
        entropy: ``[m, T]`` entropy in nats.
        mask: ``[m, T]`` keep-mask.
        rho: fraction of tokens to keep, in ``(0, 1]``.

    Returns:
        ``[m, T]`` bool.
    """
    threshold = high_entropy_threshold(entropy, mask, rho)
    return mask.bool() & (entropy.detach().float() >= threshold)


class HighEntropyTokens(ScopedRegularizer):
    """Policy gradient only on the top-``rho`` fraction of tokens by entropy (arXiv 2506.01939).

    Over the optimizer mini-batch (``scope="batch"``, the paper's "batch") or each micro-batch
    (``scope="microbatch"``), the threshold is the ``ceil(rho * n)``-th largest kept entropy; kept tokens at
    or above it get token weight 1, all others 0 (ties at the threshold are all kept, see the module
    docstring). The zero-weight tokens still count in the token-mean normaliser. Composes with other token
    weights (e.g. `ClipCov`) by multiplication.

    Args:
        rho: fraction of kept tokens that keep their gradient, in ``(0, 1]`` (TRL: ``top_entropy_quantile``).
        scope: ``batch`` (optimizer mini-batch) or ``microbatch``.

    Metrics (``reg/HighEntropyTokens/``): ``selected_frac`` (selected / kept tokens of the scope) and
    ``threshold`` (nats).
    """

    def __init__(self, rho: float = 0.2, scope: Scope = "batch") -> None:
        check_fraction(self.name, "rho", rho)
        check_scope(self.name, scope)
        self.rho = rho
        self.scope = scope

    @override
    def adjust(self, view: MinibatchView) -> Adjustment:
        tokens = self.scoped_tokens(view)
        threshold = high_entropy_threshold(tokens.entropy, tokens.mask, self.rho)
        selected = tokens.mask & (tokens.entropy.float() >= threshold)  # [m, T]
        weights = tokens.local(selected).to(view.logprobs.dtype)  # [n, T]
        metrics: dict[str, Tensor | float] = {
            "selected_frac": selected.sum() / tokens.mask.sum().clamp(min=1),
            # +inf (nothing kept) would poison the iteration's average
            "threshold": torch.nan_to_num(threshold, posinf=0.0),
        }
        return Adjustment(token_weights=weights, metrics=metrics)
