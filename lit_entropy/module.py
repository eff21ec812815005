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

import logging
import os
import random
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

from lit_entropy.distributed import FSDP2, gather_objects, rank, shard_policy, sum_over_ranks, world_size
from lit_entropy.embedded import EmbeddedModel
from lit_entropy.errors import ConfigError, LitEntropyError
from lit_entropy.evaluation import distinct_correct, pass_at_k
from lit_entropy.functional import equal_reward_groups, group_advantages, token_logprobs_and_entropy
from lit_entropy.head import head_logprobs_and_entropy
from lit_entropy.loss import Loss, microbatch_loss
from lit_entropy.model import (
    LoRA,
    Policy,
    Quantization,
    causal_lm_parts,
    head_reproduces_logits,
    load_policy,
    reference_context,
    trainable_parameters,
)
from lit_entropy.preflight import preflight
from lit_entropy.prompts import render_prompt
from lit_entropy.regularizer import IterationOutputs, MinibatchView, Regularizer, find_regularizers
from lit_entropy.rewards import Reward, RewardScorer
from lit_entropy.rollout import Rollout, Sampling, SequenceBatch, generate_rollout
from lit_entropy.shutdown import CheckpointOnSigterm

log = logging.getLogger(__name__)

# The checkpoint's hyper_parameters hold these dataclasses; Lightning resumes with torch.load(weights_only=True),
# which refuses classes that are not allow-listed, so `fit(ckpt_path=...)` would fail without this.
torch.serialization.add_safe_globals([Policy, LoRA, Quantization, EmbeddedModel, Sampling, Loss, Reward])


class GRPO(LightningModule):
    """GRPO / PPO-clip RL fine-tuning of a causal LM; entropy control plugs in as `Regularizer` callbacks.

    Args:
        policy: the model to train (local folder or the embedded tiny model), its LoRA and 4-bit options.
        rewards: reward functions by import path, with weights; their weighted sum is the reward.
        sampling: rollout options (``group_size`` G, ``max_new_tokens``, temperature, top-p, top-k).
        loss: objective options (advantages, clip range, KL, aggregation).
        ppo_epochs: passes over each rollout.
        minibatch_size: sequences per optimizer update (default: the whole rollout, N).
        microbatch_size: sequences per forward/backward; gradients accumulate (default: the mini-batch).
        learning_rate: AdamW learning rate when ``optimizer`` is not given.
        optimizer: optimizer factory (LightningCLI ``class_path`` form); gets only trainable parameters.
        lr_scheduler: scheduler factory, stepped after every optimizer update.
        max_grad_norm: gradient clipping by global norm (None = off).
        reward_on_error: the score of a completion whose reward function raised.
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
        sampler_logprobs: take the old log-probs of off-policy updates from generation (recorded per step,
            fp32, full vocabulary at the sampling temperature) instead of a second forward pass over the
            rollout. Exact only where the sampler and the trainer run the same weights in the same precision
            (mismatch measured in docs/performance.md). Off by default: with a quantized or lower-precision
            sampler the ratio of the first update would no longer start at 1.
        max_consecutive_nonfinite: an update whose loss or gradient is not finite is skipped and counted
            (``train/skipped_nonfinite``); this many in a row stop the run with an error.
    """

    def __init__(
        self,
        policy: Policy,
        rewards: list[Reward],
        sampling: Sampling | None = None,
        loss: Loss | None = None,
        ppo_epochs: int = 1,
        minibatch_size: int | None = None,
        microbatch_size: int | None = None,
        learning_rate: float = 1e-5,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_grad_norm: float | None = 1.0,
        reward_on_error: float = 0.0,
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
        self._nonfinite_in_a_row = 0  # checkpointed: a resumed run keeps counting
        self._validate()
        self.reward_scorer = RewardScorer(rewards, on_error=reward_on_error)
        self.policy: torch.nn.Module | None = None
        # (decoder, head) of the policy for the fused head path; a tuple so they are not registered twice
        self._lm_parts: tuple[torch.nn.Module, torch.nn.Module] | None = None
        self._sharded = False  # FSDP2 (ModelParallelStrategy): generation must keep ranks in step
        self.tokenizer: Any = None
        self._regularizers: list[Regularizer] = []
        self._shuffle = torch.Generator().manual_seed(seed)
        self._history: list[
            tuple[float, float]
        ] = []  # (reward, entropy) per RL iteration of this fit, for the summary
        # torchmetrics reduce across ranks correctly (sums and counts, not means of means)
        self.train_entropy = MeanMetric(dist_sync_on_step=True)
        self.train_reward = MeanMetric(dist_sync_on_step=True)
        self.val_accuracy = MeanMetric()
        self.val_reward = MeanMetric()
        self.test_accuracy = MeanMetric()
        self.test_reward = MeanMetric()
        # pass@k and diversity, per stage: ModuleDicts so Lightning moves and resets them with the module
        self.eval_pass_at_k = torch.nn.ModuleDict(
            {f"{stage}_{k}": MeanMetric() for stage in ("val", "test") for k in self.pass_at_k}
        )
        self.eval_distinct = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    def _validate(self) -> None:
        self.policy_config.validate()
        self.sampling.validate()
        self.loss_config.validate()
        if self.ppo_epochs < 1:
            raise ConfigError(f"ppo_epochs must be >= 1, got {self.ppo_epochs}")
        for name in ("minibatch_size", "microbatch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or null, got {value}")
        if self.pass_at_k and (min(self.pass_at_k) < 1 or max(self.pass_at_k) > self.val_num_samples):
            raise ConfigError(
                f"pass_at_k values must be in [1, val_num_samples={self.val_num_samples}], got {self.pass_at_k}"
            )
        if self.max_consecutive_nonfinite < 1:
            raise ConfigError(f"max_consecutive_nonfinite must be >= 1, got {self.max_consecutive_nonfinite}")
        if self.head_chunk_size is not None and self.head_chunk_size < 1:
            raise ConfigError(f"head_chunk_size must be >= 1 or null, got {self.head_chunk_size}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
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
        if self._sharded and not isinstance(self.trainer.strategy, FSDP2):
            raise ConfigError(
                f"trainer.strategy {type(self.trainer.strategy).__name__} cannot resume lit_entropy's adapter-only "
                "checkpoints: use class_path lit_entropy.distributed.FSDP2 (data-parallel FSDP2)"
            )
        if self._sharded:
            num_layers = shard_policy(self.policy, mesh, param_dtype=getattr(torch, self.policy_config.dtype))
            rank_zero_info(
                f"lit_entropy: FSDP2 sharded {num_layers} decoder layers over {world_size()} ranks"
            )
        self._lm_parts = None
        if self.fused_head:
            parts = causal_lm_parts(self.policy)
            if parts is not None and head_reproduces_logits(self.policy, *parts):
                self._lm_parts = parts
            else:
                log.warning(
                    "lit_entropy: fused_head is on but this model's logits are not its output head applied to "
                    "its last hidden state; computing log-probs from the full logits instead"
                )
        self.policy.train()  # from_pretrained returns eval mode; generation switches to eval explicitly

    @override
    def configure_callbacks(self) -> list[Any]:
        """A checkpoint at the iteration boundary where a SIGTERM stops the run (`CheckpointOnSigterm`)."""
        return [CheckpointOnSigterm()]

    @override
    def configure_optimizers(self) -> Any:
        parameters = trainable_parameters(self.policy)
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(parameters)
        else:
            optimizer = torch.optim.AdamW(parameters, lr=self.learning_rate)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    @override
    def on_fit_start(self) -> None:
        # every check that needs the model, the tokenizer and the data together, before any compute
        preflight(self, self.trainer.datamodule)
        self._regularizers = find_regularizers(self.trainer.callbacks)
        rank_zero_info(
            f"lit_entropy: {self.updates_per_iteration(self._rollout_size())} optimizer update(s) per RL iteration; "
            f"regularizers: {[r.name for r in self._regularizers] or 'none'}"
        )

    def _rollout_size(self) -> int:
        datamodule = getattr(self.trainer, "datamodule", None)
        batch_size = getattr(datamodule, "batch_size", None)
        return (batch_size or 1) * self.sampling.group_size

    def updates_per_iteration(self, num_sequences: int) -> int:
        """``ppo_epochs * minibatches``; 1 means fully on-policy (old log-probs == current, ratio == 1)."""
        return self.ppo_epochs * (num_sequences // self._minibatch(num_sequences))

    def _minibatch(self, num_sequences: int) -> int:
        size = self.minibatch_size or num_sequences
        if num_sequences % size:
            raise ConfigError(
                f"minibatch_size={size} must divide the rollout size N = prompts x group_size = {num_sequences}"
            )
        return size

    def _microbatch(self, minibatch: int) -> int:
        size = min(self.microbatch_size or minibatch, minibatch)
        if minibatch % size:
            raise ConfigError(f"microbatch_size={size} must divide minibatch_size={minibatch}")
        return size

    # ------------------------------------------------------------------ forward passes

    def sequence_logprobs(self, batch: SequenceBatch, entropy_grad: bool = True) -> tuple[Tensor, Tensor]:
        """fp32 log-probs and entropy of the completion tokens: ``([n, T], [n, T])`` (padded to the rollout's T).

        Only the completion positions are projected to the vocabulary, divided by the sampling temperature, so
        entropy is that of the distribution that was actually sampled. With ``fused_head`` the projection is
        chunked (`head_logprobs_and_entropy`); otherwise the model returns those logits (``logits_to_keep``).
        ``entropy_grad=False`` returns a detached entropy (cheaper backward).
        """
        completion_length = batch.completion_ids.shape[1]
        if self._lm_parts is not None:
            decoder, head = self._lm_parts
            hidden = decoder(**batch.model_inputs(), use_cache=False).last_hidden_state
            hidden = hidden[:, -(completion_length + 1) : -1]  # [n, T', H]: position t predicts token t
            logprobs, entropy = head_logprobs_and_entropy(
                hidden,
                head,
                batch.completion_ids,
                self.sampling.temperature,
                self.head_chunk_size,
                entropy_grad=entropy_grad,
            )
        else:
            outputs = self.policy(
                **batch.model_inputs(), logits_to_keep=completion_length + 1, use_cache=False
            )
            logits = outputs.logits[:, :-1]  # [n, T', V]: position t predicts completion token t
            logprobs, entropy = token_logprobs_and_entropy(
                logits, batch.completion_ids, self.sampling.temperature
            )
            if not entropy_grad:
                entropy = entropy.detach()
        return batch.pad_to_rollout(logprobs), batch.pad_to_rollout(entropy)

    @torch.no_grad()
    def _logprobs_no_grad(
        self, rollout: Rollout, microbatch: int, reference: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Log-probs and entropy of every rollout row without gradient, ``[N, T]`` each."""
        was_training = self.policy.training
        self.policy.eval()
        logprobs, entropies = [], []
        try:
            for start in range(0, rollout.num_sequences, microbatch):
                rows = torch.arange(start, min(start + microbatch, rollout.num_sequences))
                batch = rollout.select(rows)
                if reference:
                    with reference_context(self.policy):
                        lp, ent = self.sequence_logprobs(batch)
                else:
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
                record_logprobs=self.sampler_logprobs and not greedy,
                synced_gpus=self._sharded and world_size() > 1,
            )
        finally:
            self.policy.train(was_training)

    @override
    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> IterationOutputs:
        started = time.perf_counter()
        # batch_idx restarts every pass over the prompts; the fit loop's total count survives epochs and resume
        iteration = self.trainer.fit_loop.total_batch_idx
        rollout = self.generate(batch)
        scores = self.reward_scorer(rollout.completions, rollout.examples)
        rewards = scores.total.to(self.device)  # [N]
        group = self.sampling.group_size
        advantages = group_advantages(
            rewards, group, self.loss_config.advantage, self.loss_config.advantage_scale
        )  # [N]
        mask = rollout.completion_mask  # [N, T]
        token_advantages = advantages[:, None].expand_as(mask).float()  # [N, T]

        num_sequences = rollout.num_sequences
        minibatch = self._minibatch(num_sequences)
        microbatch = self._microbatch(minibatch)
        updates = self.updates_per_iteration(num_sequences)
        on_policy = updates == 1
        if on_policy:
            old_logprobs = None
        elif self.sampler_logprobs and rollout.sampler_logprobs is not None:
            old_logprobs = rollout.sampler_logprobs.to(self.device)
        else:
            old_logprobs = self._logprobs_no_grad(rollout, microbatch)[0]
        ref_logprobs = None
        if self.loss_config.kl_coef > 0:
            ref_logprobs = self._logprobs_no_grad(rollout, microbatch, reference=True)[0]

        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        needs_stats = any(r.needs_minibatch_stats for r in self._regularizers)
        needs_entropy_grad = any(r.needs_entropy_grad for r in self._regularizers)
        sums = _IterationSums(self.device)
        ranks = world_size()
        first_epoch_entropy = torch.zeros_like(mask, dtype=torch.float32)  # [N, T]
        first_epoch_logprobs = torch.zeros_like(mask, dtype=torch.float32)  # [N, T]
        update = 0
        for epoch in range(self.ppo_epochs):
            order = (
                torch.randperm(num_sequences, generator=self._shuffle)
                if updates > 1
                else torch.arange(num_sequences)
            )
            for mb_start in range(0, num_sequences, minibatch):
                mb_rows = order[mb_start : mb_start + minibatch].to(self.device)
                mb_mask = mask[mb_rows]
                # the normalisers count every rank's mini-batch: the global token mean, not a mean of means
                num_tokens = sum_over_ranks(mb_mask.sum())
                mb_stats = (None, None)
                update_loss = torch.zeros((), device=self.device)
                if needs_stats and microbatch < minibatch:
                    mb_stats = self._minibatch_stats(rollout, mb_rows, microbatch)
                for mc_start in range(0, minibatch, microbatch):
                    rows = mb_rows[mc_start : mc_start + microbatch]
                    logprobs, entropy = self.sequence_logprobs(
                        rollout.select(rows), entropy_grad=needs_entropy_grad
                    )
                    mb_logprobs, mb_entropy = mb_stats
                    if needs_stats and mb_logprobs is None:  # the micro-batch is the whole mini-batch
                        mb_logprobs, mb_entropy = logprobs.detach(), entropy.detach()
                    view = MinibatchView(
                        logprobs=logprobs,
                        old_logprobs=logprobs.detach() if on_policy else old_logprobs[rows],
                        ref_logprobs=None if ref_logprobs is None else ref_logprobs[rows],
                        entropy=entropy,
                        advantages=token_advantages[rows],
                        mask=mask[rows],
                        num_tokens=num_tokens,
                        num_sequences=minibatch * ranks,
                        eps_low=self.loss_config.eps_low,
                        eps_high=self.loss_config.eps_high,
                        iteration=iteration,
                        update=update,
                        updates_per_iteration=updates,
                        microbatch_rows=slice(mc_start, mc_start + len(rows)),
                        minibatch_logprobs=mb_logprobs,
                        minibatch_entropy=mb_entropy,
                        minibatch_old_logprobs=(
                            None if not needs_stats else mb_logprobs if on_policy else old_logprobs[mb_rows]
                        ),
                        minibatch_advantages=token_advantages[mb_rows] if needs_stats else None,
                        minibatch_mask=mb_mask if needs_stats else None,
                    )
                    result = microbatch_loss(
                        self.loss_config, view, self._regularizers, self.sampling.max_new_tokens
                    )
                    # DDP and FSDP2 average gradients over ranks; the loss is already a global mean, so
                    # undo the average to get the gradient of the global loss
                    self.manual_backward(result.loss * ranks if ranks > 1 else result.loss)
                    sums.add(result, view.mask)
                    update_loss += result.loss.detach()
                    if epoch == 0:
                        first_epoch_entropy[rows] = entropy.detach()
                        first_epoch_logprobs[rows] = logprobs.detach()
                grad_norm = self._step(optimizer, scheduler, sums, update_loss, empty=int(num_tokens) == 0)
                if grad_norm is not None:  # the update was made (not skipped)
                    sums.grad_norm += grad_norm
                    sums.loss += update_loss
                update += 1

        elapsed = time.perf_counter() - started
        entropy_mean = self.train_entropy(first_epoch_entropy[mask])
        self.train_reward(rewards)
        stats = self._log_iteration(rollout, scores, rewards, sums, updates, elapsed, group)
        if torch.isfinite(entropy_mean):  # a rollout without kept tokens has no mean entropy
            self._history.append((float(stats["rollout/reward_mean"]), float(entropy_mean)))
        return IterationOutputs(
            entropy=entropy_mean.detach(),
            reward=stats["rollout/reward_mean"],
            updates=stats["train/updates"],
            # per-token tensors of the rollout (first epoch: the policy that sampled it), for monitors
            token_entropy=first_epoch_entropy,
            token_logprobs=first_epoch_logprobs,
            token_advantages=token_advantages,
            token_mask=mask,
            metrics=stats,
        )

    @torch.no_grad()
    def _minibatch_stats(self, rollout: Rollout, rows: Tensor, microbatch: int) -> tuple[Tensor, Tensor]:
        """Detached current log-probs and entropy of a whole mini-batch (for batch-scope token selection)."""
        logprobs, entropies = [], []
        for start in range(0, len(rows), microbatch):
            lp, ent = self.sequence_logprobs(rollout.select(rows[start : start + microbatch]))
            logprobs.append(lp)
            entropies.append(ent)
        return torch.cat(logprobs), torch.cat(entropies)

    def _step(
        self, optimizer: Any, scheduler: Any, sums: _IterationSums, loss: Tensor, empty: bool
    ) -> Tensor | None:
        """Clip, step, zero, schedule; returns the gradient norm before clipping, or None for a skipped update.

        An update is skipped (gradients dropped, no optimizer or scheduler step) when its mini-batch has no
        kept token on any rank (``empty``) or when the loss or the gradient is not finite on some rank; the
        latter are counted, and `max_consecutive_nonfinite` of them in a row stop the run. A skipped update
        still advances Lightning's step count, so ``max_steps`` and ``every_n_train_steps`` keep their meaning.
        """
        grads = [p.grad for p in trainable_parameters(self.policy) if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm of sharded gradients is a partial DTensor
            grad_norm = grad_norm.full_tensor()
        if empty:
            optimizer.zero_grad(set_to_none=True)
            sums.skipped_empty += 1
            self._count_skipped_step()
            return None
        # after the gradient all-reduce every rank holds the same norm; the loss is local, so sum it
        if not (torch.isfinite(grad_norm) and torch.isfinite(sum_over_ranks(loss))):
            optimizer.zero_grad(set_to_none=True)
            sums.skipped_nonfinite += 1
            self._nonfinite_in_a_row += 1
            log.warning(
                f"lit_entropy: non-finite loss or gradient (grad norm {float(grad_norm)}, loss {float(loss)}); "
                f"update skipped ({self._nonfinite_in_a_row} in a row)"
            )
            if self._nonfinite_in_a_row >= self.max_consecutive_nonfinite:
                raise LitEntropyError(
                    f"{self._nonfinite_in_a_row} updates in a row had a non-finite loss or gradient "
                    f"(max_consecutive_nonfinite={self.max_consecutive_nonfinite}): lower the learning rate, "
                    "check the rewards and the model's dtype, or resume from the last checkpoint"
                )
            self._count_skipped_step()
            return None
        self._nonfinite_in_a_row = 0
        if self.max_grad_norm is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        return grad_norm.detach()

    def _count_skipped_step(self) -> None:
        """Advance the optimizer-step progress (Lightning's ``global_step``) for an update that was skipped."""
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def _log_iteration(
        self,
        rollout: Rollout,
        scores: Any,
        rewards: Tensor,
        sums: _IterationSums,
        updates: int,
        elapsed: float,
        group: int,
    ) -> dict[str, Tensor]:
        """Log and return the iteration's statistics, each reduced over all ranks from sums and counts."""
        mask = rollout.completion_mask
        function_names = sorted(scores.per_function)
        term_names = sorted(sums.terms)
        metric_names = sorted(sums.metrics)
        local = [
            torch.tensor(float(rewards.numel())),
            rewards.detach().float().sum(),
            rewards.detach().float().square().sum(),
            mask.sum(),
            rollout.truncated.float().sum(),
            equal_reward_groups(rewards, group).float().sum(),
            torch.tensor(float(rewards.numel() // group)),
            torch.tensor(float(scores.num_errors)),
            torch.tensor(float(scores.num_timeouts)),
            sums.loss,
            sums.clipped_low,
            sums.clipped_high,
            sums.tokens,
            sums.kl,
            sums.kl_tokens,
            sums.grad_norm,
            torch.tensor(float(sums.skipped_nonfinite)),
            torch.tensor(float(sums.skipped_empty)),
            *(scores.per_function[name].float().sum() for name in function_names),
            *(torch.as_tensor(sums.terms[name]) for name in term_names),
            *(sums.metrics[name][0] / sums.metrics[name][1] for name in metric_names),
        ]
        packed = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(()) for v in local]
        )
        total = sum_over_ranks(packed).tolist()  # one all-reduce for everything
        (n, reward_sum, reward_sq, tokens, truncated, zero_std, num_groups, errors, timeouts) = total[:9]
        (loss, clipped_low, clipped_high, trained_tokens, kl, kl_tokens, grad_norm) = total[9:16]
        skipped_nonfinite, skipped_empty = total[16:18]
        rest = total[18:]
        ranks = world_size()
        reward_mean = reward_sum / n
        # unbiased std over all N rewards (what torch.std gives on the concatenated batch)
        reward_var = (reward_sq - n * reward_mean**2) / (n - 1) if n > 1 else 0.0
        stats = {
            "rollout/reward_mean": reward_mean,
            "rollout/reward_std": max(reward_var, 0.0) ** 0.5,
            "rollout/completion_length": tokens / n,
            "rollout/truncated_frac": truncated / n,
            "rollout/frac_zero_std": zero_std / num_groups,
            "rollout/reward_errors": errors,  # raised, returned a non-number, or timed out
            "rollout/reward_timeouts": timeouts,
            "train/loss": loss
            / max(updates - (skipped_nonfinite + skipped_empty) / ranks, 1),  # updates made
            "train/clip_frac_low": clipped_low / max(trained_tokens, 1.0),
            "train/clip_frac_high": clipped_high / max(trained_tokens, 1.0),
            # gradients are synchronised, so every rank measured the same norm
            "train/grad_norm": grad_norm
            / ranks
            / max(updates - (skipped_nonfinite + skipped_empty) / ranks, 1),
            "train/tokens_per_sec": tokens / max(elapsed, 1e-9),
            "train/updates": float(updates),
            # every rank takes the same skip decisions
            "train/skipped_nonfinite": skipped_nonfinite / ranks,
            "train/skipped_empty": skipped_empty / ranks,
        }
        for name, value in zip(function_names, rest[: len(function_names)], strict=True):
            stats[f"rollout/reward/{name}"] = value / n
        rest = rest[len(function_names) :]
        if kl_tokens > 0:
            stats["train/kl"] = kl / kl_tokens
        for name, value in zip(term_names, rest[: len(term_names)], strict=True):
            stats[f"train/term/{name}"] = value / updates  # each rank holds its share of the global term
        for name, value in zip(metric_names, rest[len(term_names) :], strict=True):
            stats[name] = value / ranks
        stats = {
            key: torch.tensor(value, dtype=torch.float32, device=self.device) for key, value in stats.items()
        }
        self.log_dict(stats, on_step=True, on_epoch=False, batch_size=len(rollout.examples) // group)
        self.log("train/entropy", self.train_entropy, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/reward", self.train_reward, on_step=True, on_epoch=False, prog_bar=True)
        return stats

    # ------------------------------------------------------------------ evaluation

    @override
    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._evaluate(batch, self.val_accuracy, self.val_reward, "val")

    @override
    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._evaluate(batch, self.test_accuracy, self.test_reward, "test")

    def _evaluate(
        self, batch: list[dict[str, Any]], accuracy: MeanMetric, reward: MeanMetric, stage: str
    ) -> None:
        """Accuracy of greedy answers (the first reward function's value) and mean reward of sampled ones."""
        greedy = self.generate(batch, greedy=True, num_samples=1)
        first = self.reward_scorer.names[0]
        accuracy.update(self.reward_scorer(greedy.completions, greedy.examples).per_function[first])
        self.log(f"{stage}/accuracy", accuracy, on_epoch=True, prog_bar=True, batch_size=len(batch))
        if self.val_num_samples > 0:
            sampled = self.generate(batch, num_samples=self.val_num_samples)
            scores = self.reward_scorer(sampled.completions, sampled.examples)
            reward.update(scores.total)
            self.log(f"{stage}/reward", reward, on_epoch=True, batch_size=len(batch))
            correct = (scores.per_function[first] >= 1.0).view(len(batch), self.val_num_samples)  # [B, n]
            num_correct = correct.sum(-1)  # [B]
            for k in self.pass_at_k:
                metric = self.eval_pass_at_k[f"{stage}_{k}"]
                metric.update(pass_at_k(self.val_num_samples, num_correct, k))
                self.log(f"{stage}/pass@{k}", metric, on_epoch=True, batch_size=len(batch))
            texts = sampled.completions
            n = self.val_num_samples
            distinct = [
                distinct_correct(texts[i * n : (i + 1) * n], correct[i].tolist()) for i in range(len(batch))
            ]
            self.eval_distinct[stage].update(torch.tensor(distinct, dtype=torch.float32))
            self.log(
                f"{stage}/distinct_correct", self.eval_distinct[stage], on_epoch=True, batch_size=len(batch)
            )

    # ------------------------------------------------------------------ checkpoints

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights: the frozen base (possibly 4-bit) is reloaded from ``policy.path``."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["lit_entropy"] = {
            "shuffle_rng": self._shuffle.get_state(),
            "nonfinite_in_a_row": self._nonfinite_in_a_row,
            # sampling draws from the global RNGs: each rank's state, so a resumed run samples what the
            # uninterrupted run would have
            "rng_states": gather_objects(_rng_state()),
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        # a sharded (FSDP2) checkpoint's tensors were already loaded by the strategy
        missing = trainable - set(checkpoint["state_dict"]) if "state_dict" in checkpoint else set()
        if missing:
            raise ConfigError(
                f"checkpoint lacks {len(missing)} trainable weights (e.g. {sorted(missing)[0]}): "
                "was it written with another policy.lora configuration?"
            )
        state = checkpoint.get("lit_entropy", {})
        if "shuffle_rng" in state:
            self._shuffle.set_state(state["shuffle_rng"])
        self._nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        rng_states = state.get("rng_states")
        if rng_states:
            _set_rng_state(rng_states[rank()] if len(rng_states) == world_size() else rng_states[0])

    @override
    def on_fit_end(self) -> None:
        adapter_state = None
        if self._sharded:  # every rank takes part in gathering the sharded adapters; rank 0 writes them
            adapter_state = {
                name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                for name, p in self.policy.named_parameters()
                if p.requires_grad
            }
        if not self.trainer.is_global_zero:
            return
        if self._history:
            window = max(1, min(10, len(self._history) // 2))
            first, last = self._history[:window], self._history[-window:]
            rank_zero_info(
                f"lit_entropy: {len(self._history)} RL iterations; mean over the first / last {window}: "
                f"reward {_mean(first, 0):.3f} -> {_mean(last, 0):.3f}, "
                f"entropy {_mean(first, 1):.3f} -> {_mean(last, 1):.3f} nats"
            )
        folder = self.adapter_dir or os.path.join(
            self.trainer.log_dir or self.trainer.default_root_dir, "adapter"
        )
        self.policy.save_pretrained(folder, state_dict=adapter_state)
        self.tokenizer.save_pretrained(folder)
        rank_zero_info(f"lit_entropy: adapter saved in peft format to {folder}")


def _rng_state() -> dict[str, Any]:
    """This process's global RNG states (torch CPU, CUDA if initialised, Python's ``random``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _mean(rows: list[tuple[float, float]], column: int) -> float:
    return sum(row[column] for row in rows) / len(rows)


class _IterationSums:
    """Running sums over one RL iteration's micro-batches (ratios are formed once, at the end)."""

    def __init__(self, device: torch.device) -> None:
        zero = torch.zeros((), device=device)
        self.loss = zero.clone()
        self.clipped_low = zero.clone()
        self.clipped_high = zero.clone()
        self.tokens = zero.clone()
        self.kl = zero.clone()
        self.kl_tokens = zero.clone()
        self.grad_norm = zero.clone()
        self.skipped_nonfinite = 0  # updates skipped for a non-finite loss or gradient
        self.skipped_empty = 0  # updates skipped because the mini-batch kept no token
        self.terms: dict[str, Tensor] = {}
        self.metrics: dict[str, tuple[Tensor, int]] = {}

    def add(self, result: Any, mask: Tensor) -> None:
        self.clipped_low += (result.clipped_low & mask).sum()
        self.clipped_high += (result.clipped_high & mask).sum()
        self.tokens += mask.sum()
        if result.kl is not None:
            self.kl += (result.kl * mask).sum()
            self.kl_tokens += mask.sum()
        for key, value in result.loss_terms.items():
            self.terms[key] = self.terms.get(key, 0.0) + value
        for key, value in result.metrics.items():
            total, count = self.metrics.get(key, (0.0, 0))
            self.metrics[key] = (total + torch.as_tensor(value, dtype=torch.float32), count + 1)


__all__ = ["GRPO"]
