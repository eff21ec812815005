"""A short GRPO fit in one process or two (DDP or FSDP2 over gloo, on CPU), for tests/test_distributed.py.

Run as a script (Lightning relaunches it once per extra rank). Rank 0 writes a JSON file with every logged
statistic of every RL iteration and the final LoRA weights, so the test can compare a 2-process run with a
single-process run over the same global batch.

``--scripted`` replaces sampling with completions drawn from a generator seeded by the prompt text and the
iteration, so every process sees the rollouts one process would have sampled for the same prompts; the
comparison then isolates what data parallelism must get right (token counts, loss normalisation, gradient
averaging, cross-rank token selection). Without it the run samples for real (generation under FSDP2).

    python tests/distributed_fit.py --model DIR --prompts FILE --out FILE [--strategy ddp|fsdp2|single]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from lit_entropy import GRPO, LoRA, Policy, Reward, Sampling  # noqa: E402
from lit_entropy.callbacks import ClipCov, HighEntropyTokens, KLCov  # noqa: E402
from lit_entropy.data import PromptDataModule  # noqa: E402
from lit_entropy.distributed import FSDP2  # noqa: E402
from lit_entropy.dynamic_sampling import DynamicSampling  # noqa: E402
from lit_entropy.loss import Loss  # noqa: E402
from lit_entropy.prompts import render_prompt  # noqa: E402
from lit_entropy.regularizer import scalar_outputs
from lit_entropy.rollout import Rollout, completion_keep_mask  # noqa: E402

ALPHABET = "0123456789+-*= "


def digit_reward(completion: str, example: dict) -> float:
    """Fraction of digits in the completion: varies between completions, so advantages are non-zero."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def odd_prompt_digit_reward(completion: str, example: dict) -> float:
    """`digit_reward` for prompts ``i+2i=`` with odd ``i``; 0.5 for every completion of the others (no signal)."""
    return digit_reward(completion, example) if int(example["prompt"].split("+")[0]) % 2 else 0.5


class ScriptedGRPO(GRPO):
    """GRPO whose rollouts depend only on (prompt, completion index, iteration): the same on any rank layout."""

    def generate(self, examples, greedy=False, num_samples=None):
        if greedy:
            return super().generate(examples, greedy, num_samples)
        group = num_samples or self.sampling.group_size
        iteration = self.trainer.fit_loop.total_batch_idx
        prompts = [render_prompt(e["prompt"], self.tokenizer, self.chat_template, None) for e in examples]
        encoded = self.tokenizer(prompts, padding=True, return_tensors="pt")
        texts, rows = [], []
        for prompt in prompts:
            for k in range(group):
                rng = random.Random(zlib.crc32(f"{prompt}|{k}|{iteration}".encode()))
                length = rng.randint(1, self.sampling.max_new_tokens)
                text = "".join(rng.choice(ALPHABET) for _ in range(length))
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][
                    : self.sampling.max_new_tokens
                ]
                if len(ids) < self.sampling.max_new_tokens:
                    ids = ids + [self.tokenizer.eos_token_id]
                texts.append(text)
                rows.append(ids)
        width = max(len(r) for r in rows)
        completion_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, ids in enumerate(rows):
            completion_ids[i, : len(ids)] = torch.tensor(ids)
        completion_mask, truncated = completion_keep_mask(completion_ids, self.tokenizer.eos_token_id)
        return Rollout(
            prompt_ids=encoded["input_ids"].repeat_interleave(group, 0).to(self.device),
            prompt_mask=encoded["attention_mask"].bool().repeat_interleave(group, 0).to(self.device),
            completion_ids=completion_ids.to(self.device),
            completion_mask=completion_mask.to(self.device),
            truncated=truncated.to(self.device),
            completions=texts,
            examples=[e for e in examples for _ in range(group)],
            group_size=group,
        )


class Record(Callback):
    """Every logged scalar of every RL iteration."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(scalar_outputs(outputs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="single", choices=["single", "ddp", "fsdp2"])
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per rank")
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument(
        "--regularizers", nargs="*", default=[], choices=["clip_cov", "kl_cov", "high_entropy"]
    )
    parser.add_argument("--scripted", action="store_true")
    parser.add_argument("--ckpt-dir", default=None, help="save a checkpoint every iteration here")
    parser.add_argument("--resume", default=None, help="checkpoint to resume from")
    parser.add_argument(
        "--dynamic-rounds", type=int, default=None, help="dynamic sampling with this many rounds at most"
    )
    parser.add_argument(
        "--reward", default="digit_reward", choices=["digit_reward", "odd_prompt_digit_reward"]
    )
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="sampling.engine")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seed_everything(0, workers=True)

    callbacks: list[Callback] = [Record()]
    # Batch scope: each selects over the global mini-batch (covariance centred on global means, counts of
    # global tokens), so a per-rank selection would change the trained weights. ratio=1 makes Clip-Cov keep
    # every candidate: its random draw depends on the order of rows, which shuffling makes differ between
    # layouts (the same distribution, not the same draw).
    if "clip_cov" in args.regularizers:
        callbacks.append(ClipCov(ratio=1.0, cov_lb=0.0, cov_ub=10.0, scope="batch"))
    if "kl_cov" in args.regularizers:
        callbacks.append(KLCov(ratio=0.05, kl_coef=5.0, scope="batch"))
    if "high_entropy" in args.regularizers:
        callbacks.append(HighEntropyTokens(rho=0.3, scope="batch"))
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=1, save_top_k=-1))

    module_class = ScriptedGRPO if args.scripted else GRPO
    module = module_class(
        policy=Policy(path=args.model, lora=LoRA(r=4, alpha=8)),
        rewards=[Reward(fn=f"distributed_fit.{args.reward}")],
        sampling=Sampling(group_size=4, max_new_tokens=8, temperature=1.0, engine=args.engine),
        loss=Loss(eps_low=0.1, eps_high=0.1),
        dynamic_sampling=DynamicSampling(max_rounds=args.dynamic_rounds) if args.dynamic_rounds else None,
        ppo_epochs=2,  # the second epoch is off-policy: ratios and clipping are exercised
        learning_rate=5e-2,
        max_grad_norm=None,
        val_num_samples=0,
        adapter_dir=os.path.join(os.path.dirname(args.out), f"adapter-{args.strategy}"),
    )
    data = PromptDataModule(
        train_files=args.prompts,
        answer_field=None,
        batch_size=args.batch_size,
        shuffle=False,
        val_fraction=0.0,
    )
    if args.strategy == "ddp":
        strategy, devices = DDPStrategy(process_group_backend="gloo"), 2
    elif args.strategy == "fsdp2":
        strategy, devices = FSDP2(data_parallel_size=2), 2
    else:
        strategy, devices = "auto", 1
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=args.max_steps,
        logger=False,
        enable_checkpointing=bool(args.ckpt_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=os.path.dirname(args.out),
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)
    weights = {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().flatten().tolist()
        for name, p in module.policy.named_parameters()
        if p.requires_grad
    }
    if trainer.is_global_zero:
        with open(args.out, "w") as handle:
            json.dump({"steps": callbacks[0].steps, "weights": weights}, handle)


if __name__ == "__main__":
    main()
