"""Sampler log-probs recorded during generation, and early stopping once every row has produced EOS.

Shapes: ``N`` sequences, ``P`` prompt length, ``T`` completion length, ``V`` vocabulary (99 for the character
tokenizer).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_entropy.logprobs import token_logprobs_and_entropy
from lit_entropy.rollout import (
    SamplerLogprobRecorder,
    Sampling,
    SequenceBatch,
    generate_rollout,
    shared_prompt_cache,
)

PAD, EOS = 0, 1  # ids of the character tokenizer
CPU = torch.device("cpu")
PROMPTS = ["12+34=", "7*8=", "5="]  # different lengths: rows 3.. are left-padded


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.eval()
    return model


def _bias_eos(model, bias: float):
    """Add ``bias`` to the EOS logit in the output head (generation and plain forwards alike)."""

    def hook(module, inputs, logits):
        logits = logits.clone()
        logits[..., EOS] += bias
        return logits

    return model.get_output_embeddings().register_forward_hook(hook)


def _recomputed_logprobs(model, batch: SequenceBatch, temperature: float) -> torch.Tensor:
    """Training-style log-probs of a batch's completion tokens, as ``GRPO.sequence_logprobs`` computes them."""
    completion_length = batch.completion_ids.shape[1]
    logits = model(**batch.model_inputs(), logits_to_keep=completion_length + 1, use_cache=False).logits
    logprobs, _ = token_logprobs_and_entropy(logits[:, :-1], batch.completion_ids, temperature)
    return batch.pad_to_rollout(logprobs)  # [n, T]


@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k", "greedy", "eos_bias"),
    [(0.7, 0.5, None, False, 1.5), (1.3, 0.9, 5, False, 0.2), (0.7, 1.0, None, True, 0.0)],
    ids=["t0.7-top_p0.5", "t1.3-top_p0.9-top_k5", "greedy"],
)
def test_sampler_logprobs_match_a_training_forward(
    tiny_model, char_tokenizer, temperature, top_p, top_k, greedy, eos_bias
):
    sampling = Sampling(group_size=3, max_new_tokens=10, temperature=temperature, top_p=top_p, top_k=top_k)
    # A mild EOS bias (kept by top-p/top-k): some rows end early (padding after EOS), others are truncated.
    handle = _bias_eos(tiny_model, eos_bias)
    try:
        torch.manual_seed(1)
        rollout = generate_rollout(
            tiny_model, char_tokenizer, PROMPTS, [{}] * 3, sampling, CPU, greedy=greedy, record_logprobs=True
        )
        with torch.no_grad():
            recomputed = _recomputed_logprobs(tiny_model, rollout.select(torch.arange(9)), temperature)
    finally:
        handle.remove()

    recorded, mask = rollout.sampler_logprobs, rollout.completion_mask
    assert recorded is not None and recorded.dtype == torch.float32
    assert recorded.shape == rollout.completion_ids.shape == (9, 10)
    if not greedy:  # the setup must exercise both finished-early and truncated rows
        assert (~mask).any() and rollout.truncated.any()
    assert torch.all(recorded[~mask] == 0)
    assert torch.all(recorded[mask] < 0)
    # The untruncated full-vocabulary value: a top-p/top-k renormalised log-prob would be larger by
    # -log(kept mass), about 0.7 nats for top_p=0.5 on this near-uniform model.
    max_diff = (recorded - recomputed)[mask].abs().max().item()
    assert max_diff < 1e-4, max_diff


def test_record_logprobs_off_leaves_the_field_none(tiny_model, char_tokenizer):
    torch.manual_seed(0)
    rollout = generate_rollout(tiny_model, char_tokenizer, PROMPTS[:1], [{}], Sampling(2, 3), CPU)
    assert rollout.sampler_logprobs is None


def test_generation_stops_once_every_row_has_ended(tiny_model, char_tokenizer):
    forwards = {"n": 0}

    def count(module, inputs, output):
        forwards["n"] += 1

    counter = tiny_model.register_forward_hook(count)
    try:
        sampling = Sampling(group_size=4, max_new_tokens=32)
        handle = _bias_eos(tiny_model, 1e4)  # EOS is certain at every step
        try:
            torch.manual_seed(0)
            ended = generate_rollout(tiny_model, char_tokenizer, PROMPTS, [{}] * 3, sampling, CPU)
        finally:
            handle.remove()
        ended_forwards, forwards["n"] = forwards["n"], 0
        handle = _bias_eos(tiny_model, float("-inf"))  # control: EOS impossible, so it runs to the end
        try:
            torch.manual_seed(0)
            endless = generate_rollout(tiny_model, char_tokenizer, PROMPTS[:1], [{}], sampling, CPU)
        finally:
            handle.remove()
    finally:
        counter.remove()

    assert ended.completion_ids.shape == (12, 1)  # T = 1, not max_new_tokens
    assert ended.completion_ids.eq(EOS).all() and not ended.truncated.any()
    assert ended_forwards == 1  # the prefill only: no decoding step after every row sampled EOS
    assert endless.completion_ids.shape == (4, 32) and endless.truncated.all()
    assert forwards["n"] == 32


def test_recorder_aligns_steps_and_drops_an_undone_step():
    # Three calls of a 2-row, 4-token vocabulary; tokens 2, then 3 are sampled; a third step ran but was undone.
    step_logits = [torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]]) * k for k in (1, 2, 3)]
    tokens = torch.tensor([[2, 3], [0, 1]])  # [N=2, T=2]
    recorder = SamplerLogprobRecorder(temperature=0.5)
    input_ids = torch.tensor([[9], [9]])
    for step, logits in enumerate(step_logits):
        returned = recorder(input_ids, logits)
        assert returned is logits  # scores pass through untouched
        if step < 2:
            input_ids = torch.cat([input_ids, tokens[:, step : step + 1]], dim=1)
        else:
            input_ids = torch.cat([input_ids, torch.tensor([[0], [0]])], dim=1)
    recorded = recorder.finish(tokens)
    expected = torch.stack(
        [
            torch.log_softmax(step_logits[t] / 0.5, -1).gather(-1, tokens[:, t : t + 1]).squeeze(-1)
            for t in (0, 1)
        ],
        dim=1,
    )
    assert torch.allclose(recorded, expected, atol=1e-6)
    # The last step is finalised from the returned tokens when generate made no extra call.
    recorder = SamplerLogprobRecorder(temperature=0.5)
    recorder(torch.tensor([[9], [9]]), step_logits[0])
    recorder(torch.cat([torch.tensor([[9], [9]]), tokens[:, :1]], dim=1), step_logits[1])
    assert torch.allclose(recorder.finish(tokens), expected, atol=1e-6)


def test_shared_prompt_prefill_samples_what_a_prefill_per_row_samples(tiny_model, char_tokenizer):
    # Each distinct prompt is prefilled once and its KV cache repeated for its G rows; with the same seed the
    # rollout must be the one that prefilling all N rows gives (left-padded prompts included).
    sampling = Sampling(group_size=4, max_new_tokens=8, temperature=0.9)
    encoded = char_tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        shared = shared_prompt_cache(
            tiny_model, encoded["input_ids"], encoded["attention_mask"].bool(), sampling.group_size
        )
    assert shared is not None  # the shared path really applies to this model
    name, cache = shared
    assert name in ("cache", "past_key_values")
    assert cache.get_seq_length() == encoded["input_ids"].shape[1] - 1  # every prompt token but the last
    assert cache.layers[0].keys.shape[0] == len(PROMPTS) * sampling.group_size

    rollouts = []
    for share in (True, False):
        torch.manual_seed(3)
        rollouts.append(
            generate_rollout(
                tiny_model,
                char_tokenizer,
                PROMPTS,
                [{}] * 3,
                sampling,
                CPU,
                record_logprobs=True,
                share_prompts=share,
            )
        )
    with_sharing, without = rollouts
    assert torch.equal(with_sharing.completion_ids, without.completion_ids)
    assert torch.equal(with_sharing.completion_mask, without.completion_mask)
    assert torch.allclose(with_sharing.sampler_logprobs, without.sampler_logprobs, atol=1e-5, rtol=0)
