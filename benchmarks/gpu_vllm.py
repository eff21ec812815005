"""GPU: QLoRA RL iterations with each rollout engine, ours against TRL's GRPOTrainer, on random-weight Qwen2.5 models.

Nothing is downloaded: each model folder is built from the architecture of Qwen2.5-0.5B / Qwen2.5-1.5B (their
published ``config.json`` values, below) with random weights and the project's character tokenizer (the prompts
are countdown problems; a random model rarely samples EOS, so completions run to ``--max-new-tokens``). For each
model and engine (``hf``: transformers ``generate``; ``vllm``: colocated vLLM, ours ``sampling.engine: vllm``,
TRL ``use_vllm`` with ``vllm_mode="colocate"``), ``benchmarks/vs_trl.py`` runs both sides in fresh processes:
4-bit nf4 base, bf16 compute, LoRA r=16 on every linear layer, 8 prompts x G = 8 completions x 512 tokens, one
update per rollout. Prints one table: seconds per iteration, sampled tokens per second, peak GPU memory, and the
ratios (vllm / hf on our side; ours / TRL for each engine). Sized for under 8 minutes on one H200:

    .venv/bin/python benchmarks/gpu_vllm.py            # both models
    .venv/bin/python benchmarks/gpu_vllm.py --smoke    # CPU: a tiny model, 16 tokens, to check the plumbing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

#: The architecture fields of the published Qwen2.5 configs (random weights; nothing is downloaded).
QWEN25 = {
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        vocab_size=151936,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        vocab_size=151936,
    ),
    # --smoke: head size 64 (vLLM's CPU attention has kernels for it)
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        vocab_size=128,
    ),
}


def build(name: str, folder: str) -> str:
    """A folder with a random-weight Qwen2 of ``name``'s architecture (bf16) and the character tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lit_entropy.demo import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    path = os.path.join(folder, name)
    config = Qwen2Config(
        **QWEN25[name],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(path: str, engine: str, args: argparse.Namespace) -> str:
    """``vs_trl.py`` for one model and engine; returns its report."""
    command = [
        sys.executable,
        os.path.join(HERE, "vs_trl.py"),
        "--model-path",
        path,
        "--engine",
        engine,
        "--device",
        "cpu" if args.smoke else "cuda",
        "--dtype",
        "float32" if args.smoke else "bfloat16",
        "--prompts",
        "8",
        "--group",
        "8",
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--minibatch",
        "64",
        "--microbatch",
        str(args.microbatch),
        "--iterations",
        str(args.iterations),
        "--rounds",
        "1",
        "--lr",
        "1e-5",
    ]
    if not args.smoke:
        command.append("--quantize")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        # the sides that finished before the failure report a "round ..." line each; then the failure's tail
        finished = [line for line in done.stderr.splitlines() if line.startswith("round ")]
        failed = [line for line in done.stderr.splitlines() if "worker failed" in line]
        tail = (done.stdout + done.stderr)[-1500:]
        return f"{engine}: failed after {seconds:.0f} s (exit {done.returncode}):\n" + "\n".join(
            [*finished, *failed, tail]
        )
    return f"{engine} ({seconds:.0f} s):\n{done.stdout.strip()}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-1.5b"], choices=sorted(QWEN25)
    )
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--microbatch", type=int, default=16, help="sequences per forward/backward")
    parser.add_argument(
        "--iterations", type=int, default=2, help="timed RL iterations per side (after 1 warm-up)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, the tiny model, 16 tokens: checks the plumbing"
    )
    parser.add_argument("--out", default=None, help="also write the reports to this JSON file")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.max_new_tokens, args.microbatch, args.iterations = ["tiny"], 16, 64, 1
    reports: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_vllm_") as folder:
        for name in args.models:
            path = build(name, folder)
            reports[name] = {}
            for engine in args.engines:
                report = run(path, engine, args)
                reports[name][engine] = report
                print(f"== {name}, rollouts {report}\n", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            json.dump(reports, file, indent=2)


if __name__ == "__main__":
    main()
