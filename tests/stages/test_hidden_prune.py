"""hidden_prune: scores find dead channels, alignment, rotation + repair, validate errors, run and reload."""

import json

import pytest
import torch
from click.testing import CliRunner

from gqaprune.arch.adapter import decoder_layers, get_module, resolve_adapter
from gqaprune.cli import main
from gqaprune.context import RunContext
from gqaprune.errors import InputError
from gqaprune.ops.hidden import reader_groups, writers
from gqaprune.recipe import HiddenPruneStage, Recipe
from gqaprune.stages.hidden_prune import HiddenPrune
from tiny import save_tiny, tiny_inputs, tiny_model, write_recipe

DEAD = [2, 9, 10, 33, 40, 41, 58, 63]


def _ctx(model):
    recipe = Recipe(model="x", output="o", stages=[{"type": "hidden_prune", "prune_ratio": 0.125}])
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    return RunContext(model=model, adapter=resolve_adapter("auto", model.config.architectures), tokenizer=None,
                      recipe=recipe, calib=calib, progress=False)


def _kill_channels(model, adapter, dead):
    """The channels carry nothing: zero embedding columns, reader columns and writer rows and biases."""
    with torch.no_grad():
        get_module(model, adapter.model.embed).weight[:, dead] = 0
        get_module(model, adapter.model.lm_head).weight[:, dead] = 0
        for layer in decoder_layers(model, adapter):
            for _, readers in reader_groups(adapter):
                for p in readers:
                    get_module(layer, p).weight[:, dead] = 0
            for p in writers(adapter):
                lin = get_module(layer, p)
                lin.weight[dead] = 0
                if lin.bias is not None:
                    lin.bias[dead] = 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "phi"])
@pytest.mark.parametrize("score", ["activation", "magnitude", "taylor"])
def test_scores_remove_exactly_the_dead_channels(family, score):
    model = tiny_model(family)
    ctx = _ctx(model)
    _kill_channels(model, ctx.adapter, DEAD)
    alive = [j for j in range(64) if j not in DEAD]
    emb_before = get_module(model, ctx.adapter.model.embed).weight[:, alive].clone()
    stage = HiddenPruneStage(type="hidden_prune", keep=56, align=8, score=score, reconstruct="none")
    rep = HiddenPrune(stage).apply(ctx)
    assert rep["hidden_size_before"] == 64 and rep["hidden_size_after"] == 56 and model.config.hidden_size == 56
    # the kept channels are exactly the live ones, in order
    assert torch.equal(get_module(model, ctx.adapter.model.embed).weight, emb_before)


def test_random_is_seeded_and_alignment_rounds_down():
    runs = []
    for _ in range(2):
        model = tiny_model("llama")
        ctx = _ctx(model)
        stage = HiddenPruneStage(type="hidden_prune", prune_ratio=0.3, align=16, score="random", reconstruct="none")
        rep = HiddenPrune(stage).apply(ctx)
        runs.append(get_module(model, ctx.adapter.model.embed).weight.clone())
        # 64 * 0.7 = 44.8 -> 45 wanted, 32 kept (multiple of 16)
        assert rep["hidden_size_after"] == 32 and rep["alignment_rounded_down_by"] == 13
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_rotation_then_repair_beats_plain_slicing(family):
    ids = tiny_inputs(batch=8, seq=16, seed=5)

    def kl_to_dense(rotate, reconstruct):
        model = tiny_model(family)
        with torch.no_grad():
            dense = torch.log_softmax(model(input_ids=ids, use_cache=False).logits, -1)
        ctx = _ctx(model)
        ctx.calib = ids
        stage = HiddenPruneStage(type="hidden_prune", keep=48, align=8, rotate=rotate, reconstruct=reconstruct)
        rep = HiddenPrune(stage).apply(ctx)
        with torch.no_grad():
            pruned = torch.log_softmax(model(input_ids=ids, use_cache=False).logits, -1)
        return float((dense.exp() * (dense - pruned)).sum(-1).mean()), rep

    plain, _ = kl_to_dense("none", "none")
    repaired, rep = kl_to_dense("none", "least_squares")
    rotated, rep_rot = kl_to_dense("pca", "least_squares")
    assert repaired < plain and rotated < plain
    assert rep["repair"]["mean_rel_error_lsq"] <= rep["repair"]["mean_rel_error_slice"]
    assert 0 < rep_rot["pca_variance_kept_top"] < 1 and rep_rot["untied_lm_head"] is False


def test_rotation_of_layernorm_model_is_a_stage_error():
    model = tiny_model("phi")
    stage = HiddenPruneStage(type="hidden_prune", keep=48, align=8, rotate="pca")
    with pytest.raises(InputError, match="LayerNorm"):
        HiddenPrune(stage).apply(_ctx(model))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hidden_src")
    out = {}
    for family in ("llama", "phi"):
        save_tiny(family, root / family)
        out[family] = root / family
    out["llama_tied"] = _save_tied(root / "llama_tied")
    return out


def _save_tied(folder):
    model, _ = save_tiny("llama", folder)
    model.config.tie_word_embeddings = True
    model.tie_weights()  # one matrix for embedding and head
    model.save_pretrained(str(folder))
    return folder


def _validate(tmp_path, model_dir, stages):
    recipe = write_recipe(tmp_path, model_dir, stages)
    return CliRunner().invoke(main, ["validate", str(recipe)])


def test_validate_names_awq_alignment_and_layernorm(tmp_path, saved):
    res = _validate(tmp_path, saved["llama"], "  - {type: hidden_prune, prune_ratio: 0.25, align: 16}\n"
                                              "  - {type: awq, group_size: 32}\n")
    # 64 * 0.75 = 48: not a multiple of the AWQ group size 32; the awq stage's plan sees the new width
    assert res.exit_code == 2 and "stages[1] awq" in res.output and "hidden_size 48" in res.output
    res = _validate(tmp_path, saved["phi"], "  - {type: hidden_prune, prune_ratio: 0.25, align: 16, rotate: pca}\n")
    assert res.exit_code == 2 and "LayerNorm" in res.output and "rotate: none" in res.output
    res = _validate(tmp_path, saved["llama"], "  - {type: hidden_prune, keep: 8, align: 16}\n")
    assert res.exit_code == 2 and "aligned to 16 leaves 0" in res.output and "multiple of 16" in res.output
    res = _validate(tmp_path, saved["llama"], "  - {type: hidden_prune, prune_ratio: 0.25, keep: 48}\n")
    assert res.exit_code == 2 and "exactly one of prune_ratio, keep" in res.output


def test_plan_shows_the_new_width_and_the_untied_head(tmp_path, saved):
    recipe = write_recipe(tmp_path, saved["llama"], "  - {type: hidden_prune, keep: 48, align: 16, rotate: pca}\n")
    res = CliRunner().invoke(main, ["plan", str(recipe), "--json"])
    assert res.exit_code == 0, res.output
    before, after = json.loads(res.output)
    vocab = json.loads((saved["llama"] / "config.json").read_text())["vocab_size"]
    # per stream channel removed (untied source): q/k/v rows 8*16 + 2*2*16, o columns 8*16, gate/up rows 2*96,
    # down columns 96 and 2 norm weights in each of 3 layers; an embedding and an LM-head entry per token; the final norm
    per_channel = 3 * (192 + 128 + 2 * 96 + 96 + 2) + 2 * vocab + 1
    assert before["params"] - after["params"] == 16 * per_channel
    assert after["kv_cache_bytes_per_token"] == before["kv_cache_bytes_per_token"]  # head_dim and KV heads unchanged
    assert (before["hidden_size"], after["hidden_size"]) == (64, 48)


def test_plan_counts_the_untied_head_of_a_tied_model(tmp_path):
    folder = _save_tied(tmp_path / "tied")
    cfg = json.loads((folder / "config.json").read_text())
    recipe = write_recipe(tmp_path, folder, "  - {type: hidden_prune, keep: 48, align: 16, rotate: pca}\n")
    res = CliRunner().invoke(main, ["plan", str(recipe), "--json"])
    assert res.exit_code == 0, res.output
    before, after = json.loads(res.output)
    vocab = cfg["vocab_size"]
    per_channel = 3 * (192 + 128 + 2 * 96 + 96 + 2) + vocab + 1  # tied: one matrix for embedding and head
    assert before["params"] - after["params"] == 16 * per_channel - vocab * 48  # the untied head's new matrix
    assert any("unties the LM head" in n for n in after["notes"])


@pytest.mark.parametrize("family,rotate", [("llama", "pca"), ("llama_tied", "pca"), ("llama_tied", "none"),
                                           ("phi", "none")])
def test_run_saves_a_model_stock_from_pretrained_reloads(tmp_path, saved, family, rotate):
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path, saved[family],
                          f"  - {{type: hidden_prune, keep: 48, align: 16, score: activation, rotate: {rotate}}}\n")
    res = CliRunner().invoke(main, ["run", str(recipe), "--quiet"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "ok" and rep["roundtrip"]["ok"] and rep["output_kind"] == "uniform"
    assert rep["shapes_after"]["hidden_size"] == 48 and rep["stages"][0]["hidden_size_after"] == 48
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 48 and cfg["head_dim"] == 16
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[1] == 48
    ids = tiny_inputs(vocab_size=cfg["vocab_size"], batch=1, seq=8)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    assert "hidden size 64 -> 48" in (out / "README.md").read_text()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (family == "llama_tied" and rotate == "none")  # rotation unties; slicing alone keeps the tie
