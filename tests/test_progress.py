"""RLProgressBar: the training bar counts RL iterations against the fit's RL iterations, labelled as such."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from harness import char_code_reward, quiet_trainer
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import TQDMProgressBar

from lit_entropy.cli import LitEntropyCLI
from lit_entropy.demo import CountdownDataModule
from lit_entropy.model import LoRA, Policy
from lit_entropy.module import GRPO
from lit_entropy.progress import RLProgressBar
from lit_entropy.reward_spec import Reward
from lit_entropy.rollout import Sampling


class BarAtEachIteration(Callback):
    """(n, total) of the training bar after each RL iteration (runs after the bar's own hook)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int | None]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((bar.n, bar.total))


def _fit(tiny_model_dir: Path, tmp_path: Path, max_steps: int, callbacks: list, **trainer: Any):
    """The tiny model on 2 prompts x 4 completions, 2 updates per RL iteration (mini-batches of 4)."""
    seed_everything(0)
    module = GRPO(
        policy=Policy(path=str(tiny_model_dir), lora=LoRA(r=4, alpha=8)),
        rewards=[Reward(fn=f"{char_code_reward.__module__}.char_code_reward")],
        sampling=Sampling(group_size=4, max_new_tokens=4),
        minibatch_size=4,
        adapter_dir=str(tmp_path / "adapter"),
        val_num_samples=0,
    )
    ckpt_path = trainer.pop("ckpt_path", None)
    fit = quiet_trainer(tmp_path, max_steps, enable_progress_bar=True, callbacks=callbacks, **trainer)
    fit.fit(module, CountdownDataModule(batch_size=2, num_train=6, num_val=4), ckpt_path=ckpt_path)
    return fit


def test_the_bar_counts_rl_iterations_over_epochs_against_max_steps_in_iterations(
    tiny_model_dir, tmp_path, capsys
):
    watch = BarAtEachIteration()
    bar = RLProgressBar()
    # 3 prompts' batches per epoch, 2 updates per iteration: max_steps 10 is 5 iterations over 2 epochs
    trainer = _fit(tiny_model_dir, tmp_path, 10, [bar, watch])
    assert trainer.current_epoch >= 1
    assert watch.seen == [(i, 5) for i in range(1, 6)]
    assert bar.train_progress_bar.n == 5 and bar.train_progress_bar.total == 5
    out = capsys.readouterr().out
    assert "RL iteration: 100%" in out and "5/5" in out
    assert "Epoch" not in out
    assert "train/reward=" in out and "train/entropy=" in out


def test_a_resumed_fit_continues_the_count(tiny_model_dir, tmp_path, capsys):
    _fit(tiny_model_dir, tmp_path / "first", 4, [RLProgressBar()], enable_checkpointing=True)
    (checkpoint,) = (tmp_path / "first").rglob("*.ckpt")
    capsys.readouterr()
    watch = BarAtEachIteration()
    _fit(tiny_model_dir, tmp_path / "second", 8, [RLProgressBar(), watch], ckpt_path=str(checkpoint))
    assert watch.seen == [(3, 4), (4, 4)]
    assert "4/4" in capsys.readouterr().out


def test_max_epochs_bounds_the_total_when_it_comes_first(tiny_model_dir, tmp_path):
    bar = RLProgressBar()
    _fit(tiny_model_dir, tmp_path, 100, [bar], max_epochs=1)
    assert bar.train_progress_bar.total == 3  # 6 prompts in batches of 2


def _cli_config(tmp_path: Path, tiny_model_dir: Path, **trainer: Any) -> list[str]:
    return [  # run=False: no subcommand
        "--model=lit_entropy.GRPO",
        f"--model.init_args.policy.path={tiny_model_dir}",
        "--model.init_args.rewards=[{fn: lit_entropy.rewards.exact_match}]",
        "--model.init_args.sampling.group_size=2",
        "--model.init_args.sampling.max_new_tokens=2",
        "--data=lit_entropy.demo.CountdownDataModule",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_train=8",
        "--data.init_args.num_val=2",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=2",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
        *(f"--trainer.{key}={value}" for key, value in trainer.items()),
    ]


@pytest.mark.parametrize(
    ("trainer", "expected"),
    [
        ({}, RLProgressBar),
        ({"enable_progress_bar": "false"}, type(None)),
        ({"callbacks": "lightning.pytorch.callbacks.TQDMProgressBar"}, TQDMProgressBar),
    ],
    ids=["default", "disabled", "the user's bar"],
)
def test_the_cli_uses_the_rl_bar_unless_told_otherwise(tiny_model_dir, tmp_path, trainer, expected):
    cli = LitEntropyCLI(args=_cli_config(tmp_path, tiny_model_dir, **trainer), run=False)
    assert type(cli.trainer.progress_bar_callback) is expected
