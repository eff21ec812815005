"""Rollouts: keep-masks, trimming and position ids of sequence batches, sampling with the tiny policy, and
log-probs of left-padded rows.

Shapes: ``B`` prompts, ``G`` completions per prompt, ``N = B*G``, ``P`` prompt length, ``T`` completion
length, ``V`` vocabulary (99 for the character tokenizer).
"""

from __future__ import annotations

import pytest
import torch

from lit_entropy.errors import ConfigError
from lit_entropy.model import LoRA, Policy, load_policy
from lit_entropy.module import GRPO
from lit_entropy.reward_spec import Reward
from lit_entropy.rollout import Sampling, SequenceBatch, completion_keep_mask, generate_rollout

PAD, EOS = 0, 1  # ids of the character tokenizer


def _char_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- completion_keep_mask ----------------------------------------------------------------------------


def test_keep_mask_stops_after_the_first_eos():
    ids = torch.tensor(
        [
            [5, EOS, 7, PAD],  # EOS in the middle: keep 5 and the EOS, drop what follows
            [5, 6, 7, 8],  # no EOS: truncated, everything kept
            [EOS, PAD, PAD, PAD],  # EOS first: only the EOS is kept
            [5, EOS, EOS, PAD],  # a second EOS is past the first one: dropped
        ]
    )
    mask, truncated = completion_keep_mask(ids, EOS)
    expected = torch.tensor(
        [
            [True, True, False, False],
            [True, True, True, True],
            [True, False, False, False],
            [True, True, False, False],
        ]
    )
    assert torch.equal(mask, expected)
    assert torch.equal(truncated, torch.tensor([False, True, False, False]))
    assert mask.dtype == torch.bool and truncated.dtype == torch.bool


def test_keep_mask_with_several_eos_ids():
    # Ids 1 and 9 both end a completion (e.g. <eos> and <|im_end|>); whichever comes first wins.
    ids = torch.tensor([[5, 9, 1, PAD], [5, 6, 1, 9], [5, 6, 7, 8]])
    mask, truncated = completion_keep_mask(ids, [1, 9])
    assert torch.equal(
        mask,
        torch.tensor([[True, True, False, False], [True, True, True, False], [True, True, True, True]]),
    )
    assert torch.equal(truncated, torch.tensor([False, False, True]))
    # With only id 1 as EOS, row 0's 9 is an ordinary token and its EOS is the third one.
    mask_one, _ = completion_keep_mask(ids, (1,))
    assert mask_one[0].tolist() == [True, True, True, False]


# --- SequenceBatch -----------------------------------------------------------------------------------


def _parts():
    # Two rows: prompt columns 0 and 1 are padding in both rows, completion columns 3 and 4 are unused.
    prompt_ids = torch.tensor([[PAD, PAD, 10, 11], [PAD, PAD, PAD, 12]])  # [2, P=4]
    prompt_mask = prompt_ids != PAD
    completion_ids = torch.tensor([[20, EOS, PAD, PAD, PAD], [21, 22, EOS, PAD, PAD]])  # [2, T=5]
    completion_mask = torch.tensor([[True, True, False, False, False], [True, True, True, False, False]])
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def test_sequence_batch_trims_padding_columns():
    batch = SequenceBatch.from_parts(*_parts())
    assert batch.prompt_ids.tolist() == [[10, 11], [PAD, 12]]
    assert batch.prompt_mask.tolist() == [[True, True], [False, True]]
    assert batch.completion_ids.tolist() == [[20, EOS, PAD], [21, 22, EOS]]
    assert batch.completion_mask.tolist() == [[True, True, False], [True, True, True]]
    assert batch.completion_length == 5


def test_sequence_batch_position_ids_count_real_tokens_only():
    inputs = SequenceBatch.from_parts(*_parts()).model_inputs()
    assert inputs["input_ids"].tolist() == [[10, 11, 20, EOS, PAD], [PAD, 12, 21, 22, EOS]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]]
    # Row 0: cumsum [1,2,3,4,4] - 1 = [0,1,2,3,3]; row 1: cumsum [0,1,2,3,4] - 1 clamped = [0,0,1,2,3].
    # The first real token of each row is at position 0, as if the row had no padding.
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 3], [0, 0, 1, 2, 3]]


def test_sequence_batch_pad_to_rollout_restores_completion_length():
    batch = SequenceBatch.from_parts(*_parts())
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # [n, T'=3]
    padded = batch.pad_to_rollout(values)
    assert padded.tolist() == [[1.0, 2.0, 3.0, 0.0, 0.0], [4.0, 5.0, 6.0, 0.0, 0.0]]
    full = torch.ones(2, 5)
    assert batch.pad_to_rollout(full) is full  # already [n, T]: returned as is


def test_sequence_batch_of_one_row_trims_to_that_row():
    prompt_ids, prompt_mask, completion_ids, completion_mask = _parts()
    batch = SequenceBatch.from_parts(prompt_ids[1:], prompt_mask[1:], completion_ids[:1], completion_mask[:1])
    assert batch.prompt_ids.tolist() == [[12]]  # row 1 alone uses only the last prompt column
    assert batch.completion_ids.tolist() == [[20, EOS]]  # row 0 alone uses two completion columns


# --- generate_rollout --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_and_tokenizer(tiny_model_dir):
    model, tokenizer = load_policy(Policy(path=str(tiny_model_dir), lora=LoRA(r=4, alpha=8)))
    model.eval()
    return model, tokenizer


def test_generate_rollout_shapes_layout_and_masks(policy_and_tokenizer):
    model, tokenizer = policy_and_tokenizer
    prompts = ["12+3=", "7*8="]  # 5 and 4 characters: the second is left-padded by one
    examples = [{"prompt": prompts[0], "id": 0}, {"prompt": prompts[1], "id": 1}]
    group, max_new = 3, 6

    calls = {"n": 0}

    def eos_on_third_step_of_row_0(module, inputs, logits):
        # An EOS bias in the model's output head: row 0 must end with EOS at completion position 2 and no
        # other row may end (so the expected masks are known exactly).
        calls["n"] += 1
        logits = logits.clone()
        logits[:, -1, EOS] = float("-inf")
        if calls["n"] == 3:
            logits[0, -1, EOS] = 1e4
        return logits

    handle = model.get_output_embeddings().register_forward_hook(eos_on_third_step_of_row_0)
    try:
        torch.manual_seed(0)
        sampling = Sampling(group_size=group, max_new_tokens=max_new)
        rollout = generate_rollout(model, tokenizer, prompts, examples, sampling, torch.device("cpu"))
    finally:
        handle.remove()

    n = len(prompts) * group
    assert rollout.num_sequences == n
    assert rollout.group_size == group
    assert rollout.prompt_ids.shape == rollout.prompt_mask.shape == (n, 5)
    assert rollout.completion_ids.shape == rollout.completion_mask.shape == (n, max_new)
    assert rollout.truncated.shape == (n,)
    assert len(rollout.completions) == len(rollout.examples) == n
    # Group-contiguous: rows i*G .. i*G+G-1 belong to prompt i.
    assert [example["id"] for example in rollout.examples] == [0, 0, 0, 1, 1, 1]
    assert rollout.prompt_ids[:3].tolist() == [_char_ids(tokenizer, "12+3=")] * 3
    assert rollout.prompt_ids[3:].tolist() == [[PAD, *_char_ids(tokenizer, "7*8=")]] * 3
    assert rollout.prompt_mask[3:, 0].tolist() == [False] * 3

    # Row 0 ends with EOS at position 2 (kept), then generation pads it; the others run to max_new_tokens.
    assert rollout.completion_ids[0, 2] == EOS
    assert rollout.completion_ids[0, 3:].tolist() == [PAD] * 3
    assert rollout.completion_mask.sum(-1).tolist() == [3, 6, 6, 6, 6, 6]
    assert rollout.truncated.tolist() == [False, True, True, True, True, True]

    special = set(tokenizer.all_special_ids)
    for row in range(n):
        kept = rollout.completion_ids[row][rollout.completion_mask[row]].tolist()
        expected_text = tokenizer.decode([i for i in kept if i not in special])
        assert rollout.completions[row] == expected_text
        assert rollout.truncated[row] == (EOS not in rollout.completion_ids[row].tolist())


def test_generate_rollout_rejects_a_too_long_prompt_naming_it(policy_and_tokenizer):
    model, tokenizer = policy_and_tokenizer
    prompts = ["1+2=", "123456789+1="]  # 4 and 12 characters
    sampling = Sampling(group_size=2, max_new_tokens=2, max_prompt_length=10)
    with pytest.raises(ConfigError, match=r"prompt 1 has 12 tokens.*max_prompt_length=10.*'123456789\+1='"):
        generate_rollout(model, tokenizer, prompts, [{}, {}], sampling, torch.device("cpu"))


# --- log-probs of padded rows ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 (learned absolute position embeddings) with the character tokenizer.

    Rotary models (qwen2) only see position differences, so a left-padded row scored with shifted position ids
    gives the same log-probs; with absolute positions it does not, which is what makes the test below bite.
    """
    from transformers import AutoModelForCausalLM, GPT2Config

    from lit_entropy.demo import build_char_tokenizer

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    tokenizer = build_char_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=None,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("architecture", ["qwen2", "gpt2"])
def test_sequence_logprobs_of_a_left_padded_row_match_the_row_alone(
    architecture, tiny_model_dir, tiny_gpt2_dir, char_tokenizer
):
    temperature = 0.7
    folder = tiny_model_dir if architecture == "qwen2" else tiny_gpt2_dir
    module = GRPO(
        policy=Policy(path=str(folder), lora=LoRA(r=4, alpha=8)),
        rewards=[Reward(fn="lit_entropy.rewards.exact_match")],
        sampling=Sampling(group_size=2, max_new_tokens=4, temperature=temperature),
    )
    module.configure_model()
    module.policy.eval()
    with torch.no_grad():  # non-zero adapters, so that the LoRA path is part of what is compared
        generator = torch.Generator().manual_seed(0)
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)

    long_prompt, short_prompt = _char_ids(char_tokenizer, "12+34="), _char_ids(char_tokenizer, "5=")
    completion_long, completion_short = _char_ids(char_tokenizer, "46!"), _char_ids(char_tokenizer, "5")
    pad = len(long_prompt) - len(short_prompt)
    prompt_ids = torch.tensor([long_prompt, [PAD] * pad + short_prompt])  # [2, 6], row 1 left-padded
    prompt_mask = prompt_ids != PAD
    completion_ids = torch.tensor([completion_long + [EOS], completion_short + [EOS, PAD, PAD]])  # [2, 4]
    completion_mask = torch.tensor([[True] * 4, [True, True, False, False]])

    with torch.no_grad():
        batch = SequenceBatch.from_parts(prompt_ids, prompt_mask, completion_ids, completion_mask)
        logprobs, entropy = module.sequence_logprobs(batch)  # [2, 4]
        alone = SequenceBatch.from_parts(
            prompt_ids[1:, pad:], prompt_mask[1:, pad:], completion_ids[1:], completion_mask[1:]
        )
        logprobs_alone, entropy_alone = module.sequence_logprobs(alone)  # [1, 4]: trimmed to 2, padded back

        # Independent: a plain forward over the unpadded row, log_softmax at the sampling temperature.
        ids = torch.tensor([short_prompt + completion_short + [EOS]])  # [1, 4]
        logits = module.policy(input_ids=ids).logits[0, len(short_prompt) - 1 : -1] / temperature  # [2, V]
        naive = torch.log_softmax(logits, -1)
        naive_logprobs = naive.gather(-1, ids[0, len(short_prompt) :, None]).squeeze(-1)  # [2]
        naive_entropy = -(naive.exp() * naive).sum(-1)  # [2]

    assert logprobs.shape == entropy.shape == (2, 4)
    assert torch.allclose(logprobs[1, :2], logprobs_alone[0, :2], atol=1e-5)
    assert torch.allclose(entropy[1, :2], entropy_alone[0, :2], atol=1e-5)
    assert torch.allclose(logprobs[1, :2], naive_logprobs, atol=1e-5)
    assert torch.allclose(entropy[1, :2], naive_entropy, atol=1e-5)
    assert logprobs_alone[0, 2:].tolist() == [0.0, 0.0]  # padded back with zeros
