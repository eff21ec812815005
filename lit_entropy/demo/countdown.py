"""Countdown: the embedded synthetic verifiable task, with many correct answers per prompt.

Each prompt lists a few small numbers and a target; a completion is an arithmetic expression over
some of those numbers (each at most as often as it is given) that evaluates to the target, e.g.

    prompt "3 5 7 2>13:"   correct completions "5+7+3-2", "7+3+5-2", "3*2+7", "7+3*2", ...

The format is deliberately tiny (printable ASCII, no spaces inside the expression) so that a
character-level model can learn it on CPU in minutes. Because addition and multiplication commute and
several subsets of the numbers often reach the same target, a prompt has many distinct correct answers:
exactly the setting where entropy collapse (the policy settling on one answer) is visible.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from lit_entropy.errors import ConfigError

__all__ = [
    "countdown_format_reward",
    "countdown_reward",
    "countdown_solutions",
    "evaluate_expression",
    "generate_countdown_examples",
]

MIN_TARGET = 1
MAX_TARGET = 99
_OPS = "+-*"
# ASCII digits only: `\d` would also accept e.g. Arabic-Indic digits, which int() happily parses.
_EXPRESSION_RE = re.compile(r"[0-9]+(?:[+\-*][0-9]+)*")
_TOKEN_RE = re.compile(r"[0-9]+|[+\-*]")
# Drawing numbers and an expression is cheap; this bound only matters for settings where almost no
# expression lands in [MIN_TARGET, MAX_TARGET] (e.g. max_number=10_000), which we report as a ConfigError.
_MAX_ATTEMPTS_PER_EXAMPLE = 10_000


def _validate_settings(num_numbers: int, max_number: int, min_terms: int, max_terms: int) -> None:
    if num_numbers < 1:
        raise ConfigError(f"num_numbers must be >= 1, got {num_numbers}")
    if max_number < 1:
        raise ConfigError(f"max_number must be >= 1, got {max_number}")
    if min_terms < 1:
        raise ConfigError(f"min_terms must be >= 1, got {min_terms}")
    if max_terms < min_terms:
        raise ConfigError(f"max_terms ({max_terms}) must be >= min_terms ({min_terms})")
    if max_terms > num_numbers:
        # Terms use distinct positions of `numbers`, so there cannot be more terms than numbers.
        raise ConfigError(f"max_terms ({max_terms}) must be <= num_numbers ({num_numbers})")


def evaluate_expression(expr: str) -> int | None:
    """Evaluates an integer expression of ``+``, ``-`` and ``*`` with standard precedence, without ``eval``.

    Args:
        expr: Text that must fully match ``^[0-9]+([+\\-*][0-9]+)*$``: no spaces, no parentheses, no unary
            minus. Leading zeros are allowed and read as decimal (``"07"`` is 7).

    Returns:
        The integer value (``*`` binds tighter than ``+`` and ``-``, which associate left), or ``None`` when
        ``expr`` does not match the grammar.
    """
    if not isinstance(expr, str) or _EXPRESSION_RE.fullmatch(expr) is None:
        return None
    tokens = _TOKEN_RE.findall(expr)
    # The value is a signed sum of products: accumulate the current product and flush it into the
    # total whenever a + or - starts a new term.
    total = 0
    sign = 1
    product = int(tokens[0])
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        value = int(operand)
        if op == "*":
            product *= value
        else:
            total += sign * product
            sign = 1 if op == "+" else -1
            product = value
    return total + sign * product


def _used_numbers(expr: str) -> list[int]:
    return [int(token) for token in re.findall(r"[0-9]+", expr)]


def _uses_only_given_numbers(expr: str, numbers: Any) -> bool:
    # Multiset inclusion: every number may be used at most as many times as it is given.
    available = Counter(int(n) for n in numbers)
    used = Counter(_used_numbers(expr))
    return all(available[number] >= count for number, count in used.items())


def countdown_format_reward(completion: str, example: Mapping[str, Any]) -> float:
    """Rewards a well-formed expression over the given numbers, whatever its value.

    Args:
        completion: Generated text; surrounding whitespace is ignored.
        example: Dataset row with ``"numbers"`` (list of ints).

    Returns:
        1.0 if ``completion.strip()`` is a valid expression (see :func:`evaluate_expression`) whose numbers
        form a sub-multiset of ``example["numbers"]``, else 0.0.
    """
    expr = completion.strip()
    if evaluate_expression(expr) is None:
        return 0.0
    return 1.0 if _uses_only_given_numbers(expr, example["numbers"]) else 0.0


def countdown_reward(completion: str, example: Mapping[str, Any]) -> float:
    """Rewards a correct Countdown answer.

    Args:
        completion: Generated text; surrounding whitespace is ignored.
        example: Dataset row with ``"numbers"`` (list of ints) and ``"answer"`` (the target, int or a
            string of an int, e.g. when loaded from CSV).

    Returns:
        1.0 if ``completion.strip()`` is a valid expression that uses only the given numbers (each at most
        as often as given) and evaluates to ``example["answer"]``, else 0.0.
    """
    expr = completion.strip()
    value = evaluate_expression(expr)
    if value is None or value != int(str(example["answer"]).strip()):
        return 0.0
    return 1.0 if _uses_only_given_numbers(expr, example["numbers"]) else 0.0


# the answer is the expression itself: "3+4" and "4+3" are two solutions
countdown_reward.answer_of = str.strip  # type: ignore[attr-defined]


def _expression(numbers: list[int], ops: tuple[str, ...] | list[str]) -> str:
    return str(numbers[0]) + "".join(op + str(n) for op, n in zip(ops, numbers[1:]))


def countdown_solutions(example: Mapping[str, Any], max_terms: int | None = None) -> set[str]:
    """Enumerates every correct answer to a Countdown example (brute force; meant for tests and analysis).

    Args:
        example: Dataset row with ``"numbers"`` and ``"answer"``.
        max_terms: Longest expression considered, in numbers used; default: all of ``example["numbers"]``.

    Returns:
        The set of distinct expression strings over distinct positions of ``numbers`` (any order, ops from
        ``+-*``) that :func:`countdown_reward` scores 1.0. Cost grows as ``n! * 3^(n-1)`` for n numbers,
        fine for the default 4.
    """
    numbers = [int(n) for n in example["numbers"]]
    target = int(str(example["answer"]).strip())
    longest = len(numbers) if max_terms is None else min(max_terms, len(numbers))
    solutions: set[str] = set()
    for k in range(1, longest + 1):
        for chosen in itertools.permutations(numbers, k):
            for ops in itertools.product(_OPS, repeat=k - 1):
                expr = _expression(list(chosen), ops)
                if evaluate_expression(expr) == target:
                    solutions.add(expr)
    return solutions


def generate_countdown_examples(
    num_examples: int,
    seed: int,
    num_numbers: int = 4,
    max_number: int = 9,
    min_terms: int = 2,
    max_terms: int = 3,
) -> list[dict[str, Any]]:
    """Generates Countdown rows deterministically from ``seed``.

    For each row, ``num_numbers`` ints are drawn uniformly from ``[1, max_number]`` (repeats allowed),
    then a random expression over ``k`` distinct positions of them (``k`` uniform in
    ``[min_terms, max_terms]``, ops uniform over ``+ - *``) gives the target. Draws whose target falls
    outside ``[1, 99]`` are discarded and the whole row (numbers and expression) is drawn again.

    Args:
        num_examples: Number of rows to generate (>= 0).
        seed: Seed of a private ``random.Random``; the global RNG is never touched.
        num_numbers: Numbers shown in each prompt.
        max_number: Largest number that can be drawn.
        min_terms: Fewest numbers the hidden solution uses.
        max_terms: Most numbers the hidden solution uses (<= ``num_numbers``).

    Returns:
        Rows like ``{"prompt": "3 5 7 2>13:", "answer": 13, "numbers": [3, 5, 7, 2], "solution": "5+7+3-2"}``.
        The prompt is the numbers separated by single spaces, ``">"``, the target, ``":"``.

    Raises:
        ConfigError: On an invalid setting, naming it, or when targets in ``[1, 99]`` are (almost)
            unreachable with these settings.
    """
    if num_examples < 0:
        raise ConfigError(f"num_examples must be >= 0, got {num_examples}")
    _validate_settings(num_numbers, max_number, min_terms, max_terms)
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for _ in range(num_examples):
        for _attempt in range(_MAX_ATTEMPTS_PER_EXAMPLE):
            numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
            k = rng.randint(min_terms, max_terms)
            positions = rng.sample(range(num_numbers), k)
            ops = [rng.choice(_OPS) for _ in range(k - 1)]
            solution = _expression([numbers[p] for p in positions], ops)
            target = evaluate_expression(solution)
            assert target is not None  # built from the grammar, so it always parses
            if MIN_TARGET <= target <= MAX_TARGET:
                break
        else:
            raise ConfigError(
                f"no target in [{MIN_TARGET}, {MAX_TARGET}] after {_MAX_ATTEMPTS_PER_EXAMPLE} draws with "
                f"max_number={max_number}, min_terms={min_terms}; lower max_number or min_terms"
            )
        rows.append(
            {
                "prompt": " ".join(map(str, numbers)) + f">{target}:",
                "answer": target,
                "numbers": numbers,
                "solution": solution,
            }
        )
    return rows
