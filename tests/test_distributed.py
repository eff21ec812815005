"""Data parallelism on CPU (gloo, 2 processes): DDP and FSDP2 fits equal a single-process fit of the same global
batch, batch-scope token selection picks the same tokens, and a sharded FSDP2 checkpoint resumes exactly.

Each run is ``tests/distributed_fit.py`` in a subprocess (Lightning relaunches it for rank 1). Rollouts are
scripted from (prompt, completion index, iteration), so the three layouts train on identical completions; the
single process reads the prompts in the order the two ranks' batches concatenate to. With Clip-Cov, KL-Cov
and high-entropy-token selection all at ``scope="batch"``, a selection made per rank instead of over the
global mini-batch would change the trained weights and these comparisons would fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_entropy.demo import build_char_tokenizer, build_tiny_causal_lm

WORKER = Path(__file__).with_name("distributed_fit.py")
RANKS, PER_RANK = 2, 4  # prompts per rank per iteration; the single process takes RANKS * PER_RANK
STEPS = 4  # optimizer steps: 2 RL iterations of 2 updates (ppo_epochs=2)
REGULARIZERS = ["clip_cov", "kl_cov", "high_entropy"]
IGNORED = {"train/tokens_per_sec"}  # wall-clock

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(vocab_size=len(tokenizer), hidden_size=32, num_heads=4, seed=0)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    # head size 32: the attention kernels of vLLM's CPU build have none for 8
    model = build_tiny_causal_lm(vocab_size=len(tokenizer), hidden_size=64, num_heads=2, seed=0)
    model.save_pretrained(root / "model_vllm")
    tokenizer.save_pretrained(root / "model_vllm")
    prompts = [f"{i}+{2 * i}=" for i in range(RANKS * PER_RANK * 2)]
    (root / "ranks.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    # DistributedSampler (no shuffle) gives rank r rows r, r+2, r+4, ...; batch j of the single process is the
    # concatenation of the ranks' batch j, in rank order
    order = [
        r + RANKS * (j * PER_RANK + i)
        for j in range(len(prompts) // (RANKS * PER_RANK))
        for r in range(RANKS)
        for i in range(PER_RANK)
    ]
    (root / "single.jsonl").write_text("".join(json.dumps({"prompt": prompts[i]}) + "\n" for i in order))
    return root


def _fit(
    workdir: Path,
    name: str,
    strategy: str,
    *extra: str,
    steps: int = STEPS,
    scripted: bool = True,
    model: str = "model",
) -> dict:
    out = workdir / name / "out.json"
    out.parent.mkdir(exist_ok=True)
    single = strategy == "single"
    command = [
        sys.executable,
        str(WORKER),
        "--model", str(workdir / model),
        "--prompts", str(workdir / ("single.jsonl" if single else "ranks.jsonl")),
        "--out", str(out),
        "--strategy", strategy,
        "--batch-size", str(RANKS * PER_RANK if single else PER_RANK),
        "--max-steps", str(steps),
        *(["--scripted"] if scripted else []),
        "--regularizers", *REGULARIZERS,
        *extra,
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    done = subprocess.run(command, cwd=workdir / name, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(
            f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        )
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(workdir):
    return _fit(workdir, "single", "single")


@pytest.fixture(scope="module")
def ddp(workdir):
    return _fit(workdir, "ddp", "ddp")


@pytest.fixture(scope="module")
def fsdp2(workdir):
    return _fit(workdir, "fsdp2", "fsdp2", "--ckpt-dir", str(workdir / "fsdp2" / "checkpoints"))


def _assert_same_run(got: dict, want: dict, atol: float = 2e-5) -> None:
    assert len(got["steps"]) == len(want["steps"]) == STEPS // 2
    for index, (g, w) in enumerate(zip(got["steps"], want["steps"], strict=True)):
        assert set(g) == set(w)
        for key in sorted(set(w) - IGNORED):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=atol), f"iteration {index}: {key}"
    assert got["weights"].keys() == want["weights"].keys() and len(want["weights"]) > 0
    worst = max(
        abs(a - b) for name in want["weights"] for a, b in zip(got["weights"][name], want["weights"][name])
    )
    assert worst < atol, f"LoRA weights differ by {worst}"


def _moved(run: dict) -> float:
    """Largest LoRA B entry: 0 at initialisation, so > 0 shows training happened."""
    return max(abs(v) for name, values in run["weights"].items() if "lora_B" in name for v in values)


def test_the_runs_train_and_select_tokens(single):
    assert _moved(single) > 1e-3
    for step in single["steps"]:
        assert step["train/loss"] != 0.0
        assert step["reg/ClipCov/selected_frac"] > 0 and step["reg/KLCov/selected_frac"] > 0
        assert 0 < step["reg/HighEntropyTokens/selected_frac"] < 1


def test_ddp_matches_single_process(single, ddp):
    _assert_same_run(ddp, single)


def test_fsdp2_matches_single_process(single, fsdp2):
    _assert_same_run(fsdp2, single)


def test_fsdp2_sharded_checkpoint_resumes_and_continues(workdir, fsdp2):
    checkpoints = workdir / "fsdp2" / "checkpoints"
    first = checkpoints / "epoch=0-step=2.ckpt"  # after the first RL iteration
    assert first.is_dir(), sorted(p.name for p in checkpoints.iterdir())  # a distributed (sharded) checkpoint
    assert any(first.glob("*.distcp")), sorted(p.name for p in first.iterdir())
    resumed = _fit(workdir, "fsdp2_resumed", "fsdp2", "--resume", str(first))
    assert len(resumed["steps"]) == 1  # only the second iteration ran
    second = fsdp2["steps"][1]
    for key in sorted(set(second) - IGNORED):
        assert resumed["steps"][0][key] == pytest.approx(second[key], rel=1e-5, abs=1e-6), key
    worst = max(
        abs(a - b)
        for name in fsdp2["weights"]
        for a, b in zip(resumed["weights"][name], fsdp2["weights"][name])
    )
    assert worst < 1e-6


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_dynamic_sampling_keeps_the_ranks_in_step_when_one_rank_draws_more_rounds(workdir, strategy):
    # Rank 0 reads the prompts with even i, which carry no signal, and must draw more; rank 1 reads the odd ones
    # and has its groups at once, yet takes part in every round's count (and, sharded, in every generation).
    # A rank leaving the loop early would hang the next collective. FSDP2 samples for real (sharded generate).
    run = _fit(
        workdir,
        f"dynamic_{strategy}",
        strategy,
        "--dynamic-rounds", "8",
        "--reward", "odd_prompt_digit_reward",
        scripted=strategy == "ddp",
    )  # fmt: skip
    assert len(run["steps"]) == STEPS // 2
    for step in run["steps"]:
        assert step["rollout/frac_zero_std"] == 0.0  # over both ranks' kept groups
        assert step["rollout/dynamic_short"] == 0.0
        assert step["rollout/dynamic_rounds"] > 1
        # rank 0 samples 4 prompts in each round; rank 1 its 4 once, or (sharded) 4 in each round as well
        rank_1 = PER_RANK * (step["rollout/dynamic_rounds"] if strategy == "fsdp2" else 1)
        assert step["rollout/dynamic_prompts"] == PER_RANK * step["rollout/dynamic_rounds"] + rank_1


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_engine_under_ddp_samples_each_ranks_prompts_from_the_updated_adapters(workdir):
    # one engine per rank (its own, outside the trainer's process group), given the adapters after every update:
    # the engine's log-probs equal the trainer's on both ranks in both iterations (the second after 2 updates)
    run = _fit(workdir, "vllm_ddp", "ddp", "--engine", "vllm", scripted=False, model="model_vllm")
    assert len(run["steps"]) == STEPS // 2
    for step in run["steps"]:
        assert step["rollout/sampler_logprob_diff_max"] < 1e-4  # the largest over both ranks
        assert step["rollout/completion_length"] > 0
