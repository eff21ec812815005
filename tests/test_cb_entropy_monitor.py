"""`EntropyMonitor`: statistics against hand computations and numpy, predicted vs observed entropy change,
state, the cross-rank reduction (two gloo processes) and real fits of the tiny model.

Shapes: ``N`` sequences in the rollout, ``T`` completion length.
"""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import short_fit
from lightning.pytorch import Callback

from lit_entropy.callbacks.entropy_monitor import (
    EntropyMonitor,
    pearson_correlation,
    position_buckets,
    subsample_evenly,
    top_mean,
)
from lit_entropy.errors import ConfigError

# --- helpers -------------------------------------------------------------------------------------------


class FakeModule:
    """Stands in for the LightningModule in on_train_batch_end: records every ``log`` call."""

    def __init__(self) -> None:
        self.logged: list[tuple[str, float, dict]] = []

    def log(self, name, value, **kwargs):
        self.logged.append((name, float(value), kwargs))

    def iteration(self, index: int) -> dict[str, float]:
        """The ``monitor/`` values of the ``index``-th iteration that logged (keys without the namespace)."""
        groups: list[dict[str, float]] = []
        for name, value, _ in self.logged:
            if name == "monitor/entropy_mean":
                groups.append({})
            groups[-1][name.removeprefix("monitor/")] = value
        return groups[index]


def outputs_of(entropy, logprobs, advantages, mask) -> dict[str, torch.Tensor]:
    """``training_step``-like outputs; ``advantages`` ``[N]`` is broadcast over the tokens."""
    advantages = torch.as_tensor(advantages, dtype=torch.float32)
    mask = torch.as_tensor(mask).bool()
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(mask.shape).clone()
    return {
        "entropy": torch.tensor(0.0),
        "token_entropy": torch.as_tensor(entropy, dtype=torch.float32),
        "token_logprobs": torch.as_tensor(logprobs, dtype=torch.float32),
        "token_advantages": advantages,
        "token_mask": mask,
    }


def end_iteration(monitor: EntropyMonitor, module: FakeModule, outputs: dict) -> None:
    monitor.on_train_batch_end(None, module, outputs, batch=[], batch_idx=0)


def hand_outputs() -> dict[str, torch.Tensor]:
    """2 x 3 rollout, token (0, 2) is padding (its NaN / -inf must not leak into anything): 5 kept tokens."""
    return outputs_of(
        entropy=[[0.005, 1.0, float("nan")], [2.0, 0.5, 3.0]],
        logprobs=[[-1.0, -2.0, float("-inf")], [-0.5, -3.0, -0.1]],
        advantages=[1.0, -1.0],
        mask=[[1, 1, 0], [1, 1, 1]],
    )


def random_outputs(seed: int, n: int = 16, t: int = 10) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=generator)
    mask = torch.arange(t)[None, :] < lengths[:, None]  # [N, T] right padding, every row keeps >= 1 token
    entropy = torch.rand(n, t, generator=generator).pow(3) * 2.0  # many near-zero entropies
    logprobs = -torch.rand(n, t, generator=generator) * 4.0
    advantages = torch.randn(n, generator=generator)
    return outputs_of(entropy, logprobs, advantages, mask)


def numpy_statistics(outputs: dict, top_fraction: float, low: float, buckets: int) -> dict[str, float]:
    """The statistics by the definitions, in float64 numpy, independently of the monitor's code."""
    mask = outputs["token_mask"].numpy()
    h = outputs["token_entropy"].double().numpy()
    lp = outputs["token_logprobs"].double().numpy()
    adv = outputs["token_advantages"].double().numpy()
    kept_h, kept_lp, kept_adv = h[mask], lp[mask], adv[mask]
    cov = (kept_lp - kept_lp.mean()) * (kept_adv - kept_adv.mean())
    count = max(math.floor(top_fraction * len(cov)), 1)
    stats = {
        "entropy_mean": kept_h.mean(),
        "entropy_median": np.median(kept_h),
        "entropy_p10": np.percentile(kept_h, 10),
        "entropy_p90": np.percentile(kept_h, 90),
        "entropy_frac_below": np.mean(kept_h < low),
        "cov_mean": cov.mean(),
        "cov_top_mean": np.sort(cov)[::-1][:count].mean(),
        "predicted_dH": -cov.mean(),
    }
    t = mask.shape[1]
    positions = np.broadcast_to(np.arange(t), mask.shape)[mask]
    for b in range(buckets):
        inside = (positions >= b * t / buckets) & (positions < (b + 1) * t / buckets)
        if inside.any():
            stats[f"entropy_bucket_{b}"] = kept_h[inside].mean()
    return stats


# --- pure maths ----------------------------------------------------------------------------------------


def test_position_buckets_are_equal_width():
    # floor(t * 4 / 6): 0, 0.67, 1.33, 2, 2.67, 3.33 -> 0 0 1 2 2 3
    assert position_buckets(6, 4).tolist() == [0, 0, 1, 2, 2, 3]
    assert position_buckets(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert position_buckets(3, 4).tolist() == [0, 1, 2]  # bucket 3 is empty
    assert position_buckets(5, 1).tolist() == [0] * 5
    assert position_buckets(0, 4).tolist() == []


def test_subsample_evenly_by_hand():
    values = torch.arange(10.0)
    # floor(i * 10 / 4) for i = 0..3: 0, 2, 5, 7
    assert subsample_evenly(values, 4).tolist() == [0.0, 2.0, 5.0, 7.0]
    assert subsample_evenly(values, 10) is values
    assert subsample_evenly(values, 50) is values
    assert subsample_evenly(values, 1).tolist() == [0.0]


def test_top_mean_by_hand():
    values = torch.tensor([0.5, -1.0, 3.0, 2.0])
    assert top_mean(values, 1) == 3.0
    assert top_mean(values, 2) == pytest.approx(2.5)  # (3 + 2) / 2
    assert top_mean(values, 9) == pytest.approx(1.125)  # all four: 4.5 / 4
    assert math.isnan(top_mean(torch.empty(0), 1))


def test_pearson_correlation_against_numpy_and_degenerate_cases():
    xs, ys = [1.0, 2.0, 4.0, 3.0], [0.5, 0.1, 2.0, 1.0]
    assert pearson_correlation(xs, ys) == pytest.approx(np.corrcoef(xs, ys)[0, 1], abs=1e-12)
    assert pearson_correlation([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert pearson_correlation([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert pearson_correlation([1.0], [2.0]) is None
    assert pearson_correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None  # constant side: r undefined
    with pytest.raises(ValueError, match="paired samples, got 2 and 1"):
        pearson_correlation([1.0, 2.0], [1.0])


# --- construction --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"position_buckets": 0}, r"EntropyMonitor.position_buckets must be an integer >= 1, got 0"),
        ({"position_buckets": 2.5}, r"position_buckets must be an integer >= 1, got 2.5"),
        ({"max_tokens": 0}, r"EntropyMonitor.max_tokens must be an integer >= 1, got 0"),
        ({"top_fraction": 0.0}, r"EntropyMonitor.top_fraction must be a fraction in \(0, 1\], got 0.0"),
        ({"top_fraction": 1.5}, r"top_fraction must be a fraction in \(0, 1\], got 1.5"),
        ({"low_entropy": -0.1}, r"EntropyMonitor.low_entropy must be a finite number >= 0 nats, got -0.1"),
        ({"low_entropy": float("inf")}, r"low_entropy must be a finite number >= 0 nats, got inf"),
    ],
)
def test_construction_errors_name_the_argument_and_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EntropyMonitor(**kwargs)


def test_is_a_plain_callback_that_the_module_never_asks_for_the_loss():
    from lightning.pytorch import Callback

    from lit_entropy.regularizer import Regularizer, find_regularizers
    from lit_entropy.run_log import config_label

    monitor = EntropyMonitor()
    assert isinstance(monitor, Callback) and not isinstance(monitor, Regularizer)
    assert find_regularizers([monitor]) == []
    # a run that only monitors is plain GRPO in reports
    callbacks = [{"class_path": "lit_entropy.callbacks.EntropyMonitor"}]
    assert config_label({"trainer": {"callbacks": callbacks}}) == "GRPO"
    assert monitor.state_dict() == {"previous_entropy": None, "previous_prediction": None, "pairs": []}
    assert monitor.state_key == "EntropyMonitor[EntropyMonitor]"  # checkpoints of earlier versions still load


# --- statistics ----------------------------------------------------------------------------------------


def test_statistics_of_a_hand_built_rollout():
    monitor, module = EntropyMonitor(position_buckets=3, top_fraction=0.4), FakeModule()
    end_iteration(monitor, module, hand_outputs())
    stats = module.iteration(0)
    # kept entropies 0.005, 1, 2, 0.5, 3: mean 6.505 / 5 = 1.301; sorted 0.005 0.5 1 2 3: median 1
    assert stats["entropy_mean"] == pytest.approx(1.301)
    assert stats["entropy_median"] == pytest.approx(1.0)
    # linear interpolation at rank 0.1 * 4 = 0.4: 0.005 + 0.4 * 0.495 = 0.203; at 3.6: 2 + 0.6 * 1 = 2.6
    assert stats["entropy_p10"] == pytest.approx(0.203)
    assert stats["entropy_p90"] == pytest.approx(2.6)
    assert stats["entropy_frac_below"] == pytest.approx(0.2)  # only 0.005 < 0.01
    # T = 3 positions, 3 buckets: (0.005 + 2) / 2, (1 + 0.5) / 2, 3 / 1
    assert stats["entropy_bucket_0"] == pytest.approx(1.0025)
    assert stats["entropy_bucket_1"] == pytest.approx(0.75)
    assert stats["entropy_bucket_2"] == pytest.approx(3.0)
    # lp -1 -2 -0.5 -3 -0.1 (mean -1.32), A 1 1 -1 -1 -1 (mean -0.2):
    # centred lp 0.32 -0.68 0.82 -1.68 1.22, centred A 1.2 1.2 -0.8 -0.8 -0.8
    # cov 0.384 -0.816 -0.656 1.344 -0.976: mean -0.72 / 5 = -0.144
    # top floor(0.4 * 5) = 2 of them: (1.344 + 0.384) / 2 = 0.864
    assert stats["cov_mean"] == pytest.approx(-0.144, abs=1e-6)
    assert stats["cov_top_mean"] == pytest.approx(0.864, abs=1e-6)
    assert stats["predicted_dH"] == pytest.approx(0.144, abs=1e-6)
    assert "observed_dH" not in stats and "dH_correlation" not in stats  # nothing to compare with yet
    assert all(math.isfinite(value) for value in stats.values())
    assert all(
        kwargs == {"on_step": True, "on_epoch": False, "batch_size": 1} for *_, kwargs in module.logged
    )


def test_default_top_fraction_averages_one_token():
    monitor, module = EntropyMonitor(), FakeModule()
    end_iteration(monitor, module, hand_outputs())
    assert module.iteration(0)["cov_top_mean"] == pytest.approx(
        1.344, abs=1e-6
    )  # max(floor(2e-4 * 5), 1) = 1


@pytest.mark.parametrize("seed", [0, 1])
def test_statistics_match_numpy_on_a_random_rollout(seed):
    outputs = random_outputs(seed)
    monitor, module = EntropyMonitor(position_buckets=4, top_fraction=0.05, low_entropy=0.05), FakeModule()
    end_iteration(monitor, module, outputs)
    got = module.iteration(0)
    expected = numpy_statistics(outputs, top_fraction=0.05, low=0.05, buckets=4)
    assert expected["entropy_frac_below"] > 0  # the threshold is exercised
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_quantiles_use_an_evenly_spaced_subsample_beyond_max_tokens():
    outputs = random_outputs(3)
    kept = outputs["token_entropy"][outputs["token_mask"]].double().numpy()  # row-major
    assert len(kept) > 7
    monitor, module = EntropyMonitor(max_tokens=7), FakeModule()
    end_iteration(monitor, module, outputs)
    stats = module.iteration(0)
    sample = kept[np.arange(7) * len(kept) // 7]
    assert stats["entropy_median"] == pytest.approx(np.median(sample), rel=1e-6)
    assert stats["entropy_p10"] == pytest.approx(np.percentile(sample, 10), rel=1e-6)
    assert stats["entropy_p90"] == pytest.approx(np.percentile(sample, 90), rel=1e-6)
    assert stats["entropy_mean"] == pytest.approx(kept.mean(), rel=1e-6)  # the mean still uses every token


def test_predicted_and_observed_entropy_change_and_their_correlation():
    monitor, module = EntropyMonitor(), FakeModule()
    rollouts = [random_outputs(seed) for seed in range(5)]
    for outputs in rollouts:
        end_iteration(monitor, module, outputs)
    expected = [numpy_statistics(outputs, 2e-4, 0.01, 4) for outputs in rollouts]
    entropies = [stats["entropy_mean"] for stats in expected]
    predicted = [stats["predicted_dH"] for stats in expected]
    observed = np.diff(entropies)  # H_t - H_{t-1}, logged at t
    for t in range(5):
        stats = module.iteration(t)
        assert stats["predicted_dH"] == pytest.approx(predicted[t], rel=1e-5)
        if t == 0:
            assert "observed_dH" not in stats
        else:
            assert stats["observed_dH"] == pytest.approx(observed[t - 1], rel=1e-5, abs=1e-7)
        # pairs (predicted_{t-1}, observed_t): t - 1 of them at t, so the correlation starts at t = 3
        assert ("dH_correlation" in stats) == (t >= 3)
    assert module.iteration(4)["dH_correlation"] == pytest.approx(np.corrcoef(predicted[:4], observed)[0, 1])
    assert len(monitor.pairs) == 4
    assert monitor.previous_prediction == pytest.approx(predicted[4], rel=1e-5)


def test_rollout_without_kept_tokens_logs_nothing_and_keeps_the_reference():
    monitor, module = EntropyMonitor(), FakeModule()
    end_iteration(monitor, module, hand_outputs())
    before = monitor.state_dict()
    empty = hand_outputs()
    empty["token_mask"] = torch.zeros(2, 3, dtype=torch.bool)
    count = len(module.logged)
    end_iteration(monitor, module, empty)
    assert len(module.logged) == count
    assert monitor.state_dict() == before


def test_missing_or_misshapen_outputs_are_errors_naming_them():
    monitor = EntropyMonitor()
    outputs = hand_outputs()
    del outputs["token_logprobs"]
    with pytest.raises(ConfigError, match=r"EntropyMonitor needs outputs \['token_logprobs'\]"):
        end_iteration(monitor, FakeModule(), outputs)
    outputs = hand_outputs()
    outputs["token_mask"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(
        ConfigError, match=r"outputs\['token_mask'\] has shape \(3, 3\), token_entropy has \(2, 3\)"
    ):
        end_iteration(monitor, FakeModule(), outputs)
    with pytest.raises(ConfigError, match=r"return a dict with .*got Tensor"):
        end_iteration(monitor, FakeModule(), torch.tensor(1.0))


def test_state_round_trip_continues_identically():
    monitor = EntropyMonitor()
    for seed in range(3):
        end_iteration(monitor, FakeModule(), random_outputs(seed))
    state = monitor.state_dict()
    assert isinstance(state["previous_entropy"], float) and len(state["pairs"]) == 2
    restored = EntropyMonitor()
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    original, resumed = FakeModule(), FakeModule()
    end_iteration(monitor, original, random_outputs(3))
    end_iteration(restored, resumed, random_outputs(3))
    assert original.logged == resumed.logged
    assert resumed.iteration(0)["dH_correlation"] == original.iteration(0)["dH_correlation"]
    with pytest.raises(ConfigError, match=r"EntropyMonitor state lacks \['pairs'\]"):
        EntropyMonitor().load_state_dict({"previous_entropy": 1.0, "previous_prediction": None})


# --- across ranks --------------------------------------------------------------------------------------


def _rank_worker(rank: int, world: int, port: int, queue) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the OpenMP pool its parent may have started
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        outputs = _split_rollout()[rank]
        monitor, module = EntropyMonitor(position_buckets=2, top_fraction=0.2), FakeModule()
        end_iteration(monitor, module, outputs)
        queue.put((rank, module.iteration(0)))
    finally:
        dist.destroy_process_group()


def _split_rollout() -> list[dict[str, torch.Tensor]]:
    """A rollout of 4 x 5 split by rows over two ranks, unevenly: rank 1 holds 1 row with few kept tokens
    and the largest covariances, so a rank-local centring or top-k would give other values."""
    whole = random_outputs(7, n=4, t=5)
    whole["token_logprobs"][3] = torch.tensor([-9.0, -8.0, 0.0, 0.0, 0.0])
    whole["token_advantages"][3] = -3.0
    whole["token_mask"][3] = torch.tensor([True, True, False, False, False])
    return [{key: value[:3] if value.dim() else value for key, value in whole.items()},
            {key: value[3:] if value.dim() else value for key, value in whole.items()}]  # fmt: skip


def test_two_ranks_log_the_statistics_of_the_whole_rollout():
    parts = _split_rollout()
    whole = {key: torch.cat([parts[0][key], parts[1][key]]) if parts[0][key].dim() else parts[0][key]
             for key in parts[0]}  # fmt: skip
    expected = numpy_statistics(whole, top_fraction=0.2, low=0.01, buckets=2)
    with socket.socket() as probe:  # a free port for the gloo rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # fork: the workers inherit the imported modules (spawn would re-import transformers in each)
    context = mp.get_context("fork")
    queue = context.Queue()
    processes = [context.Process(target=_rank_worker, args=(rank, 2, port, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    try:
        results = dict(queue.get(timeout=60) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
    assert [process.exitcode for process in processes] == [0, 0]
    # the ranks' own statistics differ from the whole rollout's (else the test would prove nothing)
    alone = numpy_statistics(parts[0], top_fraction=0.2, low=0.01, buckets=2)
    assert alone["cov_mean"] != pytest.approx(expected["cov_mean"], rel=1e-2)
    assert alone["cov_top_mean"] != pytest.approx(expected["cov_top_mean"], rel=1e-2)
    for rank in range(2):
        for key, value in expected.items():
            assert results[rank][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (rank, key)


# --- real fits -----------------------------------------------------------------------------------------


class Probe(Callback):
    """Records the module's entropy of every iteration."""

    def __init__(self) -> None:
        self.entropies: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.entropies.append(float(outputs["entropy"]))


class RecordingMonitor(EntropyMonitor):
    """Records every ``monitor/`` value it logs, and the state it is resumed from."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history: list[dict[str, float]] = []
        self.loaded: dict | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        metrics = trainer.callback_metrics  # what pl_module.log recorded (earlier iterations' keys persist)
        self.history.append(
            {k.removeprefix("monitor/"): float(v) for k, v in metrics.items() if "monitor/" in k}
        )

    def load_state_dict(self, state_dict):
        self.loaded = dict(state_dict)
        super().load_state_dict(state_dict)


def test_fit_logs_monitor_metrics_every_iteration(tiny_model_dir, tmp_path):
    monitor, probe = RecordingMonitor(), Probe()
    short_fit(
        tiny_model_dir, tmp_path, [probe, monitor], iterations=4,
        ppo_epochs=2, minibatch_size=4, microbatch_size=2,
    )  # fmt: skip
    assert len(monitor.history) == 4
    for t, stats in enumerate(monitor.history):
        # the monitor's token mean is the module's synchronised outputs["entropy"]
        assert stats["entropy_mean"] == pytest.approx(probe.entropies[t], rel=1e-5)
        assert stats["entropy_p10"] <= stats["entropy_median"] <= stats["entropy_p90"]
        assert 0.0 <= stats["entropy_frac_below"] <= 1.0
        assert stats["cov_top_mean"] >= stats["cov_mean"]
        assert stats["predicted_dH"] == pytest.approx(-stats["cov_mean"])
        assert {f"entropy_bucket_{b}" for b in range(4)} <= stats.keys()  # T = 6 >= 4: no empty bucket
    for t in range(1, 4):
        # both means are float32 sums of the same tokens, in another order: equal to ~1e-7 relative
        observed = probe.entropies[t] - probe.entropies[t - 1]
        assert monitor.history[t]["observed_dH"] == pytest.approx(observed, abs=1e-5)
    assert "dH_correlation" in monitor.history[3]
    assert len(monitor.pairs) == 3


def test_state_resumes_through_a_checkpoint(tiny_model_dir, tmp_path):
    first = RecordingMonitor()
    trainer, _ = short_fit(tiny_model_dir, tmp_path / "a", [first], iterations=2, checkpoint=True)
    [ckpt] = (tmp_path / "a" / "checkpoints").glob("*.ckpt")
    resumed, probe = RecordingMonitor(), Probe()
    short_fit(tiny_model_dir, tmp_path / "b", [probe, resumed], iterations=3, ckpt_path=str(ckpt))
    assert resumed.loaded == first.state_dict()
    assert len(resumed.history) == 1  # only iteration 2 ran
    # observed against the entropy of iteration 1, carried in the checkpoint
    observed = probe.entropies[0] - first.previous_entropy
    assert resumed.history[0]["observed_dH"] == pytest.approx(observed, abs=1e-5)
    assert resumed.pairs[:1] == first.pairs and len(resumed.pairs) == 2
