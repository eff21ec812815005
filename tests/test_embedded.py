"""The embedded demo model: built once per configuration into its cache folder, which the exported adapter names."""

from __future__ import annotations

import json
from pathlib import Path

from harness import short_fit

from lit_entropy.demo import EmbeddedModel
from lit_entropy.demo.embedded import DEFAULT_CACHE_DIR, prepare_embedded_model
from lit_entropy.model import LoRA, Policy


def test_the_default_cache_is_a_lasting_folder_not_a_temporary_one() -> None:
    assert EmbeddedModel().cache_dir == DEFAULT_CACHE_DIR == "~/.cache/lit_entropy/embedded"


def test_the_adapter_names_the_cached_base_folder_which_a_second_build_reuses(tmp_path: Path) -> None:
    embedded = EmbeddedModel(hidden_size=32, num_heads=2, warmup_steps=2, cache_dir=str(tmp_path / "cache"))
    policy = Policy(embedded=embedded, lora=LoRA(r=4, alpha=8))
    short_fit(
        tmp_path, tmp_path, [], iterations=1, policy=policy
    )  # the policy argument replaces the tiny model
    base = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    (folder,) = (tmp_path / "cache").iterdir()
    assert Path(base) == folder and (folder / "config.json").is_file()
    assert folder.name == f"countdown-{embedded.fingerprint()}"
    modified = (folder / "config.json").stat().st_mtime_ns
    assert prepare_embedded_model(embedded) == str(folder)  # reused, not rebuilt
    assert (folder / "config.json").stat().st_mtime_ns == modified
