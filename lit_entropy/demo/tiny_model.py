"""The embedded model's architecture: a small randomly initialised causal LM built from a config (no hub)."""

from __future__ import annotations

from typing import Literal

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from lit_entropy.errors import ConfigError


def build_tiny_causal_lm(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    model_type: Literal["qwen2", "llama"] = "qwen2",
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> PreTrainedModel:
    """Build a small randomly initialised causal LM from a config, for tests and benchmarks (no hub).

    The global RNG is left untouched: initialisation runs on the CPU inside ``torch.random.fork_rng`` with
    only the CPU generator seeded, so the same ``seed`` gives the same weights on any machine.

    Args:
        vocab_size: Number of token ids V.
        hidden_size: Width of the residual stream; divisible by ``num_heads``.
        num_layers: Number of transformer blocks.
        num_heads: Attention heads (also the key/value heads: no grouped-query attention).
        intermediate_size: Width of the MLP; default ``4 * hidden_size``.
        max_position_embeddings: Longest sequence (prompt + completion) in tokens.
        model_type: Architecture: ``"qwen2"`` or ``"llama"``.
        pad_token_id: Id of the padding token.
        eos_token_id: Id of the end-of-sequence token.
        tie_word_embeddings: Share the input embedding with the output head.
        seed: Seed of the initialisation.

    Returns:
        The model in float32 on the CPU.

    Raises:
        ConfigError: Sizes that do not fit together, or an unknown ``model_type``.
    """
    from transformers import LlamaConfig, Qwen2Config

    configs = {"qwen2": Qwen2Config, "llama": LlamaConfig}
    if model_type not in configs:
        raise ConfigError(f"model_type must be one of {', '.join(map(repr, configs))}, got {model_type!r}")
    for name, value in (
        ("vocab_size", vocab_size),
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
    ):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if hidden_size % num_heads:
        raise ConfigError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    config = configs[model_type](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
        use_cache=True,
    )
    # The CPU device context overrides a surrounding default device (e.g. Lightning's init context), and
    # seeding only the CPU generator avoids torch.manual_seed's lazy reseeding of the CUDA generators.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.random.default_generator.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model
