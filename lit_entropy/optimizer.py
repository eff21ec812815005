"""The optimizer of the trainable parameters: its options, how it is built, and the end of every update.

`build_optimizer` is ``configure_optimizers``: the configured factory or AdamW, over the trainable parameters
only, with the scheduler stepped after every update. `optimizer_step` ends each update: the gradient norm, then
clipping, ``optimizer.step()`` and the scheduler, or a skipped update. An update is skipped (gradients dropped,
no optimizer or scheduler step) when its mini-batch has no kept token on any rank, or when its loss or gradient
is not finite on some rank (`NonfiniteGuard` counts those and stops the run after too many in a row). A skipped
update still advances Lightning's step count, so ``max_steps`` and ``every_n_train_steps`` keep their meaning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lit_entropy.distributed import sum_over_ranks
from lit_entropy.errors import ConfigError
from lit_entropy.iteration_stats import IterationSums
from lit_entropy.model import trainable_parameters
from lit_entropy.nonfinite_guard import NonfiniteGuard


def check_optimizer_options(learning_rate: float, max_grad_norm: float | None) -> None:
    """The module's optimizer options on their own.

    Raises:
        ConfigError: A learning rate that is not a finite number > 0, or such a ``max_grad_norm`` (None is off).
    """
    if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ConfigError(f"max_grad_norm must be a finite number > 0 or null, got {max_grad_norm}")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        # an infinite rate turns the weights to NaN while the loss of that update still looks finite
        raise ConfigError(f"learning_rate must be a finite number > 0, got {learning_rate}")


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter],
    optimizer_factory: Callable[..., Any] | None,
    lr_scheduler_factory: Callable[..., Any] | None,
    learning_rate: float,
) -> Any:
    """What ``configure_optimizers`` returns: the factory's optimizer (or AdamW at ``learning_rate``) and its
    scheduler, if any."""
    parameters = list(parameters)
    if optimizer_factory is not None:
        optimizer = optimizer_factory(parameters)
    else:
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
    if lr_scheduler_factory is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": lr_scheduler_factory(optimizer)}


def optimizer_step(
    module: LightningModule,
    sums: IterationSums,
    loss: Tensor,
    empty: bool,
    guard: NonfiniteGuard,
    max_grad_norm: float | None,
) -> Tensor | None:
    """Clip, step, zero, schedule; returns the gradient norm before clipping, or None for a skipped update.

    Args:
        module: the LightningModule (`GRPO`): its ``policy`` holds the gradients, its optimizer and scheduler
            step, and Lightning clips through it.
        sums: the iteration's sums, where a skipped update is counted.
        loss: this rank's loss of the update, summed over its micro-batches.
        empty: the mini-batch has no kept token on any rank.
        guard: counts non-finite updates in a row.
        max_grad_norm: clipping by global norm, or None.
    """
    optimizer, scheduler = module.optimizers(), module.lr_schedulers()
    grads = [p.grad for p in trainable_parameters(module.policy) if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=module.device)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm of sharded gradients is a partial DTensor
        grad_norm = grad_norm.full_tensor()
    if empty:
        optimizer.zero_grad(set_to_none=True)
        sums.skipped_empty += 1
        count_skipped_step(module.trainer)
        return None
    # after the gradient all-reduce every rank holds the same norm; the loss is local, so sum it
    if not guard.is_finite(grad_norm, sum_over_ranks(loss)):
        optimizer.zero_grad(set_to_none=True)
        sums.skipped_nonfinite += 1
        count_skipped_step(module.trainer)
        return None
    if max_grad_norm is not None:
        module.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return grad_norm.detach()


def count_skipped_step(trainer: Trainer) -> None:
    """Advance the optimizer-step progress (Lightning's ``global_step``) for an update that was skipped."""
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    progress.increment_ready()
    progress.increment_completed()


__all__ = ["build_optimizer", "check_optimizer_options", "count_skipped_step", "optimizer_step"]
