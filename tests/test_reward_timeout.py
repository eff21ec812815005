"""Reward timeouts: a hung call is cut at ``Reward.timeout``, scored ``on_error`` and counted; the rest is unchanged.

Hanging rewards wait on an event (at most 10 s) that each test releases when it ends, so no thread outlives it.
"""

from __future__ import annotations

import copy
import math
import pickle
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lit_entropy.errors import ConfigError, LitEntropyError
from lit_entropy.reward_scorer import RewardScorer, RewardTimeoutError
from lit_entropy.reward_spec import Reward

HERE = __name__
_RELEASE = threading.Event()
_CALLS: dict[str, int] = {"fast_then_slow": 0}


def hanging_reward(completion: str, example: dict[str, Any]) -> float:
    """Hangs (up to 10 s) until the test releases it."""
    _RELEASE.wait(10.0)
    return 1.0


def hang_on_x(completion: str, example: dict[str, Any]) -> float:
    """Hangs on completions containing 'x', returns their length otherwise."""
    if "x" in completion:
        _RELEASE.wait(10.0)
    return float(len(completion))


def raising_reward(completion: str, example: dict[str, Any]) -> float:
    if completion == "boom":
        raise RuntimeError("exploded on purpose")
    return 2.0


def raises_timeout_error(completion: str, example: dict[str, Any]) -> float:
    raise TimeoutError("the function's own timeout")


def short_sleep_reward(completion: str, example: dict[str, Any]) -> float:
    time.sleep(0.4)
    return 1.0


def thread_name_reward(completion: str, example: dict[str, Any]) -> float:
    return 1.0 if threading.current_thread() is threading.main_thread() else 0.0


@pytest.fixture(autouse=True)
def _release_hung_threads() -> Iterator[None]:
    _RELEASE.clear()
    yield
    _RELEASE.set()


COMPLETIONS = ["#### 3", "#### 4", "x", "#### 5"]
EXAMPLES = [{"answer": "3"}, {"answer": "3"}, {"answer": "x"}, {"answer": "5"}]


def test_a_hung_call_is_cut_at_the_timeout_scored_on_error_and_counted() -> None:
    scorer = RewardScorer(
        [Reward(f"{HERE}.hanging_reward", timeout=0.2), Reward("lit_entropy.rewards.numeric_match")],
        on_error=-1.0,
        max_error_fraction=None,  # every call hangs: counted, not an error
    )
    started = time.perf_counter()
    result = scorer(COMPLETIONS[:3], EXAMPLES[:3])
    elapsed = time.perf_counter() - started
    assert elapsed < 3.0  # 3 calls x 0.2 s, not 3 x 10 s
    assert torch.equal(result.per_function["hanging_reward"], torch.full((3,), -1.0))
    assert torch.equal(result.per_function["numeric_match"], torch.tensor([1.0, 0.0, 0.0]))  # unaffected
    assert result.num_timeouts == 3 and result.timeouts_per_function == {
        "hanging_reward": 3,
        "numeric_match": 0,
    }
    assert result.num_errors == 3  # timeouts are errors too
    assert isinstance(result.first_errors["hanging_reward"], TimeoutError)
    assert "numeric_match" not in result.first_errors


def test_only_the_hung_completion_is_cut() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.hang_on_x", timeout=0.2)], on_error=0.5)
    result = scorer(["ab", "x", "abcd"], [{}] * 3)
    assert torch.equal(result.per_function["hang_on_x"], torch.tensor([2.0, 0.5, 4.0]))
    assert result.num_timeouts == 1 and result.num_errors == 1


def test_a_fast_reward_with_a_timeout_scores_exactly_as_without() -> None:
    rewards = ["lit_entropy.rewards.numeric_match", "lit_entropy.rewards.answer_format"]
    plain = RewardScorer([Reward(fn, weight=0.5) for fn in rewards])
    timed = RewardScorer([Reward(fn, weight=0.5, timeout=5.0) for fn in rewards])
    completions = [f"so #### {i % 4}" if i % 3 else "no answer" for i in range(64)]
    examples = [{"answer": str(i % 5)} for i in range(64)]
    expected, got = plain(completions, examples), timed(completions, examples)
    assert torch.equal(expected.total, got.total)
    for name in expected.per_function:
        assert torch.equal(expected.per_function[name], got.per_function[name])
    assert got.num_errors == got.num_timeouts == 0


def test_a_raising_reward_with_a_timeout_is_still_isolated_and_not_a_timeout() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.raising_reward", timeout=2.0)], on_error=-1.0)
    result = scorer(["a", "boom", "c"], [{}] * 3)
    assert torch.equal(result.per_function["raising_reward"], torch.tensor([2.0, -1.0, 2.0]))
    assert result.num_errors == 1 and result.num_timeouts == 0
    assert "exploded on purpose" in str(result.first_errors["raising_reward"])


def test_a_function_raising_timeouterror_itself_is_an_error_not_a_timeout() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.raises_timeout_error", timeout=2.0)], max_error_fraction=None)
    result = scorer(["a", "b"], [{}] * 2)
    assert result.num_errors == 2 and result.num_timeouts == 0


def test_without_timeout_the_function_runs_in_the_calling_thread() -> None:
    direct = RewardScorer([Reward(f"{HERE}.thread_name_reward")])
    assert direct(["a"], [{}]).per_function["thread_name_reward"].item() == 1.0
    timed = RewardScorer([Reward(f"{HERE}.thread_name_reward", timeout=2.0)])
    assert timed(["a"], [{}]).per_function["thread_name_reward"].item() == 0.0
    worker = timed._runners["thread_name_reward"].worker.thread
    assert worker.daemon and worker.name.startswith("lit_entropy-reward-")
    timed.close()
    worker.join(timeout=2.0)
    assert not worker.is_alive()  # an idle worker exits when the scorer is closed


def test_too_many_stuck_calls_raise_a_clear_error() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.hanging_reward", timeout=0.1)], max_abandoned=2)
    with pytest.raises(RewardTimeoutError) as info:
        scorer(["a", "b", "c"], [{}] * 3)
    message = str(info.value)
    assert "'hanging_reward'" in message and "hung past its timeout=0.1s 2 times" in message
    assert "max_abandoned=2" in message
    assert isinstance(info.value, LitEntropyError)  # the CLI prints it as one line and exits 2


def test_calls_that_finish_late_free_their_slot() -> None:
    scorer = RewardScorer(
        [Reward(f"{HERE}.short_sleep_reward", timeout=0.05)], max_abandoned=1, max_error_fraction=None
    )
    assert scorer(["a"], [{}]).num_timeouts == 1
    time.sleep(0.8)  # the abandoned call returns after 0.4 s and its thread exits
    assert scorer(["b"], [{}]).num_timeouts == 1  # no RewardTimeoutError: nothing is still stuck


def test_scorer_with_workers_can_be_pickled_and_copied() -> None:
    scorer = RewardScorer([Reward("lit_entropy.rewards.exact_match", timeout=2.0)])
    scorer(["a"], [{"answer": "a"}])
    for clone in (pickle.loads(pickle.dumps(scorer)), copy.deepcopy(scorer)):
        assert clone(["a", "b"], [{"answer": "a"}] * 2).per_function["exact_match"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("timeout", [0, -1.0, math.nan, math.inf], ids=["zero", "negative", "nan", "inf"])
def test_invalid_timeouts_are_config_errors_naming_the_reward(timeout: float) -> None:
    with pytest.raises(
        ConfigError, match=r"rewards\[0\] \('lit_entropy.rewards.exact_match'\): timeout must be"
    ):
        RewardScorer([Reward("lit_entropy.rewards.exact_match", timeout=timeout)])
