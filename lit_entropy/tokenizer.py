"""Loading a tokenizer from a local folder without changing a custom tokenizer's ids."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lit_entropy.errors import ModelLoadError, one_line

log = logging.getLogger(__name__)

# Class names under which a plain `tokenizers`-backed tokenizer is saved. transformers >= 5 writes
# "TokenizersBackend"; older versions wrote "PreTrainedTokenizerFast". Either must be loaded as exactly that
# class, never as the class AutoTokenizer infers from config.json's model_type.
_PLAIN_FAST_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})

# Any of these in a folder means some tokenizer was saved there.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _read_tokenizer_class(folder: Path) -> str | None:
    """Return ``tokenizer_class`` from ``folder/tokenizer_config.json``, or None when absent."""
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"tokenizer config '{config_file}' is not readable JSON: {err}") from err
    if not isinstance(config, dict):
        raise ModelLoadError(f"tokenizer config '{config_file}' must hold a JSON object")
    tokenizer_class = config.get("tokenizer_class")
    return tokenizer_class if isinstance(tokenizer_class, str) else None


def load_tokenizer(
    path: str, trust_remote_code: bool = False, gguf_file: str | None = None
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder, padding on the left.

    A folder whose ``tokenizer_config.json`` names ``PreTrainedTokenizerFast`` (or ``TokenizersBackend``),
    or names no class while ``tokenizer.json`` exists, is loaded as exactly that class: ``AutoTokenizer``
    would pick the class of ``config.json``'s ``model_type`` (e.g. a Qwen2 tokenizer) and silently change
    a custom tokenizer's ids. Anything else goes through ``AutoTokenizer``.

    Args:
        path: Local folder with the tokenizer files.
        trust_remote_code: Passed to ``AutoTokenizer`` for tokenizers that ship their own code.
        gguf_file: Name of a GGUF file in ``path`` whose embedded tokenizer to load instead of tokenizer files.

    Returns:
        The tokenizer with ``padding_side="left"`` (generation appends on the right) and a pad token; a
        tokenizer without one pads with its EOS token.

    Raises:
        ModelLoadError: The folder is missing, holds no tokenizer files, cannot be loaded, or the tokenizer
            has neither a pad nor an EOS token.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"tokenizer folder '{path}' does not exist")
    if gguf_file is not None:
        if not (folder / gguf_file).is_file():
            raise ModelLoadError(f"GGUF file '{folder / gguf_file}' does not exist")
    elif not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"tokenizer folder '{path}' has no tokenizer files "
            f"(expected one of {', '.join(_TOKENIZER_FILES)})"
        )

    tokenizer_class = _read_tokenizer_class(folder)
    plain_fast = tokenizer_class in _PLAIN_FAST_CLASSES or (
        tokenizer_class is None and (folder / "tokenizer.json").is_file()
    )
    try:
        if gguf_file is not None:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
        elif plain_fast:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"could not load the tokenizer in '{path}': {one_line(err)}") from err

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer in '{path}' has no pad or eos token; add one of them")
        # Padding positions are masked out everywhere, so reusing EOS as pad changes no result.
        log.info(
            "tokenizer in '%s' has no pad token; padding with its eos token %r", path, tokenizer.eos_token
        )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer
