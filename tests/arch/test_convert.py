"""save_as: mistral — a pruned Llama whose head count does not divide hidden_size saved as a stock Mistral."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from click.testing import CliRunner

from gqaprune.arch import convert
from gqaprune.cli import main
from gqaprune.errors import CheckFailed
from tests.tiny import tiny_inputs, write_recipe

# hidden 64, 8 query heads in 2 groups of 4, head_dim 8: keeping 3 query heads per group leaves 6 heads,
# which do not divide 64, so LlamaConfig cannot describe the pruned model
SMALL = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8, intermediate_size=96,
             num_hidden_layers=2)
KEEP_Q = {0: [0, 1, 2], 1: [4, 5, 6]}  # score: truncate keeps the first query heads of every group
DROPPED_Q = [3, 7]


def _recipe(tmp_path, model_dir, stages, out="out", extra=""):
    return write_recipe(tmp_path, model_dir, stages, out=out, extra=extra)


def _llama(seed=0, **overrides) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    kw = dict(vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False, **SMALL)
    kw.update(overrides)
    config = tf.LlamaConfig(**kw)
    config.architectures = ["LlamaForCausalLM"]
    model = tf.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


def _prune_in_memory(model):
    from gqaprune.arch.adapter import builtin_adapters
    from gqaprune.ops.surgery import prune_heads

    for i in range(model.config.num_hidden_layers):
        prune_heads(model, builtin_adapters()["llama"], i, KEEP_Q)
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tiny import save_tiny

    folder = tmp_path_factory.mktemp("src") / "llama"
    save_tiny("llama", folder, **SMALL)
    return folder


def _masked_reference(model_dir, ids) -> torch.Tensor:
    """The source Llama with the dropped query heads' o_proj columns zeroed: what a plain slice computes."""
    ref = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    d = ref.config.head_dim
    with torch.no_grad():
        for layer in ref.model.layers:
            for h in DROPPED_Q:
                layer.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
        return ref(input_ids=ids).logits


def test_run_saves_stock_mistral(tmp_path, llama_dir):
    """(a) the real runner: 8 -> 6 query heads (does not divide hidden 64) saved as a stock Mistral folder."""
    recipe = _recipe(tmp_path, llama_dir, "  - {type: head_prune, unit: query_head, keep_q_per_kv: 3, "
                                          "score: truncate, reconstruct: none}\n", extra="save_as: mistral\n")
    res = CliRunner().invoke(main, ["validate", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "save_as: mistral" in res.output
    res = CliRunner().invoke(main, ["run", str(recipe), "--quiet"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["model_type"] == "mistral"
    assert "auto_map" not in cfg and not any(k.startswith("gqaprune_") for k in cfg)
    assert cfg["sliding_window"] is None and cfg["num_attention_heads"] == 6 and cfg["head_dim"] == 8
    assert not list(out.glob("*.py"))
    model = tf.AutoModelForCausalLM.from_pretrained(out)  # stock, no trust_remote_code
    assert type(model) is tf.MistralForCausalLM
    ids = torch.arange(40)[None] % 90 + 3
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, _masked_reference(llama_dir, ids), atol=1e-5, rtol=0)
    rep = json.loads((out / "report.json").read_text())
    assert rep["save_as"]["architecture"] == "MistralForCausalLM"
    assert rep["save_as"]["converted_from"] == "LlamaForCausalLM"
    assert 0 <= rep["save_as"]["max_abs_logit_diff"] <= 1e-5
    assert rep["model"]["architecture"] == "LlamaForCausalLM" and rep["model"]["adapter"] == "llama"
    assert rep["roundtrip"]["ok"] and rep["roundtrip"]["loader"] == "from_pretrained"
    assert rep["output_kind"] == "uniform"
    assert rep["shapes_after"]["per_layer"][0]["num_attention_heads"] == 6
    card = (out / "README.md").read_text()
    assert "Saved as MistralForCausalLM" in card and "converted from LlamaForCausalLM" in card
    res = CliRunner().invoke(main, ["verify", str(out)])
    assert res.exit_code == 0, res.output


def test_save_as_auto_keeps_per_layer_format(tmp_path, llama_dir):
    """(d) the same prune without save_as: today's per-layer format (remote code beside the weights)."""
    recipe = _recipe(tmp_path, llama_dir, "  - {type: head_prune, unit: query_head, keep_q_per_kv: 3, "
                                          "score: truncate, reconstruct: none}\n")
    res = CliRunner().invoke(main, ["validate", str(recipe)])
    assert res.exit_code == 0 and "save_as: mistral" in res.output  # the note suggests it
    from gqaprune.runner import run

    rep = run(str(recipe), progress=False)
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "auto_map" in cfg and "gqaprune_layers" in cfg
    assert (out / "modeling_perlayer.py").is_file()
    assert rep["output_kind"] == "per_layer" and "save_as" not in rep
    assert "Saved as" not in (out / "README.md").read_text()


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8, "rope_theta": 1000.0},
])
def test_rope_scaling_carried_over(tmp_path, rope):
    """(b) RoPE parameters reach the Mistral config (in memory and on disk): logits equal to 1e-5."""
    from gqaprune.arch.adapter import builtin_adapters
    from gqaprune.io.checkpoint import load_pretrained, save_model

    llama = _prune_in_memory(_llama(rope_parameters=dict(rope)))
    ids = tiny_inputs(seq=40)
    with torch.no_grad():
        ref = llama(input_ids=ids).logits
    mistral, diff = convert.llama_to_mistral(llama, input_ids=ids)
    assert type(mistral) is tf.MistralForCausalLM and diff <= 1e-5
    assert mistral.config.rope_parameters == rope and mistral.config.num_attention_heads == 6
    save_model(mistral, builtin_adapters()["mistral"], tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["rope_parameters"] == rope
    for reloaded in (tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m"), load_pretrained(tmp_path / "m")):
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, ref, atol=1e-5, rtol=0)


def test_conversion_check_catches_dropped_rope(monkeypatch):
    """The logit check is what guards RoPE: a config that loses the scaling fails the conversion."""
    real = convert.mistral_config_from_llama

    def lossy(config, shape, head_dim):
        cfg = real(config, shape, head_dim)
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_parameters["rope_theta"]}
        return cfg

    monkeypatch.setattr(convert, "mistral_config_from_llama", lossy)
    llama = _prune_in_memory(_llama(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}))
    with pytest.raises(CheckFailed, match="max \\|logit diff\\|"):
        convert.llama_to_mistral(llama)


def test_tied_embeddings_stay_tied():
    llama = _llama(tie_word_embeddings=True)
    mistral, diff = convert.llama_to_mistral(llama)
    assert diff <= 1e-5 and mistral.lm_head.weight is mistral.model.embed_tokens.weight
    assert mistral.model.embed_tokens.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()  # shared


def test_conversion_refuses_per_layer_shapes():
    from gqaprune.arch.adapter import builtin_adapters
    from gqaprune.ops.surgery import prune_heads

    llama = _llama()
    prune_heads(llama, builtin_adapters()["llama"], 0, KEEP_Q)  # layer 0: 6 heads, layer 1: 8
    with pytest.raises(CheckFailed, match="one shape in every layer"):
        convert.llama_to_mistral(llama)


def _config_folder(tmp_path, name, config) -> str:
    folder = tmp_path / name
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    config.save_pretrained(folder)  # validate reads config.json only
    return str(folder)


@pytest.mark.parametrize("name, config, words", [
    ("qwen2", tf.Qwen2Config(vocab_size=96, max_position_embeddings=64, **SMALL), "Qwen2ForCausalLM"),
    ("llama_attn_bias", tf.LlamaConfig(vocab_size=96, attention_bias=True, **SMALL), "attention_bias: true"),
    ("llama_mlp_bias", tf.LlamaConfig(vocab_size=96, mlp_bias=True, **SMALL), "mlp_bias: true"),
])
def test_validate_refuses_save_as_mistral(tmp_path, name, config, words):
    """(c) one line, exit 2, naming the key and what would be valid."""
    folder = _config_folder(tmp_path, name, config)
    recipe = _recipe(tmp_path, folder, "  - {type: head_prune, unit: query_head, keep_q_per_kv: 3}\n",
                     extra="save_as: mistral\n")
    res = CliRunner().invoke(main, ["validate", str(recipe)])
    assert res.exit_code == 2, res.output
    msg = res.output.strip()
    assert len(msg.splitlines()) == 1 and "save_as: mistral" in msg and words in msg and "save_as: auto" in msg


def test_validate_refuses_per_layer_allocation_and_bad_value(tmp_path):
    folder = _config_folder(tmp_path, "llama", tf.LlamaConfig(vocab_size=96, **SMALL))
    recipe = _recipe(tmp_path, folder, "  - {type: head_prune, unit: query_head, keep_q_per_kv: 3, "
                                       "allocation: global}\n", extra="save_as: mistral\n")
    res = CliRunner().invoke(main, ["validate", str(recipe)])
    assert res.exit_code == 2 and "stages[0] head_prune" in res.output and "save_as" in res.output
    recipe = _recipe(tmp_path, folder, "  - {type: layer_drop, num_layers: 1, protect_first: 0, protect_last: 0}\n",
                     extra="save_as: qwen2\n")
    res = CliRunner().invoke(main, ["validate", str(recipe)])
    assert res.exit_code == 2 and "save_as" in res.output and "'auto'" in res.output and "'mistral'" in res.output
    # a Mistral source: save_as: mistral is accepted (nothing to convert)
    folder = _config_folder(tmp_path, "mistral", tf.MistralConfig(vocab_size=96, sliding_window=None, **SMALL))
    recipe = _recipe(tmp_path, folder, "  - {type: head_prune, unit: query_head, keep_q_per_kv: 3}\n",
                     extra="save_as: mistral\n")
    res = CliRunner().invoke(main, ["validate", str(recipe)])
    assert res.exit_code == 0, res.output


def test_inspect_lists_save_as_mistral_head_counts(tmp_path):
    folder = _config_folder(tmp_path, "llama", tf.LlamaConfig(vocab_size=96, **SMALL))
    res = CliRunner().invoke(main, ["inspect", folder, "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["head_counts_that_reload_stock"] == [1, 2, 4, 8]
    assert info["head_counts_that_reload_stock_with_save_as_mistral"] == [1, 2, 3, 4, 6, 8]
    assert "save_as: mistral" in info["save_as_mistral"]
    folder = _config_folder(tmp_path, "biased", tf.LlamaConfig(vocab_size=96, attention_bias=True, **SMALL))
    info = json.loads(CliRunner().invoke(main, ["inspect", folder, "--json"]).output)
    assert info["save_as_mistral"].startswith("not available") and \
        "head_counts_that_reload_stock_with_save_as_mistral" not in info


def test_awq_after_save_as_mistral(tmp_path):
    """save_as applies to the model AutoAWQ quantizes: 6 heads (not dividing hidden 128) quantize as a Mistral;
    without save_as the same recipe is refused before any weights load (it could only be saved per-layer)."""
    from tiny import save_tiny

    src = tmp_path / "src"
    save_tiny("llama", src, hidden_size=128, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
              intermediate_size=128, num_hidden_layers=2)
    stages = ("  - {type: head_prune, unit: query_head, keep_q_per_kv: 3, score: truncate}\n"
              "  - {type: awq, group_size: 64, samples: 4, seq_len: 32}\n")
    res = CliRunner().invoke(main, ["validate", str(_recipe(tmp_path, src, stages))])
    assert res.exit_code == 2 and "save_as: mistral" in res.output and "awq" in res.output
    res = CliRunner().invoke(main, ["run", str(_recipe(tmp_path, src, stages, extra="save_as: mistral\n")), "--quiet"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["quantization_config"]["quant_method"] == "awq"
    rep = json.loads((out / "report.json").read_text())
    assert rep["output_kind"] == "awq" and rep["roundtrip"]["ok"] and rep["awq"]["verified"]
    assert rep["save_as"]["converted_from"] == "LlamaForCausalLM" and rep["save_as"]["max_abs_logit_diff"] <= 1e-5
    assert "before quantization" in (out / "README.md").read_text()
