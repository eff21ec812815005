"""The two reward forms: per completion, and TRL's batched ``fn(prompts, completions, completion_ids, **columns)``.

Covers how ``form: auto`` tells them apart, what a batched function receives, ``None`` ("does not apply"),
failures of a whole batch, timeouts and ``process: true`` for the batched form, ``async def`` rewards of both
forms (concurrent, cancelled at their timeout), and a short fit of the tiny model with a TRL-form reward.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import math
import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import WeightsAtStart, short_fit

from lit_entropy.errors import ConfigError
from lit_entropy.model import LoRA, Policy, load_policy
from lit_entropy.reward_forms import (
    batched_arguments,
    completion_token_ids,
    detect_form,
    signature_mismatch,
)
from lit_entropy.reward_scorer import RewardFailureError, RewardScorer
from lit_entropy.reward_spec import Reward
from lit_entropy.rollout import Sampling, generate_rollout

HERE = __name__
CALLS: list[dict[str, Any]] = []
LOOPS: list[int] = []
_RELEASE = threading.Event()


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    CALLS.clear()
    LOOPS.clear()
    _RELEASE.clear()
    yield
    _RELEASE.set()


# ---------------------------------------------------------------------------------------- reward functions


def per_completion(completion: str, example: dict[str, Any]) -> float:
    return float(len(completion))


def trl_completions_only(completions, **kwargs):
    return [float(len(c)) for c in completions]


def trl_full(prompts, completions, completion_ids, **kwargs):
    return [0.0] * len(completions)


def trl_prompts_kwargs(prompts, **kwargs):
    return [0.0] * len(prompts)


def named_like_trl(completions, example):
    """Per completion despite its first parameter's name (``form: per_completion``)."""
    return float(len(completions))


def forgot_return(completion: str, example: dict[str, Any]) -> float:
    len(completion)  # no return: None


def wrapper(*args, **kwargs):
    return 0.0


def ambiguous(prompts, completion):
    return 0.0


def scaled(completions, scale=1.0, **kwargs):
    return [scale * len(c) for c in completions]


class CallableBatched:
    def __call__(self, completions, **kwargs):
        return [1.0] * len(completions)


def recording(prompts, completions, completion_ids, **kwargs):
    """Records what it received; scores ``len(text) * bonus``, ``None`` where the row's ``skip`` is true."""
    CALLS.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs})
    bonus = kwargs.get("bonus", 1.0)
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [
        None if skip else bonus * len(text) for text, skip in zip(texts, kwargs.get("skip", [False] * 99))
    ]


def first_half(completions, **kwargs):
    """1.0, None, None, 0.5 for four completions."""
    return [1.0, None, None, 0.5]


def second_half(completions, **kwargs):
    """None, 2.0, None, 1.0 for four completions."""
    return [None, 2.0, None, 1.0]


def raises_batched(completions, **kwargs):
    raise RuntimeError("the judge is down")


def three_values(completions, **kwargs):
    return [1.0, 1.0, 1.0]


def returns_float(completions, **kwargs):
    return 1.0


def bad_elements(completions, **kwargs):
    return [1.0, "x", math.nan, 2.0]


def tensor_values(completions, **kwargs):
    return torch.tensor([0.25, 0.75])


def hangs_batched(completions, **kwargs):
    _RELEASE.wait(10.0)
    return [1.0] * len(completions)


def needs_solution(completions, solution, **kwargs):
    return [float(c == s) for c, s in zip(completions, solution)]


async def async_each(completion: str, example: dict[str, Any]) -> float:
    LOOPS.append(id(asyncio.get_running_loop()))
    await asyncio.sleep(0.3)
    if completion == "bad":
        raise ValueError("cannot score 'bad'")
    if completion == "hang":
        await asyncio.sleep(10)
    return float(len(completion))


async def async_batched(prompts, completions, **kwargs):
    await asyncio.sleep(0.05)
    if "hang" in completions:
        await asyncio.sleep(10)
    return [float(len(c)) * 2 for c in completions]


async def async_interrupts(completion: str, example: dict[str, Any]) -> float:
    raise KeyboardInterrupt


async def async_blocks(completion: str, example: dict[str, Any]) -> float:
    if completion == "block":
        _RELEASE.wait(5.0)  # blocks the event loop: no await, so it cannot be cancelled
    return 1.0


def trl_fit_reward(prompts, completions, completion_ids, answer, numbers, **kwargs):
    """A TRL-style reward for the fit: records the call, scores the share of digits (varies, so advantages do)."""
    CALLS.append(
        {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, "answer": answer}
    )
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


# -------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("function", "form"),
    [
        (per_completion, "per_completion"),
        (trl_completions_only, "batched"),
        (trl_full, "batched"),
        (trl_prompts_kwargs, "batched"),  # `completions` arrives in **kwargs
        (wrapper, "per_completion"),  # (*args, **kwargs): the historical form
        (CallableBatched(), "batched"),
        (functools.partial(scaled, scale=2.0), "batched"),
        (len, "per_completion"),  # a builtin: no readable signature
    ],
    ids=["per-completion", "completions", "prompts-completions-ids", "prompts-kwargs", "args-kwargs",
         "callable-instance", "partial", "builtin"],
)  # fmt: skip
def test_auto_tells_the_form_from_the_first_parameter(function: Any, form: str) -> None:
    assert detect_form(function, "auto", "rewards[0]") == form


def test_an_explicit_form_wins_and_an_ambiguous_or_unknown_one_is_a_config_error() -> None:
    assert detect_form(per_completion, "batched", "r") == "batched"
    assert detect_form(trl_completions_only, "per_completion", "r") == "per_completion"
    with pytest.raises(ConfigError) as info:
        RewardScorer([Reward(f"{HERE}.ambiguous")])
    message = str(info.value)
    assert "rewards[0] ('test_reward_forms.ambiguous')" in message and "(prompts, completion)" in message
    assert "fn(completion: str, example: dict, **kwargs) -> float" in message
    assert "fn(prompts, completions, completion_ids, **columns) -> list[float | None]" in message
    assert "form: batched or form: per_completion" in message
    with pytest.raises(
        ConfigError, match="form must be one of 'auto', 'batched', 'per_completion', got 'trl'"
    ):
        RewardScorer([Reward(f"{HERE}.per_completion", form="trl")])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"kwargs \['completions'\] are arguments of the batched form"):
        RewardScorer([Reward(f"{HERE}.trl_full", kwargs={"completions": 1})])


def test_a_forced_per_completion_form_calls_once_per_completion() -> None:
    assert RewardScorer([Reward(f"{HERE}.named_like_trl")]).forms == ["batched"]
    scorer = RewardScorer([Reward(f"{HERE}.named_like_trl", form="per_completion")])
    assert scorer(["ab", "abcd"], [{}, {}]).total.tolist() == [2.0, 4.0]


# --------------------------------------------------------------------------------- what a batched call gets


def test_a_batched_function_gets_prompts_messages_ids_columns_and_kwargs() -> None:
    chat = [{"role": "user", "content": "What is 2 + 3?"}]
    rows = [
        {"prompt": chat, "answer": 5, "level": 1},
        {"prompt": chat, "answer": 5, "level": 1},
        {"prompt": "Say hi", "answer": "hi", "source": "greet"},
    ]
    scorer = RewardScorer([Reward(f"{HERE}.recording", weight=0.5, kwargs={"bonus": 3.0})])
    result = scorer(["5", "five", "hi"], rows, completion_ids=[[7, 1], [8, 9, 1], [4]])
    (call,) = CALLS
    assert call["prompts"] == [chat, chat, "Say hi"]  # the dataset's prompts, as TRL passes them
    assert call["completions"] == [
        [{"role": "assistant", "content": "5"}],
        [{"role": "assistant", "content": "five"}],
        "hi",  # a text prompt: a text completion
    ]
    assert call["completion_ids"] == [[7, 1], [8, 9, 1], [4]]
    assert (
        call["answer"] == [5, 5, "hi"]
        and call["level"] == [1, 1, None]
        and call["source"] == [None, None, "greet"]
    )
    assert call["bonus"] == 3.0 and "prompt" not in call
    # len * bonus: 1*3, 4*3, 2*3; weighted by 0.5
    assert result.per_function["recording"].tolist() == [3.0, 12.0, 6.0]
    assert result.total.tolist() == [1.5, 6.0, 3.0]
    assert result.num_errors == 0 and result.num_skipped == 0


def test_explicit_prompts_are_passed_and_missing_ids_are_none() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.recording")])
    scorer(["a", "b"], [{"prompt": "p"}, {"prompt": "p"}], prompts=["<rendered> p", "<rendered> p"])
    assert CALLS[0]["prompts"] == ["<rendered> p", "<rendered> p"] and CALLS[0]["completion_ids"] is None
    with pytest.raises(ValueError, match="got 2 completions but 1 completion_ids"):
        scorer(["a", "b"], [{}, {}], completion_ids=[[1]])


def test_completion_token_ids_drop_the_padding_after_eos() -> None:
    ids = torch.tensor([[5, 6, 1, 0], [7, 1, 0, 0], [3, 3, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert completion_token_ids(ids, mask) == [[5, 6, 1], [7, 1], [3, 3, 3, 3]]


def test_batched_arguments_refuse_names_that_collide() -> None:
    with pytest.raises(ValueError, match="dataset column 'completions' has the name of an argument"):
        batched_arguments(["a"], [{"completions": 1}], None, None, {})
    with pytest.raises(ValueError, match="kwargs key 'answer' is also a dataset column"):
        batched_arguments(["a"], [{"answer": 1}], None, None, {"answer": 2})


# ------------------------------------------------------------------------------------------ None = skipped


def test_none_adds_nothing_is_counted_and_a_completion_no_function_scores_totals_zero(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scorer = RewardScorer([Reward(f"{HERE}.first_half"), Reward(f"{HERE}.second_half", weight=0.5)])
    with caplog.at_level(logging.WARNING, logger="lit_entropy.reward_scorer"):
        result = scorer(["a", "b", "c", "d"], [{}] * 4)
    # completion 0: 1.0 + skip; 1: skip + 0.5 * 2.0; 2: both skip -> 0.0; 3: 0.5 + 0.5 * 1.0
    assert result.total.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert result.per_function["first_half"].tolist() == [1.0, 0.0, 0.0, 0.5]
    assert result.skipped_per_function == {"first_half": 2, "second_half": 2}
    assert result.num_skipped == 4 and result.num_unscored == 1 and result.num_errors == 0
    assert result.first_errors == {}
    assert any(
        "every reward function returned None for 1 of 4 completions (first: completion 2)" in r.getMessage()
        for r in caplog.records
    )


def test_a_per_completion_function_returning_none_is_still_a_failure() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.forgot_return")], on_error=-1.0, max_error_fraction=None)
    result = scorer(["a"], [{}])
    assert result.total.tolist() == [-1.0] and result.num_errors == 1 and result.num_skipped == 0


# ------------------------------------------------------------------------------------- batched failures


def test_a_raising_batched_function_fails_every_completion() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.raises_batched"), Reward(f"{HERE}.trl_completions_only")])
    with pytest.raises(RewardFailureError) as info:
        scorer(["a", "bb", "ccc"], [{}] * 3)
    message = str(info.value)
    assert (
        "reward 'raises_batched' (test_reward_forms.raises_batched) failed on 3 of 3 completions" in message
    )
    assert "first error: RuntimeError: the judge is down" in message
    assert (
        "fn(prompts, completions, completion_ids, **columns) -> list[float | None] (the batched form)"
        in message
    )
    result = scorer(["a", "bb", "ccc"], [{}] * 3, check_failures=False)  # a probe only counts
    assert result.errors_per_function == {"raises_batched": 3, "trl_completions_only": 0}
    assert result.total.tolist() == [1.0, 2.0, 3.0]  # on_error 0.0 + the lengths
    assert str(result.first_errors["raises_batched"]) == "the judge is down"


@pytest.mark.parametrize(
    ("name", "error"),
    [("three_values", "ValueError: returned 3 values for 4 completions"),
     ("returns_float", "TypeError: returned float, expected a list of 4 numbers or None")],
)  # fmt: skip
def test_a_result_that_is_not_one_value_per_completion_fails_the_batch(name: str, error: str) -> None:
    with pytest.raises(RewardFailureError, match=f"failed on 4 of 4 completions .*{error}"):
        RewardScorer([Reward(f"{HERE}.{name}")])(["a", "b", "c", "d"], [{}] * 4)


def test_bad_elements_fail_alone_and_max_error_fraction_applies() -> None:
    counted = RewardScorer([Reward(f"{HERE}.bad_elements")], on_error=-1.0, max_error_fraction=None)
    result = counted(["a", "b", "c", "d"], [{}] * 4)
    assert result.total.tolist() == [1.0, -1.0, -1.0, 2.0] and result.num_errors == 2
    assert isinstance(result.first_errors["bad_elements"], TypeError)
    with pytest.raises(
        RewardFailureError,
        match=r"failed on 2 of 4 completions of one scoring call \(more than max_error_fraction=0.25",
    ):
        RewardScorer([Reward(f"{HERE}.bad_elements")], max_error_fraction=0.25)(
            ["a", "b", "c", "d"], [{}] * 4
        )
    tensors = RewardScorer([Reward(f"{HERE}.tensor_values")])(["a", "b"], [{}] * 2)
    assert tensors.total.tolist() == [0.25, 0.75]  # a 1-D tensor is a list of values


def test_a_type_error_names_both_signatures() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.needs_solution")])
    with pytest.raises(RewardFailureError) as info:
        scorer(["a"], [{"answer": "a"}])
    message = str(info.value)
    assert "TypeError: needs_solution() missing 1 required positional argument: 'solution'" in message
    assert "its signature is (completions, solution, **kwargs)" in message
    assert "the other accepted form is fn(completion: str, example: dict, **kwargs) -> float" in message
    assert signature_mismatch(needs_solution, "batched", {}, ["answer"]) is not None
    assert signature_mismatch(needs_solution, "batched", {}, ["solution"]) is None


# ----------------------------------------------------------------------------- timeouts, process: true


def test_a_batched_timeout_is_for_the_whole_call() -> None:
    scorer = RewardScorer(
        [Reward(f"{HERE}.hangs_batched", timeout=0.2)], on_error=-1.0, max_error_fraction=None
    )
    started = time.monotonic()
    result = scorer(["a", "b", "c"], [{}] * 3)
    assert time.monotonic() - started < 2.0
    assert result.total.tolist() == [-1.0, -1.0, -1.0]
    assert result.num_timeouts == 3 and result.num_errors == 3
    assert isinstance(result.first_errors["hangs_batched"], TimeoutError)


def test_a_batched_function_in_a_process_scores_as_in_process_and_a_crash_fails_the_batch_only() -> None:
    rows = [{"prompt": "p", "answer": 1}, {"prompt": [{"role": "user", "content": "q"}], "answer": None}]
    isolated = RewardScorer(
        [Reward("process_rewards.batched_lengths", process=True)], max_error_fraction=None
    )
    inline = RewardScorer([Reward("process_rewards.batched_lengths")])
    try:
        first = isolated(["abc", "de"], rows)
        assert first.total.tolist() == inline(["abc", "de"], rows).total.tolist() == [3.0, 0.0]
        assert first.num_skipped == 1  # None came back through the pipe
        crashed = isolated(["exit", "de"], rows)
        assert crashed.num_errors == 2 and "exited with status 0" in str(
            crashed.first_errors["batched_lengths"]
        )
        assert isolated(["abcd", "de"], rows).total.tolist() == [4.0, 0.0]  # a fresh child
    finally:
        isolated.close()


def test_an_async_function_with_process_true_runs_in_the_child() -> None:
    scorer = RewardScorer([Reward("process_rewards.async_lengths", process=True)])
    try:
        assert scorer(["ab", "abc"], [{}] * 2).total.tolist() == [2.0, 3.0]
    finally:
        scorer.close()


# --------------------------------------------------------------------------------------------- async def


def test_async_per_completion_calls_run_concurrently_on_one_loop_across_calls() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.async_each")])
    started = time.monotonic()
    result = scorer(["a" * n for n in range(1, 9)], [{}] * 8)
    elapsed = time.monotonic() - started
    assert result.total.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert elapsed < 1.5  # 8 calls of 0.3 s each: 2.4 s one after another
    scorer(["a"], [{}])
    assert len(set(LOOPS)) == 1  # the same event loop served both scoring calls
    scorer.close()


def test_async_failures_and_timeouts_are_per_completion() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.async_each", timeout=1.0)], on_error=-1.0, max_error_fraction=None)
    started = time.monotonic()
    result = scorer(["ab", "bad", "hang", "abcd"], [{}] * 4)
    assert time.monotonic() - started < 3.0
    assert result.total.tolist() == [2.0, -1.0, -1.0, 4.0]
    assert result.num_errors == 2 and result.num_timeouts == 1
    assert str(result.first_errors["async_each"]) == "cannot score 'bad'"
    scorer.close()


def test_async_batched_with_timeout() -> None:
    scorer = RewardScorer(
        [Reward(f"{HERE}.async_batched", timeout=0.5)], on_error=-1.0, max_error_fraction=None
    )
    assert scorer.forms == ["batched"]
    assert scorer(["ab", "c"], [{}] * 2).total.tolist() == [4.0, 2.0]
    result = scorer(["ab", "hang"], [{}] * 2)
    assert result.total.tolist() == [-1.0, -1.0] and result.num_timeouts == 2
    scorer.close()


def test_keyboard_interrupt_in_a_coroutine_stops_the_run() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.async_interrupts")])
    with pytest.raises(KeyboardInterrupt):
        scorer(["a", "b"], [{}] * 2)
    scorer.close()


def test_a_coroutine_that_blocks_its_loop_times_out_the_call_and_the_next_call_gets_a_fresh_loop() -> None:
    scorer = RewardScorer(
        [Reward(f"{HERE}.async_blocks", timeout=0.1)], on_error=-1.0, max_error_fraction=None
    )
    started = time.monotonic()
    result = scorer(["block", "a"], [{}] * 2)
    assert 1.0 < time.monotonic() - started < 3.0  # given up at 2 x 0.1 + 1 s
    assert result.num_timeouts == 2 and "still busy 1.2s" in str(result.first_errors["async_blocks"])
    assert scorer(["a"], [{}]).total.tolist() == [1.0]  # the blocked loop was abandoned, a new one serves
    scorer.close()


def test_scoring_from_inside_a_running_event_loop_works() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.async_each"), Reward(f"{HERE}.trl_completions_only")])

    async def notebook_cell() -> list[float]:  # a notebook runs cells inside its own loop
        return scorer(["ab", "abc"], [{}] * 2).total.tolist()

    assert asyncio.run(notebook_cell()) == [4.0, 6.0]
    scorer.close()


def test_a_scorer_with_an_event_loop_can_be_pickled_and_copied() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.async_each")])
    scorer(["a"], [{}])
    for clone in (pickle.loads(pickle.dumps(scorer)), copy.deepcopy(scorer)):
        assert clone(["ab"], [{}]).total.tolist() == [2.0]
        clone.close()
    scorer.close()


# ---------------------------------------------------------------------------------------------------- fit


def test_a_fit_with_a_trl_form_reward(tiny_model_dir: Path, tmp_path: Path) -> None:
    outputs = WeightsAtStart()
    rewards = [Reward(f"{HERE}.trl_fit_reward")]
    trainer, module = short_fit(tiny_model_dir, tmp_path, [outputs], iterations=2, rewards=rewards)
    assert trainer.global_step == 2
    assert module.reward_scorer.forms == ["batched"]
    training = [call for call in CALLS if len(call["completions"]) == 8]  # 2 prompts x 4 completions
    assert len(training) == 2
    for call, row in zip(training, outputs.outputs):
        prompts = call["prompts"]
        assert all(isinstance(p, str) and p.endswith(":") for p in prompts)  # Countdown's "3 5 7 2>13:"
        assert prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4  # G rows per prompt
        assert all(
            int(prompt.split(">")[1][:-1]) == answer for prompt, answer in zip(prompts, call["answer"])
        )
        ids = call["completion_ids"]  # GRPO passes each completion's kept token ids
        assert isinstance(ids, list) and len(ids) == 8 and all(isinstance(i, list) and i for i in ids)
        assert all(isinstance(token, int) for i in ids for token in i)
        expected = sum(sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in call["completions"]) / 8
        assert row["rollout/reward/trl_fit_reward"] == pytest.approx(expected, abs=1e-6)
        assert row["rollout/reward_skipped"] == 0.0 and row["rollout/reward_errors"] == 0.0
    module.reward_scorer.close()


def test_the_module_call_with_a_real_rollouts_token_ids(tiny_model_dir: Path) -> None:
    """The call GRPO makes: ``completion_ids=completion_token_ids(rollout.completion_ids, rollout.completion_mask)``."""
    model, tokenizer = load_policy(Policy(path=str(tiny_model_dir), lora=LoRA(r=4, alpha=8)))
    model.eval()
    prompts = ["12+3=", "7*8="]
    rows = [{"prompt": prompts[0], "answer": 15}, {"prompt": prompts[1], "answer": 56}]
    torch.manual_seed(0)
    rollout = generate_rollout(
        model, tokenizer, prompts, rows, Sampling(group_size=3, max_new_tokens=6), torch.device("cpu")
    )
    scorer = RewardScorer([Reward(f"{HERE}.recording")])
    result = scorer(
        rollout.completions,
        rollout.examples,
        completion_ids=completion_token_ids(rollout.completion_ids, rollout.completion_mask),
    )
    (call,) = CALLS
    assert [len(ids) for ids in call["completion_ids"]] == rollout.completion_mask.sum(-1).tolist()
    decoded = [tokenizer.decode(ids, skip_special_tokens=True) for ids in call["completion_ids"]]
    assert decoded == rollout.completions == call["completions"]
    assert call["prompts"] == [prompts[0]] * 3 + [prompts[1]] * 3 and call["answer"] == [15] * 3 + [56] * 3
    assert result.total.tolist() == [float(len(c)) for c in rollout.completions]
