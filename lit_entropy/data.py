"""LightningDataModules of prompts: local dataset files, and the base of tasks generated in code.

A batch is a plain list of row dicts (one per prompt); the module renders, tokenizes and samples G
completions per prompt itself. Every row carries ``"prompt"`` (and ``"answer"`` when configured) plus all of
its original columns, which reward functions receive as-is.

Values keep the types they were written with: JSON and JSON-lines files are read with Python's ``json``
module, row by row, so one ``NaN`` or ``2.5`` does not turn a column of integers into floats (``10`` stays
``10``, not ``10.0``), and a CSV column of integers with an empty cell keeps its integers. A prompt or answer
that is ``NaN`` is an error naming the file, row and field, like a missing one.

Characters: prompt characters that the policy's tokenizer can only encode as its unknown token (an emoji for a
character tokenizer) and control characters are reported in one warning per file or split, naming the first
row, the field and the characters (`warn_unknown_characters`, `control_characters`).
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import random
import re
import unicodedata
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import datasets
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler
from typing_extensions import override

from lit_entropy.errors import ConfigError, DataError, one_line

__all__ = [
    "PromptDataModule",
    "control_characters",
    "load_prompt_rows",
    "load_prompt_rows_with_sources",
    "warn_unknown_characters",
]

Row = dict[str, Any]
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Offset between the train and validation seeds of generated tasks: a large prime, so that the
# validation stream of seed s is not the training stream of some nearby seed s' = s + small.
VAL_SEED_OFFSET = 1_000_003
# A CSV cell holding an integer, as pandas would read it into an integer column.
_CSV_INT_RE = re.compile(r"\s*[+-]?[0-9]+\s*")
# Control characters that are ordinary in text.
_TEXT_CONTROLS = frozenset("\t\n\r")
# Every other C0/C1 control character (Cc) and lone surrogates (Cs), to scan many prompts fast.
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
# At most this many distinct characters are listed in a warning.
_MAX_LISTED_CHARACTERS = 10


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
    value = row[field_name]
    if isinstance(value, float) and math.isnan(value):
        raise DataError(
            f"{path} row {index}: field {field_name!r} ({argument}) is NaN; write a value or drop the row"
        )
    if _is_empty(value):
        raise DataError(f"{path} row {index}: empty field {field_name!r} ({argument})")


def _check_prompt_type(path: str, index: int, value: Any, field_name: str) -> None:
    # A prompt is one user turn (text) or a list of chat messages; anything else cannot be rendered.
    if isinstance(value, str):
        return
    if isinstance(value, list):
        for position, message in enumerate(value):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DataError(
                    f"{path} row {index}: field {field_name!r} (prompt_field) message {position} must be "
                    f"an object with 'role' and 'content', got {message!r:.80}"
                )
        return
    raise DataError(
        f"{path} row {index}: field {field_name!r} (prompt_field) must be text or a list of chat messages, "
        f"got {type(value).__name__} {value!r:.80}"
    )


def _json_error(err: json.JSONDecodeError) -> str:
    return f"line {err.lineno}, column {err.colno}: invalid JSON: {err.msg}"


def _json_lines(text: str) -> list[Any]:
    """One JSON object per non-blank line.

    Raises:
        ValueError: ``"line <n>: ..."``: a line that is not valid JSON or not an object.
    """
    records = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines breaks at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"line {number}: invalid JSON: {err.msg} (column {err.colno})") from err
        if not isinstance(value, dict):
            raise ValueError(f"line {number}: expected one JSON object per line, got {type(value).__name__}")
        records.append(value)
    return records


def _json_records(text: str, extension: str) -> list[Row]:
    """The rows of a ``.json`` / ``.jsonl`` file's text, each value as ``json`` parsed it.

    Accepted, as ``datasets`` does: one object per line (either extension), a list of objects, a list of
    strings (rows ``{"text": ...}``), and for ``.json`` one object (one row).

    Raises:
        ValueError: Where the text is malformed (line and column).
    """
    stripped = text.lstrip()
    if extension == ".json" or stripped.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            if stripped.startswith("["):
                raise ValueError(_json_error(err)) from err
            try:  # JSON lines written with the .json extension
                return _json_lines(text)
            except ValueError:
                raise ValueError(_json_error(err)) from err
        if isinstance(value, dict):
            return [value]
        if isinstance(value, list):
            if value and all(isinstance(item, str) for item in value):
                return [{"text": item} for item in value]
            for position, item in enumerate(value):
                if not isinstance(item, dict):
                    raise ValueError(
                        f"item {position} of the list: expected a JSON object, got {type(item).__name__}"
                    )
            return value
        raise ValueError(f"expected a list of objects or one object, got {type(value).__name__}")
    return _json_lines(text)


def _read_json_file(path: str, extension: str) -> list[Row]:
    try:
        with open(path, encoding="utf-8-sig") as file:  # -sig: a leading byte-order mark is not data
            text = file.read()
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: cannot be read as json: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from err
    try:
        records = _json_records(text, extension)
    except ValueError as err:
        raise DataError(f"{path}: cannot be read as json: {err}") from err
    # Every row gets every column of the file (None where a row lacks it), as a table would have it.
    columns = list(dict.fromkeys(key for record in records for key in record))
    return [{column: record.get(column) for column in columns} for record in records]


def _restore_csv_integers(path: str, rows: list[Row]) -> list[Row]:
    """Integer cells that pandas turned into floats (a column of integers with an empty cell) are ints again.

    The file is read once more with the ``csv`` module; a cell whose text is an integer and whose value came
    back as a float gets ``int(text)``. Files whose header or rows do not line up with ``rows`` (duplicate
    column names, which pandas renames) are left as they are.
    """
    try:
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.reader(file)
            header = next(reader, None)
            cells = [line for line in reader if line]  # pandas skips blank lines
    except (OSError, UnicodeDecodeError, csv.Error):
        return rows
    if header is None or len(cells) != len(rows) or len(set(header)) != len(header):
        return rows
    for row, line in zip(rows, cells):
        if set(row) != set(header) or len(line) != len(header):
            return rows
        for name, text in zip(header, line):
            if isinstance(row[name], float) and _CSV_INT_RE.fullmatch(text):
                row[name] = int(text)
    return rows


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
    if builder == "json":
        rows = _read_json_file(path, extension)
        if not rows:
            raise DataError(f"{path}: file has no rows")
        return rows
    try:
        dataset = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as exc:
        # datasets reports a header-only CSV this way.
        if "corresponds to no data" in str(exc):
            raise DataError(f"{path}: file has no rows") from exc
        raise DataError(
            f"{path}: cannot be read as {builder}: {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    if len(dataset) == 0:
        raise DataError(f"{path}: file has no rows")
    rows = dataset.to_list()
    return _restore_csv_integers(path, rows) if builder == "csv" else rows


def _prompt_texts(prompt: Any) -> Iterator[tuple[str, str]]:
    """``(where, text)`` of a prompt: ``("", text)``, or ``(" message i", content)`` for chat messages."""
    if isinstance(prompt, str):
        yield "", prompt
    elif isinstance(prompt, list):
        for position, message in enumerate(prompt):
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, str):
                yield f" message {position}", content


def _describe_characters(characters: Sequence[str]) -> str:
    listed = ", ".join(f"{char!r} (U+{ord(char):04X})" for char in characters[:_MAX_LISTED_CHARACTERS])
    more = len(characters) - _MAX_LISTED_CHARACTERS
    return listed + (f" and {more} more" if more > 0 else "")


def _first_rows_with(
    rows: Sequence[Mapping[str, Any]], sources: Sequence[str], field_name: str, is_flagged: Any
) -> tuple[int, str | None, list[str]]:
    """How many rows have a flagged character, where the first one is, and every flagged character (in order)."""
    count = 0
    first: str | None = None
    found: dict[str, None] = {}
    for row, source in zip(rows, sources):
        hit = False
        for where, text in _prompt_texts(row.get("prompt")):
            flagged = [char for char in dict.fromkeys(text) if is_flagged(char)]
            if flagged:
                hit = True
                found.update(dict.fromkeys(flagged))
                if first is None:
                    first = f"{source} field {field_name!r}{where}: {_describe_characters(flagged)}"
        count += hit
    return count, first, list(found)


def _is_control(char: str) -> bool:
    # Cc: C0/C1 controls (NUL, ESC, BEL, ...); Cs: lone surrogates, which no tokenizer can encode.
    return char not in _TEXT_CONTROLS and unicodedata.category(char) in ("Cc", "Cs")


def control_characters(
    rows: Sequence[Mapping[str, Any]], sources: Sequence[str], field_name: str = "prompt"
) -> str | None:
    """A one-line report of the control characters in the rows' prompts, or None when there are none.

    Tab, newline and carriage return are ordinary text; other C0/C1 controls and lone surrogates in a prompt are
    nearly always damage (a terminal escape, a NUL from a binary field) and reach the tokenizer as ``<unk>``
    or as byte tokens the model never saw.
    """
    texts = (text for row in rows for _, text in _prompt_texts(row.get("prompt")))
    if not any(_CONTROL_RE.search(text) for text in texts):
        return None
    count, first, characters = _first_rows_with(rows, sources, field_name, _is_control)
    if not count:
        return None
    return (
        f"{count} row(s) have control characters in their prompt, first {first}; all such characters: "
        f"{_describe_characters(characters)}; clean the data (they become unknown or odd tokens)"
    )


def warn_unknown_characters(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    sources: Sequence[str],
    field_name: str = "prompt",
) -> list[str]:
    """Warns once when prompts hold characters that ``tokenizer`` encodes as its unknown token.

    Each distinct character of the prompts (text, or the contents of chat messages) is tokenized on its own
    (``add_special_tokens=False``); one that yields ``tokenizer.unk_token_id`` is unknown, e.g. an emoji for
    the character tokenizer, whose vocabulary is printable ASCII and newline. Byte-level tokenizers (no unknown
    token, or none they ever produce) find nothing.

    Args:
        tokenizer: A Hugging Face tokenizer; one without ``unk_token_id`` is not checked.
        rows: Rows with a ``"prompt"``.
        sources: ``"<file> row <i>"`` of each row, for the message.
        field_name: The prompt's column in the files (``prompt_field``), for the message.

    Returns:
        The unknown characters, in order of appearance (empty when there are none).
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not rows:
        return []
    distinct: set[str] = set()
    for row in rows:
        for _, text in _prompt_texts(row.get("prompt")):
            distinct.update(text)
    characters = sorted(distinct)
    if not characters:
        return []
    encoded = tokenizer(characters, add_special_tokens=False)["input_ids"]
    unknown = {char for char, ids in zip(characters, encoded) if unk in ids}
    if not unknown:
        return []
    count, first, found = _first_rows_with(rows, sources, field_name, unknown.__contains__)
    token = getattr(tokenizer, "unk_token", None) or f"id {unk}"
    warnings.warn(
        f"lit_entropy: {count} row(s) have prompt characters the tokenizer encodes as its unknown token "
        f"{token!r}, first {first}; all such characters: {_describe_characters(found)}; the model sees "
        f"{token!r} for each: clean the data or use a tokenizer that knows them",
        UserWarning,
        stacklevel=2,
    )
    return found


def load_prompt_rows(
    files: str | Sequence[str], prompt_field: str = "prompt", answer_field: str | None = "answer"
) -> list[Row]:
    """Loads and normalises the rows of local dataset files.

    Args:
        files: Paths (or glob patterns) of ``.jsonl``/``.json``, ``.parquet`` or ``.csv`` files, read one at a
            time so errors can name the file: JSON with the ``json`` module (each value keeps its type),
            parquet and CSV with ``datasets.load_dataset`` (CSV integers that an empty cell made floats are
            made integers again).
        prompt_field: Column holding the prompt (text or a list of chat messages).
        answer_field: Column holding the reference answer, or ``None`` for tasks without one.

    Returns:
        Rows in file order, each ``{**original_columns, "prompt": row[prompt_field],
        "answer": row[answer_field]}`` (``"answer"`` only when ``answer_field`` is set).

    Raises:
        DataError: An unsupported extension, missing, empty or unparsable file (a JSON-lines file names its
            first malformed line), or a row whose prompt/answer field is missing, empty or NaN, or whose prompt
            is neither text nor a list of chat messages, naming the file, the row (counted from 0) and the field.

    Warns:
        UserWarning: Once per file whose prompts hold control characters (other than tab, newline and
            carriage return), naming the first such row and the characters.
    """
    return load_prompt_rows_with_sources(files, prompt_field, answer_field)[0]


def load_prompt_rows_with_sources(
    files: str | Sequence[str], prompt_field: str = "prompt", answer_field: str | None = "answer"
) -> tuple[list[Row], list[str]]:
    """As :func:`load_prompt_rows`, plus where each row comes from (``"<file> row <i>"``), for error messages."""
    rows: list[Row] = []
    sources: list[str] = []
    for pattern in _as_list(files):
        for path in _expand(pattern):
            start = len(rows)
            for index, row in enumerate(_read_file(path)):
                _check_field(path, index, row, prompt_field, "prompt_field")
                _check_prompt_type(path, index, row[prompt_field], prompt_field)
                normalised = dict(row)
                normalised["prompt"] = row[prompt_field]
                if answer_field is not None:
                    _check_field(path, index, row, answer_field, "answer_field")
                    normalised["answer"] = row[answer_field]
                rows.append(normalised)
                sources.append(f"{path} row {index}")
            report = control_characters(rows[start:], sources[start:], prompt_field)
            if report is not None:
                warnings.warn(f"lit_entropy: {path}: {report}", UserWarning, stacklevel=3)
    return rows, sources


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
