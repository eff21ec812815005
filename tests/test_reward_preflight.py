"""The reward check before training (`lit_entropy.preflight.check_reward_calls`), for both reward forms.

A function with a signature its form cannot call, or one failing on every probed completion, stops the run
before the first rollout with its name, form, signature and exception; a field the rows lack is a DataError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from harness import short_fit

from lit_entropy.errors import DataError
from lit_entropy.preflight import check_reward_calls, check_reward_fields
from lit_entropy.reward_scorer import RewardFailureError, RewardScorer
from lit_entropy.reward_spec import Reward

HERE = __name__
CALLS: list[int] = []
PER_COMPLETION = "fn(completion: str, example: dict, **kwargs) -> float"
BATCHED = "fn(prompts, completions, completion_ids, **columns) -> list[float | None]"


@pytest.fixture(autouse=True)
def _fresh() -> None:
    CALLS.clear()


def batched_without_kwargs(completions):
    """TRL's form without ``**kwargs``: the call passes prompts, completion_ids and the columns too."""
    return [1.0] * len(completions)


def one_argument(completion: str) -> float:
    return 1.0


def batched_judge_down(completions, **kwargs):
    raise ConnectionError("judge unreachable")


def batched_reads_answer(completions, **kwargs):
    return [float(c == a) for c, a in zip(completions, kwargs["answer"])]


def batched_needs_ids(completions, completion_ids, **kwargs):
    """Uses the token ids: fails on None."""
    return [float(len(ids)) for ids in completion_ids]


def counting_batched(completions):
    CALLS.append(len(completions))
    return [1.0] * len(completions)


def _rows(n: int = 3) -> tuple[list[dict[str, Any]], list[str]]:
    rows = [{"prompt": f"q{i}", "answer": str(i), "level": i} for i in range(n)]
    return rows, [f"<tmp>/train.jsonl row {i}" for i in range(n)]


def test_a_batched_signature_mismatch_names_the_function_both_signatures_and_the_columns() -> None:
    scorer = RewardScorer(
        [Reward("lit_entropy.rewards.exact_match"), Reward(f"{HERE}.batched_without_kwargs")]
    )
    with pytest.raises(RewardFailureError) as info:
        check_reward_calls(scorer, *_rows())
    message = str(info.value)
    assert message.startswith(
        f"reward 'batched_without_kwargs' ({HERE}.batched_without_kwargs, model.rewards[1]) failed on 3 of 3 "
        "completions of the check before training (every completion; the answers of <tmp>/train.jsonl row 0 to "
        "<tmp>/train.jsonl row 2 scored as completions): TypeError: batched_without_kwargs() got an unexpected "
        "keyword argument"
    )
    assert "called in the batched form (told from its signature)" in message
    assert "its signature (completions) does not take those arguments" in message
    assert PER_COMPLETION in message and BATCHED in message
    assert "(the dataset columns as keyword lists: answer, level)" in message
    assert "\n" not in message


def test_a_per_completion_signature_mismatch_shows_both_signatures() -> None:
    rows, sources = _rows(1)
    with pytest.raises(RewardFailureError) as info:
        check_reward_fields(RewardScorer([Reward(f"{HERE}.one_argument")]), rows[0], sources[0])
    message = str(info.value)
    assert "failed on 1 of 1 completions" in message and "the answer of <tmp>/train.jsonl row 0" in message
    assert "TypeError: one_argument() takes 1 positional argument but 2 were given" in message
    assert "per-completion form (told from its signature)" in message
    assert PER_COMPLETION in message and BATCHED in message


def test_a_signature_mismatch_stops_even_when_failures_are_only_counted() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.one_argument")], max_error_fraction=None)
    with pytest.raises(RewardFailureError, match="does not take those arguments"):
        check_reward_calls(scorer, *_rows())


def test_a_batched_function_failing_on_every_row_stops_unless_failures_are_only_counted() -> None:
    with pytest.raises(RewardFailureError) as info:
        check_reward_calls(RewardScorer([Reward(f"{HERE}.batched_judge_down")]), *_rows())
    message = str(info.value)
    assert "failed on 3 of 3 completions of the check before training" in message
    assert "ConnectionError: judge unreachable" in message
    assert "model.reward_max_error_fraction: null only counts failures" in message
    assert BATCHED not in message  # not a signature problem
    check_reward_calls(
        RewardScorer([Reward(f"{HERE}.batched_judge_down")], max_error_fraction=None), *_rows()
    )


def test_a_batched_function_reading_a_missing_column_is_a_data_error() -> None:
    rows = [{"prompt": "q", "solution": "1"}]
    with pytest.raises(DataError) as info:
        check_reward_calls(
            RewardScorer([Reward(f"{HERE}.batched_reads_answer")]), rows, ["<tmp>/t.jsonl row 0"]
        )
    assert "reward 'batched_reads_answer' (model.rewards[0]) reads field 'answer'" in str(info.value)
    assert "<tmp>/t.jsonl row 0 has none (columns: prompt, solution)" in str(info.value)


def test_the_probe_passes_token_ids_from_the_tokenizer(char_tokenizer: Any) -> None:
    scorer = RewardScorer([Reward(f"{HERE}.batched_needs_ids")])
    check_reward_calls(scorer, *_rows(), tokenizer=char_tokenizer)  # ids of "0", "1", "2": one token each
    with pytest.raises(RewardFailureError, match="TypeError: 'NoneType' object is not iterable"):
        check_reward_calls(scorer, *_rows())  # without a tokenizer the ids are None


def test_a_fit_with_a_wrong_batched_signature_stops_before_any_rollout(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(
        RewardFailureError, match=r"'counting_batched' .* check before training .*unexpected keyword"
    ):
        short_fit(tiny_model_dir, tmp_path, [], iterations=1, rewards=[Reward(f"{HERE}.counting_batched")])
    assert CALLS == []  # every call raised TypeError at the call itself: nothing was scored, nothing trained
