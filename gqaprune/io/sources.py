"""Where a model comes from: a builtin name, a GGUF file or a local HF folder. Config and tokenizer, with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

from gqaprune.errors import InputError


def is_builtin(spec: str) -> bool:
    return spec.startswith("builtin:")


BUILTIN_NAMES = ("builtin:smollm2-135m", "builtin:tiny-llama", "builtin:tiny-qwen2", "builtin:tiny-phi3")


def resolve_model(spec: str, progress: bool = True) -> Path:
    """The local folder of ``spec``: a builtin (the real one converted, a tiny one trained, and cached on first
    use), a ``.gguf`` file (dequantized into a cached folder on first use) or a local HF folder."""
    from gqaprune.builtin import smollm2

    if spec == smollm2.NAME:
        return smollm2.resolve_smollm2(progress)
    if is_builtin(spec):
        from gqaprune.builtin.tiny import BUILTIN_MODELS, resolve_builtin

        if spec not in BUILTIN_MODELS:
            raise InputError(f"unknown builtin model '{spec}'; valid builtin models: {', '.join(BUILTIN_NAMES)}")
        return resolve_builtin(spec, progress=progress)
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"model '{spec}' does not exist (give a local HF folder, a .gguf file or one of "
                         f"{', '.join(BUILTIN_NAMES)}; nothing is fetched from a hub)")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return smollm2.resolve_gguf(path, progress)
    if not path.is_dir():
        raise InputError(f"model '{spec}' is not a folder")
    if not (path / "config.json").is_file():
        raise InputError(f"model folder '{spec}' has no config.json")
    return path


def read_config(spec: str, trust_remote_code: bool = False, progress: bool = True):
    """The model's config without loading weights (a builtin not yet trained needs no training for this)."""
    from transformers import AutoConfig

    if is_builtin(spec) and spec != "builtin:smollm2-135m":  # the real builtin: converted, then read like a folder
        from gqaprune.builtin import tiny as bm

        folder = bm.builtin_folder(spec) if spec in bm.BUILTIN_MODELS else None
        if folder is None or not (folder / "config.json").exists():
            if spec not in bm.BUILTIN_MODELS:
                raise InputError(f"unknown builtin model '{spec}'; valid builtin models: {', '.join(BUILTIN_NAMES)}")
            cfg = bm.build_config(spec, bm.load_builtin_tokenizer(progress))
            cfg.architectures = list(bm.ARCH_CONFIGS[spec]["architectures"])
            return cfg
        path = folder
    else:
        path = resolve_model(spec)
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path / 'config.json'}: {e}") from None
    if not raw.get("architectures"):
        raise InputError(f"{path / 'config.json'} has no 'architectures'; gqaprune needs it to pick the model class "
                         "and the adapter (add e.g. \"architectures\": [\"LlamaForCausalLM\"])")
    if raw.get("auto_map") and not trust_remote_code and "gqaprune_layers" not in raw:
        raise InputError(f"{path} needs remote code (auto_map in config.json); set trust_remote_code: true in the "
                         "recipe if you trust it")
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise InputError(f"cannot load the config of '{spec}': {str(e).splitlines()[0]}") from None


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        raise InputError(f"model folder '{folder}' has no usable tokenizer ({str(e).splitlines()[0]}); "
                         "save the tokenizer beside the weights") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
