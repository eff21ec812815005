"""`lit_entropy.rewards.math_verify_match`: math-verify's parse/verify as a reward (the ``math`` extra)."""

from __future__ import annotations

import builtins
import threading
from typing import Any

import pytest

from lit_entropy import rewards
from lit_entropy.reward_scorer import RewardScorer
from lit_entropy.reward_spec import Reward
from lit_entropy.rewards import math_verify_match

math_verify = pytest.importorskip("math_verify")


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
        ("so it is $0.5$", "\\frac{1}{2}", 1.0),
        ("The answer is $1 + x^2$", "x^2+1", 1.0),
        ("#### 1234", "She sold 48 + 24 = 72 ... #### 1,234", 1.0),
        ("\\boxed{2\\sqrt{2}}", "2\\sqrt{2}", 1.0),
        ("\\boxed{2}", "2\\sqrt{2}", 0.0),  # a bare "2\sqrt{2}" is one formula, not the number 2
        ("I get 72.", 72, 1.0),
        ("I get 73.", 72, 0.0),
        ("no idea", "72", 0.0),
        ("\\boxed{\\{1, 2\\}}", "\\{1,2\\}", 1.0),
    ],
)
def test_answers_that_are_mathematically_equal_score_one(
    completion: str, answer: Any, expected: float
) -> None:
    assert math_verify_match(completion, {"answer": answer}) == expected


def test_a_reference_math_verify_cannot_read_is_an_error() -> None:
    with pytest.raises(ValueError, match="math-verify reads no answer in the reference answer"):
        math_verify_match("\\boxed{1}", {"answer": "$$"})


def test_its_own_signal_timeout_is_kept_in_the_main_thread_and_off_in_a_worker_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[str, Any]] = []
    parse, verify = math_verify.parse, math_verify.verify

    def recording_parse(text: str, **kwargs: Any) -> Any:
        seen.append(("parse", kwargs.get("parsing_timeout")))
        return parse(text, **kwargs)

    def recording_verify(gold: Any, target: Any, **kwargs: Any) -> Any:
        seen.append(("verify", kwargs.get("timeout_seconds")))
        return verify(gold, target, **kwargs)

    monkeypatch.setattr(math_verify, "parse", recording_parse)
    monkeypatch.setattr(math_verify, "verify", recording_verify)
    rewards._parse_gold.cache_clear()
    assert math_verify_match("\\boxed{3}", {"answer": "3"}) == 1.0
    assert seen and all(limit == rewards.MATH_VERIFY_TIMEOUT for _, limit in seen)
    seen.clear()
    rewards._parse_gold.cache_clear()
    results: list[float] = []
    worker = threading.Thread(target=lambda: results.append(math_verify_match("\\boxed{3}", {"answer": "3"})))
    worker.start()
    worker.join()
    assert results == [1.0]
    assert seen and all(limit is None for _, limit in seen)  # signal.alarm only works in the main thread
    rewards._parse_gold.cache_clear()


def test_with_a_reward_timeout_it_runs_in_the_worker_thread_without_errors() -> None:
    scorer = RewardScorer([Reward("lit_entropy.rewards.math_verify_match", timeout=10.0)])
    completions = ["\\boxed{\\frac{1}{2}}", "\\boxed{3}", "no"]
    result = scorer(completions, [{"answer": "0.5"}] * 3)
    scorer.close()
    assert result.total.tolist() == [1.0, 0.0, 0.0] and result.num_errors == 0


def test_without_math_verify_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_math_verify(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "math_verify" or name.startswith("math_verify."):
            raise ImportError("No module named 'math_verify'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_math_verify)
    with pytest.raises(ImportError, match=r"needs math-verify.*pip install 'lit-entropy\[math\]'"):
        math_verify_match("\\boxed{1}", {"answer": "1"})
