"""Data parallelism: sums and gathers over the ranks, and FSDP2 sharding of a LoRA policy.

Every rank samples its own prompts' rollouts; a group's ``G`` completions never leave the rank that sampled
them, so group advantages stay local. What must be global is reduced here as *sums* (token counts, reward
sums, clip counts), never as means of per-rank means, so a run on ``W`` ranks computes the same numbers as one
process holding the concatenated batch. All functions are no-ops in a single process.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lit_entropy.errors import ConfigError


def world_size() -> int:
    """Processes in the default group (1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default group (0 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def sum_over_ranks(values: Tensor) -> Tensor:
    """``values`` summed elementwise over all ranks (a copy; float64 on the wire so counts stay exact)."""
    if world_size() == 1:
        return values.clone()
    total = values.detach().to(torch.float64).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(values.dtype)


def max_over_ranks(values: Tensor) -> Tensor:
    """``values``' elementwise maximum over all ranks (a copy)."""
    if world_size() == 1:
        return values.clone()
    total = values.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return total


def gather_objects(value: Any) -> list[Any]:
    """``[value of rank 0, value of rank 1, ...]`` (picklable values; ``[value]`` in a single process)."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def gather_rows(tensors: Sequence[Tensor]) -> tuple[list[Tensor], int]:
    """Concatenate each ``[m_r, T_r]`` tensor over the ranks, in rank order, right-padded to ``max T_r``.

    Every rank passes the same number of tensors, all with its own ``m_r`` rows and ``T_r`` columns (bool
    tensors pad with False, others with 0). Returns the gathered ``[sum m_r, max T_r]`` tensors (same dtypes)
    and this rank's first row in them. The result is identical on every rank, so a selection computed from
    it (a top-k, a seeded random choice) is the same everywhere and equals the single-process selection over
    the concatenated batch.
    """
    if world_size() == 1:
        return list(tensors), 0
    m, t = tensors[0].shape
    device = tensors[0].device
    sizes = torch.tensor([m, t], dtype=torch.int64, device=device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world_size())]
    dist.all_gather(all_sizes, sizes)
    rows = [int(s[0]) for s in all_sizes]
    max_rows, max_cols = max(rows), max(int(s[1]) for s in all_sizes)
    gathered = []
    for tensor in tensors:
        wire = tensor.to(torch.float64) if tensor.dtype == torch.bool else tensor
        padded = wire.new_zeros((max_rows, max_cols))
        padded[:m, :t] = wire
        parts = [torch.zeros_like(padded) for _ in range(world_size())]
        dist.all_gather(parts, padded.contiguous())
        whole = torch.cat([part[:count] for part, count in zip(parts, rows, strict=True)])
        gathered.append(whole.bool() if tensor.dtype == torch.bool else whole)
    return gathered, sum(rows[: rank()])


def shard_policy(model: nn.Module, mesh: object, param_dtype: torch.dtype | None = None) -> int:
    """Apply FSDP2 ``fully_shard`` to every decoder layer of ``model`` (a peft-wrapped or plain causal LM).

    Only the decoder layers are sharded: they hold nearly all the weights and every LoRA adapter. The
    embedding, final norm and output head stay whole on every rank (frozen, so they need no gradient
    reduction), which keeps generation and the chunked head (`lit_entropy.head`) free of collectives outside
    the layers. Gradients of the sharded adapters are reduce-scattered (averaged) by FSDP2.

    Args:
        model: the policy after `lit_entropy.model.load_policy`.
        mesh: the data-parallel ``DeviceMesh`` (Lightning's ``ModelParallelStrategy`` gives the module
            ``device_mesh``; its ``"data_parallel"`` dimension is used when present).
        param_dtype: compute dtype for the all-gathered parameters when the layer mixes dtypes (bf16 base
            weights with fp32 adapters); None keeps each parameter's own dtype.

    Returns:
        The number of layers sharded.

    Raises:
        ConfigError: 4-bit weights (FSDP2 cannot shard bitsandbytes' packed ``Params4bit``), no decoder
            layers found, or trainable parameters outside the layers (their gradients would not be reduced).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if any(type(p).__name__ == "Params4bit" for p in model.parameters()):
        raise ConfigError(
            "policy.quantization (4-bit) cannot be sharded with FSDP2: bitsandbytes' packed Params4bit weights "
            "are not DTensors. Use strategy: ddp (every GPU holds the 4-bit model) or drop quantization"
        )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if not layers:
        raise ConfigError(
            f"cannot shard {type(base).__name__}: its decoder has no `layers` to wrap with FSDP2"
        )
    try:
        dp_mesh = mesh["data_parallel"]  # type: ignore[index]
    except (KeyError, TypeError, RuntimeError):
        dp_mesh = mesh
    dtypes = {p.dtype for layer in layers for p in layer.parameters()}
    kwargs = {}
    if len(dtypes) > 1:
        compute = param_dtype or min(dtypes, key=lambda d: torch.finfo(d).bits)
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=dp_mesh, **kwargs)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    outside = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in in_layers]
    if outside:
        raise ConfigError(
            f"under FSDP2 only decoder layers may hold trainable parameters, got {outside[:3]}: drop lm_head / "
            "embed_tokens from policy.lora.target_modules"
        )
    return len(layers)


class FSDP2(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` for data-parallel FSDP2 training of a LoRA policy.

    ``trainer.strategy: {class_path: lit_entropy.distributed.FSDP2, init_args: {data_parallel_size: N}}``.
    `lit_entropy.module.GRPO` shards each decoder layer (`shard_policy`). Checkpoints are directories written
    by ``torch.distributed.checkpoint``, every rank writing its shards, and hold only what trains (the LoRA
    weights), the optimizer and Lightning's loop/callback state: the frozen base is reloaded from
    ``policy.path``. Loading therefore asks for exactly those tensors (Lightning's own loader asks for the
    whole model and would refuse such a checkpoint).

    Args:
        data_parallel_size: ranks to shard over (default: all of them).
        save_distributed_checkpoint: write sharded directories (True) or one full file from rank 0 (False).
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPU (default: by device).
        timeout: collective timeout.
    """

    def __init__(
        self,
        data_parallel_size: int | str = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from lit_entropy.checkpoint_state import keep_trainable  # it imports this module

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if not (path / _METADATA_FILENAME).is_file():
            raise ConfigError(f"{path}: not a checkpoint directory (no {_METADATA_FILENAME})")
        module = self.lightning_module
        state = {"state_dict": keep_trainable(get_model_state_dict(module), module)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(module, state["state_dict"], options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
            dcp.load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(
                module,
                optimizer,
                optim_state_dict=optimizer_state[key],
                options=StateDictOptions(cpu_offload=True),
            )
        # everything else Lightning saved (loops, callbacks, lit_entropy's RNG state), from rank 0's file
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)


def shard_for_strategy(policy: nn.Module, mesh: object, strategy: object, dtype: str) -> None:
    """`shard_policy` under the Trainer's strategy, which gave the module the device ``mesh``.

    Args:
        policy: the loaded policy.
        mesh: the module's device mesh (set by Lightning's ``ModelParallelStrategy``).
        strategy: the Trainer's strategy.
        dtype: ``policy.dtype``, the compute dtype of layers that mix dtypes.

    Raises:
        ConfigError: A strategy other than `FSDP2`: it cannot resume lit_entropy's adapter-only checkpoints.
    """
    if not isinstance(strategy, FSDP2):
        raise ConfigError(
            f"trainer.strategy {type(strategy).__name__} cannot resume lit_entropy's adapter-only "
            "checkpoints: use class_path lit_entropy.distributed.FSDP2 (data-parallel FSDP2)"
        )
    num_layers = shard_policy(policy, mesh, param_dtype=getattr(torch, dtype))
    rank_zero_info(f"lit_entropy: FSDP2 sharded {num_layers} decoder layers over {world_size()} ranks")
