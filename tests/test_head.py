"""`head_logprobs_and_entropy` against the naive computation (full logits, then log-softmax), values and gradients,
and the module's fused path against its logits path on tied, untied, LoRA-headed and 4-bit models."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from lit_entropy.demo import build_char_tokenizer, build_tiny_causal_lm
from lit_entropy.errors import ConfigError
from lit_entropy.head import default_chunk_size, head_logprobs_and_entropy, is_frozen_linear
from lit_entropy.logprobs import token_logprobs_and_entropy
from lit_entropy.model import LoRA, Policy, Quantization
from lit_entropy.module import GRPO
from lit_entropy.reward_spec import Reward
from lit_entropy.rollout import Sampling


def _naive(hidden, head, tokens, temperature):
    """The reference: materialise every logit, then the plain fp32 log-softmax and entropy by hand."""
    z = head(hidden).double() / temperature  # [N, T, V]
    logp = torch.log_softmax(z, dim=-1)
    logprobs = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


def _grads(hidden, head, tokens, temperature, fn, weights, **kwargs):
    h = hidden.detach().clone().requires_grad_(True)
    for p in head.parameters():
        p.grad = None
    logprobs, entropy = fn(h, head, tokens, temperature, **kwargs)
    loss = (logprobs * weights[0]).sum()
    if entropy.requires_grad:
        loss = loss + (entropy * weights[1]).sum()
    loss.backward()
    head_grads = [None if p.grad is None else p.grad.clone() for p in head.parameters()]
    return logprobs.detach(), entropy.detach(), h.grad, head_grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_frozen_linear_head_matches_naive_values_and_gradients(bias, chunk_size, temperature):
    torch.manual_seed(0)
    n, t, h, v = 3, 7, 16, 50
    head = nn.Linear(h, v, bias=bias).double().requires_grad_(False)
    hidden = torch.randn(n, t, h, dtype=torch.float64)
    tokens = torch.randint(0, v, (n, t))
    weights = torch.randn(2, n, t, dtype=torch.float64)
    assert is_frozen_linear(head)

    lp, ent, grad, _ = _grads(
        hidden, head, tokens, temperature, head_logprobs_and_entropy, weights, chunk_size=chunk_size
    )
    ref_lp, ref_ent, ref_grad, _ = _grads(hidden, head, tokens, temperature, _naive, weights)
    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_entropy_grad_false_detaches_entropy_and_keeps_logprob_gradient():
    torch.manual_seed(1)
    head = nn.Linear(8, 20, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    tokens = torch.randint(0, 20, (2, 4))
    lp, ent = head_logprobs_and_entropy(hidden, head, tokens, entropy_grad=False)
    assert lp.requires_grad and not ent.requires_grad
    lp.sum().backward()
    naive_hidden = hidden.detach().clone().requires_grad_(True)
    token_logprobs_and_entropy(head(naive_hidden), tokens)[0].sum().backward()
    torch.testing.assert_close(hidden.grad, naive_hidden.grad, rtol=1e-5, atol=1e-6)


def test_banned_vocabulary_entries_give_finite_values_and_gradients():
    torch.manual_seed(2)
    head = nn.Linear(8, 12).requires_grad_(False)
    with torch.no_grad():
        head.bias[[3, 7]] = float("-inf")  # two ids that can never be sampled
    hidden = torch.randn(2, 5, 8, dtype=torch.float32, requires_grad=True)
    tokens = torch.randint(0, 3, (2, 5))
    lp, ent = head_logprobs_and_entropy(hidden, head, tokens, chunk_size=3)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(hidden.grad).all()
    ref_lp, ref_ent = token_logprobs_and_entropy(head(hidden.detach()), tokens)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-5)


def test_trainable_head_takes_the_checkpointed_path_and_matches_naive_head_gradients():
    torch.manual_seed(3)
    head = nn.Linear(8, 30).double()  # trainable: weight and bias get gradients
    assert not is_frozen_linear(head)
    hidden = torch.randn(2, 6, 8, dtype=torch.float64)
    tokens = torch.randint(0, 30, (2, 6))
    weights = torch.randn(2, 2, 6, dtype=torch.float64)
    lp, ent, grad, head_grads = _grads(
        hidden, head, tokens, 0.8, head_logprobs_and_entropy, weights, chunk_size=4
    )
    ref_lp, ref_ent, ref_grad, ref_head_grads = _grads(hidden, head, tokens, 0.8, _naive, weights)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    for got, want in zip(head_grads, ref_head_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bfloat16_head_is_close_to_the_fp32_reference():
    torch.manual_seed(4)
    head = nn.Linear(32, 200, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 8, 32)
    tokens = torch.randint(0, 200, (2, 8))
    lp, ent = head_logprobs_and_entropy(hidden.bfloat16(), head.bfloat16(), tokens)
    ref_lp, ref_ent = _naive(hidden, head.float(), tokens, 1.0)
    # bf16 weights and hidden states (8 bits of mantissa) move logits by ~1%: log-probs by a few 0.01 nats
    assert (lp.double() - ref_lp).abs().max() < 0.1
    assert (ent.double() - ref_ent).abs().max() < 0.1


def test_default_chunk_size_bounds_the_block():
    assert default_chunk_size(151_936) == 220
    assert default_chunk_size(99) > 100_000
    assert default_chunk_size(10**9) == 1


def test_errors_name_the_value():
    head = nn.Linear(4, 10, bias=False).requires_grad_(False)
    hidden = torch.randn(1, 3, 4)
    tokens = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match="temperature=0"):
        head_logprobs_and_entropy(hidden, head, tokens, temperature=0)
    with pytest.raises(ConfigError, match="chunk_size=0"):
        head_logprobs_and_entropy(hidden, head, tokens, chunk_size=0)
    with pytest.raises(ValueError, match="expected hidden"):
        head_logprobs_and_entropy(hidden, head, tokens[:, :2])
    with pytest.raises(ValueError, match=r"\[0, V=10\)"):
        head_logprobs_and_entropy(hidden, head, tokens + 10)


def test_empty_input_gives_empty_outputs():
    head = nn.Linear(4, 10, bias=False).requires_grad_(False)
    lp, ent = head_logprobs_and_entropy(torch.randn(2, 0, 4), head, torch.zeros(2, 0, dtype=torch.long))
    assert lp.shape == ent.shape == (2, 0)


# --- the module's fused path -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_untied")
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(
        vocab_size=len(tokenizer), hidden_size=32, num_heads=4, tie_word_embeddings=False, seed=5
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _reward() -> Reward:
    return Reward(fn="lit_entropy.rewards.answer_format")


def _set_lora_b_nonzero(module: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def _logprobs_and_lora_grads(module: GRPO, rollout, entropy_weight: float):
    module.policy.zero_grad(set_to_none=True)
    lp, ent = module.sequence_logprobs(rollout.select(torch.arange(rollout.num_sequences)))
    mask = rollout.completion_mask
    loss = (lp * mask).sum() + entropy_weight * (ent * mask).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    return lp.detach() * mask, ent.detach() * mask, grads


def _pair(model_dir: Path, **policy_kwargs) -> tuple[GRPO, GRPO]:
    modules = []
    for fused in (True, False):
        module = GRPO(
            policy=Policy(path=str(model_dir), **policy_kwargs),
            rewards=[_reward()],
            sampling=Sampling(group_size=2, max_new_tokens=8, temperature=0.7),
            fused_head=fused,
        )
        module.configure_model()
        module.policy.eval()  # no LoRA dropout: both paths must see the same network
        modules.append(module)
    _set_lora_b_nonzero(modules[0])
    adapters = {n: p for n, p in modules[0].policy.named_parameters() if p.requires_grad}
    with torch.no_grad():  # the same LoRA A and B in both
        for name, param in modules[1].policy.named_parameters():
            if param.requires_grad:
                param.copy_(adapters[name])
    return modules[0], modules[1]


@pytest.mark.parametrize(
    "case", ["tied", "untied", "lora_on_head"], ids=["tied-embeddings", "untied", "lora-on-lm_head"]
)
def test_module_fused_head_matches_logits_path(case, tiny_model_dir, untied_model_dir):
    model_dir = untied_model_dir if case != "tied" else tiny_model_dir
    targets = ["q_proj", "v_proj", "lm_head"] if case == "lora_on_head" else "all-linear"
    fused, plain = _pair(model_dir, lora=LoRA(r=4, alpha=8, target_modules=targets))
    assert fused._lm_parts is not None and plain._lm_parts is None
    assert is_frozen_linear(fused._lm_parts[1]) == (case != "lora_on_head")
    torch.manual_seed(0)
    rollout = fused.generate([{"prompt": "1+2="}, {"prompt": "30-4="}])
    a = _logprobs_and_lora_grads(fused, rollout, entropy_weight=0.3)
    b = _logprobs_and_lora_grads(plain, rollout, entropy_weight=0.3)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-5)
    assert a[2].keys() == b[2].keys() and len(a[2]) > 0
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=1e-4, atol=1e-5, msg=name)


def test_module_fused_head_on_a_4bit_model(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    quantization = Quantization(compute_dtype="float32")
    fused, plain = _pair(tiny_model_dir, lora=LoRA(r=4, alpha=8), quantization=quantization)
    assert fused._lm_parts is not None and is_frozen_linear(fused._lm_parts[1])
    torch.manual_seed(0)
    rollout = fused.generate([{"prompt": "7*3="}])
    a = _logprobs_and_lora_grads(fused, rollout, entropy_weight=-0.5)
    b = _logprobs_and_lora_grads(plain, rollout, entropy_weight=-0.5)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-4)
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=1e-3, atol=1e-4, msg=name)


def test_module_falls_back_to_logits_when_the_head_does_not_reproduce_them(
    tiny_model_dir, caplog, monkeypatch
):
    import lit_entropy.head

    monkeypatch.setattr(lit_entropy.head, "head_reproduces_logits", lambda *args: False)
    module = GRPO(policy=Policy(path=str(tiny_model_dir)), rewards=[_reward()])
    with caplog.at_level(logging.WARNING, logger="lit_entropy.head"):
        module.configure_model()
    assert module._lm_parts is None
    assert "computing log-probs from the full logits" in caplog.text


def test_head_reproduces_logits_detects_a_scaled_head(tiny_model_dir):
    from lit_entropy.model import causal_lm_parts, head_reproduces_logits, load_policy

    model, _ = load_policy(Policy(path=str(tiny_model_dir)))
    decoder, head = causal_lm_parts(model)
    assert head_reproduces_logits(model, decoder, head)
    scaled = nn.Linear(head.in_features, head.out_features, bias=False)
    with torch.no_grad():
        scaled.weight.copy_(head.weight * 0.5)  # what a logit-scaling model's forward would add
    assert not head_reproduces_logits(model, decoder, scaled)


def test_sampler_logprobs_replace_the_old_logprob_pass(tiny_model_dir, tmp_path, monkeypatch):
    """With ``sampler_logprobs`` an off-policy fit skips the no-grad pass and trains to nearly the same weights."""
    from lightning.pytorch import Trainer, seed_everything

    from lit_entropy.demo import CountdownDataModule

    calls: list[bool] = []
    original = GRPO._logprobs_no_grad

    def counted(self, *args, **kwargs):
        calls.append(self.sampler_logprobs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GRPO, "_logprobs_no_grad", counted)
    results = {}
    for flag in (False, True):
        seed_everything(0)
        module = GRPO(
            policy=Policy(path=str(tiny_model_dir), lora=LoRA(r=4, alpha=8)),
            rewards=[Reward(fn="lit_entropy.rewards.answer_format")],
            sampling=Sampling(group_size=2, max_new_tokens=6),
            ppo_epochs=2,
            learning_rate=1e-2,
            sampler_logprobs=flag,
            adapter_dir=str(tmp_path / f"adapter-{flag}"),
        )
        trainer = Trainer(
            accelerator="cpu",
            max_steps=4,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            default_root_dir=tmp_path,
        )
        trainer.fit(module, datamodule=CountdownDataModule(batch_size=2, num_train=8, num_val=2))
        results[flag] = (
            {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad},
            calls.count(flag),
        )
    (plain, plain_calls), (sampled, sampled_calls) = results[False], results[True]
    assert plain_calls == 2 and sampled_calls == 0  # 2 iterations; the sampler's log-probs replace the pass
    # fp32 on CPU: the two old log-prob sources agree to ~1e-6, so the weights nearly agree
    for name in plain:
        torch.testing.assert_close(sampled[name], plain[name], rtol=1e-3, atol=1e-4, msg=name)
