"""`EntropyConstraint`: keep the mean token entropy above a scheduled target with a Lagrange multiplier.

The RL objective is maximised subject to ``H_mean >= H_target(t)``. The loss of every optimizer mini-batch
gets the term ``lambda * (H_target(t) - H_mean)``, differentiated through the full-vocabulary entropy
``H_mean`` (token mean over the kept tokens of the mini-batch). After each RL iteration, dual ascent on the
violation measured on that iteration's rollout::

    lambda <- clamp(lambda + lr_lambda * (H_target(t) - H_measured), 0, lambda_max)

so ``lambda`` grows while entropy is below target and decays to 0 once it is above: the term acts only when
needed. With ``two_sided=True`` the constraint is the equality ``H_mean = H_target(t)``: ``lambda`` is clamped
to ``[-lambda_max, lambda_max]``, and a negative ``lambda`` pulls entropy that overshot the target back down.
With ``lambda_kp > 0`` the multiplier is a proportional-integral controller (the PID Lagrangian of Stooke et
al., 2020, without its derivative term): the dual-ascent variable above is the integral part, and the loss
uses ``clamp(lambda + lambda_kp * violation, lambda_min, lambda_max)``, which follows the last measured
violation at once instead of accumulating it.
The target follows a schedule from ``target_start`` to ``target_end`` over ``decay_steps`` RL
iterations, in nats or as fractions of the entropy measured on the first iteration.

Shapes: ``n`` sequences in the micro-batch, ``T`` completion length. Entropies in nats.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
import typing_extensions
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lit_entropy.errors import ConfigError
from lit_entropy.regularizer import Adjustment, MinibatchView, Regularizer, measured_entropy

Schedule = Literal["constant", "linear", "cosine", "exponential"]

__all__ = [
    "EntropyConstraint",
    "Schedule",
    "constraint_term",
    "dual_ascent_step",
    "log_dual_ascent_step",
    "proportional_integral_multiplier",
    "scheduled_target",
]


# --- pure maths ----------------------------------------------------------------------------------------


def scheduled_target(start: float, end: float, step: int, decay_steps: int, schedule: Schedule) -> float:
    """The entropy target after ``step`` RL iterations, moving from ``start`` to ``end`` over ``decay_steps``.

    With ``f = min(step / decay_steps, 1)``:

    - ``constant``: ``start``
    - ``linear``: ``start + (end - start) * f``
    - ``cosine``: ``end + (start - end) * (1 + cos(pi * f)) / 2`` (slow, fast, slow; the midpoint is the mean)
    - ``exponential``: ``start * (end / start) ** f`` (geometric; ``start`` and ``end`` must be > 0)

    After ``decay_steps`` the target stays at ``end`` (``start`` for ``constant``).

    Args:
        start: target at step 0 (nats, or a fraction of the initial entropy: the unit is the caller's).
        end: target from ``decay_steps`` on, same unit.
        step: RL iterations done (>= 0).
        decay_steps: iterations the move takes (>= 1).
        schedule: one of ``constant``, ``linear``, ``cosine``, ``exponential``.

    Returns:
        The target, in the unit of ``start`` and ``end``.

    Raises:
        ConfigError: an unknown schedule, ``decay_steps < 1``, ``step < 0``, or an exponential schedule with a
            non-positive ``start`` or ``end``.
    """
    if schedule not in get_args(Schedule):
        raise ConfigError(f"schedule={schedule!r} is not one of {list(get_args(Schedule))}")
    if decay_steps < 1:
        raise ConfigError(f"decay_steps={decay_steps} must be >= 1")
    if step < 0:
        raise ConfigError(f"step={step} must be >= 0")
    if schedule == "exponential" and not (start > 0 and end > 0):
        raise ConfigError(
            f"an exponential schedule needs target_start > 0 and target_end > 0, got {start} and {end}"
        )
    fraction = min(step / decay_steps, 1.0)
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * fraction
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * fraction))
    return start * (end / start) ** fraction


def dual_ascent_step(
    multiplier: float, violation: float, lr: float, multiplier_max: float, multiplier_min: float = 0.0
) -> float:
    """One projected dual-ascent step: ``clamp(multiplier + lr * violation, multiplier_min, multiplier_max)``.

    Args:
        multiplier: current ``lambda``.
        violation: ``H_target - H_measured`` in nats (positive while entropy is below target).
        lr: dual step size (nats^-1: ``lambda`` is dimensionless per nat of violation).
        multiplier_max: upper bound of ``lambda``.
        multiplier_min: lower bound of ``lambda``: 0 for the inequality ``H >= H_target``,
            ``-multiplier_max`` for the equality ``H = H_target``.

    Returns:
        The new ``lambda``.
    """
    return min(max(multiplier + lr * violation, multiplier_min), multiplier_max)


def proportional_integral_multiplier(
    integral: float, violation: float, kp: float, multiplier_min: float, multiplier_max: float
) -> float:
    """The multiplier of a proportional-integral dual update: ``clamp(integral + kp * violation, min, max)``.

    Stooke, Achiam and Abbeel (2020), "Responsive Safety in Reinforcement Learning by PID Lagrangian Methods":
    pure dual ascent is an integral controller, and its multiplier lags the constraint it acts on; the
    proportional term ``kp * violation`` moves the multiplier with the violation measured now. The integral
    part is the projected dual-ascent variable (`dual_ascent_step`), so it cannot wind up beyond the bounds.

    Args:
        integral: the dual-ascent variable (already within the bounds).
        violation: ``H_target - H_measured`` of the last iteration, nats.
        kp: proportional gain (per nat of violation, >= 0); 0 gives ``integral`` back.
        multiplier_min: lower bound (0, or ``-multiplier_max`` for the two-sided constraint).
        multiplier_max: upper bound.

    Returns:
        The multiplier the loss uses.
    """
    # the same projected step as dual ascent, taken from the integral with the gain as its size
    return dual_ascent_step(integral, violation, kp, multiplier_max, multiplier_min)


def log_dual_ascent_step(log_multiplier: float, violation: float, lr: float, multiplier_max: float) -> float:
    """The same ascent on ``log lambda``, as SAC tunes its temperature: ``log_lambda += lr * violation``.

    That is ``log_lambda -= lr * (H_measured - H_target)``. ``lambda = exp(log_lambda)`` stays > 0 (it decays
    geometrically instead of reaching 0) and changes by a factor ``exp(lr * violation)`` per iteration,
    whatever its magnitude. The state itself is capped at ``log(multiplier_max)``: capping only
    ``exp(log_lambda)`` would let ``log_lambda`` wind up while entropy stays low, and then take many
    iterations to come back below the cap.

    Args:
        log_multiplier: current ``log lambda``.
        violation: ``H_target - H_measured`` in nats.
        lr: dual step size on ``log lambda`` (nats^-1).
        multiplier_max: upper bound of ``lambda`` (> 0).

    Returns:
        The new ``log lambda``.
    """
    return min(log_multiplier + lr * violation, math.log(multiplier_max))


def constraint_term(entropy_share: Tensor, kept_share: Tensor, target: float, multiplier: float) -> Tensor:
    """One micro-batch's share of ``lambda * (H_target - H_mean)``.

    The module adds loss terms once per micro-batch, so both parts are written as shares of the mini-batch
    token mean: ``entropy_share = sum(H * mask) / num_tokens`` and ``kept_share = sum(mask) / num_tokens``
    (the constant target is spread over the micro-batches in proportion to their kept tokens). Summed over the
    micro-batches of a mini-batch the shares give ``H_mean`` and 1, hence exactly
    ``lambda * (H_target - H_mean)``.

    Args:
        entropy_share: scalar, ``view.token_mean(view.entropy)`` (nats, with gradient through the entropy).
        kept_share: scalar, ``view.token_mean(ones)``.
        target: ``H_target`` in nats.
        multiplier: ``lambda`` (< 0 only for the two-sided constraint).

    Returns:
        Scalar loss term; its gradient with respect to the entropy of a kept token is
        ``-lambda / num_tokens``, so a descent step raises the entropy while ``lambda > 0`` and lowers it
        while ``lambda < 0``.
    """
    return multiplier * (target * kept_share - entropy_share)


# --- the callback --------------------------------------------------------------------------------------


class EntropyConstraint(Regularizer):
    """Lagrangian entropy constraint ``H_mean >= H_target(t)`` with a dual-ascent multiplier.

    Adds ``lambda * (H_target(t) - H_mean)`` to the loss (``H_mean``: token mean of the full-vocabulary
    entropy over the kept tokens of the optimizer mini-batch, with gradient). After each RL iteration,
    ``lambda`` takes one projected dual-ascent step on the violation ``H_target(t) - H_measured``, where
    ``H_measured`` is the rollout's mean token entropy that the module returns (``outputs["entropy"]``,
    already synchronised across ranks, so every rank takes the same step). Then the schedule position ``t``
    (RL iterations done) advances.

    Two-sided (``two_sided=True``): the equality ``H_mean = H_target(t)``. ``lambda`` may fall to
    ``-lambda_max``; below 0 the term penalises entropy above the target. The one-sided constraint only
    lets ``lambda`` decay to 0 once entropy is above target, and nothing then stops entropy that keeps
    rising on its own.

    Proportional-integral (``lambda_kp > 0``): the loss uses ``clamp(lambda_I + lambda_kp * violation,
    lambda_min, lambda_max)``, where ``lambda_I`` is the dual-ascent variable and ``violation`` the one the
    last iteration measured (see `proportional_integral_multiplier`). Not with ``log_space``.

    Relative targets (``relative=True``): ``target_start`` / ``target_end`` are fractions of the entropy
    measured on the first RL iteration. Until that measurement exists (during the first iteration) the target
    is undefined and the term is 0; the first dual step already uses the measured entropy and the target
    derived from it.

    Cross-rank: the constraint needs no token selection, so no all-gather; ``H_mean`` in the loss is
    the rank's mini-batch token mean (like the policy loss, normalised by ``view.num_tokens``: a global token
    count there makes it exact), and the dual step uses the synchronised ``outputs["entropy"]``.

    State (``state_dict``): ``lambda`` (or ``log_lambda`` with ``log_space``; the integral part if
    ``lambda_kp > 0``), ``step`` (RL iterations done, the schedule position), ``initial_entropy`` (nats, None
    until measured), and with ``lambda_kp > 0`` the last ``violation`` (None until measured).

    Logs ``reg/EntropyConstraint/lambda`` (after the step: the value the next iteration uses; with
    ``lambda_kp > 0`` also its integral part, ``lambda_integral``), ``target`` and
    ``violation`` (``target - measured``, nats) of the iteration that just ended, and, averaged over
    micro-batches, ``entropy`` (the micro-batch token-mean entropy the term acted on); the term itself is
    ``train/term/EntropyConstraint/constraint``.

    Args:
        target_start: target at the first iteration: nats, or a fraction of the initial entropy if
            ``relative``.
        target_end: target from ``decay_steps`` on (default: ``target_start``); must equal it for
            ``constant``.
        schedule: ``constant``, ``linear``, ``cosine`` or ``exponential`` (see `scheduled_target`).
        decay_steps: RL iterations the schedule takes to reach ``target_end``.
        relative: targets are fractions of the entropy measured on the first iteration.
        lr_lambda: dual step size (per nat of violation; on ``log lambda`` with ``log_space``).
        lambda_init: initial multiplier (> 0 with ``log_space``).
        lambda_max: upper bound of the multiplier (and ``-lambda_max`` its lower bound if ``two_sided``).
        log_space: ascend on ``log lambda`` (SAC style) instead of ``lambda``.
        two_sided: hold entropy at the target, from above as well as from below (``lambda`` may be
            negative); not with ``log_space``, whose ``lambda`` is always > 0.
        lambda_kp: proportional gain of the multiplier (per nat of violation); 0, the default, is plain dual
            ascent. Not with ``log_space``.
    """

    needs_entropy_grad = True

    def __init__(
        self,
        target_start: float = 1.0,
        target_end: float | None = None,
        schedule: Schedule = "constant",
        decay_steps: int = 100,
        relative: bool = False,
        lr_lambda: float = 0.1,
        lambda_init: float = 0.0,
        lambda_max: float = 10.0,
        log_space: bool = False,
        two_sided: bool = False,
        lambda_kp: float = 0.0,
    ) -> None:
        end = target_start if target_end is None else target_end
        _check_finite(target_start=target_start, target_end=end, lr_lambda=lr_lambda)
        _check_finite(lambda_init=lambda_init, lambda_max=lambda_max, lambda_kp=lambda_kp)
        if schedule not in get_args(Schedule):
            raise ConfigError(
                f"EntropyConstraint schedule={schedule!r} is not one of {list(get_args(Schedule))}"
            )
        for name, value in (("target_start", target_start), ("target_end", end)):
            if value < 0:
                raise ConfigError(f"EntropyConstraint {name}={value} must be >= 0 (entropy is non-negative)")
        if schedule == "constant" and end != target_start:
            raise ConfigError(
                f"EntropyConstraint target_end={end} differs from target_start={target_start} but "
                "schedule='constant' never moves the target; choose 'linear', 'cosine' or 'exponential'"
            )
        if schedule == "exponential" and not (target_start > 0 and end > 0):
            raise ConfigError(
                f"EntropyConstraint schedule='exponential' needs target_start > 0 and target_end > 0, "
                f"got {target_start} and {end}"
            )
        if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps < 1:
            raise ConfigError(f"EntropyConstraint decay_steps={decay_steps!r} must be an integer >= 1")
        if lr_lambda < 0:
            raise ConfigError(f"EntropyConstraint lr_lambda={lr_lambda} must be >= 0")
        if lambda_max < 0:
            raise ConfigError(f"EntropyConstraint lambda_max={lambda_max} must be >= 0")
        if two_sided and log_space:
            raise ConfigError(
                "EntropyConstraint two_sided=True needs a multiplier that can be negative; log_space=True "
                "keeps lambda > 0: choose one"
            )
        if lambda_kp < 0:
            raise ConfigError(f"EntropyConstraint lambda_kp={lambda_kp} must be >= 0")
        if lambda_kp > 0 and log_space:
            raise ConfigError(
                f"EntropyConstraint lambda_kp={lambda_kp} adds a proportional term to lambda itself; "
                "log_space=True ascends on log(lambda): choose one"
            )
        lambda_min = -lambda_max if two_sided else 0.0
        if not lambda_min <= lambda_init <= lambda_max:
            raise ConfigError(
                f"EntropyConstraint lambda_init={lambda_init} must be in [{lambda_min:g}, lambda_max={lambda_max}]"
            )
        if log_space and lambda_init <= 0:
            raise ConfigError(
                f"EntropyConstraint lambda_init={lambda_init} must be > 0 with log_space=True "
                "(the state is log(lambda))"
            )
        self.target_start = float(target_start)
        self.target_end = float(end)
        self.schedule: Schedule = schedule
        self.decay_steps = decay_steps
        self.relative = relative
        self.lr_lambda = float(lr_lambda)
        self.lambda_init = float(lambda_init)
        self.lambda_max = float(lambda_max)
        self.log_space = log_space
        self.two_sided = two_sided
        self.lambda_min = float(lambda_min)  # the dual step's lower bound: 0, or -lambda_max if two_sided
        self.lambda_kp = float(lambda_kp)
        # state: changed only in on_train_batch_end
        self._lambda = float(lambda_init)  # the dual-ascent variable: the integral part if lambda_kp > 0
        self._violation: float | None = None  # the last iteration's, for the proportional term
        self._log_lambda = math.log(lambda_init) if log_space else 0.0
        self.step = 0
        self.initial_entropy: float | None = None

    @property
    def multiplier(self) -> float:
        """The current ``lambda`` (>= 0, or in ``[-lambda_max, lambda_max]`` if ``two_sided``): the one the
        loss uses, proportional and integral parts together if ``lambda_kp > 0``."""
        if self.log_space:
            return math.exp(self._log_lambda)
        if self.lambda_kp == 0 or self._violation is None:
            return self._lambda
        return proportional_integral_multiplier(
            self._lambda, self._violation, self.lambda_kp, self.lambda_min, self.lambda_max
        )

    def target(self, step: int | None = None) -> float | None:
        """The target in nats at schedule position ``step`` (default: now); None while a relative target's
        reference entropy is not measured yet."""
        scheduled = scheduled_target(
            self.target_start,
            self.target_end,
            self.step if step is None else step,
            self.decay_steps,
            self.schedule,
        )
        if not self.relative:
            return scheduled
        return None if self.initial_entropy is None else scheduled * self.initial_entropy

    def adjust(self, view: MinibatchView) -> Adjustment:
        entropy_share = view.token_mean(view.entropy)  # scalar, with gradient through the entropy
        kept_share = view.token_mean(torch.ones_like(view.entropy))
        target = self.target()
        # An undefined target still returns a (zero) term so train/term/... has a value every iteration.
        multiplier = 0.0 if target is None else self.multiplier
        term = constraint_term(entropy_share, kept_share, 0.0 if target is None else target, multiplier)
        micro_tokens = view.mask.sum().clamp(min=1)
        entropy = (view.entropy.detach() * view.mask).sum() / micro_tokens
        return Adjustment(loss_terms={"constraint": term}, metrics={"entropy": entropy})

    @typing_extensions.override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        measured = measured_entropy(outputs, self.name)
        if measured is None:  # no kept token in this rollout: nothing measured
            return
        if self.relative and self.initial_entropy is None:
            self.initial_entropy = measured
        target = self.target()
        assert target is not None  # an absolute target, or the relative one's reference was just set
        violation = target - measured
        if self.log_space:
            self._log_lambda = log_dual_ascent_step(
                self._log_lambda, violation, self.lr_lambda, self.lambda_max
            )
        else:
            self._lambda = dual_ascent_step(
                self._lambda, violation, self.lr_lambda, self.lambda_max, self.lambda_min
            )
        self._violation = violation
        self.step += 1
        state = {"lambda": self.multiplier, "target": target, "violation": violation}
        if self.lambda_kp > 0:
            state["lambda_integral"] = self._lambda
        self.log_state(pl_module, state)

    @typing_extensions.override
    def state_dict(self) -> dict[str, Any]:
        multiplier = {"log_lambda": self._log_lambda} if self.log_space else {"lambda": self._lambda}
        proportional = {"violation": self._violation} if self.lambda_kp > 0 else {}
        return {**multiplier, "step": self.step, "initial_entropy": self.initial_entropy, **proportional}

    @typing_extensions.override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        key = "log_lambda" if self.log_space else "lambda"
        for name in (key, "step", "initial_entropy"):
            if name not in state_dict:
                raise ConfigError(
                    f"{self.name} state lacks {name!r} (has {sorted(state_dict)}); was it saved with another "
                    f"log_space setting (now {self.log_space})?"
                )
        if self.lambda_kp > 0 and "violation" not in state_dict:
            raise ConfigError(
                f"{self.name} state lacks 'violation' (has {sorted(state_dict)}), which the proportional term "
                f"needs: was it saved with lambda_kp=0 (now {self.lambda_kp})? Resume with that setting"
            )
        if self.log_space:
            self._log_lambda = float(state_dict["log_lambda"])
        else:
            saved = float(state_dict["lambda"])
            if saved < 0 and not self.two_sided:  # checked before any state changes
                raise ConfigError(
                    f"{self.name} state has lambda={saved} < 0, which only two_sided=True reaches "
                    "(now False): resume with the setting the run was saved with"
                )
            self._lambda = saved
        self.step = int(state_dict["step"])
        if self.lambda_kp > 0:
            violation = state_dict["violation"]
            self._violation = None if violation is None else float(violation)
        initial = state_dict["initial_entropy"]
        self.initial_entropy = None if initial is None else float(initial)


def _check_finite(**values: float) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise ConfigError(f"EntropyConstraint {name}={value} must be a finite number")
