"""`EntropyLaw`: the least-squares fit of ``R = -a * exp(H) + b``, its degenerate inputs, the callback's
pairing of validation accuracy with training entropy, fit_fraction, logging, state, and a real fit with
validation.

Shapes: ``P`` (entropy, accuracy) pairs. Entropies in nats.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from harness import char_code_reward
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from lit_entropy.callbacks.entropy_law import EntropyLaw, LawFit, fit_entropy_law, predict
from lit_entropy.demo import CountdownDataModule
from lit_entropy.errors import ConfigError, DataError
from lit_entropy.model import LoRA, Policy
from lit_entropy.module import GRPO
from lit_entropy.reward_spec import Reward
from lit_entropy.rollout import Sampling

# --- helpers -------------------------------------------------------------------------------------------


class RecordingLogger:
    """Stands in for a Lightning logger: records every ``log_metrics`` call."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, float], int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append((dict(metrics), step))


def fake_trainer(max_steps: int = 100) -> SimpleNamespace:
    """The parts of a Trainer the callback reads; tests move ``global_step`` and the logging step by hand."""
    return SimpleNamespace(
        sanity_checking=False,
        state=SimpleNamespace(fn="fit"),
        callback_metrics={},
        loggers=[RecordingLogger(), RecordingLogger()],
        global_step=0,
        max_steps=max_steps,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0)),
    )


def iterate(callback: EntropyLaw, trainer: SimpleNamespace, entropies: list[float], updates: int = 2) -> None:
    """RL iterations with these training entropies (GRPO's ``outputs["entropy"]``)."""
    for entropy in entropies:
        trainer.global_step += updates
        callback.on_train_batch_end(trainer, None, {"entropy": torch.tensor(entropy)}, [], 0)
        trainer.fit_loop.epoch_loop._batches_that_stepped += 1


def validate(callback: EntropyLaw, trainer: SimpleNamespace, accuracy: float) -> None:
    # Lightning validates after the iteration's logging, before advancing its logging step
    trainer.fit_loop.epoch_loop._batches_that_stepped -= 1
    trainer.callback_metrics = {"val/accuracy": torch.tensor(accuracy), "train/entropy": torch.tensor(9.0)}
    callback.on_validation_end(trainer, None)
    trainer.fit_loop.epoch_loop._batches_that_stepped += 1


def law(a: float, b: float, entropy: float) -> float:
    return -a * math.exp(entropy) + b


def naive_fit(entropy: list[float], accuracy: list[float]) -> tuple[float, float]:
    """Textbook simple regression of R on x = exp(H), plain Python: (a, b) with R = -a * x + b."""
    x = [math.exp(h) for h in entropy]
    n = len(x)
    slope = (n * sum(xi * ri for xi, ri in zip(x, accuracy)) - sum(x) * sum(accuracy)) / (
        n * sum(xi * xi for xi in x) - sum(x) ** 2
    )
    return -slope, (sum(accuracy) - slope * sum(x)) / n


# --- the fit -------------------------------------------------------------------------------------------


def test_fit_by_hand():
    # x = exp(H) = [1, 2, 3], R = [3, 2, 2]; means x = 2, R = 7/3
    # x_c = [-1, 0, 1], R_c = [2/3, -1/3, -1/3]: slope = sum(x_c R_c) / sum(x_c^2) = (-2/3 - 1/3) / 2 = -1/2
    # a = 1/2, b = 7/3 + (1/2) * 2 = 10/3; fitted [17/6, 14/6, 11/6], residuals [1/6, -1/3, 1/6]
    # SS_res = 1/36 + 4/36 + 1/36 = 1/6, SS_tot = 4/9 + 1/9 + 1/9 = 2/3, R^2 = 1 - (1/6) / (2/3) = 3/4
    fit = fit_entropy_law(
        torch.log(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)), torch.tensor([3, 2, 2.0])
    )
    assert fit.a == pytest.approx(0.5, abs=1e-12)
    assert fit.b == pytest.approx(10 / 3, abs=1e-12)
    assert fit.r2 == pytest.approx(0.75, abs=1e-12)
    assert fit.ceiling == pytest.approx(10 / 3 - 0.5, abs=1e-12)


def test_noise_free_points_recover_a_and_b_exactly():
    a, b = 0.08, 0.95
    entropy = torch.linspace(0.05, 1.6, 12, dtype=torch.float64)  # [P]
    accuracy = -a * torch.exp(entropy) + b  # [P]
    fit = fit_entropy_law(entropy, accuracy)
    assert fit.a == pytest.approx(a, abs=1e-12)
    assert fit.b == pytest.approx(b, abs=1e-12)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.ceiling == pytest.approx(b - a, abs=1e-12)


def test_noisy_points_match_an_independent_least_squares_and_are_close_to_the_truth():
    generator = torch.Generator().manual_seed(0)
    a, b = 0.2, 1.1
    entropy = torch.rand(200, generator=generator, dtype=torch.float64) * 2.0  # [P]
    accuracy = -a * torch.exp(entropy) + b + 0.01 * torch.randn(200, generator=generator, dtype=torch.float64)
    fit = fit_entropy_law(entropy, accuracy)
    # independent: lstsq on the design [x, 1] gives (slope, intercept) = (-a, b)
    design = torch.stack([torch.exp(entropy), torch.ones_like(entropy)], dim=1)  # [P, 2]
    slope, intercept = torch.linalg.lstsq(design, accuracy[:, None]).solution[:, 0].tolist()
    assert fit.a == pytest.approx(-slope, abs=1e-10)
    assert fit.b == pytest.approx(intercept, abs=1e-10)
    residual = accuracy - (design[:, 0] * slope + intercept)
    r2 = 1 - float((residual**2).sum() / ((accuracy - accuracy.mean()) ** 2).sum())
    assert fit.r2 == pytest.approx(r2, abs=1e-10)
    assert fit.a == pytest.approx(a, abs=0.01)
    assert fit.b == pytest.approx(b, abs=0.02)
    assert 0.95 < fit.r2 < 1.0


def test_predict_float_and_tensor():
    fit = LawFit(a=0.5, b=2.0, r2=1.0)
    # H = log 2: -0.5 * 2 + 2 = 1; H = 0: the ceiling b - a = 1.5
    assert predict(fit, math.log(2.0)) == pytest.approx(1.0)
    assert predict(fit, 0.0) == pytest.approx(fit.ceiling) == pytest.approx(1.5)
    values = predict(fit, torch.tensor([0.0, math.log(2.0)], dtype=torch.float64))
    torch.testing.assert_close(values, torch.tensor([1.5, 1.0], dtype=torch.float64))


def test_all_equal_entropy_is_a_data_error_not_a_nan():
    with pytest.raises(DataError, match=r"all 3 entropies are equal \(0\.7 nats\)"):
        fit_entropy_law(torch.full((3,), 0.7), torch.tensor([0.1, 0.2, 0.3]))


def test_all_equal_accuracy_is_the_constant_fit_with_r2_one():
    fit = fit_entropy_law(torch.tensor([0.1, 0.5, 0.9]), torch.full((3,), 0.25))
    assert (fit.a, fit.b, fit.r2) == (0.0, 0.25, 1.0)


@pytest.mark.parametrize(
    ("entropy", "accuracy", "match"),
    [
        (torch.tensor([0.5]), torch.tensor([0.5]), "at least 2"),
        (torch.tensor([0.5, 0.6]), torch.tensor([0.5, 0.6, 0.7]), "one length"),
        (torch.ones(2, 2), torch.ones(2, 2), "1-D"),
        (torch.tensor([0.5, float("nan")]), torch.tensor([0.5, 0.6]), "entropy has a non-finite"),
        (torch.tensor([0.5, 0.6]), torch.tensor([0.5, float("inf")]), "accuracy has a non-finite"),
    ],
)
def test_bad_inputs_are_data_errors(entropy, accuracy, match):
    with pytest.raises(DataError, match=match):
        fit_entropy_law(entropy, accuracy)


# --- the callback: configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_points": 1}, "warmup_points=1"),
        ({"warmup_points": 2.5}, "warmup_points=2.5"),
        ({"fit_fraction": 0.0}, "fit_fraction=0.0"),
        ({"fit_fraction": 1.0}, "fit_fraction=1.0"),
        ({"accuracy_key": ""}, "accuracy_key"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EntropyLaw(**kwargs)


def test_fit_fraction_needs_max_steps():
    trainer = fake_trainer(max_steps=-1)
    with pytest.raises(ConfigError, match="max_steps=-1"):
        EntropyLaw(fit_fraction=0.15).on_fit_start(trainer, None)
    EntropyLaw().on_fit_start(trainer, None)  # without fit_fraction the length does not matter


# --- the callback: pairing, fitting, logging -----------------------------------------------------------


def test_pairs_mean_entropy_since_previous_validation_and_logs_after_warmup():
    callback, trainer = EntropyLaw(warmup_points=3), fake_trainer()
    iterate(callback, trainer, [2.0, 2.2, 2.4])  # mean 2.2
    validate(callback, trainer, 0.10)
    iterate(callback, trainer, [1.5])
    validate(callback, trainer, 0.30)
    # (global_step, mean entropy, accuracy, logging step of the validation = the iteration's index)
    assert [(p.step, p.entropy, p.accuracy, p.log_step) for p in callback.points] == [
        (6, pytest.approx(2.2), pytest.approx(0.10), 2),
        (8, pytest.approx(1.5), pytest.approx(0.30), 3),
    ]
    assert all(logger.calls == [] for logger in trainer.loggers)  # 2 pairs < warmup_points
    assert callback.fit is None

    iterate(callback, trainer, [0.9, 1.1])  # mean 1.0
    validate(callback, trainer, 0.45)
    # the pairs hold float32-rounded readings of (2.2, 1.5, 1.0) and (0.10, 0.30, 0.45): fit those exactly
    assert [p.entropy for p in callback.points] == pytest.approx([2.2, 1.5, 1.0], abs=1e-6)
    expected = fit_entropy_law(
        torch.tensor([p.entropy for p in callback.points], dtype=torch.float64),
        torch.tensor([p.accuracy for p in callback.points], dtype=torch.float64),
    )
    for logger in trainer.loggers:
        ((metrics, step),) = logger.calls
        # the logging step of the last iteration (6 iterations: 0..5), not global_step (12 updates)
        assert step == 5
        assert metrics["law/a"] == pytest.approx(expected.a, abs=1e-12)
        assert metrics["law/b"] == pytest.approx(expected.b, abs=1e-12)
        assert metrics["law/ceiling"] == pytest.approx(expected.b - expected.a, abs=1e-6)
        assert metrics["law/r2"] == pytest.approx(expected.r2, abs=1e-6)
        assert metrics["law/points"] == 3.0
        assert "law/prediction_rmse" not in metrics  # no fit_fraction, nothing held out
    assert callback.fit.a == pytest.approx(expected.a, abs=1e-12)
    naive_a, naive_b = naive_fit([2.2, 1.5, 1.0], [0.10, 0.30, 0.45])
    assert callback.fit.a == pytest.approx(naive_a, abs=1e-5)
    assert callback.fit.b == pytest.approx(naive_b, abs=1e-5)


def test_validations_without_training_sanity_check_and_standalone_validate_add_no_pair():
    callback, trainer = EntropyLaw(), fake_trainer()
    validate(callback, trainer, 0.5)  # before any iteration
    iterate(callback, trainer, [1.0])
    trainer.sanity_checking = True
    validate(callback, trainer, 0.5)
    trainer.sanity_checking = False
    trainer.state.fn = "validate"
    validate(callback, trainer, 0.5)
    assert callback.points == []
    trainer.state.fn = "fit"
    validate(callback, trainer, 0.5)
    validate(callback, trainer, 0.6)  # no iteration since the previous validation
    assert [p.accuracy for p in callback.points] == [0.5]


def test_missing_accuracy_or_entropy_key_names_the_key():
    callback, trainer = EntropyLaw(accuracy_key="val/pass@8"), fake_trainer()
    iterate(callback, trainer, [1.0])
    with pytest.raises(ConfigError, match=r"accuracy_key='val/pass@8'.*'val/accuracy'"):
        validate(callback, trainer, 0.5)
    with pytest.raises(ConfigError, match=r"entropy_key='train/entropy'.*\['reward'\]"):
        EntropyLaw().on_train_batch_end(trainer, None, {"reward": torch.tensor(1.0)}, [], 0)


def test_entropy_key_reads_any_output_metric():
    callback, trainer = EntropyLaw(entropy_key="reg/X/entropy"), fake_trainer()
    outputs = {"entropy": torch.tensor(9.0), "metrics": {"reg/X/entropy": torch.tensor(0.25)}}
    callback.on_train_batch_end(trainer, None, outputs, [], 0)
    validate(callback, trainer, 0.5)
    assert callback.points[0].entropy == pytest.approx(0.25)


def test_equal_entropies_warn_once_and_log_nothing_until_they_differ():
    callback, trainer = EntropyLaw(warmup_points=2), fake_trainer()
    with pytest.warns(UserWarning, match="entropies are equal"):
        for accuracy in (0.1, 0.2, 0.3):
            iterate(callback, trainer, [1.0])
            validate(callback, trainer, accuracy)
    assert trainer.loggers[0].calls == []
    iterate(callback, trainer, [2.0])
    validate(callback, trainer, 0.0)
    assert trainer.loggers[0].calls[-1][0]["law/points"] == 4.0


def test_fit_fraction_fits_the_early_pairs_and_reports_prediction_error_and_final_values():
    a, b = 0.1, 0.9
    callback, trainer = EntropyLaw(warmup_points=2, fit_fraction=0.4), fake_trainer(max_steps=20)
    # cutoff: global_step <= 0.4 * 20 = 8; pairs at steps 4, 8 (fitted), 12, 16, 20 (held out)
    early = [1.5, 1.2]
    late = [(0.9, law(a, b, 0.9) + 0.01), (0.6, law(a, b, 0.6) - 0.02), (0.3, law(a, b, 0.3) + 0.02)]
    for entropy in early:
        iterate(callback, trainer, [entropy], updates=4)
        validate(callback, trainer, law(a, b, entropy))
    first = trainer.loggers[0].calls[-1][0]
    assert first["law/a"] == pytest.approx(a, abs=1e-6) and first["law/b"] == pytest.approx(b, abs=1e-6)
    assert "law/prediction_rmse" not in first
    for entropy, accuracy in late:
        iterate(callback, trainer, [entropy], updates=4)
        validate(callback, trainer, accuracy)
    fitted, held_out = callback.split_points(trainer.max_steps)
    assert [p.step for p in fitted] == [4, 8] and [p.step for p in held_out] == [12, 16, 20]
    last = trainer.loggers[0].calls[-1][0]
    assert last["law/points"] == 2.0  # later pairs never enter the fit
    assert last["law/a"] == pytest.approx(a, abs=1e-6)
    # errors of the exact law on the held-out pairs: -0.01, +0.02, -0.02 -> sqrt((1 + 4 + 4) / 3) * 0.01
    assert last["law/prediction_rmse"] == pytest.approx(math.sqrt(3.0) * 0.01, abs=1e-6)

    callback.on_fit_end(trainer, None)
    final, step = trainer.loggers[0].calls[-1]
    assert step == 4  # at the last validation's step (5 iterations: logging steps 0..4), not one past it
    assert final["law/final_pred"] == pytest.approx(law(a, b, 0.3), abs=1e-6)
    assert final["law/final_obs"] == pytest.approx(law(a, b, 0.3) + 0.02, abs=1e-6)


def test_no_final_values_without_fit_fraction_or_held_out_pairs():
    callback, trainer = EntropyLaw(warmup_points=2), fake_trainer()
    for entropy, accuracy in ((1.0, 0.1), (0.5, 0.3)):
        iterate(callback, trainer, [entropy])
        validate(callback, trainer, accuracy)
    calls = len(trainer.loggers[0].calls)
    callback.on_fit_end(trainer, None)
    assert len(trainer.loggers[0].calls) == calls


# --- state ---------------------------------------------------------------------------------------------


def test_state_round_trip_continues_exactly(tmp_path):
    def run(callback: EntropyLaw, trainer: SimpleNamespace, stop: int | None = None) -> None:
        schedule = [([2.0, 1.8], 0.1), ([1.6], 0.2), ([1.4, 1.2], 0.35), ([1.1], 0.4)]
        for index, (entropies, accuracy) in enumerate(schedule):
            iterate(callback, trainer, entropies)
            if index == stop:
                return
            validate(callback, trainer, accuracy)

    whole, whole_trainer = EntropyLaw(warmup_points=2), fake_trainer()
    run(whole, whole_trainer)

    first, first_trainer = EntropyLaw(warmup_points=2), fake_trainer()
    run(first, first_trainer, stop=2)  # stops with iterations since the last validation pending
    path = tmp_path / "state.pt"
    torch.save(first.state_dict(), path)
    state = torch.load(path, weights_only=True)  # Lightning resumes with weights_only loading
    assert state["entropy_count"] == 2 and state["entropy_sum"] == pytest.approx(2.6)
    resumed = EntropyLaw(warmup_points=2)
    resumed.load_state_dict(state)
    resumed.on_fit_start(first_trainer, None)  # rebuilds the derived fit
    assert resumed.points == first.points and resumed.fit == first.fit
    validate(resumed, first_trainer, 0.35)
    iterate(resumed, first_trainer, [1.1])
    validate(resumed, first_trainer, 0.4)
    assert resumed.points == whole.points
    assert resumed.fit == whole.fit
    assert first_trainer.loggers[0].calls[-1] == whole_trainer.loggers[0].calls[-1]


def test_load_state_dict_names_missing_keys():
    with pytest.raises(ConfigError, match="entropy_count"):
        EntropyLaw().load_state_dict({"points": [], "entropy_sum": 0.0})


# --- a real fit ----------------------------------------------------------------------------------------


def _metric_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_real_fit_logs_the_law_next_to_the_validation_metrics(tiny_model_dir, tmp_path):
    seed_everything(0)
    module = GRPO(
        policy=Policy(path=str(tiny_model_dir), lora=LoRA(r=4, alpha=8)),
        rewards=[Reward(fn="harness.char_code_reward")],  # continuous: val/accuracy moves with the policy
        sampling=Sampling(group_size=4, max_new_tokens=6),
        learning_rate=5e-2,
        minibatch_size=4,  # 2 updates per RL iteration: the logging step is not global_step
        adapter_dir=str(tmp_path / "adapter"),
        val_num_samples=0,
    )
    callback = EntropyLaw(warmup_points=2)
    trainer = Trainer(
        accelerator="cpu",
        log_every_n_steps=1,
        max_steps=8,  # 4 RL iterations x 2 updates
        logger=CSVLogger(tmp_path, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=1,  # the sanity check must add no pair
        callbacks=[callback],
    )
    trainer.fit(module, CountdownDataModule(batch_size=2, num_train=32, num_val=2))
    assert char_code_reward("ab", {}) > 0  # the reward the module imports by path
    rows = _metric_rows(Path(trainer.loggers[0].log_dir) / "metrics.csv")
    entropy = {row["step"]: float(row["train/entropy"]) for row in rows if row.get("train/entropy")}
    accuracy = {row["step"]: float(row["val/accuracy"]) for row in rows if row.get("val/accuracy")}
    assert sorted(entropy) == sorted(accuracy) == ["0", "1", "2", "3"]
    # one validation per iteration: each pair is that iteration's entropy and the accuracy after it
    assert [p.step for p in callback.points] == [2, 4, 6, 8]
    for point, step in zip(callback.points, ["0", "1", "2", "3"]):
        assert point.entropy == pytest.approx(entropy[step], abs=1e-5)
        assert point.accuracy == pytest.approx(accuracy[step], abs=1e-6)
    law_rows = {row["step"]: row for row in rows if row.get("law/a")}
    assert sorted(law_rows) == ["1", "2", "3"]  # from the 2nd validation on, at the validations' steps
    expected = fit_entropy_law(
        torch.tensor([entropy[s] for s in "0123"], dtype=torch.float64),
        torch.tensor([accuracy[s] for s in "0123"], dtype=torch.float64),
    )
    assert float(law_rows["3"]["law/a"]) == pytest.approx(expected.a, rel=1e-3, abs=1e-6)
    assert float(law_rows["3"]["law/b"]) == pytest.approx(expected.b, rel=1e-3, abs=1e-6)
    assert float(law_rows["3"]["law/points"]) == 4.0
    # the pairs travel in Lightning's checkpoint (loaded as Lightning resumes: weights_only)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"][callback.state_key]
    restored = EntropyLaw(warmup_points=2)
    restored.load_state_dict(saved)
    assert restored.points == callback.points
