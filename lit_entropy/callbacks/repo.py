"""REPO: entropy-preserving per-token advantages (Apple, arXiv 2603.11682), with a doubling/halving
controller.

Generic REPO replaces the advantage of every token by ``A' = A - beta * (lp + H)``: ``lp + H`` is the
log-prob of the sampled token centred by its expectation (``E[log pi] = -H``), so with ``beta > 0`` rare
tokens gain advantage and likely ones lose it, which in expectation is an entropy bonus that needs no
gradient through the full-vocabulary logits. Two variants choose ``beta``:

- **REPO-R** (the practical one): ``beta = zeta * |A|``; ``A' = A * (1 - zeta*lp)`` for ``A > 0``,
  ``A' = A * (1 + zeta*lp)`` for ``A < 0``, ``A = 0`` unchanged (the ``H`` part cancels out of the sign-split
  form). Rare correct tokens are amplified, rare wrong tokens penalised less.
- **REPO-D**: ``beta`` scales with the first-order predicted entropy change of the step (see
  `predicted_entropy_change` and `repo_d_beta` for the estimator and its sign).

``zeta`` is tuned once per RL iteration toward the entropy of the first iteration (see `next_zeta`).

Shapes: ``n`` sequences in the micro-batch, ``m`` in the optimizer mini-batch, ``T`` completion length.
Log-probs and entropies in nats.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import typing_extensions
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lit_entropy.callbacks.covariance import token_covariance
from lit_entropy.errors import ConfigError
from lit_entropy.functional import masked_mean
from lit_entropy.regularizer import Adjustment, MinibatchView, Regularizer, Replacements, measured_entropy

Variant = Literal["R", "D"]

#: (zeta_init, zeta_min, zeta_max) by variant, from the REPO paper (arXiv 2603.11682).
ZETA_DEFAULTS: dict[str, tuple[float, float, float]] = {"R": (1e-3, 1e-4, 0.05), "D": (1e-2, 1e-3, 10.0)}

__all__ = [
    "REPO",
    "ZETA_DEFAULTS",
    "next_zeta",
    "predicted_entropy_change",
    "repo_d_advantages",
    "repo_d_beta",
    "repo_r_advantages",
    "token_covariance",
]


# --------------------------------------------------------------------------------------------- the maths


def repo_r_advantages(
    advantages: Tensor, logprobs: Tensor, mask: Tensor, zeta: float, logprob_floor: float = -20.0
) -> Tensor:
    """REPO-R per-token advantages ``A'``.

    ``A > 0``: ``A * (1 - zeta*lp)``, at least 0; ``A < 0``: ``A * (1 + zeta*lp)``, at most 0; ``A = 0`` and
    padding unchanged. The sign clamp matters when ``zeta < 0`` (two-way controller) or when
    ``zeta * logprob_floor < -1``: an advantage must never change sign, or the token would be pushed the
    wrong way.

    Args:
        advantages: ``[n, T]`` per-token advantages.
        logprobs: ``[n, T]`` log-probs of the sampled tokens (detached here; gradient never flows through
            ``A'``); clamped below at ``logprob_floor`` so one near-impossible token cannot dominate.
        mask: ``[n, T]`` keep-mask; padded positions keep their advantage.
        zeta: the coefficient (any sign).
        logprob_floor: lower bound on ``lp`` in nats.

    Returns:
        ``[n, T]`` advantages, same dtype as ``advantages``.
    """
    lp = logprobs.detach().clamp(min=logprob_floor).to(advantages.dtype)  # [n, T]
    positive = (advantages * (1.0 - zeta * lp)).clamp(min=0.0)  # [n, T]
    negative = (advantages * (1.0 + zeta * lp)).clamp(max=0.0)  # [n, T]
    shifted = torch.where(advantages > 0, positive, torch.where(advantages < 0, negative, advantages))
    return torch.where(mask.bool(), shifted, advantages)


def predicted_entropy_change(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """First-order predicted entropy change of one policy-gradient step: ``dH_hat = -mean_i cov_i``.

    The Cui et al. estimate ``dH ~= -eta * Cov(log pi, A)`` with ``eta = 1``, the covariance taken over all
    kept tokens of the optimizer mini-batch (not per micro-batch, so the value does not depend on
    ``microbatch_size``). Usually negative: likely tokens carry high advantages, so the step sharpens the
    policy. 0 when no token is kept.

    Across data-parallel ranks this is where the reduction goes: all-reduce the sums of ``lp``,
    ``A`` and the kept-token count to get the global means, then all-reduce the sum of the centred products.

    Args:
        logprobs: ``[m, T]`` detached current log-probs of the whole mini-batch.
        advantages: ``[m, T]`` advantages of the whole mini-batch.
        mask: ``[m, T]`` keep-mask of the whole mini-batch.

    Returns:
        Scalar fp32 tensor, in nats per unit step size.
    """
    return -masked_mean(token_covariance(logprobs, advantages, mask), mask)


def repo_d_beta(zeta: float, entropy_change: Tensor) -> Tensor:
    """REPO-D's ``beta = -zeta * dH_hat``: proportional to the predicted entropy *drop*.

    The paper's REPO-D is ``beta = zeta * dH_hat``. Taken literally with ``zeta > 0`` and the usual
    ``dH_hat < 0``, ``beta`` would be negative, i.e. an entropy *penalty* that the controller would strengthen
    while entropy is below target, the opposite of REPO's intent. The project therefore takes ``beta`` to
    oppose the predicted change: a predicted drop (``dH_hat < 0``) gives an entropy bonus of matching size,
    a predicted rise a penalty; ``zeta > 0`` always counteracts the step, ``zeta < 0`` (two-way controller)
    reinforces it.

    Args:
        zeta: the coefficient (any sign).
        entropy_change: scalar ``dH_hat`` from `predicted_entropy_change`.

    Returns:
        Scalar tensor.
    """
    return -zeta * entropy_change


def repo_d_advantages(
    advantages: Tensor,
    logprobs: Tensor,
    entropy: Tensor,
    mask: Tensor,
    beta: Tensor | float,
    logprob_floor: float = -20.0,
) -> Tensor:
    """Generic REPO advantages ``A' = A - beta * (lp + H)`` (used by REPO-D), padding unchanged.

    Args:
        advantages: ``[n, T]`` per-token advantages.
        logprobs: ``[n, T]`` log-probs of the sampled tokens (detached, clamped below at ``logprob_floor``).
        entropy: ``[n, T]`` full-vocabulary entropy in nats (detached).
        mask: ``[n, T]`` keep-mask.
        beta: scalar coefficient.
        logprob_floor: lower bound on ``lp`` in nats.

    Returns:
        ``[n, T]`` advantages, same dtype as ``advantages``.
    """
    lp = logprobs.detach().clamp(min=logprob_floor).to(advantages.dtype)
    centred = lp + entropy.detach().to(advantages.dtype)  # [n, T]; E[lp + H] = 0 under the policy
    shifted = advantages - beta * centred
    return torch.where(mask.bool(), shifted, advantages)


def next_zeta(
    zeta: float, entropy: float, target: float, zeta_min: float, zeta_max: float, two_way: bool = False
) -> float:
    """One step of the ``zeta`` controller (once per RL iteration).

    A positive ``zeta`` pushes entropy up. Entropy below target: ``zeta *= 2``; above: ``zeta /= 2``; equal:
    unchanged; ``|zeta|`` clamped to ``[zeta_min, zeta_max]``. With ``two_way``, when ``|zeta|`` already sits
    at ``zeta_min`` and entropy is still above target, the sign flips (``zeta = -zeta_min``) so the term pulls
    entropy down, as a public re-implementation of REPO does. A negative ``zeta``
    is handled symmetrically (the project's reading; that implementation's handling of the negative branch
    was not available): entropy above target doubles ``|zeta|``, below target halves it, and at
    ``zeta_min`` it flips back to ``+zeta_min``.

    Args:
        zeta: current coefficient, ``zeta_min <= |zeta| <= zeta_max``.
        entropy: measured mean token entropy of the iteration, nats.
        target: target entropy, nats.
        zeta_min: lower bound on ``|zeta|`` (> 0).
        zeta_max: upper bound on ``|zeta|``.
        two_way: allow the sign flip.

    Returns:
        The next ``zeta``.
    """
    if entropy == target:
        return zeta
    sign = 1.0 if zeta > 0 else -1.0
    magnitude = abs(zeta)
    # "strengthen" = move entropy in the direction the current sign already pushes it
    strengthen = (entropy < target) == (sign > 0)
    if strengthen:
        return sign * min(magnitude * 2.0, zeta_max)
    if two_way and magnitude <= zeta_min:
        return -sign * zeta_min
    return sign * max(magnitude / 2.0, zeta_min)


# --------------------------------------------------------------------------------------------- the callback


class REPO(Regularizer):
    """Entropy-preserving advantages: owns the per-token advantages; ``zeta`` tracks the initial entropy.

    Args:
        variant: ``"R"`` (``beta = zeta*|A|``, sign-preserving) or ``"D"`` (``beta`` from the predicted
            entropy change of the mini-batch; needs the mini-batch statistics, one extra no-grad forward
            per update when mini-batches are split into micro-batches).
        zeta_init: initial ``zeta`` (default 1e-3 for R, 1e-2 for D); negative only with ``two_way``.
        zeta_min: lower bound on ``|zeta|`` (default 1e-4 for R, 1e-3 for D).
        zeta_max: upper bound on ``|zeta|`` (default 0.05 for R, 10 for D).
        two_way: let ``zeta`` change sign at ``zeta_min`` so the controller can also pull entropy down.
        logprob_floor: ``lp`` is clamped below at this value (nats, < 0) before use.

    State (``state_dict``): ``zeta``, ``target`` (entropy of the first iteration, nats; None before it),
    ``iterations``. Logs ``reg/REPO/zeta`` and ``reg/REPO/target`` once per iteration (the state after the
    update, i.e. what the next iteration uses), and per micro-batch ``reg/REPO/advantage_change`` (mean
    ``|A' - A|`` over kept tokens), plus ``reg/REPO/beta`` and ``reg/REPO/entropy_change`` for REPO-D.
    """

    replaces = ("advantages",)

    def __init__(
        self,
        variant: Variant = "R",
        zeta_init: float | None = None,
        zeta_min: float | None = None,
        zeta_max: float | None = None,
        two_way: bool = False,
        logprob_floor: float = -20.0,
    ) -> None:
        if variant not in ZETA_DEFAULTS:
            raise ConfigError(f"REPO.variant must be 'R' or 'D', got {variant!r}")
        default_init, default_min, default_max = ZETA_DEFAULTS[variant]
        zeta_init = default_init if zeta_init is None else float(zeta_init)
        zeta_min = default_min if zeta_min is None else float(zeta_min)
        zeta_max = default_max if zeta_max is None else float(zeta_max)
        # written as "not (valid)" so that NaN fails too
        if not 0 < zeta_min < float("inf"):
            raise ConfigError(f"REPO.zeta_min must be a finite number > 0, got {zeta_min}")
        if not zeta_min <= zeta_max < float("inf"):
            raise ConfigError(
                f"REPO.zeta_max must be finite and >= zeta_min, got zeta_min={zeta_min}, zeta_max={zeta_max}"
            )
        if not zeta_min <= abs(zeta_init) <= zeta_max:
            raise ConfigError(
                f"REPO.zeta_init must satisfy zeta_min <= |zeta_init| <= zeta_max, got zeta_init={zeta_init} "
                f"with [{zeta_min}, {zeta_max}]"
            )
        if zeta_init < 0 and not two_way:
            raise ConfigError(f"REPO.zeta_init={zeta_init} is negative: that needs two_way=True")
        if not logprob_floor < 0:
            raise ConfigError(f"REPO.logprob_floor must be < 0 (nats), got {logprob_floor}")
        self.variant = variant
        self.zeta_init, self.zeta_min, self.zeta_max = zeta_init, zeta_min, zeta_max
        self.two_way = two_way
        self.logprob_floor = float(logprob_floor)
        # state: read by replace_inputs/adjust, changed only in on_train_batch_end
        self.zeta = zeta_init
        # The module calls replace_inputs(view) then adjust(view) on the same view: the second reuses the first's result.
        self._last: tuple[MinibatchView, float, tuple[Tensor, dict[str, Tensor | float]]] | None = None
        self.target: float | None = None
        self.iterations = 0

    @property
    @typing_extensions.override
    def needs_minibatch_stats(self) -> bool:
        return self.variant == "D"

    # ---- the contract (pure)

    def _entropy_change(self, view: MinibatchView) -> Tensor:
        if (
            view.minibatch_logprobs is None
            or view.minibatch_advantages is None
            or view.minibatch_mask is None
        ):
            raise ConfigError(
                "REPO(variant='D') needs the mini-batch statistics (view.minibatch_logprobs is None); "
                "the module fills them when needs_minibatch_stats is set"
            )
        return predicted_entropy_change(
            view.minibatch_logprobs, view.minibatch_advantages, view.minibatch_mask
        )

    def _advantages(self, view: MinibatchView) -> tuple[Tensor, dict[str, Tensor | float]]:
        """``A'`` of the micro-batch ``[n, T]`` and the variant's own metrics, computed once per view and zeta."""
        if self._last is not None and self._last[0] is view and self._last[1] == self.zeta:
            return self._last[2]
        result = self._compute_advantages(view)
        self._last = (view, self.zeta, result)
        return result

    def _compute_advantages(self, view: MinibatchView) -> tuple[Tensor, dict[str, Tensor | float]]:
        if self.variant == "R":
            advantages = repo_r_advantages(
                view.advantages, view.logprobs, view.mask, self.zeta, self.logprob_floor
            )
            return advantages, {}
        # beta is one number for the whole mini-batch: every micro-batch of it computes the same value
        change = self._entropy_change(view)
        beta = repo_d_beta(self.zeta, change).to(view.advantages.device)
        advantages = repo_d_advantages(
            view.advantages, view.logprobs, view.entropy, view.mask, beta, self.logprob_floor
        )
        return advantages, {"beta": beta.detach(), "entropy_change": change.detach()}

    @typing_extensions.override
    def replace_inputs(self, view: MinibatchView) -> Replacements:
        return Replacements(advantages=self._advantages(view)[0])

    @typing_extensions.override
    def adjust(self, view: MinibatchView) -> Adjustment:
        advantages, metrics = self._advantages(view)
        change = masked_mean((advantages - view.advantages).abs(), view.mask).detach()
        return Adjustment(metrics={"advantage_change": change, **metrics})

    # ---- state

    @typing_extensions.override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._last = None  # release the last micro-batch's tensors
        entropy = measured_entropy(outputs, self.name)
        if entropy is None:  # no kept token in this rollout: nothing measured
            return
        if self.target is None:
            self.target = entropy
        self.zeta = next_zeta(self.zeta, entropy, self.target, self.zeta_min, self.zeta_max, self.two_way)
        self.iterations += 1
        self.log_state(pl_module, {"zeta": self.zeta, "target": self.target})

    @typing_extensions.override
    def state_dict(self) -> dict[str, Any]:
        return {"zeta": self.zeta, "target": self.target, "iterations": self.iterations}

    @typing_extensions.override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.zeta = float(state_dict["zeta"])
        self.target = None if state_dict["target"] is None else float(state_dict["target"])
        self.iterations = int(state_dict["iterations"])
