"""What a lit_entropy checkpoint holds besides Lightning's own state: trainable weights only, and the RNG states.

The frozen base (possibly 4-bit) is reloaded from ``policy.path``, so a checkpoint keeps only the parameters that
train (the LoRA adapters, or every parameter of a model trained without them). `trainable_by_name` is the one
definition of "what trains"; the optimizer, the checkpoint filter, the FSDP2 loader, the adapter export and
`CollapseGuard`'s snapshots all read it.

Sampling draws from the global RNGs, so each rank's RNG states travel with the checkpoint: a resumed run then
samples exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lit_entropy.distributed import gather_objects, rank, world_size
from lit_entropy.errors import ConfigError

PAYLOAD_KEY = "lit_entropy"


def trainable_by_name(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that require grad, by name, in ``module.named_parameters()`` order."""
    return {name: parameter for name, parameter in module.named_parameters() if parameter.requires_grad}


def trainable_state(module: torch.nn.Module, full: bool = False) -> dict[str, Tensor]:
    """CPU copies of the trainable parameters, by name.

    ``full=True`` gathers sharded (FSDP2 ``DTensor``) parameters into whole tensors first; every rank must call
    it then, since the gather is a collective.
    """
    state = {}
    for name, parameter in trainable_by_name(module).items():
        value = parameter.full_tensor() if full and hasattr(parameter, "full_tensor") else parameter
        state[name] = value.detach().to("cpu", copy=True)
    return state


@torch.no_grad()
def restore_trainable_state(module: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` (from `trainable_state`) back into the module's parameters, in place.

    Raises:
        ConfigError: naming a parameter of ``state`` the module no longer has.
    """
    parameters = dict(module.named_parameters())
    for name, value in state.items():
        if name not in parameters:
            raise ConfigError(f"cannot restore {name!r}: the module has no such parameter")
        parameters[name].copy_(value.to(parameters[name].device))


def keep_trainable(state_dict: Mapping[str, Any], module: torch.nn.Module) -> dict[str, Any]:
    """The entries of a module ``state_dict`` that belong to trainable parameters."""
    trainable = trainable_by_name(module)
    return {name: value for name, value in state_dict.items() if name in trainable}


def check_trainable_present(state_dict: Mapping[str, Any], module: torch.nn.Module) -> None:
    """Raise ConfigError when a checkpoint's ``state_dict`` lacks one of the module's trainable parameters, or
    holds one with another shape (a LoRA rank or target modules other than this run's)."""
    trainable = trainable_by_name(module)
    missing = set(trainable) - set(state_dict)
    if missing:
        raise ConfigError(
            f"checkpoint lacks {len(missing)} trainable weights (e.g. {sorted(missing)[0]}): "
            "was it written with another policy.lora configuration?"
        )
    for name, parameter in trainable.items():
        saved = state_dict[name]
        if hasattr(saved, "shape") and tuple(saved.shape) != tuple(parameter.shape):
            raise ConfigError(
                f"checkpoint weight {name} has shape {list(saved.shape)}, this model's has {list(parameter.shape)}: "
                "it was written with another policy.lora configuration (rank r or target modules); resume with "
                "the checkpoint's settings, or start a new run"
            )


def rng_state() -> dict[str, Any]:
    """This process's global RNG states (torch CPU, CUDA if initialised, Python's ``random``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states taken by `rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def payload(shuffle: torch.Generator, nonfinite_in_a_row: int) -> dict[str, Any]:
    """The module's own checkpoint entry: its shuffle generator, its skip counter and every rank's RNG states."""
    return {
        "shuffle_rng": shuffle.get_state(),
        "nonfinite_in_a_row": nonfinite_in_a_row,
        "rng_states": gather_objects(rng_state()),
    }


def restore_payload(state: Mapping[str, Any], shuffle: torch.Generator) -> int:
    """Restore `payload`'s generator and this rank's RNG states; returns the saved skip counter.

    A checkpoint written by another number of ranks restores rank 0's RNG states everywhere.
    """
    if "shuffle_rng" in state:
        shuffle.set_state(state["shuffle_rng"])
    rng_states = state.get("rng_states")
    if rng_states:
        set_rng_state(rng_states[rank()] if len(rng_states) == world_size() else rng_states[0])
    return int(state.get("nonfinite_in_a_row", 0))


__all__ = [
    "PAYLOAD_KEY",
    "check_trainable_present",
    "keep_trainable",
    "payload",
    "restore_payload",
    "restore_trainable_state",
    "rng_state",
    "set_rng_state",
    "trainable_by_name",
    "trainable_state",
]
