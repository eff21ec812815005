"""ADAPO: an adaptive upper clip range ``eps_high`` steered toward an entropy target (Apple, arXiv
2603.11682).

Ratio clipping bounds how much one update can change entropy, roughly to ``[(1-eps_low)H, (1+eps_high)H]``:
a wider upper clip lets rare tokens with positive advantage gain more probability (DAPO's clip-higher), which
preserves entropy. ADAPO raises ``eps_high`` while entropy is below its target and lowers it while above.

The update law is the project's choice (the paper's exact law was not available): multiplicative, once per
RL iteration, ``eps_high *= rate`` below target, ``eps_high /= rate`` above, clamped to
``[eps_high_min, eps_high_max]``; see `next_eps_high`.
"""

from __future__ import annotations

from typing import Any

import typing_extensions
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lit_entropy.errors import ConfigError
from lit_entropy.regularizer import MinibatchView, Regularizer, Replacements, measured_entropy

__all__ = ["ADAPO", "entropy_target", "next_eps_high"]


# --------------------------------------------------------------------------------------------- the maths


def entropy_target(initial_entropy: float, target: float | None, relative: bool) -> float:
    """The entropy target in nats.

    Args:
        initial_entropy: mean token entropy of the first RL iteration, nats.
        target: None (the initial entropy itself, with ``relative``), a fraction of the initial entropy
            (``relative``), or an absolute value in nats (not ``relative``).
        relative: whether ``target`` is a fraction of ``initial_entropy``.

    Returns:
        The target, nats.
    """
    if target is None:
        return initial_entropy
    return target * initial_entropy if relative else target


def next_eps_high(
    eps_high: float, entropy: float, target: float, rate: float, eps_high_min: float, eps_high_max: float
) -> float:
    """One step of ADAPO's law (the project's choice): multiply by ``rate`` below target, divide above.

    Multiplicative so that the step is proportional to the current clip range, and scale-free across models;
    a measured entropy equal to the target leaves ``eps_high`` unchanged.

    Args:
        eps_high: current upper clip range.
        entropy: measured mean token entropy of the iteration, nats.
        target: target entropy, nats.
        rate: step factor, > 1.
        eps_high_min: lower bound.
        eps_high_max: upper bound.

    Returns:
        The next ``eps_high``, in ``[eps_high_min, eps_high_max]``.
    """
    if entropy < target:
        eps_high = eps_high * rate
    elif entropy > target:
        eps_high = eps_high / rate
    return min(max(eps_high, eps_high_min), eps_high_max)


# --------------------------------------------------------------------------------------------- the callback


class ADAPO(Regularizer):
    """Adaptive asymmetric clipping: owns ``eps_high`` (``eps_low`` stays the loss's).

    Args:
        eps_high_init: ``eps_high`` of the first iteration.
        eps_high_min: lower bound on ``eps_high`` (> 0).
        eps_high_max: upper bound on ``eps_high``.
        rate: multiplicative step per iteration (> 1).
        target: the entropy target: None for the entropy of the first iteration (needs ``relative``); a
            fraction of it (> 0) when ``relative``; an absolute value in nats (> 0) otherwise.
        relative: whether ``target`` is relative to the first iteration's entropy.

    State (``state_dict``): ``eps_high``, ``initial_entropy`` and ``target`` (nats; None before the first
    iteration), ``iterations``. Logs ``reg/ADAPO/eps_high`` (the value for the next iteration) and
    ``reg/ADAPO/target`` once per iteration.
    """

    replaces = ("eps_high",)

    def __init__(
        self,
        eps_high_init: float = 0.28,
        eps_high_min: float = 0.2,
        eps_high_max: float = 0.4,
        rate: float = 1.1,
        target: float | None = None,
        relative: bool = True,
    ) -> None:
        # written as "not (valid)" so that NaN fails too
        if not 0 < eps_high_min < float("inf"):
            raise ConfigError(f"ADAPO.eps_high_min must be a finite number > 0, got {eps_high_min}")
        if not eps_high_min <= eps_high_max < float("inf"):
            raise ConfigError(
                "ADAPO.eps_high_max must be finite and >= eps_high_min, got "
                f"eps_high_min={eps_high_min}, eps_high_max={eps_high_max}"
            )
        if not eps_high_min <= eps_high_init <= eps_high_max:
            raise ConfigError(
                f"ADAPO.eps_high_init={eps_high_init} must lie in [eps_high_min, eps_high_max] = "
                f"[{eps_high_min}, {eps_high_max}]"
            )
        if not 1 < rate < float("inf"):
            raise ConfigError(f"ADAPO.rate must be a finite number > 1, got {rate}")
        if target is None and not relative:
            raise ConfigError("ADAPO.relative=False needs an absolute target in nats (ADAPO.target is null)")
        if target is not None and not 0 < target < float("inf"):
            kind = "a fraction of the first iteration's entropy" if relative else "an entropy in nats"
            raise ConfigError(f"ADAPO.target ({kind}) must be a finite number > 0, got {target}")
        self.eps_high_init = float(eps_high_init)
        self.eps_high_min, self.eps_high_max = float(eps_high_min), float(eps_high_max)
        self.rate = float(rate)
        self.target_setting = None if target is None else float(target)
        self.relative = relative
        # state: read by replace_inputs, changed only in on_train_batch_end
        self.eps_high = self.eps_high_init
        self.initial_entropy: float | None = None
        self.target: float | None = None
        self.iterations = 0
        self._warned_on_policy = False  # not state: a resumed run may warn again

    @typing_extensions.override
    def replace_inputs(self, view: MinibatchView) -> Replacements:
        return Replacements(eps_high=self.eps_high)

    @typing_extensions.override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        entropy = measured_entropy(outputs, self.name)
        if entropy is None:  # no kept token in this rollout: nothing measured
            return
        if not self._warned_on_policy and float(outputs["updates"]) == 1:
            # every ratio is exactly 1 with one update per rollout: no clip range, adapted or not, is ever active
            rank_zero_warn(
                f"{self.name} has no effect with one optimizer update per rollout (fully on-policy, ratio == 1): "
                "use ppo_epochs > 1 or a minibatch_size smaller than the rollout"
            )
            self._warned_on_policy = True
        if self.initial_entropy is None:
            self.initial_entropy = entropy
            self.target = entropy_target(entropy, self.target_setting, self.relative)
        assert self.target is not None  # set together with initial_entropy
        self.eps_high = next_eps_high(
            self.eps_high, entropy, self.target, self.rate, self.eps_high_min, self.eps_high_max
        )
        self.iterations += 1
        self.log_state(pl_module, {"eps_high": self.eps_high, "target": self.target})

    @typing_extensions.override
    def state_dict(self) -> dict[str, Any]:
        return {
            "eps_high": self.eps_high,
            "initial_entropy": self.initial_entropy,
            "target": self.target,
            "iterations": self.iterations,
        }

    @typing_extensions.override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.eps_high = float(state_dict["eps_high"])
        initial, target = state_dict["initial_entropy"], state_dict["target"]
        self.initial_entropy = None if initial is None else float(initial)
        self.target = None if target is None else float(target)
        self.iterations = int(state_dict["iterations"])
