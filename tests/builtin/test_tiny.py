"""Builtin tiny models: names, cache keys, and (marked ``builtin``) the trained models themselves."""

from __future__ import annotations

import json
import time

import pytest

from gqaprune.builtin import tiny as bm
from gqaprune.errors import InputError

EXPECTED_ARCH = {
    "builtin:tiny-llama": "LlamaForCausalLM",
    "builtin:tiny-qwen2": "Qwen2ForCausalLM",
    "builtin:tiny-phi3": "Phi3ForCausalLM",
}


# ----------------------------------------------------------------------------- fast

def test_names():
    assert bm.BUILTIN_MODELS == ("builtin:tiny-llama", "builtin:tiny-qwen2", "builtin:tiny-phi3")


@pytest.mark.parametrize("name", ["builtin:tiny-mistral", "tiny-llama", "builtin:", ""])
def test_unknown_name_lists_valid_ones(name, tmp_path, monkeypatch):
    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path))
    with pytest.raises(InputError) as exc:
        bm.resolve_builtin(name, progress=False)
    msg = str(exc.value)
    for valid in bm.BUILTIN_MODELS:
        assert valid in msg
    assert exc.value.exit_code == 2
    assert not any(tmp_path.iterdir())  # nothing was written


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path / "c"))
    assert bm.cache_dir() == tmp_path / "c"
    assert bm.builtin_folder("builtin:tiny-llama").parent == tmp_path / "c"
    monkeypatch.delenv("GQAPRUNE_CACHE")
    assert bm.cache_dir().name == "gqaprune"


def test_cache_key_follows_recipe():
    names = {bm.builtin_folder(n).name for n in bm.BUILTIN_MODELS}
    assert len(names) == 3
    base = bm.model_recipe("builtin:tiny-llama")
    folder = bm.builtin_folder("builtin:tiny-llama", base)
    assert folder == bm.builtin_folder("builtin:tiny-llama")  # stable
    assert folder.name.startswith("tiny-llama-") and len(folder.name) == len("tiny-llama-") + 12
    changed = json.loads(json.dumps(base))
    changed["train"]["steps"] += 1
    assert bm.builtin_folder("builtin:tiny-llama", changed) != folder
    changed = json.loads(json.dumps(base))
    changed["config"]["intermediate_size"] = 2048
    assert bm.builtin_folder("builtin:tiny-llama", changed) != folder
    changed = json.loads(json.dumps(base))
    changed["tokenizer"]["tokenizer"]["vocab_size"] = 4096
    assert bm.builtin_folder("builtin:tiny-llama", changed) != folder
    changed = json.loads(json.dumps(base))
    changed["code_version"] += 1
    assert bm.builtin_folder("builtin:tiny-llama", changed) != folder


def test_configs_shape_contract():
    for name, cfg in bm.ARCH_CONFIGS.items():
        assert cfg["architectures"] == [EXPECTED_ARCH[name]]
        assert cfg["hidden_size"] % 128 == 0 and cfg["intermediate_size"] % 128 == 0
        assert all(cfg["hidden_size"] % d == 0 for d in (8, 6, 4, 2))
        assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (8, 2, 64)
    assert bm.TOKENIZER_SETTINGS["vocab_size"] % 64 == 0


def test_tokenizer_is_deterministic_and_has_specials(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path))
    a = bm.train_tokenizer().backend_tokenizer.to_str()
    folder = bm.resolve_tokenizer(progress=False)
    assert folder.parent == tmp_path
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.backend_tokenizer.to_str() == a
    assert len(tok) == bm.TOKENIZER_SETTINGS["vocab_size"]
    assert tok.eos_token == tok.bos_token == tok.pad_token == bm.EOS_TOKEN
    assert tok.eos_token_id is not None
    text = "The for statement iterates over a sequence."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert bm.resolve_tokenizer(progress=False) == folder  # cached
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_tokenizer_is_identical_in_every_architecture_folder(tmp_path, monkeypatch):
    """AutoTokenizer picks its class from config.json's model_type (Qwen2Tokenizer rebuilds its own
    pipeline); the shared tokenizer must come out the same in all three kinds of folder."""
    from transformers import AutoTokenizer

    from gqaprune.io.data import load_text

    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path / "cache"))
    base = AutoTokenizer.from_pretrained(str(bm.resolve_tokenizer(progress=False)))
    text = load_text("builtin:pydoc", "all") + "\n\nCafe\u0301 na\u00efve \u00e9t\u00e9 12345 it's  x\t\ty\r\n"
    want = base(text, add_special_tokens=True)["input_ids"]
    assert base.decode(want) == __import__("unicodedata").normalize("NFC", text)
    for name in bm.BUILTIN_MODELS:
        folder = tmp_path / name.split(":")[1]
        bm.build_config(name, base).save_pretrained(str(folder))
        base.save_pretrained(str(folder))
        tok = AutoTokenizer.from_pretrained(str(folder))
        assert tok(text, add_special_tokens=True)["input_ids"] == want, (name, type(tok).__name__)
        assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (0, 0, 0), name
        assert len(tok) == len(base)


def test_build_config_without_training(tmp_path, monkeypatch):
    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path))
    tok = bm.load_builtin_tokenizer(progress=False)
    for name in bm.BUILTIN_MODELS:
        cfg = bm.build_config(name, tok)
        assert cfg.architectures == [EXPECTED_ARCH[name]]
        assert cfg.head_dim == 64 and cfg.vocab_size == len(tok)
        assert cfg.tie_word_embeddings is True


def test_atomic_build_is_locked_and_cleans_stale_temp(tmp_path):
    import threading

    final = tmp_path / "thing-0123456789ab"
    stale = tmp_path / f".tmp-{final.name}-dead"
    stale.mkdir()
    other_stale = tmp_path / ".tmp-other-ba9876543210-dead"  # another key, its builder is gone
    other_stale.mkdir()
    calls = []

    def build(tmp, progress):
        calls.append(tmp)
        time.sleep(0.3)
        (tmp / "config.json").write_text("{}")

    results = []
    threads = [threading.Thread(target=lambda: results.append(bm._build_atomically(final, build, False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [final] * 3
    assert len(calls) == 1  # built once, the others waited on the lock
    assert (final / "config.json").is_file()
    assert not stale.exists() and not other_stale.exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_stale_temp_of_a_live_builder_is_kept(tmp_path):
    busy = tmp_path / ".tmp-busy-ba9876543210-x"
    busy.mkdir()
    with bm._locked(tmp_path / ".busy-ba9876543210.lock"):  # a live builder of another key
        bm._build_atomically(tmp_path / "thing-0123456789ab",
                             lambda tmp, progress: (tmp / "config.json").write_text("{}"), False)
        assert busy.exists()


def test_failed_build_leaves_nothing(tmp_path):
    final = tmp_path / "thing-0123456789ab"

    def build(tmp, progress):
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        bm._build_atomically(final, build, False)
    assert not final.exists()
    assert not list(tmp_path.glob(".tmp-*"))


# ----------------------------------------------------------------------------- trained builtins

@pytest.fixture(scope="module")
def resolved():
    return {name: bm.resolve_builtin(name, progress=True) for name in bm.BUILTIN_MODELS}


@pytest.mark.builtin
@pytest.mark.parametrize("name", bm.BUILTIN_MODELS)
def test_builtin_loads_with_stock_auto_classes(name, resolved):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolved[name]
    assert folder == bm.builtin_folder(name)
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "builtin_info.json"):
        assert (folder / f).is_file(), f
    raw = json.loads((folder / "config.json").read_text())
    assert raw["architectures"] == [EXPECTED_ARCH[name]]
    assert raw["head_dim"] == 64  # written explicitly

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert type(model).__name__ == EXPECTED_ARCH[name]
    c = model.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (384, 8, 2, 64)
    assert c.intermediate_size % 128 == 0 and c.vocab_size == len(tok) and c.vocab_size % 64 == 0
    assert model.dtype == torch.float32
    assert tok.eos_token is not None and tok.pad_token is not None

    attn = model.model.layers[0].self_attn
    mlp = model.model.layers[0].mlp
    if name == "builtin:tiny-phi3":
        assert tuple(attn.qkv_proj.weight.shape) == (512 + 2 * 128, 384)
        assert tuple(mlp.gate_up_proj.weight.shape) == (2 * c.intermediate_size, 384)
    else:
        assert tuple(attn.q_proj.weight.shape) == (512, 384)
        assert tuple(attn.k_proj.weight.shape) == (128, 384)
        assert tuple(attn.v_proj.weight.shape) == (128, 384)
        assert tuple(mlp.gate_proj.weight.shape) == (c.intermediate_size, 384)
        has_bias = name == "builtin:tiny-qwen2"
        assert (attn.q_proj.bias is not None) == has_bias
        assert (attn.k_proj.bias is not None) == has_bias
        assert (attn.v_proj.bias is not None) == has_bias
    assert tuple(attn.o_proj.weight.shape) == (384, 512)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    ids = tok("The return statement", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 or tok.eos_token_id in out[0].tolist()


@pytest.mark.builtin
@pytest.mark.parametrize("name", bm.BUILTIN_MODELS)
def test_builtin_second_resolve_is_cached(name, resolved):
    folder = resolved[name]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = bm.resolve_builtin(name, progress=False)
    assert time.perf_counter() - t0 < 5.0
    assert again == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(folder.parent.glob(f".tmp-{folder.name}-*"))


@pytest.mark.builtin
@pytest.mark.parametrize("name", bm.BUILTIN_MODELS)
def test_builtin_learned_real_structure(name, resolved):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolved[name]
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(folder))
    ppl = bm.heldout_perplexity(model, tok)
    uni = bm.unigram_perplexity(tok)
    print(f"{name}: held-out ppl {ppl:.2f}, unigram ppl {uni:.2f}")
    assert ppl <= 0.5 * uni, (ppl, uni)
    info = json.loads((folder / "builtin_info.json").read_text())
    if info["eval"]["validation_sha256"] != bm._corpus_sha("validation"):
        return  # the validation split changed since training; the numbers recorded then no longer apply
    # the numbers measured at training time, with the in-memory model and tokenizer, hold after reload
    assert info["heldout_ppl"] == pytest.approx(ppl, rel=1e-3)
    assert info["unigram_ppl"] == pytest.approx(uni, rel=1e-9)
