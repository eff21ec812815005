"""A short GRPO fit of the tiny model for tests/test_reliability.py, in-process (`run_fit`) or as a script to kill.

Six RL iterations of 2 prompts x 4 completions (real sampling at temperature 1), two PPO epochs over two
mini-batches of 4 (4 optimizer updates per iteration, so the mini-batch shuffling RNG matters), over 8
Countdown prompts shuffled per epoch (4 iterations per epoch: the run crosses an epoch boundary). A
``ResumableCheckpoint`` writes ``epoch=E-step=S.ckpt`` every ``--every`` optimizer steps (and ``last.ckpt``).
Every iteration appends one JSON line to ``--records`` (flushed at once): every logged statistic, the prompts it
trained on and the sum of the LoRA weights after it, so a test can poll the file and kill the process at a
chosen point, then compare a resumed run's iterations with an uninterrupted run's.

    python tests/reliability_fit.py --model DIR --root DIR --records FILE [--resume last|PATH] [--tag A]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from lit_entropy.demo import CountdownDataModule  # noqa: E402
from lit_entropy.model import LoRA, Policy  # noqa: E402
from lit_entropy.module import GRPO  # noqa: E402
from lit_entropy.regularizer import scalar_outputs  # noqa: E402
from lit_entropy.resumable_checkpoint import ResumableCheckpoint  # noqa: E402
from lit_entropy.reward_spec import Reward  # noqa: E402
from lit_entropy.rollout import Sampling  # noqa: E402

ITERATIONS = 6
UPDATES = 4  # ppo_epochs 2 x (N = 8 sequences / minibatch_size 4)
ITERATIONS_PER_EPOCH = 4  # 8 prompts / batch_size 2
#: Logged values that depend on wall time, not on the computation.
TIMING_KEYS = {"train/tokens_per_sec"}


def char_code_reward(completion: str, example: dict, sleep: float = 0.0) -> float:
    """Mean character code / 128 (differs between random completions); ``sleep`` slows the iteration down."""
    if sleep:
        time.sleep(sleep)
    return sum(map(ord, completion)) / (128.0 * max(len(completion), 1))


def lora_weights(module: GRPO) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) weights, detached copies."""
    return {name: p.detach().clone() for name, p in module.policy.named_parameters() if p.requires_grad}


class Record(Callback):
    """Appends a ``start`` line when training starts and one line per RL iteration to a JSON-lines file."""

    def __init__(self, path: str | Path, tag: str) -> None:
        self.path = Path(path)
        self.tag = tag

    def _append(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"tag": self.tag, "pid": os.getpid(), **row}) + "\n")
            handle.flush()

    def on_train_start(self, trainer: Trainer, pl_module: GRPO) -> None:
        self._append({"event": "start", "global_step": trainer.global_step})

    def on_train_batch_end(self, trainer: Trainer, pl_module: GRPO, outputs, batch, batch_idx: int) -> None:
        weights = lora_weights(pl_module).values()
        stats = {key: value for key, value in scalar_outputs(outputs).items() if key not in TIMING_KEYS}
        self._append(
            {
                "event": "iteration",
                "iteration": trainer.fit_loop.total_batch_idx,
                "global_step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "prompts": [row["prompt"] for row in batch],
                "weights_sum": sum(float(w.double().sum()) for w in weights),
                "stats": stats,
            }
        )


def write_checkpoints_in_halves(between: Any) -> None:
    """Make every checkpoint file write put half its bytes on disk, call ``between(handle)``, then write the rest.

    `lit_entropy.checkpoint_io.save_atomically` writes the whole checkpoint with one ``_write`` into a temporary
    file beside the target, so ``between`` runs while that file is half written.
    """
    from lit_entropy import checkpoint_io

    def write(handle: Any, data: memoryview) -> None:
        half = len(data) // 2
        handle.write(data[:half])
        handle.flush()
        between(handle)
        handle.write(data[half:])
        handle.flush()

    checkpoint_io._write = write


def slow_checkpoint_writes(delay: float, marker: str | Path) -> None:
    """Make every checkpoint file write name its target in ``marker``, write half, sleep ``delay``, then the rest,
    long enough for a test to kill the process in the middle of it."""

    def pause(handle: Any) -> None:
        with open(marker, "a") as log:
            log.write(f"{handle.name}\n")
        time.sleep(delay)

    write_checkpoints_in_halves(pause)


def pause_at(moment: str, iteration: int, marker: str | Path, seconds: float = 120.0) -> None:
    """Hold the run at ``moment`` of RL iteration ``iteration`` (0-based) so that a test can signal it there.

    ``moment`` is ``generation`` (sampling the iteration's completions), ``update`` (between its first and second
    optimizer update), ``validation`` (before the second batch of the validation after it), ``checkpoint-write``
    (half of its first checkpoint file written) or ``after-checkpoint`` (a checkpoint of it has just been
    written). The pause names itself in ``marker`` and lasts ``seconds``, or
    until a SIGTERM has been received (Lightning's handler sets a flag; the run then goes on to stop by itself).
    """

    def hold(trainer: Trainer) -> None:
        if trainer.fit_loop.total_batch_idx != iteration or getattr(hold, "done", False):
            return
        hold.done = True  # type: ignore[attr-defined]
        with open(marker, "a") as handle:
            handle.write(f"{moment} {iteration}\n")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not trainer.received_sigterm:
            time.sleep(0.02)

    if moment == "generation":
        original_generate = GRPO.generate

        def generate(self: GRPO, *args: Any, **kwargs: Any) -> Any:
            if self.trainer.training and not self.trainer.validating:
                hold(self.trainer)
            return original_generate(self, *args, **kwargs)

        GRPO.generate = generate  # type: ignore[method-assign]
    elif moment == "update":
        original_update = GRPO._update

        def update(self: GRPO, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("update", args[5] if len(args) > 5 else None) == 1:
                hold(self.trainer)
            return original_update(self, *args, **kwargs)

        GRPO._update = update  # type: ignore[method-assign]
    elif moment == "validation":
        original_step = GRPO.validation_step

        def validation_step(self: GRPO, batch: Any, batch_idx: int) -> None:
            if batch_idx == 1 and self.trainer.state.fn == "fit":
                hold(self.trainer)
            return original_step(self, batch, batch_idx)

        GRPO.validation_step = validation_step  # type: ignore[method-assign]
    elif moment == "after-checkpoint":
        original_save = Trainer.save_checkpoint

        def save_checkpoint(self: Trainer, *args: Any, **kwargs: Any) -> None:
            original_save(self, *args, **kwargs)
            hold(self)

        Trainer.save_checkpoint = save_checkpoint  # type: ignore[method-assign]
    elif moment == "checkpoint-write":
        saving: list[Trainer] = []
        original_save = Trainer.save_checkpoint

        def save_checkpoint(self: Trainer, *args: Any, **kwargs: Any) -> None:
            saving.append(self)
            try:
                original_save(self, *args, **kwargs)
            finally:
                saving.pop()

        Trainer.save_checkpoint = save_checkpoint  # type: ignore[method-assign]
        write_checkpoints_in_halves(lambda handle: hold(saving[-1]))
    else:
        raise ValueError(f"unknown pause moment {moment!r}")


def run_fit(
    model_dir: str | Path,
    root: str | Path,
    records: str | Path,
    tag: str = "run",
    resume: str | None = None,
    every: int = UPDATES,
    save_last: bool = True,
    reward_sleep: float = 0.0,
    validate: bool = False,
) -> tuple[Trainer, GRPO]:
    """Fit (or resume) the run; checkpoints go to ``<root>/checkpoints``. Same numbers in any process.

    ``validate``: validation (greedy and 2 samples on 4 prompts, two batches) after every second iteration, and a
    ``CSVLogger`` writing ``<root>/logs/<tag>/metrics.csv``.
    """
    seed_everything(0)
    module = GRPO(
        policy=Policy(path=str(model_dir), lora=LoRA(r=4, alpha=8)),
        rewards=[Reward(fn=f"{__name__}.char_code_reward", kwargs={"sleep": reward_sleep})],
        sampling=Sampling(group_size=4, max_new_tokens=8, temperature=1.0),
        ppo_epochs=2,
        minibatch_size=4,
        learning_rate=5e-2,
        val_num_samples=2 if validate else 0,
        adapter_dir=str(Path(root) / f"adapter-{tag}"),
        seed=0,
    )
    data = CountdownDataModule(
        batch_size=2, num_train=2 * ITERATIONS_PER_EPOCH, num_val=4 if validate else 0, seed=0, shuffle=True
    )
    checkpoint = ResumableCheckpoint(
        dirpath=str(Path(root) / "checkpoints"), every_n_train_steps=every, save_top_k=-1, save_last=save_last
    )
    trainer = Trainer(
        accelerator="cpu",
        max_steps=ITERATIONS * UPDATES,
        logger=CSVLogger(save_dir=str(Path(root) / "logs"), name="", version=tag) if validate else False,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        limit_val_batches=None if validate else 0,
        val_check_interval=2 if validate else None,
        check_val_every_n_epoch=None if validate else 1,
        num_sanity_val_steps=0,
        callbacks=[Record(records, tag), checkpoint],
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    return trainer, module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--records", required=True)
    parser.add_argument("--tag", default="run")
    parser.add_argument("--resume", default=None, help="'last' or a checkpoint path")
    parser.add_argument(
        "--every", type=int, default=UPDATES, help="checkpoint every this many optimizer steps"
    )
    parser.add_argument("--no-save-last", action="store_true", help="no last.ckpt from ModelCheckpoint")
    parser.add_argument("--reward-sleep", type=float, default=0.0, help="seconds per reward call")
    parser.add_argument("--slow-write", type=float, default=0.0, help="hold each checkpoint write half-done")
    parser.add_argument("--write-marker", default=None, help="file naming each checkpoint write as it starts")
    parser.add_argument("--validate", action="store_true", help="validate every 2 iterations; CSV metrics")
    parser.add_argument("--pause", default=None, help="MOMENT:ITERATION to hold the run at (see pause_at)")
    parser.add_argument("--pause-marker", default=None, help="file naming the pause when it starts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.slow_write:
        slow_checkpoint_writes(args.slow_write, args.write_marker)
    if args.pause:
        moment, iteration = args.pause.split(":")
        pause_at(moment, int(iteration), args.pause_marker)
    _, module = run_fit(
        args.model,
        args.root,
        args.records,
        tag=args.tag,
        resume=args.resume,
        every=args.every,
        save_last=not args.no_save_last,
        reward_sleep=args.reward_sleep,
        validate=args.validate,
    )
    torch.save(lora_weights(module), Path(args.root) / f"final-{args.tag}.pt")


if __name__ == "__main__":
    main()
