"""Exceptions that carry a user-facing message naming the field, file or value at fault."""

from __future__ import annotations

from typing import get_args


class LitEntropyError(Exception):
    """Base class: the CLI prints these as one line (``lit-entropy: error: ...``) and exits 2."""


class ConfigError(LitEntropyError, ValueError):
    """A configuration value is missing, malformed or inconsistent."""


class DataError(LitEntropyError, ValueError):
    """A dataset file or row cannot be used (missing file, empty file, missing field)."""


class ModelLoadError(LitEntropyError, FileNotFoundError):
    """A model or tokenizer folder is missing or unusable."""


def one_line(error: BaseException | str) -> str:
    """``error``'s message with every run of whitespace (newlines included) collapsed to one space.

    Library messages (transformers, datasets) span lines; the CLI prints each error as one line.
    """
    return " ".join(str(error).split())


def check_choice(name: str, value: object, choices: object) -> None:
    """Raise ConfigError naming ``name`` when ``value`` is not one of the ``Literal`` ``choices``."""
    allowed = get_args(choices)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
