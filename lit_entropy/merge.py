"""``lit-entropy merge-adapter ADAPTER_DIR --out DIR [--base PATH]``: a peft adapter merged into its base model.

The result is a plain model folder (``config.json``, weights, tokenizer) that loads with
``AutoModelForCausalLM.from_pretrained`` and as ``policy.path``, without peft. The merge is peft's
``merge_and_unload``; the base is the adapter's recorded ``base_model_name_or_path`` unless ``--base`` names it.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from lit_entropy.adapter import check_adapter_folder, same_base
from lit_entropy.errors import ConfigError, ModelLoadError, one_line

__all__ = ["main", "merge_adapter"]


def merge_adapter(adapter_dir: str, out: str, base: str | None = None) -> Path:
    """Merge the adapter of ``adapter_dir`` into its base and save the plain model (and tokenizer) to ``out``.

    The tokenizer is the adapter folder's when it has one (``fit`` saves it there), else the base's. The weights
    keep the base folder's dtype.

    Raises:
        ModelLoadError: the adapter folder is not one, the base is unknown or does not load, or the adapter does not
            fit it.
        ConfigError: ``out`` exists and is not an empty folder.
    """
    config = check_adapter_folder(adapter_dir, "ADAPTER_DIR")
    recorded = config.get("base_model_name_or_path")
    base = base or recorded
    if not base:
        raise ModelLoadError(
            f"ADAPTER_DIR: {adapter_dir}/adapter_config.json names no base_model_name_or_path; give --base PATH"
        )
    if not same_base(recorded, base):
        print(
            f"lit-entropy merge-adapter: warning: the adapter was trained on '{recorded}', merging it into '{base}'",
            file=sys.stderr,
        )
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty folder; choose a new folder")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lit_entropy.tokenizer import load_tokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"--base: could not load the base model '{base}': {one_line(error)}") from error
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(
            f"ADAPTER_DIR: could not load the adapter in '{adapter_dir}' onto '{base}': {one_line(error)}"
        ) from error
    has_tokenizer = (Path(adapter_dir) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter_dir if has_tokenizer else base)
    target.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-entropy merge-adapter",
        description="Merge a peft adapter folder (fit saves one to <log_dir>/adapter) into its base model and save "
        "a plain model folder (usable as policy.path, or by transformers without peft).",
    )
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="the peft adapter folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="the new model folder (must not exist)")
    parser.add_argument(
        "--base",
        metavar="PATH",
        default=None,
        help="the base model folder (default: the adapter's base_model_name_or_path)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``lit-entropy merge-adapter``; bad input raises `ConfigError` / `ModelLoadError`."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    print(merge_adapter(args.adapter_dir, args.out, args.base))


if __name__ == "__main__":
    main()
