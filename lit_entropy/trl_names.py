"""TRL's ``GRPOConfig`` option names, for the hint the CLI adds when one is given where lit_entropy has none.

A user coming from TRL writes ``--model.init_args.beta 0.1`` or ``num_generations: 8`` in a recipe; jsonargparse
only says the option is not accepted. `trl_hint` names the lit_entropy setting that means the same thing
(docs/quickstart.md, "Coming from TRL", has the table).
"""

from __future__ import annotations

import re

__all__ = ["TRL_NAMES", "trl_hint"]

#: TRL ``GRPOConfig`` name -> (the lit_entropy setting, what differs or "").
TRL_NAMES: dict[str, tuple[str, str]] = {
    "beta": ("model.init_args.loss.kl_coef", ""),
    "num_generations": ("model.init_args.sampling.group_size", ""),
    "epsilon": (
        "model.init_args.loss.eps_low",
        "TRL's epsilon is also the upper bound when epsilon_high is unset: set model.init_args.loss.eps_high too",
    ),
    "epsilon_high": ("model.init_args.loss.eps_high", ""),
    "num_iterations": ("model.init_args.ppo_epochs", ""),
    "max_completion_length": ("model.init_args.sampling.max_new_tokens", ""),
    "max_prompt_length": (
        "model.init_args.sampling.max_prompt_length",
        "a longer prompt is an error, not cut",
    ),
    "loss_type": (
        "model.init_args.loss.aggregation",
        "TRL's dapo ~ token-mean, grpo ~ seq-mean-token-mean, dr_grpo ~ seq-mean-token-sum-norm",
    ),
    "learning_rate": ("model.init_args.learning_rate", ""),
    "per_device_train_batch_size": (
        "data.init_args.batch_size",
        "prompts per RL iteration; TRL counts completions: batch_size = completions / sampling.group_size",
    ),
    "temperature": ("model.init_args.sampling.temperature", ""),
    "use_vllm": ("model.init_args.sampling.engine", "set it to vllm; the engine is always colocated"),
    "vllm_gpu_memory_utilization": ("model.init_args.sampling.vllm.gpu_memory_utilization", ""),
    "vllm_enable_sleep_mode": ("model.init_args.sampling.vllm.sleep", ""),
    "vllm_importance_sampling_cap": (
        "model.init_args.loss.sampler_correction_cap",
        "off unless set (TRL turns it on with vLLM); vllm_importance_sampling_correction has no separate switch",
    ),
}

# The option names in jsonargparse's reports of an option it does not know.
_NAMED = (
    re.compile(r"Option '([\w.]+)' is not accepted"),
    re.compile(r"does not accept option '([\w.]+)'"),
    re.compile(r"(?:unrecognized arguments:|^|\s)--([\w.]+)"),
)


def trl_hint(message: str) -> str:
    """``did you mean ...`` for each TRL option name in jsonargparse's error ``message`` ("" when none)."""
    names: list[str] = []
    for pattern in _NAMED:
        for match in pattern.finditer(message):
            name = match.group(1).rsplit(".", 1)[-1]
            if name in TRL_NAMES and name not in names:
                names.append(name)
    hints = []
    for name in names:
        setting, note = TRL_NAMES[name]
        hints.append(f"did you mean {setting}? ({name} is TRL's name{': ' + note if note else ''})")
    return "; ".join(hints)
