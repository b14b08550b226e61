"""What pins a release: sha256 of files, folders, token streams and text sources, and the library versions.

``report.json`` records the sha256 of the recipe, of every input model file, of the calibration and
evaluation tokens (and of file sources), of every output file (``files_sha256``, without the files in
``UNHASHED_OUTPUT_FILES``, which hold timings), and the library versions; ``gqaprune verify OUTPUT``
recomputes the output hashes with ``hash_folder``.
"""

from __future__ import annotations

import hashlib
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from gqaprune import __version__

UNHASHED_OUTPUT_FILES = ("report.json", "README.md")  # they hold timings; every other output file is hashed
_INPUT_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".py", ".tiktoken", ".jinja")
_NOT_INPUTS = ("builtin_info.json",)  # a builtin's training log (timings), not read when loading
_OPTIONAL_PACKAGES = ("lm_eval", "peft", "accelerate", "autoawq", "safetensors", "tokenizers", "matplotlib",
                      "pydantic", "datasets")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_folder(folder: Path, skip=UNHASHED_OUTPUT_FILES) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative POSIX paths, sorted), except ``skip``."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() not in skip}


def input_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file of a model folder that loading it can read (weights, configs, tokenizer, code);
    a builtin model's cached folder likewise."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix in _INPUT_SUFFIXES and p.name not in _NOT_INPUTS}


def source_sha256(source: str) -> str | None:
    """sha256 of a text source file (None for builtin:pydoc, whose text comes with Python, and for datasets)."""
    path = Path(source).expanduser()
    return sha256_file(path) if not source.startswith("builtin:") and path.is_file() else None


def tokens_sha256(t: torch.Tensor | None) -> str | None:
    """sha256 of a token tensor's int64 bytes (None for no tensor)."""
    if t is None:
        return None
    return hashlib.sha256(t.to(torch.int64).numpy().tobytes()).hexdigest()


def versions() -> dict:
    """Python, torch, transformers, numpy, gqaprune and every optional library that is installed."""
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    v["gqaprune"] = __version__
    v["numpy"] = np.__version__
    for name in _OPTIONAL_PACKAGES:
        try:
            v[name] = version(name)
        except PackageNotFoundError:
            pass
    return v
