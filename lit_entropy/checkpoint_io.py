"""`SameFolderCheckpointIO`: checkpoint files written to a temporary file next to them, then renamed into place.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file comes from
``tempfile.mkstemp()``, in ``$TMPDIR``. When ``$TMPDIR`` is on another filesystem than the checkpoints (the
usual ``/tmp`` on tmpfs, checkpoints on a network disk), the final move is a copy into the target: a full disk
or a kill during it leaves a truncated checkpoint, and an overwritten ``last.ckpt`` is truncated first. Here the
temporary file is created in the checkpoint's own folder, written, flushed to disk (``fsync``) and renamed over
the target with ``os.replace``, which is atomic on one filesystem: a reader sees the old file or the new one.
A write that fails (``ENOSPC``) removes its temporary file, leaves the old checkpoint as it was and raises an
error naming the file. `GRPO` installs it in place of Lightning's default at fit start; remote paths
(``s3://``) and other ``CheckpointIO`` plugins are left to Lightning.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lit_entropy.errors import LitEntropyError


class CheckpointWriteError(LitEntropyError, OSError):
    """A checkpoint file could not be written; nothing was left at its path and the previous file is intact."""


def _write(handle: Any, data: memoryview) -> None:
    """Write ``data`` to the open file ``handle`` and flush it to disk (one place, so tests can fail it)."""
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())


def _fsync_folder(folder: str) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened (some filesystems): the rename itself is done
        return
    with contextlib.suppress(OSError):
        os.fsync(descriptor)
    os.close(descriptor)


def save_atomically(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save`` ``checkpoint`` to ``path`` through a temporary file in the same folder, then rename it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)  # a checkpoint that cannot be serialised fails here, before any file
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.close(descriptor)
        with open(temporary, "wb") as handle:  # by name: the handle's name is the temporary file's path
            _write(handle, buffer.getbuffer())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # as a plain open() would create it (mkstemp makes it 0600)
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        if isinstance(error, OSError):
            raise CheckpointWriteError(
                f"writing the checkpoint {path} failed: {error.strerror or error}; nothing was written there and "
                "an earlier file of that name is intact (free space in that folder, or choose another "
                "checkpoint.dirpath)"
            ) from error
        raise
    _fsync_folder(folder)


class SameFolderCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go through `save_atomically`; loading and removal unchanged."""

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or get_filesystem(path).protocol not in ("file", ("file", "local")):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_atomically(checkpoint, path)


def install_same_folder_checkpoint_io(trainer: Trainer) -> None:
    """Use `SameFolderCheckpointIO` when the strategy has Lightning's default ``TorchCheckpointIO``."""
    strategy = trainer.strategy
    if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
        strategy.checkpoint_io = SameFolderCheckpointIO()
