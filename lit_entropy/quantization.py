"""4-bit base weights (bitsandbytes nf4 / fp4) under LoRA, with one numerical path on every CPU.

On CPUs with AVX512-BF16, bitsandbytes' ``Linear4bit.forward`` repacks a layer's weight in place for a bf16
CPU kernel the first time it runs in eval mode without gradients (generation, old and reference log-probs).
That has three consequences for RL training, all measured on such a CPU:

- the repacked layer computes in bf16 whatever ``compute_dtype`` says, so the sampler's and the no-grad
  passes' logits differ from the training forward's (fp32 dequantization) by 2e-3 to 5e-3: the importance
  ratio of a fully on-policy update is no longer 1, and the "old" log-probs belong to another model;
- the layer stays repacked in training mode, where the packed kernel has no autograd support: a QLoRA update
  then fails ("a view of a leaf Variable that requires grad is being used in an in-place operation");
- the repack needs ``in_features`` to be a multiple of the quantization block (64), so narrower layers fail
  at once (``shape '[32, 0]' is invalid``).

:func:`keep_cpu_weights_unpacked` turns the repack off on every 4-bit layer, so a CPU without AVX512-BF16
and one with it run the same dequantize-then-matmul path, in ``compute_dtype``, in every phase of an RL
iteration. GPUs are unaffected (the repack only ever applies to CPU inputs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from lit_entropy.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

DType = Literal["float32", "bfloat16", "float16"]
QuantType = Literal["nf4", "fp4"]

# The per-layer flag bitsandbytes reads in Linear4bit.forward (set from the CPU's capability at construction).
_CPU_REPACK_FLAG = "support_avx512bf16_for_cpu"


@dataclass
class Quantization:
    """4-bit weights through transformers' ``BitsAndBytesConfig`` (needs ``lit-entropy[4bit]``).

    Attributes:
        quant_type: 4-bit data type: ``"nf4"`` (normal float) or ``"fp4"``.
        double_quant: Also quantize the per-block scales (saves about 0.4 bit per weight).
        compute_dtype: Dtype the 4-bit weights are dequantized to for matrix products.
    """

    quant_type: QuantType = "nf4"
    double_quant: bool = True
    compute_dtype: DType = "bfloat16"


def _drop_kernel_hub_warning(record: logging.LogRecord) -> bool:
    return "kernels-community" not in record.getMessage()


# bitsandbytes warns at import (peft imports it whenever it is installed), on AVX512-BF16 CPUs, that it cannot
# fetch a faster kernel for the repacked layout from the Hugging Face hub; that layout is never used here
# (keep_cpu_weights_unpacked), so the warning is dropped before anything can import bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_kernel_hub_warning)


def bits_and_bytes_config(quantization: Quantization) -> BitsAndBytesConfig:
    """Build transformers' ``BitsAndBytesConfig``; bitsandbytes is imported only here.

    Raises:
        ConfigError: bitsandbytes is not installed (the message names the extra to install).
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ConfigError("policy.quantization needs bitsandbytes: pip install 'lit-entropy[4bit]'") from err
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype),
    )


def keep_cpu_weights_unpacked(model: torch.nn.Module) -> int:
    """Turn off bitsandbytes' AVX512-BF16 weight repacking on every 4-bit layer of ``model``.

    See the module docstring for why. Call it before the first forward pass, as :func:`lit_entropy.model.
    load_policy` does.

    Args:
        model: Any module tree; layers other than ``bitsandbytes.nn.Linear4bit`` are left alone.

    Returns:
        The number of 4-bit layers seen.

    Raises:
        ModelLoadError: A layer was already repacked (a no-grad eval-mode forward ran before this call).
            bitsandbytes' inverse conversion does not restore the original scales exactly (without double
            quantization it leaves them transposed), so such a model is refused rather than trained on
            silently changed weights.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        count += 1
        if is_cpu_repacked(module):
            raise ModelLoadError(
                f"4-bit layer '{name}' was already repacked by bitsandbytes for its AVX512-BF16 CPU kernel (an "
                "eval-mode forward without gradients ran before lit_entropy saw the model), and bitsandbytes "
                "cannot convert it back exactly; load the model through lit_entropy.model.load_policy"
            )
        setattr(module, _CPU_REPACK_FLAG, False)
    return count


def is_cpu_repacked(module: torch.nn.Module) -> bool:
    """Whether any 4-bit layer of ``module`` holds its weight in bitsandbytes' AVX512-BF16 CPU layout."""
    return any(
        getattr(getattr(getattr(layer, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
        for layer in module.modules()
    )
