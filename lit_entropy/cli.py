"""`lit-entropy` / `python -m lit_entropy`: the LightningCLI (fit, validate, test, --print_config, overrides)."""

from __future__ import annotations

import re
import sys
import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import Any, NoReturn

import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lit_entropy.errors import ConfigError, LitEntropyError

DEFAULT_ROOT_DIR = "runs"
# Lines of jsonargparse's nested Union / class_path report that carry no information of their own.
_NOISE = re.compile(
    r"^(- )?(Parser key|Does not validate|Subtypes:|Errors:|Problem with given class_path|"
    r"Expected a <class 'NoneType'>|Given value)"
)


def default_loggers(save_dir: str = DEFAULT_ROOT_DIR) -> list[dict[str, Any]]:
    """CSV always (the report tools read it); TensorBoard too when it is installed."""
    loggers: list[dict[str, Any]] = [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": save_dir}}
    ]
    if find_spec("tensorboard") is not None or find_spec("tensorboardX") is not None:
        loggers.append(
            {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": save_dir, "name": "tensorboard"},
            }
        )
    return loggers


# PyYAML's position marks inside jsonargparse's "Problems parsing config" report.
_YAML_MARK = re.compile(r'\s*in "[^"]*", line (\d+), column (\d+)')


def one_line_error(message: str) -> str:
    """jsonargparse's nested report of a bad argument as one line: ``<parser keys>: <innermost reason>``."""
    if message.startswith("Problems parsing config"):  # a YAML syntax error: keep every part and its position
        collapsed = _YAML_MARK.sub(r" (line \1, column \2)", message)
        return ": ".join(line.strip() for line in collapsed.splitlines() if line.strip())
    keys = re.findall(r'Parser key "([^"]+)"', message)
    reasons = [
        line.strip() for line in message.splitlines() if line.strip() and not _NOISE.match(line.strip())
    ]
    reason = reasons[0] if reasons else message.strip().splitlines()[0]
    reason = re.sub(r'^(Parser key "[^"]+":\s*)+', "", reason)  # the keys are already in front
    return f"{'.'.join(keys)}: {reason}" if keys else reason


def _config_paths(argv: Any) -> list[str]:
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


def check_config_files(argv: Any) -> None:
    """Reads every ``--config`` file before jsonargparse does, to name the file and the line of a problem.

    Raises:
        ConfigError: A config file that does not exist, is not a file, is empty, is not valid YAML (with the
            line and column), or does not hold a mapping of sections (``trainer``, ``model``, ``data``, ...).
    """
    for path in _config_paths(argv):
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


class LitEntropyArgumentParser(LightningArgumentParser):
    """Argument errors print as one line (``lit-entropy: error: ...``) and exit 2, without the usage text."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # nested parsers: the outer one reports
            super().error(message, ex)
        print(f"lit-entropy: error: {one_line_error(message)}", file=sys.stderr)
        raise SystemExit(2)


class LitEntropyCLI(LightningCLI):
    """LightningCLI over any LightningModule / LightningDataModule (``class_path`` form in YAML).

    The module configures its own optimizer (``model.init_args.learning_rate`` / ``optimizer``), so the CLI's
    automatic ``--optimizer`` is off. A logger is always set, so the config is saved next to the logs and never
    into the working directory; the default loggers follow ``trainer.default_root_dir``.
    """

    def __init__(self, args: Any = None, run: bool = True) -> None:
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            trainer_defaults={"default_root_dir": DEFAULT_ROOT_DIR, "logger": default_loggers()},
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_class=LitEntropyArgumentParser,
            args=args,
            run=run,
        )

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # A periodic checkpoint and a last.ckpt by default, so that `fit --ckpt_path last` has something to
        # resume from after a crash (adapters only: small). `--checkpoint.every_n_train_steps` changes it.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.every_n_train_steps": 50, "checkpoint.save_last": True})

    @override
    def before_instantiate_classes(self) -> None:
        # As with Lightning's own default logger, --trainer.default_root_dir moves logs, config.yaml,
        # checkpoints and the adapter together.
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else []
        for logger in loggers:
            init_args = getattr(logger, "init_args", None)
            if root and init_args is not None and init_args.get("save_dir") == DEFAULT_ROOT_DIR:
                init_args.save_dir = root
        if self.subcommand == "fit" and config.get("ckpt_path") == "last":
            config.ckpt_path = find_last_checkpoint(root or DEFAULT_ROOT_DIR)


def find_last_checkpoint(root: str) -> str:
    """The newest ``last*.ckpt`` under ``root`` (any logger version), or ``"last"`` when there is none.

    Lightning resolves ``--ckpt_path last`` only in the checkpoint folder of the *new* run's logger version,
    which is empty, and would start from scratch; the previous run's ``last.ckpt`` (periodic, or written on
    SIGTERM) is in an older version folder.
    """
    candidates = [path for path in Path(root).glob("**/last*.ckpt")]
    if not candidates:
        print(f"lit-entropy: no last*.ckpt under {root}: starting from scratch", file=sys.stderr)
        return "last"
    newest = max(candidates, key=lambda path: path.stat().st_mtime)
    print(f"lit-entropy: resuming from {newest}", file=sys.stderr)
    return str(newest)


def _project_error(error: BaseException) -> LitEntropyError | None:
    """The project's own error behind ``error``: jsonargparse re-raises constructor errors as ValueError."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, LitEntropyError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def main(args: Any = None) -> None:
    """Entry point; errors of the project's own checks print as one line (``lit-entropy: error: ...``).

    ``lit-entropy report RUN_DIR...`` goes to `lit_entropy.report` and ``lit-entropy prepare-model ...`` to
    `lit_entropy.pretrained` (plain argparse, not LightningCLI subcommands).
    """
    argv = sys.argv[1:] if args is None else args
    # Lightning 2.6 builds torch's deprecated LeafSpec on every training step under torch >= 2.10: a FutureWarning
    # about Lightning's code that a user of this command cannot act on.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    try:
        if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["report"]:
            from lit_entropy.report import main as report_main

            report_main(list(argv[1:]))
            return
        if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["prepare-model"]:
            from lit_entropy.pretrained import main as prepare_main

            prepare_main(list(argv[1:]))
            return
        check_config_files(argv)
        LitEntropyCLI(args=args)
    except Exception as error:
        project_error = _project_error(error)
        if project_error is None:
            raise
        print(f"lit-entropy: error: {project_error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
