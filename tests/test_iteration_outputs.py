"""The samples `GRPO.training_step` hands to callbacks: prompts, completions, rewards and advantages."""

from __future__ import annotations

from pathlib import Path

import torch
from harness import char_code_reward, short_fit
from lightning.pytorch import Callback


class KeepOutputs(Callback):
    def __init__(self) -> None:
        self.outputs: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append({**outputs, "batch": batch})


def test_outputs_carry_each_completion_with_its_prompt_reward_and_advantage(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    keep = KeepOutputs()
    short_fit(tiny_model_dir, tmp_path, [keep], iterations=2)
    for outputs in keep.outputs:
        n = len(outputs["completions"])
        assert n == 8 and len(outputs["prompts"]) == 8  # 2 prompts x 4 completions
        # each prompt of the batch, once per completion, as the dataset holds it
        assert outputs["prompts"] == [row["prompt"] for row in outputs["batch"] for _ in range(4)]
        # rewards recomputed from the texts with the same function (an independent call)
        expected = torch.tensor([char_code_reward(c, {}) for c in outputs["completions"]])
        torch.testing.assert_close(outputs["rewards"].cpu(), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(outputs["rewards_per_function"]["char_code_reward"].cpu(), expected)
        # GRPO's advantage by hand: (r - group mean) / (group std + 1e-6), unbiased std
        groups = expected.view(2, 4)
        std = groups.std(dim=1, keepdim=True)
        by_hand = ((groups - groups.mean(dim=1, keepdim=True)) / (std + 1e-6)).view(-1)
        torch.testing.assert_close(outputs["advantages"].cpu(), by_hand, rtol=1e-4, atol=1e-5)
        assert outputs["advantages"].shape == (n,)
