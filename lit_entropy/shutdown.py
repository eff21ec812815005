"""`CheckpointOnSigterm`: a final checkpoint when the run is asked to stop (SIGTERM).

Lightning handles SIGTERM by finishing the current RL iteration and raising ``SIGTERMException`` at the
next batch boundary (on every rank). That boundary is a consistent state: the iteration's updates are done
and nothing of the next one has run. This callback writes a checkpoint there, as ``last.ckpt`` in the
``ModelCheckpoint`` folder, so ``fit --ckpt_path last`` resumes exactly where the run stopped. `GRPO` adds it
to every Trainer (``configure_callbacks``). Other exceptions (a crash in the middle of an iteration) do not
write one: the state would be half an iteration, and the last periodic checkpoint is the place to resume.

Validation is part of the iteration it follows. Lightning would stop in the middle of a validation (after any
of its batches), a state a resume cannot continue exactly: the validation's metrics so far are lost and the
resumed run's sampling no longer matches. So a SIGTERM that arrives before or during a validation lets it
finish; the checkpoint is written at its end (the state Lightning restores as "validation done") and the run
stops there.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override


class CheckpointOnSigterm(Callback):
    """Save ``<checkpoint dir>/last.ckpt`` when the fit stops on SIGTERM.

    Args:
        dirpath: where to write; default: the Trainer's ``ModelCheckpoint`` folder, else
            ``<default_root_dir>/checkpoints``.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.saved_path: str | None = None
        self._held = False  # a SIGTERM received during validation, held back until the validation ends
        self._saved_at_step: int | None = None

    def checkpoint_path(self, trainer: Trainer) -> str:
        folder = self.dirpath
        if folder is None:
            callback = trainer.checkpoint_callback
            folder = callback.dirpath if isinstance(callback, ModelCheckpoint) else None
        if folder is None:
            folder = os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(folder, ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION)

    def _in_fit_validation(self, trainer: Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def _save(self, trainer: Trainer) -> None:
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # every rank takes part (sharded checkpoints); the write is atomic
        self.saved_path = path
        self._saved_at_step = trainer.global_step
        rank_zero_info(f"lit_entropy: SIGTERM: checkpoint saved to {path}; resume with --ckpt_path last")

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # Lightning checks the flag right after this hook and would stop mid-validation: hold it until the end.
        if self._in_fit_validation(trainer) and trainer.received_sigterm:
            trainer._signal_connector.received_sigterm = False
            self._held = True

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._in_fit_validation(trainer):
            return
        if self._held or trainer.received_sigterm:
            self._held = False
            trainer._signal_connector.received_sigterm = True  # the loop stops once this validation is done
            self._save(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning would still stop with SIGTERMException after the fit's last epoch; let the fit end normally
        # instead (the adapter is exported by on_fit_end), its last state saved above or by ModelCheckpoint.
        if trainer.received_sigterm and _fit_is_done(trainer):
            trainer._signal_connector.received_sigterm = False
            rank_zero_info("lit_entropy: SIGTERM during the last iteration: the fit ends normally")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if self._saved_at_step == trainer.global_step:
            return  # saved at the end of this iteration's validation
        if trainer.validating:
            rank_zero_info(
                "lit_entropy: SIGTERM in the middle of a validation: no checkpoint written there (it would not "
                "resume exactly); resume from the last periodic checkpoint with --ckpt_path last"
            )
            return
        self._save(trainer)


def _fit_is_done(trainer: Trainer) -> bool:
    """Whether the epoch that is ending is the fit's last (``max_steps`` reached, or the last of ``max_epochs``)."""
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    return trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
