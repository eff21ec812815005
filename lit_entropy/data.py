"""LightningDataModules of prompts: local dataset files, and the base of tasks generated in code.

A batch is a plain list of row dicts (one per prompt); the module renders, tokenizes and samples G
completions per prompt itself. Every row carries ``"prompt"`` (and ``"answer"`` when configured) plus all of
its original columns, which reward functions receive as-is. The files are read by `lit_entropy.prompt_files`;
prompt characters the fitted module's tokenizer does not know are reported once per split
(`lit_entropy.prompt_characters`).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler
from typing_extensions import override

from lit_entropy.errors import ConfigError, DataError
from lit_entropy.prompt_characters import warn_unknown_characters
from lit_entropy.prompt_files import Row, load_prompt_rows_with_sources

__all__ = [
    "VAL_SEED_OFFSET",
    "GeneratedDataModule",
    "PromptDataModule",
    "ResumableSampler",
    "collate_rows",
]

# Offset between the train and validation seeds of generated tasks: a large prime, so that the
# validation stream of seed s is not the training stream of some nearby seed s' = s + small.
VAL_SEED_OFFSET = 1_000_003


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` whose next pass can start part-way, where a resumed run left its epoch.

    The order of epoch ``e`` depends only on ``(seed, e)`` (``set_epoch``), so a run resumed mid-epoch rebuilds
    the same order and skips the rows it already trained on; ``len`` stays that of the whole epoch, so the
    epoch ends at the same batch index as the uninterrupted run's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skip = 0

    def skip_next(self, num_samples: int) -> None:
        """Leave out the first ``num_samples`` indices of the next pass only."""
        self._skip = max(0, int(num_samples))

    def __iter__(self):  # type: ignore[override]
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


def collate_rows(batch: list[Row]) -> list[Row]:
    """Returns the batch unchanged: rows stay a list of dicts.

    Module-level (not a lambda) so DataLoader worker processes can pickle it.
    """
    return batch


class PromptDataModule(LightningDataModule):
    """Prompts (and reference answers) from local dataset files.

    Args:
        train_files: Training file(s); see :func:`lit_entropy.prompt_files.load_prompt_rows` for formats.
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
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
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
        for name, files in (
            ("train_files", train_files),
            ("val_files", val_files),
            ("test_files", test_files),
        ):
            if files is not None and not (
                isinstance(files, str)
                or (isinstance(files, (list, tuple)) and all(isinstance(f, str) for f in files))
            ):
                raise ConfigError(
                    f"{name} must be a path or a list of paths, got {type(files).__name__} {files!r}"
                )
            if files is not None and not isinstance(files, str) and not files:
                raise ConfigError(f"{name} is an empty list: give at least one file, or null")
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
        # Where each row comes from ("<file> row <i>"), aligned with the rows: errors found later (a prompt
        # longer than the model's context, see `lit_entropy.preflight`) can name the file and row.
        self.train_sources: list[str] | None = None
        self.val_sources: list[str] | None = None
        self.test_sources: list[str] | None = None
        self._characters_checked: set[str] = set()

    def _load(self, files: str | Sequence[str]) -> tuple[list[Row], list[str]]:
        return load_prompt_rows_with_sources(files, self.prompt_field, self.answer_field)

    def _validation_split(self, rows: list[Row]) -> tuple[list[int], list[int]]:
        """Indices of the training rows and of the ``val_fraction`` held out, each in file order."""
        num_val = max(1, math.floor(len(rows) * self.val_fraction))
        if num_val >= len(rows):
            raise DataError(
                f"val_fraction={self.val_fraction} of {len(rows)} rows in {self.train_files} leaves no "
                "training rows"
            )
        order = list(range(len(rows)))
        random.Random(self.seed).shuffle(order)
        held_out = set(order[len(rows) - num_val :])
        return [i for i in range(len(rows)) if i not in held_out], sorted(held_out)

    def _setup_fit(self) -> None:
        if self.train_rows is not None:
            return
        if self.train_files is None:
            raise ConfigError("train_files is not set: give the training prompt file(s)")
        rows, sources = self._load(self.train_files)
        val: list[Row] = []
        val_sources: list[str] = []
        if self.val_files is not None:
            val, val_sources = self._load(self.val_files)
        elif self.val_fraction > 0:
            train_indices, val_indices = self._validation_split(rows)
            val, val_sources = [rows[i] for i in val_indices], [sources[i] for i in val_indices]
            rows, sources = [rows[i] for i in train_indices], [sources[i] for i in train_indices]
        self.train_rows, self.train_sources = rows, sources
        self._set_val(val, val_sources)

    def _set_val(self, rows: list[Row], sources: list[str]) -> None:
        keep = len(rows) if self.max_val_examples is None else self.max_val_examples
        self.val_rows, self.val_sources = rows[:keep], sources[:keep]

    def _setup_validate(self) -> None:
        if self.val_rows is not None:
            return
        if self.val_files is None and self.val_fraction > 0 and self.train_files is not None:
            # The held-out rows are defined by the training files, so load both together.
            self._setup_fit()
            return
        self._set_val(*(self._load(self.val_files) if self.val_files is not None else ([], [])))

    def _setup_test(self) -> None:
        if self.test_rows is None and self.test_files is not None:
            self.test_rows, self.test_sources = self._load(self.test_files)

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
        self._check_characters("train", self.train_rows, self.train_sources)
        trainer = getattr(self, "trainer", None)
        distributed = trainer is not None and trainer.world_size > 1
        # One sampler for one process and for several: each epoch's order is a function of (seed, epoch), and
        # each rank takes every world_size-th row of it (batch_size is per rank). Lightning leaves a
        # DistributedSampler in place (its own would always shuffle) and calls set_epoch every epoch.
        sampler = ResumableSampler(
            self.train_rows,  # type: ignore[arg-type]
            num_replicas=trainer.world_size if distributed else 1,
            rank=trainer.global_rank if distributed else 0,
            shuffle=self.shuffle,
            seed=self.seed,
            drop_last=True,
        )
        if trainer is not None:
            # A resumed run starts after the batches of this epoch that the checkpoint had already trained on
            # ("processed": a checkpoint written in on_train_batch_end has not yet marked its batch completed,
            # and Lightning does not run it again). A checkpoint at the end of an epoch skips nothing.
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if done >= len(sampler) // self.batch_size:
                done = 0
            sampler.skip_next(done * self.batch_size)
            if done:
                warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
        return DataLoader(
            self.train_rows,  # type: ignore[arg-type]  # a list is a valid map-style dataset
            batch_size=self.batch_size,
            sampler=sampler,
            # worker seeds are drawn from this generator, not from the global RNG that sampling uses
            generator=torch.Generator().manual_seed(self.seed),
            drop_last=True,
            collate_fn=collate_rows,
            num_workers=self.num_workers,
        )

    def _describe_train(self) -> str:
        return str(self.train_files)

    def _check_characters(self, split: str, rows: list[Row], sources: list[str] | None) -> None:
        """Once per split, warns about prompt characters the fitted module's tokenizer encodes as unknown.

        The tokenizer is the Trainer's module's ``tokenizer`` (`GRPO` loads it in ``configure_model``, before
        Lightning asks for dataloaders); without a Trainer or a tokenizer nothing is checked.
        """
        trainer = getattr(self, "trainer", None)
        if split in self._characters_checked or trainer is None or getattr(trainer, "global_rank", 0) != 0:
            return
        tokenizer = getattr(getattr(trainer, "lightning_module", None), "tokenizer", None)
        if tokenizer is None:
            return
        self._characters_checked.add(split)
        if sources is None or len(sources) != len(rows):
            sources = [f"{split} row {index}" for index in range(len(rows))]
        warn_unknown_characters(tokenizer, rows, sources, self.prompt_field)

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
        self._check_characters("val", self.val_rows, self.val_sources)
        return self._eval_loader(self.val_rows)

    @override
    def test_dataloader(self) -> DataLoader[Row]:
        """Test batches in order."""
        self._setup_test()
        if self.test_rows is None:
            raise ConfigError("test_files is not set: give the test prompt file(s) to run `test`")
        self._check_characters("test", self.test_rows, self.test_sources)
        return self._eval_loader(self.test_rows)

    @override
    def predict_dataloader(self) -> DataLoader[Row]:
        """The prompts `predict` completes, in order: the test split when ``test_files`` is set, else the
        validation split (``val_files`` / ``val_fraction``, or a generated task's ``num_val`` rows)."""
        if self.test_files is not None:
            return self.test_dataloader()
        self._setup_validate()
        if not self.val_rows:
            raise ConfigError(
                "predict has no prompts: set test_files, or val_files / val_fraction (it completes the test split, "
                "else the validation split)"
            )
        self._check_characters("val", self.val_rows, self.val_sources)
        return self._eval_loader(self.val_rows)


class GeneratedDataModule(PromptDataModule):
    """Base of the tasks whose prompts are generated in code from a seed (no files).

    Subclasses implement ``_setup_fit`` (filling ``train_rows`` / ``val_rows`` and their sources); validation
    needs the training rows too (to hold validation questions out of training), and there is no test split.

    Args:
        num_train: Training rows to generate (>= 1).
        num_val: Validation rows to generate (>= 0; 0 for none).
        batch_size: Prompts per RL iteration (B).
        val_batch_size: Prompts per validation batch; default ``batch_size``.
        seed: Seed of the rows and of their order.
        shuffle: Shuffle training prompts.
        num_workers: DataLoader worker processes.

    Raises:
        ConfigError: ``num_train < 1`` or ``num_val < 0``.
    """

    def __init__(
        self,
        num_train: int,
        num_val: int,
        batch_size: int,
        val_batch_size: int | None,
        seed: int,
        shuffle: bool,
        num_workers: int,
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

    @override
    def _setup_validate(self) -> None:
        # Holding validation questions out of training needs the training rows, which are cheap to generate.
        self._setup_fit()

    @override
    def _describe_train(self) -> str:
        return f"num_train={self.num_train}"

    @override
    def test_dataloader(self) -> DataLoader[Row]:
        raise ConfigError(f"{type(self).__name__} has no test split: evaluate with `validate` (num_val rows)")
