import pytest
import torch

from gqaprune.arch.adapter import resolve_adapter
from gqaprune.context import RunContext
from gqaprune.recipe import LayerDropStage, Recipe
from gqaprune.scoring.hidden import layer_hidden_states
from gqaprune.stages.layer_drop import LayerDrop, contiguous_runs
from tiny import tiny_inputs, tiny_model


def _ctx(model):
    recipe = Recipe(model="x", output="o", stages=[{"type": "layer_drop", "num_layers": 1}])
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    return RunContext(model=model, adapter=resolve_adapter("auto", model.config.architectures), tokenizer=None,
                      recipe=recipe, calib=calib, progress=False)


def test_contiguous_runs():
    assert contiguous_runs([6, 2, 3]) == [(2, 4), (6, 7)]
    assert contiguous_runs([0]) == [(0, 1)]


@pytest.mark.parametrize("family", ["llama", "phi3", "phi", "qwen3"])  # gemma3: tests/stages/test_output_norms.py
def test_repair_brings_the_residual_stream_back_toward_the_dropped_run(family):
    # 4 layers, layers 1 and 2 dropped: layer 0's down projection learns to write what they added.
    # On the calibration tokens, the repaired model's stream after layer 0 must be closer to the
    # original stream after layer 2 than the drop-only model's, by exactly the reported error.
    stage = dict(type="layer_drop", num_layers=2, protect_first=1, protect_last=1)
    ref = tiny_model(family, num_hidden_layers=4)
    ctx = _ctx(ref)
    target = layer_hidden_states(ref, ctx.adapter, ctx.calib)[3]  # (B, T, H): input of layer 3

    plain = tiny_model(family, num_hidden_layers=4)
    LayerDrop(LayerDropStage(**stage, reconstruct="none")).apply(_ctx(plain))
    fixed = tiny_model(family, num_hidden_layers=4)
    rep = LayerDrop(LayerDropStage(**stage, reconstruct="least_squares")).apply(_ctx(fixed))
    assert rep["dropped_layers"] == [1, 2]
    (repair,) = rep["repairs"]
    assert repair["repaired_layer"] == 0 and repair["dropped"] == [1, 2]

    def miss(model):  # ||stream after the kept layer 0 - original stream after layer 2||^2
        return float((layer_hidden_states(model, ctx.adapter, ctx.calib)[1] - target).double().pow(2).sum())

    original = tiny_model(family, num_hidden_layers=4)
    h = layer_hidden_states(original, ctx.adapter, ctx.calib)
    dropped_sq = float((h[3] - h[1]).double().pow(2).sum())
    assert miss(plain) == pytest.approx(dropped_sq, rel=1e-4)  # dropping alone misses all of it
    assert miss(fixed) == pytest.approx(repair["rel_error_lsq"] * dropped_sq, rel=1e-3)
    assert repair["rel_error_lsq"] < 0.99


def test_none_is_plain_dropping_and_a_run_at_layer_zero_is_not_repaired():
    ids = tiny_inputs()
    a, b = tiny_model("llama"), tiny_model("llama")
    LayerDrop(LayerDropStage(type="layer_drop", num_layers=1, reconstruct="none")).apply(_ctx(a))
    rep = LayerDrop(LayerDropStage(type="layer_drop", num_layers=1, protect_first=0, protect_last=2,
                                   reconstruct="least_squares")).apply(_ctx(b))
    assert rep["dropped_layers"] == [0]
    assert rep["repairs"] == [{"dropped": [0], "repaired_layer": None, "why_not": "no kept layer before layer 0"}]
    with torch.no_grad():  # layer 0 dropped without repair == the reference with layer 0 skipped
        ref = tiny_model("llama")
        LayerDrop(LayerDropStage(type="layer_drop", num_layers=1, protect_first=0, protect_last=2,
                                 reconstruct="none")).apply(_ctx(ref))
        assert torch.equal(b(ids).logits, ref(ids).logits)
    assert a.config.num_hidden_layers == 2
