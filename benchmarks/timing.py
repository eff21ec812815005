"""`IterationTimer`, shared by the benchmark scripts run as ``python benchmarks/<script>.py``."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import Callback, Trainer


class IterationTimer(Callback):
    """Wall seconds of every RL iteration: training_step and the callbacks' hooks listed before this one."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._started = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.seconds.append(time.perf_counter() - self._started)
