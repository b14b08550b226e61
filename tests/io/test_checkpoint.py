"""Saving and reloading uniform and per-layer-shaped models (different Q/KV ratio per layer)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from gqaprune.arch import modeling_perlayer
from gqaprune.io import checkpoint
from gqaprune.arch.adapter import builtin_adapters, get_module, head_dim_of, model_shapes, set_module
from gqaprune.errors import CheckFailed, InputError
from tests.tiny import FAMILIES, tiny_inputs, tiny_model

# tiny models: 8 query heads, 2 KV heads (groups q0-3 | q4-7), MLP width 96, head_dim 16, 3 layers
PER_LAYER_PLAN = [
    # layer 0: 1 KV head with its 4 query heads (ratio 4), MLP 96 (unchanged)
    {"kv": [1], "q": [4, 5, 6, 7], "mlp": list(range(96))},
    # layer 1: 2 KV heads with 2 query heads each (ratio 2), MLP 64
    {"kv": [0, 1], "q": [0, 2, 5, 7], "mlp": list(range(0, 96, 3)) + list(range(1, 96, 3))},
    # layer 2: unchanged attention (ratio 4), MLP 32
    {"kv": [0, 1], "q": list(range(8)), "mlp": list(range(64, 96))},
]
EXPECTED_SHAPES = [
    {"num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 96},
    {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64},
    {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 32},
]


# --- a small by-hand slicer (the real surgery lives elsewhere) ---------------------------------


def _rows(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.detach()[idx].clone()


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _head_rows(heads, d: int, offset: int = 0) -> torch.Tensor:
    return torch.tensor([offset + h * d + j for h in heads for j in range(d)], dtype=torch.long)


def slice_layer(layer, adapter, head_dim: int, keep_kv, keep_q, keep_mlp) -> dict:
    r = adapter.layer
    d = head_dim
    o = get_module(layer, r.o)
    n_q = o.in_features // d
    q_idx, kv_idx = _head_rows(keep_q, d), _head_rows(keep_kv, d)
    if r.fused_qkv:
        qkv = get_module(layer, r.qkv)
        n_kv = (qkv.out_features - n_q * d) // (2 * d)
        idx = torch.cat([q_idx, _head_rows(keep_kv, d, n_q * d), _head_rows(keep_kv, d, (n_q + n_kv) * d)])
        set_module(layer, r.qkv, _linear(_rows(qkv.weight, idx), _rows(qkv.bias, idx)))
    else:
        for role, idx in (("q", q_idx), ("k", kv_idx), ("v", kv_idx)):
            lin = get_module(layer, getattr(r, role))
            set_module(layer, getattr(r, role), _linear(_rows(lin.weight, idx), _rows(lin.bias, idx)))
    set_module(layer, r.o, _linear(o.weight.detach()[:, q_idx].clone(),
                                   None if o.bias is None else o.bias.detach().clone()))
    m_idx = torch.tensor(keep_mlp, dtype=torch.long)
    down = get_module(layer, r.down)
    width = down.in_features
    if r.fused_gate_up:
        gu = get_module(layer, r.gate_up)
        idx = torch.cat([m_idx, m_idx + width])
        set_module(layer, r.gate_up, _linear(_rows(gu.weight, idx), _rows(gu.bias, idx)))
    else:
        for role in ("gate", "up"):
            path = getattr(r, role)
            if path is not None:
                lin = get_module(layer, path)
                set_module(layer, path, _linear(_rows(lin.weight, m_idx), _rows(lin.bias, m_idx)))
    set_module(layer, r.down, _linear(down.weight.detach()[:, m_idx].clone(),
                                      None if down.bias is None else down.bias.detach().clone()))
    return {"num_attention_heads": len(keep_q), "num_key_value_heads": len(keep_kv),
            "intermediate_size": len(keep_mlp)}


def per_layer_model(family: str, attn_implementation: str = "eager"):
    model = tiny_model(family, attn_implementation=attn_implementation)
    adapter = builtin_adapters()[family]
    hd = head_dim_of(model.config, adapter)
    layers = get_module(model, adapter.model.layers)
    for layer, plan in zip(layers, PER_LAYER_PLAN):
        shape = slice_layer(layer, adapter, hd, plan["kv"], plan["q"], plan["mlp"])
        modeling_perlayer.sync_layer_attributes(layer, adapter.layer.model_dump(), shape, model.config)
    return model.eval(), adapter


def uniform_model(family: str, attn_implementation: str = "eager"):
    """Every layer keeps KV head 1 with 2 of its query heads, and 64 MLP channels."""
    model = tiny_model(family, attn_implementation=attn_implementation)
    adapter = builtin_adapters()[family]
    hd = head_dim_of(model.config, adapter)
    for layer in get_module(model, adapter.model.layers):
        shape = slice_layer(layer, adapter, hd, [1], [5, 6], list(range(32, 96)))
        modeling_perlayer.sync_layer_attributes(layer, adapter.layer.model_dump(), shape, model.config)
    return model.eval(), adapter


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _greedy(model, x, use_cache: bool):
    with torch.no_grad():
        return model.generate(x, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0)


def _assert_weights_equal(model, folder):
    saved = load_file(str(folder / "model.safetensors"))
    state = model.state_dict()
    assert set(saved) <= set(state)
    for k in set(state) - set(saved):  # a tied weight (Gemma's lm_head) is saved once, under the embedding
        assert any(state[k].data_ptr() == state[s].data_ptr() for s in saved), f"{k} is neither saved nor tied"
    for k, v in saved.items():
        assert state[k].shape == v.shape, k
        assert torch.equal(state[k], v), k


@pytest.fixture(scope="module")
def saved_per_layer(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        model, adapter = per_layer_model(family)
        folder = tmp_path_factory.mktemp(f"perlayer-{family}")
        result = checkpoint.save_model(model, adapter, folder)
        out[family] = (model, adapter, folder, result)
    return out


# --- per-layer shapes --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_in_memory_per_layer_forward_and_generate(family):
    model, adapter = per_layer_model(family)
    assert model_shapes(model, adapter) == EXPECTED_SHAPES
    x = tiny_inputs()
    eager = _logits(model, x)
    assert torch.isfinite(eager).all()
    model.set_attn_implementation("sdpa")  # the per-layer config views follow the model's config
    torch.testing.assert_close(_logits(model, x), eager, atol=1e-5, rtol=0)
    assert torch.equal(_greedy(model, x, True), _greedy(model, x, False))


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_config_written(family, saved_per_layer):
    model, adapter, folder, result = saved_per_layer[family]
    assert result == {"uniform": False, "loader": "gqaprune.load_pretrained"}
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["gqaprune_layers"] == EXPECTED_SHAPES
    assert cfg["gqaprune_roles"]["layers"] == adapter.model.layers
    assert cfg["gqaprune_num_key_value_groups"] == [4, 2, 4]
    assert cfg["head_dim"] == 16
    stock = type(model).__name__
    assert cfg["architectures"] == [stock]
    assert cfg["auto_map"] == {"AutoModelForCausalLM": f"modeling_perlayer.PerLayer{stock}"}
    assert (folder / "modeling_perlayer.py").read_bytes() == open(modeling_perlayer.__file__, "rb").read()
    assert not list(folder.glob("*.bin"))
    # the stock config class accepts the global keys
    type(model.config).from_dict(cfg)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_reload_gqaprune(family, impl, saved_per_layer, caplog):
    model, adapter, folder, _ = saved_per_layer[family]
    x = tiny_inputs()
    model.set_attn_implementation(impl)
    ref = _logits(model, x)
    with caplog.at_level(logging.WARNING):
        loaded = checkpoint.load_pretrained(folder, attn_implementation=impl)
    assert "newly initialized" not in caplog.text
    assert type(loaded) is type(model)  # the stock class, with rebuilt layers
    assert loaded.config._attn_implementation == impl
    assert model_shapes(loaded, adapter) == EXPECTED_SHAPES
    _assert_weights_equal(loaded, folder)
    torch.testing.assert_close(_logits(loaded, x), ref, atol=1e-6, rtol=0)
    assert torch.equal(_greedy(loaded, x, True), _greedy(loaded, x, False))
    assert torch.equal(_greedy(loaded, x, True), _greedy(model, x, True))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_reload_trust_remote_code(family, impl, saved_per_layer, caplog):
    model, adapter, folder, _ = saved_per_layer[family]
    x = tiny_inputs()
    model.set_attn_implementation(impl)
    ref = _logits(model, x)
    with caplog.at_level(logging.WARNING):
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=True, attn_implementation=impl, output_loading_info=True)
    assert "newly initialized" not in caplog.text
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert type(loaded).__name__ == f"PerLayer{type(model).__name__}"
    assert isinstance(loaded, type(model))
    loaded.eval()
    assert model_shapes(loaded, adapter) == EXPECTED_SHAPES
    _assert_weights_equal(loaded, folder)
    torch.testing.assert_close(_logits(loaded, x), ref, atol=1e-6, rtol=0)
    assert torch.equal(_greedy(loaded, x, True), _greedy(loaded, x, False))


def test_resave_of_reloaded_model_round_trips(saved_per_layer, tmp_path):
    model, adapter, folder, _ = saved_per_layer["phi3"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    result = checkpoint.save_model(loaded, adapter, tmp_path / "again")
    assert result["uniform"] is False
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["architectures"] == ["Phi3ForCausalLM"]
    again = checkpoint.load_pretrained(tmp_path / "again")
    x = tiny_inputs()
    torch.testing.assert_close(_logits(again, x), _logits(loaded, x), atol=1e-6, rtol=0)


def test_save_in_another_dtype(tmp_path):
    model, adapter = per_layer_model("qwen2")
    checkpoint.save_model(model, adapter, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(tmp_path / "model.safetensors")).values())
    assert model.dtype == torch.float32  # the in-memory model is untouched
    loaded = checkpoint.load_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert model_shapes(loaded, adapter) == EXPECTED_SHAPES


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cast_parameters_gives_the_logits_of_a_fresh_load_in_that_dtype(tmp_path, family):
    """The round trip casts the pruned model to the save dtype before its reference logits: that must be the model
    from_pretrained builds from the saved folder, rotary inv_freq in float32 included (model.to(bf16) casts it)."""
    model = tiny_model(family, max_position_embeddings=512)
    adapter = builtin_adapters()[family]
    checkpoint.save_model(model, adapter, tmp_path, dtype="bfloat16")
    fresh = checkpoint.load_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager")
    x = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    checkpoint.cast_parameters(model, torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(_logits(model, x), _logits(fresh, x))


def test_llama_uniform_heads_not_dividing_hidden_goes_per_layer(tmp_path):
    # 3 query heads (1 KV head) everywhere: 64 % 3 != 0, which LlamaConfig refuses
    model = tiny_model("llama")
    adapter = builtin_adapters()["llama"]
    for layer in get_module(model, adapter.model.layers):
        shape = slice_layer(layer, adapter, 16, [0], [0, 1, 3], list(range(96)))
        modeling_perlayer.sync_layer_attributes(layer, adapter.layer.model_dump(), shape, model.config)
    model.eval()
    x = tiny_inputs()
    ref = _logits(model, x)
    result = checkpoint.save_model(model, adapter, tmp_path)
    assert result["uniform"] is False
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert 64 % cfg["num_attention_heads"] == 0
    torch.testing.assert_close(_logits(checkpoint.load_pretrained(tmp_path, attn_implementation="eager"), x),
                               ref, atol=1e-6, rtol=0)
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True,
                                                               attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(remote, x), ref, atol=1e-6, rtol=0)


def test_deepcopy_keeps_per_layer_views():
    import copy

    model, _ = per_layer_model("phi3")
    clone = copy.deepcopy(model)
    attn = clone.model.layers[0].self_attn
    assert attn.config.num_attention_heads == 4
    assert attn.config.__dict__["_parent"] is clone.config  # follows the copy's config, not the original's
    x = tiny_inputs()
    torch.testing.assert_close(_logits(clone, x), _logits(model, x), atol=0, rtol=0)


def test_phi_qk_layernorm_uniform_heads_go_per_layer(tmp_path):
    # Phi sizes q_layernorm from hidden_size // num_attention_heads of the global config: a stock config
    # with the pruned head count would rebuild it at another size, so this must take the per-layer path
    model = tiny_model("phi", qk_layernorm=True, head_dim=8)
    adapter = builtin_adapters()["phi"]
    for layer in get_module(model, adapter.model.layers):
        shape = slice_layer(layer, adapter, 8, [1], [5, 6], list(range(32, 96)))
        modeling_perlayer.sync_layer_attributes(layer, adapter.layer.model_dump(), shape, model.config)
    x = tiny_inputs()
    ref = _logits(model.eval(), x)
    assert checkpoint.save_model(model, adapter, tmp_path)["uniform"] is False
    assert json.loads((tmp_path / "config.json").read_text())["num_attention_heads"] == 8
    torch.testing.assert_close(_logits(checkpoint.load_pretrained(tmp_path, attn_implementation="eager"), x),
                               ref, atol=1e-6, rtol=0)


def test_tied_embeddings_per_layer(tmp_path):
    from tests.tiny import _COMMON

    config = transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    adapter = builtin_adapters()["qwen2"]
    for layer, plan in zip(get_module(model, adapter.model.layers), PER_LAYER_PLAN):
        shape = slice_layer(layer, adapter, 16, plan["kv"], plan["q"], plan["mlp"])
        modeling_perlayer.sync_layer_attributes(layer, adapter.layer.model_dump(), shape, model.config)
    x = tiny_inputs()
    ref = _logits(model, x)
    assert checkpoint.save_model(model, adapter, tmp_path)["uniform"] is False
    for loaded in (checkpoint.load_pretrained(tmp_path, attn_implementation="eager"),
                   transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True,
                                                                     attn_implementation="eager").eval()):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        torch.testing.assert_close(_logits(loaded, x), ref, atol=1e-6, rtol=0)


def test_reshape_layer_on_meta_device():
    model, adapter = per_layer_model("phi3")
    with torch.device("meta"):
        probe = transformers.Phi3ForCausalLM(model.config)
    cfg = model.config
    cfg.gqaprune_layers = EXPECTED_SHAPES
    cfg.gqaprune_roles = {"layers": adapter.model.layers, "layer": adapter.layer.model_dump()}
    try:
        modeling_perlayer.apply_per_layer_shapes(probe, cfg)
    finally:
        del cfg.gqaprune_layers, cfg.gqaprune_roles
    assert {k: v.shape for k, v in probe.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert all(p.device.type == "meta" for p in probe.parameters())
    attn = probe.model.layers[1].self_attn
    assert (attn.num_key_value_groups, attn.num_key_value_heads, attn.config.num_attention_heads) == (2, 2, 4)


# --- uniform shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_reloads_with_stock_from_pretrained(family, tmp_path):
    model, adapter = uniform_model(family)
    x = tiny_inputs()
    ref = _logits(model, x)
    result = checkpoint.save_model(model, adapter, tmp_path)
    assert result == {"uniform": True, "loader": "from_pretrained"}
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["head_dim"] == 16
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (2, 1, 64)
    assert "gqaprune_layers" not in cfg and "auto_map" not in cfg
    assert not (tmp_path / "modeling_perlayer.py").exists()
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(stock) is type(model)
    _assert_weights_equal(stock, tmp_path)
    torch.testing.assert_close(_logits(stock, x), ref, atol=1e-6, rtol=0)
    ours = checkpoint.load_pretrained(tmp_path, attn_implementation="eager")
    torch.testing.assert_close(_logits(ours, x), ref, atol=1e-6, rtol=0)


def test_uniform_after_per_layer_drops_per_layer_keys(tmp_path):
    model, adapter = uniform_model("qwen2")
    model.config.gqaprune_layers = [{"num_attention_heads": 1}]  # stale keys from an earlier save
    model.config.gqaprune_roles = {"layers": "x", "layer": {}}
    assert checkpoint.finalize_config(model, adapter) is True
    assert not hasattr(model.config, "gqaprune_layers")
    assert not hasattr(model.config, "gqaprune_roles")


# --- refusals ----------------------------------------------------------------------------------


def test_pickle_only_folder_refused(tmp_path):
    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match="safetensors only"):
        checkpoint.load_pretrained(tmp_path)


def test_corrupt_safetensors_names_the_file(tmp_path):
    model, adapter = uniform_model("llama")
    checkpoint.save_model(model, adapter, tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="model.safetensors"):
        checkpoint.load_pretrained(tmp_path)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        checkpoint.load_pretrained(tmp_path / "nope")
    with pytest.raises(InputError, match="config.json"):
        checkpoint.load_pretrained(tmp_path)


def test_missing_tensor_is_an_error(tmp_path):
    model, adapter = per_layer_model("llama")
    checkpoint.save_model(model, adapter, tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckFailed, match="up_proj"):
        checkpoint.load_pretrained(tmp_path)


def test_weights_not_matching_config_is_a_clear_error(tmp_path):
    model, adapter = per_layer_model("llama")
    checkpoint.save_model(model, adapter, tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["gqaprune_layers"][1]["intermediate_size"] = 48
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises((InputError, CheckFailed), match="mlp"):
        checkpoint.load_pretrained(tmp_path)
