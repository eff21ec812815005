"""`lit-entropy` / `python -m lit_entropy`: the LightningCLI (fit, validate, test, --print_config, overrides)."""

from __future__ import annotations

import sys
from importlib.util import find_spec
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lit_entropy.errors import LitEntropyError


def default_loggers(save_dir: str = "runs") -> list[dict[str, Any]]:
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


class LitEntropyCLI(LightningCLI):
    """LightningCLI over any LightningModule / LightningDataModule (``class_path`` form in YAML).

    The module configures its own optimizer (``model.init_args.learning_rate`` / ``optimizer``), so the CLI's
    automatic ``--optimizer`` is off. A logger is always set, so the config is saved next to the logs and never
    into the working directory.
    """

    def __init__(self, args: Any = None, run: bool = True) -> None:
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            trainer_defaults={"default_root_dir": "runs", "logger": default_loggers()},
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )


def main(args: Any = None) -> None:
    """Entry point; errors of the project's own checks print as one line (``lit-entropy: error: ...``)."""
    try:
        LitEntropyCLI(args=args)
    except LitEntropyError as error:
        print(f"lit-entropy: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
