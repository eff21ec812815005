"""Multi-GPU recipes (``recipes/gpu/multi``): each parses with the CLI and is what its file name says.

A file is named ``<model>-[qlora-]<ddp|fsdp2>-<N>gpu.yaml``. The CLI's own parser resolves each recipe
(``fit --print_config``, in-process, no model folder needed) and the resolved config must match the name:
``N`` devices, the strategy, 4-bit weights exactly when ``qlora`` is in the name (and then DDP, since FSDP2
cannot shard them), FSDP2 over every device, and per-rank batch sizes that divide. That every recipe also
instantiates is `tests/test_cli.py`'s job (it walks ``recipes/`` recursively).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lit_entropy.cli import main

ROOT = Path(__file__).resolve().parents[1]
MULTI = ROOT / "recipes" / "gpu" / "multi"
RECIPES = sorted(MULTI.glob("*.yaml"))
NAME = re.compile(r"^(?P<model>.+?)-(?:(?P<qlora>qlora)-)?(?P<strategy>ddp|fsdp2)-(?P<gpus>\d+)gpu\.yaml$")
MODEL_PARALLEL = "lit_entropy.distributed.FSDP2"
EXPECTED = {
    "qwen2.5-7b-instruct-fsdp2-8gpu.yaml",
    "qwen2.5-7b-instruct-fsdp2-4gpu.yaml",
    "qwen2.5-7b-instruct-qlora-ddp-4gpu.yaml",
    "qwen2.5-1.5b-ddp-2gpu.yaml",
}


def _resolved(recipe: Path, tmp_path: Path, monkeypatch, capsys) -> dict:
    """The recipe as the CLI resolves it (defaults filled in), from ``fit --print_config``."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args=["fit", "--config", str(recipe), "--print_config"])
    captured = capsys.readouterr()
    assert exit_info.value.code in (0, None), captured.err
    return yaml.safe_load(captured.out)


def test_the_multi_gpu_recipes_are_there():
    assert {path.name for path in RECIPES} >= EXPECTED


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.name for path in RECIPES])
def test_recipe_is_what_its_name_says(recipe, tmp_path, monkeypatch, capsys):
    name = NAME.match(recipe.name)
    assert name, f"{recipe.name}: expected <model>-[qlora-]<ddp|fsdp2>-<N>gpu.yaml"
    config = _resolved(recipe, tmp_path, monkeypatch, capsys)
    trainer = config["trainer"]
    init = config["model"]["init_args"]
    policy = init["policy"]
    gpus = int(name["gpus"])

    assert trainer["accelerator"] == "gpu"
    assert trainer["devices"] == gpus
    assert trainer["num_nodes"] == 1
    world = gpus * trainer["num_nodes"]

    strategy = trainer["strategy"]
    if name["strategy"] == "ddp":
        assert strategy == "ddp"
    else:
        assert isinstance(strategy, dict) and strategy["class_path"] == MODEL_PARALLEL
        assert strategy["init_args"]["data_parallel_size"] == world  # FSDP2 over every GPU
        targets = policy["lora"]["target_modules"]
        targets = [targets] if isinstance(targets, str) else targets
        assert not {"lm_head", "embed_tokens"} & set(targets)  # shard_policy refuses trainable head/embedding

    if name["qlora"]:
        assert policy["quantization"] is not None
        assert strategy == "ddp"  # 4-bit weights cannot be sharded by FSDP2
    else:
        assert policy["quantization"] is None
    assert policy["lora"] is not None

    # The model folder is the one the name says (a local folder, as in recipes/gpu/qwen2.5-0.5b-qlora.yaml).
    assert Path(policy["path"]).name.lower().startswith(name["model"].lower())

    # Per-rank sizes: mini-batches divide each rank's rollout, micro-batches divide mini-batches.
    rollout = config["data"]["init_args"]["batch_size"] * init["sampling"]["group_size"]
    minibatch = init["minibatch_size"] or rollout
    microbatch = init["microbatch_size"] or minibatch
    assert rollout % minibatch == 0 and minibatch % microbatch == 0

    # The header says how to launch this very file and labels its memory figure as an estimate.
    header = recipe.read_text().split("\nseed_everything", 1)[0]
    assert f"recipes/gpu/multi/{recipe.name}" in header
    assert "ESTIMATE" in header
