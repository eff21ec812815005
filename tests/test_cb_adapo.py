"""ADAPO: the eps_high law by hand (with clamps and the three kinds of target), construction errors,
purity of the contract, state round-trips (state_dict, checkpoint + resumed fit), once-per-iteration
updates, the clip range the loss sees.

Shapes: ``m`` sequences in the mini-batch, ``T`` completion length.
"""

from __future__ import annotations

import copy

import pytest
import torch
from harness import EntropyLog, LogRecorder, StateAtStart, make_view, short_fit

from lit_entropy.callbacks.adapo import ADAPO, entropy_target, next_eps_high
from lit_entropy.errors import ConfigError
from lit_entropy.loss import Loss, microbatch_loss
from lit_entropy.regularizer import Regularizer, find_regularizers

# --- helpers -----------------------------------------------------------------------------------------


class OwnsEpsHigh(Regularizer):
    replaces = ("eps_high",)


def _step(callback, entropy: float, module=None):
    callback.on_train_batch_end(
        None,
        module or LogRecorder(),
        {"entropy": torch.tensor(entropy), "updates": torch.tensor(2.0)},
        None,
        0,
    )


def _replay(eps_high: float, entropies: list[float], target: float) -> float:
    for entropy in entropies:
        eps_high = next_eps_high(eps_high, entropy, target, 1.1, 0.2, 0.4)
    return eps_high


# --- pure maths --------------------------------------------------------------------------------------


def test_next_eps_high_by_hand_with_clamps():
    assert next_eps_high(0.28, 1.5, 2.0, 1.1, 0.2, 0.4) == pytest.approx(0.308)  # below: 0.28 * 1.1
    assert next_eps_high(0.28, 2.5, 2.0, 1.1, 0.2, 0.4) == pytest.approx(0.28 / 1.1)  # above: 0.254545...
    assert next_eps_high(0.28, 2.0, 2.0, 1.1, 0.2, 0.4) == 0.28  # on target
    assert next_eps_high(0.38, 1.5, 2.0, 1.1, 0.2, 0.4) == 0.4  # 0.418 clamped to the max
    assert next_eps_high(0.21, 2.5, 2.0, 1.1, 0.2, 0.4) == 0.2  # 0.1909 clamped to the min


def test_entropy_target_kinds():
    assert entropy_target(2.0, None, relative=True) == 2.0  # the first iteration's entropy
    assert entropy_target(2.0, 0.8, relative=True) == pytest.approx(1.6)  # 0.8 of it
    assert entropy_target(2.0, 0.5, relative=False) == 0.5  # absolute nats


# --- the callback ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps_high_min": 0.0}, r"ADAPO.eps_high_min must be a finite number > 0, got 0.0"),
        ({"eps_high_min": -0.1}, r"ADAPO.eps_high_min must be a finite number > 0, got -0.1"),
        ({"eps_high_max": 0.1}, r"ADAPO.eps_high_max must be finite and >= eps_high_min.*eps_high_max=0.1"),
        (
            {"eps_high_init": 0.5},
            r"ADAPO.eps_high_init=0.5 must lie in \[eps_high_min, eps_high_max\] = \[0.2, 0.4\]",
        ),
        ({"eps_high_init": 0.1}, r"ADAPO.eps_high_init=0.1 must lie in"),
        ({"rate": 1.0}, r"ADAPO.rate must be a finite number > 1, got 1.0"),
        ({"rate": 0.9}, r"ADAPO.rate must be a finite number > 1, got 0.9"),
        ({"relative": False}, r"ADAPO.relative=False needs an absolute target in nats"),
        (
            {"target": -0.5},
            r"ADAPO.target \(a fraction of the first iteration's entropy\) must be .* got -0.5",
        ),
        ({"target": 0.0, "relative": False}, r"ADAPO.target \(an entropy in nats\) must be .* got 0.0"),
        ({"target": float("nan")}, r"ADAPO.target .* got nan"),
    ],
)
def test_construction_errors_name_the_argument_and_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ADAPO(**kwargs)


def test_override_is_the_state_and_pure():
    adapo = ADAPO()
    adapo.load_state_dict({"eps_high": 0.33, "initial_entropy": 1.0, "target": 0.9, "iterations": 5})
    view = make_view(torch.tensor([[-1.0, -2.0]]), torch.tensor([1.0]))
    before = adapo.state_dict()
    overrides = adapo.replace_inputs(view)
    assert adapo.adjust(view) is None
    assert adapo.state_dict() == before
    assert overrides.owned() == ["eps_high"] and overrides.eps_high == 0.33
    assert ADAPO.replaces == ("eps_high",)


def test_the_loss_clips_at_the_adaptive_eps_high():
    adapo = ADAPO(eps_high_init=0.4)
    old = torch.tensor([[-1.0, -1.0]])
    # ratios exp(0.3) = 1.35 and exp(0.5) = 1.65, A = 1: with eps_high 0.4 only the second is clipped
    # (at 1.4); with the loss's own eps_high of 0.2 both would be.
    logprobs = (old + torch.tensor([[0.3, 0.5]])).requires_grad_(True)
    view = make_view(logprobs, torch.tensor([1.0]), old_logprobs=old, eps_high=0.2)
    result = microbatch_loss(Loss(), view, [adapo], max_length=2)
    assert result.clipped_high.tolist() == [[False, True]]
    # loss = -(exp(0.3) + 1.4) / 2
    assert result.loss.item() == pytest.approx(-(torch.exp(torch.tensor(0.3)).item() + 1.4) / 2, abs=1e-6)


def test_law_sequence_by_hand_and_logs():
    adapo, module = ADAPO(), LogRecorder()
    # it 1: 2.0 is the target, on target -> 0.28; then below: 0.308, 0.3388, 0.37268, 0.409948 -> 0.4 (max);
    # it 6: 3.0 above -> 0.4 / 1.1 = 0.363636...
    values = []
    for entropy in (2.0, 1.5, 1.5, 1.5, 1.5, 3.0):
        _step(adapo, entropy, module)
        values.append(adapo.eps_high)
    assert values == pytest.approx([0.28, 0.308, 0.3388, 0.37268, 0.4, 0.4 / 1.1])
    assert adapo.state_dict() == {
        "eps_high": pytest.approx(0.4 / 1.1),
        "initial_entropy": 2.0,
        "target": 2.0,
        "iterations": 6,
    }
    assert [name for name, _, _ in module.logged] == ["reg/ADAPO/eps_high", "reg/ADAPO/target"] * 6
    assert [value for _, value, _ in module.logged][::2] == pytest.approx(values)
    assert [value for _, value, _ in module.logged][1::2] == [2.0] * 6
    assert all(kw == {"on_step": True, "on_epoch": False, "batch_size": 1} for _, _, kw in module.logged)


def test_relative_fraction_and_absolute_targets():
    fraction = ADAPO(eps_high_init=0.21, target=0.5)
    # target = 0.5 * 2.0 = 1.0; 2.0 is above: 0.21 / 1.1 = 0.1909 -> 0.2 (min), and stays there
    _step(fraction, 2.0)
    _step(fraction, 2.0)
    assert (fraction.target, fraction.initial_entropy, fraction.eps_high) == (1.0, 2.0, 0.2)
    absolute = ADAPO(target=1.2, relative=False)
    _step(absolute, 1.0)  # 1.0 nats < 1.2 nats: 0.28 * 1.1
    assert absolute.target == 1.2 and absolute.eps_high == pytest.approx(0.308)


def test_state_dict_round_trip():
    adapo = ADAPO(target=0.9)
    for entropy in (2.0, 1.0, 1.0):
        _step(adapo, entropy)
    state = adapo.state_dict()
    assert all(isinstance(v, (int, float)) for v in state.values())
    restored = ADAPO(target=0.9)
    restored.load_state_dict(copy.deepcopy(state))
    assert restored.state_dict() == state
    _step(adapo, 3.0)
    _step(restored, 3.0)
    assert restored.state_dict() == adapo.state_dict()


def test_two_owners_of_eps_high_are_an_error_naming_both():
    with pytest.raises(ConfigError, match=r"regularizers ADAPO and OwnsEpsHigh both replace 'eps_high'"):
        find_regularizers([ADAPO(), OwnsEpsHigh()])


# --- fits --------------------------------------------------------------------------------------------


def test_fit_updates_state_once_per_iteration_and_logs(tiny_model_dir, tmp_path):
    adapo, entropies = ADAPO(target=0.5), EntropyLog()
    trainer, _ = short_fit(
        tiny_model_dir,
        tmp_path,
        [adapo, entropies],
        iterations=2,
        ppo_epochs=2,
        minibatch_size=4,
        microbatch_size=2,  # 4 updates and 8 micro-batches per iteration
    )
    assert len(entropies.entropies) == 2
    target = 0.5 * entropies.entropies[0]
    # Replaying the law once per reported entropy gives the callback's state: one update per iteration
    # (here the entropy is above half its initial value: 0.28 / 1.1 / 1.1 = 0.2314).
    expected = _replay(0.28, entropies.entropies, target)
    assert adapo.state_dict() == {
        "eps_high": expected,
        "initial_entropy": entropies.entropies[0],
        "target": target,
        "iterations": 2,
    }
    assert expected == pytest.approx(0.28 / 1.1**2)
    assert trainer.logged_metrics["reg/ADAPO/eps_high"].item() == pytest.approx(expected)
    assert trainer.logged_metrics["reg/ADAPO/target"].item() == pytest.approx(target)


def test_checkpoint_carries_state_and_resumed_fit_continues(tiny_model_dir, tmp_path):
    first = ADAPO(target=0.5)
    short_fit(tiny_model_dir, tmp_path / "first", [first], iterations=2, checkpoint=True)
    (path,) = (tmp_path / "first" / "checkpoints").glob("*.ckpt")
    saved = first.state_dict()
    assert saved["iterations"] == 2
    assert torch.load(path, weights_only=False)["callbacks"][first.state_key] == saved

    resumed, entropies = ADAPO(target=0.5), EntropyLog()
    watcher = StateAtStart(resumed)
    short_fit(
        tiny_model_dir, tmp_path / "resumed", [resumed, watcher, entropies], iterations=3, ckpt_path=str(path)
    )
    assert watcher.state == saved  # restored before the first resumed iteration
    assert len(entropies.entropies) == 1  # one more iteration
    # the target stays that of the first fit (not re-measured on resume)
    assert resumed.state_dict() == {
        "eps_high": _replay(saved["eps_high"], entropies.entropies, saved["target"]),
        "initial_entropy": saved["initial_entropy"],
        "target": saved["target"],
        "iterations": 3,
    }


def test_adapo_warns_once_when_fully_on_policy():
    adapo = ADAPO()

    class Module:
        def log(self, *args, **kwargs):
            pass

    with pytest.warns(UserWarning, match="one optimizer update per rollout"):
        adapo.on_train_batch_end(
            None, Module(), {"entropy": torch.tensor(1.0), "updates": torch.tensor(1.0)}, None, 0
        )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapo.on_train_batch_end(
            None, Module(), {"entropy": torch.tensor(1.0), "updates": torch.tensor(1.0)}, None, 1
        )
