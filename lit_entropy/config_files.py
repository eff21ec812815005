"""The ``--config`` files of a command line, read before jsonargparse so that a problem names its file and line.

jsonargparse reports a missing file, a YAML error or a list where sections belong without the file's name, and
PyYAML keeps the last value of a key written twice without a word; `check_config_files` raises a one-line
`ConfigError` for each of these instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from lit_entropy.errors import ConfigError

_MERGE_TAG = "tag:yaml.org,2002:merge"


def config_paths(argv: Any) -> list[str]:
    """The files given as ``--config PATH`` / ``--config=PATH`` (any subcommand)."""
    if not isinstance(argv, (list, tuple)):
        return []
    paths = []
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            paths.append(str(argv[index + 1]))
        elif isinstance(arg, str) and arg.startswith("--config="):
            paths.append(arg.partition("=")[2])
    return paths


def _duplicate_keys(
    node: yaml.Node, path: str = "", seen: set[int] | None = None
) -> Iterator[tuple[str, int, int]]:
    """``(dotted key, line, line of the first one)`` for every key given twice in one mapping (lines 1-based).

    PyYAML keeps the last value of a duplicate key without a word. Merge keys (``<<: *base``) are not
    duplicates: overriding merged values is what they are for.
    """
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already walked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            dotted = f"{path}.{name}" if path else name
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                line = key_node.start_mark.line + 1
                if (key_node.tag, key_node.value) in first:
                    yield dotted, line, first[(key_node.tag, key_node.value)]
                else:
                    first[(key_node.tag, key_node.value)] = line
            yield from _duplicate_keys(value_node, dotted, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(item, f"{path}[{index}]", seen)


def check_config_files(argv: Any) -> None:
    """Reads every ``--config`` file before jsonargparse does, to name the file and the line of a problem.

    Raises:
        ConfigError: A config file that does not exist, is not a file, is empty, is not valid YAML (with the
            line and column), has a key twice in one mapping (with both lines), or does not hold a mapping of
            sections (``trainer``, ``model``, ``data``, ...).
    """
    for path in config_paths(argv):
        file = Path(path)
        if not file.exists() and any(char in path for char in ":{\n"):
            continue  # jsonargparse also accepts the config itself as a YAML string
        if not file.exists():
            raise ConfigError(f"--config {path}: file does not exist")
        if not file.is_file():
            raise ConfigError(f"--config {path}: not a file")
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--config {path}: cannot be read: {err}") from err
        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"--config {path}: invalid YAML{where}: {problem}") from err
        if content is None:
            raise ConfigError(f"--config {path}: file is empty")
        if not isinstance(content, dict):
            raise ConfigError(
                f"--config {path}: expected a mapping of sections (trainer, model, data, ...), "
                f"got {type(content).__name__}"
            )
        for key, line, first in _duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader)):
            raise ConfigError(
                f"--config {path}: duplicate key '{key}' at line {line} (first at line {first}); "
                "YAML would keep only the last value: remove one"
            )


__all__ = ["check_config_files", "config_paths"]
