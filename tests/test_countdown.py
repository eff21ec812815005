"""Countdown: expression evaluation, verifiers and the deterministic generator."""

from __future__ import annotations

import random
import re

import pytest

from lit_entropy.demo.countdown import (
    countdown_format_reward,
    countdown_reward,
    countdown_solutions,
    evaluate_expression,
    generate_countdown_examples,
)
from lit_entropy.errors import ConfigError

EXAMPLE = {"prompt": "3 5 7 2>12:", "answer": 12, "numbers": [3, 5, 7, 2]}


def _naive_value(expr: str) -> int:
    """Independent reference: split into additive terms, each a product of factors."""
    total = 0
    for match in re.finditer(r"([+-]?)([0-9*]+)", expr):
        sign, term = match.groups()
        product = 1
        for factor in term.split("*"):
            product *= int(factor)
        total += -product if sign == "-" else product
    return total


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("7", 7),
        ("5+7", 12),
        ("2+3*4", 14),  # * before +: 2 + 12 = 14, not (2+3)*4 = 20
        ("2*3+4", 10),  # 6 + 4
        ("9-3-2", 4),  # left-associative: (9-3)-2 = 4, not 9-(3-2) = 8
        ("2-3*4", -10),  # 2 - 12
        ("2*3*4-5*6+1", -5),  # 24 - 30 + 1
        ("007+1", 8),  # leading zeros read as decimal
    ],
)
def test_evaluate_expression_by_hand(expr: str, expected: int) -> None:
    assert evaluate_expression(expr) == expected


@pytest.mark.parametrize(
    "expr", ["", "2 + 3", "(2+3)*4", "-2+3", "2+", "+2", "2**3", "2/3", "2+3\n", "abc", "٣+1", "2++3"]
)
def test_evaluate_expression_rejects_non_grammar(expr: str) -> None:
    assert evaluate_expression(expr) is None


def test_evaluate_expression_matches_naive_formula_on_random_expressions() -> None:
    rng = random.Random(1)
    for _ in range(500):
        k = rng.randint(1, 6)
        expr = str(rng.randint(0, 20)) + "".join(
            rng.choice("+-*") + str(rng.randint(0, 20)) for _ in range(k - 1)
        )
        assert evaluate_expression(expr) == _naive_value(expr), expr


def test_reward_accepts_several_correct_answers() -> None:
    # By hand, numbers 3 5 7 2, target 12: 5+7 = 12, 7+5 = 12, 7+3+2 = 12, 2+3+7 = 12; whitespace around
    # the expression is stripped.
    for answer in ["5+7", "7+5", "7+3+2", "2+3+7", " 5+7\n"]:
        assert countdown_reward(answer, EXAMPLE) == 1.0, answer


@pytest.mark.parametrize(
    ("completion", "why"),
    [
        ("6+6", "6 is not among the numbers"),
        ("5+5+2", "5 is given once but used twice"),
        ("7+7-2", "7 is given once but used twice"),
        ("5+3", "valid numbers but value 8 != 12"),
        ("2+3*4", "value 14 != 12 (precedence) and 4 not given"),
        ("twelve", "garbage text"),
        ("", "empty"),
        ("5 + 7", "spaces inside the expression"),
        ("(5+7)", "parentheses are not in the grammar"),
        ("12", "the target itself is not one of the numbers"),
    ],
)
def test_reward_rejects(completion: str, why: str) -> None:
    assert countdown_reward(completion, EXAMPLE) == 0.0, why


def test_reward_respects_multiplicity_of_repeated_numbers() -> None:
    example = {"answer": 12, "numbers": [6, 6, 1, 9]}
    assert countdown_reward("6+6", example) == 1.0  # 6 is given twice
    assert countdown_reward("6+6*1", example) == 1.0  # 6 + 6 = 12
    assert countdown_reward("6+6+1-1", example) == 0.0  # 1 is given once


def test_reward_precedence_decides_value() -> None:
    example = {"answer": 14, "numbers": [2, 3, 4]}
    assert countdown_reward("2+3*4", example) == 1.0  # 2 + 12 = 14
    assert countdown_reward("3*4+2", example) == 1.0
    assert countdown_reward("2*3+4", example) == 0.0  # 6 + 4 = 10


def test_reward_accepts_answer_given_as_string() -> None:
    # CSV files load every column as text.
    assert countdown_reward("5+7", {"answer": "12", "numbers": [3, 5, 7, 2]}) == 1.0


def test_format_reward_ignores_value_but_checks_numbers() -> None:
    assert countdown_format_reward("5+3", EXAMPLE) == 1.0  # wrong value (8), valid form
    assert countdown_format_reward(" 5+7 ", EXAMPLE) == 1.0
    assert countdown_format_reward("5+5", EXAMPLE) == 0.0  # 5 used twice
    assert countdown_format_reward("9+3", EXAMPLE) == 0.0  # 9 not given
    assert countdown_format_reward("5 7", EXAMPLE) == 0.0
    assert countdown_format_reward("hello", EXAMPLE) == 0.0


def test_countdown_solutions_all_verified_and_include_commuted_forms() -> None:
    solutions = countdown_solutions(EXAMPLE)
    assert {"5+7", "7+5", "7+3+2", "2+7+3"} <= solutions
    assert "5+5+2" not in solutions  # 5 used twice
    assert all(countdown_reward(s, EXAMPLE) == 1.0 for s in solutions)
    short = countdown_solutions(EXAMPLE, max_terms=2)
    # By hand: of all sums, differences and products of two of 3 5 7 2, only 5+7 = 12.
    assert short == {"5+7", "7+5"}


def test_generator_format_and_ranges() -> None:
    rows = generate_countdown_examples(300, seed=7, num_numbers=4, max_number=9, min_terms=2, max_terms=3)
    assert len(rows) == 300
    for row in rows:
        assert set(row) == {"prompt", "answer", "numbers", "solution"}
        numbers, target = row["numbers"], row["answer"]
        assert len(numbers) == 4 and all(1 <= n <= 9 for n in numbers)
        assert 1 <= target <= 99
        assert row["prompt"] == " ".join(str(n) for n in numbers) + f">{target}:"
        assert re.fullmatch(r"[0-9]+(?: [0-9]+)*>[0-9]+:", row["prompt"])
        assert " " not in row["solution"]
        assert 2 <= len(re.findall("[0-9]+", row["solution"])) <= 3
        # The hidden solution is itself a correct answer.
        assert evaluate_expression(row["solution"]) == target
        assert countdown_reward(row["solution"], row) == 1.0


def test_generator_is_deterministic_and_leaves_global_rng_alone() -> None:
    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    first = generate_countdown_examples(50, seed=3)
    assert random.random() == expected_next  # the global RNG was not consumed
    assert generate_countdown_examples(50, seed=3) == first
    assert generate_countdown_examples(50, seed=4) != first
    # A prefix does not depend on how many rows are requested.
    assert generate_countdown_examples(20, seed=3) == first[:20]


def test_generator_has_many_correct_answers_per_prompt() -> None:
    rows = generate_countdown_examples(50, seed=0)
    counts = [len(countdown_solutions(row)) for row in rows]
    assert min(counts) >= 1
    # Commutativity alone gives >= 2 answers for any 2-term solution with + or *; most prompts have many.
    assert sum(c >= 2 for c in counts) >= 45
    assert sum(counts) / len(counts) > 5


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_examples": -1}, "num_examples"),
        ({"num_numbers": 0, "max_terms": 0, "min_terms": 0}, "num_numbers"),
        ({"max_number": 0}, "max_number"),
        ({"min_terms": 0}, "min_terms"),
        ({"min_terms": 3, "max_terms": 2}, "max_terms"),
        ({"max_terms": 5}, "max_terms"),
    ],
)
def test_generator_rejects_bad_settings(kwargs: dict, name: str) -> None:
    arguments = {"num_examples": 3, "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=name):
        generate_countdown_examples(**arguments)
