"""`KLCov`: penalise ``|lp - old|`` on the tokens of highest covariance, with PPO clipping off (Cui et al.).

Cui et al., arXiv 2505.22617. The top ``max(floor(ratio * n), 1)`` kept tokens by ``cov_i = (lp_i - mean lp) *
(A_i - mean A)`` (no bounds, no sign test: at least one token is always selected) get the extra per-token
loss ``kl_coef * |lp - old|``, differentiated through ``lp``; the surrogate is not clipped at all.

Shapes: ``m`` sequences in the selection scope, ``n`` in the micro-batch, ``T`` completion length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import typing_extensions
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_entropy.callbacks.covariance import (
    Scope,
    ScopedRegularizer,
    check_fraction,
    check_scope,
    select_top,
    selection_count,
    token_covariance,
)
from lit_entropy.errors import ConfigError
from lit_entropy.functional import masked_mean
from lit_entropy.regularizer import Adjustment, MinibatchView, Replacements

__all__ = ["KLCov", "KLCovSelection", "kl_cov_penalty", "kl_cov_selection"]


@dataclass(frozen=True)
class KLCovSelection:
    """What `kl_cov_selection` found over the tokens of its scope.

    Attributes:
        selected: ``[m, T]`` bool, the penalised tokens.
        cov: ``[m, T]`` covariance contributions (0 at padding).
    """

    selected: Tensor
    cov: Tensor


def kl_cov_selection(logprobs: Tensor, advantages: Tensor, mask: Tensor, ratio: float) -> KLCovSelection:
    """KL-Cov's token selection over the full set of tokens of its scope.

    Args:
        logprobs: ``[m, T]`` current log-probs (detached here).
        advantages: ``[m, T]`` per-token advantages.
        mask: ``[m, T]`` keep-mask.
        ratio: fraction of the ``n`` kept tokens to select.

    Returns:
        `KLCovSelection` whose ``selected`` holds the ``max(floor(ratio * n), 1)`` kept tokens with the
        largest covariance (ties to the earlier token in row-major order); empty only when nothing is kept.
    """
    cov = token_covariance(logprobs, advantages, mask)  # [m, T]
    count = selection_count(ratio, int(mask.sum()))
    return KLCovSelection(select_top(cov, mask, count), cov)


def kl_cov_penalty(logprobs: Tensor, old_logprobs: Tensor, selected: Tensor, kl_coef: float) -> Tensor:
    """Per-token penalty ``kl_coef * |lp - old|`` on the selected tokens, 0 elsewhere.

    Args:
        logprobs: ``[n, T]`` current log-probs, with gradient.
        old_logprobs: ``[n, T]`` rollout-policy log-probs.
        selected: ``[n, T]`` bool.
        kl_coef: penalty weight (>= 0).

    Returns:
        ``[n, T]`` penalty in nats times ``kl_coef``. Its gradient w.r.t. ``lp`` is
        ``kl_coef * sign(lp - old)`` on selected tokens: exactly 0 on-policy (``lp == old``), where
        ``|x|``'s subgradient at 0 is taken as 0.
    """
    # Mask before abs: a NaN log-prob at an unselected (e.g. padded) position would otherwise send
    # 0 * sign(NaN) = NaN into the gradient.
    difference = (logprobs - old_logprobs.detach()).where(selected, 0.0)  # [n, T]
    return kl_coef * difference.abs()


class KLCov(ScopedRegularizer):
    """KL-Cov (Cui et al., arXiv 2505.22617): ``kl_coef * |lp - old|`` on the top-covariance tokens.

    Per optimizer mini-batch (``scope="batch"``, the paper's definition) or per micro-batch
    (``scope="microbatch"``, verl's behaviour, kept for parity only: there the selected set depends on the
    micro-batch size and the GPU count, verl issue 7829), the ``max(floor(ratio * n), 1)`` kept tokens with
    the largest covariance ``(lp_i - mean lp) * (A_i - mean A)`` get the per-token penalty
    ``kl_coef * |lp - old|``. The selection is deterministic (ties to the earlier token).

    KL-Cov's loss has no PPO clipping: this callback overrides the clip range with ``eps_low = 1`` (ratio
    floor 0) and ``eps_high = inf``, so it **conflicts by design** with any other regularizer that owns
    ``eps_low`` or ``eps_high`` (ADAPO): the module refuses the pair at fit start. ``loss.dual_clip`` (off by
    default) is not overridden.

    On-policy (one optimizer update per rollout) ``|lp - old| = 0`` with zero gradient, so KL-Cov does
    nothing; it warns once when it sees that. The authors' recipe uses 8 updates per rollout.

    Unit trap: ``ratio`` is a fraction. The authors' fork takes ``k`` as a percentage (``0.2`` there is
    ``0.002`` here). Their recipes use ``kl_coef = 1`` (verl's dataclass default is 0.1); ``ratio`` 2e-3
    for 7B and 2e-4 for 32B.

    Args:
        ratio: fraction of kept tokens to penalise, in ``(0, 1]``; at least one token.
        kl_coef: penalty weight, >= 0.
        scope: ``batch`` (optimizer mini-batch) or ``microbatch``.

    Metrics (``reg/KLCov/``): ``selected_frac`` (selected / kept tokens of the scope), ``selected_cov`` (mean
    covariance of the selected tokens), ``selected_abs_log_ratio`` (mean ``|lp - old|`` over them, nats).
    """

    replaces = ("eps_low", "eps_high")

    def __init__(self, ratio: float = 2e-3, kl_coef: float = 1.0, scope: Scope = "batch") -> None:
        check_fraction(self.name, "ratio", ratio)
        if not (isinstance(kl_coef, (int, float)) and math.isfinite(kl_coef) and kl_coef >= 0):
            raise ConfigError(f"{self.name}.kl_coef must be a finite number >= 0, got {kl_coef!r}")
        check_scope(self.name, scope)
        self.ratio = ratio
        self.kl_coef = kl_coef
        self.scope = scope
        self._warned_on_policy = False  # not checkpointed: a resumed run may warn again, which is harmless

    # `typing_extensions.override` in full: inside this class body the bare name is the method below
    @typing_extensions.override
    def replace_inputs(self, view: MinibatchView) -> Replacements:
        return Replacements(eps_low=1.0, eps_high=float("inf"))

    @typing_extensions.override
    def adjust(self, view: MinibatchView) -> Adjustment:
        tokens = self.scoped_tokens(view)
        selection = kl_cov_selection(tokens.logprobs, tokens.advantages, tokens.mask, self.ratio)
        selected = tokens.local(selection.selected)  # [n, T]
        penalties = kl_cov_penalty(view.logprobs, view.old_logprobs, selected, self.kl_coef)  # [n, T]
        abs_log_ratio = (tokens.logprobs - tokens.old_logprobs).abs()  # [m, T]
        metrics: dict[str, Tensor | float] = {
            "selected_frac": selection.selected.sum() / tokens.mask.sum().clamp(min=1),
            "selected_cov": masked_mean(selection.cov, selection.selected),
            "selected_abs_log_ratio": masked_mean(abs_log_ratio, selection.selected),
        }
        return Adjustment(token_penalties=penalties, metrics=metrics)

    @typing_extensions.override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._warned_on_policy or float(outputs["updates"]) != 1:
            return
        self._warned_on_policy = True
        rank_zero_warn(
            "KLCov is a no-op with one optimizer update per rollout (train/updates == 1, fully on-policy: "
            "|lp - old| = 0 with zero gradient). Use several updates per rollout (ppo_epochs > 1 or "
            "minibatch_size < the rollout size; the authors use 8).",
            category=UserWarning,
        )
