"""`CollapseGuard`: stop the run (or warn) when entropy stays below a floor, keeping the last good weights.

In the spirit of Lightning's ``EarlyStopping``, but on the policy's entropy: after every RL iteration it reads
the rollout's mean token entropy (``outputs["entropy"]``, nats, already synchronised across ranks, so every
rank takes the same decision) and counts consecutive iterations below the floor. When the count reaches
``patience``: ``mode="warn"`` warns once per episode (an episode ends when the entropy is back at or above
the floor), ``mode="stop"`` sets ``trainer.should_stop``.

"The last good checkpoint": at the time the collapse is detected, the current weights are the collapsed ones,
so saving them would keep nothing good. Instead, before every iteration the guard copies the trainable
(``requires_grad``) parameters to CPU memory (cheap for LoRA adapters; a full copy of the model for full
fine-tuning), and keeps that copy when the iteration's entropy is at or above the floor. The entropy of
iteration ``t`` is measured on the rollout sampled by the weights at the *start* of ``t``, so these are the
weights known to be good: the last good copy is the weights at the start of the last good iteration (the
weights after the iteration before it); the weights after the last good iteration are unmeasured until the
next iteration. On stop, the copy is restored into the module and saved with ``trainer.save_checkpoint`` as
``collapse-guard-last-good.ckpt`` in ``trainer.log_dir`` (the logger's folder, or ``default_root_dir``).
The module then holds the good weights, so checkpoints and the adapter written after the stop hold them
too. That checkpoint's optimizer state, step counters and callback states are those of the stopping
iteration. Weights are copied only with ``mode="stop"``, ``checkpoint=True`` and a ``ModelCheckpoint`` in
the Trainer (``enable_checkpointing``); the copy is not part of the callback state, so after a resume it
exists again from the next good iteration on.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal, get_args

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lit_entropy.checkpoint_state import restore_trainable_state, trainable_state
from lit_entropy.errors import ConfigError
from lit_entropy.regularizer import measured_entropy

Mode = Literal["stop", "warn"]
CHECKPOINT_NAME = "collapse-guard-last-good.ckpt"

__all__ = ["CHECKPOINT_NAME", "CollapseGuard", "Mode"]


class CollapseGuard(Callback):
    """Stop (or warn) when the mean token entropy stays below ``floor`` for ``patience`` RL iterations.

    State (``state_dict``): ``iterations`` (RL iterations seen), ``count`` (consecutive iterations below the
    floor), ``fired`` (the guard acted in the current episode: warned, or
    stopped and saved), ``first_entropy`` (nats, the
    reference of a relative floor; None before the first iteration), ``last_good_iteration`` (0-based, None
    while no iteration was at or above the floor).

    Logs ``collapse_guard/floor`` (nats) and ``collapse_guard/count`` every iteration.

    Args:
        floor: entropy floor in nats, or a fraction of the first iteration's entropy if ``relative``.
            Entropy strictly below it counts.
        patience: consecutive iterations below the floor that trigger the guard.
        mode: ``stop`` the run (``trainer.should_stop``) or ``warn`` once per episode.
        relative: ``floor`` is a fraction of the entropy measured on the first iteration.
        checkpoint: with ``mode="stop"`` and a ``ModelCheckpoint``, save the last good weights on stop (see
            the module docstring).
    """

    def __init__(
        self,
        floor: float = 0.05,
        patience: int = 10,
        mode: Mode = "stop",
        relative: bool = False,
        checkpoint: bool = True,
    ) -> None:
        if not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor >= 0):
            raise ConfigError(f"CollapseGuard.floor must be a finite number >= 0, got {floor!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"CollapseGuard.patience must be an integer >= 1, got {patience!r}")
        if mode not in get_args(Mode):
            raise ConfigError(f"CollapseGuard.mode must be one of {list(get_args(Mode))}, got {mode!r}")
        self.floor = float(floor)
        self.patience = patience
        self.mode: Mode = mode
        self.relative = relative
        self.checkpoint = checkpoint
        # state: changed only in on_train_batch_end
        self.iterations = 0
        self.count = 0
        self.fired = False
        self.first_entropy: float | None = None
        self.last_good_iteration: int | None = None
        # weights in CPU memory, not in the state (see the module docstring)
        self._candidate: dict[str, Tensor] | None = None
        self._last_good: dict[str, Tensor] | None = None
        self.last_good_path: str | None = None  # where the last-good checkpoint was saved, once it is

    @property
    def floor_nats(self) -> float | None:
        """The floor in nats; None while a relative floor's reference entropy is not measured yet."""
        if not self.relative:
            return self.floor
        return None if self.first_entropy is None else self.floor * self.first_entropy

    def _keeps_weights(self, trainer: Trainer) -> bool:
        return self.mode == "stop" and self.checkpoint and trainer.checkpoint_callback is not None

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._keeps_weights(trainer):
            # the weights that will sample (and be judged by) this iteration's rollout
            self._candidate = trainable_state(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        entropy = measured_entropy(outputs, type(self).__name__)
        if entropy is None:  # no kept token in this rollout: nothing measured
            return
        if self.relative and self.first_entropy is None:
            self.first_entropy = entropy
        floor = self.floor_nats
        assert floor is not None  # an absolute floor, or the relative one's reference was just set
        iteration = self.iterations
        self.iterations += 1
        if entropy < floor:
            self.count += 1
        else:
            self.count = 0
            self.fired = False
            self.last_good_iteration = iteration
            if self._candidate is not None:
                self._last_good = self._candidate
        self._candidate = None
        pl_module.log("collapse_guard/floor", floor, on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("collapse_guard/count", float(self.count), on_step=True, on_epoch=False, batch_size=1)
        if self.count < self.patience:
            return
        message = (
            f"CollapseGuard: the mean token entropy has been below the floor {floor:.4g} nats for "
            f"{self.count} consecutive RL iterations (patience {self.patience}; now {entropy:.4g} nats at "
            f"iteration {iteration}; last iteration at or above the floor: {self.last_good_iteration})"
        )
        if self.mode == "warn":
            if not self.fired:
                rank_zero_warn(message + "; training continues (mode='warn')")
                self.fired = True
            return
        trainer.should_stop = True
        # once per episode: if the stop is deferred (Trainer min_steps), restoring again would undo training
        if not self.fired:
            self.fired = True
            rank_zero_info(
                message + "; stopping the run (mode='stop')" + self._save_last_good(trainer, pl_module)
            )

    def _save_last_good(self, trainer: Trainer, pl_module: LightningModule) -> str:
        """Restore the last good weights and checkpoint them; returns the sentence for the stop message."""
        if not self._keeps_weights(trainer):
            return ""
        if self._last_good is None:
            return "; no iteration of this run was at or above the floor, so there is no last-good checkpoint"
        restore_trainable_state(pl_module, self._last_good)
        path = os.path.join(trainer.log_dir or trainer.default_root_dir, CHECKPOINT_NAME)
        trainer.save_checkpoint(path)
        self.last_good_path = path
        return (
            f"; the weights from the start of iteration {self.last_good_iteration} are restored in the "
            f"module and saved to {path}"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "count": self.count,
            "fired": self.fired,
            "first_entropy": self.first_entropy,
            "last_good_iteration": self.last_good_iteration,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        keys = ("iterations", "count", "fired", "first_entropy", "last_good_iteration")
        missing = [key for key in keys if key not in state_dict]
        if missing:
            raise ConfigError(f"CollapseGuard state lacks {missing} (has {sorted(state_dict)})")
        self.iterations = int(state_dict["iterations"])
        self.count = int(state_dict["count"])
        self.fired = bool(state_dict["fired"])
        first, good = state_dict["first_entropy"], state_dict["last_good_iteration"]
        self.first_entropy = None if first is None else float(first)
        self.last_good_iteration = None if good is None else int(good)
