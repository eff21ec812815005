"""lit_entropy's `GRPO` against TRL's `GRPOTrainer`: one RL iteration of each, configured alike, side by side.

Both sides train the same model through the same LoRA adapters, on the same countdown prompts in the same order,
with the same reward function, and report wall seconds per RL iteration and peak memory. The model is the
embedded default (recipes/embedded/grpo.yaml: the tiny Qwen2-style countdown model, built once in ``--cache`` by
`prepare_embedded_model`), or any local Hugging Face folder with ``--model-path`` (e.g. SmolLM2-135M-Instruct;
the prompts are then rendered with its chat template, by `render_prompt` on both sides).

One RL iteration = sampling ``G`` completions for each of ``B`` prompts (``N = B*G``), scoring them, group
advantages, then every optimizer update made on that rollout (``ppo_epochs * N / minibatch`` updates). What is
timed:

- lit_entropy: one ``training_step`` (Lightning's ``on_train_batch_start`` -> ``on_train_batch_end``), which is
  exactly one RL iteration: generation, rewards, advantages, old log-probs (when updates > 1), every micro-batch
  forward/backward, clipping, optimizer steps, its metric logging.
- TRL: from ``on_step_begin`` of the first optimizer step of a rollout to ``on_step_end`` of its last. TRL
  generates lazily inside the first micro-step of that window (``_prepare_inputs``: generation, rewards,
  advantages, old log-probs) and replays the buffered rollout in the following micro-steps; the window also holds
  the trainer's fetches of the (buffered, tiny) prompt batches between those steps.

Configuration mapping (ours -> TRL ``GRPOConfig``); ``N = B*G``, ``m`` mini-batch, ``n`` micro-batch:

    data batch_size B (prompts / iteration)   generation_batch_size = N  (B prompts, each repeated G times)
    sampling.group_size G                     num_generations = G
    sampling.max_new_tokens                   max_completion_length
    sampling.temperature / top_p              temperature / top_p
    sampling.top_k None (off: generate_rollout top_k = 0  (TRL's default: top-k off as well)
      passes top_k=0 explicitly)
    microbatch_size n                         per_device_train_batch_size = n (TRL counts completions)
    minibatch_size m                          gradient_accumulation_steps = m / n
    N / n micro-batches per rollout           steps_per_generation = N / n
    ppo_epochs E                              num_iterations = E
    -> updates per rollout E*N/m              -> optimizer steps per generation E*(N/n)/(m/n) = E*N/m
    loss.kl_coef 0 (no reference pass)        beta = 0.0 (no reference model is loaded)
    loss.eps_low / eps_high 0.2 / 0.2         epsilon = 0.2, epsilon_high = 0.2
    loss.advantage grpo, scale group          scale_rewards = "group" (TRL's GRPO advantages)
    loss.aggregation token-mean               loss_type = "dapo" (see the caveat below)
    learning_rate 1e-3, AdamW (torch          learning_rate = 1e-3, optim = "adamw_torch", weight_decay = 0.01,
      defaults: weight decay 0.01), no        lr_scheduler_type = "constant", warmup 0
      scheduler
    max_grad_norm 1.0                         max_grad_norm = 1.0
    LoRA(r, alpha, dropout 0, targets)        peft_config = LoraConfig(CAUSAL_LM, r, lora_alpha=alpha,
      --lora-r / --lora-alpha /                 lora_dropout=0, target_modules=targets)
      --lora-targets (default 16, 32,
      all-linear; e.g. 8, 16, q_proj v_proj)
    policy fp32, no gradient checkpointing    model_init_kwargs dtype float32, bf16 = False,
                                              gradient_checkpointing = False (TRL's default is True)
    CountdownDataModule(shuffle=False)        shuffle_dataset = False (so both see the same prompts in order)
    tokenizer: load_tokenizer(folder)         processing_class = that same PreTrainedTokenizerFast instance
                                              (AutoTokenizer would build a Qwen2 tokenizer from config.json)
    prompts: render_prompt (the chat          the rendered strings (plain-text prompts: TRL tokenizes them
      template when the tokenizer has one,      as they are, so it does not apply the template a second
      as GRPO(chat_template=None) does)         time; SmolLM2's tokenizer adds no BOS to them)
    reward countdown_reward (RewardScorer)    a TRL-signature wrapper around the same RewardScorer
    no validation / checkpoint / logger       eval/save/logging strategy "no", report_to "none",
                                              dataloader_num_workers 0, use_cpu on CPU

Not identical, without bearing on speed: TRL's ``dapo`` divides each mini-batch's token-loss sum by the rollout's
mean kept tokens per mini-batch, ours (``token-mean``) by that mini-batch's own kept tokens (equal in
expectation); rollouts are shuffled into micro-batches once per rollout by TRL (reused by every epoch) and once
per epoch by ours; TRL's training forward passes no position ids; both sample, so completion lengths differ
between the sides: the mean completion length and the seconds per 1k completion tokens are printed too.

Different work, which is what is compared: TRL (1.16) computes log-probs and entropy with its own chunked head
(``trl.kernels.ChunkedLogProbFunction``: vocabulary tiles of 32,768, recomputed in the backward), which on a
device without Triton (CPU) projects every position of the sequences, prompt included; ours projects the
completion positions only and keeps per-row gradient directions (`lit_entropy.head`). Our generation prefills
each distinct prompt once and repeats its KV cache for its ``G`` completions, TRL's prefills all ``N`` copies
(``--no-share-prompts`` makes ours do the same).

Memory: each side runs in a fresh subprocess (one at a time, never concurrently). ``RSS at start`` is taken when
training starts (model, LoRA and optimizer built; Lightning ``on_train_start``, TRL ``on_train_begin``), after
every parameter and buffer of the model has been read once (`_touch`: transformers maps fp32 safetensors into
memory, and weights not yet touched would otherwise be paged in during the first iteration and counted as its
working memory); the peak RSS of the iterations is then tracked with the kernel's high-water mark, read and reset
(``/proc/self/clear_refs``) at every phase boundary (elsewhere: ``ru_maxrss`` since process start). Printed: peak
minus start (the iterations' working memory) and the absolute peak (imports and load included). On CUDA:
``torch.cuda.max_memory_allocated`` after a reset at the same point.

Phases: wrappers around each side's own functions (ours: ``GRPO.generate``, the reward scorer,
``_logprobs_no_grad``, ``sequence_logprobs`` with grad, ``manual_backward``, ``_step``; TRL: ``_generate``,
``_calculate_rewards``, ``_get_per_token_logps_and_entropies`` without / with grad, ``accelerator.backward``, the
``on_pre_optimizer_step`` -> ``on_optimizer_step`` callbacks) attribute each segment's peak RSS and wall seconds
to generation, rewards, old log-probs, training forward, backward, optimizer or other; a second table prints them.
glibc keeps freed heap memory, so after the first iteration the RSS stays near its first peak; to see the live
memory of each phase, run with a fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_=65536``: every allocation of 64
KiB or more is then mapped and unmapped on its own; its seconds are not comparable). The ``glibc malloc
environment`` of the run is printed.

Each subprocess runs 1 warm-up iteration (not timed) then ``--iterations`` timed ones, with the same torch seed
and ``--threads`` torch threads; the sides alternate for ``--rounds`` rounds (order flipped every round) and
medians over every timed iteration are printed. Usage (CPU; the first run also builds the embedded model):

    .venv/bin/python benchmarks/vs_trl.py [--iterations 5] [--rounds 2] [--threads N] [--cache .cache/lit_entropy]
    .venv/bin/python benchmarks/vs_trl.py --iterations 1 --rounds 1 --prompts 4 --group 4   # quick check

SmolLM2-135M-Instruct (a local folder), B = 8 x G = 8, 16 new tokens, LoRA r = 8 on q_proj / v_proj, one update
per rollout (docs/performance.md, section 5):

    .venv/bin/python benchmarks/vs_trl.py --model-path .cache/models/SmolLM2-135M-Instruct --lora-r 8 \
        --lora-alpha 16 --lora-targets q_proj v_proj --prompts 8 --group 8 --max-new-tokens 16 --minibatch 64 \
        --threads 1 --iterations 2 --rounds 2
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rss import peak_rss, reset_peak_rss  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

RESULT_PREFIX = "VS_TRL_RESULT "
SIDES = ("lit_entropy", "trl")
PHASES = ("generation", "rewards", "old log-probs", "train forward", "backward", "optimizer", "other")
REWARD_FN = "lit_entropy.demo.countdown.countdown_reward"
# our Sampling(top_k=None) turns top-k off (generate_rollout passes top_k=0); so does TRL's top_k=0
TRL_TOP_K = 0


# ---------------------------------------------------------------------------------------------- measurement


class MemoryProbe:
    """RSS (and CUDA memory) at the start of training, the peak over the iterations after it, and per phase.

    Phases (generation, rewards, old log-probs, training forward, backward, optimizer, other) are entered and left
    by wrappers around each side's own functions (`_wrap_phase`). At every boundary the kernel's RSS high-water
    mark (``VmHWM``) is read, which is the peak of the segment that just ended, attributed to the phase that was
    running (``other`` outside every wrapped function), and then reset (``/proc/self/clear_refs``). The peak of
    the iterations is the largest segment peak. Reading and resetting cost a few microseconds per boundary.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.rss_start = 0
        self.peak_before = 0
        self.peak_resettable = False
        self.cuda_start = 0
        self.train_peak = 0
        self.phases: dict[str, dict[str, int]] = {}  # name -> {"peak": bytes, "entry": bytes, "count": n}
        self.seconds: dict[str, float] = {}  # name -> wall seconds spent in it (nested phases excluded)
        self._stack: list[str] = []
        self._started = False
        self._since = 0.0

    def start(self, model: Any = None) -> None:
        import psutil
        import torch

        if model is not None:  # page the weights in first: see _touch
            _touch(model)
        self.rss_start = psutil.Process().memory_info().rss
        self.peak_before = peak_rss()  # imports + model load
        self.peak_resettable = reset_peak_rss()
        self.train_peak = self.rss_start
        self._started = True
        self._since = time.perf_counter()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda_start = torch.cuda.memory_allocated()

    def _close_segment(self) -> None:
        """Attribute the peak since the last boundary to the running phase, then reset the high-water mark."""
        if not self._started:
            return
        now = time.perf_counter()
        name = self._stack[-1] if self._stack else "other"
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._since
        self._since = now
        peak = peak_rss()
        self.train_peak = max(self.train_peak, peak)
        if self.peak_resettable:
            entry = self.phases.setdefault(name, {})
            entry["peak"] = max(entry.get("peak", 0), peak)
            reset_peak_rss()

    def enter(self, name: str) -> None:
        self._close_segment()
        self._stack.append(name)
        if self._started and self.peak_resettable:
            import psutil

            entry = self.phases.setdefault(name, {})
            entry["entry"] = psutil.Process().memory_info().rss  # the last call's (a timed iteration's)
            entry["count"] = entry.get("count", 0) + 1

    def exit(self) -> None:
        self._close_segment()
        self._stack.pop()

    def result(self) -> dict[str, Any]:
        import torch

        self._close_segment()
        peak = self.train_peak if self.peak_resettable else peak_rss()
        out = {
            "rss_start": self.rss_start,
            "peak_rss_train": peak,
            "peak_rss_abs": max(peak, self.peak_before),
            "peak_resettable": self.peak_resettable,
            "phases": {name: dict(values) for name, values in self.phases.items()},
            "phase_seconds": dict(self.seconds),
        }
        if self.device == "cuda":
            torch.cuda.synchronize()
            out["cuda_start"] = self.cuda_start
            out["cuda_peak"] = torch.cuda.max_memory_allocated()
        return out


def _wrap_phase(probe: MemoryProbe, owner: Any, attribute: str, name: str | Callable[[], str | None]) -> None:
    """Replace ``owner.attribute`` (a method, on the instance) by a wrapper that runs it as phase ``name``.

    ``name`` may be a function returning the phase name at call time, or None to stay in the enclosing phase.
    """
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        phase = name() if callable(name) else name
        if phase is None:
            return original(*args, **kwargs)
        probe.enter(phase)
        try:
            return original(*args, **kwargs)
        finally:
            probe.exit()

    setattr(owner, attribute, wrapper)


class _PhasedCall:
    """A callable object (our `RewardScorer`) whose calls run as one phase; other attributes pass through."""

    def __init__(self, wrapped: Any, probe: MemoryProbe, name: str) -> None:
        self._wrapped, self._probe, self._name = wrapped, probe, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._probe.enter(self._name)
        try:
            return self._wrapped(*args, **kwargs)
        finally:
            self._probe.exit()

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._wrapped, attribute)


def _grad_phase(grad_name: str, no_grad_name: str | None = None) -> Callable[[], str | None]:
    """The phase of a forward pass: ``grad_name`` with autograd on, else ``no_grad_name``."""

    def name() -> str | None:
        import torch

        return grad_name if torch.is_grad_enabled() else no_grad_name

    return name


def _touch(model: Any) -> None:
    """Read every parameter and buffer once, so that RSS at start counts the whole model on both sides.

    transformers maps a safetensors file whose dtype is the requested one (fp32 SmolLM2 on CPU) into memory
    instead of copying it: the weights are file-backed pages, counted in RSS only once touched. A side whose setup
    ran a forward pass before training starts (ours checks the fused head against the model's logits) would start
    with the weights resident, the other would page them in during its first iteration (about 520 MiB for
    SmolLM2-135M) and count them as working memory.
    """
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel():
                tensor.detach().sum()


def _setup_worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def _sizes(args: argparse.Namespace) -> dict[str, int]:
    """``N``, ``m``, ``n`` and the updates per rollout from the CLI (checked in the parent)."""
    num = args.prompts * args.group
    minibatch = args.minibatch or num // 2
    microbatch = args.microbatch or minibatch
    return {
        "num": num,
        "minibatch": minibatch,
        "microbatch": microbatch,
        "updates": args.ppo_epochs * (num // minibatch),
    }


def _countdown_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The training rows both sides use, in the order both consume them (no shuffling)."""
    data = _datamodule(args)
    data.setup("fit")
    return list(data.train_rows)


def _datamodule(args: argparse.Namespace) -> Any:
    from lit_entropy import CountdownDataModule

    # the embedded recipe's task settings (3 numbers, 2..3 terms); one batch per iteration, warm-up included
    return CountdownDataModule(
        batch_size=args.prompts,
        num_train=args.prompts * (args.iterations + 1),
        num_val=0,
        seed=args.seed,
        num_numbers=3,
        min_terms=2,
        max_terms=3,
        shuffle=False,
    )


def _lora_options(args: argparse.Namespace, peft: bool = False) -> dict[str, Any]:
    """The same adapters on both sides: our `LoRA` arguments, or peft's ``LoraConfig`` ones (``peft=True``)."""
    targets: str | list[str] = (
        "all-linear" if args.lora_targets == ["all-linear"] else list(args.lora_targets)
    )
    if peft:
        return {
            "r": args.lora_r,
            "lora_alpha": args.lora_alpha,
            "lora_dropout": 0.0,
            "target_modules": targets,
        }
    return {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0, "target_modules": targets}


# ---------------------------------------------------------------------------------------------- the two sides


def run_lit_entropy(args: argparse.Namespace) -> dict[str, Any]:
    """One fit of 1 + ``iterations`` RL iterations of lit_entropy's `GRPO`; seconds and tokens of each."""
    _setup_worker(args)
    from lightning.pytorch import Callback, Trainer, seed_everything

    from lit_entropy import GRPO, LoRA, Loss, Policy, Quantization, Reward, Sampling

    seed_everything(args.seed, verbose=False)
    if args.no_share_prompts:  # the previous rollout: every repeated prompt prefilled on its own
        import lit_entropy.module

        lit_entropy.module.generate_rollout = functools.partial(
            lit_entropy.module.generate_rollout, share_prompts=False
        )
    sizes = _sizes(args)
    probe = MemoryProbe(args.device)
    seconds: list[float] = []
    tokens: list[int] = []
    state: dict[str, Any] = {"threads": 0}

    class Timer(Callback):
        def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
            import torch

            state["threads"] = torch.get_num_threads()
            probe.start(pl_module.policy)

        def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            _sync(args.device)
            state["started"] = time.perf_counter()

        def on_train_batch_end(
            self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            _sync(args.device)
            seconds.append(time.perf_counter() - state["started"])
            tokens.append(int(outputs["token_mask"].sum()))
            state["memory"] = probe.result()
            state.setdefault("warmup_seconds", state["memory"]["phase_seconds"])

    with tempfile.TemporaryDirectory(prefix="vs_trl_lit_") as folder:
        module = GRPO(
            policy=Policy(
                path=args.folder,
                dtype=args.dtype,
                lora=LoRA(**_lora_options(args)),
                quantization=Quantization(compute_dtype=args.dtype) if args.quantize else None,
            ),
            rewards=[Reward(fn=REWARD_FN)],
            sampling=Sampling(
                group_size=args.group,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                engine=args.engine,
            ),
            loss=Loss(eps_low=0.2, eps_high=0.2),
            ppo_epochs=args.ppo_epochs,
            minibatch_size=sizes["minibatch"],
            microbatch_size=sizes["microbatch"],
            learning_rate=args.lr,
            val_num_samples=0,
            adapter_dir=os.path.join(folder, "adapter"),
            seed=args.seed,
            sampler_logprobs=args.sampler_logprobs,
        )
        # phases of the per-phase memory table (sequence_logprobs with grad = the training forward; without
        # grad it runs inside _logprobs_no_grad, whose phase it stays in)
        _wrap_phase(probe, module, "generate", "generation")
        _wrap_phase(probe, module, "_logprobs_no_grad", "old log-probs")
        _wrap_phase(probe, module, "sequence_logprobs", _grad_phase("train forward"))
        _wrap_phase(probe, module, "manual_backward", "backward")
        import lit_entropy.module  # the optimizer step is a function the module calls at the end of each update

        _wrap_phase(probe, lit_entropy.module, "optimizer_step", "optimizer")
        # RewardScorer is called through __call__ (looked up on the type): wrap the object instead
        module.reward_scorer = _PhasedCall(module.reward_scorer, probe, "rewards")
        trainer = Trainer(
            accelerator="gpu" if args.device == "cuda" else "cpu",
            devices=1,
            max_steps=(args.iterations + 1) * sizes["updates"],  # optimizer updates
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=folder,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[Timer()],
        )
        trainer.fit(module, _datamodule(args))
    return {
        "seconds": seconds,
        "tokens": tokens,
        "threads": state["threads"],
        "warmup_phase_seconds": state["warmup_seconds"],
        **state["memory"],
    }


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    """TRL's `GRPOTrainer` for 1 + ``iterations`` rollouts; seconds and tokens of each."""
    _setup_worker(args)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lit_entropy.prompts import render_prompt
    from lit_entropy.reward_scorer import RewardScorer
    from lit_entropy.reward_spec import Reward
    from lit_entropy.tokenizer import load_tokenizer

    sizes = _sizes(args)
    updates = sizes["updates"]
    probe = MemoryProbe(args.device)
    seconds: list[float] = []
    tokens: list[int] = []
    state: dict[str, Any] = {"threads": 0}

    tokenizer = load_tokenizer(args.folder)  # a PreTrainedTokenizerFast, not what AutoTokenizer would build
    rows = [{**row, "prompt": render_prompt(row["prompt"], tokenizer)} for row in _countdown_rows(args)]
    scorer = RewardScorer([Reward(fn=REWARD_FN)])

    def countdown_reward(
        prompts: list[str], completions: list[str], completion_ids: list[list[int]], **columns: Any
    ) -> list[float]:
        # completion_ids are cut after the first EOS (EOS kept): the same tokens as our completion mask
        tokens.append(sum(len(ids) for ids in completion_ids))
        examples = [
            {"answer": answer, "numbers": numbers}
            for answer, numbers in zip(columns["answer"], columns["numbers"], strict=True)
        ]
        return scorer(completions, examples).total.tolist()

    class Timer(TrainerCallback):
        def on_train_begin(self, train_args: Any, trainer_state: Any, control: Any, **kwargs: Any) -> None:
            torch.set_num_threads(args.threads)  # in case the trainer's setup changed it
            state["threads"] = torch.get_num_threads()
            probe.start(kwargs["model"])

        def on_step_begin(self, train_args: Any, trainer_state: Any, control: Any, **kwargs: Any) -> None:
            if trainer_state.global_step % updates == 0:  # the first update of a rollout: it generates
                _sync(args.device)
                state["started"] = time.perf_counter()

        def on_pre_optimizer_step(
            self, train_args: Any, trainer_state: Any, control: Any, **kwargs: Any
        ) -> None:
            probe.enter("optimizer")

        def on_optimizer_step(self, train_args: Any, trainer_state: Any, control: Any, **kwargs: Any) -> None:
            probe.exit()

        def on_step_end(self, train_args: Any, trainer_state: Any, control: Any, **kwargs: Any) -> None:
            if trainer_state.global_step % updates == 0:  # global_step already counts this update
                _sync(args.device)
                seconds.append(time.perf_counter() - state["started"])
                state["memory"] = probe.result()
                state.setdefault("warmup_seconds", state["memory"]["phase_seconds"])

    cpu = args.device == "cpu"
    with tempfile.TemporaryDirectory(prefix="vs_trl_trl_") as folder:
        config = GRPOConfig(
            output_dir=folder,
            seed=args.seed,
            data_seed=args.seed,
            use_cpu=cpu,
            bf16=args.dtype == "bfloat16",
            fp16=False,
            model_init_kwargs=_trl_model_kwargs(args),
            # rollouts: transformers generate, or vLLM in the training process (as sampling.engine: vllm)
            use_vllm=args.engine == "vllm",
            vllm_mode="colocate",
            vllm_gpu_memory_utilization=0.3,
            vllm_enable_sleep_mode=args.engine == "vllm" and args.device == "cuda",
            gradient_checkpointing=False,
            # batching: one generation of N completions, E*N/m optimizer steps of m, micro-batches of n
            num_generations=args.group,
            generation_batch_size=sizes["num"],
            per_device_train_batch_size=sizes["microbatch"],
            gradient_accumulation_steps=sizes["minibatch"] // sizes["microbatch"],
            num_iterations=args.ppo_epochs,
            max_steps=(args.iterations + 1) * updates,
            shuffle_dataset=False,
            # sampling
            max_completion_length=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=TRL_TOP_K,
            # objective
            beta=0.0,
            epsilon=0.2,
            epsilon_high=0.2,
            scale_rewards="group",
            loss_type="dapo",
            mask_truncated_completions=False,
            # optimizer
            learning_rate=args.lr,
            optim="adamw_torch",
            weight_decay=0.01,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=1.0,
            # no logging, evaluation or saving
            report_to="none",
            logging_strategy="no",
            eval_strategy="no",
            save_strategy="no",
            log_completions=False,
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=not cpu,
        )
        trainer = GRPOTrainer(
            model=args.folder,
            reward_funcs=countdown_reward,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=LoraConfig(task_type="CAUSAL_LM", **_lora_options(args, peft=True)),
            callbacks=[Timer()],
        )
        # the same phases as ours: TRL's generation, reward call, no-grad log-prob pass (old log-probs, skipped
        # when on-policy), training forward, backward and optimizer step
        _wrap_phase(probe, trainer, "_generate", "generation")
        _wrap_phase(probe, trainer, "_calculate_rewards", "rewards")
        _wrap_phase(
            probe,
            trainer,
            "_get_per_token_logps_and_entropies",
            _grad_phase("train forward", "old log-probs"),
        )
        _wrap_phase(probe, trainer.accelerator, "backward", "backward")
        trainer.train()
    return {
        "seconds": seconds,
        "tokens": tokens,
        "threads": state["threads"],
        "warmup_phase_seconds": state["warmup_seconds"],
        **state["memory"],
    }


def _trl_model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """TRL's ``model_init_kwargs``: the dtype, and the 4-bit base of ``--quantize`` as ours loads it."""
    kwargs: dict[str, Any] = {"dtype": args.dtype}
    if args.quantize:
        from lit_entropy.quantization import Quantization, bits_and_bytes_config

        kwargs["quantization_config"] = bits_and_bytes_config(Quantization(compute_dtype=args.dtype))
    return kwargs


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- the parent


def run_side(args: argparse.Namespace, side: str, folder: str) -> dict[str, Any]:
    """Run one side in a fresh subprocess and return its result (raises with its output's tail on failure)."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", side, "--folder", folder]
    for name in (
        "iterations",
        "threads",
        "device",
        "prompts",
        "group",
        "max_new_tokens",
        "temperature",
        "top_p",
        "minibatch",
        "microbatch",
        "ppo_epochs",
        "lr",
        "seed",
        "lora_r",
        "lora_alpha",
        "engine",
        "dtype",
    ):
        value = getattr(args, name)
        if value is not None:
            command += [f"--{name.replace('_', '-')}", str(value)]
    command += ["--lora-targets", *args.lora_targets]
    if args.sampler_logprobs:
        command.append("--sampler-logprobs")
    if args.no_share_prompts:
        command.append("--no-share-prompts")
    if args.quantize:
        command.append("--quantize")
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(args.threads)
    done = subprocess.run(command, env=env, capture_output=not args.verbose, text=True, check=False)
    output = (done.stdout or "") + (done.stderr or "")
    results = [line for line in (done.stdout or "").splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not results:
        raise RuntimeError(f"{side} worker failed (exit {done.returncode}):\n{output[-4000:]}")
    return json.loads(results[-1][len(RESULT_PREFIX) :])


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _mib(value: float) -> str:
    return f"{value / 2**20:.0f}"


def report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> None:
    sizes = _sizes(args)
    rows: dict[str, dict[str, float]] = {}
    for side in SIDES:
        runs = results[side]
        seconds = [s for run in runs for s in run["seconds"][1:]]  # the first iteration is the warm-up
        tokens = [t for run in runs for t in run["tokens"][1:]]
        per_token = [s / t * 1000 for s, t in zip(seconds, tokens, strict=True) if t]
        rows[side] = {
            "s_iter": statistics.median(seconds),
            "length": statistics.mean(tokens) / sizes["num"],
            "s_1k": statistics.median(per_token),
            "tok_s": statistics.median([t / s for s, t in zip(seconds, tokens, strict=True)]),
            "start": max(run["rss_start"] for run in runs),
            "delta": max(run["peak_rss_train"] - run["rss_start"] for run in runs),
            "peak": max(run["peak_rss_abs"] for run in runs),
            "timed": len(seconds),
            "threads": runs[0]["threads"],
        }
        if args.device == "cuda":
            rows[side]["cuda_peak"] = max(run["cuda_peak"] for run in runs)
            rows[side]["cuda_delta"] = max(run["cuda_peak"] - run["cuda_start"] for run in runs)
    ours, trl = rows["lit_entropy"], rows["trl"]
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(
        f"\nmodel {args.model_path or 'embedded'}{' (4-bit nf4)' if args.quantize else ''}, {args.dtype}, rollouts "
        f"{args.engine}; LoRA r={args.lora_r} alpha={args.lora_alpha} on "
        f"{' '.join(args.lora_targets)}; torch {_version('torch')}, transformers {_version('transformers')}, "
        f"peft {_version('peft')}, TRL {_version('trl')}, lightning {_version('lightning')}; "
        f"glibc malloc environment: {malloc or 'default'}"
    )
    print(
        f"B={args.prompts} prompts x G={args.group} = N={sizes['num']} completions of <= {args.max_new_tokens} "
        f"tokens; {sizes['updates']} update(s) per rollout (mini-batch {sizes['minibatch']}, micro-batch "
        f"{sizes['microbatch']}, {args.ppo_epochs} epoch(s)); device {args.device}, torch threads "
        f"{ours['threads']} / {trl['threads']}; {args.rounds} round(s) x {args.iterations} timed iteration(s)"
    )
    memory_note = "" if all(r["peak_resettable"] for rs in results.values() for r in rs) else " (since start)"
    print(
        "| side | timed its | s/iter | mean completion len | s / 1k tokens | tokens/s | "
        f"RSS at start MiB | peak - start MiB{memory_note} | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for side in SIDES:
        row = rows[side]
        print(
            f"| {side} | {row['timed']} | {row['s_iter']:.3f} | {row['length']:.2f} | {row['s_1k']:.3f} | "
            f"{row['tok_s']:.0f} | {_mib(row['start'])} | {_mib(row['delta'])} | {_mib(row['peak'])} |"
        )
    delta_ratio = ours["delta"] / trl["delta"] if trl["delta"] > 0 else float("nan")
    print(
        f"| ours / TRL | | {ours['s_iter'] / trl['s_iter']:.3f} | {ours['length'] / trl['length']:.3f} | "
        f"{ours['s_1k'] / trl['s_1k']:.3f} | {ours['tok_s'] / trl['tok_s']:.3f} | "
        f"{ours['start'] / trl['start']:.3f} | {delta_ratio:.3f} | {ours['peak'] / trl['peak']:.3f} |"
    )
    if args.device == "cuda":
        print(
            f"CUDA max_memory_allocated MiB: ours {_mib(ours['cuda_peak'])} (iterations {_mib(ours['cuda_delta'])})"
            f", TRL {_mib(trl['cuda_peak'])} (iterations {_mib(trl['cuda_delta'])}); "
            f"ratio {ours['cuda_peak'] / trl['cuda_peak']:.3f}"
        )
    phases: dict[str, dict[str, dict[str, float]]] = {side: {} for side in SIDES}
    for side in SIDES:
        runs = results[side]
        for run in runs:
            timed = max(len(run["seconds"]) - 1, 1)
            for name in set(run.get("phases", {})) | set(run.get("phase_seconds", {})):
                values = run.get("phases", {}).get(name, {})
                merged = phases[side].setdefault(name, {"peak": 0, "entry": 0, "count": 0, "s": 0.0})
                for key in ("peak", "entry"):
                    if key in values:
                        merged[key] = max(merged[key], values[key] - run["rss_start"])
                merged["count"] = max(merged["count"], values.get("count", 0))
                # seconds per timed iteration: the cumulative total minus the warm-up's, averaged over runs
                spent = run["phase_seconds"].get(name, 0.0) - run["warmup_phase_seconds"].get(name, 0.0)
                merged["s"] += spent / timed / len(runs)
    names = [n for n in PHASES if any(n in phases[side] for side in SIDES)]
    names += sorted({n for side in SIDES for n in phases[side]} - set(names))
    if names:
        print(
            "\nPer phase: peak RSS in MiB over the RSS at the start of training (max over runs, warm-up "
            "included), the RSS when it last began (a timed iteration), calls per run, and seconds per timed "
            "iteration (mean over runs):"
        )
        print(
            "| phase | ours peak | ours at entry | ours calls | ours s/iter | "
            "TRL peak | TRL at entry | TRL calls | TRL s/iter |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name in names:
            cells = [name]
            for side in SIDES:
                values = phases[side].get(name)
                if values is None:
                    cells += ["-", "-", "0", "-"]
                    continue
                cells += [
                    _mib(values["peak"]),
                    _mib(values["entry"]) if values["count"] else "",
                    str(int(values["count"])),
                    f"{values['s']:.2f}",
                ]
            print("| " + " | ".join(cells) + " |")
    print(
        "Not identical: TRL 'dapo' normalises each mini-batch by the rollout's mean tokens per mini-batch (ours: "
        "its own count); TRL's chunked head (on CPU over every position) vs ours (completion positions); ours "
        "prefills each distinct prompt once unless --no-share-prompts; both sample, so completion lengths "
        "differ (compare s / 1k tokens too). Top-k is off on both sides."
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--iterations", type=int, default=5, help="timed RL iterations per run (after 1 warm-up)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cache", default=".cache/lit_entropy", help="embedded model cache (built once)")
    parser.add_argument(
        "--model-path",
        default=None,
        help="a local Hugging Face model folder (config, weights, tokenizer) instead of the embedded model",
    )
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank, both sides")
    parser.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha, both sides")
    parser.add_argument(
        "--lora-targets",
        nargs="+",
        default=["all-linear"],
        help="LoRA target modules, both sides (default all-linear; e.g. q_proj v_proj)",
    )
    parser.add_argument("--prompts", type=int, default=32, help="prompts per RL iteration (B)")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="completion length cap (T)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument(
        "--minibatch",
        type=int,
        default=None,
        help="sequences per optimizer update (default N/2: 128 for N=256)",
    )
    parser.add_argument(
        "--microbatch", type=int, default=None, help="sequences per forward/backward (default m)"
    )
    parser.add_argument("--ppo-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="show the workers' own output")
    parser.add_argument(
        "--sampler-logprobs",
        action="store_true",
        help="ours: old log-probs recorded during generation (GRPO(sampler_logprobs=True)), no second pass",
    )
    parser.add_argument(
        "--no-share-prompts",
        action="store_true",
        help="ours: prefill every repeated prompt (generate_rollout(share_prompts=False)), as TRL does",
    )
    parser.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        default="hf",
        help="rollouts, both sides: transformers generate, or vLLM colocated (ours sampling.engine: vllm, TRL "
        "use_vllm with vllm_mode colocate)",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="policy dtype, both sides"
    )
    parser.add_argument(
        "--quantize", action="store_true", help="a 4-bit nf4 base (QLoRA), both sides, compute in --dtype"
    )
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is None:
        args.threads = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )
    if args.iterations < 1 or args.rounds < 1 or args.threads < 1:
        parser.error("--iterations, --rounds and --threads must be >= 1")
    if args.group < 2 or args.prompts < 1:
        parser.error("--group must be >= 2 and --prompts >= 1")
    num = args.prompts * args.group
    minibatch = args.minibatch or num // 2
    microbatch = args.microbatch or minibatch
    if minibatch < 1 or num % minibatch or microbatch < 1 or minibatch % microbatch:
        parser.error(
            f"--minibatch ({minibatch}) must divide N = {num} and --microbatch ({microbatch}) the mini-batch"
        )
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda but torch sees no CUDA device")
    return args


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        result = (run_lit_entropy if args.worker == "lit_entropy" else run_trl)(args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    if args.model_path is not None:
        folder = os.path.abspath(args.model_path)
    else:
        from lit_entropy.demo import EmbeddedModel, prepare_embedded_model

        # the embedded recipe's model (its defaults); built once, then both sides load this folder
        folder = prepare_embedded_model(EmbeddedModel(cache_dir=args.cache))
    print(f"model folder: {folder}", file=sys.stderr)
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for round_index in range(args.rounds):
        order = SIDES if round_index % 2 == 0 else SIDES[::-1]
        for side in order:
            result = run_side(args, side, folder)
            results[side].append(result)
            timed = result["seconds"][1:]
            print(
                f"round {round_index}: {side} {statistics.median(timed):.3f} s/it "
                f"(warm-up {result['seconds'][0]:.3f} s), peak RSS {_mib(result['peak_rss_abs'])} MiB",
                file=sys.stderr,
            )
    report(args, results)


if __name__ == "__main__":
    main()
