"""`VLLMOptions`: how the vLLM rollout engine (``sampling.engine: vllm``) is set up."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lit_entropy.errors import ConfigError

__all__ = ["VLLMOptions"]


@dataclass
class VLLMOptions:
    """Options of the colocated vLLM engine (`lit_entropy.vllm_engine.VLLMEngine`), used with ``sampling.engine:
    vllm``. Names follow vLLM's ``LLM`` arguments.

    Args:
        gpu_memory_utilization: share of the device's memory vLLM may take for the weights it serves and its KV
            cache (vLLM's argument; on the CPU build, the share of RAM the whole training process may use, the
            KV cache taking what the process does not). None: 0.3 on a GPU (TRL's default for colocated vLLM);
            on a CPU a KV cache of 1 GiB.
        max_model_len: longest prompt + completion the engine accepts, in tokens. None: the policy's
            ``max_position_embeddings``, at most ``sampling.max_prompt_length + sampling.max_new_tokens`` when a
            prompt limit is set, else at most 4096.
        dtype: dtype of the weights the engine serves. None: the trainer's (``policy.dtype``; with a 4-bit base,
            ``policy.quantization.compute_dtype``, the engine then serving the dequantized weights).
        enforce_eager: no CUDA graphs or ``torch.compile`` in the engine. None: eager on a CPU (compiling costs
            more than the short runs it serves), graphs on a GPU.
        sleep: on a GPU, put the engine to sleep between rollouts (vLLM sleep mode, level 1): its KV cache is
            freed and its weights moved to CPU memory while the trainer runs its updates, so sampling and training
            share one consumer GPU. Ignored on a CPU.
    """

    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    dtype: str | None = None
    enforce_eager: bool | None = None
    sleep: bool = True

    def validate(self) -> None:
        if self.gpu_memory_utilization is not None and not (
            isinstance(self.gpu_memory_utilization, (int, float))
            and math.isfinite(self.gpu_memory_utilization)
            and 0 < self.gpu_memory_utilization <= 1
        ):
            raise ConfigError(
                f"sampling.vllm.gpu_memory_utilization must be in (0, 1] or null, got {self.gpu_memory_utilization!r}"
            )
        if self.max_model_len is not None and (
            isinstance(self.max_model_len, bool)
            or not isinstance(self.max_model_len, int)
            or self.max_model_len < 2
        ):
            raise ConfigError(
                f"sampling.vllm.max_model_len must be an integer >= 2 or null, got {self.max_model_len!r}"
            )
        if self.dtype is not None and self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(
                f"sampling.vllm.dtype must be one of 'float32', 'bfloat16', 'float16' or null, got {self.dtype!r}"
            )
        for name in ("enforce_eager", "sleep"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"sampling.vllm.{name} must be true or false, got {value!r}")
