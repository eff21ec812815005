"""`GRPO`: the LightningModule of GRPO-style RL over a (LoRA / 4-bit) Hugging Face policy.

One ``training_step`` is one RL iteration (manual optimization):

    prompts [B] -> G completions each (no grad)                      -> Rollout [N = B*G]
               -> rewards [N] -> group advantages [N]
               -> old log-probs (skipped when fully on-policy), reference log-probs (only if kl_coef > 0)
               -> for each of ppo_epochs, for each mini-batch (micro-batches accumulate gradients):
                    fp32 log-probs + entropy -> clipped surrogate + regularizers -> backward
                  -> clip gradients -> optimizer step -> scheduler step
               -> log rollout/*, train/*, reg/*; return iteration statistics to the callbacks

Shapes: ``B`` prompts, ``G`` completions per prompt, ``N = B*G``, ``T`` completion length, ``V`` vocabulary.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MeanMetric
from typing_extensions import override

from lit_entropy.checkpoint_io import install_same_folder_checkpoint_io
from lit_entropy.checkpoint_state import (
    PAYLOAD_KEY,
    check_trainable_present,
    keep_trainable,
    payload,
    restore_payload,
    trainable_state,
)
from lit_entropy.distributed import rank, shard_for_strategy, sum_over_ranks, world_size
from lit_entropy.dynamic_sampling import (
    DynamicSampling,
    DynamicSamplingStats,
    draw_prompts,
    sample_informative_groups,
)
from lit_entropy.errors import ConfigError
from lit_entropy.eval_metrics import StageMetrics
from lit_entropy.fit_summary import FitSummary
from lit_entropy.functional import group_advantages
from lit_entropy.head import completion_logprobs_and_entropy, fused_head_parts
from lit_entropy.iteration_stats import IterationSums, iteration_stats, sampler_logprob_diff
from lit_entropy.loss import Loss, microbatch_loss
from lit_entropy.metrics_history import MetricsHistory
from lit_entropy.minibatch import BatchSplit, RolloutTensors
from lit_entropy.model import LoRA, Policy, Quantization, load_policy, reference_context, trainable_parameters
from lit_entropy.nonfinite_guard import NonfiniteGuard
from lit_entropy.optimizer import build_optimizer, check_optimizer_options, optimizer_step
from lit_entropy.preflight import check_writable, preflight
from lit_entropy.prompts import render_prompt
from lit_entropy.regularizer import IterationOutputs, Regularizer, find_regularizers
from lit_entropy.resumable_checkpoint import warn_inexact_checkpoints
from lit_entropy.reward_forms import completion_token_ids
from lit_entropy.reward_scorer import RewardResult, RewardScorer
from lit_entropy.reward_spec import Reward
from lit_entropy.rewards import answer_reader
from lit_entropy.rollout import Rollout, Sampling, SequenceBatch, generate_rollout
from lit_entropy.shutdown import CheckpointOnSigterm
from lit_entropy.vllm_options import VLLMOptions

# The checkpoint's hyper_parameters hold these dataclasses; Lightning resumes with torch.load(weights_only=True),
# which refuses classes that are not allow-listed, so `fit(ckpt_path=...)` would fail without this.
torch.serialization.add_safe_globals(
    [Policy, LoRA, Quantization, Sampling, VLLMOptions, Loss, Reward, DynamicSampling]
)


class GRPO(LightningModule):
    """GRPO / PPO-clip RL fine-tuning of a causal LM; entropy control plugs in as `Regularizer` callbacks.

    Args:
        policy: the model to train (local folder or the embedded tiny model), its LoRA and 4-bit options.
        rewards: reward functions by import path, with weights; their weighted sum is the reward.
        sampling: rollout options (``group_size`` G, ``max_new_tokens``, temperature, top-p, top-k).
        loss: objective options (advantages, clip range, KL, aggregation).
        dynamic_sampling: DAPO's dynamic sampling: groups whose rewards are all equal are dropped and more
            prompts are sampled until the rollout holds ``B`` informative groups (`DynamicSampling`; None = off).
        ppo_epochs: passes over each rollout.
        minibatch_size: sequences per optimizer update (default: the whole rollout, N).
        microbatch_size: sequences per forward/backward; gradients accumulate (default: the mini-batch).
        learning_rate: AdamW learning rate when ``optimizer`` is not given.
        optimizer: optimizer factory (LightningCLI ``class_path`` form); gets only trainable parameters.
        lr_scheduler: scheduler factory, stepped after every optimizer update.
        max_grad_norm: gradient clipping by global norm (None = off).
        reward_on_error: the score of a completion whose reward function raised.
        reward_max_error_fraction: a scoring call stops the run (`RewardFailureError`, naming the function and its
            first error) when one reward function fails on every completion, or on more than this share of
            them; None only counts failures (``rollout/reward_errors``).
        chat_template: apply the tokenizer's chat template (None = when it has one).
        system_prompt: system message (chat) or prefix (plain prompts).
        val_num_samples: sampled completions per validation prompt for ``val/reward`` (0 = greedy only).
        pass_at_k: the k of ``val/pass@k`` (unbiased estimator over the ``val_num_samples`` samples; each
            k <= val_num_samples). A sample is correct when the first reward function gives it >= 1.0.
        adapter_dir: where the adapter is saved in peft format at the end of fit (default: ``<log_dir>/adapter``).
        seed: seeds the shuffling of rollouts into mini-batches.
        fused_head: compute log-probs and entropy from the final hidden states and the output head, chunk by
            chunk (`lit_entropy.head`), never holding ``[n, T, V]`` logits. Falls back to the model's logits,
            with a warning, when the model's forward does more than project its last hidden state.
        head_chunk_size: rows per chunk of that computation (default: about 2**25 fp32 logits per chunk).
        sampler_logprobs: take the old log-probs of off-policy updates from generation (fp32, full vocabulary, at
            the sampling temperature) instead of a second forward pass. Exact only where sampler and trainer run
            the same weights in the same precision (docs/performance.md); off by default, since with a quantized
            or lower-precision sampler the first update's ratio would no longer start at 1.
        max_consecutive_nonfinite: an update whose loss or gradient is not finite is skipped and counted
            (``train/skipped_nonfinite``); this many in a row stop the run with an error.
    """

    def __init__(
        self,
        policy: Policy,
        rewards: list[Reward],
        sampling: Sampling | None = None,
        loss: Loss | None = None,
        dynamic_sampling: DynamicSampling | None = None,
        ppo_epochs: int = 1,
        minibatch_size: int | None = None,
        microbatch_size: int | None = None,
        learning_rate: float = 1e-5,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_grad_norm: float | None = 1.0,
        reward_on_error: float = 0.0,
        reward_max_error_fraction: float | None = 1.0,
        chat_template: bool | None = None,
        system_prompt: str | None = None,
        val_num_samples: int = 4,
        pass_at_k: list[int] | None = None,
        adapter_dir: str | None = None,
        seed: int = 0,
        fused_head: bool = True,
        head_chunk_size: int | None = None,
        sampler_logprobs: bool = False,
        max_consecutive_nonfinite: int = 5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.automatic_optimization = False
        # checkpoints carry only trainable (adapter) weights; the frozen base is reloaded from its folder
        self.strict_loading = False
        self.policy_config = policy
        self.sampling = sampling or Sampling()
        self.loss_config = loss or Loss()
        self.dynamic_sampling = dynamic_sampling
        self.ppo_epochs = ppo_epochs
        self.minibatch_size = minibatch_size
        self.microbatch_size = microbatch_size
        self.learning_rate = learning_rate
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.max_grad_norm = max_grad_norm
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.val_num_samples = val_num_samples
        self.pass_at_k = sorted(set(pass_at_k or []))
        self.adapter_dir = adapter_dir
        self.seed = seed
        self.fused_head = fused_head
        self.head_chunk_size = head_chunk_size
        self.sampler_logprobs = sampler_logprobs
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        # checkpointed: a resumed run keeps counting
        self._nonfinite = NonfiniteGuard(max_consecutive_nonfinite)
        self._validate()
        # torchmetrics reduce across ranks correctly (sums and counts, not means of means)
        self.train_entropy = MeanMetric(dist_sync_on_step=True)
        self.train_reward = MeanMetric(dist_sync_on_step=True)
        self.val_metrics = StageMetrics("val", val_num_samples, self.pass_at_k)
        self.test_metrics = StageMetrics("test", val_num_samples, self.pass_at_k)
        self.reward_scorer = RewardScorer(
            rewards, on_error=reward_on_error, max_error_fraction=reward_max_error_fraction
        )
        self.policy: torch.nn.Module | None = None
        # (decoder, head) of the policy for the fused head path; a tuple so they are not registered twice
        self._lm_parts: tuple[torch.nn.Module, torch.nn.Module] | None = None
        self._sharded = False  # FSDP2 (ModelParallelStrategy): generation must keep ranks in step
        self.tokenizer: Any = None
        self._regularizers: list[Regularizer] = []
        self._shuffle = torch.Generator().manual_seed(seed)
        self._engine: Any = None  # the VLLMEngine of sampling.engine "vllm", built at the first rollout
        # counts changes of the trainable weights (updates, a checkpoint loaded): the engine serves one version
        self._weights_version = 0
        self._summary = FitSummary()  # (reward, entropy) per RL iteration of this fit, logged at its end

    def _validate(self) -> None:
        """Each option checked where it is used (the pass@k values by `StageMetrics`), and the options together."""
        self.policy_config.validate()
        self.sampling.validate()
        self.loss_config.validate()
        if self.dynamic_sampling is not None:
            self.dynamic_sampling.validate()
        BatchSplit.check_sizes(self.ppo_epochs, self.minibatch_size, self.microbatch_size)
        if self.head_chunk_size is not None and self.head_chunk_size < 1:
            raise ConfigError(f"head_chunk_size must be >= 1 or null, got {self.head_chunk_size}")
        check_optimizer_options(self.learning_rate, self.max_grad_norm)
        if self.loss_config.kl_coef > 0 and self.policy_config.lora is None:
            raise ConfigError(
                "loss.kl_coef > 0 needs a reference policy: set policy.lora (adapters off = reference)"
            )

    # ------------------------------------------------------------------ setup

    @override
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        self.policy, self.tokenizer = load_policy(self.policy_config, device=device)
        mesh = getattr(self, "_device_mesh", None)  # set by Lightning's ModelParallelStrategy (FSDP2)
        self._sharded = mesh is not None
        if self._sharded:
            if self.sampling.engine == "vllm":
                raise ConfigError(
                    "sampling.engine: vllm runs one engine per rank with the whole policy: use it with one "
                    "process or DDP (strategy: ddp), not FSDP2"
                )
            shard_for_strategy(self.policy, mesh, self.trainer.strategy, self.policy_config.dtype)
        self._lm_parts = fused_head_parts(self.policy) if self.fused_head else None
        self.policy.train()  # from_pretrained returns eval mode; generation switches to eval explicitly

    @override
    def configure_callbacks(self) -> list[Any]:
        """A checkpoint where a SIGTERM stops the run (`CheckpointOnSigterm`); the metrics rows in every checkpoint
        (`MetricsHistory`)."""
        return [CheckpointOnSigterm(), MetricsHistory()]

    @override
    def configure_optimizers(self) -> Any:
        parameters = trainable_parameters(self.policy)
        return build_optimizer(
            parameters, self.optimizer_factory, self.lr_scheduler_factory, self.learning_rate
        )

    @override
    def on_fit_start(self) -> None:
        # every check that needs the model, the tokenizer and the data together, before any compute
        preflight(self, self.trainer.datamodule)
        # every output is written to at the end or at a save: a folder that cannot be written fails now
        check_writable(self.adapter_folder(), "adapter_dir")
        for callback in self.trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None):
                check_writable(callback.dirpath, "the checkpoint folder (checkpoint.dirpath)")
        warn_inexact_checkpoints(self.trainer)
        install_same_folder_checkpoint_io(self.trainer)  # temporary files beside the checkpoints
        self._regularizers = find_regularizers(self.trainer.callbacks)
        prompts = getattr(self.trainer.datamodule, "batch_size", None) or 1
        rank_zero_info(
            f"lit_entropy: {self.batch_split(prompts).updates} optimizer update(s) per RL iteration; "
            f"regularizers: {[r.name for r in self._regularizers] or 'none'}"
        )

    def adapter_folder(self) -> str:
        """Where `on_fit_end` saves the adapter: ``adapter_dir``, or ``<log_dir>/adapter``."""
        return self.adapter_dir or os.path.join(
            self.trainer.log_dir or self.trainer.default_root_dir, "adapter"
        )

    def batch_split(self, prompts: int) -> BatchSplit:
        """How a rollout of ``prompts`` prompts splits into mini-batches and micro-batches (`BatchSplit`)."""
        return BatchSplit.of(
            prompts, self.sampling.group_size, self.ppo_epochs, self.minibatch_size, self.microbatch_size
        )

    # ------------------------------------------------------------------ forward passes

    def sequence_logprobs(self, batch: SequenceBatch, entropy_grad: bool = True) -> tuple[Tensor, Tensor]:
        """fp32 log-probs and entropy of the completion tokens: ``([n, T], [n, T])`` (padded to the rollout's T).

        At the sampling temperature, so entropy is that of the distribution that was actually sampled; chunked
        with ``fused_head`` (`completion_logprobs_and_entropy`). ``entropy_grad=False`` detaches the entropy.
        """
        logprobs, entropy = completion_logprobs_and_entropy(
            self.policy,
            self._lm_parts,
            batch,
            self.sampling.temperature,
            self.head_chunk_size,
            entropy_grad=entropy_grad,
        )
        return batch.pad_to_rollout(logprobs), batch.pad_to_rollout(entropy)

    @torch.no_grad()
    def _logprobs_no_grad(
        self,
        rollout: Rollout,
        microbatch: int,
        rows: Tensor | None = None,
        reference: bool = False,
        eval_mode: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Log-probs and entropy of rollout ``rows`` (default: all) without gradient, ``[len(rows), T]`` each.

        ``eval_mode`` switches the policy to eval for the pass (old and reference log-probs); a mini-batch's
        statistics for batch-scope regularizers keep the training mode, like the forward they stand next to.
        ``reference`` runs with the adapters off.
        """
        if rows is None:
            rows = torch.arange(rollout.num_sequences)
        was_training = self.policy.training
        if eval_mode:
            self.policy.eval()
        logprobs, entropies = [], []
        try:
            for start in range(0, len(rows), microbatch):
                batch = rollout.select(rows[start : start + microbatch])
                with reference_context(self.policy) if reference else contextlib.nullcontext():
                    lp, ent = self.sequence_logprobs(batch)
                logprobs.append(lp)
                entropies.append(ent)
        finally:
            self.policy.train(was_training)
        return torch.cat(logprobs), torch.cat(entropies)

    # ------------------------------------------------------------------ the RL iteration

    def generate(
        self, examples: Sequence[Mapping[str, Any]], greedy: bool = False, num_samples: int | None = None
    ):
        """Render the prompts of ``examples`` and sample completions (policy in eval mode, no gradient)."""
        prompts = [
            render_prompt(example["prompt"], self.tokenizer, self.chat_template, self.system_prompt)
            for example in examples
        ]
        if self.sampling.engine == "vllm":
            return self._engine_rollout(prompts, examples, greedy, num_samples)
        was_training = self.policy.training
        self.policy.eval()
        try:
            return generate_rollout(
                self.policy,
                self.tokenizer,
                prompts,
                examples,
                self.sampling,
                self.device,
                greedy,
                num_samples,
                record_logprobs=(self.sampler_logprobs or self.loss_config.sampler_correction_cap is not None)
                and not greedy,
                synced_gpus=self._sharded and world_size() > 1,
            )
        finally:
            self.policy.train(was_training)

    def _engine_rollout(
        self, prompts: list[str], examples: Sequence[Mapping[str, Any]], greedy: bool, num_samples: int | None
    ) -> Rollout:
        """The rollout sampled by the vLLM engine, which first gets the policy's weights if they changed."""
        from lit_entropy.vllm_engine import VLLMEngine, vllm_rollout

        if self._engine is None:
            quantization = self.policy_config.quantization
            self._engine = VLLMEngine(
                self.policy,
                self.sampling,
                self.sampling.vllm,
                dtype=quantization.compute_dtype if quantization is not None else self.policy_config.dtype,
                device=self.device,
                seed=self.seed + rank(),
                distributed=world_size() > 1,
            )
        # one seed per call from torch's generator, as generate's sampling draws from it (seeded, checkpointed)
        seed = int(torch.randint(0, 2**30, ()).item())
        return vllm_rollout(
            self._engine,
            self.policy,
            self._weights_version,
            self.tokenizer,
            prompts,
            examples,
            self.sampling,
            self.device,
            greedy=greedy,
            num_samples=num_samples,
            seed=seed,
        )

    @override
    def teardown(self, stage: str) -> None:
        if self._engine is not None:  # its memory (KV cache, served weights) goes back to the trainer
            self._engine.close()
            self._engine = None

    @override
    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> IterationOutputs:
        started = time.perf_counter()
        # batch_idx restarts every pass over the prompts; the fit loop's total count survives epochs and resume
        iteration = self.trainer.fit_loop.total_batch_idx
        group = self.sampling.group_size
        rollout, scores, dynamic = self._sample(batch)
        rewards = scores.total.to(self.device)  # [N]
        advantages = group_advantages(
            rewards, group, self.loss_config.advantage, self.loss_config.advantage_scale
        )  # [N]
        split = self.batch_split(rollout.num_sequences // group)
        mask = rollout.completion_mask  # [N, T]
        loss_mask = (
            mask & ~rollout.truncated[:, None] if self.loss_config.mask_truncated_completions else mask
        )
        tensors = RolloutTensors(
            mask=loss_mask,
            advantages=advantages[:, None].expand_as(mask).float(),
            old_logprobs=self._old_logprobs(rollout, split),
            sampler_logprobs=rollout.sampler_logprobs,
            sampler_correction_cap=self.loss_config.sampler_correction_cap,
            ref_logprobs=(
                self._logprobs_no_grad(rollout, split.microbatch, reference=True)[0]
                if self.loss_config.kl_coef > 0
                else None
            ),
        )

        sums = IterationSums(self.device)
        # per-token log-probs and entropy of the first epoch (the policy that sampled the rollout), for monitors
        first_epoch_logprobs = torch.zeros_like(mask, dtype=torch.float32)  # [N, T]
        first_epoch_entropy = torch.zeros_like(mask, dtype=torch.float32)  # [N, T]
        for update, (epoch, rows) in enumerate(split.minibatches(self._shuffle)):
            rows = rows.to(self.device)
            logprobs, entropy = self._update(rollout, tensors, split, rows, iteration, update, sums)
            if epoch == 0:
                first_epoch_logprobs[rows] = logprobs
                first_epoch_entropy[rows] = entropy

        entropy_mean = self.train_entropy(first_epoch_entropy[mask])
        self.train_reward(rewards)
        elapsed = time.perf_counter() - started
        stats = iteration_stats(rewards, group, mask, rollout.truncated, scores, sums, split.updates, elapsed)
        trainer_logprobs = self._trainer_old_logprobs(rollout, tensors, split, first_epoch_logprobs)
        if trainer_logprobs is not None:
            stats.update(sampler_logprob_diff(trainer_logprobs, rollout.sampler_logprobs, mask))
        if dynamic is not None:
            stats.update(dynamic.metrics(self.device))
        metrics = self._log_iteration(stats, prompts=rollout.num_sequences // group)
        self._summary.add(stats["rollout/reward_mean"], float(entropy_mean))
        return IterationOutputs(
            entropy=entropy_mean.detach(),
            reward=metrics["rollout/reward_mean"],
            updates=metrics["train/updates"],
            token_entropy=first_epoch_entropy,
            token_logprobs=first_epoch_logprobs,
            token_advantages=tensors.advantages,
            token_mask=mask,
            metrics=metrics,
            prompts=[example["prompt"] for example in rollout.examples],
            completions=list(rollout.completions),
            rewards=rewards.detach(),
            rewards_per_function={name: values.detach() for name, values in scores.per_function.items()},
            advantages=advantages.detach(),
        )

    def _sample(
        self, batch: list[dict[str, Any]]
    ) -> tuple[Rollout, RewardResult, DynamicSamplingStats | None]:
        """The iteration's rollout and rewards: the batch's, or with dynamic sampling ``B`` informative groups."""
        if self.dynamic_sampling is None:
            rollout = self.generate(batch)
            return rollout, self._score(rollout), None
        loader = self.trainer.train_dataloader
        return sample_informative_groups(
            batch,
            self.dynamic_sampling,
            generate=self.generate,
            score=self._score,
            draw=lambda count: draw_prompts(loader, count, self._shuffle),
            pad_id=self.tokenizer.pad_token_id,
            in_step=self._sharded,
            device=self.device,
        )

    def _score(self, rollout: Rollout) -> RewardResult:
        """The rollout's rewards; batched (TRL-form) functions also get each completion's token ids."""
        ids = None
        if "batched" in self.reward_scorer.forms:  # the [N, T] ids copied to Python lists only when used
            ids = completion_token_ids(rollout.completion_ids, rollout.completion_mask)
        return self.reward_scorer(rollout.completions, rollout.examples, completion_ids=ids)

    def _trainer_old_logprobs(
        self, rollout: Rollout, tensors: RolloutTensors, split: BatchSplit, first_epoch_logprobs: Tensor
    ) -> Tensor | None:
        """The trainer's ``[N, T]`` log-probs of the rollout policy, to compare the sampler's with; None when the
        rollout has no sampler log-probs or they are the old log-probs themselves (``sampler_logprobs``)."""
        if rollout.sampler_logprobs is None:
            return None
        if split.on_policy:  # the one update's forward ran on the policy that sampled
            return first_epoch_logprobs
        if self.sampler_logprobs:
            return None
        return tensors.old_logprobs

    def _old_logprobs(self, rollout: Rollout, split: BatchSplit) -> Tensor | None:
        """``[N, T]`` log-probs under the sampling policy; None when fully on-policy (the current ones are)."""
        if split.on_policy:
            return None
        if self.sampler_logprobs and rollout.sampler_logprobs is not None:
            return rollout.sampler_logprobs.to(self.device)
        return self._logprobs_no_grad(rollout, split.microbatch)[0]

    def _update(
        self,
        rollout: Rollout,
        tensors: RolloutTensors,
        split: BatchSplit,
        rows: Tensor,
        iteration: int,
        update: int,
        sums: IterationSums,
    ) -> tuple[Tensor, Tensor]:
        """One optimizer update on the mini-batch ``rows``: forward and backward per micro-batch, then the step.

        Returns the mini-batch's detached ``[m, T]`` log-probs and entropy, as the update's forwards saw them.
        """
        ranks = world_size()
        needs_stats = any(r.needs_minibatch_stats for r in self._regularizers)
        needs_entropy_grad = any(r.needs_entropy_grad for r in self._regularizers)
        # the normalisers count every rank's mini-batch: the global token mean, not a mean of means
        num_tokens = sum_over_ranks(tensors.mask[rows].sum())
        minibatch_stats = None
        if needs_stats and split.microbatch < split.minibatch:
            minibatch_stats = self._logprobs_no_grad(rollout, split.microbatch, rows, eval_mode=False)
        update_loss = torch.zeros((), device=self.device)
        seen_logprobs, seen_entropy = [], []
        for position, microbatch_rows in split.microbatches(rows):
            logprobs, entropy = self.sequence_logprobs(
                rollout.select(microbatch_rows), entropy_grad=needs_entropy_grad
            )
            if needs_stats and minibatch_stats is None:  # the micro-batch is the whole mini-batch
                minibatch_stats = (logprobs.detach(), entropy.detach())
            view = tensors.view(
                rows,
                position,
                logprobs,
                entropy,
                num_tokens=num_tokens,
                num_sequences=split.minibatch * ranks,
                eps_low=self.loss_config.eps_low,
                eps_high=self.loss_config.eps_high,
                iteration=iteration,
                update=update,
                updates_per_iteration=split.updates,
                minibatch_stats=minibatch_stats,
            )
            result = microbatch_loss(self.loss_config, view, self._regularizers, self.sampling.max_new_tokens)
            # DDP and FSDP2 average gradients over ranks; the loss is already a global mean, so undo the
            # average to get the gradient of the global loss
            self.manual_backward(result.loss * ranks if ranks > 1 else result.loss)
            sums.add(result, view.mask)
            update_loss += result.loss.detach()
            seen_logprobs.append(logprobs.detach())
            seen_entropy.append(entropy.detach())
        empty = int(num_tokens) == 0  # no kept token on any rank: the update is skipped
        grad_norm = optimizer_step(self, sums, update_loss, empty, self._nonfinite, self.max_grad_norm)
        self._weights_version += 1  # the rollout engine serves the weights of a given version
        sums.add_update(update_loss, grad_norm)
        return torch.cat(seen_logprobs), torch.cat(seen_entropy)

    def _log_iteration(self, stats: dict[str, float], prompts: int) -> dict[str, Tensor]:
        """Log the iteration's statistics (`iteration_stats`) and the running entropy and reward."""
        metrics = {
            key: torch.tensor(value, dtype=torch.float32, device=self.device) for key, value in stats.items()
        }
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=prompts)
        self.log("train/entropy", self.train_entropy, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/reward", self.train_reward, on_step=True, on_epoch=False, prog_bar=True)
        return metrics

    # ------------------------------------------------------------------ evaluation

    @override
    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    @override
    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    @override
    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        """One greedy completion per prompt, scored: rows ``{prompt, completion, reward, answer}``."""
        from lit_entropy.predictions import predict_completions

        return predict_completions(self, batch)

    def _evaluate(self, batch: list[dict[str, Any]], metrics: StageMetrics) -> None:
        """Accuracy of greedy answers (the first reward function's value) and the metrics of sampled ones."""
        first = self.reward_scorer.names[0]
        greedy = self.generate(batch, greedy=True, num_samples=1)
        scores = self._score(greedy)
        for name, metric in metrics.update_greedy(scores.per_function[first]).items():
            self.log(name, metric, on_epoch=True, prog_bar=name.endswith("accuracy"), batch_size=len(batch))
        if self.val_num_samples > 0:
            sampled = self.generate(batch, num_samples=self.val_num_samples)
            scores = self._score(sampled)
            logged = metrics.update_sampled(
                scores.total,
                scores.per_function[first],
                sampled.completions,
                answer_of=answer_reader(self.reward_scorer.functions[0]),
            )
            for name, metric in logged.items():
                self.log(name, metric, on_epoch=True, batch_size=len(batch))

    # ------------------------------------------------------------------ checkpoints

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights: the frozen base (possibly 4-bit) is reloaded from ``policy.path``."""
        checkpoint["state_dict"] = keep_trainable(checkpoint["state_dict"], self)
        checkpoint[PAYLOAD_KEY] = payload(self._shuffle, self._nonfinite.in_a_row)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:  # a sharded (FSDP2) checkpoint's tensors were already loaded
            check_trainable_present(checkpoint["state_dict"], self)
        self._nonfinite.in_a_row = restore_payload(checkpoint.get(PAYLOAD_KEY, {}), self._shuffle)
        self._weights_version += 1  # the loaded adapters are new to the rollout engine

    @override
    def on_fit_end(self) -> None:
        # every rank takes part in gathering the sharded adapters; rank 0 writes them
        adapter_state = trainable_state(self.policy, full=True) if self._sharded else None
        if not self.trainer.is_global_zero:
            return
        summary = self._summary.message(self.trainer.callback_metrics)  # with the last val/* metrics
        if summary is not None:
            rank_zero_info(summary)
        folder = self.adapter_folder()
        self.policy.save_pretrained(folder, state_dict=adapter_state)
        self.tokenizer.save_pretrained(folder)
        rank_zero_info(f"lit_entropy: adapter saved in peft format to {folder}")


__all__ = ["GRPO"]
