"""`CheckpointOnSigterm`: a final checkpoint when the run is asked to stop (SIGTERM).

Lightning handles SIGTERM by finishing the current RL iteration and raising ``SIGTERMException`` at the
next batch boundary (on every rank). That boundary is a consistent state: the iteration's updates are done
and nothing of the next one has run. This callback writes a checkpoint there, as ``last.ckpt`` in the
``ModelCheckpoint`` folder, so ``fit --ckpt_path last`` resumes exactly where the run stopped. `GRPO` adds it
to every Trainer (``configure_callbacks``). Other exceptions (a crash in the middle of an iteration) do not
write one: the state would be half an iteration, and the last periodic checkpoint is the place to resume.
"""

from __future__ import annotations

import os

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
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

    def checkpoint_path(self, trainer: Trainer) -> str:
        folder = self.dirpath
        if folder is None:
            callback = trainer.checkpoint_callback
            folder = callback.dirpath if isinstance(callback, ModelCheckpoint) else None
        if folder is None:
            folder = os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(folder, ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # every rank takes part (sharded checkpoints); the write is atomic
        self.saved_path = path
        rank_zero_info(f"lit_entropy: SIGTERM: checkpoint saved to {path}; resume with --ckpt_path last")
