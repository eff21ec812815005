"""The GRPO LightningModule end to end on the tiny model: short fits, what they log, what they train and save,
micro-batch invariance, the reference pass, checkpoints, failing rewards, validation, config errors and 4-bit.

Shapes: ``B`` prompts, ``G`` completions per prompt, ``N = B*G``, ``T`` completion length, ``V`` vocabulary.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

import lit_entropy.module
from lit_entropy.demo import CountdownDataModule
from lit_entropy.errors import ConfigError
from lit_entropy.loss import Loss
from lit_entropy.model import LoRA, Policy, Quantization
from lit_entropy.module import GRPO
from lit_entropy.preflight import PROBE_ROWS
from lit_entropy.regularizer import scalar_outputs
from lit_entropy.reward_spec import Reward
from lit_entropy.rollout import Sampling

VOCAB = 99  # the character tokenizer's V
EOS = 1

#: (completion, reward) of every call of `char_code_reward`, in call order.
REWARD_LOG: list[tuple[str, float]] = []
_FLAKY_CALLS = itertools.count()


def char_code_reward(completion: str, example: dict) -> float:
    """Mean character code / 128: differs between random completions, so advantages are non-zero."""
    value = sum(map(ord, completion)) / (128.0 * max(len(completion), 1))
    REWARD_LOG.append((completion, value))
    return value


def flaky_reward(completion: str, example: dict) -> float:
    """Raises on every second call."""
    if next(_FLAKY_CALLS) % 2:
        raise RuntimeError("flaky reward failed")
    return 1.0


def _reward(name: str = "char_code_reward") -> Reward:
    return Reward(fn=f"{__name__}.{name}")


def _module(tiny_model_dir: Path, tmp_path: Path, **overrides) -> GRPO:
    arguments = dict(
        policy=Policy(path=str(tiny_model_dir), lora=LoRA(r=4, alpha=8)),
        rewards=[_reward()],
        sampling=Sampling(group_size=2, max_new_tokens=6),
        learning_rate=1e-2,
        adapter_dir=str(tmp_path / "adapter"),
    )
    arguments.update(overrides)
    return GRPO(**arguments)


def _trainer(tmp_path: Path, max_steps: int, **overrides) -> Trainer:
    arguments = dict(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    arguments.update(overrides)
    return Trainer(**arguments)


def _data(batch_size: int = 2) -> CountdownDataModule:
    return CountdownDataModule(batch_size=batch_size, num_train=16, num_val=4)


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


class Snapshot(Callback):
    """Trainable weights at the start of training and every training_step's returned statistics."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.outputs: list[dict[str, float]] = []
        self.optimizer_steps_at_start: list[int] = []

    def on_train_start(self, trainer, pl_module):
        self.start = _trainable(pl_module)
        state = trainer.optimizers[0].state
        self.optimizer_steps_at_start = [int(s["step"]) for s in state.values()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(scalar_outputs(outputs))


class CountCalls:
    """Wraps a function and counts its calls (a spy; the real function still runs)."""

    def __init__(self, function):
        self.function = function
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


# --- one short fit, inspected by several tests -------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(tiny_model_dir, tmp_path_factory):
    """3 RL iterations, B = 2, G = 2, fully on-policy (one update per rollout), kl_coef = 0."""
    tmp_path = tmp_path_factory.mktemp("fit")
    seed_everything(0)
    REWARD_LOG.clear()
    snapshot = Snapshot()
    module = _module(tiny_model_dir, tmp_path)
    trainer = _trainer(tmp_path, max_steps=3, callbacks=[snapshot])
    spy = CountCalls(lit_entropy.module.reference_context)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lit_entropy.module, "reference_context", spy)
        trainer.fit(module, _data())
    return trainer, module, snapshot, list(REWARD_LOG), spy, tmp_path


def test_fit_logs_rollout_and_train_metrics(fitted):
    trainer, _, snapshot, _, _, _ = fitted
    assert trainer.global_step == 3
    expected = {
        "rollout/reward_mean",
        "rollout/reward_std",
        "rollout/completion_length",
        "rollout/truncated_frac",
        "rollout/frac_zero_std",
        "rollout/reward_errors",
        "rollout/reward/char_code_reward",
        "train/entropy",
        "train/loss",
        "train/clip_frac_low",
        "train/clip_frac_high",
        "train/grad_norm",
        "train/tokens_per_sec",
    }
    assert expected <= set(trainer.logged_metrics)
    assert expected <= set(trainer.callback_metrics)
    entropy = trainer.callback_metrics["train/entropy"].item()
    assert 0.0 < entropy <= math.log(VOCAB) + 1e-5
    assert trainer.callback_metrics["train/tokens_per_sec"].item() > 0
    assert trainer.callback_metrics["train/grad_norm"].item() > 0
    assert 0 < trainer.callback_metrics["rollout/completion_length"].item() <= 6
    assert 0.0 <= trainer.callback_metrics["rollout/truncated_frac"].item() <= 1.0
    assert trainer.callback_metrics["rollout/reward_errors"].item() == 0.0
    assert len(snapshot.outputs) == 3
    for output in snapshot.outputs:
        assert 0.0 < output["entropy"] <= math.log(VOCAB) + 1e-5


def test_fit_reward_statistics_match_the_scored_completions(fitted):
    _, _, snapshot, reward_log, _, _ = fitted
    num_sequences, group = 4, 2
    # preflight first scores the first training rows' answers (to catch rewards that cannot work)
    reward_log = reward_log[PROBE_ROWS:]
    assert len(reward_log) == 3 * num_sequences  # every completion of every iteration scored once
    for iteration, output in enumerate(snapshot.outputs):
        rewards = torch.tensor(
            [v for _, v in reward_log[iteration * num_sequences : (iteration + 1) * num_sequences]]
        )
        # Independent: mean, unbiased std, and the fraction of groups of G = 2 with equal rewards.
        groups = rewards.reshape(-1, group)
        zero_std = sum(float(g[0] == g[1]) for g in groups) / len(groups)
        assert output["rollout/reward_mean"] == pytest.approx(rewards.mean().item(), abs=1e-6)
        assert output["rollout/reward_std"] == pytest.approx(rewards.std(correction=1).item(), abs=1e-6)
        assert output["rollout/reward/char_code_reward"] == pytest.approx(rewards.mean().item(), abs=1e-6)
        assert output["rollout/frac_zero_std"] == pytest.approx(zero_std)


def test_on_policy_fit_never_clips(fitted):
    # One update per rollout: old log-probs are the current ones, the ratio is exactly 1.
    _, module, snapshot, _, _, _ = fitted
    assert module.batch_split(prompts=2).updates == 1  # N = 2 prompts x 2 completions, one mini-batch
    for output in snapshot.outputs:
        assert output["train/clip_frac_low"] == 0.0
        assert output["train/clip_frac_high"] == 0.0
        assert output["train/updates"] == 1.0


def test_fit_without_kl_never_runs_the_reference_pass(fitted):
    trainer, _, _, _, spy, _ = fitted
    assert spy.calls == 0
    assert "train/kl" not in trainer.callback_metrics


def test_fit_changes_only_adapter_weights(fitted, tiny_model_dir):
    _, module, snapshot, _, _, _ = fitted
    trainable = _trainable(module)
    assert trainable and all("lora_" in name for name in trainable)
    changed = [name for name in trainable if not torch.equal(trainable[name], snapshot.start[name])]
    assert changed, "no LoRA weight changed"
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    base = module.policy.get_base_model()
    compared = 0
    for name, param in base.named_parameters():
        if "lora_" in name:
            continue
        assert torch.equal(param.detach(), fresh[name.replace(".base_layer", "")]), name
        compared += 1
    assert compared == len(list(AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters()))


def test_fit_saves_a_reloadable_peft_adapter(fitted, tiny_model_dir, char_tokenizer):
    from peft import PeftModel

    _, module, _, _, _, tmp_path = fitted
    folder = tmp_path / "adapter"
    assert (folder / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder).eval()
    ids = torch.tensor([char_tokenizer("12+34=46")["input_ids"]])
    module.policy.eval()
    with torch.no_grad():
        expected = module.policy(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-5)  # the adapter is not a no-op


# --- micro-batch invariance --------------------------------------------------------------------------


class EosBias(Callback):
    """Adds a constant to the EOS logit of the policy's output head, so that completion lengths vary.

    A fixed change of the model (like a bias parameter), applied to sampling and scoring alike.
    """

    def __init__(self, bias: float) -> None:
        self.bias = bias
        self.handle = None

    def on_fit_start(self, trainer, pl_module):
        def add_bias(module, inputs, logits):
            logits = logits.clone()
            logits[..., EOS] += self.bias
            return logits

        self.handle = pl_module.policy.get_output_embeddings().register_forward_hook(add_bias)

    def on_fit_end(self, trainer, pl_module):
        self.handle.remove()


class GradientRecorder(Callback):
    """The gradient of every trainable weight just before each optimizer step (after accumulation)."""

    def __init__(self) -> None:
        self.gradients: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.gradients.append(
            {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        )


def _first_update_gradient(tiny_model_dir, tmp_path, microbatch_size, aggregation):
    seed_everything(0)  # same rollout and same LoRA initialisation in every run
    recorder, snapshot = GradientRecorder(), Snapshot()
    module = _module(
        tiny_model_dir,
        tmp_path,
        sampling=Sampling(group_size=4, max_new_tokens=6),
        microbatch_size=microbatch_size,
        loss=Loss(aggregation=aggregation),
        max_grad_norm=None,
    )
    trainer = _trainer(tmp_path, max_steps=1, callbacks=[EosBias(3.0), recorder, snapshot])
    trainer.fit(module, _data())
    assert len(recorder.gradients) == 1
    return recorder.gradients[0], snapshot.outputs[0]


def test_gradient_does_not_depend_on_microbatch_size(tiny_model_dir, tmp_path):
    num_sequences = 2 * 4  # B = 2 prompts, G = 4
    gradients = {}
    for aggregation in ("token-mean", "seq-mean-token-mean"):
        whole, stats = _first_update_gradient(tiny_model_dir, tmp_path, num_sequences, aggregation)
        halves, _ = _first_update_gradient(tiny_model_dir, tmp_path, num_sequences // 2, aggregation)
        # The rollout mixes ended and truncated completions, so micro-batches hold different token counts
        # and the two aggregations differ.
        assert 0.0 < stats["rollout/truncated_frac"] < 1.0
        assert whole.keys() == halves.keys() and whole
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in whole.values()]))
        assert norm > 1e-4
        for name in whole:
            assert torch.allclose(halves[name], whole[name], atol=1e-5, rtol=1e-4), (aggregation, name)
        gradients[aggregation] = whole
    differs = [
        not torch.allclose(gradients["token-mean"][n], gradients["seq-mean-token-mean"][n], atol=1e-6)
        for n in gradients["token-mean"]
    ]
    assert any(differs)


# --- the reference pass, validation ------------------------------------------------------------------


def test_fit_with_kl_runs_the_reference_pass_and_logs_kl(tiny_model_dir, tmp_path, monkeypatch):
    spy = CountCalls(lit_entropy.module.reference_context)
    monkeypatch.setattr(lit_entropy.module, "reference_context", spy)
    seed_everything(0)
    snapshot = Snapshot()
    module = _module(tiny_model_dir, tmp_path, loss=Loss(kl_coef=0.1), microbatch_size=2)
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[snapshot], limit_val_batches=1, val_check_interval=2)
    trainer.fit(module, _data())
    # 2 iterations x (N = 4 rows / micro-batches of 2) no-grad reference forwards.
    assert spy.calls == 2 * 2
    for output in snapshot.outputs:
        assert output["train/kl"] >= 0.0 and math.isfinite(output["train/kl"])
    assert trainer.callback_metrics["train/kl"].item() >= 0.0
    # Adapters start at zero (LoRA B = 0): the first iteration's policy is the reference, KL = 0.
    assert snapshot.outputs[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)
    assert snapshot.outputs[1]["train/kl"] > 0.0
    # Validation ran at the end of the second iteration.
    assert {"val/accuracy", "val/reward"} <= set(trainer.callback_metrics)


def test_validate_logs_greedy_accuracy_and_sampled_reward(tiny_model_dir, tmp_path, char_tokenizer):
    seed_everything(0)
    module = _module(tiny_model_dir, tmp_path, val_num_samples=2)
    data = _data()
    results = _trainer(tmp_path, max_steps=1, limit_val_batches=None).validate(module, datamodule=data)
    assert set(results[0]) == {"val/accuracy", "val/reward", "val/distinct_correct", "val/distinct_answers"}
    # Independent: greedy decoding of each prompt alone (no padding) with the same policy, scored by the first
    # reward function; "accuracy" is its mean over the validation rows.
    module.policy.eval()
    values = []
    for row in data.val_rows:
        ids = torch.tensor([char_tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = module.policy.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
            )
        values.append(
            char_code_reward(char_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), row)
        )
    assert len(values) >= 1
    assert results[0]["val/accuracy"] == pytest.approx(sum(values) / len(values), abs=1e-5)
    assert 0.0 <= results[0]["val/reward"] <= 1.0


# --- failing rewards ---------------------------------------------------------------------------------


def test_a_raising_reward_function_does_not_stop_the_fit(tiny_model_dir, tmp_path):
    global _FLAKY_CALLS
    _FLAKY_CALLS = itertools.count()
    seed_everything(0)
    snapshot = Snapshot()
    module = _module(
        tiny_model_dir, tmp_path, rewards=[_reward(), _reward("flaky_reward")], reward_on_error=-1.0
    )
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[snapshot])
    trainer.fit(module, _data())
    assert trainer.global_step == 2
    for output in snapshot.outputs:
        # every second of the N = 4 calls raises: 2 errors, scored -1; the others 1: mean 0
        assert output["rollout/reward_errors"] == 2.0
        assert output["rollout/reward/flaky_reward"] == pytest.approx(0.0)
    assert trainer.logged_metrics["rollout/reward_errors"].item() == 2.0


# --- checkpoints -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpointed(tiny_model_dir, tmp_path_factory):
    """A 2-iteration fit (one AdamW update per iteration) that saves a checkpoint at global_step 2."""
    tmp_path = tmp_path_factory.mktemp("checkpointed")
    seed_everything(0)
    module = _module(tiny_model_dir, tmp_path)
    trainer = _trainer(
        tmp_path,
        max_steps=2,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_top_k=-1)],
    )
    trainer.fit(module, _data())
    (path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    return module, path, tmp_path


def test_checkpoint_holds_only_trainable_weights_and_optimizer_state(checkpointed):
    module, path, _ = checkpointed
    checkpoint = torch.load(path, weights_only=False)
    assert set(checkpoint["state_dict"]) == set(_trainable(module))
    assert all("lora_" in key for key in checkpoint["state_dict"])
    assert checkpoint["global_step"] == 2
    saved_steps = {int(state["step"]) for state in checkpoint["optimizer_states"][0]["state"].values()}
    assert saved_steps == {2}  # two AdamW updates
    assert "shuffle_rng" in checkpoint["lit_entropy"]


def _resume(tiny_model_dir, tmp_path, path, **fit_kwargs):
    snapshot = Snapshot()
    resumed = _module(tiny_model_dir, tmp_path)
    trainer = _trainer(tmp_path, max_steps=4, callbacks=[snapshot])
    trainer.fit(resumed, _data(), ckpt_path=path, **fit_kwargs)
    checkpoint = torch.load(path, weights_only=False)
    # The adapters and the optimizer state were those of the checkpoint when training resumed.
    assert snapshot.start.keys() == checkpoint["state_dict"].keys()
    assert all(torch.equal(snapshot.start[k], checkpoint["state_dict"][k]) for k in snapshot.start)
    assert set(snapshot.optimizer_steps_at_start) == {2}
    assert trainer.global_step == 4
    assert len(snapshot.outputs) == 2  # two more RL iterations
    assert {int(state["step"]) for state in trainer.optimizers[0].state.values()} == {4}


def test_fit_resumes_from_a_checkpoint_loaded_with_weights_only_false(checkpointed, tiny_model_dir):
    _, path, tmp_path = checkpointed
    _resume(tiny_model_dir, tmp_path / "resumed_unsafe", path, weights_only=False)


def test_fit_resumes_from_a_checkpoint_with_default_loading(checkpointed, tiny_model_dir):
    _, path, tmp_path = checkpointed
    _resume(tiny_model_dir, tmp_path / "resumed", path)


# --- configuration errors ----------------------------------------------------------------------------


def test_minibatch_size_must_divide_the_rollout(tiny_model_dir, tmp_path):
    module = _module(tiny_model_dir, tmp_path, minibatch_size=3)  # N = 2 prompts x 2 = 4
    # caught by preflight at fit start, before any rollout
    with pytest.raises(ConfigError, match=r"minibatch_size=3 does not divide the rollout size .* = 4"):
        _trainer(tmp_path, max_steps=1).fit(module, _data())


def test_group_size_one_is_an_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"sampling.group_size must be >= 2.*got 1"):
        _module(tiny_model_dir, tmp_path, sampling=Sampling(group_size=1))


def test_kl_without_lora_is_an_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"loss.kl_coef > 0 needs a reference policy.*policy.lora"):
        _module(
            tiny_model_dir,
            tmp_path,
            policy=Policy(path=str(tiny_model_dir), lora=None),
            loss=Loss(kl_coef=0.1),
        )


# --- 4-bit -------------------------------------------------------------------------------------------


def test_qlora_fit_on_cpu_trains_the_adapters(tiny_model_dir, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    seed_everything(0)
    snapshot = Snapshot()
    policy = Policy(
        path=str(tiny_model_dir),
        lora=LoRA(r=4, alpha=8),
        quantization=Quantization(quant_type="nf4", compute_dtype="float32"),
    )
    module = _module(tiny_model_dir, tmp_path, policy=policy)
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[snapshot])
    trainer.fit(module, _data())
    assert trainer.global_step == 2
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.policy.modules())
    after = _trainable(module)
    assert after and all("lora_" in name for name in after)
    assert any(not torch.equal(after[name], snapshot.start[name]) for name in after)
    assert all(math.isfinite(output["entropy"]) for output in snapshot.outputs)


def test_lr_scheduler_steps_once_per_optimizer_update(tiny_model_dir, tmp_path):
    from harness import short_fit

    # 2 iterations x (2 epochs x 2 mini-batches) = 8 updates; StepLR(gamma=0.5) per update: lr = 1e-2 * 0.5**8
    trainer, _ = short_fit(
        tiny_model_dir,
        tmp_path,
        [],
        iterations=2,
        ppo_epochs=2,
        minibatch_size=4,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5),
    )
    assert trainer.global_step == 8
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-2 * 0.5**8)


def lowercase_start(completion: str, example: dict) -> float:
    """Binary: 1.0 when the completion starts with a lowercase letter (the random tiny model does ~1/4 of the time)."""
    return 1.0 if completion[:1].islower() else 0.0


ANSWERED: list[str] = []  # the completions `first_character` was asked to read


def first_character(completion: str) -> str | None:
    ANSWERED.append(completion)
    return completion[:1] or None


def lowercase_start_read(completion: str, example: dict) -> float:
    """`lowercase_start` with an answer reader: a completion's final answer is its first character."""
    return lowercase_start(completion, example)


lowercase_start_read.answer_of = first_character  # type: ignore[attr-defined]


def test_validate_counts_the_first_rewards_final_answers(tiny_model_dir, tmp_path):
    seed_everything(0)
    ANSWERED.clear()
    module = _module(
        tiny_model_dir, tmp_path, rewards=[_reward("lowercase_start_read")], val_num_samples=8, pass_at_k=[1]
    )
    data = _data()
    results = _trainer(tmp_path, max_steps=1, limit_val_batches=None).validate(module, datamodule=data)[0]
    # independent: the read completions, 8 per prompt in order, their distinct first characters averaged
    assert len(ANSWERED) == 8 * len(data.val_rows)
    groups = [ANSWERED[i : i + 8] for i in range(0, len(ANSWERED), 8)]
    expected = sum(len({text[:1] for text in group if text}) for group in groups) / len(groups)
    assert results["val/distinct_final_answers"] == pytest.approx(expected)
    assert results["val/distinct_final_answers"] <= results["val/distinct_answers"]


def test_validate_logs_pass_at_k_and_distinct_correct(tiny_model_dir, tmp_path):
    seed_everything(0)
    module = _module(
        tiny_model_dir, tmp_path, rewards=[_reward("lowercase_start")], val_num_samples=8, pass_at_k=[1, 4, 8]
    )
    results = _trainer(tmp_path, max_steps=1, limit_val_batches=None).validate(module, datamodule=_data())[0]
    # with one binary reward, pass@1 (c/n averaged over prompts) is exactly the mean sampled reward
    assert results["val/pass@1"] == pytest.approx(results["val/reward"], abs=1e-6)
    assert 0.0 < results["val/pass@1"] <= results["val/pass@4"] <= results["val/pass@8"] <= 1.0
    assert 1.0 <= results["val/distinct_correct"] <= 8.0
    # every correct answer is an answer, and there are at most 8 different ones among 8 samples
    assert results["val/distinct_correct"] <= results["val/distinct_answers"] <= 8.0


def test_pass_at_k_larger_than_the_samples_is_a_config_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="pass_at_k"):
        _module(tiny_model_dir, tmp_path, val_num_samples=4, pass_at_k=[8])
