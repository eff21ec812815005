"""What bitsandbytes' AVX512-BF16 weight repack does to an RL step's log-probs on the CPU, and what it saves.

lit_entropy keeps the repack off (``lit_entropy.quantization.keep_cpu_weights_unpacked``). This script turns it
back on, on a CPU that has AVX512-BF16, to measure side by side in one run, on the same 4-bit model and tokens:

- the log-probs of the sampled tokens that the no-grad passes (generation, old log-probs) would compute with the
  repacked bf16 kernel, against those of the training forward (bitsandbytes' dequantize-then-matmul path);
- the time of one no-grad forward on each path.

Run (needs a CPU with AVX512-BF16; elsewhere the repacked kernel does not exist and the script says so):

    python benchmarks/cpu_4bit_repack.py --model-path .cache/models/SmolLM2-135M-Instruct
    python benchmarks/cpu_4bit_repack.py --width 128
"""

from __future__ import annotations

import argparse
import time

import torch


def _logprobs(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=ids).logits[:, :-1].float()  # [1, T-1, V]
    return logits, logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def _time(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        model(input_ids=ids)
        start = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", help="a model folder; default: a random llama of --width")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    from lit_entropy.demo import build_char_tokenizer, build_tiny_causal_lm
    from lit_entropy.model import LoRA, Policy, Quantization, load_policy
    from lit_entropy.quantization import is_cpu_repacked

    if not has_avx512bf16():
        print("this CPU has no AVX512-BF16: bitsandbytes never repacks here, so there is nothing to compare")
        return
    path = args.model_path
    if path is None:
        import tempfile

        path = tempfile.mkdtemp()
        tokenizer = build_char_tokenizer()
        build_tiny_causal_lm(
            len(tokenizer), hidden_size=args.width, num_layers=2, model_type="llama"
        ).save_pretrained(path)
        tokenizer.save_pretrained(path)
    policy = Policy(path=path, lora=LoRA(r=8), quantization=Quantization(compute_dtype="float32"))
    model, _ = load_policy(policy)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0))

    model.train()
    with torch.no_grad():  # train mode: the path every phase takes in lit_entropy
        train_logits, train_lp = _logprobs(model, ids)
    unpacked_s = _time(model.eval(), ids, args.repeats)

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:  # what bitsandbytes does by default on this CPU
        layer.support_avx512bf16_for_cpu = True
    model.eval()
    with torch.no_grad():
        packed_logits, packed_lp = _logprobs(model, ids)
    assert is_cpu_repacked(model)
    packed_s = _time(model, ids, args.repeats)

    delta_lp = (packed_lp - train_lp).abs()
    ratio = torch.exp(packed_lp - train_lp)  # the on-policy ratio the repack would produce (should be 1)
    print(f"model: {path}  4-bit layers: {len(layers)}  tokens: {args.tokens}  threads: {args.threads}")
    print(f"max |delta logit|            {(packed_logits - train_logits).abs().max().item():.3e}")
    print(f"max |delta log-prob|         {delta_lp.max().item():.3e}  mean {delta_lp.mean().item():.3e}")
    print(f"on-policy ratio range        [{ratio.min().item():.4f}, {ratio.max().item():.4f}]")
    print(f"no-grad forward, unpacked    {unpacked_s * 1e3:.1f} ms")
    print(f"no-grad forward, repacked    {packed_s * 1e3:.1f} ms  ({packed_s / unpacked_s:.2f}x)")


if __name__ == "__main__":
    main()
