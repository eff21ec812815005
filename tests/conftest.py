"""Shared fixtures: a character tokenizer and a tiny random Qwen2 model saved to disk, all offline; the
``benchmarks/evidence.py`` script loaded as a module."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# Set before transformers/datasets are imported by any test module: they read these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The Rust tokenizers pool would warn (and may deadlock) after DataLoader workers fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from lit_entropy.demo import build_char_tokenizer, build_tiny_causal_lm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

#: Sizes of the model in ``tiny_model_dir`` (about 36k parameters, so every test can afford it).
TINY_HIDDEN_SIZE = 32
TINY_NUM_LAYERS = 2
TINY_NUM_HEADS = 4


@pytest.fixture(scope="session")
def char_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer (99 ids: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, then characters).

    Session-scoped and shared: tests must not mutate it.
    """
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, char_tokenizer: PreTrainedTokenizerFast) -> Path:
    """A folder with a tiny random Qwen2 causal LM (seed 0) and the character tokenizer.

    Saved with ``save_pretrained`` so tests exercise the real loading code. The config says
    ``model_type: qwen2`` on purpose: loaders must still give back the character tokenizer's ids.
    Session-scoped and shared: tests must not write into it.
    """
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    model = build_tiny_causal_lm(
        vocab_size=len(char_tokenizer),
        hidden_size=TINY_HIDDEN_SIZE,
        num_layers=TINY_NUM_LAYERS,
        num_heads=TINY_NUM_HEADS,
        model_type="qwen2",
        pad_token_id=char_tokenizer.pad_token_id,
        eos_token_id=char_tokenizer.eos_token_id,
        seed=0,
    )
    model.save_pretrained(folder)
    # A fresh instance: the shared one carries the padding state of its last call into tokenizer.json.
    build_char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def evidence():
    """``benchmarks/evidence.py`` (a script, not a package module) imported for its functions."""
    spec = importlib.util.spec_from_file_location("evidence", ROOT / "benchmarks" / "evidence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["evidence"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["evidence"]
