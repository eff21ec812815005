"""`policy_weights`: the weights the trainer computes with, as one plain checkpoint (base + LoRA, dequantized).

A rollout engine that serves the policy (`lit_entropy.vllm_engine`) needs the weights of the model being
trained under the names of an ordinary Hugging Face checkpoint (``model.layers.0.self_attn.q_proj.weight``),
not peft's (``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` + ``lora_A`` / ``lora_B``).
Each LoRA-adapted linear layer is given as its merged weight ``W + (alpha / r) * B @ A`` (peft's
``get_delta_weight``); a 4-bit base weight is first dequantized, so the engine serves what the trainer's forward
computes (dequantize, then matmul). The trainer's own modules are never changed: merging happens in new tensors,
unlike peft's ``merge_adapter``, whose in-place merge into 4-bit weights would re-quantize and lose the adapter.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from lit_entropy.errors import ConfigError

__all__ = ["policy_weights"]


def _is_4bit(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and getattr(weight, "quant_state", None) is not None


def _dequantized(module: torch.nn.Module) -> Tensor:
    """A linear layer's weight ``[out, in]`` in a float dtype: dequantized when it is 4-bit."""
    if _is_4bit(module):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(module)
    return module.weight.detach()


def _merged(module: torch.nn.Module, name: str) -> Tensor:
    """The weight a peft LoRA layer computes with: its base weight plus each active adapter's delta."""
    if getattr(module, "merged", False):
        raise ConfigError(f"{name}: its adapter is merged into the base weight; unmerge it before sampling")
    weight = _dequantized(module.get_base_layer()).float()
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter, False):
            raise ConfigError(
                f"{name}: DoRA adapters (use_dora) cannot be given to the rollout engine as merged weights"
            )
        weight = weight + module.get_delta_weight(adapter).float()
    return weight


@torch.no_grad()
def policy_weights(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
    """``(checkpoint name, tensor)`` for every parameter of the causal LM ``model`` as the trainer computes with it.

    Args:
        model: the policy: a ``peft.PeftModel`` with LoRA adapters (4-bit base or not) or a plain model.
        dtype: cast every tensor to this dtype (the engine's); None keeps each tensor's own float dtype (merged
            and dequantized weights are fp32).

    Yields:
        Names as the base model's ``state_dict`` spells them without peft (``lm_head.weight``,
        ``model.layers.0.mlp.up_proj.weight``...), adapters merged in. A tied parameter (an output head sharing
        the embedding) comes under each of its names, as in a saved checkpoint: an engine that keeps the two
        apart gets both. Buffers are not given (rotary tables are recomputed).
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    skip_below: str | None = None
    for module_name, module in base.named_modules():
        if skip_below is not None and module_name.startswith(skip_below):
            continue
        skip_below = None
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, LoraLayer):
            skip_below = prefix  # base_layer, lora_A, lora_B, dropout: folded into the merged weight
            base_layer = module.get_base_layer()
            tensors = {"weight": _merged(module, module_name)}
            if getattr(base_layer, "bias", None) is not None:
                tensors["bias"] = base_layer.bias.detach()
        elif _is_4bit(module):
            tensors = {"weight": _dequantized(module)}
            if getattr(module, "bias", None) is not None:
                tensors["bias"] = module.bias.detach()
        else:  # tied parameters (an output head sharing the embedding) under each of their names
            tensors = {name: p.detach() for name, p in module.named_parameters(recurse=False)}
        for name, tensor in tensors.items():
            yield prefix + name, tensor if dtype is None else tensor.to(dtype)
