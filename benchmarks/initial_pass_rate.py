"""Pass rate of a policy on held-out arithmetic questions before any RL: greedy and sampled.

Generates the validation questions of `lit_entropy.ArithmeticDataModule` (same seed, so the same questions the
recipe validates on), samples through `GRPO.generate` (the chat template, system prompt and sampling options
that training uses) and scores with `lit_entropy.rewards.last_number_match`. Prints the greedy accuracy, the
sampled pass rate (fraction of all sampled completions that are correct), the fraction of questions with at
least one correct and at least one wrong sample (the ones that give GRPO a non-zero advantage), the fraction of
truncated completions, and a few completions. Usage (CPU, about a minute per 128 questions x 4 samples):

    .venv/bin/python benchmarks/initial_pass_rate.py --num-questions 256 --samples 4 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from lit_entropy import GRPO, ArithmeticDataModule, Policy, Reward, Sampling  # noqa: E402
from lit_entropy.arithmetic import DEFAULT_TEMPLATE  # noqa: E402
from lit_entropy.rewards import last_number_match  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=".cache/models/SmolLM2-135M-Instruct")
    parser.add_argument("--num-questions", type=int, default=256, help="validation questions generated")
    parser.add_argument("--samples", type=int, default=4, help="sampled completions per question")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--system-prompt", default=None, help="default: the chat template's own")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE)
    parser.add_argument("--operations", default="+", help="e.g. '+-'")
    parser.add_argument("--min-operand", type=int, default=1)
    parser.add_argument("--max-operand", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="the data module's seed")
    parser.add_argument("--batch-size", type=int, default=64, help="questions per generate call")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--show", type=int, default=6, help="completions to print")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data = ArithmeticDataModule(
        num_train=1,
        num_val=args.num_questions,
        seed=args.seed,
        operations=list(args.operations),
        min_operand=args.min_operand,
        max_operand=args.max_operand,
        template=args.template,
    )
    data.setup("validate")
    rows = data.val_rows
    assert rows
    module = GRPO(
        policy=Policy(path=args.model, lora=None),
        rewards=[Reward(fn="lit_entropy.rewards.last_number_match")],
        sampling=Sampling(
            group_size=max(2, args.samples), max_new_tokens=args.max_new_tokens, temperature=args.temperature
        ),
        system_prompt=args.system_prompt,
    )
    module.configure_model()

    started = time.perf_counter()
    greedy: list[float] = []
    sampled: list[float] = []  # [questions * samples], question-major
    truncated = tokens = 0
    shown: list[tuple[str, str, float]] = []
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start : start + args.batch_size]
        out = module.generate(batch, greedy=True, num_samples=1)
        greedy += [last_number_match(c, e) for c, e in zip(out.completions, out.examples)]
        if args.samples:
            out = module.generate(batch, num_samples=args.samples)
            scores = [last_number_match(c, e) for c, e in zip(out.completions, out.examples)]
            sampled += scores
            truncated += int(out.truncated.sum())
            tokens += int(out.completion_mask.sum())
            shown += list(zip([e["prompt"] for e in out.examples], out.completions, scores))
    seconds = time.perf_counter() - started

    n = len(rows)
    print(
        f"{n} held-out questions ({args.operations} on [{args.min_operand}, {args.max_operand}]), seed {args.seed}"
    )
    print(
        f"system prompt: {args.system_prompt!r}; template: {args.template!r}; {args.max_new_tokens} new tokens"
    )
    print(f"greedy accuracy:        {sum(greedy) / n:.3f}")
    if args.samples:
        per_question = [sampled[i * args.samples : (i + 1) * args.samples] for i in range(n)]
        mixed = sum(0 < sum(s) < len(s) for s in per_question)
        print(
            f"sampled pass rate:      {sum(sampled) / len(sampled):.3f}  (T={args.temperature}, {args.samples}/question)"
        )
        print(f"questions with mixed samples (non-zero advantage): {mixed / n:.3f}")
        print(
            f"truncated completions:  {truncated / len(sampled):.3f}; mean tokens {tokens / len(sampled):.1f}"
        )
    print(f"wall time: {seconds:.0f} s ({torch.get_num_threads()} threads)")
    for prompt, completion, score in shown[: args.show]:
        print(f"  [{score:.0f}] {prompt!r} -> {completion!r}")


if __name__ == "__main__":
    main()
