"""The embedded default policy: a tiny causal LM built from a config, warmed up on the countdown task.

Everything is generated offline: a character-level tokenizer, a random Qwen2-style model, and a short supervised
warm-up (`lit_entropy.demo.sft.SFT` in its own Lightning Trainer) on generated countdown solutions, so that RL
starts from a policy that can earn reward. The result is an ordinary model folder that `load_policy` loads like any
other; with ``cache_dir`` it is built once per configuration and reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lit_entropy.console import no_transformers_progress_bars, quiet_lightning
from lit_entropy.demo.char_tokenizer import build_char_tokenizer
from lit_entropy.demo.countdown import generate_countdown_examples
from lit_entropy.demo.sft import SFT, supervised_batch
from lit_entropy.demo.tiny_model import build_tiny_causal_lm
from lit_entropy.errors import ConfigError

log = logging.getLogger(__name__)
_FORMAT_VERSION = 1  # bump when the build below changes, so cached folders are rebuilt
#: Where the warmed-up model is built once per configuration and reused (the folder name hashes the settings).
DEFAULT_CACHE_DIR = "~/.cache/lit_entropy/embedded"


@dataclass
class EmbeddedModel:
    """A tiny model for the embedded countdown task (CPU, minutes).

    Args:
        hidden_size: model width.
        num_layers: transformer blocks.
        num_heads: attention heads.
        warmup_steps: supervised steps on generated solutions before RL (0 = a random policy).
        warmup_batch_size: examples per supervised step.
        warmup_lr: supervised AdamW learning rate.
        num_numbers: numbers per countdown prompt (match the data module's).
        max_number: largest number in a prompt (match the data module's).
        min_terms: fewest numbers in a generated solution.
        max_terms: most numbers in a generated solution.
        seed: seeds the weights and the warm-up data (the global RNG is left untouched).
        cache_dir: reuse (or create) the built folder under this directory (default ``~/.cache/lit_entropy/embedded``,
            so the folder an exported adapter names as its base stays there); None builds afresh in a temporary
            folder that nothing removes and that an adapter should not rely on.
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    warmup_steps: int = 600
    warmup_batch_size: int = 64
    warmup_lr: float = 3e-3
    num_numbers: int = 3
    max_number: int = 9
    min_terms: int = 2
    max_terms: int = 3
    seed: int = 0
    cache_dir: str | None = DEFAULT_CACHE_DIR

    def validate(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "warmup_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"policy.embedded.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"policy.embedded.hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}"
            )
        if self.warmup_steps < 0:
            raise ConfigError(f"policy.embedded.warmup_steps must be >= 0, got {self.warmup_steps}")

    def fingerprint(self) -> str:
        fields = dataclasses.asdict(self)
        fields.pop("cache_dir")
        fields["format_version"] = _FORMAT_VERSION
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# A checkpoint's hyper_parameters hold the Policy and so this dataclass; Lightning resumes with
# torch.load(weights_only=True), which refuses classes that are not allow-listed (`lit_entropy.module` lists
# the core's own).
torch.serialization.add_safe_globals([EmbeddedModel])


def prepare_embedded_model(config: EmbeddedModel) -> str:
    """Build (or reuse from ``config.cache_dir``) the warmed-up tiny model; returns its folder."""
    config.validate()
    if config.cache_dir is None:
        folder = tempfile.mkdtemp(prefix="lit_entropy_embedded_")
        _build(config, folder)
        return folder
    folder = os.path.join(os.path.expanduser(config.cache_dir), f"countdown-{config.fingerprint()}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        log.info("lit_entropy: reusing the embedded model in %s", folder)
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    # build next to the target and rename: a crash mid-build never leaves a folder that looks complete
    staging = tempfile.mkdtemp(prefix=".building-", dir=os.path.dirname(folder))
    try:
        _build(config, staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another process finished first; its folder is equivalent
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _build(config: EmbeddedModel, folder: str) -> None:
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=config.seed,
    )
    if config.warmup_steps > 0:
        rows = generate_countdown_examples(
            config.warmup_steps * config.warmup_batch_size,
            seed=config.seed + 7919,
            num_numbers=config.num_numbers,
            max_number=config.max_number,
            min_terms=config.min_terms,
            max_terms=config.max_terms,
        )
        batches = [
            supervised_batch(tokenizer, rows[i : i + config.warmup_batch_size])
            for i in range(0, len(rows), config.warmup_batch_size)
        ]
        log.info("lit_entropy: supervised warm-up of the embedded model (%d steps)", config.warmup_steps)
        # the warm-up must not move the caller's RNG streams (the RL run's seed decides its own sampling)
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            loader = DataLoader(batches, batch_size=None)  # each item is already a batch
            with quiet_lightning():  # an inner Trainer: no device banner or "`Trainer.fit` stopped" line
                trainer = Trainer(
                    accelerator="cpu",
                    devices=1,
                    max_steps=config.warmup_steps,
                    logger=False,
                    enable_checkpointing=False,
                    enable_model_summary=False,
                    enable_progress_bar=False,
                    num_sanity_val_steps=0,
                )
                trainer.fit(SFT(model, learning_rate=config.warmup_lr), train_dataloaders=loader)
    model.eval()
    with no_transformers_progress_bars():  # one shard of a tiny model
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
