"""Stages: one small class per stage type with one `apply(ctx) -> report entry`.

The awq stage is not here: it turns the saved model into the AutoAWQ output format, so the
runner calls gqaprune.quant.awq when it writes the output.
"""

from gqaprune.stages.head_prune import HeadPrune
from gqaprune.stages.layer_drop import LayerDrop
from gqaprune.stages.neuron_prune import NeuronPrune


def build_stage(cfg):
    if cfg.type == "recover":
        from gqaprune.stages.recover import Recover  # imports peft/accelerate only when used

        return Recover(cfg)
    return {"layer_drop": LayerDrop, "head_prune": HeadPrune, "neuron_prune": NeuronPrune}[cfg.type](cfg)
