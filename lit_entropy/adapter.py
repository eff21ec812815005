"""A saved peft adapter folder (what ``fit`` exports to ``<log_dir>/adapter``) as the starting policy.

``policy.adapter_path`` loads it onto the base model with peft's ``PeftModel.from_pretrained`` (trainable), so
``fit`` continues training it and ``validate`` / ``test`` / ``predict`` evaluate it. The adapter's own
``adapter_config.json`` decides its shape (rank, alpha, target modules): ``policy.lora`` values that differ are
reported and ignored.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lit_entropy.errors import ModelLoadError, one_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from lit_entropy.model import LoRA

__all__ = ["ADAPTER_CONFIG", "check_adapter_folder", "load_adapter", "same_base"]

log = logging.getLogger(__name__)

#: The file peft's ``save_pretrained`` writes into an adapter folder.
ADAPTER_CONFIG = "adapter_config.json"


def check_adapter_folder(path: str, field: str = "policy.adapter_path") -> dict[str, Any]:
    """The adapter folder's ``adapter_config.json`` as a dict.

    Raises:
        ModelLoadError: the folder is missing, is a file, has no ``adapter_config.json``, or it is not JSON.
    """
    folder = Path(path)
    if not folder.is_dir():
        what = "is a file" if folder.is_file() else "does not exist"
        raise ModelLoadError(
            f"{field}: adapter folder '{path}' {what}; expected a peft adapter folder (fit saves one to "
            "<log_dir>/adapter)"
        )
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ModelLoadError(
            f"{field}: '{path}' has no {ADAPTER_CONFIG}: is it a peft adapter folder (fit saves one to "
            "<log_dir>/adapter)?"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{field}: {config_file} is not readable JSON: {one_line(error)}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{field}: {config_file} holds no JSON object")
    return config


def same_base(adapter_base: str | None, base: str) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` names ``base``, loosely: the same folder, or the same last
    path part (a hub id ``org/Name`` and a local folder ``.../Name`` match; case is ignored)."""
    if not adapter_base:
        return True  # nothing recorded: nothing to compare
    if Path(adapter_base).expanduser().resolve() == Path(base).expanduser().resolve():
        return True
    return Path(adapter_base.rstrip("/")).name.lower() == Path(base.rstrip("/")).name.lower()


def _lora_differences(config: dict[str, Any], lora: LoRA) -> list[str]:
    ours = {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": lora.target_modules}
    theirs = {
        "r": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "dropout": config.get("lora_dropout"),
        "target_modules": config.get("target_modules"),
    }
    differences = []
    for key, value in ours.items():
        other = theirs[key]
        if isinstance(value, list) and isinstance(other, list):
            value, other = sorted(value), sorted(other)
        if key == "target_modules" and value == "all-linear":
            continue  # peft saves "all-linear" expanded to the module names it matched
        if other is not None and value != other:
            differences.append(f"{key}={theirs[key]!r} (policy.lora: {ours[key]!r})")
    return differences


def load_adapter(model: PreTrainedModel, adapter_path: str, base: str, lora: LoRA) -> Any:
    """``model`` with the saved adapter of ``adapter_path`` on it, its adapter weights trainable.

    Warns when the adapter was trained on another base than ``base`` and when ``lora`` differs from the
    adapter's own config (which is used).

    Raises:
        ModelLoadError: the folder is not a peft adapter folder, or its weights do not fit the model.
    """
    config = check_adapter_folder(adapter_path)
    recorded = config.get("base_model_name_or_path")
    if not same_base(recorded, base):
        log.warning(
            "lit_entropy: policy.adapter_path '%s' was trained on '%s', not on policy.path '%s'; loading it anyway",
            adapter_path,
            recorded,
            base,
        )
    differences = _lora_differences(config, lora)
    if differences:
        log.warning(
            "lit_entropy: the adapter in '%s' has its own LoRA settings, which are used instead of policy.lora: %s",
            adapter_path,
            ", ".join(differences),
        )
    from peft import PeftModel

    try:
        with warnings.catch_warnings():
            # peft calls transformers' deprecated `is_gradient_checkpointing` (not the user's to act on)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            return PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(
            f"policy.adapter_path: could not load the adapter in '{adapter_path}' onto '{base}': {one_line(error)}"
        ) from error
