"""Arithmetic: short "What is 7 + 5?" questions for a real chat model, generated in code from a seed.

Each row is one binary operation on two integers, asked in words, e.g.

    prompt "What is 17 + 8? Answer with a number."   answer 25

The prompt is plain text (one user turn): `GRPO` renders it with the tokenizer's chat template and system
prompt, so the model sees the question the way it was instruction-tuned. A chat model answers in prose
("17 + 8 = 25.", "The answer is **25**"), which `lit_entropy.rewards.last_number_match` reads.

Unlike Countdown (`lit_entropy.demo.countdown`) each question has exactly one correct value; what RL changes
here is mostly *how* the model answers (a short sentence that ends with the number instead of a ramble cut off
by ``max_new_tokens``), which a small instruct model gets partly right from the start.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any, Literal

from typing_extensions import override

from lit_entropy.data import VAL_SEED_OFFSET, GeneratedDataModule
from lit_entropy.errors import ConfigError
from lit_entropy.prompt_files import Row

__all__ = ["ArithmeticDataModule", "apply_operation", "generate_arithmetic_examples"]

Operation = Literal["+", "-", "*"]
_OPERATIONS: tuple[Operation, ...] = ("+", "-", "*")
DEFAULT_TEMPLATE = "What is {a} {op} {b}? Answer with a number."
# Redraws allowed per row when its question is excluded (held out for validation); only a question space
# that is (almost) all excluded gets near it, which we report as a ConfigError.
_MAX_ATTEMPTS_PER_EXAMPLE = 10_000


def apply_operation(a: int, op: Operation, b: int) -> int:
    """The value of ``a op b`` for ``op`` in ``+ - *`` (integers, so the answer is exact)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ConfigError(f"operation must be one of {_OPERATIONS}, got {op!r}")


def _validate_settings(operations: Sequence[str], min_operand: int, max_operand: int, template: str) -> None:
    if isinstance(operations, str) or not operations:
        raise ConfigError(
            f"operations must be a non-empty list drawn from {list(_OPERATIONS)}, got {operations!r}"
        )
    bad = [op for op in operations if op not in _OPERATIONS]
    if bad:
        raise ConfigError(f"operations must be drawn from {list(_OPERATIONS)}, got {bad}")
    if min_operand > max_operand:
        raise ConfigError(f"min_operand ({min_operand}) must be <= max_operand ({max_operand})")
    try:
        template.format(a=1, op="+", b=2)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"template {template!r} must use only the fields {{a}}, {{op}} and {{b}}: {exc}"
        ) from exc


def generate_arithmetic_examples(
    num_examples: int,
    seed: int,
    operations: Sequence[Operation] = ("+",),
    min_operand: int = 1,
    max_operand: int = 20,
    allow_negative: bool = False,
    template: str = DEFAULT_TEMPLATE,
    exclude: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Generates arithmetic rows deterministically from ``seed``.

    For each row an operation is drawn uniformly from ``operations``, then ``a`` and ``b`` uniformly from
    ``[min_operand, max_operand]``. Without ``allow_negative``, a subtraction whose result would be negative
    is asked the other way round (``b - a``), so every answer is >= 0. A row whose prompt is in ``exclude``
    is drawn again.

    Args:
        num_examples: Number of rows to generate (>= 0).
        seed: Seed of a private ``random.Random``; the global RNG is never touched.
        operations: Operations to draw from, each one of ``"+"``, ``"-"``, ``"*"``.
        min_operand: Smallest operand.
        max_operand: Largest operand.
        allow_negative: Keep subtractions with a negative result.
        template: The question, a ``str.format`` template with the fields ``{a}``, ``{op}`` and ``{b}``.
        exclude: Prompts never to generate (the validation questions, when generating training rows).

    Returns:
        Rows like ``{"prompt": "What is 17 + 8? Answer with a number.", "answer": 25, "a": 17, "op": "+",
        "b": 8}``.

    Raises:
        ConfigError: On an invalid setting, naming it, or when ``exclude`` leaves (almost) no question.
    """
    if num_examples < 0:
        raise ConfigError(f"num_examples must be >= 0, got {num_examples}")
    _validate_settings(operations, min_operand, max_operand, template)
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    excluded = set(exclude)
    for _ in range(num_examples):
        for _attempt in range(_MAX_ATTEMPTS_PER_EXAMPLE):
            op = rng.choice(list(operations))
            a = rng.randint(min_operand, max_operand)
            b = rng.randint(min_operand, max_operand)
            if op == "-" and not allow_negative and a < b:
                a, b = b, a
            prompt = template.format(a=a, op=op, b=b)
            if prompt not in excluded:
                break
        else:
            raise ConfigError(
                f"every question drawn in {_MAX_ATTEMPTS_PER_EXAMPLE} attempts is excluded (held out): widen "
                f"[min_operand, max_operand] = [{min_operand}, {max_operand}] or lower num_val"
            )
        rows.append({"prompt": prompt, "answer": apply_operation(a, op, b), "a": a, "op": op, "b": b})
    return rows


class ArithmeticDataModule(GeneratedDataModule):
    """Arithmetic questions (see :func:`generate_arithmetic_examples`), generated in code, no files.

    Rows are ``{"prompt", "answer", "a", "op", "b"}``. Validation rows come from a separate seed
    (``seed + 1_000_003``), without repeats (so there can be fewer than ``num_val``), and are held out:
    training rows are drawn from the other questions only, so validation accuracy measures questions the
    policy was never trained on.

    Args:
        num_train: Training rows to generate.
        num_val: Validation rows to generate (before removing overlaps); 0 for none.
        batch_size: Prompts per RL iteration (B).
        val_batch_size: Prompts per validation batch; default ``batch_size``.
        seed: Seed of the training rows and of their order.
        operations: Operations to draw from (``"+"``, ``"-"``, ``"*"``).
        min_operand: Smallest operand.
        max_operand: Largest operand.
        allow_negative: Keep subtractions with a negative result.
        template: The question text, with the fields ``{a}``, ``{op}`` and ``{b}``.
        shuffle: Shuffle training prompts.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        num_train: int = 4096,
        num_val: int = 128,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        seed: int = 0,
        operations: list[Operation] | None = None,
        min_operand: int = 1,
        max_operand: int = 20,
        allow_negative: bool = False,
        template: str = DEFAULT_TEMPLATE,
        shuffle: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__(num_train, num_val, batch_size, val_batch_size, seed, shuffle, num_workers)
        self.operations: list[Operation] = list(operations) if operations is not None else ["+"]
        _validate_settings(self.operations, min_operand, max_operand, template)
        self.min_operand = min_operand
        self.max_operand = max_operand
        self.allow_negative = allow_negative
        self.template = template

    def _generate(self, num_examples: int, seed: int, exclude: Collection[str] = ()) -> list[Row]:
        return generate_arithmetic_examples(
            num_examples,
            seed,
            operations=self.operations,
            min_operand=self.min_operand,
            max_operand=self.max_operand,
            allow_negative=self.allow_negative,
            template=self.template,
            exclude=exclude,
        )

    @override
    def _setup_fit(self) -> None:
        if self.train_rows is not None:
            return
        # Validation first, so that training can avoid its questions: with a narrow operand range (``+`` on
        # [1, 20] has 400 questions) dropping overlaps from validation instead would leave almost nothing.
        val = self._generate(self.num_val, self.seed + VAL_SEED_OFFSET)
        kept: list[int] = []
        seen: set[str] = set()
        for i, row in enumerate(val):
            if row["prompt"] not in seen:  # each validation question counts once in the accuracy
                kept.append(i)
                seen.add(row["prompt"])
        self.val_rows = [val[i] for i in kept]
        self.val_sources = [f"arithmetic val row {i}" for i in kept]
        self.train_rows = self._generate(self.num_train, self.seed, exclude=seen)
        self.train_sources = [f"arithmetic train row {i}" for i in range(len(self.train_rows))]
