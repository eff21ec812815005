"""What each entropy callback costs per RL iteration of the embedded default, all measured side by side in one run.

For every callback C (the regularizers with the arguments of their ``recipes/embedded/<name>.yaml``, the monitors
``EntropyMonitor``, ``EntropyLaw`` and ``CollapseGuard`` with their constructor defaults), fits of plain GRPO (the
baseline: no callback but the timer) and fits with C alone are interleaved within each round, every C fit
bracketed by two baseline fits: ``B C1 B C2 B ... Ck B``; odd rounds run the callbacks in reverse order, so a drift
in machine load hits both sides alike. Each C fit is paired with the mean of its two neighbouring baseline fits.
Every fit starts from the same seed and the same warmed-up embedded model (built once in ``--cache``) with the
settings of ``recipes/embedded/grpo.yaml`` (32 prompts x 8 completions of at most 12 tokens, 2 optimizer updates
per rollout, LoRA r=16; checkpointing on, as there, so that ``CollapseGuard`` keeps its last-good weights; no
logger, no validation). The first iteration of every fit is left out (warm-up); figures are medians.

Three figures per callback, because a callback also *changes training*: an entropy bonus keeps entropy (and so
completion lengths) higher, which moves the wall time with no code cost at all.

(a) ``s/iter`` and ``ratio``: wall seconds per RL iteration with C over the paired baseline. It mixes the cost of
    C with its effect on the rollouts (longer or shorter completions); it is not the overhead.
(b) ``s/1k generated tok ratio``: seconds per 1,000 generated completion tokens with C over the paired baseline,
    where the generated tokens of a rollout are its ``N x T`` sampled positions (``T`` = the sampling steps it
    took, set by its longest completion): that is what the compute scales with, since the sampler steps every
    row until all are done and the training forward keeps every column some row needs. So this controls for the
    changed lengths. ``s/1k kept tok ratio`` divides by the real completion tokens instead (up to EOS); it
    over-corrects when lengths change under a fixed ``T`` (more kept tokens, same compute) and is shown as the
    other bound. Both include every cost C induces in the module, which the hook timing cannot see: the backward
    through the full-vocabulary entropy that ``needs_entropy_grad`` keeps (EntropyConstraint, EntropyBonus,
    AdaptiveEntropyBonus), or the extra mini-batch forward of ``needs_minibatch_stats`` (none here: the
    micro-batch is the whole mini-batch, as in the recipes). The generated-token ratio is the overhead of those
    callbacks, and it is noisy: a difference of a few percent needs several rounds on otherwise idle cores.
(c) ``hook %``: wall seconds spent in C's own code per iteration (every ``on_*`` hook C overrides, plus the
    regularizer contract's ``replace_inputs``/``adjust``, which the module calls once per micro-batch), over the
    median baseline iteration. It is direct and little affected by load, but a lower bound: it excludes what C makes
    the module do (gradients through C's loss terms, the entropy graph). For a callback that induces no module
    cost (no ``needs_entropy_grad``, no extra forward) it is the whole overhead.

So the answer to "what is C's overhead" is (c) for callbacks that induce no module cost and (b), per generated
token, for those that do; the ``basis`` column says which figure the verdict (against ``--target``, 3% by
default) uses. (a) is shown for completeness. Not measured: the per-validation work of a monitor (``EntropyLaw`` refits the law at every
validation, every 50 iterations in the recipes) and the loggers' I/O. The baseline row's ``noise`` is each
interior baseline fit over the mean of its two baseline neighbours (a null comparison, two fits apart; median
absolute deviation from 1); a per-token verdict closer to the target than that is marked "within noise".

Usage (CPU; the first run also builds the embedded model; about 2k+1 short fits per round for k callbacks):

    .venv/bin/python benchmarks/callback_overhead.py [--callbacks ClipCov EntropyBonus] [--rounds 3] \\
        [--iterations 6] [--cache .cache/lit_entropy] [--threads 2]
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402

from lit_entropy import (  # noqa: E402
    GRPO,
    CountdownDataModule,
    EmbeddedModel,
    LoRA,
    Loss,
    Policy,
    Regularizer,
    Reward,
    Sampling,
)
from lit_entropy.callbacks import (  # noqa: E402
    ADAPO,
    REPO,
    AdaptiveEntropyBonus,
    ClipCov,
    CollapseGuard,
    EntropyBonus,
    EntropyConstraint,
    EntropyLaw,
    EntropyMonitor,
    HighEntropyTokens,
    KLCov,
)

# name -> factory, with the arguments of recipes/embedded/<name>.yaml (the monitors have no recipe: defaults)
CALLBACKS: dict[str, Callable[[], Callback]] = {
    "EntropyConstraint": lambda: EntropyConstraint(
        target_start=0.5, target_end=0.3, schedule="linear", decay_steps=300, lr_lambda=0.5, lambda_max=10.0
    ),
    "EntropyBonus": lambda: EntropyBonus(coef=0.01),
    "AdaptiveEntropyBonus": lambda: AdaptiveEntropyBonus(target=0.45, delta=0.002, coef_max=0.05),
    "ClipCov": lambda: ClipCov(ratio=0.02, cov_lb=0.0, cov_ub=5.0),
    "KLCov": lambda: KLCov(ratio=0.02, kl_coef=1.0),
    "HighEntropyTokens": lambda: HighEntropyTokens(rho=0.2),
    "REPO": lambda: REPO(variant="R"),
    "ADAPO": lambda: ADAPO(eps_high_init=0.28),
    "EntropyMonitor": lambda: EntropyMonitor(),
    "EntropyLaw": lambda: EntropyLaw(),
    "CollapseGuard": lambda: CollapseGuard(),
}
CONTRACT_METHODS = (
    "replace_inputs",
    "adjust",
)  # what the module calls on a Regularizer for every micro-batch


@dataclass
class HookClock:
    """Wall seconds spent in one callback's own methods: in the current RL iteration and by method."""

    current: float = 0.0
    by_method: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    depth: int = 0  # a timed method calling another is counted once


def instrument(callback: Callback, clock: HookClock) -> list[str]:
    """Wrap every ``on_*`` hook ``callback`` overrides (and ``replace_inputs``/``adjust`` of a Regularizer) with timing.

    The wrappers are instance attributes, so Lightning (``getattr(callback, hook)``) and the module
    (``regularizer.adjust(view)``) call them; methods the class inherits unchanged are no-ops and stay as they are.
    Returns the wrapped names.
    """
    wrapped = []
    for name in sorted(dir(type(callback))):
        if name.startswith("on_"):
            base: type = Callback
        elif name in CONTRACT_METHODS and isinstance(callback, Regularizer):
            base = Regularizer
        else:
            continue
        implementation = getattr(type(callback), name, None)
        if not callable(implementation) or implementation is getattr(base, name, None):
            continue
        setattr(callback, name, _timed(getattr(callback, name), name, clock))
        wrapped.append(name)
    return wrapped


def _timed(method: Callable[..., Any], name: str, clock: HookClock) -> Callable[..., Any]:
    @functools.wraps(method)
    def timed(*args: Any, **kwargs: Any) -> Any:
        clock.depth += 1
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            clock.depth -= 1
            if clock.depth == 0:
                seconds = time.perf_counter() - started
                clock.current += seconds
                clock.by_method[name] += seconds
                clock.calls[name] += 1

    return timed


@dataclass
class Stopwatch:
    """One fit's per-iteration wall seconds, completion tokens and seconds in the measured callback's code."""

    clock: HookClock | None = None
    seconds: list[float] = field(default_factory=list)
    generated: list[float] = field(default_factory=list)
    kept: list[float] = field(default_factory=list)
    hooks: list[float] = field(default_factory=list)
    started: float = 0.0


class IterationStart(Callback):
    """First in the callback list: starts the iteration's clock before any other callback's batch-start hook."""

    def __init__(self, watch: Stopwatch) -> None:
        self.watch = watch

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.watch.clock is not None:
            self.watch.clock.current = 0.0
        self.watch.started = time.perf_counter()


class IterationTimer(Callback):
    """Last in the list: an iteration is every callback's batch hooks around ``training_step`` (one RL iteration)."""

    def __init__(self, watch: Stopwatch) -> None:
        self.watch = watch

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        watch = self.watch
        watch.seconds.append(time.perf_counter() - watch.started)
        mask = outputs["token_mask"]  # [N, T]: T = the sampling steps this rollout took
        watch.generated.append(float(mask.numel()))
        watch.kept.append(float(mask.sum()))
        watch.hooks.append(0.0 if watch.clock is None else watch.clock.current)


@dataclass
class FitResult:
    """One fit, first iteration dropped."""

    seconds: list[float]
    generated: list[float]  # N * T completion positions the sampler produced (padding included)
    kept: list[float]  # real completion tokens (up to and including EOS)
    hooks: list[float]

    @property
    def s_per_iter(self) -> float:
        return statistics.median(self.seconds)

    def s_per_ktok(self, kind: str) -> float:
        return per_ktok(self.seconds, getattr(self, kind))


def per_ktok(seconds: list[float], tokens: list[float]) -> float:
    """Median over iterations of seconds per 1,000 tokens."""
    return statistics.median(1000 * s / max(t, 1.0) for s, t in zip(seconds, tokens))


def fit(
    args: argparse.Namespace, callback: Callback | None, clock: HookClock | None, folder: str
) -> FitResult:
    """One fit of ``args.iterations`` RL iterations of the embedded default, with ``callback`` or none."""
    seed_everything(0, verbose=False)
    embedded = EmbeddedModel(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        warmup_steps=args.warmup_steps,
        num_numbers=3,
        min_terms=2,
        max_terms=3,
        cache_dir=args.cache,
    )
    rollout_size = args.prompts * args.group
    module = GRPO(
        policy=Policy(embedded=embedded, lora=LoRA(r=16, alpha=32)),
        rewards=[Reward(fn="lit_entropy.demo.countdown.countdown_reward")],
        sampling=Sampling(group_size=args.group, max_new_tokens=args.max_new_tokens, temperature=1.0),
        loss=Loss(eps_low=0.2, eps_high=0.2),
        ppo_epochs=1,
        minibatch_size=rollout_size // args.updates,  # 256 / 2 = 128, as in the recipe
        learning_rate=1e-3,
        val_num_samples=0,
        adapter_dir=os.path.join(folder, "adapter"),
    )
    watch = Stopwatch(clock=clock)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.iterations * args.updates,  # optimizer updates
        logger=False,
        enable_checkpointing=True,  # Lightning's default, as in the recipes (CollapseGuard copies weights then)
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[IterationStart(watch)]
        + ([] if callback is None else [callback])
        + [IterationTimer(watch)],
    )
    data = CountdownDataModule(
        batch_size=args.prompts,
        num_train=args.prompts * (args.iterations + 1),
        num_numbers=3,
        min_terms=2,
        max_terms=3,
    )
    trainer.fit(module, data)
    return FitResult(watch.seconds[1:], watch.generated[1:], watch.kept[1:], watch.hooks[1:])


def induces_module_cost(callback: Callback) -> bool:
    """Whether C makes the module do work outside C's own methods (so the hook time is only a lower bound).

    ``needs_entropy_grad``: backward through the entropy; ``needs_minibatch_stats`` costs an extra forward only
    when micro-batches split the mini-batch, which this benchmark (like the recipes) never does.
    """
    return bool(getattr(callback, "needs_entropy_grad", False))


def spread(values: list[float]) -> str:
    return f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--callbacks", nargs="+", default=list(CALLBACKS), metavar="NAME", help=f"subset of {list(CALLBACKS)}"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of B C1 B C2 ... Ck B fits")
    parser.add_argument(
        "--iterations", type=int, default=6, help="RL iterations per fit (the first is dropped)"
    )
    parser.add_argument("--prompts", type=int, default=32, help="prompts per iteration (B)")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="completion length cap (T)")
    parser.add_argument("--updates", type=int, default=2, help="optimizer updates per rollout (mini-batches)")
    parser.add_argument("--warmup-steps", type=int, default=600, help="embedded model's supervised warm-up")
    parser.add_argument("--cache", default=".cache/lit_entropy", help="embedded model cache (built once)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--target", type=float, default=0.03, help="overhead budget per callback (fraction)")
    args = parser.parse_args()
    lookup = {name.lower(): name for name in CALLBACKS}
    unknown = [name for name in args.callbacks if name.lower() not in lookup]
    if unknown:
        parser.error(f"unknown callbacks {unknown}; choose from {list(CALLBACKS)}")
    names = list(dict.fromkeys(lookup[name.lower()] for name in args.callbacks))
    if args.iterations < 2 or args.rounds < 1:
        parser.error("--iterations must be >= 2 (the first is dropped) and --rounds >= 1")
    if args.updates < 1 or (args.prompts * args.group) % args.updates:
        parser.error(f"--updates={args.updates} must divide the rollout size {args.prompts * args.group}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for logger_name in ("lightning", "lightning.pytorch", "lightning.fabric", "lit_entropy"):
        logging.getLogger(logger_name).setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")

    baseline_fits: list[FitResult] = []
    noise: list[float] = []  # interior baseline fit / mean of its two baseline neighbours
    per_callback: dict[str, dict[str, Any]] = {
        name: {
            "fits": [],
            "ratio": [],
            "generated": [],
            "kept": [],
            "clock": HookClock(),
            "wrapped": [],
            "induced": False,
        }
        for name in names
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="callback_overhead_") as folder:
        for round_index in range(args.rounds):
            order = names if round_index % 2 == 0 else names[::-1]
            sequence: list[str | None] = [None]
            for name in order:
                sequence += [name, None]
            results: list[FitResult] = []
            for position, name in enumerate(sequence):
                fit_folder = os.path.join(folder, f"r{round_index}-{position}")
                callback, clock = None, None
                if name is not None:
                    entry = per_callback[name]
                    callback, clock = CALLBACKS[name](), entry["clock"]
                    entry["wrapped"] = instrument(callback, clock)
                    entry["induced"] = induces_module_cost(callback)
                result = fit(args, callback, clock, fit_folder)
                results.append(result)
                (baseline_fits if name is None else per_callback[name]["fits"]).append(result)
                print(
                    f"round {round_index} fit {position}: {name or 'baseline'} {result.s_per_iter:.3f} s/it, "
                    f"{statistics.median(result.kept):.0f} kept / {statistics.median(result.generated):.0f} "
                    f"generated tok/it, hooks {1000 * statistics.median(result.hooks):.2f} ms/it "
                    f"[{time.perf_counter() - started:.0f} s]",
                    file=sys.stderr,
                )
            for position in range(1, len(sequence), 2):
                entry = per_callback[sequence[position]]
                left, fitted, right = results[position - 1 : position + 2]
                entry["ratio"].append(fitted.s_per_iter / ((left.s_per_iter + right.s_per_iter) / 2))
                for kind in ("generated", "kept"):
                    paired = (left.s_per_ktok(kind) + right.s_per_ktok(kind)) / 2
                    entry[kind].append(fitted.s_per_ktok(kind) / paired)
            bases = results[::2]
            for index in range(1, len(bases) - 1):
                neighbours = (bases[index - 1].s_per_iter + bases[index + 1].s_per_iter) / 2
                noise.append(bases[index].s_per_iter / neighbours)
    report(args, names, baseline_fits, per_callback, noise)


def pooled(fits: list[FitResult], attribute: str) -> list[float]:
    return [value for result in fits for value in getattr(result, attribute)]


def report(
    args: argparse.Namespace,
    names: list[str],
    baseline_fits: list[FitResult],
    per_callback: dict[str, dict[str, Any]],
    noise: list[float],
) -> None:
    """The markdown table (stdout) and the hook time by method (stderr)."""
    base_seconds = pooled(baseline_fits, "seconds")
    base_iter = statistics.median(base_seconds)
    n = args.prompts * args.group
    print(
        f"\nN = {args.prompts} x {args.group} = {n} sequences, T <= {args.max_new_tokens}, "
        f"{args.updates} updates per rollout, {args.rounds} round(s) x {args.iterations - 1} timed iterations "
        f"per fit, torch threads {torch.get_num_threads()}; target <= {args.target:.0%} per callback. "
        "Ratios: median over rounds of C / mean of its two neighbouring baseline fits (min-max over rounds).\n"
    )
    print(
        "| callback | s/iter | tok/iter kept / generated | ratio vs baseline | s/1k generated tok ratio | "
        "s/1k kept tok ratio | hook ms/iter | hook % | basis | verdict |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    noise_level = statistics.median(abs(r - 1) for r in noise) if noise else None
    noise_text = "noise n/a" if noise_level is None else f"noise +/-{noise_level:.1%}"
    print(
        f"| baseline (GRPO) | {base_iter:.3f} | {statistics.median(pooled(baseline_fits, 'kept')):.0f} / "
        f"{statistics.median(pooled(baseline_fits, 'generated')):.0f} | 1.000 | 1.000 | 1.000 | - | - | - | "
        f"{noise_text} |"
    )
    details = []
    for name in names:
        entry = per_callback[name]
        fits = entry["fits"]
        ratio = statistics.median(entry["ratio"])
        generated = statistics.median(entry["generated"])
        kept = statistics.median(entry["kept"])
        hook = statistics.median(pooled(fits, "hooks"))
        hook_share = hook / base_iter
        if entry["induced"]:
            basis, overhead = "s/1k generated tok", generated - 1
        else:
            basis, overhead = "hook", hook_share
        verdict = f"{'ok' if overhead <= args.target else 'OVER'} ({overhead:+.1%})"
        if entry["induced"] and noise_level is not None and abs(overhead - args.target) < noise_level:
            verdict += ", within noise"
        print(
            f"| {name} | {statistics.median(pooled(fits, 'seconds')):.3f} | "
            f"{statistics.median(pooled(fits, 'kept')):.0f} / {statistics.median(pooled(fits, 'generated')):.0f} | "
            f"{ratio:.3f}{spread(entry['ratio'])} | {generated:.3f}{spread(entry['generated'])} | "
            f"{kept:.3f}{spread(entry['kept'])} | {1000 * hook:.2f} | {hook_share:.2%} | {basis} | {verdict} |"
        )
        clock = entry["clock"]
        parts = ", ".join(
            f"{method} {1000 * clock.by_method[method]:.1f} ms / {clock.calls[method]} calls"
            for method in entry["wrapped"]
            if clock.calls[method]
        )
        details.append(f"{name}: {parts or 'no timed call'}")
    print("\nHook time by method, summed over every fit of the callback (warm-up included):", file=sys.stderr)
    for line in details:
        print(f"  {line}", file=sys.stderr)


if __name__ == "__main__":
    main()
