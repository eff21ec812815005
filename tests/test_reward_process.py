"""Rewards with ``process: true``: calls in a child process that a reward cannot take the trainer down with.

The functions in ``process_rewards.py`` run in the child: each misbehaves only on the completion named after
what it does, so a test sees that call fail and the calls around it score normally.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import WeightsAtStart, short_fit

from lit_entropy.errors import ConfigError
from lit_entropy.reward_process import RewardProcess
from lit_entropy.reward_scorer import RewardFailureError, RewardScorer
from lit_entropy.reward_spec import Reward

HERE = "process_rewards"  # stdlib only: a child imports it in milliseconds, not torch's seconds


def _scorer(**reward: Any) -> RewardScorer:
    fn = reward.pop("fn", f"{HERE}.misbehaving_reward")
    return RewardScorer([Reward(fn=fn, process=True, **reward)], on_error=-1.0, max_error_fraction=None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (killed, not yet reaped) counts as gone
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().split()[2] != "Z"


@pytest.mark.parametrize(
    ("completion", "why"),
    [
        ("exit", "the reward's process exited with status 0 during the call"),
        ("sysexit", r"SystemExit\(3\) raised in the reward's process"),
        ("interrupt", r"KeyboardInterrupt\(\) raised in the reward's process"),
        ("segfault", "the reward's process killed by signal 11 during the call"),
        ("raise", "no answer in 'raise' for 7"),
    ],
)
def test_a_call_that_kills_its_process_or_raises_fails_alone_and_the_next_call_scores(
    completion: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    scorer = _scorer()
    try:
        result = scorer(["ab", completion, "abcd"], [{"answer": 7}] * 3)
    finally:
        scorer.close()
    assert result.total.tolist() == [2.0, -1.0, 4.0]  # len("ab"), on_error, len("abcd") from a fresh child
    assert result.num_errors == 1 and result.num_timeouts == 0
    assert result.first_errors["misbehaving_reward"] is not None
    assert re.search(why, str(result.first_errors["misbehaving_reward"])), result.first_errors


def test_a_call_past_its_timeout_is_killed_not_abandoned(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    scorer = _scorer(timeout=1.0, kwargs={"pid_file": str(pid_file)})
    try:
        started = time.monotonic()
        result = scorer(["hang", "abc"], [{"answer": 1}] * 2)
        elapsed = time.monotonic() - started
    finally:
        scorer.close()
    assert result.total.tolist() == [-1.0, 3.0]
    assert result.num_timeouts == 1 and result.num_errors == 1
    assert elapsed < 30  # not the 60 s the call would sleep (the first call also imports this module)
    assert not _alive(int(pid_file.read_text()))  # the hung call's process is gone


def test_the_child_process_is_reused_across_calls_and_a_copy_starts_its_own() -> None:
    scorer = _scorer(fn=f"{HERE}.pid_reward")
    try:
        first = scorer(["a", "b", "c"], [{}] * 3).total.tolist()
        again = scorer(["d"], [{}]).total.tolist()
        copy = pickle.loads(pickle.dumps(scorer))
        assert copy._runners["pid_reward"].process is None
    finally:
        scorer.close()
    assert len(set(first + again)) == 1  # one child served every call
    assert first[0] != float(os.getpid())  # ... and it is not this process
    assert not _alive(int(first[0]))  # close() ended it


def test_a_reward_that_prints_does_not_break_the_protocol(capfd: pytest.CaptureFixture[str]) -> None:
    scorer = _scorer()
    try:
        result = scorer(["print", "xy"], [{}] * 2)
    finally:
        scorer.close()
    assert result.total.tolist() == [5.0, 2.0] and result.num_errors == 0
    assert "a reward that prints to stdout" in capfd.readouterr().err  # the child's stdout goes to stderr


def test_a_function_failing_on_every_completion_in_its_process_still_stops_the_run() -> None:
    scorer = RewardScorer([Reward(fn=f"{HERE}.misbehaving_reward", process=True)])
    try:
        with pytest.raises(RewardFailureError, match="failed on 2 of 2 completions"):
            scorer(["exit", "exit"], [{}] * 2)
    finally:
        scorer.close()


def test_process_must_be_a_bool_and_the_path_is_checked_in_the_training_process() -> None:
    with pytest.raises(ConfigError, match=r"rewards\[0\] .*process must be true or false, got 'yes'"):
        RewardScorer([Reward(fn=f"{HERE}.pid_reward", process="yes")])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        RewardScorer([Reward(fn=f"{HERE}.nope", process=True)])


def test_a_module_that_fails_to_import_in_the_child_fails_the_call_with_its_error(tmp_path: Path) -> None:
    process = RewardProcess("no_such_module_anywhere.fn", "fn")
    try:
        with pytest.raises(
            RuntimeError, match="could not load 'no_such_module_anywhere.fn': ModuleNotFoundError"
        ):
            process.call("x", {}, {}, timeout=None)
    finally:
        process.close()


def test_results_equal_the_in_process_ones_for_a_real_reward() -> None:
    rows = [{"answer": "12"}, {"answer": "12"}, {"answer": "3"}]
    completions = ["The answer is \\boxed{12}.", "12.0", "I think it is 4"]
    isolated = RewardScorer([Reward(fn="lit_entropy.rewards.numeric_match", process=True)])
    inline = RewardScorer([Reward(fn="lit_entropy.rewards.numeric_match")])
    try:
        assert torch.equal(isolated(completions, rows).total, inline(completions, rows).total)
    finally:
        isolated.close()


def test_a_fit_whose_reward_calls_os_exit_in_its_process_trains_on_and_counts_the_failures(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    outputs = WeightsAtStart()
    rewards = [Reward(fn=f"{HERE}.exits_every_third_call", process=True)]
    trainer, module = short_fit(tiny_model_dir, tmp_path, [outputs], iterations=2, rewards=rewards)
    assert trainer.global_step == 2  # the fit ran to the end in this process
    errors = [row["rollout/reward_errors"] for row in outputs.outputs]
    # every third call of a child's life ends it: of 8 calls per iteration 2 or 3 fail (depending on where the
    # previous iteration left the count), and the others score
    assert set(errors) <= {2.0, 3.0}, errors
    assert all(math.isfinite(row["rollout/reward_mean"]) for row in outputs.outputs)
    module.reward_scorer.close()
