"""`MetricsHistory`: a checkpoint carries the metrics rows logged so far, and a run resumed from it logs them first.

A resumed run writes into a version folder of its own, so without this its ``metrics.csv`` would start at the
checkpoint's step and the rows before it would live only in the interrupted run's folder: possibly cut short
(a row is written after the checkpoint of the same iteration, so a SIGKILL between the two loses it for good).
As Hugging Face's ``Trainer`` keeps its ``log_history`` in ``trainer_state.json``, every checkpoint here holds the
rows of the first ``CSVLogger``, up to and including the checkpoint's own iteration; a run resumed from it
writes them to its ``metrics.csv`` before anything new. The resumed run's file is then the whole run, row for row
what an uninterrupted run writes. Other loggers (TensorBoard) show the resumed part as a run of its own.

`GRPO` adds this callback to every Trainer (``configure_callbacks``).
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from typing_extensions import override

#: Where a checkpoint holds the rows: a list of ``{column: text}``, each with its ``step``.
HISTORY_KEY = "lit_entropy_metrics_history"


def csv_logger(trainer: Trainer) -> CSVLogger | None:
    """The Trainer's first ``CSVLogger`` (the one the report tools read), if any."""
    return next((logger for logger in trainer.loggers if isinstance(logger, CSVLogger)), None)


def written_rows(logger: CSVLogger) -> list[dict[str, str]]:
    """Every row the logger has received, flushed to its ``metrics.csv`` first; empty cells left out."""
    logger.save()
    path = logger.experiment.metrics_file_path
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as handle:
        return [
            {key: value for key, value in row.items() if value not in ("", None)}
            for row in csv.DictReader(handle)
        ]


def pending_training_row(trainer: Trainer) -> dict[str, str] | None:
    """The row Lightning logs for the training batch that is ending now, when a checkpoint is saved before it is.

    Lightning sends a training batch's values to the loggers after the batch's ``on_train_batch_end`` hooks, where
    ``ModelCheckpoint`` saves; this is that row (same values, ``epoch`` and ``step``), computed the way Lightning's
    logger connector computes it. ``None`` outside ``on_train_batch_end`` or when this batch logs nothing.
    """
    loop = trainer.fit_loop.epoch_loop
    progress = loop.batch_progress.current
    if not trainer.training or progress.processed == progress.completed:
        return None
    connector = trainer._logger_connector
    if not connector.should_update_logs:
        return None
    metrics = convert_tensors_to_scalars(connector.metrics["log"])
    if not metrics:
        return None
    metrics.setdefault("epoch", trainer.current_epoch)
    metrics["step"] = loop._batches_that_stepped
    return {key: str(value) for key, value in metrics.items()}


class MetricsHistory(Callback):
    """Keep the ``CSVLogger`` rows in every checkpoint; log a restored checkpoint's rows before new ones."""

    def __init__(self) -> None:
        self._restored: list[dict[str, str]] = []

    @override
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        logger = csv_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        rows = written_rows(logger)
        pending = pending_training_row(trainer)
        if pending is not None:
            rows.append(pending)
        checkpoint[HISTORY_KEY] = rows

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._restored = [dict(row) for row in checkpoint.get(HISTORY_KEY, [])]

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_restored(trainer)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_restored(trainer)  # resumed from a checkpoint at the end: no training, so no on_train_start

    def _log_restored(self, trainer: Trainer) -> None:
        rows, self._restored = self._restored, []
        logger = csv_logger(trainer)
        if not rows or logger is None or not trainer.is_global_zero:
            return
        writer = logger.experiment  # the rows are already prefixed: past the logger's own prefixing
        for row in rows:
            values = dict(row)
            step = int(values.pop("step"))
            writer.log_metrics(values, step)
        writer.save()
