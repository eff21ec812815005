"""The policy: a Hugging Face causal LM, optionally 4-bit quantized, trained through LoRA adapters.

The reference policy of the KL term is the same base model with its adapters switched off
(:func:`reference_context`), so it costs no second copy of the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import numbers
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lit_entropy.checkpoint_state import trainable_by_name
from lit_entropy.console import no_transformers_progress_bars
from lit_entropy.errors import ConfigError, ModelLoadError, check_choice, one_line
from lit_entropy.quantization import (
    DType,
    Quantization,
    QuantType,
    bits_and_bytes_config,
    keep_cpu_weights_unpacked,
)
from lit_entropy.tokenizer import load_tokenizer

if TYPE_CHECKING:
    # The demo's tiny model, behind `Policy.embedded`; the demo imports the core, never the reverse at run time
    # (jsonargparse reads this block to resolve the field's type, and `load_policy` imports the builder lazily).
    from lit_entropy.demo.embedded import EmbeddedModel

log = logging.getLogger(__name__)


@dataclass
class LoRA:
    """Low-rank adapters (peft) on the policy's linear layers.

    Attributes:
        r: Rank of each adapter (>= 1).
        alpha: Scaling numerator; the adapter output is multiplied by ``alpha / r``.
        dropout: Dropout probability on the adapter input, in [0, 1).
        target_modules: Module names to adapt, or ``"all-linear"`` for every linear layer but the output head.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


@dataclass
class Policy:
    """Where the policy comes from and how it is trained.

    Attributes:
        path: Local folder with ``config.json``, the weights and the tokenizer files, or a ``.gguf`` file
            (config, tokenizer and weights in one file, dequantized while loading; needs ``lit-entropy[gguf]``).
        tokenizer_path: Folder of the tokenizer; default: ``path``.
        dtype: Dtype of the weights that are not quantized.
        quantization: Load the base weights in 4 bits; requires ``lora``.
        lora: Adapters to train; None trains every parameter (full fine-tuning).
        gradient_checkpointing: Recompute activations in the backward pass (non-reentrant) to save memory.
        trust_remote_code: Allow model and tokenizer folders that ship their own Python code (off by default:
            with it on, the ``.py`` files named by the folder's ``auto_map`` are imported and run).
        embedded: Build the embedded tiny model (and warm it up) instead of loading ``path``.
        adapter_path: A saved peft adapter folder (what ``fit`` exports to ``<log_dir>/adapter``) to start from
            instead of fresh adapters: ``fit`` continues training it, ``validate`` / ``test`` / ``predict``
            evaluate it. Its own ``adapter_config.json`` sets rank, alpha and target modules (``lora``'s values
            that differ are reported and ignored); needs ``lora`` set.
    """

    path: str | None = None
    tokenizer_path: str | None = None
    dtype: DType = "float32"
    quantization: Quantization | None = None
    lora: LoRA | None = field(default_factory=LoRA)
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    embedded: EmbeddedModel | None = None
    adapter_path: str | None = None

    def validate(self) -> None:
        """Check the settings alone: no file is read (`check_files` looks at the folders).

        Raises:
            ConfigError: A value is missing, out of range or inconsistent; the message names the field.
        """
        if self.embedded is not None and self.path is not None:
            raise ConfigError("set either policy.path or policy.embedded, not both")
        if self.embedded is not None:
            self.embedded.validate()
        elif self.path is None:
            raise ConfigError(
                "policy.path is required: a local folder with config.json, the weights and tokenizer files "
                "(or policy.embedded for the built-in tiny model)"
            )
        elif Path(self.path).suffix == ".gguf" and self.quantization is not None:
            raise ConfigError(
                "policy.quantization cannot re-quantize a GGUF file while loading it; convert it to a model "
                f"folder first (lit-entropy prepare-model --gguf {self.path} --output DIR) and set policy.path "
                "to that folder"
            )
        check_choice("policy.dtype", self.dtype, DType)

        for name in ("gradient_checkpointing", "trust_remote_code"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"policy.{name} must be true or false, got {getattr(self, name)!r}")

        if self.adapter_path is not None and self.lora is None:
            raise ConfigError(
                "policy.adapter_path needs policy.lora (adapters are what trains; the adapter's own config sets "
                "their rank and targets), or drop policy.adapter_path for full fine-tuning"
            )
        if self.lora is not None:
            lora = self.lora
            if isinstance(lora.r, bool) or not isinstance(lora.r, int) or lora.r < 1:
                raise ConfigError(f"policy.lora.r must be an integer >= 1, got {lora.r!r}")
            if not _is_number(lora.alpha) or not lora.alpha > 0:
                raise ConfigError(f"policy.lora.alpha must be > 0, got {lora.alpha!r}")
            if not _is_number(lora.dropout) or not 0.0 <= lora.dropout < 1.0:
                raise ConfigError(f"policy.lora.dropout must be in [0, 1), got {lora.dropout!r}")
            targets = lora.target_modules
            if isinstance(targets, str):
                targets_ok = bool(targets)
            else:
                targets_ok = bool(targets) and all(isinstance(name, str) and name for name in targets)
            if not targets_ok:
                raise ConfigError(
                    "policy.lora.target_modules must be 'all-linear' or a non-empty list of module names, "
                    f"got {targets!r}"
                )

        if self.quantization is not None:
            check_choice("policy.quantization.quant_type", self.quantization.quant_type, QuantType)
            check_choice("policy.quantization.compute_dtype", self.quantization.compute_dtype, DType)
            if self.lora is None:
                raise ConfigError(
                    "policy.quantization needs policy.lora: 4-bit weights cannot be trained, only adapters "
                    "on top of them (set policy.lora, or drop policy.quantization for full fine-tuning)"
                )

    def check_files(self) -> None:
        """Check that ``path`` (and ``tokenizer_path``) hold a loadable model, reading only ``config.json``.

        Raises:
            ModelLoadError: The model or tokenizer folder is missing, the model folder has no config.json or no
                weights, or its config names an architecture that needs remote code.
        """
        if self.path is not None and Path(self.path).suffix == ".gguf":
            if not Path(self.path).is_file():
                raise ModelLoadError(f"policy.path: GGUF file '{self.path}' does not exist")
        elif self.path is not None:
            folder = Path(self.path)
            if folder.is_file():
                raise ModelLoadError(
                    f"policy.path: '{self.path}' is a file; expected a model folder (config.json, weights, "
                    "tokenizer) or a .gguf file"
                )
            if not folder.is_dir():
                hint = ""
                from lit_entropy.pretrained import MODELS

                if folder.name in MODELS:
                    hint = f"; prepare it with: lit-entropy prepare-model {folder.name} --dir {folder.parent}"
                raise ModelLoadError(f"policy.path: model folder '{self.path}' does not exist{hint}")
            if not (folder / "config.json").is_file():
                raise ModelLoadError(f"policy.path: model folder '{self.path}' has no config.json")
            _check_model_config(folder, self.trust_remote_code)
            if not any(any(folder.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
                raise ModelLoadError(
                    f"policy.path: model folder '{self.path}' has no weights "
                    f"(no {', '.join(_WEIGHT_PATTERNS)} file)"
                )
        if self.adapter_path is not None:
            from lit_entropy.adapter import check_adapter_folder

            check_adapter_folder(self.adapter_path)
        if self.tokenizer_path is not None and not Path(self.tokenizer_path).is_dir():
            raise ModelLoadError(
                f"policy.tokenizer_path: tokenizer folder '{self.tokenizer_path}' does not exist"
            )


# Files that hold a model's weights (sharded checkpoints have an index and numbered shards).
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_model_config(folder: Path, trust_remote_code: bool) -> None:
    """Raise ModelLoadError when ``config.json`` is unreadable, or names an architecture that needs remote code.

    transformers builds a known ``model_type`` with its own classes even when the folder also ships code; an
    unknown one needs the folder's ``auto_map`` code, which runs only with ``policy.trust_remote_code: true``.
    """
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"policy.path: '{config_file}' is not readable JSON: {err}") from err
    if not isinstance(config, dict):
        raise ModelLoadError(f"policy.path: '{config_file}' must hold a JSON object")
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict) and auto_map:
        if trust_remote_code:
            return
        code = auto_map.get("AutoModelForCausalLM") or next(iter(auto_map.values()))
        raise ModelLoadError(
            f"policy.path: '{config_file}' has model_type {model_type!r}, which transformers does not know, and "
            f"its auto_map asks to run code shipped in the folder ({code}); policy.trust_remote_code is false. "
            "Read that code, then set policy.trust_remote_code: true only if you trust it"
        )
    import transformers

    raise ModelLoadError(
        f"policy.path: '{config_file}' has model_type {model_type!r}, which transformers "
        f"{transformers.__version__} does not know, and no auto_map code; upgrade transformers or fix the config"
    )


def load_policy(
    policy: Policy, device: torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the policy model and its tokenizer.

    Args:
        policy: What to load; validated first.
        device: Where the model should live. A quantized model is placed there at load time only on CUDA
            (bitsandbytes places 4-bit weights while loading); otherwise the model is moved after loading.
            None leaves it on the CPU (Lightning moves it later).

    Returns:
        ``(model, tokenizer)``. With LoRA the model is a ``peft.PeftModel`` whose only trainable parameters
        are the adapters; without LoRA every parameter is trainable. ``model.config.use_cache`` is True so
        generation uses the KV cache.

    Raises:
        ConfigError: Invalid settings, or quantization requested without bitsandbytes installed.
        ModelLoadError: Missing folders or files, or weights that cannot be loaded.
    """
    embedded = policy.embedded is not None
    if policy.embedded is not None:
        from lit_entropy.demo.embedded import prepare_embedded_model

        policy = dataclasses.replace(policy, path=prepare_embedded_model(policy.embedded), embedded=None)
    policy.validate()
    policy.check_files()
    assert policy.path is not None  # validate() guarantees it; narrows the type
    if policy.trust_remote_code:
        log.warning(
            "lit_entropy: policy.trust_remote_code is true: Python code shipped in '%s'%s may be imported and run",
            policy.path,
            f" and '{policy.tokenizer_path}'" if policy.tokenizer_path else "",
        )
    # A GGUF file carries its own tokenizer and config; transformers reads both from the file's folder.
    gguf = Path(policy.path) if Path(policy.path).suffix == ".gguf" else None
    model_source = str(gguf.parent) if gguf is not None else policy.path
    if gguf is not None:
        from lit_entropy.pretrained import require_gguf

        require_gguf()  # before the tokenizer, which is read from the file too
    if policy.tokenizer_path is None and gguf is not None:
        tokenizer = load_tokenizer(model_source, trust_remote_code=False, gguf_file=gguf.name)
    else:
        tokenizer = load_tokenizer(
            policy.tokenizer_path or policy.path, trust_remote_code=policy.trust_remote_code
        )

    kwargs: dict = {"dtype": getattr(torch, policy.dtype), "trust_remote_code": policy.trust_remote_code}
    quantized = policy.quantization is not None
    if gguf is not None:
        kwargs["gguf_file"] = gguf.name  # dequantized to ``policy.dtype`` while loading
    if policy.quantization is not None:
        kwargs["quantization_config"] = bits_and_bytes_config(policy.quantization)
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device_map"] = {"": torch.device(device)}
    # the embedded model is one small shard built in code: its "Loading weights" bar would be noise
    quiet = no_transformers_progress_bars() if embedded else contextlib.nullcontext()
    try:
        with quiet:
            model = AutoModelForCausalLM.from_pretrained(model_source, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(
            f"policy.path: could not load the model in '{policy.path}': {one_line(err)}"
        ) from err
    if device is not None and not quantized:
        model = model.to(device)
    if quantized:
        keep_cpu_weights_unpacked(model)

    # Reentrant checkpointing returns no gradient through a block whose inputs do not require grad (the
    # frozen embeddings under LoRA); non-reentrant checkpointing has no such trap.
    checkpointing_kwargs = {"use_reentrant": False}
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=policy.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    elif policy.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # newer transformers renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        if policy.lora is not None:
            # The embeddings are frozen under LoRA; making their output require grad keeps a graph through
            # every checkpointed block even if a caller switches to reentrant checkpointing.
            model.enable_input_require_grads()

    if policy.lora is not None and policy.adapter_path is not None:
        from lit_entropy.adapter import load_adapter

        model = load_adapter(model, policy.adapter_path, policy.path, policy.lora)
    elif policy.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = policy.lora
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
        )
        # peft calls transformers' `is_gradient_checkpointing`, deprecated in transformers 5: a FutureWarning
        # about peft's code that the user cannot act on.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = get_peft_model(model, config)
    else:
        model.requires_grad_(True)

    # Checkpointing helpers may turn the KV cache off; generation needs it (HF disables it by itself in
    # training-mode forwards under checkpointing).
    model.config.use_cache = True
    return model, tokenizer


def reference_context(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Context in which ``model`` computes the reference policy: the same base with its adapters disabled.

    Args:
        model: The policy returned by :func:`load_policy` with LoRA (a ``peft.PeftModel``).

    Returns:
        A context manager; forwards inside it use the base weights only.

    Raises:
        ConfigError: The model has no adapters, so there is no frozen base to compare with.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.disable_adapter()
    raise ConfigError("a reference policy needs LoRA adapters: set policy.lora or kl_coef: 0")


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """``(decoder, head)`` of a causal LM, peft-wrapped or not, or ``None`` when either cannot be found.

    ``decoder(input_ids, ...)`` returns the final hidden states (``last_hidden_state``, after the last norm)
    and ``head`` maps them to logits; LoRA layers live inside both, so adapters (and `reference_context`)
    apply when they are called directly.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder = base.get_decoder()
        head = base.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


@torch.no_grad()
def head_reproduces_logits(model: torch.nn.Module, decoder: torch.nn.Module, head: torch.nn.Module) -> bool:
    """Whether ``head(decoder(x))`` equals ``model(x).logits`` on a few tokens (eval mode, no dropout).

    False for models whose forward does more than project the last hidden state (logit soft-capping, logit
    scaling): the caller then falls back to the model's own logits.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        vocab = int(head.weight.shape[0]) if hasattr(head, "weight") else 2
        input_ids = (torch.arange(1, 6, device=device) % vocab).unsqueeze(0)  # [1, 5]
        logits = model(input_ids=input_ids, use_cache=False).logits.float()
        projected = head(decoder(input_ids=input_ids, use_cache=False).last_hidden_state).float()
        return projected.shape == logits.shape and torch.allclose(projected, logits, rtol=1e-3, atol=1e-3)
    finally:
        model.train(was_training)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters that require grad, in ``model.parameters()`` order (what the optimizer should get)."""
    return list(trainable_by_name(model).values())
