"""Seconds per RL iteration of the embedded default under the RL step's speed options, side by side.

Variants (each a `GRPO` argument set; everything else as in recipes/embedded/grpo.yaml, whose 256-sequence
rollout in mini-batches of 128 makes 2 updates per iteration, so old log-probs are needed):

- ``default``: ``fused_head=True`` (log-probs from hidden states, chunked head), old log-probs from a second
  no-grad forward pass over the rollout.
- ``sampler_logprobs``: the same, old log-probs recorded during generation instead of the second pass.
- ``logits_head``: ``fused_head=False``, log-probs from the model's own logits (the previous path).

Every fit starts from the same seed and the same warmed-up model (``--cache``); the variants alternate within
each round and the order is reversed every other round; the first iteration of every fit is dropped. Prints
the median seconds per iteration of each variant and its ratio to ``default``. Usage (CPU):

    .venv/bin/python benchmarks/rollout_options.py --rounds 2 --iterations 4 [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from lightning.pytorch import Trainer, seed_everything  # noqa: E402
from timing import IterationTimer  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from lit_entropy import GRPO, CountdownDataModule, EmbeddedModel, LoRA, Policy, Reward, Sampling  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "sampler_logprobs": {"sampler_logprobs": True},
    "logits_head": {"fused_head": False},
}


def fit(args: argparse.Namespace, options: dict[str, Any], folder: str) -> list[float]:
    seed_everything(0, verbose=False)
    module = GRPO(
        policy=Policy(embedded=EmbeddedModel(cache_dir=args.cache), lora=LoRA(r=16, alpha=32)),
        rewards=[Reward(fn="lit_entropy.demo.countdown.countdown_reward")],
        sampling=Sampling(group_size=args.group_size, max_new_tokens=12),
        minibatch_size=args.batch_size * args.group_size // 2,
        learning_rate=1e-3,
        val_num_samples=0,
        adapter_dir=os.path.join(folder, "adapter"),
        **options,
    )
    timer = IterationTimer()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=2 * args.iterations,  # 2 updates per iteration
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, CountdownDataModule(batch_size=args.batch_size, num_train=args.batch_size * 50))
    return timer.seconds[1:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--iterations", type=int, default=4, help="RL iterations per fit (the first is dropped)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per iteration (B)")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cache", default=".cache/lit_entropy", help="embedded model cache (built once)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="rollout_options_") as folder:
        for round_index in range(args.rounds):
            names = list(VARIANTS) if round_index % 2 == 0 else list(reversed(VARIANTS))
            for name in names:
                times = fit(args, VARIANTS[name], folder)
                seconds[name].extend(times)
                print(f"round {round_index}: {name} {statistics.median(times):.3f} s/it", file=sys.stderr)
    base = statistics.median(seconds["default"])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, N = {args.batch_size * args.group_size}"
    )
    print("| variant | iterations | median s/it | ratio to default |")
    print("|---|---|---|---|")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"| {name} | {len(values)} | {median:.3f} | {median / base:.3f} |")


if __name__ == "__main__":
    main()
