"""Verifiable reward functions: answer extraction and matching against a dataset row's answer.

A reward function maps ``(completion text, dataset row) -> float``. Configs (YAML) name them by import
path with a weight, e.g.::

    rewards:
      - fn: lit_entropy.rewards.numeric_match
      - fn: lit_entropy.rewards.answer_format
        weight: 0.1

Built-in paths: ``lit_entropy.rewards.exact_match``, ``lit_entropy.rewards.numeric_match``,
``lit_entropy.rewards.last_number_match``, ``lit_entropy.rewards.answer_format``,
``lit_entropy.rewards.math_verify_match`` (needs the ``math`` extra: ``pip install 'lit-entropy[math]'``),
``lit_entropy.rewards.soft_overlong_penalty`` (DAPO's length penalty, in the batched form), and for
the demo task ``lit_entropy.demo.countdown.countdown_reward`` and
``lit_entropy.demo.countdown.countdown_format_reward``.

These are in the per-completion form except ``soft_overlong_penalty``; TRL's batched form works for any
function (`lit_entropy.reward_forms`).

A reward function may name how it reads a completion's final answer: an ``answer_of`` attribute, a function
``completion -> answer or None`` (:func:`answer_reader` looks it up). Validation uses it to count *distinct
final answers* ("12" and "The answer is 12." are one answer). ``exact_match``, ``numeric_match``,
``last_number_match`` and the demo's ``countdown_reward`` have one; a custom function gets one by
``my_reward.answer_of = my_parser``.

A config entry is a `lit_entropy.reward_spec.Reward`; `lit_entropy.reward_scorer.RewardScorer` combines the
functions into one weighted reward per completion.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "RewardFunction",
    "answer_format",
    "answer_reader",
    "exact_match",
    "extract_last_number",
    "extract_numeric_answer",
    "last_number_match",
    "math_verify_match",
    "numeric_match",
    "soft_overlong_penalty",
]

RewardFunction = Callable[[str, Mapping[str, Any]], float]
"""(completion text, dataset row) -> reward."""

# The answer runs to the end of the line, or to the next "####" when a model repeats the marker.
_GSM8K_RE = re.compile(r"####([^\n#]*)")
_BOXED = "\\boxed{"
# Plain decimal numbers only: float() would also accept "nan", "inf" and "1_000".
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NUMERIC_TOLERANCE = 1e-6
# A number as instruct models write one in prose: "12", "-3", "12.0", "1,200" (comma thousands groups). The
# minus is a sign only where it does not follow a word character or a closing bracket ("7-5" is 7 and 5, not
# -5); the lookarounds keep "x2"-style identifiers and the digits of "1,2345" from counting as numbers.
_PROSE_NUMBER_RE = re.compile(
    r"(?<![\w.,])(?:(?<![\w)\]])-)?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?![\w,]*[0-9])"
)


def _clean_answer(text: str) -> str:
    # GSM8K answers are written "1,234" or "$5"; models add spaces or a sentence-final period.
    cleaned = re.sub(r"[\s,$]", "", text)
    return cleaned[:-1] if cleaned.endswith(".") and len(cleaned) > 1 else cleaned


def _boxed_contents(text: str) -> list[tuple[int, str]]:
    """Returns ``(start, content)`` of every balanced ``\\boxed{...}``, so ``\\boxed{\\frac{1}{2}}`` works."""
    found = []
    start = text.find(_BOXED)
    while start != -1:
        depth = 1
        pos = start + len(_BOXED)
        while pos < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[pos], 0)
            pos += 1
        if depth == 0:
            found.append((start, text[start + len(_BOXED) : pos - 1]))
        start = text.find(_BOXED, start + 1)
    return found


def extract_numeric_answer(text: str) -> str | None:
    """Extracts the final answer from a GSM8K-style ``#### 42`` or a LaTeX ``\\boxed{42}``.

    When both markers occur, the one that appears last in ``text`` wins (the model's final statement).
    Only non-empty answers count: ``"####"`` alone at the end is ignored.

    Args:
        text: A completion or a reference solution.

    Returns:
        The answer with commas, whitespace and ``$`` removed (and a trailing ``.``), e.g. ``"1234"`` for
        ``"#### $1,234."``; ``None`` when neither marker with a non-empty answer is present.
    """
    candidates: list[tuple[int, str]] = [
        (match.start(), _clean_answer(match.group(1))) for match in _GSM8K_RE.finditer(text)
    ]
    candidates += [(start, _clean_answer(content)) for start, content in _boxed_contents(text)]
    candidates = [(start, answer) for start, answer in candidates if answer]
    if not candidates:
        return None
    return max(candidates)[1]


def extract_last_number(text: str) -> str | None:
    """Extracts the last plain number of a completion, the way chat models end an answer.

    Reads ``"7 + 5 = 12."``, ``"The answer is **12**"``, ``"12.0"``, ``"-3"`` and ``"1,200"``. A GSM8K
    ``#### x`` or ``\\boxed{x}`` answer, when present, wins over any number after it (see
    :func:`extract_numeric_answer`).

    Args:
        text: A completion.

    Returns:
        The number as text without thousands commas (``"1200"`` for ``"1,200"``; a sentence-final period is
        never part of it), or ``None`` when ``text`` holds no number made of ASCII digits.
    """
    marked = extract_numeric_answer(text)
    if marked is not None:
        return marked
    matches = _PROSE_NUMBER_RE.findall(text)
    return matches[-1].replace(",", "") if matches else None


def _reference_answer(answer: Any) -> str:
    # The answer field is either a full solution ("... #### 72", "... \boxed{72}") or a bare value.
    text = str(answer)
    extracted = extract_numeric_answer(text)
    return extracted if extracted is not None else _clean_answer(text)


def _answers_equal(predicted: str, reference: str) -> bool:
    if _NUMBER_RE.fullmatch(predicted) and _NUMBER_RE.fullmatch(reference):
        return abs(float(predicted) - float(reference)) <= _NUMERIC_TOLERANCE
    return predicted == reference


def exact_match(completion: str, example: Mapping[str, Any]) -> float:
    """1.0 if ``completion.strip() == str(example["answer"]).strip()``, else 0.0."""
    return 1.0 if completion.strip() == str(example["answer"]).strip() else 0.0


def numeric_match(completion: str, example: Mapping[str, Any]) -> float:
    """Rewards a completion whose extracted final answer equals the reference answer.

    Args:
        completion: Generated text; its answer is taken by :func:`extract_numeric_answer`.
        example: Dataset row whose ``"answer"`` is a GSM8K/MATH solution (``"... #### 72"``,
            ``"... \\boxed{72}"``) or a bare number or string.

    Returns:
        1.0 if the answers are equal: as numbers within 1e-6 when both are plain decimals
        (``"72.0"`` matches ``72``), as cleaned strings otherwise; 0.0 when they differ or the completion
        has no marked answer.
    """
    predicted = extract_numeric_answer(completion)
    if predicted is None:
        return 0.0
    return 1.0 if _answers_equal(predicted, _reference_answer(example["answer"])) else 0.0


def last_number_match(completion: str, example: Mapping[str, Any]) -> float:
    """Rewards a completion whose last number equals the reference answer (for short chat answers).

    Args:
        completion: Generated text; its answer is taken by :func:`extract_last_number`.
        example: Dataset row whose ``"answer"`` is a number, a string of one, or a ``#### x`` solution.

    Returns:
        1.0 if the last number equals the answer within 1e-6 (``"12.0"`` and ``"= 12."`` match ``12``),
        0.0 when it differs or the completion has no number. Only the last number counts, so
        ``"12, or maybe 13"`` scores 0.0 against 12.
    """
    predicted = extract_last_number(completion)
    if predicted is None:
        return 0.0
    return 1.0 if _answers_equal(predicted, _reference_answer(example["answer"])) else 0.0


def _number_key(answer: str | None) -> str | None:
    # one key per value: "12", "12.0" and "12.00" are the same answer; other text is kept as written
    if answer is None or not _NUMBER_RE.fullmatch(answer):
        return answer
    return repr(float(answer))


def _marked_number(completion: str) -> str | None:
    return _number_key(extract_numeric_answer(completion))


def _last_number(completion: str) -> str | None:
    return _number_key(extract_last_number(completion))


exact_match.answer_of = str.strip  # type: ignore[attr-defined]
numeric_match.answer_of = _marked_number  # type: ignore[attr-defined]
last_number_match.answer_of = _last_number  # type: ignore[attr-defined]


def answer_reader(reward: Callable[..., Any]) -> Callable[[str], str | None] | None:
    """The function that reads a completion's final answer for ``reward`` (its ``answer_of``), or ``None``.

    Args:
        reward: A reward function (or callable object).

    Returns:
        ``reward.answer_of`` when it is callable (for a ``functools.partial``, its function's), else ``None``
        (no final-answer count for this reward).
    """
    reader = getattr(reward, "answer_of", None)
    if reader is None and isinstance(reward, functools.partial):
        reader = getattr(reward.func, "answer_of", None)
    return reader if callable(reader) else None


def answer_format(completion: str, example: Mapping[str, Any]) -> float:
    """1.0 if the completion marks a non-empty final answer with ``#### x`` or ``\\boxed{x}``, else 0.0."""
    return 0.0 if extract_numeric_answer(completion) is None else 1.0


#: Seconds math-verify's own limit gives each parse and comparison, in the main thread (its default).
MATH_VERIFY_TIMEOUT = 5
_LATEX_MARKERS = ("$", "\\(", "\\[", "\\boxed")


def _math_verify() -> Any:
    try:
        import math_verify
    except ImportError as error:
        raise ImportError(
            "lit_entropy.rewards.math_verify_match needs math-verify, an optional dependency: "
            "pip install 'lit-entropy[math]' (or pip install 'math-verify>=0.9')"
        ) from error
    return math_verify


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str, limit: int | None) -> list[Any]:
    """The reference answer as math-verify objects (cached: a prompt's G completions share one answer)."""
    math_verify = _math_verify()
    marked = _GSM8K_RE.findall(answer)
    if marked and marked[-1].strip():  # a GSM8K solution: the answer after the last "####"
        answer = marked[-1].strip()
    elif any(marker in answer for marker in _LATEX_MARKERS):  # a LaTeX solution: math-verify finds its answer
        return math_verify.parse(answer, parsing_timeout=limit)
    # a bare answer ("72", "2\\sqrt{2}", "x^2+1"): read as one LaTeX formula, else as written
    return math_verify.parse(f"${answer}$", parsing_timeout=limit) or math_verify.parse(
        answer, parsing_timeout=limit
    )


def math_verify_match(completion: str, example: Mapping[str, Any]) -> float:
    """Rewards a completion whose answer math-verify finds equal to the reference answer (``math`` extra).

    Uses Hugging Face's math-verify (``parse``, ``verify``): ``\\boxed{0.5}`` matches ``\\frac{1}{2}``,
    ``$1 + x^2$`` matches ``x^2+1``, ``#### 1,234`` matches ``1234``.

    math-verify limits each parse and comparison with ``signal.alarm``, which only works in the main thread. In
    the main thread (no ``timeout`` on the reward, or ``process: true``) its limit is kept
    (`MATH_VERIFY_TIMEOUT` seconds; a parse cut by it reads as no answer, 0.0); in any other thread (a reward
    with ``timeout``, which runs in a worker thread) math-verify's limit is switched off
    (``parsing_timeout=None``, ``timeout_seconds=None``; math-verify logs once that it is off) and the reward's
    ``timeout`` is the only one.

    Args:
        completion: Generated text; math-verify extracts its answer (``\\boxed{}`` first, then LaTeX and plain
            expressions).
        example: Dataset row whose ``"answer"`` is a bare answer (``"72"``, ``"\\frac{1}{2}"``, read as one
            formula), a LaTeX solution with ``$...$`` or ``\\boxed{}``, or a GSM8K solution (``"... #### 72"``).

    Returns:
        1.0 if equal, 0.0 when they differ or no answer is found in the completion.

    Raises:
        ImportError: math-verify is not installed (naming the ``math`` extra).
        ValueError: math-verify reads no answer in the reference (a failure of this completion, counted).
    """
    math_verify = _math_verify()
    limit = MATH_VERIFY_TIMEOUT if threading.current_thread() is threading.main_thread() else None
    gold = _parse_gold(str(example["answer"]), limit)
    if not gold:
        raise ValueError(
            f"math-verify reads no answer in the reference answer {str(example['answer'])[:80]!r}"
        )
    predicted = math_verify.parse(completion, parsing_timeout=limit)
    if not predicted:
        return 0.0
    return 1.0 if math_verify.verify(gold, predicted, timeout_seconds=limit) else 0.0


def soft_overlong_penalty(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]],
    max_completion_length: int,
    soft_punish_cache: int,
    **columns: Any,
) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al., arXiv 2503.14476, eq. 13), in the batched form.

    With ``L = len(completion_ids[i])``, ``L_max = max_completion_length`` and ``L_cache = soft_punish_cache``:
    ``0`` when ``L <= L_max - L_cache``, ``(L_max - L_cache - L) / L_cache`` (from 0 down to -1) inside the last
    ``L_cache`` tokens, ``-1`` beyond ``L_max``. Set ``max_completion_length`` to ``sampling.max_new_tokens``
    and add it next to the task's reward (weight 1, as in DAPO)::

        rewards:
          - fn: lit_entropy.rewards.numeric_match
          - fn: lit_entropy.rewards.soft_overlong_penalty
            kwargs: {max_completion_length: 512, soft_punish_cache: 128}
    """
    if soft_punish_cache < 1 or soft_punish_cache > max_completion_length:
        raise ValueError(
            f"soft_punish_cache must be in [1, max_completion_length={max_completion_length}], got {soft_punish_cache}"
        )
    start = max_completion_length - soft_punish_cache
    penalties = []
    for ids in completion_ids:
        length = len(ids)
        if length <= start:
            penalties.append(0.0)
        elif length <= max_completion_length:
            penalties.append((start - length) / soft_punish_cache)
        else:
            penalties.append(-1.0)
    return penalties
