"""The one-shot repair of head_prune and neuron_prune, and hidden_prune's reader refit: the held-out choice, as
the stages run it."""

import pytest
import torch

from gqaprune.arch.adapter import resolve_adapter
from gqaprune.context import RunContext
from gqaprune.ops.reconstruct import damp_grid
from gqaprune.recipe import HeadPruneStage, NeuronPruneStage, Recipe
from gqaprune.stages.head_prune import HeadPrune
from gqaprune.stages.neuron_prune import NeuronPrune
from gqaprune.stages.repair import hold_from
from tiny import tiny_model

CHOICES = {"slice", *damp_grid(0.01)}


def _ctx(model, stage: dict, sequential: bool = False):
    recipe = Recipe(model="x", output="o", stages=[stage], calibration={"batch_size": 4, "sequential": sequential})
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))  # 8 windows of 16 tokens
    return RunContext(model=model, adapter=resolve_adapter("auto", model.config.architectures), tokenizer=None,
                      recipe=recipe, calib=calib, progress=False)


STAGES = [(NeuronPrune, NeuronPruneStage, {"type": "neuron_prune", "prune_ratio": 0.5, "align": 8}),
          (HeadPrune, HeadPruneStage, {"type": "head_prune", "unit": "query_head", "keep_q_per_kv": 2})]


@pytest.mark.parametrize("cls,config,stage", STAGES, ids=["neuron_prune", "head_prune"])
def test_each_layer_chooses_on_the_last_quarter_of_the_windows(cls, config, stage):
    rep = cls(config(**stage)).apply(_ctx(tiny_model("llama"), stage))
    layers = [e for e in rep["layers"] if "rel_error_lsq" in e]
    assert layers and all(e["held_out_tokens"] == 2 * 16 for e in layers)  # 2 of 8 windows
    for e in layers:
        assert e["damp_chosen"] in CHOICES
        assert set(e["held_out_rel_error"]) == {str(c) for c in CHOICES}
        best = min(e["held_out_rel_error"].values())
        assert e["held_out_rel_error"][str(e["damp_chosen"])] == best
        if e["damp_chosen"] == "slice":
            assert e["rel_error_lsq"] == e["rel_error_slice"]
    assert sum(rep["repair_choices"].values()) == len(layers)


@pytest.mark.parametrize("holdout,sequential", [(0, False), (0.25, True)])
def test_no_held_out_choice_without_holdout_or_in_sequential_repair(holdout, sequential):
    stage = {**STAGES[0][2], "reconstruct_holdout": holdout}
    rep = NeuronPrune(NeuronPruneStage(**stage)).apply(_ctx(tiny_model("llama"), stage, sequential))
    assert rep["repair_choices"] is None
    assert all("damp_chosen" not in e and "rel_error_lsq" in e for e in rep["layers"])


@pytest.mark.parametrize("holdout", [0.25, 0])
def test_hidden_prune_chooses_per_reader_on_held_out_windows(holdout):
    from gqaprune.recipe import HiddenPruneStage
    from gqaprune.stages.hidden_prune import HiddenPrune

    stage = {"type": "hidden_prune", "prune_ratio": 0.25, "align": 8, "reconstruct_holdout": holdout}
    rep = HiddenPrune(HiddenPruneStage(**stage)).apply(_ctx(tiny_model("llama"), stage))["repair"]
    readers = [e for layer in rep["layers"] for k, e in layer.items() if k != "layer"] + [rep["lm_head"]]
    if not holdout:
        assert rep["repair_choices"] is None and all("damp_chosen" not in e for e in readers)
        return
    assert sum(rep["repair_choices"].values()) == len(readers)
    for e in readers:
        assert e["held_out_tokens"] == 2 * 16 and e["damp_chosen"] in CHOICES


def test_only_a_one_shot_repair_keeps_held_out_inputs():
    # a reconstruction score gathers Grams too; without a one-shot repair nothing reads held-out inputs
    cfg = NeuronPruneStage(type="neuron_prune", prune_ratio=0.5, score="reconstruction")
    calib = torch.zeros(8, 16, dtype=torch.long)
    assert hold_from(cfg, calib, "one_shot") == 6 * 16
    assert hold_from(cfg, calib, "sequential") is None and hold_from(cfg, calib, "none") is None
