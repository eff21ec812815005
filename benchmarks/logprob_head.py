"""Peak memory and time of the log-prob/entropy head: chunked from the hidden states against the naive path.

What is measured: one forward AND backward of the sampled-token log-probs and the full-vocabulary entropy of a
frozen output head (``nn.Linear(H, V, bias=False)``, frozen as under LoRA), from final hidden states
``[N, T, H]`` (which require grad) down to ``hidden.grad``. The loss uses both outputs,
``(logprobs * a).sum() + (entropy * b).sum()`` with random ``a, b`` fixed per configuration. Three methods:

- ``naive`` (what TRL/verl do without special kernels): ``logits = head(hidden)`` ``[N, T, V]`` in the model
  dtype, ``.float() / temperature``, ``log_softmax``, gather the token, ``entropy = -(softmax * log_softmax)``
  summed over the vocabulary; autograd keeps several fp32 ``[N, T, V]`` tensors.
- ``logits+chunked``: our previous path, ``logprobs.token_logprobs_and_entropy(head(hidden), ...)``: the fp32
  work is chunk-checkpointed, but the ``[N, T, V]`` logits (and their gradient) still exist in the model dtype.
- ``ours``: ``head.head_logprobs_and_entropy(hidden, head, tokens, ...)``: never holds ``[N, T, V]``.

How: every (method, configuration) runs in a fresh subprocess (this script re-invoked with ``--worker``) that
prints one JSON line back, so each peak belongs to one measurement. Inputs (hidden, head weight, tokens, a, b)
are allocated first, in place (no temporaries). Peak memory is the *extra* over what was allocated right before
the measured call:

- CUDA: ``torch.cuda.reset_peak_memory_stats()``, then ``max_memory_allocated() - memory_allocated()`` (taken
  just before the call). A tiny warm-up call first (cuBLAS handles and workspaces), which does not count.
- CPU: peak RSS over the RSS right before the call. The kernel's high-water mark (``VmHWM``) is reset by writing
  ``5`` to ``/proc/self/clear_refs`` just before the call; where that is not allowed, ``ru_maxrss`` is used
  (a lifetime peak: still valid since the inputs are built without temporaries). No warm-up on CPU: memory that
  glibc kept from a warm-up would be reused without growing the RSS and hide part of the peak.

The first call measures memory; then ``--repeats`` more calls are timed (``cuda.synchronize`` around each) and
the median seconds of forward+backward is reported. Before launching a worker, its memory is estimated and the
run is skipped (``skipped: needs ~X GB > available Y GB``) when it exceeds 80% of the available memory (host RAM
on CPU, free GPU memory on CUDA), so a 16,384-token naive run on a 24 GB CPU box is not OOM-killed. For a
skipped naive run the table shows the size of the naive logits alone (``N*T*V`` in the model dtype), a LOWER
BOUND of the naive peak, and ours over that bound (so an upper bound of the real ratio). ``--no-skip`` runs
everything anyway (fine on CUDA, where an out-of-memory only fails that worker; the estimate is conservative).

Correctness: before the timings, a small check in its own subprocess (``N*T = 256``, the first ``--hidden``,
the full ``--vocab``; ``ours`` in several chunks) compares ``ours`` and ``logits+chunked`` with ``naive`` in the
benchmark dtype: max |logprob diff|, max |entropy diff| and the max |hidden.grad diff| over max |hidden.grad|.
It fails the script when they are not close.

Targets: the extra peak memory of ``ours`` at most 15% of ``naive``'s, its forward+backward time at most
1.2x ``naive``'s, for V = 151,936, H in {896, 1536}, N*T in {4096, 16384} (4 and 16 sequences of 1,024 tokens).
``--smollm2`` measures SmolLM2-135M's head instead: V = 49,152, H = 576, the head's weight tied to the input
embedding (``--tied``: one frozen Parameter shared by an ``nn.Embedding`` and the ``nn.Linear``), 1,024 to
16,384 rows; the rows are flattened, so only N*T matters, not how it splits into N and T. Memory is in GB (1e9
bytes). Default dtype: bfloat16 on CUDA, float32 on CPU (a CPU bf16 matmul is slow and
unrepresentative).

Usage:

    .venv/bin/python benchmarks/logprob_head.py                          # the issue's configurations
    .venv/bin/python benchmarks/logprob_head.py --device cpu --threads 2 --repeats 2
    .venv/bin/python benchmarks/logprob_head.py --hidden 896 --tokens 4096 --methods naive ours
    .venv/bin/python benchmarks/logprob_head.py --no-skip                # CUDA: try naive at 16,384 tokens
    .venv/bin/python benchmarks/logprob_head.py --smollm2 --device cpu --threads 1   # V=49,152, H=576, tied head
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/logprob_head.py --quick --threads 1   # smoke run, tiny sizes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from rss import peak_rss, reset_peak_rss, rss_bytes  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from torch import Tensor, nn  # noqa: E402

from lit_entropy.head import default_chunk_size, head_logprobs_and_entropy  # noqa: E402
from lit_entropy.logprobs import token_logprobs_and_entropy  # noqa: E402

METHODS = ("naive", "logits+chunked", "ours")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GB = 1e9
MEMORY_TARGET = 0.15  # ours' extra peak over naive's
TIME_TARGET = 1.2  # ours' seconds over naive's
RESULT_PREFIX = "RESULT "
CHECK_TOKENS = 256
# (logprob/entropy max abs diff, hidden.grad max diff over max |grad|) allowed by the correctness check
TOLERANCES = {torch.float32: (2e-3, 2e-3), torch.bfloat16: (0.1, 0.05), torch.float16: (0.05, 0.02)}

# --------------------------------------------------------------------------------------------- methods


def naive(
    hidden: Tensor, head: nn.Linear, tokens: Tensor, temperature: float, **_: Any
) -> tuple[Tensor, Tensor]:
    """What TRL/verl do without special kernels: full ``[N, T, V]`` logits, fp32 softmax and log-softmax."""
    logits = head(hidden)  # [N, T, V] model dtype
    z = logits.float() / temperature  # [N, T, V] fp32
    logp = torch.log_softmax(z, dim=-1)
    logprobs = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [N, T]
    entropy = -(torch.softmax(z, dim=-1) * logp).sum(-1)  # [N, T]
    return logprobs, entropy


def logits_chunked(
    hidden: Tensor, head: nn.Linear, tokens: Tensor, temperature: float, legacy_chunk_size: int, **_: Any
) -> tuple[Tensor, Tensor]:
    """Our previous path: full logits in the model dtype, then the chunk-checkpointed fp32 reduction."""
    return token_logprobs_and_entropy(head(hidden), tokens, temperature, chunk_size=legacy_chunk_size)


def ours(
    hidden: Tensor, head: nn.Linear, tokens: Tensor, temperature: float, chunk_size: int | None, **_: Any
) -> tuple[Tensor, Tensor]:
    """Chunked from the hidden states: no ``[N, T, V]`` tensor."""
    return head_logprobs_and_entropy(hidden, head, tokens, temperature, chunk_size=chunk_size)


METHOD_FNS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "naive": naive,
    "logits+chunked": logits_chunked,
    "ours": ours,
}

# --------------------------------------------------------------------------------------------- worker side


def make_inputs(
    n: int,
    t: int,
    h: int,
    v: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    tied: bool = False,
) -> tuple[Tensor, nn.Linear, Tensor, Tensor, Tensor]:
    """``hidden [N, T, H]`` (requires grad), a frozen ``nn.Linear(H, V)``, ``tokens``, ``a``, ``b``; in place.

    ``tied``: the head's weight is an ``nn.Embedding``'s (one Parameter, as in SmolLM2 or Qwen2.5-0.5B with
    ``tie_word_embeddings``), frozen as under LoRA; the embedding is kept alive as ``head.tied_embedding``.
    """
    torch.manual_seed(seed)
    head = nn.Linear(h, v, bias=False, device="meta")
    # logits of std ~3: a peaked distribution, as a trained LM's, rather than near-uniform
    weight = torch.empty(v, h, dtype=dtype, device=device).normal_(0.0, 3.0 / h**0.5)
    head.weight = nn.Parameter(weight, requires_grad=False)
    if tied:
        embedding = nn.Embedding(v, h, device="meta")
        embedding.weight = head.weight  # the same Parameter: a tied input/output embedding
        head.tied_embedding = embedding
    hidden = torch.empty(n, t, h, dtype=dtype, device=device).normal_().requires_grad_()
    tokens = torch.randint(0, v, (n, t), device=device)
    a = torch.empty(n, t, dtype=torch.float32, device=device).normal_()
    b = torch.empty(n, t, dtype=torch.float32, device=device).normal_()
    return hidden, head, tokens, a, b


def step(
    method: str, hidden: Tensor, head: nn.Linear, tokens: Tensor, a: Tensor, b: Tensor, **kwargs: Any
) -> tuple[Tensor, Tensor]:
    """One forward and backward of ``method`` down to ``hidden.grad``; returns the detached outputs."""
    hidden.grad = None
    logprobs, entropy = METHOD_FNS[method](hidden, head, tokens, **kwargs)
    ((logprobs * a).sum() + (entropy * b).sum()).backward()
    return logprobs.detach(), entropy.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Worker: extra peak memory of the first call, then the median seconds of ``--repeats`` timed calls."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    hidden, head, tokens, a, b = make_inputs(
        args.n, args.t, args.h, args.vocab, dtype, device, args.seed, tied=args.tied
    )
    kwargs = {
        "temperature": args.temperature,
        "chunk_size": args.chunk_size,
        "legacy_chunk_size": args.legacy_chunk_size,
    }
    if device.type == "cuda":  # cuBLAS handles and workspaces: allocated once, not part of the method's peak
        small = hidden[:1, : min(args.t, 32)].detach().requires_grad_()
        step(args.method, small, head, tokens[:1, : min(args.t, 32)], a[:1, :32], b[:1, :32], **kwargs)
        del small
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(args.method, hidden, head, tokens, a, b, **kwargs)
        _sync(device)
        peak, peak_source = torch.cuda.max_memory_allocated(device) - before, "cuda max_memory_allocated"
    else:
        hwm = reset_peak_rss()
        before = rss_bytes()
        step(args.method, hidden, head, tokens, a, b, **kwargs)
        peak, peak_source = peak_rss() - before, "VmHWM" if hwm else "ru_maxrss"
    seconds = []
    for _ in range(args.repeats):
        _sync(device)
        started = time.perf_counter()
        step(args.method, hidden, head, tokens, a, b, **kwargs)
        _sync(device)
        seconds.append(time.perf_counter() - started)
    return {
        "peak_bytes": int(peak),
        "peak_source": peak_source,
        "seconds": seconds,
        "median_s": statistics.median(seconds) if seconds else None,
    }


def _max_abs(x: Tensor, y: Tensor) -> float:
    return float((x.float() - y.float()).abs().max())


def check(args: argparse.Namespace) -> dict[str, Any]:
    """Worker: a small correctness check of every method against ``naive``, plus the machine's description."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    info: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        free, total = torch.cuda.mem_get_info(device)
        info["free_bytes"], info["total_bytes"] = int(free), int(total)
    else:
        info["device"] = platform.processor() or platform.machine()
    if args.no_check:
        return info
    # several chunks for ``ours`` even at this size, unless --chunk-size says otherwise
    chunk = args.chunk_size or min(default_chunk_size(args.vocab), CHECK_TOKENS // 3)
    hidden, head, tokens, a, b = make_inputs(
        1, CHECK_TOKENS, args.h, args.vocab, dtype, device, args.seed, tied=args.tied
    )
    kwargs = {
        "temperature": args.temperature,
        "chunk_size": chunk,
        "legacy_chunk_size": args.legacy_chunk_size,
    }
    results = {}
    for method in METHODS:
        lp, ent = step(method, hidden, head, tokens, a, b, **kwargs)
        results[method] = (lp, ent, hidden.grad.clone())
    ref_lp, ref_ent, ref_grad = results["naive"]
    info["check"] = {
        method: {
            "logprob": _max_abs(lp, ref_lp),
            "entropy": _max_abs(ent, ref_ent),
            "grad_rel": _max_abs(grad, ref_grad) / max(float(ref_grad.float().abs().max()), 1e-30),
        }
        for method, (lp, ent, grad) in results.items()
        if method != "naive"
    }
    info["check_config"] = f"N*T={CHECK_TOKENS}, H={args.h}, V={args.vocab}, {args.dtype}, ours chunk={chunk}"
    info["tolerances"] = TOLERANCES[dtype]
    return info


def worker(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = check(args) if args.check else measure(args)
    print(RESULT_PREFIX + json.dumps(out), flush=True)


# --------------------------------------------------------------------------------------------- parent side


def available_host_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell the available memory (install psutil)")


def estimate_bytes(
    method: str, n: int, t: int, h: int, v: int, dtype: torch.dtype, args: argparse.Namespace
) -> int:
    """Rough peak of a worker: its inputs plus the method's extra (generous, it only guards against OOM)."""
    item = torch.empty((), dtype=dtype).element_size()
    rows = n * t
    inputs = v * h * item + 2 * rows * h * item
    if method == "naive":
        # logits and their gradient in the model dtype, at most about five fp32 [N*T, V] tensors at the peak
        # (measured on CPU in fp32: ~5.3 [N*T, V] fp32 tensors in all)
        extra = rows * v * (2 * item + 5 * 4)
    elif method == "logits+chunked":
        extra = rows * v * 2 * item + min(rows, args.legacy_chunk_size) * v * 6 * 4
    else:
        chunk = args.chunk_size or default_chunk_size(v)
        extra = min(rows, chunk) * v * 6 * 4 + rows * h * 4 * 4
    return int(1.1 * (inputs + extra))


def run_worker(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--worker", *extra]
    command += ["--vocab", str(args.vocab), "--dtype", args.dtype, "--device", args.device]
    command += ["--temperature", str(args.temperature), "--seed", str(args.seed)]
    command += ["--legacy-chunk-size", str(args.legacy_chunk_size)]
    if args.tied:
        command.append("--tied")
    if args.chunk_size:
        command += ["--chunk-size", str(args.chunk_size)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    if proc.returncode == -9:
        return {"error": "killed (SIGKILL: out of memory?)"}
    tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    if "OutOfMemoryError" in proc.stderr:
        tail = "CUDA out of memory"
    return {"error": tail[:200]}


def fmt_gb(nbytes: float) -> str:
    return f"{nbytes / GB:.3f} GB" if nbytes < 10 * GB else f"{nbytes / GB:.1f} GB"


def verdict(mem_ratio: float | None, time_ratio: float | None, mem_is_bound: bool) -> str:
    parts = []
    if mem_ratio is None:
        parts.append("memory n/a")
    else:
        ok = "PASS" if mem_ratio <= MEMORY_TARGET else ("not decided" if mem_is_bound else "FAIL")
        bound = " (vs naive lower bound)" if mem_is_bound else ""
        parts.append(f"memory {ok}{bound}")
    if time_ratio is None:
        parts.append("time n/a")
    else:
        parts.append(f"time {'PASS' if time_ratio <= TIME_TARGET else 'FAIL'}")
    return ", ".join(parts)


def table(rows: list[dict[str, Any]], args: argparse.Namespace, dtype: torch.dtype) -> str:
    item = torch.empty((), dtype=dtype).element_size()
    lines = [
        "| config | method | peak extra memory | ratio vs naive | s fwd+bwd | ratio vs naive | verdict vs targets |",
        "|---|---|---|---|---|---|---|",
    ]
    configs: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        configs.setdefault(row["config"], []).append(row)
    for config, group in configs.items():
        base = next((r for r in group if r["method"] == "naive"), None)
        base_ok = base is not None and "peak_bytes" in base
        for row in group:
            cells = [config, row["method"]]
            if "peak_bytes" not in row:
                note = row.get("skipped") or row.get("error", "?")
                if row["method"] == "naive":
                    logits = row["n"] * row["t"] * args.vocab * item
                    note += f"; naive logits alone {fmt_gb(logits)} (LOWER BOUND of naive)"
                lines.append("| " + " | ".join([*cells, note, "", "", "", ""]) + " |")
                continue
            mem_ratio = time_ratio = None
            mem_is_bound = False
            mem_cell = time_cell = ""
            if row["method"] == "naive":
                mem_cell = time_cell = "1.00"
            elif base_ok:
                mem_ratio = row["peak_bytes"] / max(base["peak_bytes"], 1)
                mem_cell = f"{100 * mem_ratio:.1f}%"
                if row["median_s"] is not None and base["median_s"]:
                    time_ratio = row["median_s"] / base["median_s"]
                    time_cell = f"{time_ratio:.2f}x"
            elif base is not None:  # naive skipped or failed: compare with its logits alone
                mem_ratio = row["peak_bytes"] / (row["n"] * row["t"] * args.vocab * item)
                mem_is_bound = True
                mem_cell = f"<= {100 * mem_ratio:.1f}% (vs naive logits alone, a lower bound)"
            seconds = f"{row['median_s']:.3f}" if row["median_s"] is not None else "n/a"
            result = "baseline" if row["method"] == "naive" else verdict(mem_ratio, time_ratio, mem_is_bound)
            cells += [fmt_gb(row["peak_bytes"]), mem_cell, seconds, time_cell, result]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=None, help="V (default 151,936; --quick: 32,000)")
    parser.add_argument("--hidden", type=int, nargs="+", default=None, help="H values (default 896 1536)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="N*T values (default 4096 16384)")
    parser.add_argument("--seq-len", type=int, default=None, help="T; N = tokens / T (default 1024)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 2 on CPU, 5 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk of ours (default: auto)")
    parser.add_argument(
        "--legacy-chunk-size", type=int, default=4096, help="chunk of logits+chunked (its default: 4096)"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per worker before giving up")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: V=32000, H=256, 512 tokens (2 x 256), ours chunk 128"
    )
    parser.add_argument(
        "--no-skip",
        action="store_true",
        help="run every worker even when its memory estimate exceeds 80%% of the available memory "
        "(harmless on CUDA, where an OOM only fails that worker; dangerous on CPU)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the small correctness check")
    parser.add_argument(
        "--tied",
        action="store_true",
        help="the head's weight is a (frozen) nn.Embedding's: tied input/output embeddings",
    )
    parser.add_argument(
        "--smollm2",
        action="store_true",
        help="SmolLM2-135M's head: V=49,152, H=576, tied; N*T in {1024, 4096, 16384} rows (T=1024)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--t", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--h", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    if args.smollm2:
        args.tied = True
        args.vocab = args.vocab or 49_152
        args.hidden = args.hidden or [576]
        args.tokens = args.tokens or [1024, 4096, 16384]
    args.vocab = args.vocab or (32_000 if quick else 151_936)
    args.hidden = args.hidden or ([256] if quick else [896, 1536])
    args.tokens = args.tokens or ([512] if quick else [4096, 16384])
    args.seq_len = args.seq_len or (256 if quick else 1024)
    args.chunk_size = args.chunk_size or (128 if quick else None)  # several chunks even at the quick size
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats if args.repeats is not None else (5 if cuda else 2)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    dtype = DTYPES[args.dtype]
    cuda = torch.device(args.device).type == "cuda"
    bad = [tokens for tokens in args.tokens if tokens % args.seq_len]
    if bad:
        raise SystemExit(f"--tokens {bad} are not multiples of --seq-len {args.seq_len}")

    info = run_worker(
        args, ["--check", "--h", str(args.hidden[0])] + (["--no-check"] if args.no_check else [])
    )
    if "error" in info:
        raise SystemExit(f"check worker failed: {info['error']}")
    print(f"# logprob_head benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"torch {info['torch']}, {platform.python_implementation()} {platform.python_version()}, "
        f"device {args.device} ({info['device']}), {os.cpu_count()} CPUs, {info['threads']} torch threads, "
        f"dtype {args.dtype}, V={args.vocab}, T={args.seq_len}, temperature {args.temperature}, "
        f"ours chunk {args.chunk_size or default_chunk_size(args.vocab)} rows, "
        f"logits+chunked chunk {args.legacy_chunk_size} rows, {args.repeats} timed repeats (median), "
        f"head {'tied to the input embedding' if args.tied else 'untied'}"
    )
    if "check" in info:
        atol, rtol = info["tolerances"]
        print(f"\ncorrectness vs naive ({info['check_config']}; tolerances {atol} abs, {rtol} grad rel):")
        failed = []
        for method, diffs in info["check"].items():
            print(
                f"  {method}: max|logprob diff| {diffs['logprob']:.2e}, max|entropy diff| {diffs['entropy']:.2e}, "
                f"max|grad diff|/max|grad| {diffs['grad_rel']:.2e}"
            )
            if not (diffs["logprob"] <= atol and diffs["entropy"] <= atol and diffs["grad_rel"] <= rtol):
                failed.append(method)
        if failed:
            raise SystemExit(f"correctness check FAILED for {failed}")
    print()

    rows = []
    for h in args.hidden:
        for tokens in args.tokens:
            n, t = tokens // args.seq_len, args.seq_len
            config = f"H={h}, N*T={n}x{t}"
            for method in args.methods:
                available = 0.8 * (info["free_bytes"] if cuda else available_host_bytes())
                need = estimate_bytes(method, n, t, h, args.vocab, dtype, args)
                row: dict[str, Any] = {"config": config, "method": method, "n": n, "t": t}
                if need > available and not args.no_skip:
                    row["skipped"] = f"skipped: needs ~{fmt_gb(need)} > available {fmt_gb(available)}"
                    print(f"{config} {method}: {row['skipped']}", flush=True)
                else:
                    print(f"{config} {method}: running (needs ~{fmt_gb(need)}) ...", end=" ", flush=True)
                    extra = ["--method", method, "--n", str(n), "--t", str(t), "--h", str(h)]
                    row.update(run_worker(args, extra + ["--repeats", str(args.repeats)]))
                    if "error" in row:
                        print(f"failed: {row['error']}", flush=True)
                    else:
                        times = ", ".join(f"{x:.3f}" for x in row["seconds"]) or "not timed"
                        print(
                            f"peak +{fmt_gb(row['peak_bytes'])} ({row['peak_source']}), s: {times}",
                            flush=True,
                        )
                rows.append(row)
    print(
        f"\ntargets: ours' extra peak memory <= {100 * MEMORY_TARGET:.0f}% of naive's, "
        f"ours' fwd+bwd time <= {TIME_TARGET}x naive's\n"
    )
    print(table(rows, args, dtype))


if __name__ == "__main__":
    main()
