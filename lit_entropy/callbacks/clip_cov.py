"""`ClipCov`: remove the policy gradient of a few random tokens whose covariance is in a band (Cui et al.).

Cui et al., arXiv 2505.22617. Candidates are the kept tokens with ``cov_lb < cov_i < cov_ub`` (strict) whose PPO
clip is not already active; ``max(floor(ratio * n), 1)`` of them (all if fewer), chosen uniformly at random,
get token weight 0: no policy gradient, but they still count in the token-mean denominator.

Shapes: ``m`` sequences in the selection scope, ``n`` in the micro-batch, ``T`` completion length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from typing_extensions import override

from lit_entropy.callbacks.covariance import (
    Scope,
    ScopedRegularizer,
    check_fraction,
    check_scope,
    clip_cov_candidates,
    ppo_clip_active,
    select_at_random,
    selection_count,
    token_covariance,
)
from lit_entropy.errors import ConfigError
from lit_entropy.functional import masked_mean
from lit_entropy.regularizer import Adjustment, MinibatchView

__all__ = ["ClipCov", "ClipCovSelection", "clip_cov_selection", "selection_seed"]

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15  # odd 64-bit constant (2^64 / golden ratio): a cheap, well-spread mixer


def selection_seed(seed: int, iteration: int, update: int, microbatch: int = 0) -> int:
    """A 64-bit generator seed determined by ``(seed, iteration, update, microbatch)`` only.

    Not Python's ``hash`` (an implementation detail) and not the global RNG (which other code advances), so
    every micro-batch, every rank and a resumed run draw the same numbers for the same update.
    """
    value = seed & _MASK64
    for part in (iteration, update, microbatch):
        value = (value * _GOLDEN64 + part + 1) & _MASK64
        value ^= value >> 31
    return value


@dataclass(frozen=True)
class ClipCovSelection:
    """What `clip_cov_selection` found over the tokens of its scope.

    Attributes:
        selected: ``[m, T]`` bool, the tokens whose policy gradient is removed.
        candidates: ``[m, T]`` bool, kept, unclipped tokens with ``cov_lb < cov < cov_ub``.
        cov: ``[m, T]`` covariance contributions (0 at padding).
    """

    selected: Tensor
    candidates: Tensor
    cov: Tensor


def clip_cov_selection(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ratio: float,
    cov_lb: float,
    cov_ub: float,
    eps_low: float,
    eps_high: float,
    generator: torch.Generator,
) -> ClipCovSelection:
    """Clip-Cov's token selection over the full set of tokens of its scope.

    Args:
        logprobs: ``[m, T]`` current log-probs (detached here).
        old_logprobs: ``[m, T]`` rollout-policy log-probs (for the PPO clip test).
        advantages: ``[m, T]`` per-token advantages.
        mask: ``[m, T]`` keep-mask.
        ratio: fraction of the ``n`` kept tokens to select: ``max(floor(ratio * n), 1)``.
        cov_lb: exclusive lower covariance bound.
        cov_ub: exclusive upper covariance bound.
        eps_low: lower PPO clip range in force.
        eps_high: upper PPO clip range in force.
        generator: CPU generator the random choice is drawn from (advanced by this call).

    Returns:
        `ClipCovSelection`; ``selected`` has ``min(max(floor(ratio * n), 1), #candidates)`` entries.
    """
    cov = token_covariance(logprobs, advantages, mask)  # [m, T]
    clipped = ppo_clip_active(logprobs, old_logprobs, advantages, eps_low, eps_high)  # [m, T]
    candidates = clip_cov_candidates(cov, mask, clipped, cov_lb, cov_ub)  # [m, T]
    count = selection_count(ratio, int(mask.sum()))
    return ClipCovSelection(select_at_random(candidates, count, generator), candidates, cov)


class ClipCov(ScopedRegularizer):
    """Clip-Cov (Cui et al., arXiv 2505.22617): zero policy gradient on a few high-covariance tokens.

    Per optimizer mini-batch (``scope="batch"``, the paper's definition) or per micro-batch
    (``scope="microbatch"``, verl's behaviour, kept for parity only: there the selected set and its size
    depend on the micro-batch size and the GPU count, verl issue 7829), compute the token covariance
    ``cov_i = (lp_i - mean lp) * (A_i - mean A)`` over the kept tokens, take the kept tokens with
    ``cov_lb < cov_i < cov_ub`` whose PPO clip is not active (with the view's ``eps_low``/``eps_high``, i.e.
    the range the surrogate uses, after a regularizer such as ADAPO replaced it), and give ``max(floor(ratio * n), 1)`` of them
    (all if fewer), chosen uniformly at random, token weight 0.

    The random choice comes from a ``torch.Generator`` seeded from ``(seed, iteration, update)`` (plus the
    micro-batch's first row in ``microbatch`` scope), never from the global RNG: every micro-batch of a
    mini-batch computes the same selection and takes its own rows, and a resumed run repeats it. The callback
    has no state to checkpoint.

    Unit trap: ``ratio`` is a fraction. The authors' fork takes it as a percentage (``0.02`` there is
    ``2e-4`` here). The authors' runs also use a wide PPO clip (``loss.eps_low = loss.eps_high = 1``).

    Args:
        ratio: fraction of kept tokens to clip, in ``(0, 1]``; at least one token while there are candidates.
        cov_lb: exclusive lower covariance bound.
        cov_ub: exclusive upper covariance bound (> ``cov_lb``).
        scope: ``batch`` (optimizer mini-batch) or ``microbatch``.
        seed: seeds the random choice.

    Metrics (``reg/ClipCov/``): ``selected_frac`` (selected / kept tokens of the scope), ``selected_cov``
    (mean covariance of the selected tokens, 0 if none), ``candidates`` (number of candidates in the scope).
    """

    def __init__(
        self,
        ratio: float = 2e-4,
        cov_lb: float = 1.0,
        cov_ub: float = 5.0,
        scope: Scope = "batch",
        seed: int = 0,
    ) -> None:
        check_fraction(self.name, "ratio", ratio)
        if math.isnan(cov_lb) or math.isnan(cov_ub) or not cov_lb < cov_ub:
            raise ConfigError(f"{self.name}.cov_lb must be < cov_ub, got cov_lb={cov_lb}, cov_ub={cov_ub}")
        check_scope(self.name, scope)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"{self.name}.seed must be an integer, got {seed!r}")
        self.ratio = ratio
        self.cov_lb = cov_lb
        self.cov_ub = cov_ub
        self.scope = scope
        self.seed = seed

    @override
    def adjust(self, view: MinibatchView) -> Adjustment:
        tokens = self.scoped_tokens(view)
        # in micro-batch scope each micro-batch is its own population: give each its own stream
        microbatch = (view.microbatch_rows.start or 0) if self.scope == "microbatch" else 0
        generator = torch.Generator().manual_seed(
            selection_seed(self.seed, view.iteration, view.update, microbatch)
        )
        selection = clip_cov_selection(
            tokens.logprobs,
            tokens.old_logprobs,
            tokens.advantages,
            tokens.mask,
            ratio=self.ratio,
            cov_lb=self.cov_lb,
            cov_ub=self.cov_ub,
            eps_low=view.eps_low,
            eps_high=view.eps_high,
            generator=generator,
        )
        selected = tokens.local(selection.selected)  # [n, T]
        weights = (~selected).to(view.logprobs.dtype)  # [n, T]
        kept = tokens.mask.sum().clamp(min=1)
        metrics: dict[str, Tensor | float] = {
            "selected_frac": selection.selected.sum() / kept,
            "selected_cov": masked_mean(selection.cov, selection.selected),
            "candidates": selection.candidates.sum().float(),
        }
        return Adjustment(token_weights=weights, metrics=metrics)
