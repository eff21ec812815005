"""Sampling completions from the policy: the `Sampling` options, the `Rollout` container, and generation.

Shapes: ``B`` prompts per RL iteration, ``G`` completions per prompt (``group_size``), ``N = B*G`` sequences,
``P`` prompt length (left-padded), ``T`` completion length (right-padded).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicLayer

from lit_entropy.errors import ConfigError, check_choice
from lit_entropy.model import causal_lm_parts
from lit_entropy.vllm_options import VLLMOptions

#: What samples the rollouts: transformers' ``generate`` on the policy, or a colocated vLLM engine.
RolloutEngine = Literal["hf", "vllm"]


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
        engine: what samples: ``hf`` (transformers' ``generate`` on the policy itself) or ``vllm`` (a vLLM
            engine in the training process, given the policy's weights after every update;
            `lit_entropy.vllm_engine`). Every option above applies to both.
        vllm: the vLLM engine's options (`VLLMOptions`), used with ``engine: vllm``.
    """

    group_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    max_prompt_length: int | None = None
    engine: RolloutEngine = "hf"
    vllm: VLLMOptions = field(default_factory=VLLMOptions)

    def validate(self) -> None:
        if self.group_size < 2:
            raise ConfigError(f"sampling.group_size must be >= 2 for group advantages, got {self.group_size}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            # inf would sample uniformly without a word; nan would fail inside generation
            raise ConfigError(f"sampling.temperature must be a finite number > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"sampling.top_k must be >= 1 or null, got {self.top_k}")
        check_choice("sampling.engine", self.engine, RolloutEngine)
        self.vllm.validate()


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
        sampler_logprobs: ``[N, T]`` fp32 log-prob of each completion token recorded during generation,
            ``log_softmax(logits.float() / temperature)[token]`` over the full vocabulary (before top-k/top-p
            truncation), 0 where ``completion_mask`` is False; None unless generated with
            ``record_logprobs=True``. From the vLLM engine (`lit_entropy.vllm_engine.vllm_rollout`): the
            engine's log-prob of each token under the distribution it sampled from (top-k/top-p applied).
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    truncated: Tensor
    completions: list[str]
    examples: list[Mapping[str, Any]]
    group_size: int
    sampler_logprobs: Tensor | None = None

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


def concat_groups(parts: Sequence[tuple[Rollout, Tensor]], pad_id: int) -> Rollout:
    """One rollout of the groups ``indices`` of each ``(rollout, indices)`` part, in order.

    Prompts stay left-padded and completions right-padded: each part is padded to the longest prompt and the
    longest completion of all parts with ``pad_id`` (mask False). ``sampler_logprobs`` are kept only when every
    part has them.
    """
    group = parts[0][0].group_size
    prompt_width = max(rollout.prompt_ids.shape[1] for rollout, _ in parts)
    completion_width = max(rollout.completion_ids.shape[1] for rollout, _ in parts)
    with_logprobs = all(rollout.sampler_logprobs is not None for rollout, _ in parts)
    fields: dict[str, list[Tensor]] = {name: [] for name in ("pi", "pm", "ci", "cm", "tr", "lp")}
    completions: list[str] = []
    examples: list[Mapping[str, Any]] = []
    for rollout, indices in parts:
        if rollout.group_size != group:
            raise ValueError(f"group sizes differ: {rollout.group_size} and {group}")
        rows = (indices.long()[:, None] * group + torch.arange(group)).flatten()
        left = prompt_width - rollout.prompt_ids.shape[1]
        right = completion_width - rollout.completion_ids.shape[1]
        pad = torch.nn.functional.pad
        fields["pi"].append(pad(rollout.prompt_ids[rows], (left, 0), value=pad_id))
        fields["pm"].append(pad(rollout.prompt_mask[rows], (left, 0), value=False))
        fields["ci"].append(pad(rollout.completion_ids[rows], (0, right), value=pad_id))
        fields["cm"].append(pad(rollout.completion_mask[rows], (0, right), value=False))
        fields["tr"].append(rollout.truncated[rows])
        if with_logprobs:
            fields["lp"].append(pad(rollout.sampler_logprobs[rows], (0, right), value=0.0))
        completions.extend(rollout.completions[int(row)] for row in rows)
        examples.extend(rollout.examples[int(row)] for row in rows)
    return Rollout(
        prompt_ids=torch.cat(fields["pi"]),
        prompt_mask=torch.cat(fields["pm"]),
        completion_ids=torch.cat(fields["ci"]),
        completion_mask=torch.cat(fields["cm"]),
        truncated=torch.cat(fields["tr"]),
        completions=completions,
        examples=examples,
        group_size=group,
        sampler_logprobs=torch.cat(fields["lp"]) if with_logprobs else None,
    )


def left_padded_positions(attention_mask: Tensor) -> Tensor:
    """Position ids ``[n, L]`` that count real tokens only, from 0 (as generation does under left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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
        cls,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        completion_ids: Tensor,
        completion_mask: Tensor,
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
        position_ids = left_padded_positions(attention_mask)
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


class SamplerLogprobRecorder(LogitsProcessor):
    """Records the log-prob of every sampled token while ``generate`` runs, in ``O(N*V)`` memory.

    Passed to ``generate`` through ``logits_processor``: transformers runs such custom processors after its
    own logits processors (none are enabled by :func:`generate_rollout`) but *before* the temperature/top-k/
    top-p warpers, so ``scores`` are the model's raw next-token logits (fp32). Each call keeps one ``[N, V]`` fp32 log-softmax of the current step at
    ``temperature`` (``z = scores / temperature``, ``z - logsumexp(z)``, as
    :func:`lit_entropy.logprobs.token_logprobs_and_entropy` computes it) and gathers the previous step's
    at ``input_ids[:, -1]``, the token just sampled from it; :meth:`finish` gathers the last step once
    ``generate`` has returned. ``output_logits``/``output_scores`` would instead keep ``[N, T, V]``.

    Scores are returned unchanged, so sampling is unaffected. One instance serves one ``generate`` call.

    Args:
        temperature: sampling temperature (> 0).
    """

    def __init__(self, temperature: float) -> None:
        if not temperature > 0:
            raise ConfigError(f"temperature={temperature} must be > 0")
        self.temperature = temperature
        self._pending: Tensor | None = None  # [N, V] log-softmax of the last step seen, token not yet known
        self._steps: list[Tensor] = []  # one [N] fp32 log-prob per step whose token is known

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self._pending is not None:
            self._steps.append(self._gather(self._pending, input_ids[:, -1]))
        z = scores.to(torch.float32) / self.temperature  # [N, V], a new tensor: scores stay untouched
        self._pending = z - torch.logsumexp(z, dim=-1, keepdim=True)
        return scores

    @staticmethod
    def _gather(logprobs: Tensor, tokens: Tensor) -> Tensor:
        return logprobs.gather(-1, tokens.to(logprobs.device, torch.long).unsqueeze(-1)).squeeze(-1)

    def finish(self, completion_ids: Tensor) -> Tensor:
        """``[N, T]`` fp32 log-probs of ``completion_ids`` (the ``T`` tokens ``generate`` returned).

        Generation may have run one step more than it returns (a deferred stop check undoes it): steps past
        ``T`` are dropped. Positions after a row's EOS hold the log-prob of its padding; mask them.
        """
        length = completion_ids.shape[1]
        steps = self._steps[:length]
        if len(steps) == length - 1 and self._pending is not None:
            steps.append(self._gather(self._pending, completion_ids[:, -1]))
        if len(steps) != length:
            raise RuntimeError(
                f"recorded {len(self._steps) + (self._pending is not None)} generation steps for {length} "
                "completion tokens; was the recorder used for more than one generate call?"
            )
        self._pending = None
        self._steps = []
        if not steps:
            return torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
        return torch.stack(steps, dim=1).to(completion_ids.device)  # [N, T]


def shared_prompt_cache(
    model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, repeats: int
) -> tuple[str, DynamicCache] | None:
    """The KV cache of each prompt but its last token, computed once per prompt and repeated ``repeats`` times.

    The ``G`` completions of a prompt share its prefill: ``generate`` on the repeated prompts would run the
    decoder over every prompt ``G`` times (for 8 x 8 completions of 40-token prompts, 2,560 prompt tokens against
    1,024 sampled ones). Here the decoder (no output head) runs once over the ``B`` distinct prompts ``[B, P-1]``,
    with the position ids generation uses (real tokens counted from 0 under left padding); the cache is repeated
    to ``[B*G, P-1]`` rows, and ``generate`` starts from it with the last prompt token, whose logits give the
    first sampled token. The result equals the unshared prefill up to floating-point rounding.

    Returns ``(name, cache)``, ``name`` being the keyword under which ``generate`` takes it, or None (the caller
    then prefills as usual) when there is nothing to share (``repeats < 2``, one-token
    prompts), when the decoder cannot be found, or when its cache is not a plain `DynamicCache` of full-attention
    layers (sliding windows, linear attention, quantized caches: repeating them is not known to be exact).
    """
    if repeats < 2 or prompt_ids.shape[1] < 2:
        return None
    parts = causal_lm_parts(model)
    if parts is None:
        return None
    prefix_mask = prompt_mask[:, :-1].long()
    position_ids = left_padded_positions(prefix_mask)
    outputs = parts[0](
        input_ids=prompt_ids[:, :-1], attention_mask=prefix_mask, position_ids=position_ids, use_cache=True
    )
    # recent transformers (5.24) name the output field and generate's argument "cache", older ones "past_key_values"
    name = "cache" if "cache" in outputs else "past_key_values"
    cache = outputs.get(name)
    if type(cache) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.batch_repeat_interleave(repeats)
    return name, cache


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], sampling: Sampling, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(ids [B, P], mask [B, P] bool)`` of the rendered prompts, left-padded, no special tokens added.

    Raises:
        ConfigError: a prompt is longer than ``sampling.max_prompt_length`` (naming the prompt).
    """
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
    return prompt_ids, prompt_mask


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
    *,
    record_logprobs: bool = False,
    synced_gpus: bool = False,
    share_prompts: bool = True,
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
        record_logprobs: also record ``Rollout.sampler_logprobs``, each sampled token's fp32 log-prob at
            ``sampling.temperature`` over the full vocabulary (top-k/top-p truncation is not applied: it is
            the quantity the trainer recomputes as old log-probs). With ``greedy`` it is recorded the same way
            (the policy's log-prob of the greedy token at ``sampling.temperature``), not the degenerate
            log-prob 0 of greedy decoding. Costs one fp32 ``[N, V]`` buffer and a log-softmax per step.
        synced_gpus: keep stepping until every rank has finished (FSDP: a rank that stopped early would leave
            the others waiting in an all-gather).
        share_prompts: prefill each distinct prompt once and repeat its KV cache for its ``num_samples``
            completions (`shared_prompt_cache`), instead of prefilling every repeated copy.

    Returns:
        The rollout, ``N = B * num_samples`` rows, group-contiguous.
    """
    per_prompt = num_samples or sampling.group_size
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, sampling, device)
    shared = shared_prompt_cache(model, prompt_ids, prompt_mask, per_prompt) if share_prompts else None
    # group-contiguous layout: each prompt repeated G times in a row
    prompt_ids = prompt_ids.repeat_interleave(per_prompt, dim=0)  # [N, P]
    prompt_mask = prompt_mask.repeat_interleave(per_prompt, dim=0)  # [N, P]
    eos = tokenizer.eos_token_id
    # Unset (None) fields are filled from the model's generation_config and then transformers' defaults
    # (top_k=50, a checkpoint's repetition_penalty/min_length...), so everything that shapes the sampled
    # distribution is set explicitly: top_k=0 is "off", and nothing forces a minimum length, so generation
    # stops as soon as every row has produced EOS.
    config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        min_new_tokens=0,  # overrides any min_length (with min_length set too, transformers warns each call)
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p,
        top_k=None if greedy else (sampling.top_k or 0),
        repetition_penalty=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        use_cache=True,
    )
    recorder = SamplerLogprobRecorder(sampling.temperature) if record_logprobs else None
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask.long(),
        generation_config=config,
        logits_processor=LogitsProcessorList([recorder]) if recorder is not None else None,
        synced_gpus=synced_gpus,
        **({} if shared is None else {shared[0]: shared[1]}),
    )
    completion_ids = out[:, prompt_ids.shape[1] :]  # [N, T]
    completion_mask, truncated = completion_keep_mask(completion_ids, eos)
    sampler_logprobs = None
    if recorder is not None:
        logprobs = recorder.finish(completion_ids)  # [N, T] fp32
        sampler_logprobs = torch.where(completion_mask, logprobs, torch.zeros_like(logprobs))
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
        sampler_logprobs=sampler_logprobs,
    )
