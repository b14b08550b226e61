"""`gqaprune plan`: each stage's plan is the one place for its counts and shape rules, so what plan shows is what
the stage applies, and invalid amounts are refused before any weights load."""

import copy

import pytest
import torch

from gqaprune.arch.adapter import model_shapes, resolve_adapter
from gqaprune.context import RunContext
from gqaprune.errors import InputError
from gqaprune.plan import simulate
from gqaprune.recipe import Recipe
from gqaprune.stages import STAGES, build_stage
from tiny import tiny_model


def _recipe(stages, **kw):
    return Recipe(model="x", output="o", calibration={"samples": 8, "seq_len": 16, "batch_size": 4}, stages=stages,
                  **kw)


def _apply_all(model, recipe):  # (simulate gets a copy of the config: its meta-model surgery edits the config)
    adapter = resolve_adapter("auto", model.config.architectures)
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    ctx = RunContext(model=model, adapter=adapter, tokenizer=None, recipe=recipe, calib=calib, progress=False)
    for st in recipe.stages:
        build_stage(st).apply(ctx)
    return model_shapes(ctx.model, adapter)


@pytest.mark.parametrize("family", ["llama", "phi3"])
@pytest.mark.parametrize("stages", [
    [{"type": "layer_drop", "fraction": 0.4, "reconstruct": "none"},
     {"type": "head_prune", "unit": "query_head", "prune_ratio": 0.5, "score": "magnitude"},
     {"type": "neuron_prune", "prune_ratio": 0.3, "align": 8, "score": "magnitude"}],
    [{"type": "head_prune", "keep_kv_heads": 1, "score": "truncate", "protect_layers": [-1], "reconstruct": "none"},
     {"type": "neuron_prune", "keep": 50, "align": 16, "score": "random", "protect_layers": [0]}],
])
def test_planned_shapes_are_what_the_stages_apply(family, stages):
    model = tiny_model(family, num_hidden_layers=5)
    adapter = resolve_adapter("auto", model.config.architectures)
    recipe = _recipe(stages)
    plans = simulate(recipe, copy.deepcopy(model.config), adapter)
    before = model_shapes(model, adapter)
    applied = _apply_all(model, recipe)
    assert plans[0].per_layer == before
    assert plans[-1].per_layer == applied
    assert applied != before  # the stages did change the model
    assert plans[-1].num_layers == len(applied)
    assert plans[-1].params == sum(p.numel() for p in model.parameters())


def test_layer_drop_count_from_fraction_is_the_applied_count():
    model = tiny_model("llama", num_hidden_layers=7)
    adapter = resolve_adapter("auto", model.config.architectures)
    recipe = _recipe([{"type": "layer_drop", "fraction": 0.3, "reconstruct": "none"}])  # round(2.1) = 2
    stage = build_stage(recipe.stages[0])
    from gqaprune.stages.base import PlanInput

    planned = stage.plan(model_shapes(model, adapter), PlanInput("layer_drop"))
    assert planned.counts["drop"] == 2
    assert len(_apply_all(model, recipe)) == 5


def test_invalid_ratio_lists_the_valid_ones_and_names_the_stage():
    model = tiny_model("llama")  # 8 query heads over 2 KV heads
    adapter = resolve_adapter("auto", model.config.architectures)
    recipe = _recipe([{"type": "neuron_prune", "prune_ratio": 0.25, "align": 8},
                      {"type": "head_prune", "unit": "query_head", "prune_ratio": 0.3}])
    with pytest.raises(InputError) as e:
        simulate(recipe, copy.deepcopy(model.config), adapter)
    msg = str(e.value)
    assert msg.startswith("stages[1] head_prune: prune_ratio 0.3 cannot be met exactly")
    assert "valid ratios: 1/4 (0.25), 1/2 (0.5), 3/4 (0.75)" in msg and "\n" not in msg


def test_too_many_layers_dropped_is_refused_in_plan_and_apply_alike():
    model = tiny_model("llama")  # 3 layers, 1 candidate with the default protections
    adapter = resolve_adapter("auto", model.config.architectures)
    recipe = _recipe([{"type": "layer_drop", "num_layers": 2}])
    with pytest.raises(InputError, match=r"^stages\[0\] layer_drop: dropping 2 layers, but only 1 of 3"):
        simulate(recipe, copy.deepcopy(model.config), adapter)
    with pytest.raises(InputError, match=r"^layer_drop: dropping 2 layers, but only 1 of 3"):
        _apply_all(model, recipe)
    assert len(model_shapes(model, adapter)) == 3  # refused before anything changed


@pytest.mark.parametrize("stage,per_layer", [
    ({"type": "head_prune", "prune_ratio": 0.5}, False),
    ({"type": "head_prune", "prune_ratio": 0.5, "allocation": "global"}, True),
    ({"type": "head_prune", "prune_ratio": 0.5, "protect_layers": [0]}, True),
    ({"type": "neuron_prune", "prune_ratio": 0.5}, False),
    ({"type": "neuron_prune", "prune_ratio": 0.5, "allocation": "global"}, True),
    ({"type": "layer_drop", "num_layers": 1}, False),
    ({"type": "recover"}, False),
])
def test_per_layer_shape_rule_is_the_stages_and_awq_refuses_it(stage, per_layer):
    assert build_stage(_recipe([stage]).stages[0]).gives_per_layer_shapes() is per_layer
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    adapter = resolve_adapter("auto", model.config.architectures)
    recipe = _recipe([stage, {"type": "awq"}])
    if per_layer:
        with pytest.raises(InputError, match=r"^stages\[1\] awq: the awq stage quantizes a model with one shape in "
                                             rf"every layer; stages\[0\] {stage['type']} give per-layer shapes"):
            simulate(recipe, copy.deepcopy(model.config), adapter)
        with pytest.raises(InputError, match=rf"^save_as: mistral needs one shape in every layer; stages\[0\] "):
            simulate(_recipe([stage], save_as="mistral"), copy.deepcopy(model.config), adapter)
    else:
        try:
            simulate(recipe, copy.deepcopy(model.config), adapter)
        except InputError as e:  # widths AutoAWQ cannot take are a different refusal
            assert "one shape in every layer" not in str(e)


def test_awq_is_the_only_output_stage_and_must_be_last():
    assert [name for name, cls in STAGES.items() if cls.writes_output] == ["awq"]
    with pytest.raises(Exception, match=r"stages\[0\] awq must be the last stage \(found after it: recover\)"):
        _recipe([{"type": "awq"}, {"type": "recover"}])


@pytest.mark.parametrize("stage,local", [
    ({"type": "head_prune", "prune_ratio": 0.5, "score": "activation"}, True),
    ({"type": "head_prune", "prune_ratio": 0.5, "score": "activation", "allocation": "global"}, False),
    ({"type": "head_prune", "prune_ratio": 0.5, "score": "taylor"}, False),  # gradients of the model's loss
    ({"type": "head_prune", "prune_ratio": 0.5, "score": "ablation"}, False),
    ({"type": "neuron_prune", "prune_ratio": 0.5, "score": "reconstruction"}, True),
    ({"type": "neuron_prune", "prune_ratio": 0.5, "score": "taylor"}, False),
    ({"type": "layer_drop", "num_layers": 1}, False),
    ({"type": "recover"}, False),
])
def test_layer_local_stages_are_those_with_layer_local_scores_and_uniform_allocation(stage, local):
    assert build_stage(_recipe([stage]).stages[0]).layer_local() is local
