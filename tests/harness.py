"""Shared helpers for regularizer-callback tests: hand-made views and short CPU fits of the tiny model.

Shapes: ``n`` sequences in a micro-batch, ``m`` in the mini-batch, ``T`` completion length.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from lit_entropy.demo import CountdownDataModule
from lit_entropy.model import LoRA, Policy
from lit_entropy.module import GRPO
from lit_entropy.regularizer import MinibatchView, scalar_outputs
from lit_entropy.reward_spec import Reward
from lit_entropy.rollout import Sampling


def char_code_reward(completion: str, example: dict) -> float:
    """Mean character code / 128: varies between completions, so groups have non-zero advantages."""
    return sum(map(ord, completion)) / (128.0 * max(len(completion), 1))


def make_view(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    rows: slice | None = None,
    iteration: int = 0,
    update: int = 0,
    updates_per_iteration: int = 1,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> MinibatchView:
    """A view of the micro-batch ``rows`` of a mini-batch given as whole ``[m, T]`` tensors.

    ``advantages`` may be ``[m]`` (broadcast per token) or ``[m, T]``. The mini-batch statistics
    (``minibatch_*``) are filled as the module fills them when a regularizer sets ``needs_minibatch_stats``.
    """
    m, t = logprobs.shape
    mask = torch.ones(m, t, dtype=torch.bool) if mask is None else mask.bool()
    advantages = advantages[:, None].expand(m, t).float() if advantages.dim() == 1 else advantages.float()
    old_logprobs = logprobs.detach().clone() if old_logprobs is None else old_logprobs
    entropy = torch.ones(m, t) if entropy is None else entropy
    rows = slice(0, m) if rows is None else rows
    return MinibatchView(
        logprobs=logprobs[rows],
        old_logprobs=old_logprobs[rows],
        ref_logprobs=None,
        entropy=entropy[rows],
        advantages=advantages[rows],
        mask=mask[rows],
        num_tokens=mask.sum(),
        num_sequences=m,
        eps_low=eps_low,
        eps_high=eps_high,
        iteration=iteration,
        update=update,
        updates_per_iteration=updates_per_iteration,
        microbatch_rows=rows,
        minibatch_logprobs=logprobs.detach(),
        minibatch_entropy=entropy.detach(),
        minibatch_old_logprobs=old_logprobs.detach(),
        minibatch_advantages=advantages,
        minibatch_mask=mask,
    )


def quiet_trainer(tmp_path: Path, max_steps: int, **overrides: Any) -> Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar, summary or validation (``overrides`` change any)."""
    arguments: dict[str, Any] = dict(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    arguments.update(overrides)
    return Trainer(**arguments)


class WeightsAtStart(Callback):
    """The trainable weights when training starts and every iteration's scalar outputs (`scalar_outputs`)."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.outputs: list[dict[str, float]] = []

    def on_train_start(self, trainer, pl_module):
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(scalar_outputs(outputs))


def short_fit(
    tiny_model_dir: Path,
    tmp_path: Path,
    callbacks: list[Callback],
    iterations: int = 2,
    ckpt_path: str | None = None,
    checkpoint: bool = False,
    **grpo_kwargs: Any,
) -> tuple[Trainer, GRPO]:
    """Fit the tiny model for ``iterations`` RL iterations (2 prompts x 4 completions, 6 new tokens).

    ``grpo_kwargs`` override GRPO's arguments (e.g. ``ppo_epochs=2, minibatch_size=4, microbatch_size=2``).
    """
    seed_everything(0)
    kwargs: dict[str, Any] = {
        "policy": Policy(path=str(tiny_model_dir), lora=LoRA(r=4, alpha=8)),
        "rewards": [Reward(fn=f"{__name__}.char_code_reward")],
        "sampling": Sampling(group_size=4, max_new_tokens=6),
        "learning_rate": 1e-2,
        "adapter_dir": str(tmp_path / "adapter"),
        "val_num_samples": 0,
    }
    kwargs.update(grpo_kwargs)
    module = GRPO(**kwargs)
    updates = module.ppo_epochs * (8 // (module.minibatch_size or 8))  # N = 2 prompts x 4 completions
    trainer = quiet_trainer(
        tmp_path, iterations * updates, enable_checkpointing=checkpoint, callbacks=callbacks
    )
    trainer.fit(module, CountdownDataModule(batch_size=2, num_train=32, num_val=4), ckpt_path=ckpt_path)
    return trainer, module


class LogRecorder:
    """Stands in for the LightningModule in direct hook calls: records every ``log`` call."""

    def __init__(self) -> None:
        self.logged: list[tuple[str, float, dict]] = []

    def log(self, name: str, value: Any, **kwargs: Any) -> None:
        self.logged.append((name, float(value), kwargs))

    def values(self, key: str) -> list[float]:
        return [value for name, value, _ in self.logged if name == key]

    def last(self, key: str) -> float:
        return self.values(key)[-1]


class EntropyLog(Callback):
    """The entropy each RL iteration reported to the callbacks."""

    def __init__(self) -> None:
        self.entropies: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.entropies.append(float(outputs["entropy"]))


class StateAtStart(Callback):
    """The watched callback's state when training starts (after a checkpoint was restored)."""

    def __init__(self, watched: Callback) -> None:
        self.watched = watched
        self.state: dict | None = None

    def on_train_start(self, trainer, pl_module):
        self.state = copy.deepcopy(self.watched.state_dict())
