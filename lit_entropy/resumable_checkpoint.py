"""`ResumableCheckpoint`: Lightning's ``ModelCheckpoint`` whose periodic checkpoints resume exactly.

Lightning's ``ModelCheckpoint(every_n_train_steps=N)`` writes in ``on_train_batch_end``, before the validation
that may follow the same RL iteration. That validation draws from the random generators (it samples), so a run
resumed from such a checkpoint restores generators as they were *before* it, while Lightning counts the
validation as done and skips it: every later sampling diverges from the uninterrupted run, and that validation's
row is never logged. This subclass moves a periodic save that falls on an iteration followed by validation to
the end of that validation (``on_validation_end``), the state Lightning restores as "validation done". Every other
periodic save happens where Lightning's does. The saved state is the one after the iteration's optimizer updates.

The ``lit-entropy`` CLI uses it for its ``--checkpoint.*`` arguments; in a plain ``Trainer`` use it in place of
``ModelCheckpoint`` (same arguments).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override


def validation_follows(trainer: Trainer) -> bool:
    """Whether the fit loop runs validation right after the training batch that is ending now.

    The loop's own decision (``_should_check_val_fx``), so it agrees with ``val_check_interval``,
    ``check_val_every_n_epoch``, ``limit_val_batches`` and the end of an epoch.
    """
    loop = trainer.fit_loop
    if not trainer.enable_validation or loop._data_fetcher is None:
        return False
    return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) that saves a periodic checkpoint after the validation it precedes."""

    _save_after_validation = False  # a periodic save due at the end of the validation running now

    def _step_due(self, trainer: Trainer) -> bool:
        return self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0

    def _save(self, trainer: Trainer) -> None:
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._train_time_interval is not None:  # time-triggered saves: Lightning's behaviour
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if not self._step_due(trainer) or self._should_skip_saving_checkpoint(trainer):
            return
        if validation_follows(trainer) or (
            self.monitor is not None and self.monitor not in self._monitor_candidates(trainer)
        ):
            self._save_after_validation = True
            return
        self._save(trainer)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._save_after_validation and not trainer.sanity_checking:
            self._save_after_validation = False
            if not self._should_skip_saving_checkpoint(trainer):
                self._save(trainer)
            return
        super().on_validation_end(trainer, pl_module)


def warn_inexact_checkpoints(trainer: Trainer) -> None:
    """Warn once per fit about each plain ``ModelCheckpoint`` whose step-triggered saves can precede a validation."""
    if not trainer.enable_validation:
        return
    for callback in trainer.checkpoint_callbacks:
        if type(callback) is ModelCheckpoint and callback._every_n_train_steps >= 1:
            rank_zero_warn(
                f"ModelCheckpoint(every_n_train_steps={callback._every_n_train_steps}) saves before the validation "
                "that follows the same iteration, and a run resumed from such a checkpoint skips that validation "
                "and samples differently from then on; use lit_entropy.ResumableCheckpoint (same arguments)"
            )
