"""Run folders under ``trainer.default_root_dir``: claiming a new one, and finding the checkpoint to resume.

Every CLI run writes into a version folder of its own (``runs/lightning_logs/version_N``): its ``config.yaml``
(Lightning's ``SaveConfigCallback``), ``metrics.csv``, ``checkpoints/`` and ``adapter/``. Two things go wrong
with Lightning's defaults when several runs share a root:

- a logger picks ``version_N`` by listing the folders and taking the next number, and creates it only when it first
  writes, so two runs started together get the same folder. `claim_logger_versions` creates the folder with
  ``os.mkdir`` (which fails when it exists) and moves on to the next number until one is its own;
- ``--ckpt_path last`` must mean the newest checkpoint *of this experiment*, not of whichever recipe ran last in
  the same root. `find_last_checkpoint` compares the ``config.yaml`` of the run each ``last*.ckpt`` belongs to with
  this run's configuration (`IDENTITY_KEYS`).

`read_checkpoint` turns every unusable checkpoint path (missing, empty, truncated, a folder) into one line naming
the file.
"""

from __future__ import annotations

import os
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lit_entropy.errors import ConfigError, one_line

#: The parts of a saved config that make two runs the same experiment: the module and its settings, the data, and
#: the callbacks (the entropy regularizers are callbacks: the grpo and entropy_bonus recipes differ only there).
#: The rest of ``trainer`` (``max_steps``, loggers, devices, ...), ``checkpoint``, ``ckpt_path`` and
#: ``seed_everything`` may differ on a resume.
IDENTITY_KEYS = ("model", "data", "trainer.callbacks")
#: Lightning's ``ModelCheckpoint`` and lit_entropy's SIGTERM checkpoint (``last.ckpt``, ``last-v1.ckpt``, ...).
LAST_PATTERN = "last*.ckpt"
#: The file Lightning's ``SaveConfigCallback`` writes into the run's log folder.
CONFIG_NAME = "config.yaml"
_VERSION = re.compile(r"version_(\d+)")
_MAX_LISTED = 5


# ---------------------------------------------------------------------------------------------- new run folders


def claim_version(roots: Sequence[str | os.PathLike[str]]) -> int:
    """The next free ``N`` for which this call created ``<root>/version_N`` under every root.

    ``N`` starts above every ``version_*`` folder already there (as Lightning's loggers count). Each folder is
    created with ``os.mkdir``, which fails if another process created it first; then the folders this call made for
    that ``N`` (still empty) are removed and ``N + 1`` is tried.
    """
    folders = [Path(root) for root in roots]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    taken = [
        int(match.group(1))
        for folder in folders
        for entry in folder.iterdir()
        if (match := _VERSION.fullmatch(entry.name)) is not None
    ]
    number = max(taken, default=-1) + 1
    while True:
        made: list[Path] = []
        try:
            for folder in folders:
                target = folder / f"version_{number}"
                os.mkdir(target)
                made.append(target)
            return number
        except FileExistsError:
            for target in made:
                target.rmdir()
            number += 1


def _is_rank_zero() -> bool:
    """Only the first process of a run claims folders (the others use the ones it broadcasts)."""
    node_rank = os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or "0"
    return rank_zero_only.rank == 0 and node_rank == "0"


def claim_logger_versions(loggers: Sequence[Logger]) -> int | None:
    """Give every CSV and TensorBoard logger without an explicit ``version`` one freshly claimed version number.

    Returns the number (``None`` when no logger needed one, on ranks other than 0, and for remote ``save_dir``).
    The number goes to the logger's ``_version``, not to the config, so the saved ``config.yaml`` keeps
    ``version: null`` and can start or resume another run.
    """
    versioned = [
        logger
        for logger in loggers
        if isinstance(logger, (CSVLogger, TensorBoardLogger)) and getattr(logger, "_version", 0) is None
    ]
    if not versioned or not _is_rank_zero():
        return None
    roots = list(
        dict.fromkeys(os.path.expanduser(os.path.expandvars(logger.root_dir)) for logger in versioned)
    )
    if any("://" in root for root in roots):
        return None  # object stores have no atomic mkdir; the loggers count as before
    number = claim_version(roots)
    for logger in versioned:
        logger._version = number  # the loggers' own attribute, read by their `version`; no public setter
    return number


# ---------------------------------------------------------------------------------------------- checkpoints


def lightning_resolves(path: str) -> bool:
    """Values of ``ckpt_path`` that Lightning resolves itself, and remote paths."""
    return path in ("last", "best", "hpc") or path.startswith("registry") or "://" in path


def _load(file: Path) -> Any:
    """``torch.load`` as Lightning resumes (``weights_only``), tensors memory-mapped when the format allows it."""
    if zipfile.is_zipfile(file):
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    with file.open("rb") as handle:
        head = handle.read(4)
    if head == b"PK\x03\x04":  # torch.save's zip format, without the directory at its end
        raise ValueError("the zip archive ends before its central directory: the file was cut short")
    if not head.startswith(b"\x80"):  # a pickle (protocol 2+) opens every legacy torch.save file
        raise ValueError("neither torch.save's zip format nor its older pickle format")
    return torch.load(file, map_location="cpu", weights_only=True)  # the legacy format, or not a checkpoint


def read_checkpoint(path: str | os.PathLike[str], what: str = "--ckpt_path") -> dict[str, Any]:
    """The checkpoint's ``hyper_parameters`` (``{}`` when it has none), after checking that it can be read.

    A sharded checkpoint (a folder with ``meta.pt``, FSDP2) is read through its ``meta.pt``. Tensors are
    memory-mapped, not read, so this is cheap for a large checkpoint.

    Raises:
        ConfigError: ``what`` and the path, with why it cannot be resumed from: missing, a folder that is not a
            sharded checkpoint, empty, or not readable by ``torch.load(weights_only=True)`` (truncated, another
            format).
    """
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"{what} {path}: file does not exist")
    if file.is_dir():
        meta = file / "meta.pt"
        if not meta.is_file():
            raise ConfigError(
                f"{what} {path}: is a folder, not a checkpoint file (nor a sharded checkpoint folder with meta.pt)"
            )
        file = meta
    size = file.stat().st_size
    if size == 0:
        raise ConfigError(f"{what} {path}: file is empty (0 bytes)")
    try:
        checkpoint = _load(file)
    except Exception as err:  # truncated zip, pickle errors, unknown globals, ...
        reason = one_line(err).split(". ", 1)[0]  # torch appends paragraphs of advice
        raise ConfigError(
            f"{what} {path}: cannot be read as a checkpoint ({size} bytes; truncated or not a checkpoint?): {reason}"
        ) from err
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"{what} {path}: not a Lightning checkpoint (holds a {type(checkpoint).__name__})")
    hparams = checkpoint.get("hyper_parameters") or {}
    return dict(hparams) if isinstance(hparams, Mapping) else {}


# ---------------------------------------------------------------------------------------------- comparing configs


def _section(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _normalise(dotted: str, value: Any) -> Any:
    if dotted == "trainer.callbacks":  # null, [], one callback or a list of them: the same thing when empty
        if value is None:
            return []
        if not isinstance(value, list):
            return [value]
    return value


def differences(ours: Any, theirs: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """``(dotted key, our value, their value)`` for every leaf that differs.

    A key that only one side has is skipped: that is a parameter one version of the code did not have yet (a
    saved config lists every parameter, defaults included).
    """
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        for key in ours:
            if key in theirs:
                yield from differences(ours[key], theirs[key], f"{path}.{key}" if path else str(key))
    elif isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        for index, (mine, other) in enumerate(zip(ours, theirs, strict=True)):
            yield from differences(mine, other, f"{path}[{index}]")
    elif ours != theirs:
        yield path, ours, theirs


def identity_differences(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """How the `IDENTITY_KEYS` of two full configs (as ``config.yaml`` holds them) differ."""
    found: list[tuple[str, Any, Any]] = []
    for dotted in IDENTITY_KEYS:
        mine = _normalise(dotted, _section(ours, dotted))
        other = _normalise(dotted, _section(theirs, dotted))
        found.extend(differences(mine, other, dotted))
    return found


def short(value: Any, limit: int = 60) -> str:
    """A value for a one-line message: callbacks by class name, everything else ``repr``'d and cut."""
    if value is None:
        return "null"
    if value == []:
        return "none"
    if isinstance(value, list) and all(isinstance(item, Mapping) and "class_path" in item for item in value):
        return "[" + ", ".join(str(item["class_path"]).rsplit(".", 1)[-1] for item in value) + "]"
    if isinstance(value, Mapping) and "class_path" in value:
        return str(value["class_path"])
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(config: Mapping[str, Any]) -> str:
    """``model X, data Y, callbacks [A, B]``: what a run is, in a few words."""
    model = _section(config, "model.class_path") or "none"
    data = _section(config, "data.class_path") or "none"
    callbacks = short(_normalise("trainer.callbacks", _section(config, "trainer.callbacks")))
    return f"model {model}, data {data}, callbacks {callbacks}"


# ---------------------------------------------------------------------------------------------- --ckpt_path last


def _saved_config(checkpoint: Path, root: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The ``config.yaml`` of the run a checkpoint belongs to: the nearest one in its folder or above, up to root."""
    root = root.resolve()
    folder = checkpoint.resolve().parent
    while True:
        candidate = folder / CONFIG_NAME
        if candidate.is_file():
            try:
                content = yaml.safe_load(candidate.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                return candidate, None
            return candidate, content if isinstance(content, dict) else None
        if folder == root or folder.parent == folder or not folder.is_relative_to(root):
            return None, None
        folder = folder.parent


def _modified(path: Path) -> float:
    meta = path / "meta.pt"
    return (meta if path.is_dir() and meta.exists() else path).stat().st_mtime


def _listed(items: list[str]) -> str:
    shown = "; ".join(items[:_MAX_LISTED])
    return shown + (f"; and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def find_last_checkpoint(
    root: str | os.PathLike[str], config: Mapping[str, Any] | None = None, name: str = "this configuration"
) -> str:
    """The newest readable ``last*.ckpt`` under ``root`` of a run whose saved config matches ``config``.

    Lightning resolves ``--ckpt_path last`` only in the checkpoint folder of the *new* run's logger version, which
    is empty; the previous run's ``last.ckpt`` (periodic, or written on SIGTERM) is in an older version folder.
    ``root`` is shared by every recipe run there, so with ``config`` (a full config as ``config.yaml`` holds it)
    only checkpoints of runs whose `IDENTITY_KEYS` match count. Without ``config`` every ``last*.ckpt`` counts.
    An unreadable newest checkpoint is skipped with a warning.

    Returns:
        The checkpoint's path, or ``"last"`` when there is no ``last*.ckpt`` under ``root`` at all (Lightning then
        starts from scratch).

    Raises:
        ConfigError: Checkpoints exist but none belongs to a matching run (naming ``name`` and the candidates), or
            every matching one is unreadable.
    """
    base = Path(root)
    candidates = sorted(base.glob(f"**/{LAST_PATTERN}"), key=_modified, reverse=True)
    if not candidates:
        print(f"lit-entropy: no {LAST_PATTERN} under {root}: starting from scratch", file=sys.stderr)
        return "last"
    matching: list[Path] = []
    others: list[str] = []
    for candidate in candidates:
        if config is None:
            matching.append(candidate)
            continue
        saved_path, saved = _saved_config(candidate, base)
        if saved is None:
            why = (
                "no config.yaml in its run folder" if saved_path is None else f"{saved_path} is not readable"
            )
            others.append(f"{candidate} ({why})")
            continue
        found = identity_differences(config, saved)
        if found:
            key, mine, theirs = found[0]
            more = f"; {len(found) - 1} more difference(s)" if len(found) > 1 else ""
            others.append(f"{candidate} ({key} is {short(theirs)} there, {short(mine)} here{more})")
        else:
            matching.append(candidate)
    unreadable: list[str] = []
    for candidate in matching:
        try:
            read_checkpoint(candidate, "checkpoint")
        except ConfigError as err:
            print(f"lit-entropy: warning: skipping unreadable {err}", file=sys.stderr)
            unreadable.append(str(candidate))
            continue
        print(f"lit-entropy: resuming from {candidate}", file=sys.stderr)
        return str(candidate)
    if unreadable:
        raise ConfigError(
            f"--ckpt_path last: every {LAST_PATTERN} of {name} under {root} is unreadable: {_listed(unreadable)}; "
            "pass a readable checkpoint as --ckpt_path PATH (e.g. a periodic epoch=E-step=S.ckpt)"
        )
    raise ConfigError(
        f"--ckpt_path last: no {LAST_PATTERN} under {root} belongs to a run of {name}; found {_listed(others)}; "
        "to resume one of them anyway pass it as --ckpt_path PATH, or drop --ckpt_path to start a new run"
    )
