"""What `EntropyMonitor` costs: RL iterations of the embedded tiny model with and without it, interleaved.

Every fit starts from the same seed and the same warmed-up model (built once in ``--cache``); fits with and
without the monitor alternate (their order flips every round, so a drift in machine load hits both alike).
The first iteration of every fit is left out (warm-up). Prints the median seconds per RL iteration of both,
their ratio, and the time spent in the monitor's own hook (the direct measure of its overhead). Usage (CPU;
the first run also builds the embedded model):

    .venv/bin/python benchmarks/monitor_overhead.py --rounds 3 --iterations 5 [--cache .cache/lit_entropy]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lightning.pytorch import Trainer, seed_everything  # noqa: E402
from timing import IterationTimer  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from lit_entropy import GRPO, CountdownDataModule, EmbeddedModel, LoRA, Policy, Reward, Sampling  # noqa: E402
from lit_entropy.callbacks.entropy_monitor import EntropyMonitor  # noqa: E402


class TimedMonitor(EntropyMonitor):
    """`EntropyMonitor` that also records the wall seconds of its own ``on_train_batch_end``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds: list[float] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        started = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.seconds.append(time.perf_counter() - started)


def fit(args: argparse.Namespace, monitor: TimedMonitor | None, folder: str) -> list[float]:
    """One fit of ``args.iterations`` RL iterations; returns the seconds of each iteration after the first."""
    seed_everything(0, verbose=False)
    embedded = EmbeddedModel(warmup_steps=args.warmup_steps, cache_dir=args.cache)
    module = GRPO(
        policy=Policy(embedded=embedded, lora=LoRA(r=16, alpha=32)),
        rewards=[Reward(fn="lit_entropy.demo.countdown.countdown_reward")],
        sampling=Sampling(group_size=args.group_size, max_new_tokens=args.max_new_tokens),
        learning_rate=1e-3,
        val_num_samples=0,
        adapter_dir=os.path.join(folder, "adapter"),
    )
    timer = IterationTimer()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=args.iterations,  # one optimizer update per RL iteration (the whole rollout)
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=([] if monitor is None else [monitor]) + [timer],  # the timer's end hook runs last
    )
    data = CountdownDataModule(batch_size=args.batch_size, num_train=args.batch_size * (args.iterations + 1))
    trainer.fit(module, data)
    return timer.seconds[1:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="pairs of fits (without, with the monitor)")
    parser.add_argument(
        "--iterations", type=int, default=5, help="RL iterations per fit (the first is dropped)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per iteration (B)")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="completion length cap (T)")
    parser.add_argument("--warmup-steps", type=int, default=600, help="embedded model's supervised warm-up")
    parser.add_argument("--cache", default=".cache/lit_entropy", help="embedded model cache (built once)")
    args = parser.parse_args()
    if args.iterations < 2 or args.rounds < 1:
        parser.error("--iterations must be >= 2 (the first is dropped) and --rounds >= 1")
    without: list[float] = []
    with_monitor: list[float] = []
    hook: list[float] = []
    with tempfile.TemporaryDirectory(prefix="monitor_overhead_") as folder:
        for round_index in range(args.rounds):
            order = (False, True) if round_index % 2 == 0 else (True, False)
            for use_monitor in order:
                monitor = TimedMonitor() if use_monitor else None
                seconds = fit(args, monitor, folder)
                (with_monitor if use_monitor else without).extend(seconds)
                if monitor is not None:
                    hook.extend(monitor.seconds[1:])
                label = "with" if use_monitor else "without"
                print(
                    f"round {round_index}: {label} monitor {statistics.median(seconds):.3f} s/it",
                    file=sys.stderr,
                )
    base, monitored, own = (
        statistics.median(without),
        statistics.median(with_monitor),
        statistics.median(hook),
    )
    n = args.batch_size * args.group_size
    print("| rollout | iterations | without s/it | with s/it | ratio | monitor hook ms/it | hook share |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| N={n}, T<={args.max_new_tokens} | {len(without)} + {len(with_monitor)} | {base:.3f} | "
        f"{monitored:.3f} | {monitored / base:.3f} | {1000 * own:.2f} | {own / monitored:.2%} |"
    )


if __name__ == "__main__":
    main()
