"""Reliability: exact resume after SIGKILL and SIGTERM, atomic checkpoint writes, non-finite and empty updates,
failing and hanging rewards inside a fit. The user-facing account is docs/reliability.md.

The kill tests run `reliability_fit.py` in subprocesses (one thread each) and compare every RL iteration they
log with an uninterrupted in-process run of the same fit (also one thread): the numbers must be bit-identical.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import reliability_fit
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lit_entropy import checkpoint_io
from lit_entropy.callbacks import EntropyConstraint
from lit_entropy.checkpoint_io import CheckpointWriteError, SameFolderCheckpointIO
from lit_entropy.cli import find_last_checkpoint
from lit_entropy.demo import CountdownDataModule
from lit_entropy.errors import LitEntropyError
from lit_entropy.model import LoRA, Policy
from lit_entropy.module import GRPO
from lit_entropy.regularizer import Adjustment, MinibatchView, Regularizer, scalar_outputs
from lit_entropy.reward_spec import Reward
from lit_entropy.rollout import Sampling

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "reliability_fit.py"
UPDATES = reliability_fit.UPDATES


# ------------------------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run in-process fits on one thread, as the worker subprocesses do, so the numbers are comparable bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def read_records(path: Path, tag: str | None = None, event: str = "iteration") -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written while we poll
            row = json.loads(line)
            if row["event"] == event and (tag is None or row["tag"] == tag):
                rows.append(row)
    return rows


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, weights_only=False, map_location="cpu")["global_step"])


class Worker:
    """`reliability_fit.py` in a subprocess, with its output in ``<root>/<tag>.log`` and ``TMPDIR=<root>/tmp``."""

    def __init__(self, model_dir: Path, root: Path, tag: str, *args: str) -> None:
        self.root, self.tag = root, tag
        self.records = root / "records.jsonl"
        self.tmpdir = root / "tmp"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.log = root / f"{tag}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(self.tmpdir)}
        command = [sys.executable, str(WORKER), "--model", str(model_dir), "--root", str(root)]
        command += ["--records", str(self.records), "--tag", tag, *args]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def iterations(self) -> list[dict[str, Any]]:
        return read_records(self.records, self.tag)

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"{self.tag} exited ({self.process.returncode}) before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"{self.tag}: no {what} after {timeout} s:\n{self.tail()}")
            time.sleep(0.02)

    def signal(self, signum: int, timeout: float = 120.0) -> int:
        os.kill(self.process.pid, signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"{self.tag} did not exit within {timeout} s of signal {signum}:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted fit, in-process: its iteration records and final LoRA weights."""
    root = tmp_path_factory.mktemp("reference")
    with one_thread():
        _, module = reliability_fit.run_fit(tiny_model_dir, root, root / "records.jsonl", tag="reference")
    rows = read_records(root / "records.jsonl")
    assert [row["iteration"] for row in rows] == list(range(reliability_fit.ITERATIONS))
    return {"rows": {row["iteration"]: row for row in rows}, "weights": reliability_fit.lora_weights(module)}


def assert_same_iterations(rows: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    """Every recorded iteration equals the uninterrupted run's: same prompts, statistics and weights, bit for bit."""
    assert rows
    for row in rows:
        expected = reference["rows"][row["iteration"]]
        where = f"{row['tag']} iteration {row['iteration']}"
        assert row["prompts"] == expected["prompts"], where  # the data position
        assert row["global_step"] == expected["global_step"], where
        assert row["stats"] == expected["stats"], where  # rewards, entropy, loss, clip fractions, grad norm
        assert row["weights_sum"] == expected["weights_sum"], where


def assert_same_weights(weights: dict[str, torch.Tensor], reference: dict[str, Any]) -> None:
    assert weights.keys() == reference["weights"].keys()
    for name, value in weights.items():
        assert torch.equal(value, reference["weights"][name]), name


# ------------------------------------------------------------------------- 1. SIGKILL at several points


def test_resume_after_sigkill_at_several_points_is_exact(
    reference: dict[str, Any], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """One run killed three times, resumed each time, ends exactly where the uninterrupted run ends.

    A: killed (SIGKILL) half-way through overwriting ``last.ckpt`` with the step-8 checkpoint (writes slowed down):
       ``last.ckpt`` must still be the complete step-4 version, the half-written bytes only in a temporary file.
    B: resumed from ``last`` (step 4), killed right after the epoch's last iteration (step 16) was checkpointed.
    C: resumed from ``epoch=0-step=16.ckpt`` (an epoch boundary), killed part-way through iteration 5 (the
       second of epoch 1; reward scoring slowed down), after step 20 was checkpointed.
    D: resumed in-process from ``last`` (step 20, mid-epoch), runs to the end.
    """
    checkpoints = tmp_path / "checkpoints"
    marker = tmp_path / "writes.txt"

    def writes() -> list[str]:
        return marker.read_text().splitlines() if marker.exists() else []

    a = Worker(tiny_model_dir, tmp_path, "A", "--slow-write", "0.5", "--write-marker", str(marker))
    # checkpoint writes: step 4, last (4), step 8, last (8): the 4th is half done and sleeping
    a.wait_for(lambda: len(writes()) >= 4, "the 4th checkpoint write")
    assert a.signal(signal.SIGKILL) == -signal.SIGKILL
    written = [Path(w).name.split(".tmp")[0] for w in writes()]  # temporary files named after their target
    assert [re.sub(r"\.[^.]+$", "", name.lstrip(".")) for name in written] == [
        "epoch=0-step=4.ckpt",
        "last.ckpt",
        "epoch=0-step=8.ckpt",
        "last.ckpt",
    ]
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == [
        "epoch=0-step=4.ckpt",
        "epoch=0-step=8.ckpt",
        "last.ckpt",
    ]
    assert checkpoint_step(checkpoints / "last.ckpt") == 4  # the previous version, intact
    assert checkpoint_step(checkpoints / "epoch=0-step=8.ckpt") == 8
    # the interrupted write went to a temporary file beside its target (never to $TMPDIR), left behind
    (partial,) = list(checkpoints.glob(".last.ckpt.*.tmp"))
    assert not list(a.tmpdir.iterdir())
    assert 0 < partial.stat().st_size < (checkpoints / "last.ckpt").stat().st_size
    with pytest.raises(Exception):  # noqa: B017 - truncated zip archive; the exact error is torch's business
        torch.load(partial, weights_only=False)

    b = Worker(tiny_model_dir, tmp_path, "B", "--resume", "last")
    b.wait_for(lambda: (checkpoints / "epoch=0-step=16.ckpt").exists(), "the step-16 checkpoint")
    assert b.signal(signal.SIGKILL) == -signal.SIGKILL

    c = Worker(
        tiny_model_dir,
        tmp_path,
        "C",
        "--resume",
        str(checkpoints / "epoch=0-step=16.ckpt"),
        "--reward-sleep",
        "0.1",
    )
    c.wait_for(
        lambda: (
            (checkpoints / "epoch=1-step=20.ckpt").exists()
            and checkpoint_step(checkpoints / "last.ckpt") == 20
        ),
        "the step-20 checkpoint",
    )
    time.sleep(0.2)  # into iteration 5: sampled, scoring its 8 completions (0.1 s each)
    assert c.signal(signal.SIGKILL) == -signal.SIGKILL
    assert not (checkpoints / "epoch=1-step=24.ckpt").exists()

    with one_thread():
        _, module = reliability_fit.run_fit(tiny_model_dir, tmp_path, a.records, tag="D", resume="last")

    starts = {row["tag"]: row["global_step"] for row in read_records(a.records, event="start")}
    assert starts == {"A": 0, "B": 4, "C": 16, "D": 20}
    done = {tag: [row["iteration"] for row in read_records(a.records, tag)] for tag in "ABCD"}
    assert done["A"] == [0, 1] and done["B"][:3] == [1, 2, 3] and done["C"] == [4]
    assert done["D"] == [5]
    # every iteration any of the four runs completed (the reruns included) is the uninterrupted run's
    assert_same_iterations(read_records(a.records), reference)
    assert_same_weights(reliability_fit.lora_weights(module), reference)


# ---------------------------------------------- 1b. SIGKILL and SIGTERM at every kind of moment, with validation

#: Where each run of a chain is stopped: (moment, RL iteration). Iterations 1, 3 and 5 are followed by a
#: validation, iteration 4 is not (its checkpoint is written before its metrics row is). A SIGKILL loses the
#: iteration under way, so a killed chain can stop again in the same iteration; a SIGTERM finishes it.
CHAINS = {
    signal.SIGKILL: [
        ("generation", 1),
        ("update", 2),
        ("validation", 3),
        ("checkpoint-write", 4),
        ("after-checkpoint", 4),
    ],
    signal.SIGTERM: [
        ("generation", 1),
        ("update", 2),
        ("validation", 3),
        ("checkpoint-write", 4),
        ("after-checkpoint", 5),  # the last iteration: the run finishes instead of stopping
    ],
}


def metrics_rows(path: Path) -> list[dict[str, str]]:
    """``metrics.csv`` as rows of ``{column: text}``, empty cells and timing columns left out."""
    with path.open(newline="") as handle:
        return [
            {key: value for key, value in row.items() if value and key not in reliability_fit.TIMING_KEYS}
            for row in csv.DictReader(handle)
        ]


@pytest.fixture(scope="module")
def validated_reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted fit with validation every second iteration and a CSVLogger, in-process."""
    root = tmp_path_factory.mktemp("validated-reference")
    with one_thread():
        _, module = reliability_fit.run_fit(
            tiny_model_dir, root, root / "records.jsonl", tag="reference", validate=True
        )
    rows = read_records(root / "records.jsonl")
    assert [row["iteration"] for row in rows] == list(range(reliability_fit.ITERATIONS))
    metrics = metrics_rows(root / "logs" / "reference" / "metrics.csv")
    validated = [int(row["step"]) for row in metrics if "val/accuracy" in row]
    assert len(validated) == 3, metrics  # after iterations 1, 3 and 5
    return {
        "rows": {row["iteration"]: row for row in rows},
        "weights": reliability_fit.lora_weights(module),
        "metrics": metrics,
        "adapter": (root / "adapter-reference" / "adapter_model.safetensors").read_bytes(),
    }


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_run_stopped_at_every_kind_of_moment_resumes_to_the_uninterrupted_metrics_and_adapter(
    validated_reference: dict[str, Any], tiny_model_dir: Path, tmp_path: Path, signum: int
) -> None:
    """One run stopped five times (during generation, during the update, in the middle of a validation, half-way
    through writing a checkpoint, right after a checkpoint written before its iteration's metrics row), resumed
    from ``last`` each time: the finished run's ``metrics.csv`` is the uninterrupted run's, row for row, and so
    are every iteration and the saved adapter."""
    marker = tmp_path / "pauses.txt"

    def paused(moment: str, iteration: int) -> bool:
        return marker.exists() and f"{moment} {iteration}" in marker.read_text().splitlines()

    for n, (moment, iteration) in enumerate(CHAINS[signum]):
        args = ["--validate", "--pause", f"{moment}:{iteration}", "--pause-marker", str(marker)]
        run = Worker(tiny_model_dir, tmp_path, f"run{n}", *args, *(["--resume", "last"] if n else []))
        run.wait_for(
            lambda m=moment, i=iteration: paused(m, i), f"the pause at {moment} of iteration {iteration}"
        )
        code = run.signal(signum)
        assert code == (-signal.SIGKILL if signum == signal.SIGKILL else 0), run.tail()
        finished = (tmp_path / f"final-run{n}.pt").exists()
        if signum == signal.SIGTERM and not finished:
            assert "SIGTERM: checkpoint saved to" in run.tail(), run.tail()
    assert not list(run.tmpdir.iterdir())  # no checkpoint write used $TMPDIR
    # a SIGTERM in the last iteration lets the fit end normally (adapter exported); a SIGKILL never does
    assert finished == (signum == signal.SIGTERM), run.tail()
    if finished:  # a SIGTERM during the last iteration: that run finished normally
        tag = run.tag
        weights = torch.load(tmp_path / f"final-{tag}.pt", weights_only=True)
    else:
        tag = "final"
        with one_thread():
            _, module = reliability_fit.run_fit(
                tiny_model_dir, tmp_path, tmp_path / "records.jsonl", tag=tag, resume="last", validate=True
            )
        weights = reliability_fit.lora_weights(module)
    assert metrics_rows(tmp_path / "logs" / tag / "metrics.csv") == validated_reference["metrics"]
    assert_same_iterations(read_records(tmp_path / "records.jsonl"), validated_reference)
    assert_same_weights(weights, validated_reference)
    assert (tmp_path / f"adapter-{tag}" / "adapter_model.safetensors").read_bytes() == validated_reference[
        "adapter"
    ]


# -------------------------------------------------------------------------------------------- 2. SIGTERM


def test_sigterm_stops_at_the_iteration_boundary_with_a_checkpoint_that_resumes_exactly(
    reference: dict[str, Any], tiny_model_dir: Path, tmp_path: Path
) -> None:
    checkpoints = tmp_path / "checkpoints"
    # periodic checkpoints every 16 steps and no ModelCheckpoint last.ckpt: a last.ckpt can only be the SIGTERM one
    args = ("--every", "16", "--no-save-last", "--reward-sleep", "0.1")  # >= 0.8 s per iteration
    run = Worker(tiny_model_dir, tmp_path, "term", *args)
    run.wait_for(lambda: len(run.iterations()) >= 1, "the first iteration")
    assert run.signal(signal.SIGTERM) == 0  # a clean exit: SIGTERMException is a SystemExit
    log = run.tail()
    assert "Received SIGTERM" in log and "SIGTERM: checkpoint saved to" in log, log
    stopped_after = len(run.iterations())  # the iteration under way when the signal came was finished
    assert 1 <= stopped_after < reliability_fit.ITERATIONS
    assert checkpoint_step(checkpoints / "last.ckpt") == UPDATES * stopped_after  # exactly that boundary
    assert not (tmp_path / "final-term.pt").exists()  # fit did not run to the end

    with one_thread():
        _, module = reliability_fit.run_fit(
            tiny_model_dir, tmp_path, run.records, tag="resumed", resume="last", every=16, save_last=False
        )
    (start,) = read_records(run.records, "resumed", event="start")
    assert start["global_step"] == UPDATES * stopped_after
    resumed = read_records(run.records, "resumed")
    assert [row["iteration"] for row in resumed] == list(range(stopped_after, reliability_fit.ITERATIONS))
    assert_same_iterations(run.iterations() + resumed, reference)
    assert_same_weights(reliability_fit.lora_weights(module), reference)


class _SigtermAfterFirstIteration(Callback):
    def __init__(self) -> None:
        self.sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # only while Lightning's handler is installed: the default action would end pytest
        if trainer.fit_loop.total_batch_idx == 0 and callable(signal.getsignal(signal.SIGTERM)):
            os.kill(os.getpid(), signal.SIGTERM)
            self.sent = True


class _StartStep(Callback):
    def __init__(self) -> None:
        self.global_step: int | None = None

    def on_train_start(self, trainer, pl_module):
        self.global_step = trainer.global_step


def test_ckpt_path_last_finds_the_sigterm_checkpoint_with_a_versioned_logger(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    def fit(callbacks: list[Callback], ckpt_path: str | None) -> Trainer:
        seed_everything(0)
        module = GRPO(
            policy=Policy(path=str(tiny_model_dir), lora=LoRA(r=4, alpha=8)),
            rewards=[Reward(fn="reliability_fit.char_code_reward")],
            sampling=Sampling(group_size=2, max_new_tokens=4),
            val_num_samples=0,
            adapter_dir=str(tmp_path / "adapter"),
        )
        trainer = Trainer(
            accelerator="cpu",
            max_steps=2,
            logger=CSVLogger(save_dir=str(tmp_path)),  # default ModelCheckpoint: <log_dir>/checkpoints
            default_root_dir=str(tmp_path),
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=callbacks,
        )
        trainer.fit(module, CountdownDataModule(batch_size=2, num_train=8, num_val=0), ckpt_path=ckpt_path)
        return trainer

    # the set-up must work (pytest.fail, not assert: only the final assertion is the known failure)
    sigterm = _SigtermAfterFirstIteration()
    with pytest.raises(SystemExit):
        fit([sigterm], None)
    if not sigterm.sent or not (tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt").exists():
        pytest.fail("no SIGTERM checkpoint in lightning_logs/version_0/checkpoints")
    # Lightning's own "last" looks in the new run's version_1 folder; the CLI's `--ckpt_path last` resolves
    # to the newest last*.ckpt under the root instead (lit_entropy.cli.find_last_checkpoint)
    resolved = find_last_checkpoint(str(tmp_path))
    assert Path(resolved) == tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    start = _StartStep()
    fit([start], resolved)
    assert start.global_step == 1  # resumed after the first iteration, not started over


# ---------------------------------------------------------------------------- 4. non-finite updates


class NaNOnUpdates(Regularizer):
    """Makes the loss (and so every gradient) NaN on the chosen (iteration, update) pairs."""

    def __init__(self, updates: set[tuple[int, int]]) -> None:
        self.updates = set(updates)

    def adjust(self, view: MinibatchView) -> Adjustment | None:
        if (view.iteration, view.update) not in self.updates:
            return None
        return Adjustment(loss_terms={"nan": view.token_mean(view.logprobs) * math.nan})


class Snapshots(Callback):
    """Every RL iteration's outputs and the LoRA weights after it."""

    def __init__(self) -> None:
        self.outputs: list[dict[str, float]] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        self.initial = reliability_fit.lora_weights(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(scalar_outputs(outputs))
        self.weights.append(reliability_fit.lora_weights(pl_module))


def small_fit(
    tiny_model_dir: Path,
    tmp_path: Path,
    callbacks: list[Callback],
    iterations: int,
    **grpo_kwargs: Any,
) -> tuple[Trainer, GRPO]:
    """``iterations`` RL iterations of 2 prompts x 4 completions, 4 updates each (2 epochs x 2 mini-batches).

    The run is bounded by batches, not optimizer steps, so it does not depend on how skipped updates count.
    """
    seed_everything(0)
    kwargs: dict[str, Any] = {
        "policy": Policy(path=str(tiny_model_dir), lora=LoRA(r=4, alpha=8)),
        "rewards": [Reward(fn="reliability_fit.char_code_reward")],
        "sampling": Sampling(group_size=4, max_new_tokens=6),
        "ppo_epochs": 2,
        "minibatch_size": 4,
        "learning_rate": 1e-2,
        "adapter_dir": str(tmp_path / "adapter"),
        "val_num_samples": 0,
    }
    kwargs.update(grpo_kwargs)
    module = GRPO(**kwargs)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=iterations,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module, CountdownDataModule(batch_size=2, num_train=16, num_val=0))
    return trainer, module


#: iteration 1 entirely NaN (4 in a row, under the default limit of 5), then one NaN update in iteration 2
NAN_UPDATES = {(1, 0), (1, 1), (1, 2), (1, 3), (2, 1)}


@pytest.fixture(scope="module")
def nan_fit(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp_path = tmp_path_factory.mktemp("nan_fit")
    snapshots = Snapshots()
    checkpoint = ModelCheckpoint(
        dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=UPDATES, save_top_k=-1
    )
    trainer, module = small_fit(
        tiny_model_dir, tmp_path, [NaNOnUpdates(NAN_UPDATES), snapshots, checkpoint], iterations=3
    )
    return {"trainer": trainer, "module": module, "snapshots": snapshots, "tmp_path": tmp_path}


def test_nonfinite_updates_are_skipped_counted_and_leave_the_weights_unchanged(
    nan_fit: dict[str, Any],
) -> None:
    snapshots, trainer = nan_fit["snapshots"], nan_fit["trainer"]
    assert len(snapshots.outputs) == 3  # the run finished
    assert [o["train/skipped_nonfinite"] for o in snapshots.outputs] == [0.0, 4.0, 1.0]
    assert [o["train/skipped_empty"] for o in snapshots.outputs] == [0.0, 0.0, 0.0]
    before, after_nan, after = snapshots.weights
    for name in before:
        assert torch.equal(after_nan[name], before[name]), name  # the all-NaN iteration changed nothing
        assert torch.isfinite(after[name]).all(), name
    # iteration 2 trained (3 of its 4 updates were applied)
    assert any(not torch.equal(after[name], after_nan[name]) for name in after)
    assert any(not torch.equal(before[name], snapshots.initial[name]) for name in before)
    # AdamW stepped only for the 12 - 5 applied updates
    assert {int(state["step"]) for state in trainer.optimizers[0].state.values()} == {7}
    assert math.isfinite(snapshots.outputs[2]["train/grad_norm"])  # the mean over the 3 applied updates


def test_periodic_checkpoints_continue_after_a_skipped_update(nan_fit: dict[str, Any]) -> None:
    # 3 iterations with ModelCheckpoint(every_n_train_steps=updates per iteration): one checkpoint each expected
    assert len(list((nan_fit["tmp_path"] / "checkpoints").glob("*.ckpt"))) == 3


def test_consecutive_nonfinite_updates_stop_the_fit_with_a_clear_error(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    snapshots = Snapshots()
    # the last two updates of iteration 0 and the first of iteration 1: the count runs across iterations
    nan = NaNOnUpdates({(0, 2), (0, 3), (1, 0)})
    with pytest.raises(LitEntropyError) as info:
        small_fit(tiny_model_dir, tmp_path, [nan, snapshots], iterations=3, max_consecutive_nonfinite=3)
    message = str(info.value)
    assert "3 updates in a row" in message and "max_consecutive_nonfinite=3" in message
    assert len(snapshots.outputs) == 1  # stopped inside iteration 1
    assert snapshots.outputs[0]["train/skipped_nonfinite"] == 2.0


# -------------------------------------------------------------------------------------- 3. atomic writes


@pytest.fixture()
def private_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$TMPDIR`` for ``tempfile``, so a test can check that no checkpoint write ever puts a file there."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_checkpoint_write_that_fails_midway_leaves_no_file_and_the_old_one_intact(
    nan_fit: dict[str, Any], tmp_path: Path, private_tmpdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer, module = nan_fit["trainer"], nan_fit["module"]
    assert type(trainer.strategy.checkpoint_io) is SameFolderCheckpointIO  # installed by GRPO at fit start
    folder = tmp_path / "checkpoints"
    good = folder / "last.ckpt"
    trainer.save_checkpoint(good)
    good_bytes = good.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == [
        "last.ckpt"
    ]  # the temporary file was renamed into place

    written: list[int] = []

    def write_half_then_fail(handle: Any, data: memoryview) -> None:
        written.append(handle.write(data[: len(data) // 2]))
        handle.flush()
        assert Path(handle.name).parent == folder  # the temporary file is beside its target
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_io, "_write", write_half_then_fail)
    with pytest.raises(
        CheckpointWriteError, match=r"last\.ckpt failed: No space left on device; nothing was"
    ):
        trainer.save_checkpoint(good)  # overwriting the previous checkpoint
    with pytest.raises(CheckpointWriteError, match=r"new\.ckpt failed: No space left"):
        trainer.save_checkpoint(folder / "new.ckpt")
    assert len(written) == 2 and min(written) > 0  # half of each checkpoint had been written
    assert good.read_bytes() == good_bytes  # the old checkpoint was never touched
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]  # no new file, no temporary file left
    assert not list(private_tmpdir.iterdir())  # nothing ever went to $TMPDIR
    monkeypatch.undo()

    checkpoint = torch.load(good, weights_only=True)  # what fit(ckpt_path=...) does
    weights = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
    assert checkpoint["state_dict"].keys() == weights.keys()
    assert all(torch.equal(checkpoint["state_dict"][k], weights[k]) for k in weights)


def test_a_checkpoint_that_cannot_be_serialized_writes_nothing(
    nan_fit: dict[str, Any], tmp_path: Path, private_tmpdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("cannot pickle")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        nan_fit["trainer"].save_checkpoint(tmp_path / "checkpoints" / "new.ckpt")
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())
    assert not list(private_tmpdir.iterdir())


# ----------------------------------------------------------------------------- 5. failing / hanging rewards

_CALLS = {"raises": 0, "hangs": 0}
_RELEASE = threading.Event()


def raises_every_third_call(completion: str, example: dict) -> float:
    """1.0, except that calls 0, 3, 6, ... raise."""
    _CALLS["raises"] += 1
    if (_CALLS["raises"] - 1) % 3 == 0:
        raise ValueError("cannot parse the answer")
    return 1.0


def hangs_every_fourth_call(completion: str, example: dict) -> float:
    """0.5, except that calls 0, 4, 8, ... hang for 5 s (released when the test ends)."""
    _CALLS["hangs"] += 1
    if (_CALLS["hangs"] - 1) % 4 == 0:
        _RELEASE.wait(5.0)
    return 0.5


class _CountFromTrainStart(Callback):
    """Restart the call counts once training starts (the preflight at fit start probes each reward once)."""

    def on_train_start(self, trainer, pl_module):
        _CALLS.update(raises=0, hangs=0)


def test_failing_and_hanging_rewards_are_scored_on_error_counted_and_the_fit_goes_on(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _RELEASE.clear()
    snapshots = Snapshots()
    rewards = [
        Reward(fn=f"{__name__}.raises_every_third_call", name="raises"),
        Reward(fn=f"{__name__}.hangs_every_fourth_call", name="hangs", timeout=0.2),
    ]
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="lit_entropy.reward_scorer"):
            trainer, _ = small_fit(
                tiny_model_dir,
                tmp_path,
                [_CountFromTrainStart(), snapshots],
                iterations=2,
                rewards=rewards,
                reward_on_error=-1.0,
            )
    finally:
        _RELEASE.set()
    elapsed = time.monotonic() - started
    assert len(snapshots.outputs) == 2 and trainer.global_step == 2 * UPDATES
    assert elapsed < 15.0  # 4 hung calls were cut at 0.2 s, not waited for (5 s each)
    assert _CALLS == {"raises": 16, "hangs": 16}  # every completion was scored by both
    for outputs in snapshots.outputs:
        # of 8 completions per iteration: 3 raised (calls 0, 3, 6 and 9, 12, 15), 2 hung (0, 4 and 8, 12)
        assert outputs["rollout/reward_errors"] == 5.0
        assert outputs["rollout/reward_timeouts"] == 2.0
        assert outputs["rollout/reward/raises"] == pytest.approx((5 * 1.0 + 3 * -1.0) / 8)
        assert outputs["rollout/reward/hangs"] == pytest.approx((6 * 0.5 + 2 * -1.0) / 8)
        assert outputs["rollout/reward_mean"] == pytest.approx(0.25 + 0.125)
        assert outputs["train/skipped_nonfinite"] == 0.0
    assert trainer.logged_metrics["rollout/reward_timeouts"].item() == 2.0
    assert "reward 'raises' failed on 3 of 8 completions (0 timed out" in caplog.text
    assert "reward 'hangs' failed on 2 of 8 completions (2 timed out" in caplog.text


# -------------------------------------------------------------------------------------- 6. empty rollout


def empty_rollout_in_iteration(monkeypatch: pytest.MonkeyPatch, iteration: int) -> None:
    """Make the rollout of RL iteration ``iteration`` keep no token (all of ``completion_mask`` False)."""
    generate = GRPO.generate

    def generate_empty(self: GRPO, examples, greedy=False, num_samples=None):
        rollout = generate(self, examples, greedy, num_samples)
        if greedy or self.trainer.fit_loop.total_batch_idx != iteration:
            return rollout
        return dataclasses.replace(rollout, completion_mask=torch.zeros_like(rollout.completion_mask))

    monkeypatch.setattr(GRPO, "generate", generate_empty)


def test_a_rollout_without_kept_tokens_skips_its_updates_and_changes_nothing(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty_rollout_in_iteration(monkeypatch, 1)
    snapshots = Snapshots()
    trainer, _ = small_fit(tiny_model_dir, tmp_path, [snapshots], iterations=3)
    assert len(snapshots.outputs) == 3
    assert [o["train/skipped_empty"] for o in snapshots.outputs] == [0.0, 4.0, 0.0]
    assert [o["train/skipped_nonfinite"] for o in snapshots.outputs] == [0.0, 0.0, 0.0]
    empty = snapshots.outputs[1]
    assert empty["rollout/completion_length"] == 0.0
    assert empty["train/loss"] == 0.0 and empty["train/grad_norm"] == 0.0
    assert math.isfinite(empty["rollout/reward_mean"])  # the completions were still scored
    before, after_empty, after = snapshots.weights
    for name in before:
        assert torch.equal(after_empty[name], before[name]), name
    assert any(not torch.equal(after[name], after_empty[name]) for name in after)
    assert {int(state["step"]) for state in trainer.optimizers[0].state.values()} == {8}


def test_an_empty_rollout_does_not_poison_an_entropy_controller(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty_rollout_in_iteration(monkeypatch, 1)
    constraint = EntropyConstraint(target_start=5.0)
    snapshots = Snapshots()
    small_fit(tiny_model_dir, tmp_path, [constraint, snapshots], iterations=4)
    assert math.isfinite(constraint.state_dict()["lambda"])
    assert [o["train/skipped_nonfinite"] for o in snapshots.outputs] == [0.0] * 4


def test_docs_table_lists_exactly_these_tests() -> None:
    text = (ROOT / "docs" / "reliability.md").read_text()
    table = text.split("## Scenarios and their tests", 1)[1]
    documented = set(re.findall(r"\| `(test_[a-z0-9_]+)` \|", table))
    tests = {name for name in globals() if name.startswith("test_") and callable(globals()[name])}
    assert documented == tests - {"test_docs_table_lists_exactly_these_tests"}
