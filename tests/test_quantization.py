"""4-bit layers run one numerical path on every CPU: bitsandbytes' AVX512-BF16 repack is kept off.

bitsandbytes sets ``Linear4bit.support_avx512bf16_for_cpu`` from the CPU at construction. Each test forces that
capability both ways (by patching the probe the constructor calls), so a machine of either kind exercises both
code paths. The model widths are 32 (below the 64-wide quantization block, where the repack fails outright) and
128 (where it succeeds and changes the numerics).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything

from lit_entropy.demo import build_char_tokenizer, build_tiny_causal_lm
from lit_entropy.errors import ModelLoadError
from lit_entropy.model import LoRA, Policy, Quantization, load_policy
from lit_entropy.quantization import is_cpu_repacked, keep_cpu_weights_unpacked

bnb = pytest.importorskip("bitsandbytes")

CAPABILITY = pytest.mark.parametrize("avx512bf16", [False, True], ids=["plain-cpu", "avx512bf16-cpu"])


@pytest.fixture(scope="module", params=[32, 128], ids=["width32", "width128"])
def model_dir(request, tmp_path_factory) -> Path:
    tokenizer = build_char_tokenizer()
    folder = tmp_path_factory.mktemp(f"w{request.param}")
    build_tiny_causal_lm(
        vocab_size=len(tokenizer), hidden_size=request.param, num_layers=1, num_heads=4, seed=1
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _load(model_dir: Path, monkeypatch, avx512bf16: bool):
    # Linear4bit.__init__ reads the CPU capability through this name; patching it is what a CPU of the other
    # kind would answer.
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: avx512bf16)
    policy = Policy(
        path=str(model_dir), lora=LoRA(r=4, alpha=8), quantization=Quantization(compute_dtype="float32")
    )
    model, _ = load_policy(policy)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "the policy has no 4-bit layer"
    return model, layers


def _ids() -> torch.Tensor:
    return torch.tensor([[3, 17, 40, 41, 9, 60, 22, 5]])


@CAPABILITY
def test_loaded_4bit_layers_never_repack(model_dir, monkeypatch, avx512bf16):
    model, layers = _load(model_dir, monkeypatch, avx512bf16)
    assert all(layer.support_avx512bf16_for_cpu is False for layer in layers)
    model.eval()
    with torch.no_grad():  # the phase in which bitsandbytes repacks: generation, old and reference log-probs
        sampled = model(input_ids=_ids()).logits
    assert not is_cpu_repacked(model)
    model.train()
    trained = model(input_ids=_ids()).logits
    # The same dequantize-then-matmul path in both phases: a fully on-policy ratio is exactly 1.
    torch.testing.assert_close(trained.detach(), sampled, rtol=0, atol=0)
    trained.float().logsumexp(-1).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_both_capabilities_give_the_same_logits(model_dir, monkeypatch):
    outputs = []
    for avx512bf16 in (False, True):
        model, _ = _load(model_dir, monkeypatch, avx512bf16)
        with torch.no_grad():
            outputs.append(model.eval()(input_ids=_ids()).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_a_layer_repacked_before_the_guard_is_refused():
    # Repack by hand (the conversion itself is plain torch, so this runs on any CPU): bitsandbytes' inverse
    # does not restore the scales exactly, so the guard must refuse the layer rather than convert it back.
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    torch.manual_seed(0)
    layer = torch.nn.Sequential(bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32))
    layer[0].weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4")
    layer[0].weight._quantize("cpu")
    assert keep_cpu_weights_unpacked(layer) == 1 and not is_cpu_repacked(layer)
    weight = layer[0].weight
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    assert is_cpu_repacked(layer)
    with pytest.raises(ModelLoadError, match=r"4-bit layer '0' was already repacked .*load_policy"):
        keep_cpu_weights_unpacked(layer)


@CAPABILITY
def test_qlora_fit_at_a_repackable_width(tmp_path, monkeypatch, avx512bf16):
    # 128 wide: wide enough for bitsandbytes' repack; a fit with validation (eval-mode generation) on either CPU.
    from harness import WeightsAtStart, quiet_trainer

    from lit_entropy.demo import CountdownDataModule
    from lit_entropy.module import GRPO
    from lit_entropy.reward_spec import Reward
    from lit_entropy.rollout import Sampling

    tokenizer = build_char_tokenizer()
    folder = tmp_path / "w128"
    build_tiny_causal_lm(
        vocab_size=len(tokenizer), hidden_size=128, num_layers=1, num_heads=4
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: avx512bf16)
    seed_everything(0)
    module = GRPO(
        policy=Policy(
            path=str(folder), lora=LoRA(r=4, alpha=8), quantization=Quantization(compute_dtype="float32")
        ),
        rewards=[Reward(fn="harness.char_code_reward")],
        sampling=Sampling(group_size=2, max_new_tokens=4),
        minibatch_size=2,
        learning_rate=1e-2,
        adapter_dir=str(tmp_path / "adapter"),
    )
    recorder = WeightsAtStart()
    # validation generates in eval mode without grad: where bitsandbytes repacks
    trainer = quiet_trainer(tmp_path, 2, limit_val_batches=1, val_check_interval=1, callbacks=[recorder])
    trainer.fit(module, CountdownDataModule(batch_size=1, num_train=8, num_val=2))
    assert trainer.global_step == 2
    assert not is_cpu_repacked(module.policy)
    after = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    start = recorder.weights
    assert start and any(not torch.equal(after[n], start[n]) for n in start)
