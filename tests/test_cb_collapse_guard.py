"""`CollapseGuard`: counting iterations below the floor, warn vs stop, the relative floor, state, and real
fits that stop and write the last-good checkpoint.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from harness import LogRecorder as FakeModule
from harness import short_fit
from lightning.pytorch import Callback

from lit_entropy.callbacks.collapse_guard import CHECKPOINT_NAME, CollapseGuard
from lit_entropy.errors import ConfigError

# --- helpers -------------------------------------------------------------------------------------------


class FakeTrainer:
    """The two attributes the guard touches outside a fit: ``should_stop`` and ``checkpoint_callback``."""

    def __init__(self) -> None:
        self.should_stop = False
        self.checkpoint_callback = None


def run(guard: CollapseGuard, entropies: list[float], trainer=None, module=None) -> list[bool]:
    """Feed one entropy per iteration; returns ``trainer.should_stop`` after each."""
    trainer = trainer or FakeTrainer()
    module = module or FakeModule()
    stops = []
    for entropy in entropies:
        outputs = {"entropy": torch.tensor(entropy), "reward": torch.tensor(0.0)}
        guard.on_train_batch_end(trainer, module, outputs, batch=[], batch_idx=0)
        stops.append(trainer.should_stop)
    return stops


def trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


# --- construction --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"floor": -0.1}, r"CollapseGuard.floor must be a finite number >= 0, got -0.1"),
        ({"floor": float("nan")}, r"CollapseGuard.floor must be a finite number >= 0, got nan"),
        ({"patience": 0}, r"CollapseGuard.patience must be an integer >= 1, got 0"),
        ({"patience": 2.5}, r"CollapseGuard.patience must be an integer >= 1, got 2.5"),
        ({"mode": "halt"}, r"CollapseGuard.mode must be one of \['stop', 'warn'\], got 'halt'"),
    ],
)
def test_construction_errors_name_the_argument_and_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CollapseGuard(**kwargs)


def test_defaults_and_initial_state():
    guard = CollapseGuard()
    assert (guard.floor, guard.patience, guard.mode, guard.relative, guard.checkpoint) == (
        0.05, 10, "stop", False, True
    )  # fmt: skip
    assert guard.state_dict() == {
        "iterations": 0, "count": 0, "fired": False, "first_entropy": None, "last_good_iteration": None
    }  # fmt: skip


# --- counting, warn and stop ---------------------------------------------------------------------------


def test_stop_after_patience_iterations_below_the_floor(caplog):
    caplog.set_level(logging.INFO)
    guard, module = CollapseGuard(floor=0.5, patience=3), FakeModule()
    # 1.0 is good (iteration 0), then 3 iterations below 0.5: the count reaches 3 at iteration 3
    assert run(guard, [1.0, 0.4, 0.3, 0.2], module=module) == [False, False, False, True]
    assert module.values("collapse_guard/count") == [0.0, 1.0, 2.0, 3.0]
    assert module.values("collapse_guard/floor") == [0.5] * 4
    assert all(
        kwargs == {"on_step": True, "on_epoch": False, "batch_size": 1} for *_, kwargs in module.logged
    )
    assert guard.last_good_iteration == 0
    assert "below the floor 0.5 nats for 3 consecutive RL iterations" in caplog.text
    assert "stopping the run (mode='stop')" in caplog.text
    assert guard.last_good_path is None  # no ModelCheckpoint in the trainer: nothing saved


def test_entropy_equal_to_the_floor_is_not_below_it():
    guard = CollapseGuard(floor=0.5, patience=1)
    assert run(guard, [0.5, 0.5]) == [False, False]
    assert guard.count == 0 and guard.last_good_iteration == 1


def test_patience_counting_resets_when_entropy_recovers():
    guard, module = CollapseGuard(floor=0.5, patience=3), FakeModule()
    assert run(guard, [0.1, 0.1, 0.9, 0.1, 0.1, 0.6, 0.2], module=module) == [False] * 7
    assert module.values("collapse_guard/count") == [0.0 + c for c in (1, 2, 0, 1, 2, 0, 1)]
    assert guard.last_good_iteration == 5
    assert run(guard, [0.3, 0.3]) == [False, True]  # 3 in a row at last


def test_warn_mode_warns_once_per_episode_and_never_stops():
    guard = CollapseGuard(floor=0.5, patience=2, mode="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # episode 1: below from iteration 0, warned at iteration 1 only; recovers at 4; episode 2 warns at 6
        stops = run(guard, [0.1, 0.1, 0.1, 0.1, 0.9, 0.2, 0.2, 0.2])
    assert stops == [False] * 8
    messages = [str(w.message) for w in caught if "CollapseGuard" in str(w.message)]
    assert len(messages) == 2
    assert "now 0.1 nats at iteration 1; last iteration at or above the floor: None" in messages[0]
    assert "now 0.2 nats at iteration 6; last iteration at or above the floor: 4" in messages[1]
    assert all("training continues (mode='warn')" in message for message in messages)


def test_relative_floor_is_a_fraction_of_the_first_entropy():
    guard, module = CollapseGuard(floor=0.5, patience=2, relative=True), FakeModule()
    assert guard.floor_nats is None  # not measured yet
    # first entropy 2.0: floor 1.0 nats; 1.0 is not below it, 0.9 is
    assert run(guard, [2.0, 1.0, 0.9, 0.9], module=module) == [False, False, False, True]
    assert guard.first_entropy == 2.0 and guard.floor_nats == 1.0
    assert module.values("collapse_guard/floor") == [1.0] * 4
    assert guard.last_good_iteration == 1


def test_missing_entropy_in_outputs_is_an_error_naming_the_guard():
    with pytest.raises(ConfigError, match=r"CollapseGuard needs outputs\['entropy'\].*\['loss'\]"):
        CollapseGuard().on_train_batch_end(FakeTrainer(), FakeModule(), {"loss": torch.tensor(1.0)}, [], 0)


def test_state_round_trip_continues_identically():
    guard = CollapseGuard(floor=0.5, patience=3, relative=True, mode="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(guard, [1.25, 0.9, 0.5, 0.5, 0.5])  # floor 0.625: good, good, then 3 below (warned)
    state = guard.state_dict()
    assert state == {
        "iterations": 5, "count": 3, "fired": True, "first_entropy": 1.25, "last_good_iteration": 1
    }  # fmt: skip
    restored = CollapseGuard(floor=0.5, patience=3, relative=True, mode="warn")
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(restored, [0.5])  # same episode: no second warning after the resume
    assert not [w for w in caught if "CollapseGuard" in str(w.message)]
    assert restored.count == 4 and restored.iterations == 6
    with pytest.raises(ConfigError, match=r"CollapseGuard state lacks \['fired'\]"):
        CollapseGuard().load_state_dict({k: v for k, v in state.items() if k != "fired"})


# --- real fits -----------------------------------------------------------------------------------------


class ScriptedEntropy(Callback):
    """Replaces the measured entropy with a scripted one (must come before the guard), and records the
    trainable weights at the start of every iteration."""

    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.append(trainable(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        outputs["entropy"] = torch.tensor(self.values[len(self.weights) - 1])


def test_fit_stops_and_saves_the_weights_of_the_last_good_iteration(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    # iterations 0 and 1 are good, 2 and 3 below the floor: the guard stops at the end of iteration 3
    script = ScriptedEntropy([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    guard = CollapseGuard(floor=0.5, patience=2)
    trainer, module = short_fit(tiny_model_dir, tmp_path, [script, guard], iterations=6, checkpoint=True)
    assert trainer.global_step == 4  # one update per iteration, 4 iterations instead of 6
    assert len(script.weights) == 4
    assert guard.last_good_iteration == 1
    path = tmp_path / CHECKPOINT_NAME  # logger=False: trainer.log_dir is default_root_dir
    assert guard.last_good_path == str(path) and path.is_file()
    saved = torch.load(path, weights_only=False)["state_dict"]
    good = script.weights[1]  # the weights that sampled iteration 1's rollout
    assert saved.keys() == good.keys() and len(good) > 0
    for name, value in good.items():
        assert torch.equal(saved[name], value), name
    # training did move the weights: the checkpoint is neither the weights after iteration 1's update (not
    # measured by any good rollout) nor the collapsed ones
    for later in script.weights[2:]:
        assert any(not torch.equal(good[name], later[name]) for name in good)
    # the module itself holds the good weights again
    now = trainable(module)
    assert all(torch.equal(now[name], good[name]) for name in good)
    assert (
        f"weights from the start of iteration 1 are restored in the module and saved to {path}" in caplog.text
    )


def test_fit_with_a_huge_floor_stops_after_patience_iterations(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    guard = CollapseGuard(
        floor=100.0, patience=3
    )  # above any entropy of a 99-token vocabulary (log 99 = 4.6)
    trainer, _ = short_fit(tiny_model_dir, tmp_path, [guard], iterations=6, checkpoint=True)
    assert trainer.global_step == 3
    assert guard.state_dict() == {
        "iterations": 3, "count": 3, "fired": True, "first_entropy": None, "last_good_iteration": None
    }  # fmt: skip
    assert not (tmp_path / CHECKPOINT_NAME).exists()  # no iteration was good: nothing to keep
    assert "no last-good checkpoint" in caplog.text


def test_fit_in_warn_mode_runs_to_the_end(tiny_model_dir, tmp_path):
    guard = CollapseGuard(floor=100.0, patience=2, mode="warn")
    with pytest.warns(UserWarning, match=r"CollapseGuard: .* for 2 consecutive RL iterations") as caught:
        trainer, _ = short_fit(tiny_model_dir, tmp_path, [guard], iterations=4, checkpoint=True)
    assert trainer.global_step == 4
    assert len([w for w in caught if "CollapseGuard" in str(w.message)]) == 1
    assert guard.count == 4


def test_constructible_from_yaml_and_mode_validated_by_the_cli(tmp_path, monkeypatch, tiny_model_dir):
    import yaml

    from lit_entropy.callbacks.entropy_monitor import EntropyMonitor
    from lit_entropy.cli import LitEntropyCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lit-entropy"])  # LightningCLI warns when pytest's own argv is present

    def config(mode: str) -> str:
        callbacks = [
            {
                "class_path": "lit_entropy.callbacks.collapse_guard.CollapseGuard",
                "init_args": {"floor": 0.3, "patience": 4, "mode": mode, "relative": True},
            },
            {
                "class_path": "lit_entropy.callbacks.entropy_monitor.EntropyMonitor",
                "init_args": {"position_buckets": 3, "max_tokens": 1024},
            },
        ]
        path = tmp_path / f"{mode}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "trainer": {"accelerator": "cpu", "max_steps": 1, "callbacks": callbacks},
                    "model": {
                        "class_path": "lit_entropy.GRPO",
                        "init_args": {
                            "policy": {"path": str(tiny_model_dir)},
                            "rewards": [{"fn": "lit_entropy.rewards.exact_match"}],
                        },
                    },
                    "data": {"class_path": "lit_entropy.CountdownDataModule"},
                }
            )
        )
        return str(path)

    cli = LitEntropyCLI(args=["--config", config("warn")], run=False)
    [guard] = [c for c in cli.trainer.callbacks if isinstance(c, CollapseGuard)]
    [monitor] = [c for c in cli.trainer.callbacks if isinstance(c, EntropyMonitor)]
    assert (guard.floor, guard.patience, guard.mode, guard.relative) == (0.3, 4, "warn", True)
    assert (monitor.position_buckets, monitor.max_tokens) == (3, 1024)
    with pytest.raises(SystemExit):  # the Literal rejects an unknown mode before construction
        LitEntropyCLI(args=["--config", config("halt")], run=False)
