"""Stages: one class per stage type (gqaprune.stages.base.Stage), listed in STAGES.

STAGES is the one place a stage type's name is looked up: the recipe's schema, `gqaprune plan`, the runner,
the model card and the plots all go through it.
"""

from gqaprune.stages.awq import Awq
from gqaprune.stages.base import Stage
from gqaprune.stages.head_prune import HeadPrune
from gqaprune.stages.hidden_prune import HiddenPrune
from gqaprune.stages.layer_drop import LayerDrop
from gqaprune.stages.neuron_prune import NeuronPrune
from gqaprune.stages.recover import Recover

STAGES: dict[str, type[Stage]] = {
    "layer_drop": LayerDrop,
    "head_prune": HeadPrune,
    "neuron_prune": NeuronPrune,
    "hidden_prune": HiddenPrune,
    "recover": Recover,
    "awq": Awq,
}


def build_stage(cfg) -> Stage:
    """The stage object for one validated stage config of the recipe."""
    return STAGES[cfg.type](cfg)
