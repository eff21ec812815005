"""`EntropyBonus` (static coefficient) and `AdaptiveEntropyBonus` (Skywork-OR1's adaptive coefficient).

Both subtract ``coef * H_mean`` from the loss, where ``H_mean`` is the token mean of the full-vocabulary
entropy over the kept tokens of the optimizer mini-batch (with gradient), so a descent step raises the
entropy. The adaptive variant moves ``coef`` by a fixed ``delta`` after each RL iteration toward keeping the
measured entropy at a target, and applies the bonus only while the entropy is below that target.

Shapes: ``n`` sequences in the micro-batch, ``T`` completion length. Entropies in nats.
"""

from __future__ import annotations

import math
from typing import Any

import typing_extensions
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lit_entropy.errors import ConfigError
from lit_entropy.regularizer import Adjustment, MinibatchView, Regularizer, measured_entropy

__all__ = ["AdaptiveEntropyBonus", "EntropyBonus", "adaptive_coef_step", "bonus_term"]


# --- pure maths ----------------------------------------------------------------------------------------


def bonus_term(entropy_share: Tensor, coef: float) -> Tensor:
    """One micro-batch's share of the loss term ``-coef * H_mean``.

    Args:
        entropy_share: scalar, ``view.token_mean(view.entropy)``: ``sum(H * mask) / num_tokens`` with the
            mini-batch's token count, so the shares of all micro-batches add up to ``H_mean`` (nats).
        coef: bonus coefficient (>= 0; loss units per nat).

    Returns:
        Scalar loss term; its gradient with respect to a kept token's entropy is ``-coef / num_tokens``.
    """
    return -coef * entropy_share


def adaptive_coef_step(
    coef: float, measured: float, target: float, delta: float, coef_min: float, coef_max: float
) -> float:
    """Skywork-OR1's coefficient update: ``coef + delta`` if ``measured < target`` else ``coef - delta``,
    clipped to ``[coef_min, coef_max]``.

    Args:
        coef: current coefficient.
        measured: the iteration's mean token entropy (nats).
        target: entropy target (nats).
        delta: step size (coefficient units).
        coef_min: lower bound.
        coef_max: upper bound.

    Returns:
        The new coefficient. Entropy exactly at the target counts as "not below" (the coefficient decreases).
    """
    step = delta if measured < target else -delta
    return min(max(coef + step, coef_min), coef_max)


# --- the callbacks -------------------------------------------------------------------------------------


class EntropyBonus(Regularizer):
    """Static entropy bonus: the loss gets ``-coef * H_mean`` (the entropy regulariser of verl and TRL).

    ``H_mean`` is the token mean of the full-vocabulary entropy over the kept tokens of the optimizer
    mini-batch, always token-mean whatever ``loss.aggregation`` is; it is differentiated through the entropy
    (``needs_entropy_grad``: the module keeps the graph of the ``[n, T, V]`` softmax, recomputed chunk-wise).

    Logs ``reg/EntropyBonus/coef`` (once per iteration) and ``reg/EntropyBonus/entropy`` (the micro-batch
    token mean the bonus acted on, averaged over the iteration's micro-batches); the term is
    ``train/term/EntropyBonus/bonus``.

    Args:
        coef: bonus coefficient (>= 0).
    """

    needs_entropy_grad = True

    def __init__(self, coef: float = 0.001) -> None:
        if not math.isfinite(coef) or coef < 0:
            raise ConfigError(
                f"EntropyBonus coef={coef} must be a finite number >= 0 "
                "(a bonus: coef * entropy is subtracted from the loss)"
            )
        self.coef = float(coef)

    def adjust(self, view: MinibatchView) -> Adjustment:
        return Adjustment(
            loss_terms={"bonus": bonus_term(view.token_mean(view.entropy), self.coef)},
            metrics={"entropy": _microbatch_entropy(view)},
        )

    @typing_extensions.override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.log_state(pl_module, {"coef": self.coef})


class AdaptiveEntropyBonus(Regularizer):
    """Entropy bonus with Skywork-OR1's adaptive coefficient, applied only while entropy is below target.

    After each RL iteration, with ``H`` the rollout's mean token entropy (``outputs["entropy"]``, synchronised
    across ranks)::

        coef <- clip(coef + delta if H < target else coef - delta, coef_min, coef_max)
        active <- H < target

    and during the next iteration the loss gets ``-coef * H_mean`` if ``active``, else nothing (a zero term is
    still returned so that ``train/term/AdaptiveEntropyBonus/bonus`` has a value every iteration). Before the
    first measurement the bonus is active at ``coef_init`` (0 by default, i.e. no bonus).

    Defaults are those of the Skywork-OR1 scripts (target 0.2 nats, delta 1e-4, max 5e-3, init 0). TRL's port
    differs: its defaults are a delta of 0.005 and a maximum of 1.0, and it compares with ``<=``, so entropy
    exactly at the target raises its coefficient (here it lowers it, as in Skywork-OR1). Pass
    ``delta=0.005, coef_max=1.0`` to match TRL's step sizes.

    State (``state_dict``): ``coef`` and ``active``. Logs ``reg/AdaptiveEntropyBonus/coef`` and ``active``
    (1.0 / 0.0) after the update (the values the next iteration uses), and ``entropy`` (micro-batch token
    mean, averaged over the iteration's micro-batches).

    Args:
        target: entropy target in nats.
        delta: coefficient step per RL iteration.
        coef_init: initial coefficient, in ``[coef_min, coef_max]``.
        coef_min: lower bound of the coefficient (>= 0).
        coef_max: upper bound of the coefficient.
    """

    needs_entropy_grad = True

    def __init__(
        self,
        target: float = 0.2,
        delta: float = 1e-4,
        coef_init: float = 0.0,
        coef_min: float = 0.0,
        coef_max: float = 5e-3,
    ) -> None:
        arguments = {
            "target": target,
            "delta": delta,
            "coef_init": coef_init,
            "coef_min": coef_min,
            "coef_max": coef_max,
        }
        for name, value in arguments.items():
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"AdaptiveEntropyBonus {name}={value} must be a finite number >= 0")
        if coef_min > coef_max:
            raise ConfigError(f"AdaptiveEntropyBonus coef_min={coef_min} must be <= coef_max={coef_max}")
        if not coef_min <= coef_init <= coef_max:
            raise ConfigError(
                f"AdaptiveEntropyBonus coef_init={coef_init} must be in "
                f"[coef_min={coef_min}, coef_max={coef_max}]"
            )
        self.target = float(target)
        self.delta = float(delta)
        self.coef_init = float(coef_init)
        self.coef_min = float(coef_min)
        self.coef_max = float(coef_max)
        # state: changed only in on_train_batch_end
        self.coef = float(coef_init)
        self.active = True

    def adjust(self, view: MinibatchView) -> Adjustment:
        coef = self.coef if self.active else 0.0
        return Adjustment(
            loss_terms={"bonus": bonus_term(view.token_mean(view.entropy), coef)},
            metrics={"entropy": _microbatch_entropy(view)},
        )

    @typing_extensions.override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        measured = measured_entropy(outputs, self.name)
        if measured is None:  # no kept token in this rollout: nothing measured
            return
        self.coef = adaptive_coef_step(
            self.coef, measured, self.target, self.delta, self.coef_min, self.coef_max
        )
        self.active = measured < self.target
        self.log_state(pl_module, {"coef": self.coef, "active": float(self.active)})

    @typing_extensions.override
    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "active": self.active}

    @typing_extensions.override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in ("coef", "active"):
            if name not in state_dict:
                raise ConfigError(f"{self.name} state lacks {name!r} (has {sorted(state_dict)})")
        self.coef = float(state_dict["coef"])
        self.active = bool(state_dict["active"])


def _microbatch_entropy(view: MinibatchView) -> Tensor:
    """Detached token-mean entropy of the micro-batch's own kept tokens (nats), for logging."""
    return (view.entropy.detach() * view.mask).sum() / view.mask.sum().clamp(min=1)
