"""`EntropyLaw`: fit the entropy-performance law ``R = -a * exp(H) + b`` online, as training goes.

Cui et al. (arXiv 2505.22617) observe that, without entropy intervention, validation performance ``R`` and
policy entropy ``H`` (nats) follow ``R = -a * exp(H) + b`` over a run: performance is bought with entropy, and
the predicted ceiling once entropy is exhausted (``H = 0``) is ``b - a``. The fit is ordinary least squares of
``R`` on ``x = exp(H)``, a straight line ``R = -a * x + b``. In the paper, a fit on the first ~15% of training
predicted the rest with about 1% RMSE.

The callback pairs each validation accuracy with the mean training entropy of the RL iterations since the
previous validation, refits after every validation once it has ``warmup_points`` pairs, and logs the
coefficients, the ceiling and ``R^2``. With ``fit_fraction`` it fits on the pairs of the first part of the
run only and reports how well that fit predicts the later pairs and the final accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, overload

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lit_entropy.errors import ConfigError, DataError

__all__ = ["EntropyLaw", "LawFit", "LawPoint", "fit_entropy_law", "predict"]


# --- pure maths ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LawFit:
    """A fitted law ``R = -a * exp(H) + b``.

    Attributes:
        a: coefficient of ``exp(H)`` (positive when accuracy rises as entropy falls), accuracy units.
        b: intercept, accuracy units.
        r2: coefficient of determination of the fit on its own points (1 = exact).
    """

    a: float
    b: float
    r2: float

    @property
    def ceiling(self) -> float:
        """The predicted accuracy once entropy is exhausted (``H = 0``, ``exp(H) = 1``): ``b - a``."""
        return self.b - self.a


def fit_entropy_law(entropy: Tensor, accuracy: Tensor) -> LawFit:
    """Ordinary least squares of ``accuracy`` on ``x = exp(entropy)``: ``R = -a * x + b``.

    With ``x_c = x - mean(x)`` and ``R_c = R - mean(R)``: ``a = -sum(x_c * R_c) / sum(x_c^2)``,
    ``b = mean(R) + a * mean(x)``, ``R^2 = 1 - SS_res / SS_tot``. Computed in float64.

    Degenerate inputs: if every accuracy is equal (``SS_tot = 0``) the fit is the constant ``a = 0``,
    ``b = R`` with zero residuals, reported as ``R^2 = 1``. If every ``exp(H)`` is equal the slope is
    undefined (any line through the mean fits): that is a `DataError`, never a NaN.

    Args:
        entropy: ``[P]`` mean token entropies, nats.
        accuracy: ``[P]`` validation accuracies paired with them (any unit: ``a`` and ``b`` take it).

    Returns:
        The fitted `LawFit`.

    Raises:
        DataError: shapes differ or are not 1-D, fewer than 2 points, a non-finite value, or all entropies
            equal.
    """
    if entropy.dim() != 1 or accuracy.dim() != 1 or entropy.shape != accuracy.shape:
        raise DataError(
            f"fit_entropy_law needs two 1-D tensors of one length, got entropy {tuple(entropy.shape)} and "
            f"accuracy {tuple(accuracy.shape)}"
        )
    if entropy.numel() < 2:
        raise DataError(f"fit_entropy_law needs at least 2 (entropy, accuracy) points, got {entropy.numel()}")
    h = entropy.detach().to(torch.float64).cpu()
    r = accuracy.detach().to(torch.float64).cpu()
    for name, values in (("entropy", h), ("accuracy", r)):
        if not bool(torch.isfinite(values).all()):
            raise DataError(f"fit_entropy_law {name} has a non-finite value: {values.tolist()}")
    x = torch.exp(h)  # [P]
    if bool((x == x[0]).all()):
        raise DataError(
            f"fit_entropy_law: all {len(x)} entropies are equal ({float(h[0]):.6g} nats), so the slope of "
            "the law is undefined; it needs points at different entropies"
        )
    if bool((r == r[0]).all()):
        return LawFit(a=0.0, b=float(r[0]), r2=1.0)
    x_c, r_c = x - x.mean(), r - r.mean()
    slope = float((x_c * r_c).sum() / (x_c * x_c).sum())
    a = -slope
    b = float(r.mean()) - slope * float(x.mean())
    residual = r - (slope * x + b)  # [P]
    r2 = 1.0 - float((residual * residual).sum() / (r_c * r_c).sum())
    return LawFit(a=a, b=b, r2=r2)


@overload
def predict(fit: LawFit, entropy: float) -> float: ...
@overload
def predict(fit: LawFit, entropy: Tensor) -> Tensor: ...


def predict(fit: LawFit, entropy: float | Tensor) -> float | Tensor:
    """The accuracy the law predicts at ``entropy`` nats: ``-a * exp(H) + b`` (float in, float out)."""
    if isinstance(entropy, Tensor):
        return -fit.a * torch.exp(entropy) + fit.b
    return -fit.a * math.exp(entropy) + fit.b


# --- the callback --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LawPoint:
    """One (entropy, accuracy) pair, taken at a validation.

    Attributes:
        step: ``trainer.global_step`` (optimizer updates) at the validation; ``fit_fraction`` compares it with
            ``trainer.max_steps``.
        entropy: mean of the training entropies (nats) of the RL iterations since the previous validation.
        accuracy: the validation accuracy.
        log_step: the step the validation's metrics were logged at (one per RL iteration in Lightning's
            loggers), where the law's metrics of this pair go too.
    """

    step: int
    entropy: float
    accuracy: float
    log_step: int


class EntropyLaw(Callback):
    """Fits ``R = -a * exp(H) + b`` from (training entropy, validation accuracy) pairs as the run goes.

    Every RL iteration, ``on_train_batch_end`` adds the iteration's entropy (``outputs["metrics"][entropy_key]``; for the
    default ``"train/entropy"``, GRPO returns it as ``outputs["entropy"]``, already synchronised across ranks)
    to a running mean. At every validation of ``fit`` (not the sanity check), ``on_validation_end`` pairs
    ``trainer.callback_metrics[accuracy_key]`` with that mean and resets it; a validation with no training
    iteration since the previous one adds no pair. Once ``warmup_points`` pairs are usable it refits and logs,
    to every logger at the step of the validation's own metrics:

    - ``law/a``, ``law/b``, ``law/ceiling`` (``b - a``, the accuracy predicted at ``H = 0``), ``law/r2``,
      ``law/points`` (pairs in the fit);
    - with ``fit_fraction``: the fit uses only pairs whose ``global_step <= fit_fraction * max_steps``, and
      ``law/prediction_rmse`` is the RMSE of its predictions on the later pairs (once there are any). At the
      end of fit, ``law/final_pred`` (the prediction at the last pair's entropy) and ``law/final_obs`` (its
      observed accuracy), when the last pair lies after the fitting part.

    If every fitting pair has the same entropy the law is undefined: the callback warns once and logs nothing
    until the entropies differ. The latest fit is `fit` (None before the first one).

    The metrics go through ``logger.log_metrics`` directly, because ``LightningModule.log`` is not allowed in
    ``on_validation_end``; the step is Lightning's own logging step of the validation (the one
    ``val/accuracy`` is written at, which counts RL iterations, not optimizer updates), so the law's curves
    line up with the validation curves; the final values go at the last validation's step.

    State (``state_dict``): the pairs, and the running entropy sum and count since the last validation.

    Args:
        warmup_points: pairs needed before the first fit (>= 2; two points always fit exactly).
        fit_fraction: fit only on the first fraction of ``trainer.max_steps`` (in ``(0, 1)``) and report the
            prediction error on the rest; None fits on every pair.
        accuracy_key: the validation metric ``R``.
        entropy_key: the training metric ``H`` (nats), read from ``training_step``'s outputs.
    """

    def __init__(
        self,
        warmup_points: int = 3,
        fit_fraction: float | None = None,
        accuracy_key: str = "val/accuracy",
        entropy_key: str = "train/entropy",
    ) -> None:
        if isinstance(warmup_points, bool) or not isinstance(warmup_points, int) or warmup_points < 2:
            raise ConfigError(
                f"EntropyLaw warmup_points={warmup_points!r} must be an integer >= 2 "
                "(a line needs two points)"
            )
        if fit_fraction is not None and not (
            isinstance(fit_fraction, (int, float)) and 0.0 < fit_fraction < 1.0
        ):
            raise ConfigError(f"EntropyLaw fit_fraction={fit_fraction!r} must be in (0, 1) or null")
        for name, key in (("accuracy_key", accuracy_key), ("entropy_key", entropy_key)):
            if not isinstance(key, str) or not key:
                raise ConfigError(f"EntropyLaw {name}={key!r} must be a non-empty metric name")
        self.warmup_points = warmup_points
        self.fit_fraction = None if fit_fraction is None else float(fit_fraction)
        self.accuracy_key = accuracy_key
        self.entropy_key = entropy_key
        # state
        self.points: list[LawPoint] = []
        self._entropy_sum = 0.0
        self._entropy_count = 0
        # derived from the state (refitted after every validation), not saved
        self.fit: LawFit | None = None
        self._warned_degenerate = False

    # ------------------------------------------------------------------ pure views of the state

    def fit_cutoff(self, max_steps: int) -> float | None:
        """The last ``global_step`` whose pairs the fit may use (None: every pair)."""
        return None if self.fit_fraction is None else self.fit_fraction * max_steps

    def split_points(self, max_steps: int) -> tuple[list[LawPoint], list[LawPoint]]:
        """The pairs the fit uses and the later, held-out pairs (empty without ``fit_fraction``)."""
        cutoff = self.fit_cutoff(max_steps)
        if cutoff is None:
            return list(self.points), []
        return [p for p in self.points if p.step <= cutoff], [p for p in self.points if p.step > cutoff]

    # ------------------------------------------------------------------ hooks

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.fit_fraction is not None and (trainer.max_steps is None or trainer.max_steps < 1):
            raise ConfigError(
                f"EntropyLaw fit_fraction={self.fit_fraction} needs trainer.max_steps (the run's length in "
                f"optimizer updates), got max_steps={trainer.max_steps}"
            )
        # a resumed run restores the pairs before this hook; the fit itself is derived from them
        self._refit(trainer.max_steps)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        entropy = self._read_entropy(outputs)
        if math.isfinite(entropy):  # a rollout without kept tokens has no mean entropy
            self._entropy_sum += entropy
            self._entropy_count += 1

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a standalone trainer.validate() after fit would pair its accuracy with stale training entropies
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or self._entropy_count == 0:
            return
        metrics = trainer.callback_metrics
        if self.accuracy_key not in metrics:
            raise ConfigError(
                f"EntropyLaw accuracy_key={self.accuracy_key!r} was not logged by validation; logged: "
                f"{sorted(metrics)}"
            )
        point = LawPoint(
            step=int(trainer.global_step),
            entropy=self._entropy_sum / self._entropy_count,
            accuracy=float(metrics[self.accuracy_key]),
            log_step=_logging_step(trainer),
        )
        self.points.append(point)
        self._entropy_sum, self._entropy_count = 0.0, 0
        values = self._refit(trainer.max_steps)
        if values:
            _log_to_loggers(trainer, values, point.log_step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.fit_fraction is None or self.fit is None or not self.points:
            return
        _, held_out = self.split_points(trainer.max_steps)
        if not held_out:  # pairs are in step order, so the last pair is held out whenever any is
            return
        last = self.points[-1]
        values = {"law/final_pred": predict(self.fit, last.entropy), "law/final_obs": last.accuracy}
        _log_to_loggers(trainer, values, last.log_step)

    # ------------------------------------------------------------------ internals

    def _read_entropy(self, outputs: Any) -> float:
        if isinstance(outputs, Mapping):
            metrics = outputs.get("metrics", {})
            if self.entropy_key in metrics:
                return float(metrics[self.entropy_key])
            # GRPO returns its train/entropy as the `entropy` field of IterationOutputs
            if self.entropy_key == "train/entropy" and "entropy" in outputs:
                return float(outputs["entropy"])
        if isinstance(outputs, Mapping):
            keys = sorted({*outputs, *outputs.get("metrics", {})} - {"metrics"})
        else:
            keys = type(outputs).__name__
        raise ConfigError(
            f"EntropyLaw entropy_key={self.entropy_key!r} is not in training_step's outputs, got {keys}"
        )

    def _refit(self, max_steps: int) -> dict[str, float]:
        """Refit on the current pairs; the metrics to log (empty until the fit exists)."""
        fitting, held_out = self.split_points(max_steps)
        if len(fitting) < self.warmup_points:
            return {}
        try:
            fit = fit_entropy_law(
                torch.tensor([p.entropy for p in fitting], dtype=torch.float64),
                torch.tensor([p.accuracy for p in fitting], dtype=torch.float64),
            )
        except DataError as error:
            if not self._warned_degenerate:
                rank_zero_warn(f"EntropyLaw skips the fit for now: {error}")
                self._warned_degenerate = True
            return {}
        self.fit = fit
        values = {"law/a": fit.a, "law/b": fit.b, "law/ceiling": fit.ceiling, "law/r2": fit.r2}
        values["law/points"] = float(len(fitting))
        if held_out:
            errors = [predict(fit, p.entropy) - p.accuracy for p in held_out]
            values["law/prediction_rmse"] = math.sqrt(sum(e * e for e in errors) / len(errors))
        return values

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "points": [[p.step, p.entropy, p.accuracy, p.log_step] for p in self.points],
            "entropy_sum": self._entropy_sum,
            "entropy_count": self._entropy_count,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"points", "entropy_sum", "entropy_count"} - set(state_dict)
        if missing:
            raise ConfigError(f"EntropyLaw state lacks {sorted(missing)} (has {sorted(state_dict)})")
        self.points = [
            LawPoint(step=int(step), entropy=float(h), accuracy=float(r), log_step=int(log_step))
            for step, h, r, log_step in state_dict["points"]
        ]
        self._entropy_sum = float(state_dict["entropy_sum"])
        self._entropy_count = int(state_dict["entropy_count"])
        self.fit = None  # derived: on_fit_start refits from the restored pairs (it needs max_steps)


def _logging_step(trainer: Trainer) -> int:
    """The step Lightning writes the current metrics at (``val/accuracy`` included).

    It counts training batches (RL iterations), not optimizer updates: with several updates per iteration
    ``trainer.global_step`` would put the law's points at another x than the validation curves.
    """
    fit_loop = getattr(trainer, "fit_loop", None)
    epoch_loop = getattr(fit_loop, "epoch_loop", None)
    step = getattr(epoch_loop, "_batches_that_stepped", None)
    return int(trainer.global_step if step is None else step)


def _log_to_loggers(trainer: Trainer, values: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
