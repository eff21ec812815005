"""Sampling completions from the policy: the `Sampling` options, the `Rollout` container, and generation.

Shapes: ``B`` prompts per RL iteration, ``G`` completions per prompt (``group_size``), ``N = B*G`` sequences,
``P`` prompt length (left-padded), ``T`` completion length (right-padded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig

from lit_entropy.errors import ConfigError


@dataclass
class Sampling:
    """How completions are sampled for one RL iteration.

    Args:
        group_size: completions per prompt (``G``); group advantages need at least 2.
        max_new_tokens: longest completion; a completion that reaches it without EOS counts as truncated.
        temperature: sampling temperature; log-probs and entropy are computed at the same temperature.
        top_p: nucleus sampling mass (1.0 = off).
        top_k: keep the k most likely tokens (None = off).
        max_prompt_length: prompts longer than this many tokens are an error (None = no limit).
    """

    group_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    max_prompt_length: int | None = None

    def validate(self) -> None:
        if self.group_size < 2:
            raise ConfigError(f"sampling.group_size must be >= 2 for group advantages, got {self.group_size}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"sampling.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"sampling.top_k must be >= 1 or null, got {self.top_k}")


@dataclass
class Rollout:
    """Completions sampled for a batch of prompts, laid out group-contiguous (rows ``i*G .. i*G+G-1``).

    Attributes:
        prompt_ids: ``[N, P]`` left-padded prompt token ids.
        prompt_mask: ``[N, P]`` bool, True on real prompt tokens.
        completion_ids: ``[N, T]`` right-padded completion ids (EOS included when sampled).
        completion_mask: ``[N, T]`` bool keep-mask: real completion tokens up to and including the first EOS.
        truncated: ``[N]`` bool, True where the completion hit ``max_new_tokens`` without EOS.
        completions: ``N`` decoded completion texts (special tokens removed).
        examples: ``N`` dataset rows (each prompt's row repeated ``G`` times), passed to reward functions.
        group_size: ``G``.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    truncated: Tensor
    completions: list[str]
    examples: list[Mapping[str, Any]]
    group_size: int

    @property
    def num_sequences(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, index: Tensor) -> SequenceBatch:
        """The token tensors of the rows ``index`` with all-padding columns trimmed (for a forward pass)."""
        return SequenceBatch.from_parts(
            self.prompt_ids[index],
            self.prompt_mask[index],
            self.completion_ids[index],
            self.completion_mask[index],
        )


@dataclass
class SequenceBatch:
    """Prompt + completion token tensors of some rows of a rollout, ready for a forward pass.

    Prompt columns that are padding in every row and completion columns past the longest completion are trimmed:
    they would cost compute and change nothing (masked out).
    """

    prompt_ids: Tensor  # [n, P']
    prompt_mask: Tensor  # [n, P']
    completion_ids: Tensor  # [n, T']
    completion_mask: Tensor  # [n, T']
    completion_length: int  # T of the untrimmed rollout, to pad results back

    @classmethod
    def from_parts(
        cls, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor
    ) -> SequenceBatch:
        full_length = completion_ids.shape[1]
        # left padding: the first column any row uses; right padding: the last column any row uses
        used_prompt = prompt_mask.any(0).nonzero()
        start = int(used_prompt[0]) if used_prompt.numel() else prompt_mask.shape[1]
        used_completion = completion_mask.any(0).nonzero()
        stop = int(used_completion[-1]) + 1 if used_completion.numel() else 1
        return cls(
            prompt_ids[:, start:],
            prompt_mask[:, start:],
            completion_ids[:, :stop],
            completion_mask[:, :stop],
            full_length,
        )

    def model_inputs(self) -> dict[str, Tensor]:
        """``input_ids``, ``attention_mask`` and ``position_ids`` for a causal LM forward pass ``[n, P'+T']``.

        Position ids count real tokens only, as generation does with left padding; without them a left-padded
        row would be scored at shifted positions and its log-probs would not match the sampler's.
        """
        input_ids = torch.cat([self.prompt_ids, self.completion_ids], dim=1)
        attention_mask = torch.cat([self.prompt_mask, self.completion_mask], dim=1).long()
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}

    def pad_to_rollout(self, values: Tensor) -> Tensor:
        """Pad ``[n, T']`` per-token values back to the rollout's ``[n, T]`` with zeros."""
        missing = self.completion_length - values.shape[1]
        return torch.nn.functional.pad(values, (0, missing)) if missing else values


def completion_keep_mask(completion_ids: Tensor, eos_token_id: int | Sequence[int]) -> tuple[Tensor, Tensor]:
    """Keep-mask of real completion tokens and the truncation flags.

    Args:
        completion_ids: ``[N, T]`` generated ids (generation pads finished rows after their EOS).
        eos_token_id: one id or several ids that end a completion.

    Returns:
        ``(mask [N, T] bool, truncated [N] bool)``: tokens up to and including the first EOS are kept; a row
        with no EOS keeps every token and is truncated.
    """
    eos_ids = torch.as_tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=completion_ids.device
    )
    is_eos = torch.isin(completion_ids, eos_ids)  # [N, T]
    # number of EOS strictly before each position: 0 means "not past the first EOS yet"
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()
    mask = eos_before == 0
    truncated = ~is_eos.any(-1)
    return mask, truncated


@torch.no_grad()
def generate_rollout(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    examples: Sequence[Mapping[str, Any]],
    sampling: Sampling,
    device: torch.device,
    greedy: bool = False,
    num_samples: int | None = None,
) -> Rollout:
    """Sample ``num_samples`` (default ``sampling.group_size``) completions for each prompt.

    Args:
        model: a Hugging Face causal LM (peft-wrapped or not); put in eval mode by the caller.
        tokenizer: its tokenizer, ``padding_side="left"``.
        prompts: ``B`` rendered prompt strings.
        examples: ``B`` dataset rows (passed on to the reward functions).
        sampling: sampling options.
        device: where the ids go.
        greedy: decode greedily (validation accuracy) instead of sampling.
        num_samples: completions per prompt; defaults to ``sampling.group_size``.

    Returns:
        The rollout, ``N = B * num_samples`` rows, group-contiguous.
    """
    per_prompt = num_samples or sampling.group_size
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_ids = encoded["input_ids"].to(device)
    prompt_mask = encoded["attention_mask"].to(device).bool()
    if sampling.max_prompt_length is not None:
        lengths = prompt_mask.sum(-1)
        too_long = (lengths > sampling.max_prompt_length).nonzero()
        if too_long.numel():
            row = int(too_long[0])
            raise ConfigError(
                f"prompt {row} has {int(lengths[row])} tokens, more than sampling.max_prompt_length="
                f"{sampling.max_prompt_length}: {prompts[row][:80]!r}"
            )
    # group-contiguous layout: each prompt repeated G times in a row
    prompt_ids = prompt_ids.repeat_interleave(per_prompt, dim=0)  # [N, P]
    prompt_mask = prompt_mask.repeat_interleave(per_prompt, dim=0)  # [N, P]
    eos = tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p,
        top_k=None if greedy else sampling.top_k,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        use_cache=True,
    )
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask.long(), generation_config=config)
    completion_ids = out[:, prompt_ids.shape[1] :]  # [N, T]
    completion_mask, truncated = completion_keep_mask(completion_ids, eos)
    # decode only the kept tokens; EOS and padding are special and dropped
    texts = tokenizer.batch_decode(
        completion_ids.masked_fill(~completion_mask, tokenizer.pad_token_id), skip_special_tokens=True
    )
    repeated_examples = [example for example in examples for _ in range(per_prompt)]
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        truncated=truncated,
        completions=texts,
        examples=repeated_examples,
        group_size=per_prompt,
    )
