"""transformers ``generate`` against the colocated vLLM engine, side by side in one process: rollouts, then whole
RL iterations, on SmolLM2-135M-Instruct (CPU).

1. Rollouts: the same ``B`` prompts, ``G`` completions each, up to ``--new-tokens`` tokens, fp32, T = 1, sampled
   by `generate_rollout` (the HF path, shared-prompt prefill) and by `vllm_rollout` in alternation, ``--rounds``
   times after one warm-up call each. Prints sampled tokens per second of each and the ratio.
2. Mismatch: the engine's log-probs of its sampled tokens against the trainer's forward pass over the same
   weights (``rollout/sampler_logprob_diff``), for an fp32 base and a 4-bit nf4 base (fp32 and bf16 compute;
   the engine serves the dequantized base + merged adapters in the compute dtype), after one random update of
   the adapters.
3. RL iterations: `GRPO` fits of ``--iterations`` iterations of the recipe recipes/cpu/smollm2-arithmetic.yaml's
   shape (8 prompts x 8, LoRA r=16, 16 new tokens, one update per rollout), ``sampling.engine`` hf and vllm,
   the first iteration of each dropped. Prints the median seconds per iteration and the ratio.

The model folder is what ``bash scripts/setup`` prepares. Usage (the CPU build of vLLM installed):

    .venv/bin/python benchmarks/vllm_engine.py --rounds 2 --iterations 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from lightning.pytorch import Trainer, seed_everything  # noqa: E402
from timing import IterationTimer  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from lit_entropy import GRPO, ArithmeticDataModule, LoRA, Policy, Quantization, Reward, Sampling  # noqa: E402
from lit_entropy.head import completion_logprobs_and_entropy, fused_head_parts  # noqa: E402
from lit_entropy.model import load_policy  # noqa: E402
from lit_entropy.prompts import render_prompt  # noqa: E402
from lit_entropy.rollout import generate_rollout  # noqa: E402
from lit_entropy.vllm_engine import VLLMEngine, vllm_rollout  # noqa: E402
from lit_entropy.vllm_options import VLLMOptions  # noqa: E402


def rollouts(args: argparse.Namespace) -> None:
    policy, tokenizer = load_policy(Policy(path=args.model, lora=LoRA(r=16, alpha=32)))
    policy.eval()
    sampling = Sampling(group_size=args.group_size, max_new_tokens=args.new_tokens, temperature=1.0)
    questions = [f"What is {a} + {a + 3}? Answer with a number." for a in range(args.prompts)]
    prompts = [render_prompt(question, tokenizer, None, None) for question in questions]
    examples = [{"prompt": question} for question in questions]
    cpu = torch.device("cpu")
    started = time.perf_counter()
    engine = VLLMEngine(policy, sampling, VLLMOptions(), "float32", cpu, seed=0)
    print(f"vLLM engine built in {time.perf_counter() - started:.1f} s", file=sys.stderr)

    def hf() -> int:
        return int(
            generate_rollout(policy, tokenizer, prompts, examples, sampling, cpu).completion_mask.sum()
        )

    def vllm(seed: int) -> int:
        rollout = vllm_rollout(engine, policy, 0, tokenizer, prompts, examples, sampling, cpu, seed=seed)
        return int(rollout.completion_mask.sum())

    rates: dict[str, list[float]] = {"hf": [], "vllm": []}
    for warm_up in range(args.rounds + 1):
        for name in ("hf", "vllm") if warm_up % 2 == 0 else ("vllm", "hf"):
            seed_everything(warm_up, verbose=False)
            start = time.perf_counter()
            tokens = hf() if name == "hf" else vllm(warm_up)
            seconds = time.perf_counter() - start
            print(f"round {warm_up}: {name} {tokens} tokens in {seconds:.1f} s", file=sys.stderr)
            if warm_up > 0:  # round 0 warms both up (vLLM's first call builds its kernels)
                rates[name].append(tokens / seconds)
    engine.close()
    hf_rate, vllm_rate = statistics.median(rates["hf"]), statistics.median(rates["vllm"])
    print(
        f"rollouts: {args.prompts} prompts x {args.group_size} completions, up to {args.new_tokens} new tokens, fp32"
    )
    print("| engine | sampled tokens/s (median) | ratio to hf |")
    print("|---|---|---|")
    print(f"| hf (transformers generate) | {hf_rate:.0f} | 1.00 |")
    print(f"| vllm (colocated, CPU build) | {vllm_rate:.0f} | {vllm_rate / hf_rate:.2f} |")


def mismatch(args: argparse.Namespace) -> None:
    cpu = torch.device("cpu")
    sampling = Sampling(group_size=8, max_new_tokens=32, temperature=1.0)
    print("mismatch: |engine - trainer| log-prob of the sampled tokens, 8 prompts x 8, 32 new tokens, T = 1")
    print("| base | engine serves | mean | max |")
    print("|---|---|---|---|")
    for label, quantization, dtype in (
        ("fp32", None, "float32"),
        ("4-bit nf4, fp32 compute", Quantization(compute_dtype="float32"), "float32"),
        ("4-bit nf4, bf16 compute", Quantization(compute_dtype="bfloat16"), "bfloat16"),
    ):
        policy, tokenizer = load_policy(
            Policy(path=args.model, lora=LoRA(r=16, alpha=32), quantization=quantization)
        )
        policy.eval()
        with torch.no_grad():  # one "update": adapters that change the outputs
            generator = torch.Generator().manual_seed(0)
            for name, parameter in policy.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
        questions = [f"What is {a} + {a + 3}? Answer with a number." for a in range(8)]
        prompts = [render_prompt(question, tokenizer, None, None) for question in questions]
        engine = VLLMEngine(policy, sampling, VLLMOptions(), dtype, cpu, seed=0)
        rollout = vllm_rollout(engine, policy, 1, tokenizer, prompts, [{}] * 8, sampling, cpu, seed=1)
        engine.close()
        batch = rollout.select(torch.arange(rollout.num_sequences))
        with torch.no_grad():
            logprobs, _ = completion_logprobs_and_entropy(
                policy, fused_head_parts(policy), batch, sampling.temperature, None
            )
        diff = (batch.pad_to_rollout(logprobs) - rollout.sampler_logprobs).abs()[rollout.completion_mask]
        print(f"| {label} | {dtype} weights, dequantized + merged | {diff.mean():.2e} | {diff.max():.2e} |")
        del policy


def iterations(args: argparse.Namespace, engine: str, folder: str) -> list[float]:
    seed_everything(0, verbose=False)
    module = GRPO(
        policy=Policy(path=args.model, lora=LoRA(r=16, alpha=32)),
        rewards=[Reward(fn="lit_entropy.rewards.last_number_match")],
        sampling=Sampling(group_size=8, max_new_tokens=16, temperature=0.7, engine=engine),
        minibatch_size=64,
        microbatch_size=8,
        learning_rate=2e-4,
        val_num_samples=0,
        adapter_dir=os.path.join(folder, f"adapter-{engine}"),
    )
    timer = IterationTimer()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=args.iterations,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    data = ArithmeticDataModule(batch_size=8, num_train=512, operations=["+"], min_operand=1, max_operand=20)
    trainer.fit(module, data)
    return timer.seconds[1:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=".cache/models/SmolLM2-135M-Instruct")
    parser.add_argument(
        "--rounds", type=int, default=2, help="timed rollout rounds per engine (after a warm-up)"
    )
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rollout (B)")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--new-tokens", type=int, default=64, help="longest completion")
    parser.add_argument(
        "--iterations", type=int, default=4, help="RL iterations per fit (the first is dropped)"
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["rollouts", "mismatch", "iterations"],
        choices=["rollouts", "mismatch", "iterations"],
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "rollouts" in args.parts:
        rollouts(args)
    if "mismatch" in args.parts:
        mismatch(args)
    if "iterations" in args.parts and args.iterations > 1:
        seconds = {}
        with tempfile.TemporaryDirectory(prefix="vllm_engine_") as folder:
            for engine in ("hf", "vllm"):
                seconds[engine] = iterations(args, engine, folder)
                print(f"{engine}: {[round(s, 2) for s in seconds[engine]]} s/it", file=sys.stderr)
        base = statistics.median(seconds["hf"])
        print("RL iterations: 8 prompts x 8 completions, 16 new tokens, LoRA r=16, one update per rollout")
        print("| sampling.engine | iterations | median s/it | ratio to hf |")
        print("|---|---|---|---|")
        for engine, values in seconds.items():
            print(
                f"| {engine} | {len(values)} | {statistics.median(values):.2f} | {statistics.median(values) / base:.2f} |"
            )


if __name__ == "__main__":
    main()
