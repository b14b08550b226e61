"""What each stage does on a model whose sublayer OUTPUT is normalised before the residual add.

Gemma2/3 and OLMo2 compute h = h + N_out(attn(N_in(h))) and h = h + M_out(mlp(M_in(h))), declared in the
adapter as the roles post_attn_output_norm and post_mlp_output_norm. Per stage:

* head_prune / neuron_prune, reconstruct least_squares: correct. The refit of o_proj (down_proj) reproduces
  that projection's output, which is what the output norm then reads; an exact refit gives the exact
  layer output (tests/stages/test_output_norms.py checks it to float precision).
* head_prune / neuron_prune, allocation global with a score that measures the projection's output
  (magnitude, activation, reconstruction): refused. The output norm rescales each layer's sublayer output
  by that output's own RMS, so such scores are not comparable across layers. Loss-based scores (taylor,
  taylor2, ablation), frequency, random and truncate, and uniform / by_layer_importance allocation are fine.
* layer_drop, reconstruct least_squares: refused when given explicitly with post_mlp_output_norm. The
  repair refits down_proj of the layer before a dropped run so that the MLP's output also carries the
  run's residual update; with the MLP output normalised before the residual add, what down_proj writes
  is not what reaches the residual stream. The default (not written in the recipe) resolves to none,
  with a note, so default recipes still run.
* recover (LoRA/full/distill) trains through the model's own forward; awq is refused by the adapter's
  missing awq section where AutoAWQ's layout is not known to be right.
"""

from __future__ import annotations

from gqaprune.arch.adapter import Adapter
from gqaprune.errors import InputError

# Scores that measure the pruned projection's output (before any output norm), per stage type.
OUTPUT_SCALE_SCORES = {"head_prune": ("magnitude", "activation", "reconstruction"),
                       "neuron_prune": ("magnitude", "activation", "reconstruction")}
_ROLE_OF_STAGE = {"head_prune": ("post_attn_output_norm", "o"), "neuron_prune": ("post_mlp_output_norm", "down")}


def layer_drop_reconstruct(cfg, adapter: Adapter, where: str = "layer_drop") -> tuple[str, str | None]:
    """The reconstruct mode layer_drop runs with, and a note when it differs from the recipe's default."""
    norm = adapter.layer.post_mlp_output_norm
    if cfg.reconstruct != "least_squares" or norm is None:
        return cfg.reconstruct, None
    why = (f"adapter '{adapter.name}' declares post_mlp_output_norm ({norm}): the MLP output is normalised "
           f"before the residual add, so refitting {adapter.layer.down} cannot write the dropped layers' "
           "residual update")
    if "reconstruct" in cfg.model_fields_set:
        raise InputError(f"{where}: reconstruct: least_squares is not valid here: {why}; use reconstruct: none")
    return "none", f"reconstruct resolves to none: {why}"


def check_output_norms(cfg, adapter: Adapter, where: str) -> list[str]:
    """Refuse (InputError naming the stage, the role and why) what a post-output norm makes wrong; return
    notes for what it changes. Stages without an output-norm rule return no notes."""
    if cfg.type == "layer_drop":
        _, note = layer_drop_reconstruct(cfg, adapter, where)
        return [note] if note else []
    if cfg.type not in _ROLE_OF_STAGE:
        return []
    role, proj = _ROLE_OF_STAGE[cfg.type]
    norm = getattr(adapter.layer, role)
    if norm is None or cfg.allocation != "global" or cfg.score not in OUTPUT_SCALE_SCORES[cfg.type]:
        return []
    raise InputError(f"{where}: allocation: global with score: {cfg.score} is not valid here: adapter "
                     f"'{adapter.name}' declares {role} ({norm}), which rescales each layer's "
                     f"{getattr(adapter.layer, proj)} output by its own RMS, so {cfg.score} scores are not "
                     "comparable across layers; use allocation: uniform or score: taylor")
