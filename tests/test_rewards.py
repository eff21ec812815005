"""Reward functions (GSM8K / boxed answers) and the weighted, failure-isolating RewardScorer."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from lit_entropy.errors import ConfigError
from lit_entropy.reward_scorer import RewardScorer
from lit_entropy.reward_spec import Reward
from lit_entropy.rewards import (
    answer_format,
    exact_match,
    extract_last_number,
    extract_numeric_answer,
    last_number_match,
    numeric_match,
)

# This test module is importable under whatever name pytest gave it, so its functions have import paths.
HERE = __name__

GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


def flaky_reward(completion: str, example: Mapping[str, Any]) -> float:
    """Raises on the completion "boom", else the completion's length (a value easy to check)."""
    if completion == "boom":
        raise RuntimeError("exploded on purpose")
    return float(len(completion))


def odd_reward(completion: str, example: Mapping[str, Any]) -> Any:
    """Returns a non-finite, a non-numeric, a 1-element tensor or a bool depending on the completion."""
    return {"nan": math.nan, "inf": math.inf, "text": "1.0", "tensor": torch.tensor([0.25]), "bool": True}[
        completion
    ]


def scaled_reward(
    completion: str, example: Mapping[str, Any], scale: float = 1.0, offset: float = 0.0
) -> float:
    return scale * float(example["answer"]) + offset


NOT_CALLABLE = 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GSM8K_SOLUTION, "72"),
        ("#### 1,234", "1234"),
        ("The answer is\n#### $5", "5"),
        ("#### 42.\nDone.", "42"),  # sentence-final period dropped
        ("first #### 3\nthen corrected:\n#### 4", "4"),  # last occurrence
        ("#### 4 #### 5", "5"),
        (r"so \boxed{42}", "42"),
        (r"\boxed{1} no wait \boxed{ 2 }", "2"),  # last occurrence, whitespace removed
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces are balanced
        (r"\boxed{3} and finally #### 7", "7"),  # both markers: the later one wins
        ("#### 7 and finally \\boxed{3}", "3"),
        ("The answer is 42.", None),
        ("####\n", None),  # an empty marker is not an answer
        (r"\boxed{42", None),  # unbalanced
        ("", None),
    ],
)
def test_extract_numeric_answer(text: str, expected: str | None) -> None:
    assert extract_numeric_answer(text) == expected


def test_exact_match() -> None:
    assert exact_match(" 12\n", {"answer": 12}) == 1.0
    assert exact_match("12", {"answer": " 12 "}) == 1.0
    assert exact_match("12.0", {"answer": 12}) == 0.0  # exact text, not numbers
    assert exact_match("The answer is 12", {"answer": 12}) == 0.0


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("24 + 48 = 72\n#### 72", GSM8K_SOLUTION, 1.0),  # reference is a full GSM8K solution
        ("#### 71", GSM8K_SOLUTION, 0.0),
        (r"The total is \boxed{72}.", GSM8K_SOLUTION, 1.0),
        (r"\boxed{72.0}", 72, 1.0),  # compared as numbers
        ("#### 1,234", "1234", 1.0),
        ("#### $1,234.00", 1234, 1.0),
        ("#### 0.1000000001", 0.1, 1.0),  # |diff| = 1e-10 <= 1e-6
        ("#### 0.1001", 0.1, 0.0),  # |diff| = 1e-4 > 1e-6
        ("#### -3", -3, 1.0),
        ("72", 72, 0.0),  # no marked answer in the completion
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", 1.0),  # non-numeric: compared as cleaned strings
        (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", 0.0),
        ("#### nan", "nan", 1.0),  # not a plain decimal, so equal as strings (float would say nan != nan)
        (r"\boxed{72}", "The answer is $\\boxed{72}$", 1.0),  # MATH-style reference solution
    ],
)
def test_numeric_match(completion: str, answer: Any, expected: float) -> None:
    assert numeric_match(completion, {"answer": answer}) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7 + 5 = 12.", "12"),  # the sentence-final period is not a decimal point
        ("The answer is **12**", "12"),
        ("12.0", "12.0"),
        ("It is -3.", "-3"),
        ("= -12.5!", "-12.5"),
        ("That makes 1,200 apples.", "1200"),
        ("12,000.50", "12000.50"),
        ("3, 4, 5", "5"),  # a list: commas followed by a space are not thousands separators
        ("7-5", "5"),  # a minus after a digit is an operator, not a sign
        ("a-2", "2"),
        ("#### 72\nChecked in 3 steps", "72"),  # a marked answer wins over later numbers
        ("\\boxed{12} because 3", "12"),
        ("x2", None),  # part of an identifier
        ("1,2345", None),  # not a thousands group, and "2345" glued to a comma is not a number either
        ("no number here", None),
        ("", None),
        ("\u0661\u0662", None),  # Arabic-Indic digits are not ASCII digits
    ],
)
def test_extract_last_number(text: str, expected: str | None) -> None:
    assert extract_last_number(text) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("7 + 5 = 12.", 12, 1.0),
        ("The answer is **12**", "12", 1.0),
        ("12.0", 12, 1.0),
        ("1,200", 1200, 1.0),
        ("10 - 13 = -3", -3, 1.0),
        (" 25\n", "#### 25", 1.0),  # a GSM8K-style reference answer is read too
        ("12, or maybe 13", 12, 0.0),  # only the last number counts
        ("7 + 5 = 13.", 12, 0.0),
        ("3", -3, 0.0),  # the sign matters
        ("12.5", 12, 0.0),
        ("The sum of 7 and 5 is", 12, 0.0),  # the last number (5) is not the answer
        ("twelve", 12, 0.0),  # no digits, nothing to read
    ],
)
def test_last_number_match(completion: str, answer: Any, expected: float) -> None:
    assert last_number_match(completion, {"answer": answer}) == expected


def test_answer_format() -> None:
    assert answer_format("blah #### 3", {}) == 1.0
    assert answer_format(r"\boxed{x}", {}) == 1.0
    assert answer_format("3", {}) == 0.0
    assert answer_format("#### ", {}) == 0.0


def test_scorer_weights_and_per_function_values() -> None:
    scorer = RewardScorer(
        [
            Reward("lit_entropy.rewards.numeric_match", weight=1.0),
            Reward("lit_entropy.rewards.answer_format", weight=0.5),
        ]
    )
    assert scorer.names == ["numeric_match", "answer_format"]
    completions = ["#### 72", "#### 70", "72", r"\boxed{5}"]
    examples = [{"answer": GSM8K_SOLUTION}] * 3 + [{"answer": "5"}]
    result = scorer(completions, examples)
    # By hand: numeric = [1, 0, 0, 1], format = [1, 1, 0, 1]; total = numeric + 0.5 * format.
    assert torch.equal(result.per_function["numeric_match"], torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert torch.equal(result.per_function["answer_format"], torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert torch.equal(result.total, torch.tensor([1.5, 0.5, 0.0, 1.5]))
    assert result.total.dtype == torch.float32 and result.total.shape == (4,)
    assert result.num_errors == 0
    assert result.errors_per_function == {"numeric_match": 0, "answer_format": 0}


def test_scorer_countdown_builtins_colon_paths_and_mappings() -> None:
    scorer = RewardScorer(
        [
            {"fn": "lit_entropy.demo.countdown:countdown_reward", "weight": 2.0},
            Reward("lit_entropy.demo.countdown.countdown_format_reward", weight=-1.0, name="fmt"),
        ]
    )
    assert scorer.names == ["countdown_reward", "fmt"]
    example = {"answer": 12, "numbers": [3, 5, 7, 2]}
    result = scorer(["7+5", "5+3", "5+5+2", "x"], [example] * 4)
    # correct = [1, 0, 0, 0], format = [1, 1, 0, 0]; total = 2 * correct - format = [1, -1, 0, 0].
    assert torch.equal(result.total, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_scorer_passes_kwargs_and_uses_custom_names() -> None:
    scorer = RewardScorer(
        [
            Reward(f"{HERE}.scaled_reward", name="double", kwargs={"scale": 2.0}),
            Reward(f"{HERE}.scaled_reward", name="shifted", weight=0.5, kwargs={"offset": -1.0}),
        ]
    )
    result = scorer(["a", "b"], [{"answer": 3}, {"answer": 4}])
    # double = [6, 8]; shifted = [2, 3]; total = double + 0.5 * shifted = [7, 9.5].
    assert torch.equal(result.per_function["double"], torch.tensor([6.0, 8.0]))
    assert torch.equal(result.per_function["shifted"], torch.tensor([2.0, 3.0]))
    assert torch.equal(result.total, torch.tensor([7.0, 9.5]))


def test_scorer_isolates_a_function_that_raises_on_one_completion(caplog: pytest.LogCaptureFixture) -> None:
    scorer = RewardScorer(
        [Reward(f"{HERE}.flaky_reward", weight=1.0), Reward("lit_entropy.rewards.exact_match", weight=10.0)],
        on_error=-1.0,
    )
    completions = ["ab", "boom", "cde", "boom"]
    examples = [{"answer": "ab"}, {"answer": "boom"}, {"answer": "x"}, {"answer": "y"}]
    with caplog.at_level(logging.WARNING, logger="lit_entropy.reward_scorer"):
        result = scorer(completions, examples)
    # flaky = [2, on_error, 3, on_error] = [2, -1, 3, -1]; exact = [1, 1, 0, 0] (unaffected by the failure).
    assert torch.equal(result.per_function["flaky_reward"], torch.tensor([2.0, -1.0, 3.0, -1.0]))
    assert torch.equal(result.per_function["exact_match"], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    # total = flaky + 10 * exact = [12, 9, 3, -1].
    assert torch.equal(result.total, torch.tensor([12.0, 9.0, 3.0, -1.0]))
    assert result.num_errors == 2
    assert result.errors_per_function == {"flaky_reward": 2, "exact_match": 0}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # the first error only, with the count
    message = warnings[0].getMessage()
    assert "flaky_reward" in message and "exploded on purpose" in message and "2 of 4" in message


def test_scorer_counts_non_finite_and_non_numeric_results() -> None:
    scorer = RewardScorer([Reward(f"{HERE}.odd_reward")], on_error=0.5)
    result = scorer(["nan", "inf", "text", "tensor", "bool"], [{}] * 5)
    # nan, inf and the string are errors -> 0.5; the 1-element tensor and bool are numbers.
    assert torch.equal(result.per_function["odd_reward"], torch.tensor([0.5, 0.5, 0.5, 0.25, 1.0]))
    assert result.num_errors == 3
    assert torch.isfinite(result.total).all()


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("no_such_package_xyz.module.fn", "cannot import module"),
        ("lit_entropy.rewards.no_such_function", "no attribute"),
        ("lit_entropy.rewards:no_such_function", "no attribute"),
        (f"{HERE}.NOT_CALLABLE", "not callable"),
        ("justaname", "import path"),
        ("", "import path"),
    ],
)
def test_scorer_import_errors_name_the_path(path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        RewardScorer([Reward(path)])
    assert repr(path) in str(info.value)
    assert fragment in str(info.value)


def test_scorer_config_errors() -> None:
    with pytest.raises(ConfigError, match="empty"):
        RewardScorer([])
    with pytest.raises(ConfigError, match="duplicate reward name 'exact_match'"):
        RewardScorer([Reward("lit_entropy.rewards.exact_match"), Reward("lit_entropy.rewards:exact_match")])
    with pytest.raises(ConfigError, match="weight"):
        RewardScorer([Reward("lit_entropy.rewards.exact_match", weight=math.nan)])
    with pytest.raises(ConfigError, match="on_error"):
        RewardScorer([Reward("lit_entropy.rewards.exact_match")], on_error=math.inf)
    # Distinct names make the same function usable twice.
    scorer = RewardScorer(
        [Reward("lit_entropy.rewards.exact_match"), Reward("lit_entropy.rewards.exact_match", name="again")]
    )
    assert scorer.names == ["exact_match", "again"]


def test_scorer_rejects_mismatched_lengths() -> None:
    scorer = RewardScorer([Reward("lit_entropy.rewards.exact_match")])
    with pytest.raises(ValueError, match="2 completions but 1 examples"):
        scorer(["a", "b"], [{"answer": "a"}])
