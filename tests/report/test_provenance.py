"""Hashes that pin a release: output folder, input model files, token streams, text sources, versions."""

import hashlib

import torch

from gqaprune.report.provenance import (UNHASHED_OUTPUT_FILES, hash_folder, input_hashes, sha256_file, source_sha256,
                                        tokens_sha256, versions)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_hash_folder_skips_the_unhashed_files_and_sees_every_change(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "plots" / "a.png").write_bytes(b"png")
    (tmp_path / "plots" / "README.md").write_text("nested: hashed")  # only the top-level card is skipped
    for name in UNHASHED_OUTPUT_FILES:
        (tmp_path / name).write_text("timings 1.0s")
    h = hash_folder(tmp_path)
    assert h == {"model.safetensors": _sha(b"weights"), "plots/README.md": _sha(b"nested: hashed"),
                 "plots/a.png": _sha(b"png")}
    assert list(h) == sorted(h)
    (tmp_path / "report.json").write_text("timings 2.0s")  # a new report does not change the hashes
    assert hash_folder(tmp_path) == h
    (tmp_path / "plots" / "a.png").write_bytes(b"pnG")
    h2 = hash_folder(tmp_path)
    assert h2["plots/a.png"] == _sha(b"pnG") and h2["model.safetensors"] == h["model.safetensors"]


def test_sha256_file_reads_in_chunks(tmp_path):
    big = bytes(range(256)) * 10000  # 2.5 MB: more than one 1 MiB chunk
    (tmp_path / "f").write_bytes(big)
    assert sha256_file(tmp_path / "f") == _sha(big)


def test_input_hashes_cover_what_loading_reads(tmp_path):
    for name in ("model.safetensors", "config.json", "tokenizer.model", "modeling_x.py", "builtin_info.json",
                 "notes.md", "train.log"):
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "sub.json").mkdir()  # a folder is not a file of the model
    assert input_hashes(tmp_path) == {n: _sha(n.encode()) for n in
                                      ("config.json", "model.safetensors", "modeling_x.py", "tokenizer.model")}


def test_tokens_and_source_hashes(tmp_path):
    a = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert tokens_sha256(a) == tokens_sha256(a.to(torch.int32)) == _sha(a.to(torch.int64).numpy().tobytes())
    assert tokens_sha256(a) != tokens_sha256(a.flip(0)) and tokens_sha256(None) is None
    src = tmp_path / "corpus.txt"
    src.write_text("some text")
    assert source_sha256(str(src)) == _sha(b"some text")
    assert source_sha256("builtin:pydoc") is None and source_sha256(str(tmp_path / "missing.txt")) is None


def test_versions_name_the_libraries_that_shape_the_output():
    import transformers

    v = versions()
    assert v["torch"] == torch.__version__ and v["transformers"] == transformers.__version__
    assert {"python", "numpy", "gqaprune", "safetensors"} <= set(v)
