"""Prompt files: reading local dataset files into row dicts, and checking each row's prompt and answer.

Values keep the types they were written with: JSON and JSON-lines files are read with Python's ``json``
module, row by row, so one ``NaN`` or ``2.5`` does not turn a column of integers into floats (``10`` stays
``10``, not ``10.0``), and a CSV column of integers with an empty cell keeps its integers. A prompt or answer
that is ``NaN`` is an error naming the file, row and field, like a missing one. Control characters in a file's
prompts are reported in one warning per file (`lit_entropy.prompt_characters`).
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import datasets

from lit_entropy.errors import DataError, one_line
from lit_entropy.prompt_characters import control_characters

__all__ = ["Row", "load_prompt_rows", "load_prompt_rows_with_sources"]

Row = dict[str, Any]
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# A CSV cell holding an integer, as pandas would read it into an integer column.
_CSV_INT_RE = re.compile(r"\s*[+-]?[0-9]+\s*")


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


#: Columns that commonly hold the prompt or the reference answer in public datasets (TRL, verl, GSM8K, MATH).
_LIKELY_COLUMNS = {
    "prompt_field": ("prompt", "question", "problem", "query", "input", "messages"),
    "answer_field": ("answer", "ground_truth", "solution", "target", "label", "reward_model"),
}


def _column_hint(row: Row, argument: str) -> str:
    """``; the rows have columns [...]`` plus, when one of them looks right, the setting to use."""
    columns = sorted(row)
    hint = f"; the rows have columns {columns}"
    likely = [name for name in _LIKELY_COLUMNS.get(argument, ()) if name in row]
    if likely:
        hint += f": set data.init_args.{argument}: {likely[0]}"
    return hint


def _check_field(path: str, index: int, row: Row, field_name: str, argument: str) -> None:
    if field_name not in row:
        raise DataError(
            f"{path} row {index}: missing field {field_name!r} ({argument}){_column_hint(row, argument)}"
        )
    if row[field_name] is None:
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


def _read_saved_dataset(path: str) -> list[Row]:
    """The rows of a folder written by ``datasets.Dataset.save_to_disk`` (one split)."""
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        splits = sorted(
            name for name in os.listdir(path) if os.path.isfile(os.path.join(path, name, "state.json"))
        )
        raise DataError(
            f"{path}: a DatasetDict saved with save_to_disk; name one split's folder instead "
            f"({', '.join(os.path.join(path, name) for name in splits) or 'no split folder found'})"
        )
    try:
        dataset = datasets.load_from_disk(path)
    except Exception as exc:  # a damaged folder: missing arrow files, bad state.json
        raise DataError(
            f"{path}: cannot be read as a saved dataset (save_to_disk): {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    if len(dataset) == 0:
        raise DataError(f"{path}: the saved dataset has no rows")
    return dataset.to_list()


def _read_file(path: str) -> list[Row]:
    if os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "state.json"))
        or os.path.isfile(os.path.join(path, "dataset_dict.json"))
    ):
        return _read_saved_dataset(path)
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


def load_prompt_rows(
    files: str | Sequence[str], prompt_field: str = "prompt", answer_field: str | None = "answer"
) -> list[Row]:
    """Loads and normalises the rows of local dataset files.

    Args:
        files: Paths (or glob patterns) of ``.jsonl``/``.json``, ``.parquet`` or ``.csv`` files, or of folders
            written by ``datasets.Dataset.save_to_disk`` (one split's folder), read one at a time so errors can
            name the file: JSON with the ``json`` module (each value keeps its type), parquet and CSV with
            ``datasets.load_dataset`` (CSV integers that an empty cell made floats are made integers again),
            saved datasets with ``datasets.load_from_disk``.
        prompt_field: Column holding the prompt (text or a list of chat messages).
        answer_field: Column holding the reference answer, or ``None`` for tasks without one.

    Returns:
        Rows in file order, each ``{**original_columns, "prompt": row[prompt_field],
        "answer": row[answer_field]}`` (``"answer"`` only when ``answer_field`` is set).

    Raises:
        DataError: An unsupported extension, missing, empty or unparsable file (a JSON-lines file names its
            first malformed line), a ``DatasetDict`` folder (name a split's folder), or a row whose prompt/answer
            field is missing (listing the row's columns and, when one looks right, the setting to use), empty or
            NaN, or whose prompt is neither text nor a list of chat messages, naming the file, the row (counted
            from 0) and the field.

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
