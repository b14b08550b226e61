"""Sequential calibration runs layer by layer and repairs against the unpruned model's outputs."""

import torch
from torch import nn

import gqaprune.ops.sequential as seq
from gqaprune.arch.adapter import resolve_adapter
from gqaprune.context import RunContext
from gqaprune.recipe import HeadPruneStage, NeuronPruneStage, Recipe
from gqaprune.stages.head_prune import HeadPrune
from gqaprune.stages.neuron_prune import NeuronPrune
from tiny import tiny_model


def _ctx(model, sequential):
    recipe = Recipe(model="x", output="o", stages=[{"type": "head_prune", "prune_ratio": 0.5}],
                    calibration={"sequential": sequential, "batch_size": 4})
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    return RunContext(model=model, adapter=resolve_adapter("auto", model.config.architectures), tokenizer=None,
                      recipe=recipe, calib=calib, progress=False)


def test_sequential_hooks_one_layer_at_a_time(monkeypatch):
    live = {"now": 0, "max": 0}
    real_register = nn.Module.register_forward_pre_hook

    def counting_register(self, hook, **kw):
        handle = real_register(self, hook, **kw)
        live["now"] += 1
        live["max"] = max(live["max"], live["now"])
        real_remove = handle.remove

        def remove():
            live["now"] -= 1
            real_remove()
        handle.remove = remove
        return handle

    monkeypatch.setattr(nn.Module, "register_forward_pre_hook", counting_register)
    order = []
    real_inputs = seq._layer_inputs
    monkeypatch.setattr(seq, "_layer_inputs", lambda m, a, i, p, ids: order.append(i) or real_inputs(m, a, i, p, ids))
    model = tiny_model("llama", num_hidden_layers=4)
    rep = HeadPrune(HeadPruneStage(type="head_prune", prune_ratio=0.5)).apply(_ctx(model, True))
    assert rep["sequential"]
    assert live["max"] == 1  # only one layer's projection hooked at any time
    # layers visited in order, each for both models over the 2 batches
    assert order == [i for i in range(4) for _ in range(4)]


def test_sequential_first_layer_matches_independent_and_errors_are_bounded():
    errs = {}
    for mode in (False, True):
        model = tiny_model("llama", num_hidden_layers=4, seed=3)
        cfg = NeuronPruneStage(type="neuron_prune", prune_ratio=0.5, align=8, reconstruct_holdout=0)
        rep = NeuronPrune(cfg).apply(_ctx(model, mode))
        errs[mode] = [l["rel_error_lsq"] for l in rep["layers"]]
    # layer 0 sees identical inputs in both modes (and both refit with reconstruct_damp: no held-out choice)
    assert abs(errs[True][0] - errs[False][0]) < 1e-6
    assert all(e < 1.0 for e in errs[True])
