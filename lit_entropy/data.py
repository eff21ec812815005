"""LightningDataModules of prompts: local dataset files, and the embedded Countdown task.

A batch is a plain list of row dicts (one per prompt); the module renders, tokenizes and samples G
completions per prompt itself, so nothing here knows about tokenizers. Every row carries ``"prompt"`` (and
``"answer"`` when configured) plus all of its original columns, which reward functions receive as-is.
"""

from __future__ import annotations

import glob
import math
import os
import random
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import datasets
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from typing_extensions import override

from lit_entropy.countdown import generate_countdown_examples
from lit_entropy.errors import ConfigError, DataError

__all__ = ["CountdownDataModule", "PromptDataModule", "load_prompt_rows"]

Row = dict[str, Any]
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Offset between the train and validation seeds of generated tasks: a large prime, so that the
# validation stream of seed s is not the training stream of some nearby seed s' = s + small.
_VAL_SEED_OFFSET = 1_000_003


def collate_rows(batch: list[Row]) -> list[Row]:
    """Returns the batch unchanged: rows stay a list of dicts.

    Module-level (not a lambda) so DataLoader worker processes can pickle it.
    """
    return batch


def _as_list(files: str | Sequence[str] | None) -> list[str]:
    if files is None:
        return []
    return [files] if isinstance(files, str) else list(files)


def _expand(path: str) -> list[str]:
    if os.path.exists(path) or not glob.has_magic(path):
        return [path]
    matches = sorted(glob.glob(path))
    if not matches:
        raise DataError(f"{path}: no file matches this pattern")
    return matches


def _is_empty(value: Any) -> bool:
    # 0 and False are legitimate answers; only absent, blank text and empty message lists are missing.
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, (list, tuple, dict)) and len(value) == 0


def _check_field(path: str, index: int, row: Row, field_name: str, argument: str) -> None:
    if field_name not in row or row[field_name] is None:
        raise DataError(f"{path} row {index}: missing field {field_name!r} ({argument})")
    if _is_empty(row[field_name]):
        raise DataError(f"{path} row {index}: empty field {field_name!r} ({argument})")


def _read_file(path: str) -> list[Row]:
    extension = os.path.splitext(path)[1].lower()
    if extension not in _FORMATS:
        raise DataError(f"{path}: unsupported extension {extension!r}; use one of {sorted(_FORMATS)}")
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty")
    builder = _FORMATS[extension]
    try:
        dataset = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as exc:
        # datasets reports a header-only CSV or a JSON file without records this way.
        if "corresponds to no data" in str(exc):
            raise DataError(f"{path}: file has no rows") from exc
        raise DataError(f"{path}: cannot be read as {builder}: {type(exc).__name__}: {exc}") from exc
    if len(dataset) == 0:
        raise DataError(f"{path}: file has no rows")
    return dataset.to_list()


def load_prompt_rows(
    files: str | Sequence[str], prompt_field: str = "prompt", answer_field: str | None = "answer"
) -> list[Row]:
    """Loads and normalises the rows of local dataset files.

    Args:
        files: Paths (or glob patterns) of ``.jsonl``/``.json``, ``.parquet`` or ``.csv`` files, read with
            ``datasets.load_dataset`` one at a time so errors can name the file.
        prompt_field: Column holding the prompt (text or a list of chat messages).
        answer_field: Column holding the reference answer, or ``None`` for tasks without one.

    Returns:
        Rows in file order, each ``{**original_columns, "prompt": row[prompt_field],
        "answer": row[answer_field]}`` (``"answer"`` only when ``answer_field`` is set).

    Raises:
        DataError: An unsupported extension, missing, empty or unparsable file, or a row whose prompt/answer
            field is missing or empty, naming the file, the row (counted from 0) and the field.
    """
    rows: list[Row] = []
    for pattern in _as_list(files):
        for path in _expand(pattern):
            for index, row in enumerate(_read_file(path)):
                _check_field(path, index, row, prompt_field, "prompt_field")
                normalised = dict(row)
                normalised["prompt"] = row[prompt_field]
                if answer_field is not None:
                    _check_field(path, index, row, answer_field, "answer_field")
                    normalised["answer"] = row[answer_field]
                rows.append(normalised)
    return rows


class PromptDataModule(LightningDataModule):
    """Prompts (and reference answers) from local dataset files.

    Args:
        train_files: Training file(s); see :func:`load_prompt_rows` for formats.
        val_files: Validation file(s); take precedence over ``val_fraction``.
        test_files: Test file(s).
        prompt_field: Column holding the prompt.
        answer_field: Column holding the answer, or ``None``.
        batch_size: Prompts per RL iteration (B); the module samples G completions for each.
        val_batch_size: Prompts per validation/test batch; default ``batch_size``.
        val_fraction: Without ``val_files``, the fraction of training rows held out for validation (chosen by
            a shuffle seeded with ``seed``), in ``[0, 1)``.
        max_val_examples: Keep at most this many validation rows.
        shuffle: Shuffle training prompts (with a ``torch.Generator`` seeded by ``seed``).
        seed: Seed of the held-out split and of the training order.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        test_files: str | list[str] | None = None,
        prompt_field: str = "prompt",
        answer_field: str | None = "answer",
        batch_size: int = 8,
        val_batch_size: int | None = None,
        val_fraction: float = 0.0,
        max_val_examples: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ConfigError(f"val_batch_size must be >= 1 or None, got {val_batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_val_examples is not None and max_val_examples < 0:
            raise ConfigError(f"max_val_examples must be >= 0 or None, got {max_val_examples}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        if not prompt_field:
            raise ConfigError("prompt_field must be a non-empty column name")
        if answer_field == "":
            raise ConfigError("answer_field must be a column name or None, got ''")
        if val_files is not None and val_fraction > 0:
            warnings.warn(
                f"val_files is set, so val_fraction={val_fraction} is ignored", UserWarning, stacklevel=2
            )
        self.train_files = train_files
        self.val_files = val_files
        self.test_files = test_files
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.val_fraction = val_fraction
        self.max_val_examples = max_val_examples
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.train_rows: list[Row] | None = None
        self.val_rows: list[Row] | None = None
        self.test_rows: list[Row] | None = None

    def _load(self, files: str | Sequence[str]) -> list[Row]:
        return load_prompt_rows(files, self.prompt_field, self.answer_field)

    def _split_off_validation(self, rows: list[Row]) -> tuple[list[Row], list[Row]]:
        """Holds out ``val_fraction`` of ``rows``; both parts keep the file order."""
        num_val = max(1, math.floor(len(rows) * self.val_fraction))
        if num_val >= len(rows):
            raise DataError(
                f"val_fraction={self.val_fraction} of {len(rows)} rows in {self.train_files} leaves no "
                "training rows"
            )
        order = list(range(len(rows)))
        random.Random(self.seed).shuffle(order)
        val_indices = set(order[len(rows) - num_val :])
        train = [row for i, row in enumerate(rows) if i not in val_indices]
        val = [row for i, row in enumerate(rows) if i in val_indices]
        return train, val

    def _setup_fit(self) -> None:
        if self.train_rows is not None:
            return
        if self.train_files is None:
            raise ConfigError("train_files is not set: give the training prompt file(s)")
        rows = self._load(self.train_files)
        val: list[Row] = []
        if self.val_files is not None:
            val = self._load(self.val_files)
        elif self.val_fraction > 0:
            rows, val = self._split_off_validation(rows)
        self.train_rows = rows
        self.val_rows = val if self.max_val_examples is None else val[: self.max_val_examples]

    def _setup_validate(self) -> None:
        if self.val_rows is not None:
            return
        if self.val_files is None and self.val_fraction > 0 and self.train_files is not None:
            # The held-out rows are defined by the training files, so load both together.
            self._setup_fit()
            return
        val = self._load(self.val_files) if self.val_files is not None else []
        self.val_rows = val if self.max_val_examples is None else val[: self.max_val_examples]

    def _setup_test(self) -> None:
        if self.test_rows is None and self.test_files is not None:
            self.test_rows = self._load(self.test_files)

    @override
    def setup(self, stage: Literal["fit", "validate", "test", "predict"] | str | None = None) -> None:
        """Loads the files the stage needs (``None``: all configured); repeated calls do not reload."""
        if stage in ("fit", None):
            self._setup_fit()
        if stage in ("validate", None):
            self._setup_validate()
        if stage in ("test", None):
            self._setup_test()

    @override
    def train_dataloader(self) -> DataLoader[Row]:
        """Batches of exactly ``batch_size`` row dicts (the last incomplete batch is dropped)."""
        self._setup_fit()
        assert self.train_rows is not None
        if len(self.train_rows) < self.batch_size:
            raise DataError(
                f"{len(self.train_rows)} training rows (from {self._describe_train()}) are fewer than "
                f"batch_size={self.batch_size}"
            )
        generator = torch.Generator().manual_seed(self.seed) if self.shuffle else None
        return DataLoader(
            self.train_rows,  # type: ignore[arg-type]  # a list is a valid map-style dataset
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            generator=generator,
            drop_last=True,
            collate_fn=collate_rows,
            num_workers=self.num_workers,
        )

    def _describe_train(self) -> str:
        return str(self.train_files)

    def _eval_loader(self, rows: list[Row]) -> DataLoader[Row]:
        return DataLoader(
            rows,  # type: ignore[arg-type]
            batch_size=self.val_batch_size or self.batch_size,
            shuffle=False,
            drop_last=False,
            collate_fn=collate_rows,
            num_workers=self.num_workers,
        )

    @override
    def val_dataloader(self) -> DataLoader[Row] | list[DataLoader[Row]]:
        """Validation batches in order, or ``[]`` when there is no validation split."""
        self._setup_validate()
        if not self.val_rows:
            return []
        return self._eval_loader(self.val_rows)

    @override
    def test_dataloader(self) -> DataLoader[Row]:
        """Test batches in order."""
        self._setup_test()
        if self.test_rows is None:
            raise ConfigError("test_files is not set: give the test prompt file(s) to run `test`")
        return self._eval_loader(self.test_rows)


class CountdownDataModule(PromptDataModule):
    """The embedded Countdown task (see :mod:`lit_entropy.countdown`), generated in code, no files.

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
        super().__init__(
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            shuffle=shuffle,
            seed=seed,
            num_workers=num_workers,
        )
        if num_train < 1:
            raise ConfigError(f"num_train must be >= 1, got {num_train}")
        if num_val < 0:
            raise ConfigError(f"num_val must be >= 0, got {num_val}")
        self.num_train = num_train
        self.num_val = num_val
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
        train_prompts = {row["prompt"] for row in self.train_rows}
        val = self._generate(self.num_val, self.seed + _VAL_SEED_OFFSET)
        self.val_rows = [row for row in val if row["prompt"] not in train_prompts]

    @override
    def _setup_validate(self) -> None:
        # Removing train/val overlap needs the training rows, which are cheap to generate.
        self._setup_fit()

    @override
    def _describe_train(self) -> str:
        return f"num_train={self.num_train}"

    @override
    def test_dataloader(self) -> DataLoader[Row]:
        raise ConfigError("CountdownDataModule has no test split: evaluate with `validate` (num_val rows)")
