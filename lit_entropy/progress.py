"""`RLProgressBar`: the training progress bar counts RL iterations against the RL iterations of the fit.

Lightning's bar counts the batches of one pass over the dataloader against the dataloader's length (``Epoch 0/-2
... 300/512``). `GRPO` runs one RL iteration per batch and several optimizer updates in it, while
``trainer.max_steps`` counts updates; this bar shows ``RL iteration: 40%| | 120/300 [..., train/reward=...]``:
the iterations done in this run folder's fit (a resumed fit continues the count) over the iterations the fit
will run, with whatever the module logs with ``prog_bar=True`` (``train/reward``, ``train/entropy``,
``val/accuracy`` after a validation).

The ``lit-entropy`` command uses it in place of Lightning's default bar; with the Python API, pass
``Trainer(callbacks=[RLProgressBar()])``. ``enable_progress_bar=False`` turns it off as any bar.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from typing_extensions import override


def updates_per_iteration(trainer: Trainer) -> int | None:
    """Optimizer updates in one RL iteration of ``trainer``'s module (GRPO's ``batch_split(prompts).updates``);
    None for a module that does not run RL iterations."""
    module = trainer.lightning_module
    batch_split = getattr(module, "batch_split", None)
    prompts = getattr(trainer.datamodule, "batch_size", None)
    if batch_split is None or not isinstance(prompts, int) or prompts < 1:
        return None
    return int(batch_split(prompts).updates)


def iterations_of_fit(trainer: Trainer) -> int | None:
    """RL iterations the fit runs in all: ``ceil(max_steps / updates per iteration)`` when ``max_steps`` is set,
    ``max_epochs`` passes over the prompts when that is set and smaller; None when neither bounds it."""
    totals = []
    updates = updates_per_iteration(trainer)
    if trainer.max_steps is not None and trainer.max_steps > 0 and updates:
        totals.append(math.ceil(trainer.max_steps / updates))
    per_epoch = trainer.num_training_batches
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(per_epoch):
        totals.append(int(trainer.max_epochs * per_epoch))
    return min(totals) if totals else None


def iterations_done(trainer: Trainer) -> int:
    """RL iterations (training batches) run so far in this fit, across epochs and a resume."""
    return trainer.fit_loop.total_batch_idx + 1


class RLProgressBar(TQDMProgressBar):
    """One training bar for the whole fit, in RL iterations (one ``training_step`` each).

    Args:
        refresh_rate: redraw every this many RL iterations (Lightning's meaning).
        process_position: the bar's line, for several bars at once (Lightning's meaning).
        description: the training bar's label.

    A module without RL iterations (no ``batch_split``) gets Lightning's bar, labelled as here. The validation
    and test bars are Lightning's.
    """

    # tqdm's rate_fmt turns to s/it below one iteration a second, as RL iterations usually are
    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, description: str = "RL iteration"):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=False)
        self.description = description
        self._counts_iterations = False

    @property
    @override
    def train_description(self) -> str:
        return self.description

    @override
    def init_train_tqdm(self) -> Tqdm:
        if not self._counts_iterations:
            return super().init_train_tqdm()
        return Tqdm(  # Lightning's training bar, over the fit's RL iterations from where a resume left off
            desc=self.train_description,
            total=iterations_of_fit(self.trainer),
            initial=iterations_done(self.trainer),
            position=(2 * self.process_position),
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._counts_iterations = updates_per_iteration(trainer) is not None
        super().on_train_start(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        if not self._counts_iterations:  # Lightning's bar, one pass over the dataloader at a time
            super().on_train_epoch_start(trainer, *args)
            self.train_progress_bar.set_description(self.description)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._counts_iterations:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        done = iterations_done(trainer)
        if not bar.disable and self._should_update(done, bar.total):
            bar.n = done
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar
        if not bar.disable and bar.total is not None and done >= bar.total:
            bar.close()  # the last iteration: its line ends before Lightning's "`Trainer.fit` stopped"

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._counts_iterations:
            super().on_train_epoch_end(trainer, pl_module)
            return
        if not self.train_progress_bar.disable:  # one bar for the whole fit: it closes at on_train_end
            self.train_progress_bar.n = iterations_done(trainer)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


def replace_default_progress_bar(trainer: Trainer, configured: Iterable[Any]) -> None:
    """Put an `RLProgressBar` where Lightning added its default bar; a bar in ``configured`` (the callbacks the
    user asked for) stays, and ``enable_progress_bar=False`` leaves none to replace."""
    bar = trainer.progress_bar_callback
    if bar is None or type(bar) not in (TQDMProgressBar, RichProgressBar):
        return
    if any(callback is bar for callback in configured):
        return
    trainer.callbacks[trainer.callbacks.index(bar)] = RLProgressBar()


__all__ = ["RLProgressBar", "iterations_done", "iterations_of_fit", "replace_default_progress_bar"]
