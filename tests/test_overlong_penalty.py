"""DAPO's soft overlong punishment as a batched reward: values by hand, and through the scorer like TRL's form."""

from __future__ import annotations

import pytest
import torch

from lit_entropy.reward_scorer import RewardScorer
from lit_entropy.reward_spec import Reward
from lit_entropy.rewards import soft_overlong_penalty


def test_the_penalty_by_hand_at_every_region() -> None:
    # L_max = 10, L_cache = 4: free up to 6 tokens, then -1/4 per token, -1 beyond 10
    lengths = [0, 6, 7, 8, 10, 11, 30]
    ids = [[1] * n for n in lengths]
    values = soft_overlong_penalty([""] * 7, [""] * 7, ids, max_completion_length=10, soft_punish_cache=4)
    assert values == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]


def test_a_cache_outside_one_to_the_maximum_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"soft_punish_cache must be in \[1, max_completion_length=10\], got 0"
    ):
        soft_overlong_penalty([], [], [], max_completion_length=10, soft_punish_cache=0)


def test_the_scorer_treats_it_as_a_batched_function_and_adds_it_to_the_task_reward() -> None:
    scorer = RewardScorer(
        [
            Reward("lit_entropy.rewards.exact_match"),
            Reward(
                "lit_entropy.rewards.soft_overlong_penalty",
                kwargs={"max_completion_length": 4, "soft_punish_cache": 2},
            ),
        ]
    )
    assert scorer.forms == ["per_completion", "batched"]
    result = scorer(
        ["7", "7", "8"],
        [{"prompt": "p", "answer": "7"}] * 3,
        completion_ids=[[5, 2], [5, 5, 5, 2], [5]],
    )
    # exact match 1, 1, 0; penalty 0 (2 tokens), -1 (4 = L_max), 0 (1 token)
    torch.testing.assert_close(result.total, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(result.per_function["soft_overlong_penalty"], torch.tensor([0.0, -1.0, 0.0]))
