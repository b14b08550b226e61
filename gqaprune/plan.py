"""`plan`: shapes, parameters, FLOPs and weight bytes after each stage, with no weights and no scoring.

Each stage's own `plan` (gqaprune.stages) checks it against the per-layer shapes and gives the
shapes after it; the surgery then runs on a meta-device copy of the model (no memory, no data) with
placeholder choices (the last unprotected layers, the first heads and channels): shapes and
counts are exact for uniform allocation; global and by_layer_importance allocations decide
per-layer shapes from scores at run time, so plan shows their uniform equivalent. Every
model-dependent check of the recipe happens here, before any weights load.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from gqaprune.arch.adapter import (Adapter, check_adapter_on_model, kv_cache_bytes_per_token, model_shapes,
                                   stock_head_counts)
from gqaprune.arch.convert import MISTRAL_TO, save_as_mistral_problem
from gqaprune.errors import InputError
from gqaprune.ops.surgery import drop_layers, prune_channels, prune_heads
from gqaprune.recipe import Recipe
from gqaprune.stages import build_stage
from gqaprune.stages.base import PlanInput
from gqaprune.stages.output_norms import check_output_norms


@dataclass
class StagePlan:
    name: str
    num_layers: int
    per_layer: list[dict]
    params: int
    flops_per_token: int
    weight_bytes: int
    kv_cache_bytes_per_token: int
    notes: list[str]
    hidden_size: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _dtype_bytes(config) -> int:
    dt = getattr(config, "dtype", None)
    return {"float32": 4, "bfloat16": 2, "float16": 2, torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}.get(dt, 4)


def meta_model(config):
    from transformers import AutoModelForCausalLM

    from gqaprune.arch.modeling_perlayer import apply_per_layer_shapes

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        apply_per_layer_shapes(model, config)  # a per-layer-shaped gqaprune output as the source model
    return model


def _summary(name, model, adapter: Adapter, bytes_per_param: float, notes) -> StagePlan:
    shapes = model_shapes(model, adapter)
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_submodule(adapter.model.embed).weight.numel()
    # one multiply-add per weight per token in every matmul (embedding lookups are free)
    matmul = params - embed + (embed if _tied(model, adapter) else 0)
    kv = kv_cache_bytes_per_token(model, adapter, int(bytes_per_param if bytes_per_param >= 1 else 2))
    hidden = int(getattr(model.config, adapter.config.hidden_size))
    return StagePlan(name, len(shapes), shapes, params, 2 * matmul, int(params * bytes_per_param), kv, notes, hidden)


def _tied(model, adapter) -> bool:
    return model.get_submodule(adapter.model.lm_head).weight is model.get_submodule(adapter.model.embed).weight


def simulate(recipe: Recipe, config, adapter: Adapter) -> list[StagePlan]:
    """Check every stage against the model's shape and return the plan (the first entry is the source)."""
    model = meta_model(copy.deepcopy(config))  # the stages' meta surgery edits the model's config, not the caller's
    check_adapter_on_model(model, adapter)  # every role path resolves, shapes agree: before any weights load
    bpp = _dtype_bytes(config)
    plans = [_summary("source", model, adapter, bpp, [])]
    arch = (config.architectures or [type(model).__name__])[0]
    convert = check_save_as(recipe, config, arch)
    saved_arch = MISTRAL_TO if convert else arch
    built = [build_stage(st) for st in recipe.stages]
    if recipe.calibration.pipeline == "layerwise":
        check_layerwise_model(config)
    for si, stage in enumerate(built):
        where = f"stages[{si}] {stage.name}"
        shapes = model_shapes(model, adapter)
        # the width the earlier stages leave (hidden_prune changes it) is on the meta model's config
        inp = PlanInput(where, config=model.config, adapter=adapter, earlier=built[:si], saved_arch=saved_arch)
        try:
            output_norm_notes = check_output_norms(stage.cfg, adapter, where)
            planned = stage.plan(shapes, inp)
            planned.notes[:0] = output_norm_notes
        except InputError as e:
            raise InputError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        reshape_placeholder(model, adapter, shapes, planned.shapes)
        if "hidden_size" in planned.counts:
            planned.notes.extend(reshape_hidden(model, adapter, planned.counts, where))
        bpp = planned.counts.get("bytes_per_param", bpp)
        plans.append(_summary(f"{si}:{stage.name}", model, adapter, bpp, planned.notes))
    final = model_shapes(model, adapter)
    heads = {s["num_attention_heads"] for s in final}
    if convert:
        plans[-1].notes.append(f"save_as: mistral: saved as {MISTRAL_TO} (the same computation), which stock "
                               "from_pretrained reloads")
    elif stock_head_counts(model.config, adapter) is not None and len(heads) == 1:
        config = model.config  # the width the stages leave (hidden_prune changes it)
        h, hidden = heads.pop(), getattr(config, adapter.config.hidden_size)
        mistral = save_as_mistral_problem(config) is None
        if hidden % h:
            fix = "add save_as: mistral to the recipe (or keep a head count that divides" if mistral else \
                "keep a head count that divides"
            if any(stage.writes_output for stage in built):
                raise InputError(f"{h} query heads do not divide hidden_size {hidden}, which the stock {arch} config "
                                 "requires, so the pruned model can only be saved per-layer, which the awq stage "
                                 f"does not take; {fix} {hidden}" + (")" if mistral else ""))
            plans[-1].notes.append(
                f"{h} heads do not divide hidden_size {hidden}, which the stock {arch} config requires: the output "
                "is saved with per-layer shapes (reload with gqaprune.load_pretrained or trust_remote_code=True"
                + ("; save_as: mistral saves a folder stock from_pretrained reloads)" if mistral else ")"))
    return plans


def check_layerwise_model(config) -> None:
    """What ``calibration.pipeline: layerwise`` needs of the model: one attention kind in every layer (it runs
    every layer with the mask and positions captured at the first layer's input)."""
    kinds = sorted(set(getattr(config, "layer_types", None) or []))
    if len(kinds) > 1:
        raise InputError(f"calibration.pipeline: layerwise: the model mixes attention kinds {kinds} (sliding-window "
                         "layers), which need a different mask per layer; use calibration.pipeline: in_memory")


def reshape_placeholder(model, adapter: Adapter, before: list[dict], after: list[dict]) -> None:
    """Give the meta-device model the planned shapes with placeholder choices: the planned layers stay, and
    each layer keeps its first groups, its first query heads per group and its first channels."""
    kept_layers = [s["source_layer"] for s in after]
    dropped = [i for i in range(len(before)) if i not in kept_layers]
    if dropped:
        drop_layers(model, adapter, dropped)
    for i, s in enumerate(after):
        b = before[s["source_layer"]]
        if (s["num_attention_heads"], s["num_key_value_heads"]) != (b["num_attention_heads"], b["num_key_value_heads"]):
            g = b["num_attention_heads"] // b["num_key_value_heads"]  # query heads per group before
            g_after = s["num_attention_heads"] // s["num_key_value_heads"]
            keep = {j: list(range(j * g, j * g + g_after)) for j in range(s["num_key_value_heads"])}
            prune_heads(model, adapter, i, keep)
        if s["intermediate_size"] != b["intermediate_size"]:
            prune_channels(model, adapter, i, list(range(s["intermediate_size"])))


def reshape_hidden(model, adapter: Adapter, counts: dict, where: str) -> list[str]:
    """Give the meta-device model a hidden_prune stage's width (the first channels) and, for rotate: pca, check the
    rotation and untie a tied head as the stage will; the notes."""
    from gqaprune.ops.hidden import is_tied, prune_hidden, rotation_problem, untie_lm_head

    notes = []
    if counts["rotate"] == "pca":
        problem = rotation_problem(model, adapter)
        if problem:
            raise InputError(f"{where}: {problem}")
        if is_tied(model, adapter):
            vocab = model.get_submodule(adapter.model.embed).weight.shape[0]
            untie_lm_head(model, adapter)
            notes.append(f"rotate: pca unties the LM head from the embedding (the head carries the final norm's "
                         f"weight): +{vocab:,} x {counts['hidden_size']} parameters")
    prune_hidden(model, adapter, torch.arange(counts["hidden_size"]))
    return notes


def check_save_as(recipe: Recipe, config, arch: str) -> bool:
    """The recipe's ``save_as`` against the source model (before any weights load). Returns True when the run
    will convert the pruned model (a Llama with ``save_as: mistral``); raises InputError when it cannot."""
    if recipe.save_as == "auto":
        return False
    problem = save_as_mistral_problem(config)
    if problem:
        raise InputError(problem)
    if arch.removeprefix("PerLayer") == MISTRAL_TO:
        return False  # already a Mistral: saved as it is
    if getattr(config, "gqaprune_layers", None):
        raise InputError("save_as: mistral needs one shape in every layer, but the source model is per-layer-shaped "
                         "(config.gqaprune_layers); use save_as: auto")
    per_layer = [f"stages[{j}] {s.type}" for j, s in enumerate(recipe.stages) if build_stage(s).gives_per_layer_shapes()]
    if per_layer:
        raise InputError(f"save_as: mistral needs one shape in every layer; {', '.join(per_layer)} give per-layer "
                         "shapes (use allocation: uniform and no protect_layers, or save_as: auto)")
    return True
