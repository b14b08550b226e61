"""Adapters resolve on every family; a user's adapter file is loaded and used; bad adapters are clear errors."""

import pytest

from gqaprune.arch.adapter import (builtin_adapters, check_adapter_on_model, load_adapter_file, model_shapes,
                                   resolve_adapter)
from gqaprune.errors import InputError
from tiny import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_resolves_on_family(family):
    model = tiny_model(family)
    adapter = resolve_adapter("auto", model.config.architectures)
    assert adapter.name == family
    check_adapter_on_model(model, adapter)
    assert model_shapes(model, adapter)[0] == {"num_attention_heads": 8, "num_key_value_heads": 2,
                                               "intermediate_size": 96}


def test_user_adapter_file_is_used(tmp_path):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "adapters" / "llama.yaml").read_text()
    user = tmp_path / "my_llama.yaml"
    user.write_text(text.replace("name: llama", "name: my-llama"))
    adapter = resolve_adapter(str(user), ["LlamaForCausalLM"])
    assert adapter.name == "my-llama"
    check_adapter_on_model(tiny_model("llama"), adapter)


def test_adapter_with_wrong_path_names_the_role(tmp_path):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "adapters" / "llama.yaml").read_text()
    user = tmp_path / "bad.yaml"
    user.write_text(text.replace("q: self_attn.q_proj", "q: self_attn.query"))
    adapter = resolve_adapter(str(user), None)
    with pytest.raises(InputError, match=r"role 'q' path 'model.layers.0.self_attn.query' does not resolve"):
        check_adapter_on_model(tiny_model("llama"), adapter)


def test_adapter_schema_rejects_unknown_fields(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("name: x\narchitectures: [X]\nmodel: {embed: a, layers: b, final_norm: c, lm_head: d}\n"
                   "layer: {attention: a, q: a, k: b, v: c, o: d, mlp: m, up: u, down: w, input_norm: n,"
                   " post_attention_norm: p, rotary: r}\n")
    with pytest.raises(InputError, match="layer.rotary: unknown key"):
        load_adapter_file(bad)


def test_fused_qkv_needs_a_known_layout(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("name: x\narchitectures: [X]\nmodel: {embed: a, layers: b, final_norm: c, lm_head: d}\n"
                   "layer: {attention: a, qkv: a, qkv_layout: interleaved, o: d, mlp: m, up: u, down: w,"
                   " input_norm: n, post_attention_norm: p}\n")
    with pytest.raises(InputError, match="qkv_layout"):
        load_adapter_file(bad)


_MINIMAL = ("name: x\narchitectures: [X]\nmodel: {embed: a, layers: b, final_norm: c, lm_head: d}\n"
            "layer: {attention: a, q: a, k: b, v: c, o: d, mlp: m, up: u, down: w, input_norm: n,"
            " post_attention_norm: p, post_attn_output_norm: pa, post_mlp_output_norm: pm, q_norm: qn, k_norm: kn}\n")


def test_adapter_schema_reads_output_norms_norm_kind_and_embedding_scale(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text(_MINIMAL + "norm: {kind: rms, weight_offset: 1}\nembedding: {scale: sqrt_hidden}\n")
    a = load_adapter_file(ok)
    assert (a.layer.post_attn_output_norm, a.layer.post_mlp_output_norm, a.layer.q_norm, a.layer.k_norm) == (
        "pa", "pm", "qn", "kn")
    assert (a.norm.kind, a.norm.weight_offset, a.embedding.scale) == ("rms", 1, "sqrt_hidden")
    default = tmp_path / "default.yaml"
    default.write_text(_MINIMAL)
    d = load_adapter_file(default)
    assert (d.norm.kind, d.norm.weight_offset, d.embedding.scale) == ("rms", 0, "none")


@pytest.mark.parametrize("extra, match", [
    ("norm: {kind: batch}\n", "norm.kind"),
    ("norm: {kind: rms, weight_offset: 2}\n", "norm.weight_offset"),
    ("norm: {kind: rms, eps_key: x}\n", "norm.eps_key: unknown key"),
    ("embedding: {scale: sqrt_vocab}\n", "embedding.scale"),
    ("embedding: {scale: none, multiplier: 2}\n", "embedding.multiplier: unknown key"),
])
def test_adapter_schema_rejects_bad_norm_and_embedding(tmp_path, extra, match):
    bad = tmp_path / "x.yaml"
    bad.write_text(_MINIMAL + extra)
    with pytest.raises(InputError, match=match):
        load_adapter_file(bad)


def test_gqaprune_adapters_lists_qwen3_and_gemma3():
    from click.testing import CliRunner

    from gqaprune.cli import main

    res = CliRunner().invoke(main, ["adapters"])
    assert res.exit_code == 0
    rows = {line.split()[0]: line.split()[1] for line in res.output.splitlines()}
    assert rows["qwen3"] == "Qwen3ForCausalLM" and rows["gemma3"] == "Gemma3ForCausalLM"


def _edited(tmp_path, family, old, new):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "adapters" / f"{family}.yaml").read_text()
    assert old in text
    user = tmp_path / "edited.yaml"
    user.write_text(text.replace(old, new))
    return load_adapter_file(user)


@pytest.mark.parametrize("family, old, new, match", [
    ("gemma3", "weight_offset: 1", "weight_offset: 0", r"norm \{kind: rms, weight_offset: 0\} does not match what "
                                                       "input_layernorm computes"),
    ("llama", "weight_offset: 0", "weight_offset: 1", r"norm \{kind: rms, weight_offset: 1\} does not match"),
    ("phi", "kind: layer", "kind: rms", r"norm \{kind: rms, weight_offset: 0\} does not match"),
    ("gemma3", "scale: sqrt_hidden", "scale: none", r"embedding \{scale: none\} does not match what "
                                                     "model.embed_tokens computes"),
    ("qwen3", "k_norm: self_attn.k_norm", "k_norm: input_layernorm",
     r"role 'k_norm' \(model.layers.0.input_layernorm\) has 64 weights; a per-head norm has head_dim=16"),
])
def test_adapter_data_is_checked_against_what_the_model_computes(tmp_path, family, old, new, match):
    adapter = _edited(tmp_path, family, old, new)
    with pytest.raises(InputError, match=match):
        check_adapter_on_model(tiny_model(family), adapter)


def test_awq_scale_groups_name_roles_the_adapter_defines(tmp_path):
    with pytest.raises(InputError, match=r"awq.scale_groups: 'qkv' is not a Linear role this adapter defines"):
        _edited(tmp_path, "llama", "linears: [q, k, v]", "linears: [qkv]")
    with pytest.raises(InputError, match=r"'post_mlp_output_norm' is not a role this adapter defines"):
        _edited(tmp_path, "llama", "prev: post_attention_norm", "prev: post_mlp_output_norm")
    known = builtin_adapters()
    assert known["qwen2"].awq_linear_roles() == ["q", "k", "v", "o", "gate", "up", "down"]
    assert known["phi3"].awq_linear_roles() == ["qkv", "o", "gate_up", "down"]
    assert known["gemma3"].awq is None  # not verified with AutoAWQ here: the stage refuses it
