"""`lit-entropy` / `python -m lit_entropy`: the LightningCLI (fit, validate, test, --print_config, overrides)."""

from __future__ import annotations

import copy
import os
import re
import sys
import warnings
from importlib.util import find_spec
from typing import Any, NoReturn

import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lit_entropy.config_files import check_config_files, config_paths
from lit_entropy.console import quiet_console
from lit_entropy.errors import LitEntropyError
from lit_entropy.predictions import PredictionWriter
from lit_entropy.progress import replace_default_progress_bar
from lit_entropy.resumable_checkpoint import ResumableCheckpoint
from lit_entropy.resume_overrides import ResumeLearningRate, check_resume_changes, command_line_model_keys
from lit_entropy.run_folder import (
    claim_logger_versions,
    describe,
    differences,
    find_last_checkpoint,
    lightning_resolves,
    read_checkpoint,
    short,
)
from lit_entropy.trl_names import trl_hint

DEFAULT_ROOT_DIR = "runs"
#: The subcommands that evaluate a trained policy; they log under ``<default_root_dir>/<subcommand>/``.
EVAL_SUBCOMMANDS = ("validate", "test", "predict")
_FOLDER_LOGGERS = ("CSVLogger", "TensorBoardLogger")
#: The commands `main` runs itself (plain argparse), listed under LightningCLI's subcommands in ``--help``.
OTHER_COMMANDS = (
    "other commands: "
    "report RUN_DIR... (summary table and figures of finished runs); "
    "merge-adapter ADAPTER_DIR --out DIR [--base PATH] (an adapter merged into its base, saved as a plain model "
    "folder); "
    "prepare-model NAME (a real model prepared offline into a model folder). "
    "Each has its own --help."
)
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


class LitEntropyArgumentParser(LightningArgumentParser):
    """Argument errors print as one line (``lit-entropy: error: ...``) and exit 2, without the usage text."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # nested parsers: the outer one reports
            super().error(message, ex)
        hint = trl_hint(message)
        print(f"lit-entropy: error: {one_line_error(message)}{'; ' + hint if hint else ''}", file=sys.stderr)
        raise SystemExit(2)


class LitEntropyCLI(LightningCLI):
    """LightningCLI over any LightningModule / LightningDataModule (``class_path`` form in YAML).

    The module configures its own optimizer (``model.init_args.learning_rate`` / ``optimizer``), so the CLI's
    automatic ``--optimizer`` is off. A logger is always set, so the config is saved next to the logs and never
    into the working directory; the default loggers follow ``trainer.default_root_dir``.
    """

    def __init__(self, args: Any = None, run: bool = True) -> None:
        self._resume_learning_rate: tuple[float, float] | None = None  # (new, the checkpoint's)
        self._argv: list[Any] = []  # the command line, set by parse_arguments
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
            parser_kwargs={"epilog": OTHER_COMMANDS},
            args=args,
            run=run,
        )

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # A periodic checkpoint and a last.ckpt by default, so that `fit --ckpt_path last` has something to
        # resume from after a crash (adapters only: small). `--checkpoint.every_n_train_steps` changes it.
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.every_n_train_steps": 50, "checkpoint.save_last": True})

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # kept to tell the command line's --model.* overrides from the config files' values (_parse_ckpt_path)
        self._argv = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:] if args is None else []
        super().parse_arguments(parser, args)

    def _dump(self, subcommand: str) -> dict[str, Any]:
        """The subcommand's config as ``config.yaml`` will hold it (plain YAML values, every default included)."""
        return yaml.safe_load(self._parser(subcommand).dump(self.config[subcommand], skip_none=False))

    @override
    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last``, check the checkpoint, and merge its hyperparameters under the overrides.

        Replaces Lightning's method of this name (``LightningCLI.__init__`` calls it right after parsing), which
        puts the checkpoint's ``model`` hyperparameters over the whole config, command line included, so that a
        resume silently dropped ``--model.init_args.learning_rate 1e-5``. Here the order is: config files, then the
        checkpoint's hyperparameters (as in Lightning: the module continues as it was trained), then every
        ``--model.*`` argument of the command line. Settings a resume cannot change are refused
        (`check_resume_changes`); every value that differs from the config or from the checkpoint is printed.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        if ckpt_path == "last" and subcommand == "fit":
            root = config.trainer.default_root_dir or DEFAULT_ROOT_DIR
            current = self._dump(subcommand)
            files = ", ".join(f"--config {path}" for path in config_paths(self._argv))
            name = f"this configuration ({files + '; ' if files else ''}{describe(current)})"
            ckpt_path = config.ckpt_path = find_last_checkpoint(root, current, name)
        if lightning_resolves(str(ckpt_path)):
            return
        hparams = read_checkpoint(ckpt_path, "--ckpt_path")
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        before_config = copy.deepcopy(self.config)
        before = self._dump(subcommand)
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(
                f"lit-entropy: the hyperparameters of {ckpt_path} do not parse as this model's\n"
            )
            raise
        merged = self._dump(subcommand)
        for key in command_line_model_keys(self._argv):
            if key in before_config[subcommand]:
                self.config[subcommand][key] = copy.deepcopy(before_config[subcommand][key])
        final = self._dump(subcommand)
        from_checkpoint = list(differences(final["model"], before["model"], "model"))
        overridden = list(differences(final["model"], merged["model"], "model"))
        self._resume_learning_rate = check_resume_changes(str(ckpt_path), before, merged, final, overridden)
        if from_checkpoint:
            changes = ", ".join(
                f"{key}={short(ours)} (config: {short(theirs)})" for key, ours, theirs in from_checkpoint
            )
            print(f"lit-entropy: the checkpoint's values replace the config's: {changes}", file=sys.stderr)
        if overridden:
            changes = ", ".join(
                f"{key}={short(ours)} (checkpoint: {short(theirs)})" for key, ours, theirs in overridden
            )
            print(
                f"lit-entropy: the command line's values replace the checkpoint's: {changes}", file=sys.stderr
            )

    @override
    def before_instantiate_classes(self) -> None:
        # As with Lightning's own default logger, --trainer.default_root_dir moves logs, config.yaml,
        # checkpoints and the adapter together.
        #
        # validate / test / predict never write into a training run's folder: their CSV and TensorBoard logs (and
        # config.yaml) go to `<default_root_dir>/<subcommand>/version_N` (TensorBoard's under `.../tensorboard/`),
        # whatever save_dir the config names (the config.yaml of a fit names the fit's folder).
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else []
        evaluating = self.subcommand in EVAL_SUBCOMMANDS
        for logger in loggers:
            init_args = getattr(logger, "init_args", None)
            if init_args is None:
                continue
            if evaluating and str(getattr(logger, "class_path", "")).endswith(_FOLDER_LOGGERS):
                init_args.save_dir = os.path.join(root or DEFAULT_ROOT_DIR, self.subcommand)
                if init_args.get("name", "lightning_logs") == "lightning_logs":
                    init_args.name = ""
            elif root and init_args.get("save_dir") == DEFAULT_ROOT_DIR:
                init_args.save_dir = root

    @override
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        # Lightning's default bar counts the dataloader's batches per epoch; RLProgressBar counts RL iterations
        given = config.get("callbacks")
        configured = [*(given if isinstance(given, list) else [given] if given else []), *callbacks]
        trainer = super()._instantiate_trainer(config, callbacks)
        replace_default_progress_bar(trainer, configured)
        return trainer

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # As LightningCLI's, except that `trainer.enable_checkpointing: false` drops the `checkpoint` group's
        # callback (Lightning refuses a ModelCheckpoint callback with checkpointing disabled).
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        keys = self._parser(self.subcommand).callback_keys
        if trainer_config.get("enable_checkpointing") is False:
            keys = [key for key in keys if key != "checkpoint"]
        trainer = self._instantiate_trainer(
            trainer_config, [self._get(self.config_init, key) for key in keys]
        )
        if self.subcommand == "predict" and not any(
            isinstance(c, BasePredictionWriter) for c in trainer.callbacks
        ):
            trainer.callbacks.append(PredictionWriter())  # <log_dir>/predictions.jsonl
        # This run's version folder exists from now on: a run started at the same moment takes the next one.
        claim_logger_versions(trainer.loggers)
        if self._resume_learning_rate is not None:
            trainer.callbacks.append(ResumeLearningRate(*self._resume_learning_rate))
        return trainer


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

    ``lit-entropy report RUN_DIR...`` goes to `lit_entropy.report`, ``lit-entropy merge-adapter ...`` to
    `lit_entropy.merge` and ``lit-entropy prepare-model ...`` to `lit_entropy.pretrained` (plain argparse, not
    LightningCLI subcommands; ``--help`` lists them under ``OTHER_COMMANDS``).
    """
    argv = sys.argv[1:] if args is None else args
    # Lightning 2.6 builds torch's deprecated LeafSpec on every training step under torch >= 2.10: a FutureWarning
    # about Lightning's code that a user of this command cannot act on.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    quiet_console()  # Lightning's litlogger tip, the resume's dirpath warning (lit_entropy.console)
    try:
        if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["report"]:
            from lit_entropy.report import main as report_main

            report_main(list(argv[1:]))
            return
        if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["merge-adapter"]:
            from lit_entropy.merge import main as merge_main

            merge_main(list(argv[1:]))
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
