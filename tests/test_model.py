"""Tokenizer and policy loading on the tiny offline model.

Covers ids, trainable sets, the reference policy, gradient checkpointing and 4-bit weights.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_entropy.demo import build_char_tokenizer, build_tiny_causal_lm
from lit_entropy.errors import ConfigError, LitEntropyError, ModelLoadError
from lit_entropy.model import (
    LoRA,
    Policy,
    Quantization,
    load_policy,
    reference_context,
    trainable_parameters,
)
from lit_entropy.tokenizer import load_tokenizer

SAMPLE = "Q: 12 + 34 * 5 - 6 > 7?\nA: yes Xy"


def _sample_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(SAMPLE)["input_ids"]])  # [1, T]


def _set_lora_b_nonzero(model: torch.nn.Module, seed: int = 0) -> int:
    """Fill every LoRA B matrix with N(0, 0.5^2); at init B = 0, so the adapters would change nothing."""
    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
                count += 1
    return count


def _copy_folder_without(src: Path, dst: Path, drop: set[str]) -> Path:
    dst.mkdir()
    for item in src.iterdir():
        if item.name not in drop:
            shutil.copy(item, dst / item.name)
    return dst


# --- tokenizer ---------------------------------------------------------------------------------------


def test_char_tokenizer_one_id_per_character(char_tokenizer):
    # Ids: 3 specials first, then chr(32 + k) -> 3 + k. '5' = chr(53) -> 24, '+' = chr(43) -> 14,
    # '7' = chr(55) -> 26, ' ' -> 3, '~' = chr(126) -> 97, '\n' is the last token -> 98.
    assert char_tokenizer("5+7")["input_ids"] == [24, 14, 26]
    assert char_tokenizer(" ~\n")["input_ids"] == [3, 97, 98]
    assert len(char_tokenizer) == 3 + 95 + 1
    assert (char_tokenizer.pad_token_id, char_tokenizer.eos_token_id, char_tokenizer.unk_token_id) == (
        0,
        1,
        2,
    )
    assert char_tokenizer.bos_token is None
    assert char_tokenizer.chat_template is None
    assert char_tokenizer.padding_side == "left"
    # Characters outside printable ASCII fall back to <unk>.
    assert char_tokenizer("a\u00e9b")["input_ids"] == [ord("a") - 29, 2, ord("b") - 29]


def test_char_tokenizer_round_trips_text_exactly(char_tokenizer):
    text = "  a  b .,;\n x = (1 + 2) * 3 ."  # double spaces, " ." and a newline must survive
    ids = char_tokenizer(text)["input_ids"]
    assert len(ids) == len(text)
    assert char_tokenizer.decode(ids) == text


def test_char_tokenizer_pads_on_the_left(char_tokenizer):
    batch = char_tokenizer(["12", "3"], padding=True)
    # "3" is one token shorter, so one <pad> (id 0) goes in front of it: '1' = chr(49) -> 49 - 29 = 20,
    # '2' -> 21, '3' -> 22.
    assert batch["input_ids"] == [[20, 21], [0, 22]]
    assert batch["attention_mask"] == [[1, 1], [0, 1]]


def test_load_tokenizer_keeps_char_ids_despite_qwen2_config(tiny_model_dir, char_tokenizer):
    assert json.loads((tiny_model_dir / "config.json").read_text())["model_type"] == "qwen2"
    tokenizer = load_tokenizer(str(tiny_model_dir))
    expected = char_tokenizer(SAMPLE)["input_ids"]
    assert tokenizer(SAMPLE)["input_ids"] == expected
    assert len(expected) == len(SAMPLE)
    assert tokenizer.decode(expected) == SAMPLE
    assert tokenizer.padding_side == "left"
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)


def test_load_tokenizer_without_tokenizer_class_uses_tokenizer_json(tiny_model_dir, char_tokenizer, tmp_path):
    folder = _copy_folder_without(tiny_model_dir, tmp_path / "tok", drop=set())
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["tokenizer_class"]
    config["padding_side"] = "right"  # the loader must override it
    config_file.write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer(SAMPLE)["input_ids"] == char_tokenizer(SAMPLE)["input_ids"]
    assert tokenizer.padding_side == "left"


def test_load_tokenizer_pads_with_eos_when_no_pad_token(tiny_model_dir, tmp_path, caplog):
    folder = _copy_folder_without(tiny_model_dir, tmp_path / "tok", drop=set())
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["pad_token"]
    config_file.write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="lit_entropy.tokenizer"):
        tokenizer = load_tokenizer(str(folder))
    assert tokenizer.pad_token == "<eos>"
    assert tokenizer.pad_token_id == 1
    assert any("no pad token" in record.getMessage() for record in caplog.records)

    del config["eos_token"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="no pad or eos token"):
        load_tokenizer(str(folder))


def test_load_tokenizer_errors_name_the_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match="nowhere"):
        load_tokenizer(str(missing))
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="empty_folder.*no tokenizer files"):
        load_tokenizer(str(empty))


# --- load_policy: trainable parameters ---------------------------------------------------------------


def test_load_policy_with_lora_trains_only_adapters(tiny_model_dir):
    model, tokenizer = load_policy(Policy(path=str(tiny_model_dir), lora=LoRA(r=4, alpha=8)))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    # "all-linear" adapts q, k, v, o, gate, up, down in each of 2 layers; each adapter has A and B.
    assert len(trainable) == 2 * 7 * 2
    assert all("lora_" in name for name in trainable)
    assert all(not param.requires_grad for name, param in model.named_parameters() if "lora_" not in name)
    assert len(trainable_parameters(model)) == len(trainable)
    # Rank 4 on a 32 -> 32 projection: A is [4, 32], B is [32, 4].
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A["default"].weight.shape == (4, 32)
    assert q_proj.lora_B["default"].weight.shape == (32, 4)
    assert model.config.use_cache is True
    assert tokenizer(SAMPLE)["input_ids"] == build_char_tokenizer()(SAMPLE)["input_ids"]


def test_load_policy_without_lora_trains_everything(tiny_model_dir):
    model, _ = load_policy(Policy(path=str(tiny_model_dir), lora=None))
    params = list(model.parameters())
    assert len(params) > 0
    assert all(param.requires_grad for param in params)
    assert trainable_parameters(model) == params
    assert not any("lora_" in name for name, _ in model.named_parameters())
    with pytest.raises(ConfigError, match="set policy.lora or kl_coef: 0"):
        reference_context(model)


def test_load_policy_matches_base_weights_and_dtype(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model, _ = load_policy(Policy(path=str(tiny_model_dir), lora=None, dtype="bfloat16"))
    assert model.dtype == torch.bfloat16
    for (name, expected), (_, loaded) in zip(base.named_parameters(), model.named_parameters()):
        assert torch.equal(loaded.float(), expected.bfloat16().float()), name


# --- reference policy --------------------------------------------------------------------------------


def test_reference_context_gives_base_logits(tiny_model_dir, char_tokenizer):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model, _ = load_policy(Policy(path=str(tiny_model_dir)))
    model.eval()
    ids = _sample_ids(char_tokenizer)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits  # [1, T, V]
        # B = 0 at init: the fresh adapters change nothing yet.
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits, rtol=0, atol=1e-6)

        assert _set_lora_b_nonzero(model) == 14
        with reference_context(model):
            reference_logits = model(input_ids=ids).logits
        policy_logits = model(input_ids=ids).logits

    torch.testing.assert_close(reference_logits, base_logits, rtol=0, atol=1e-6)
    # Leaving the context switches the adapters back on: the policy moved away from the base.
    assert (policy_logits - base_logits).abs().max() > 1e-2


# --- gradient checkpointing --------------------------------------------------------------------------


def test_gradient_checkpointing_with_lora_matches_plain_backward(tiny_model_dir, char_tokenizer):
    ids = _sample_ids(char_tokenizer)
    plain, _ = load_policy(Policy(path=str(tiny_model_dir)))
    checkpointed, _ = load_policy(Policy(path=str(tiny_model_dir), gradient_checkpointing=True))
    assert checkpointed.config.use_cache is True
    _set_lora_b_nonzero(plain)
    # LoRA A is drawn at random on each load: give both models the same adapters.
    with torch.no_grad():
        named_plain = dict(plain.named_parameters())
        for name, param in checkpointed.named_parameters():
            if "lora_" in name:
                param.copy_(named_plain[name])
    plain.train()
    checkpointed.train()

    # Checkpointing recomputes each block's forward during backward: count the calls of the first block's
    # first norm. (Hooks on the block itself sit outside the checkpoint, and torch stops the recompute
    # early once the saved tensors are rebuilt, so a hook on the block's last module may not fire either.)
    calls = []
    norm = checkpointed.base_model.model.model.layers[0].input_layernorm
    handle = norm.register_forward_hook(lambda *_: calls.append(1))
    loss_plain = plain(input_ids=ids, labels=ids, use_cache=False).loss
    loss_checkpointed = checkpointed(input_ids=ids, labels=ids, use_cache=False).loss
    assert len(calls) == 1
    loss_plain.backward()
    loss_checkpointed.backward()
    handle.remove()
    assert len(calls) == 2

    torch.testing.assert_close(loss_checkpointed, loss_plain, rtol=0, atol=1e-6)
    lora_params = [(n, p) for n, p in checkpointed.named_parameters() if p.requires_grad]
    assert len(lora_params) == 28
    for name, param in lora_params:
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, named_plain[name].grad, rtol=1e-4, atol=1e-6)


# --- 4-bit -------------------------------------------------------------------------------------------


def test_4bit_nf4_lora_forward_backward(tiny_model_dir, char_tokenizer):
    bnb = pytest.importorskip("bitsandbytes")
    policy = Policy(path=str(tiny_model_dir), quantization=Quantization(compute_dtype="float32"))
    model, _ = load_policy(policy)

    quantized = {
        name: module for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)
    }
    # Every adapted projection (7 per layer, 2 layers) sits on a 4-bit base layer; the tied head stays dense.
    assert len(quantized) == 14
    assert all(name.endswith("base_layer") for name in quantized)
    assert all(module.weight.quant_state.quant_type == "nf4" for module in quantized.values())
    assert not isinstance(model.base_model.model.lm_head, bnb.nn.Linear4bit)

    _set_lora_b_nonzero(model)
    ids = _sample_ids(char_tokenizer)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    lora_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(lora_params) == 28 and all("lora_" in n for n, _ in lora_params)
    for name, param in lora_params:
        assert param.grad is not None and param.grad.abs().sum() > 0, name

    # Adapters off, the 4-bit model is close to the fp32 base: nf4 error on these small random weights
    # moves the mean token cross-entropy (about ln 99 = 4.6 nats) by far less than 0.05 nats.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad(), reference_context(model):
        loss_4bit = model(input_ids=ids, labels=ids).loss
    loss_base = base(input_ids=ids, labels=ids).loss
    assert abs(loss_4bit.item() - loss_base.item()) < 0.05


def test_quantization_without_bitsandbytes_says_which_extra(tiny_model_dir, monkeypatch):
    # A None entry in sys.modules makes `import bitsandbytes` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match=r"pip install 'lit-entropy\[4bit\]'"):
        load_policy(Policy(path=str(tiny_model_dir), quantization=Quantization()))


def test_model_module_imports_without_bitsandbytes_or_peft():
    code = "import sys, lit_entropy.model; print('bitsandbytes' in sys.modules, 'peft' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


# --- validation errors -------------------------------------------------------------------------------


def test_policy_errors_name_the_field(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="policy.path is required"):
        Policy().validate()

    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError, match=f"policy.path: model folder '{missing}' does not exist"):
        Policy(path=str(missing)).check_files()
    Policy(path=str(missing)).validate()  # settings alone: reads no file
    with pytest.raises(ModelLoadError, match="no_such_model"):
        load_policy(Policy(path=str(missing)))

    no_config = _copy_folder_without(tiny_model_dir, tmp_path / "no_config", drop={"config.json"})
    with pytest.raises(ModelLoadError, match="no_config.*config.json"):
        Policy(path=str(no_config)).check_files()

    with pytest.raises(ModelLoadError, match="policy.tokenizer_path.*missing_tok"):
        Policy(path=str(tiny_model_dir), tokenizer_path=str(tmp_path / "missing_tok")).check_files()

    with pytest.raises(ConfigError, match="policy.lora.r must be an integer >= 1, got 0"):
        Policy(path=str(tiny_model_dir), lora=LoRA(r=0)).validate()
    with pytest.raises(ConfigError, match=r"policy.lora.dropout must be in \[0, 1\), got 1.0"):
        Policy(path=str(tiny_model_dir), lora=LoRA(dropout=1.0)).validate()
    with pytest.raises(ConfigError, match="policy.lora.target_modules"):
        Policy(path=str(tiny_model_dir), lora=LoRA(target_modules=[])).validate()
    with pytest.raises(ConfigError, match="policy.dtype must be one of"):
        Policy(path=str(tiny_model_dir), dtype="float8").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="policy.quantization.quant_type"):
        bad_quant = Quantization(quant_type="int4")  # type: ignore[arg-type]
        Policy(path=str(tiny_model_dir), quantization=bad_quant).validate()
    with pytest.raises(ConfigError, match="policy.quantization needs policy.lora"):
        Policy(path=str(tiny_model_dir), quantization=Quantization(), lora=None).validate()

    Policy(path=str(tiny_model_dir)).validate()  # the defaults on a real folder are valid
    Policy(path=str(tiny_model_dir)).check_files()


def test_load_policy_folder_without_weights(tiny_model_dir, tmp_path):
    folder = _copy_folder_without(tiny_model_dir, tmp_path / "no_weights", drop={"model.safetensors"})
    with pytest.raises(ModelLoadError, match="no_weights"):
        load_policy(Policy(path=str(folder)))


def test_errors_share_the_project_base_class():
    assert issubclass(ModelLoadError, LitEntropyError) and issubclass(ConfigError, LitEntropyError)


# --- tiny model builder ------------------------------------------------------------------------------


def test_build_tiny_causal_lm_is_seeded_without_touching_global_rng():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = build_tiny_causal_lm(vocab_size=10, hidden_size=16, num_heads=2, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = build_tiny_causal_lm(vocab_size=10, hidden_size=16, num_heads=2, seed=5)
    other = build_tiny_causal_lm(vocab_size=10, hidden_size=16, num_heads=2, seed=6)
    pairs = list(zip(first.parameters(), again.parameters()))
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters()))


def test_build_tiny_causal_lm_shapes_and_types():
    llama = build_tiny_causal_lm(vocab_size=10, hidden_size=16, num_heads=2, model_type="llama")
    assert llama.config.model_type == "llama"
    assert llama.config.num_key_value_heads == 2
    assert llama.config.intermediate_size == 64  # default 4 * hidden_size
    assert llama.get_output_embeddings().weight.data_ptr() == llama.get_input_embeddings().weight.data_ptr()
    logits = llama(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 10)  # [N, T, V]
    untied = build_tiny_causal_lm(vocab_size=10, hidden_size=16, num_heads=2, tie_word_embeddings=False)
    assert untied.get_output_embeddings().weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()
    with pytest.raises(ConfigError, match=r"hidden_size \(30\) must be divisible by num_heads \(4\)"):
        build_tiny_causal_lm(vocab_size=10, hidden_size=30, num_heads=4)
