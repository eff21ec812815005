"""Characters of prompts that the model will not see as written: control characters, and characters the
policy's tokenizer can only encode as its unknown token (an emoji for a character tokenizer).

Each is reported in one warning per file or split that names how many rows have one, the first such row, the
field and the characters (`control_characters`, `warn_unknown_characters`).
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["control_characters", "warn_unknown_characters"]

# Control characters that are ordinary in text.
_TEXT_CONTROLS = frozenset("\t\n\r")
# Every other C0/C1 control character (Cc) and lone surrogates (Cs), to scan many prompts fast.
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
# At most this many distinct characters are listed in a warning.
_MAX_LISTED_CHARACTERS = 10


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
