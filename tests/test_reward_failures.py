"""Reward functions that fail systematically stop the run; ``sys.exit`` in a reward is a counted failure.

A function failing on every completion of one scoring call (a wrong signature, say) raises
`RewardFailureError` naming it, the count and the first exception; ``max_error_fraction`` lowers the share
that stops the run. Failures below it are scored ``on_error`` and counted, as before.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import short_fit
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_entropy.errors import ConfigError, LitEntropyError
from lit_entropy.reward_scorer import RewardFailureError, RewardScorer
from lit_entropy.reward_spec import Reward

HERE = __name__
_RELEASE = threading.Event()


def wrong_signature(completion: str) -> float:
    """Takes one argument: every call with ``(completion, example)`` raises TypeError."""
    return 1.0


def fails_unless_a(completion: str, example: dict[str, Any]) -> float:
    if completion != "a":
        raise ValueError(f"cannot score {completion!r}")
    return 1.0


def exits(completion: str, example: dict[str, Any]) -> float:
    if completion.startswith("exit"):
        sys.exit(3)
    return 2.0


def interrupts(completion: str, example: dict[str, Any]) -> float:
    raise KeyboardInterrupt


def raises_sigterm(completion: str, example: dict[str, Any]) -> float:
    raise SIGTERMException


def hangs(completion: str, example: dict[str, Any]) -> float:
    _RELEASE.wait(10.0)
    return 1.0


@pytest.fixture(autouse=True)
def _release_hung_threads() -> Iterator[None]:
    _RELEASE.clear()
    yield
    _RELEASE.set()


def _rows(n: int) -> list[dict[str, Any]]:
    return [{"answer": "a"}] * n


# ----------------------------------------------------------------------- every completion failing stops


def test_a_reward_failing_on_every_completion_raises_naming_it_the_count_and_the_first_error() -> None:
    scorer = RewardScorer([Reward("lit_entropy.rewards.exact_match"), Reward(f"{HERE}.wrong_signature")])
    with pytest.raises(RewardFailureError) as info:
        scorer(["a"] * 128, _rows(128))
    message = str(info.value)
    assert isinstance(info.value, LitEntropyError)  # the CLI prints it as one line and exits 2
    assert f"reward 'wrong_signature' ({HERE}.wrong_signature)" in message
    assert "failed on 128 of 128 completions" in message and "every completion" in message
    assert "first error: TypeError: wrong_signature() takes 1 positional argument but 2 were given" in message
    assert "exact_match" not in message  # the working function is not blamed
    assert "\n" not in message


def test_most_but_not_all_failing_is_counted_by_default(caplog: pytest.LogCaptureFixture) -> None:
    scorer = RewardScorer([Reward(f"{HERE}.fails_unless_a")], on_error=-1.0)
    result = scorer(["a"] + ["b"] * 127, _rows(128))
    assert result.num_errors == 127
    assert result.per_function["fails_unless_a"][0].item() == 1.0
    assert (result.per_function["fails_unless_a"][1:] == -1.0).all()
    assert any("failed on 127 of 128" in record.getMessage() for record in caplog.records)


def test_max_error_fraction_stops_at_the_first_completion_past_the_share() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.fails_unless_a")], max_error_fraction=0.5)
    # 64 of 128 failing is not more than half: counted.
    assert scorer(["a", "b"] * 64, _rows(128)).num_errors == 64
    with pytest.raises(RewardFailureError) as info:
        scorer(["b"] * 100 + ["a"] * 28, _rows(128))
    message = str(info.value)
    assert "failed on 65 of 128 completions (scoring stopped after 65)" in message
    assert "more than max_error_fraction=0.5" in message
    assert "ValueError: cannot score 'b'" in message


def test_max_error_fraction_zero_stops_on_any_failure() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.fails_unless_a")], max_error_fraction=0.0)
    assert scorer(["a"] * 4, _rows(4)).num_errors == 0
    with pytest.raises(RewardFailureError, match="failed on 1 of 4 completions"):
        scorer(["a", "b", "a", "a"], _rows(4))


def test_max_error_fraction_none_and_check_failures_false_only_count() -> None:
    completions = ["b"] * 8
    assert (
        RewardScorer([Reward(f"{HERE}.fails_unless_a")], max_error_fraction=None)(
            completions, _rows(8)
        ).num_errors
        == 8
    )
    scorer = RewardScorer([Reward(f"{HERE}.wrong_signature")])
    result = scorer(["a"], _rows(1), check_failures=False)  # a probe that reads first_errors itself
    assert result.num_errors == 1 and isinstance(result.first_errors["wrong_signature"], TypeError)


def test_all_calls_timing_out_is_a_failure_of_every_completion() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.hangs", timeout=0.05)])
    with pytest.raises(
        RewardFailureError, match=r"failed on 2 of 2 completions .*TimeoutError: call did not"
    ):
        scorer(["a", "b"], _rows(2))


@pytest.mark.parametrize(
    "value", [-0.1, 1.5, math.nan, "0.5", True], ids=["neg", "above", "nan", "str", "bool"]
)
def test_max_error_fraction_outside_zero_one_is_a_config_error(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"max_error_fraction must be a number in \[0, 1\]"):
        RewardScorer([Reward("lit_entropy.rewards.exact_match")], max_error_fraction=value)


def test_a_fit_with_a_wrong_signature_reward_stops_with_the_error(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(
        RewardFailureError, match=r"reward 'wrong_signature' .* failed on (\d+) of \1 completions"
    ):
        short_fit(tiny_model_dir, tmp_path, [], iterations=1, rewards=[Reward(f"{HERE}.wrong_signature")])


# ------------------------------------------------------------------------- what a reward may raise


@pytest.mark.parametrize("timeout", [None, 2.0], ids=["direct", "worker-thread"])
def test_sys_exit_in_a_reward_is_a_counted_failure_of_that_completion(timeout: float | None) -> None:
    scorer = RewardScorer([Reward(f"{HERE}.exits", timeout=timeout)], on_error=-1.0)
    result = scorer(["ok", "exit now", "ok"], _rows(3))
    assert torch.equal(result.per_function["exits"], torch.tensor([2.0, -1.0, 2.0]))
    assert result.num_errors == 1 and isinstance(result.first_errors["exits"], SystemExit)
    with pytest.raises(
        RewardFailureError, match="failed on 2 of 2 completions .* first error: SystemExit: 3"
    ):
        scorer(["exit", "exit"], _rows(2))


@pytest.mark.parametrize("timeout", [None, 2.0], ids=["direct", "worker-thread"])
def test_keyboard_interrupt_from_a_reward_stops_the_run(timeout: float | None) -> None:
    scorer = RewardScorer([Reward(f"{HERE}.interrupts", timeout=timeout)])
    with pytest.raises(KeyboardInterrupt):
        scorer(["a"], _rows(1))


def test_lightning_sigterm_exception_is_not_swallowed() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.raises_sigterm")])
    with pytest.raises(SIGTERMException):
        scorer(["a"], _rows(1))
