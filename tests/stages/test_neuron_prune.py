"""neuron_prune: dead channels, alignment, reconstruction."""

import pytest
import torch

from gqaprune.arch.adapter import decoder_layers, get_module, model_shapes, resolve_adapter
from gqaprune.context import RunContext
from gqaprune.recipe import NeuronPruneStage, Recipe
from gqaprune.stages.neuron_prune import NeuronPrune
from tiny import tiny_model


def _ctx(model):
    recipe = Recipe(model="x", output="o", stages=[{"type": "neuron_prune", "prune_ratio": 0.5}])
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    return RunContext(model=model, adapter=resolve_adapter("auto", model.config.architectures), tokenizer=None,
                      recipe=recipe, calib=calib, progress=False)


@pytest.mark.parametrize("family", ["llama", "phi3", "phi", "qwen3", "gemma3"])
def test_frequency_removes_exactly_the_dead_channels(family):
    model = tiny_model(family)
    ctx = _ctx(model)
    dead = [3, 10, 11, 50, 60, 77, 80, 95]
    r = ctx.adapter.layer
    for lay in decoder_layers(model, ctx.adapter):
        with torch.no_grad():
            if r.fused_gate_up:
                w = get_module(lay, r.gate_up)
                w.weight[dead] = 0
                w.weight[[d + 96 for d in dead]] = 0
            else:
                for role in ("gate", "up"):
                    if getattr(r, role):
                        m = get_module(lay, getattr(r, role))
                        m.weight[dead] = 0
                        if m.bias is not None:
                            m.bias[dead] = 0
    stage = NeuronPruneStage(type="neuron_prune", keep=88, align=8, score="frequency", reconstruct="none")
    rep = NeuronPrune(stage).apply(ctx)
    for layer in rep["layers"]:
        assert layer["width_after"] == 88
    down = get_module(decoder_layers(model, ctx.adapter)[0], r.down)
    assert down.in_features == 88


def test_alignment_rounds_down_and_reports_it():
    model = tiny_model("llama")
    ctx = _ctx(model)
    rep = NeuronPrune(NeuronPruneStage(type="neuron_prune", prune_ratio=0.3, align=16, reconstruct="none")).apply(ctx)
    # 96 * 0.7 = 67.2 -> 67 wanted, 64 kept (multiple of 16)
    assert all(l["width_after"] == 64 and l["alignment_rounded_down_by"] == 3 for l in rep["layers"])
    assert {s["intermediate_size"] for s in model_shapes(model, ctx.adapter)} == {64}


def test_least_squares_never_worse_than_slicing():
    model = tiny_model("llama")
    ctx = _ctx(model)
    rep = NeuronPrune(NeuronPruneStage(type="neuron_prune", prune_ratio=0.5, align=8)).apply(ctx)
    for layer in rep["layers"]:
        assert layer["rel_error_lsq"] <= layer["rel_error_slice"] + 1e-12


def test_global_allocation_prunes_where_channels_matter_least():
    # layer 0's down_proj scaled down 1000x: every activation score there is tiny, so global
    # allocation (raw scores ranked across layers) removes that layer's channels first
    model = tiny_model("llama")
    ctx = _ctx(model)
    with torch.no_grad():
        get_module(decoder_layers(model, ctx.adapter)[0], ctx.adapter.layer.down).weight.mul_(1e-3)
    stage = NeuronPruneStage(type="neuron_prune", prune_ratio=0.25, align=8, score="activation",
                             reconstruct="none", allocation="global")
    rep = NeuronPrune(stage).apply(ctx)
    widths = [l["width_after"] for l in rep["layers"]]
    # 3 x 72 kept in all: layer 0 gives up 72 of its 96 channels before the others give any
    assert widths == [24, 96, 96], widths


def test_global_activation_scores_are_measured_against_the_residual_stream():
    # embeddings scaled down 1000x: layer 0's residual input is tiny, so its channels, whose outputs are as
    # large as any layer's (the MLP input is normalized), matter most relative to the stream they write into;
    # ranked raw they looked as cheap as the others. Global allocation must keep layer 0 whole.
    model = tiny_model("llama")
    ctx = _ctx(model)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e-3)
    stage = NeuronPruneStage(type="neuron_prune", prune_ratio=0.25, align=8, score="activation",
                             reconstruct="none", allocation="global")
    widths = [l["width_after"] for l in NeuronPrune(stage).apply(ctx)["layers"]]
    assert widths[0] == 96 and sum(widths) == 3 * 72, widths
