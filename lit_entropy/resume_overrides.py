"""What a resume (``fit --ckpt_path ...``) takes from the command line over the checkpoint's hyperparameters.

The CLI merges config files, then the checkpoint's ``model`` hyperparameters, then every ``--model.*`` argument of
the command line (`command_line_model_keys`). Some of those arguments cannot change a resumed run: the checkpoint's
trainable weights and generator states fix them, and `check_resume_changes` refuses them. A changed learning rate
is allowed for the module's own AdamW, and `ResumeLearningRate` puts it into the restored optimizer.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lit_entropy.errors import ConfigError
from lit_entropy.run_folder import short

# What a resume cannot change, and why: the checkpoint's trainable weights and generator states fix them.
_FIXED = {
    "model.init_args.policy.lora": "the checkpoint's LoRA weights have the shapes and places of the old setting",
    "model.init_args.policy.embedded": "the checkpoint's weights were trained on the base model the old one builds",
    "model.init_args.seed": "the mini-batch shuffling generator is restored from the checkpoint, so it has no effect",
}


def command_line_model_keys(argv: list[Any]) -> list[str]:
    """The ``model`` keys the command line sets, in the config's spelling (``model.init_args.learning_rate``)."""
    keys = []
    for arg in argv:
        if not isinstance(arg, str) or not arg.startswith("--model"):
            continue
        key = arg[2:].split("=", 1)[0].rstrip("+")
        if key == "model":
            keys.append(key)  # the whole module given at once (a class name, a YAML/JSON string or file)
        elif key.startswith("model."):
            rest = key[len("model.") :]
            if rest.split(".", 1)[0] not in ("class_path", "init_args", "dict_kwargs"):
                rest = f"init_args.{rest}"  # jsonargparse's short form --model.learning_rate
            keys.append(f"model.{rest}")
    return keys


def fixed_on_resume(key: str) -> str | None:
    """Why a resume cannot change the config key ``key``, or None when it can."""
    if key == "model.init_args.policy.embedded.cache_dir":
        return None  # where the built model is cached, not what it is
    for prefix, why in _FIXED.items():
        if key == prefix or key.startswith(f"{prefix}.") or key.startswith(f"{prefix}["):
            return why
    return None


def check_resume_changes(
    ckpt_path: str,
    before: dict[str, Any],
    merged: dict[str, Any],
    final: dict[str, Any],
    overridden: list[tuple[str, Any, Any]],
) -> tuple[float, float] | None:
    """Refuse what a resume cannot change; return ``(new, the checkpoint's)`` learning rate when it changes.

    Args:
        ckpt_path: the checkpoint, for the message.
        before, merged, final: the config (as ``config.yaml`` holds it) before the checkpoint's hyperparameters,
            with them, and with the command line's ``--model.*`` values put back over them.
        overridden: ``(key, value, the checkpoint's value)`` of every command-line value that replaced the
            checkpoint's.

    Returns:
        The learning rates for `ResumeLearningRate` when the module's own AdamW gets a new rate, else None.

    Raises:
        ConfigError: The checkpoint is of another module class, or the command line changes a fixed setting
            (`fixed_on_resume`), or the learning rate under an ``lr_scheduler`` whose restored state would keep
            scaling the old one.
    """
    if merged["model"].get("class_path") != before["model"].get("class_path"):
        raise ConfigError(
            f"--ckpt_path {ckpt_path}: the checkpoint is of {merged['model'].get('class_path')}, "
            f"the config's model is {before['model'].get('class_path')}"
        )
    fixed = [(key, ours, theirs, why) for key, ours, theirs in overridden if (why := fixed_on_resume(key))]
    init_args = final["model"].get("init_args") or {}
    rate = [change for change in overridden if change[0] == "model.init_args.learning_rate"]
    if rate and init_args.get("optimizer") is None and init_args.get("lr_scheduler") is not None:
        key, ours, theirs = rate[0]
        fixed.append(
            (key, ours, theirs, "the lr_scheduler's restored state keeps scaling the checkpoint's rate")
        )
    if fixed:
        refused = "; ".join(
            f"{key} ({short(theirs)} in the checkpoint, {short(ours)} here: {why})"
            for key, ours, theirs, why in fixed
        )
        raise ConfigError(
            f"--ckpt_path {ckpt_path}: a resume cannot change {refused}; drop the override, or start a new run "
            "without --ckpt_path"
        )
    if rate and init_args.get("optimizer") is None:
        _, ours, theirs = rate[0]
        return float(ours), float(theirs)
    return None


class ResumeLearningRate(Callback):
    """Puts a learning rate changed on resume into the optimizer, after Lightning restored the old one.

    Lightning restores the optimizer's state, ``param_groups`` (and so ``lr``) included, after
    ``configure_optimizers`` built it with the module's new ``learning_rate``; ``on_train_start`` comes after that.
    Used only for the module's own AdamW without an ``lr_scheduler`` (a changed rate is refused with one).
    """

    def __init__(self, learning_rate: float, checkpoint_rate: float) -> None:
        self.learning_rate = learning_rate
        self.checkpoint_rate = checkpoint_rate

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.learning_rate
                if "initial_lr" in group:
                    group["initial_lr"] = self.learning_rate
        print(
            f"lit-entropy: learning rate {self.learning_rate:g} (the checkpoint's optimizer had "
            f"{self.checkpoint_rate:g})",
            file=sys.stderr,
        )


__all__ = ["ResumeLearningRate", "check_resume_changes", "command_line_model_keys", "fixed_on_resume"]
