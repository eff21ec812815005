"""CompletionLog: every k RL iterations, the iteration's completions in a jsonl file, on the console and to the
loggers, exactly as the iteration produced them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import char_code_reward, quiet_trainer, short_fit
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.loggers import Logger

import lit_entropy.callbacks.completion_log as completion_log
from lit_entropy.callbacks import CompletionLog
from lit_entropy.demo import CountdownDataModule
from lit_entropy.errors import ConfigError
from lit_entropy.model import LoRA, Policy
from lit_entropy.module import GRPO
from lit_entropy.reward_spec import Reward
from lit_entropy.rollout import Sampling


class Outputs(Callback):
    """Every iteration's outputs (their completion fields), in order."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append({key: outputs[key] for key in ("prompts", "completions", "rewards", "advantages")})
        self.seen[-1]["rewards_per_function"] = dict(outputs["rewards_per_function"])
        self.seen[-1]["step"] = trainer.global_step


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_jsonl_holds_every_completion_of_every_kth_iteration_as_produced(
    tiny_model_dir, tmp_path, capsys
):
    seen = Outputs()
    short_fit(
        tiny_model_dir, tmp_path, [CompletionLog(every_n_iterations=2, num_prompts=1), seen], iterations=5
    )
    rows = _rows(tmp_path / "completions.jsonl")  # no logger: the log folder is default_root_dir
    assert sorted({row["iteration"] for row in rows}) == [2, 4]
    for iteration in (2, 4):
        produced = seen.seen[iteration - 1]
        logged = [row for row in rows if row["iteration"] == iteration]
        assert [row["completion"] for row in logged] == produced["completions"]
        assert [row["prompt"] for row in logged] == produced["prompts"]
        assert torch.tensor([row["reward"] for row in logged]).equal(produced["rewards"].float())
        assert torch.tensor([row["advantage"] for row in logged]).equal(produced["advantages"].float())
        for name, values in produced["rewards_per_function"].items():
            assert torch.tensor([row["rewards_per_function"][name] for row in logged]).equal(values.float())
        assert {row["step"] for row in logged} == {produced["step"]}
    out = capsys.readouterr().out
    assert out.count("Completions at RL iteration") == 2
    assert "Completions at RL iteration 2 (step 2): 1 of 2 prompts" in out
    assert "Completions at RL iteration 4 (step 4)" in out
    first = seen.seen[1]
    assert first["completions"][0][:20] in out and "advantage" in out


class RecordingLogger(Logger):
    """A logger with TensorBoard's ``experiment.add_text`` or W&B's ``log_table``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.texts: list[tuple[str, str, int]] = []
        self.tables: list[dict[str, Any]] = []
        if kind == "wandb":
            self.log_table = lambda **kwargs: self.tables.append(kwargs)

    @property
    def experiment(self) -> Any:
        if self.kind != "tensorboard":
            return None
        recorder = self

        class Writer:
            def add_text(self, tag, text, global_step=None):
                recorder.texts.append((tag, text, global_step))

        return Writer()

    name = "recording"
    version = 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        pass


def _fit_with_loggers(tiny_model_dir: Path, tmp_path: Path, loggers: list[Logger], callbacks: list) -> None:
    seed_everything(0)
    module = GRPO(
        policy=Policy(path=str(tiny_model_dir), lora=LoRA(r=4, alpha=8)),
        rewards=[
            Reward(fn=f"{char_code_reward.__module__}.char_code_reward"),
            Reward(fn="lit_entropy.rewards.exact_match"),
        ],
        sampling=Sampling(group_size=2, max_new_tokens=4),
        adapter_dir=str(tmp_path / "adapter"),
        val_num_samples=0,
    )
    trainer = quiet_trainer(tmp_path, 2, logger=loggers, callbacks=callbacks)
    trainer.fit(module, CountdownDataModule(batch_size=2, num_train=8, num_val=4))


def test_tensorboard_gets_a_markdown_table_and_wandb_a_table_at_the_step(tiny_model_dir, tmp_path):
    tensorboard, wandb = RecordingLogger("tensorboard"), RecordingLogger("wandb")
    seen = Outputs()
    log = CompletionLog(every_n_iterations=1, num_prompts=1, console=False, filename=None)
    _fit_with_loggers(tiny_model_dir, tmp_path, [tensorboard, wandb], [log, seen])
    assert [(tag, step) for tag, _, step in tensorboard.texts] == [("completions", 1), ("completions", 2)]
    text = tensorboard.texts[-1][1]
    assert "| prompt | completion | reward | char_code_reward | exact_match | advantage |" in text
    assert len(wandb.tables) == 2 and wandb.tables[-1]["step"] == 2
    table = wandb.tables[-1]
    assert table["columns"] == [
        "prompt",
        "completion",
        "reward",
        "char_code_reward",
        "exact_match",
        "advantage",
    ]
    produced = seen.seen[-1]
    assert [row[2] for row in table["data"]] == produced["rewards"][:2].float().tolist()  # 1 prompt x G = 2
    assert [row[1] for row in table["data"]] == [c[:300] for c in produced["completions"][:2]]
    assert not list(tmp_path.rglob("completions.jsonl"))  # filename=None


def test_chat_prompts_show_as_role_lines_and_long_text_is_cut():
    outputs = {
        "prompts": [[{"role": "user", "content": "Say | hi"}]] * 2,
        "completions": ["hi", "x" * 50],
        "rewards": torch.tensor([1.0, 0.0]),
        "advantages": torch.tensor([0.5, -0.5]),
        "rewards_per_function": {"f": torch.tensor([1.0, 0.0])},
    }
    rows = completion_log.completion_rows(outputs, 3, 6)
    assert rows[0]["prompt"] == [{"role": "user", "content": "Say | hi"}]  # the file keeps the dataset's form
    markdown = completion_log.markdown_table(rows, 2, [], 14)  # "user: Say | hi" is 14 characters
    assert "| user: Say \\| hi | hi | 1.000 | +0.500 |" in markdown
    assert f"|  | {'x' * 14}… | 0.000 | -0.500 |" in markdown


@pytest.mark.parametrize("rich", [True, False], ids=["rich", "plain"])
def test_the_console_table_lists_the_prompt_once_per_group(monkeypatch, rich):
    if not rich:
        monkeypatch.setattr(completion_log, "find_spec", lambda name: None)
    outputs = {
        "prompts": ["p1", "p1", "p2", "p2"],
        "completions": ["a", "b", "c", "d"],
        "rewards": torch.tensor([1.0, 0.0, 0.25, 0.75]),
        "advantages": torch.tensor([0.7, -0.7, -0.7, 0.7]),
        "rewards_per_function": {"f": torch.tensor([1.0, 0.0, 0.25, 0.75])},
    }
    text = completion_log.render_table(completion_log.completion_rows(outputs, 1, 1), 2, [], 300, "title")
    assert text.splitlines()[0] == "title"
    assert text.count("p1") == 1 and text.count("p2") == 1
    assert "0.250" in text and "+0.700" in text and "-0.700" in text


def test_options_below_one_are_refused():
    with pytest.raises(ConfigError, match="every_n_iterations must be >= 1"):
        CompletionLog(every_n_iterations=0)
