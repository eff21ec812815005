"""`CountdownDataModule`: the embedded Countdown task's prompts, generated in code from a seed (no files)."""

from __future__ import annotations

from typing_extensions import override

from lit_entropy.data import VAL_SEED_OFFSET, GeneratedDataModule
from lit_entropy.demo.countdown import generate_countdown_examples
from lit_entropy.prompt_files import Row


class CountdownDataModule(GeneratedDataModule):
    """The embedded Countdown task (see :mod:`lit_entropy.demo.countdown`), generated in code, no files.

    Rows are ``{"prompt", "answer", "numbers", "solution"}``. Validation rows come from a separate seed
    (``seed + 1_000_003``) and any whose prompt also occurs in training are dropped, so the validation set
    can be slightly smaller than ``num_val``.

    Args:
        num_train: Training rows to generate.
        num_val: Validation rows to generate (before removing overlaps); 0 for none.
        batch_size: Prompts per RL iteration (B).
        val_batch_size: Prompts per validation batch; default ``batch_size``.
        seed: Seed of the training rows and of their order.
        num_numbers: Numbers per prompt.
        max_number: Largest number.
        min_terms: Fewest numbers in the generating expression.
        max_terms: Most numbers in the generating expression.
        shuffle: Shuffle training prompts.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        num_train: int = 4096,
        num_val: int = 64,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        seed: int = 0,
        num_numbers: int = 3,
        max_number: int = 9,
        min_terms: int = 2,
        max_terms: int = 3,
        shuffle: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__(num_train, num_val, batch_size, val_batch_size, seed, shuffle, num_workers)
        self.num_numbers = num_numbers
        self.max_number = max_number
        self.min_terms = min_terms
        self.max_terms = max_terms

    def _generate(self, num_examples: int, seed: int) -> list[Row]:
        return generate_countdown_examples(
            num_examples,
            seed,
            num_numbers=self.num_numbers,
            max_number=self.max_number,
            min_terms=self.min_terms,
            max_terms=self.max_terms,
        )

    @override
    def _setup_fit(self) -> None:
        if self.train_rows is not None:
            return
        self.train_rows = self._generate(self.num_train, self.seed)
        self.train_sources = [f"countdown train row {i}" for i in range(len(self.train_rows))]
        train_prompts = {row["prompt"] for row in self.train_rows}
        val = self._generate(self.num_val, self.seed + VAL_SEED_OFFSET)
        kept = [i for i, row in enumerate(val) if row["prompt"] not in train_prompts]
        self.val_rows = [val[i] for i in kept]
        self.val_sources = [f"countdown val row {i}" for i in kept]
