"""End to end on tiny saved models: output folder, round trip, corruption, --force, verify."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from gqaprune.cli import main
from gqaprune.errors import CheckFailed
from tiny import write_recipe


def _recipe(tmp_path, model_dir, stages, out="out", extra=""):
    return write_recipe(tmp_path, model_dir, stages, out=out, extra=extra)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tiny import save_tiny

    folder = tmp_path_factory.mktemp("src") / "llama"
    save_tiny("llama", folder, num_hidden_layers=4)
    return folder


STAGES = ("  - {type: layer_drop, num_layers: 1}\n"
          "  - {type: head_prune, prune_ratio: 0.5}\n"
          "  - {type: neuron_prune, prune_ratio: 0.25, align: 8}\n")


def test_run_writes_output_folder_and_reloads(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM

    recipe = _recipe(tmp_path, llama_dir, STAGES)
    res = CliRunner().invoke(main, ["run", str(recipe), "--quiet"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "recipe.yaml", "report.json", "README.md", "plots",
            "tokenizer.json", "generation_config.json"} <= names
    assert (out / "recipe.yaml").read_text() == recipe.read_text()
    rep = json.loads((out / "report.json").read_text())
    for key in ("status", "gates", "gqaprune_version", "recipe_sha256", "model", "params_before", "params_after",
                "stages", "shapes_after", "roundtrip", "eval", "files_sha256", "versions"):
        assert key in rep
    assert rep["status"] == "ok" and rep["roundtrip"]["ok"] and rep["roundtrip"]["max_abs_logit_diff"] <= 1e-4
    assert rep["params_after"] < rep["params_before"]
    assert rep["shapes_after"]["num_hidden_layers"] == 3
    assert all(s == {"num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 72}
               for s in rep["shapes_after"]["per_layer"])
    assert [s["type"] for s in rep["stages"]] == ["layer_drop", "head_prune", "neuron_prune"]
    assert all(s["params_after"] <= s["params_before"] and s["seconds"] >= 0 for s in rep["stages"])
    # KV cache per token, fp32: 2 (k, v) x KV heads x head_dim 16 x 4 bytes per layer; 4 layers x 2 KV heads
    # before, then 3 layers (layer drop) and 3 layers x 1 KV head (half the groups)
    assert rep["kv_cache_bytes_per_token_before"] == 4 * 2 * 2 * 16 * 4
    assert [s["kv_cache_bytes_per_token_after"] for s in rep["stages"]] == [3 * 2 * 2 * 16 * 4, 3 * 2 * 1 * 16 * 4,
                                                                           3 * 2 * 1 * 16 * 4]
    assert rep["kv_cache_bytes_per_token_after"] == 3 * 2 * 1 * 16 * 4
    assert "| KV cache bytes per token (float32) | 1,024 | 384 | -62.5% |" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)  # stock transformers
    assert model.config.num_attention_heads == 4 and model.config.head_dim == 16
    assert not list(tmp_path.glob(".out.gqaprune-tmp-*"))
    res = CliRunner().invoke(main, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    # refuse an existing output without --force; replace it with --force
    res = CliRunner().invoke(main, ["run", str(recipe), "--quiet"])
    assert res.exit_code == 2 and "exists" in res.output
    with open(out / "model.safetensors", "r+b") as f:  # flip a byte of the weights
        f.seek(-3, 2)
        b = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    res = CliRunner().invoke(main, ["verify", str(out)])
    assert res.exit_code != 0 and "model.safetensors (changed)" in res.output


def test_roundtrip_check_fails_on_corrupted_weights(tmp_path, llama_dir, monkeypatch):
    import gqaprune.io.checkpoint as ckpt
    from gqaprune.runner import run

    real_save = ckpt.save_model

    def save_then_corrupt(model, adapter, folder, **kw):
        info = real_save(model, adapter, folder, **kw)
        path = folder / "model.safetensors"
        tensors = load_file(path)
        key = next(k for k in tensors if "o_proj" in k)
        tensors[key] = tensors[key] + 0.5
        save_file(tensors, path, metadata={"format": "pt"})
        return info

    monkeypatch.setattr(ckpt, "save_model", save_then_corrupt)
    recipe = _recipe(tmp_path, llama_dir, "  - {type: layer_drop, num_layers: 1}\n")
    with pytest.raises(CheckFailed, match="round trip failed"):
        run(str(recipe), progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("family", ["qwen2", "phi3", "phi", "mistral", "qwen3", "gemma3"])
def test_run_other_families(tmp_path, family):
    from tiny import save_tiny

    from gqaprune.runner import run

    src = tmp_path / family
    save_tiny(family, src)
    recipe = _recipe(tmp_path, src, "  - {type: head_prune, unit: query_head, prune_ratio: 0.25}\n"
                                     "  - {type: neuron_prune, prune_ratio: 0.5, align: 16}\n")
    rep = run(str(recipe), progress=False)
    assert rep["roundtrip"]["ok"]
    assert rep["shapes_after"]["per_layer"][0] == {"num_attention_heads": 6, "num_key_value_heads": 2,
                                                   "intermediate_size": 48}


def test_gemma3_layer_types_survive_every_stage_and_layer_drop_repair_resolves_to_none(tmp_path):
    # 4 layers typed sliding, sliding, full, sliding (window 4); layer_drop's default reconstruct resolves to
    # none (post_mlp_output_norm), heads and channels are pruned with repair, and the saved config keeps the
    # surviving layers' types; the round trip compares logits of the reloaded folder.
    import json

    from tiny import save_tiny

    from gqaprune.runner import run

    src = tmp_path / "gemma3"
    save_tiny("gemma3", src, num_hidden_layers=4)
    recipe = _recipe(tmp_path, src, "  - {type: layer_drop, num_layers: 1}\n"
                                    "  - {type: head_prune, unit: group, keep_kv_heads: 1}\n"
                                    "  - {type: neuron_prune, prune_ratio: 0.5, align: 16}\n")
    rep = run(str(recipe), progress=False)
    assert rep["roundtrip"]["ok"] and rep["roundtrip"]["max_abs_logit_diff"] <= 1e-4
    drop = rep["stages"][0]
    assert drop["reconstruct"] == "none" and drop["repairs"] == [] and "post_mlp_output_norm" in drop["note"]
    assert any("reconstruct resolves to none" in n for n in rep["plan"][1]["notes"])
    types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["layer_types"] == [types[i] for i in range(4) if i not in drop["dropped_layers"]]
    assert saved["num_hidden_layers"] == 3 and saved["architectures"] == ["Gemma3ForCausalLM"]
    assert rep["shapes_after"]["per_layer"] == [{"num_attention_heads": 4, "num_key_value_heads": 1,
                                                 "intermediate_size": 48}] * 3


def test_global_allocation_gives_per_layer_output_that_reloads(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM

    import gqaprune
    from gqaprune.runner import run

    recipe = _recipe(tmp_path, llama_dir, "  - {type: head_prune, unit: query_head, prune_ratio: 0.5, "
                                          "allocation: global, score: taylor}\n"
                                          "  - {type: neuron_prune, prune_ratio: 0.5, align: 8, allocation: global}\n")
    rep = run(str(recipe), progress=False)
    out = tmp_path / "out"
    assert rep["roundtrip"]["ok"]
    ids = torch.arange(20)[None] % 100
    m1 = gqaprune.load_pretrained(out)
    m2 = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(m1(ids).logits, m2(ids).logits, atol=1e-5, rtol=0)
    total_heads = sum(s["num_attention_heads"] for s in rep["shapes_after"]["per_layer"])
    assert total_heads == 4 * 4  # half of 4 layers x 8 heads


def test_inspect_lists_valid_counts(llama_dir):
    res = CliRunner().invoke(main, ["inspect", str(llama_dir), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["heads"] == 8 and info["kv_heads"] == 2 and info["group_size"] == 4
    assert info["valid_keep_kv_heads"] == [1] and info["valid_keep_q_per_kv"] == [1, 2, 3]
    assert info["head_counts_that_reload_stock"] == [1, 2, 4, 8]
