"""What the ``lit-entropy`` command leaves off the console: third-party lines a user cannot act on.

Each one is silenced at its source and no wider: a logging filter or a ``warnings`` filter matching that one
message, or a library's own verbosity switch around our own call. Every other warning and info line stays.

- `quiet_console` (installed by `lit_entropy.cli.main`): Lightning's "💡 Tip: ... litlogger" advertisement, and
  ModelCheckpoint's "The dirpath has changed from ..." warning, which every resume would print, since a resumed
  run writes into a new version folder on purpose (its checkpoints are in the old one, read from there).
- `quiet_lightning`: Lightning's info lines (device banner, "`Trainer.fit` stopped") of an inner Trainer of ours,
  such as the embedded model's supervised warm-up; its warnings stay.
- `no_transformers_progress_bars`: transformers' "Writing model shards" / "Loading weights" bars around a save
  or load of a model small enough to take no time.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# the loggers behind lightning's rank_zero_info (Lightning points lightning_utilities' at the first)
_LIGHTNING_INFO_LOGGERS = ("lightning.pytorch", "lightning.fabric")
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropMessages(logging.Filter):
    """Drops the records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_LITLOGGER_TIP = _DropMessages("💡 Tip: For seamless cloud logging")


def quiet_console() -> None:
    """The command's filters (idempotent): Lightning's litlogger tip and the resume's dirpath warning."""
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _LITLOGGER_TIP not in logger.filters:
            logger.addFilter(_LITLOGGER_TIP)
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from .* won't be reloaded")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's info lines off (its warnings stay) for the body: an inner Trainer's banner and end line."""
    loggers = [logging.getLogger(name) for name in _LIGHTNING_INFO_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def no_transformers_progress_bars() -> Iterator[None]:
    """transformers' progress bars off for the body (as they were after it)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


__all__ = ["no_transformers_progress_bars", "quiet_console", "quiet_lightning"]
