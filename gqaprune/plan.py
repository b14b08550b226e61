"""`plan`: shapes, parameters, FLOPs and weight bytes after each stage, with no weights and no scoring.

The stages' own surgery runs on a meta-device copy of the model (no memory, no data), with
placeholder choices (the last unprotected layers, the first heads and channels): shapes and
counts are exact for uniform allocation; global and by_layer_importance allocations decide
per-layer shapes from scores at run time, so plan shows their uniform equivalent. Every
model-dependent check of the recipe happens here, before any weights load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gqaprune.arch.adapter import (Adapter, check_adapter_on_model, decoder_layers, head_dim_of, kv_cache_bytes_per_token,
                               model_shapes)
from gqaprune.errors import InputError
from gqaprune.recipe import Recipe
from gqaprune.stages.amounts import aligned_keep, heads_removed, protected
from gqaprune.ops.surgery import drop_layers, prune_channels, prune_heads


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
    return StagePlan(name, len(shapes), shapes, params, 2 * matmul, int(params * bytes_per_param), kv, notes)


def _tied(model, adapter) -> bool:
    return model.get_submodule(adapter.model.lm_head).weight is model.get_submodule(adapter.model.embed).weight


def simulate(recipe: Recipe, config, adapter: Adapter) -> list[StagePlan]:
    """Check every stage against the model's shape and return the plan (the first entry is the source)."""
    model = meta_model(config)
    check_adapter_on_model(model, adapter)  # every role path resolves, shapes agree: before any weights load
    bpp = _dtype_bytes(config)
    plans = [_summary("source", model, adapter, bpp, [])]
    arch = (config.architectures or [type(model).__name__])[0]
    convert = check_save_as(recipe, config, arch)
    saved_arch = "MistralForCausalLM" if convert else arch
    for si, st in enumerate(recipe.stages):
        where = f"stages[{si}] {st.type}"
        notes: list[str] = []
        layers = decoder_layers(model, adapter)
        n_layers = len(layers)
        shapes = model_shapes(model, adapter)
        if st.type == "layer_drop":
            n = st.num_layers if st.num_layers is not None else max(1, round(st.fraction * n_layers))
            cand = list(range(st.protect_first, n_layers - st.protect_last))
            if n >= n_layers:
                raise InputError(f"{where}: dropping {n} of {n_layers} layers would remove every layer")
            if n > len(cand):
                raise InputError(f"{where}: dropping {n} layers, but only {len(cand)} of {n_layers} are outside "
                                 f"protect_first={st.protect_first} / protect_last={st.protect_last}")
            drop_layers(model, adapter, cand[-n:])
            notes.append("which layers drop is decided by the scores at run time")
        elif st.type == "head_prune":
            uniq = {(s["num_attention_heads"], s["num_key_value_heads"]) for s in shapes}
            if len(uniq) != 1:
                raise InputError(f"{where}: layers have different head counts {sorted(uniq)}; prune a model with "
                                 "uniform attention shapes (per-layer head pruning of a per-layer model is not supported)")
            n_q, n_kv = uniq.pop()
            try:
                r = heads_removed(st, n_q, n_kv, where)
                prot = protected(st.protect_layers, n_layers, where)
            except InputError as e:
                raise InputError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
            g = n_q // n_kv
            for i in range(n_layers):
                if i in prot:
                    continue
                if st.unit == "group":
                    keep = {j: list(range(j * g, (j + 1) * g)) for j in range(n_kv - r)}
                else:
                    keep = {j: list(range(j * g, j * g + g - r)) for j in range(n_kv)}
                prune_heads(model, adapter, i, keep)
            if st.allocation != "uniform":
                notes.append(f"allocation {st.allocation}: per-layer head counts are chosen at run time; "
                             "shown here as the uniform equivalent")
        elif st.type == "neuron_prune":
            try:
                prot = protected(st.protect_layers, n_layers, where)
                for i in range(n_layers):
                    if i in prot:
                        continue
                    kept, want = aligned_keep(shapes[i]["intermediate_size"], st, where)
                    if kept != want:
                        notes.append(f"layer {i}: keeps {kept} channels instead of {want} to align to {st.align}")
                    prune_channels(model, adapter, i, list(range(kept)))
            except InputError as e:
                raise InputError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
            if st.allocation != "uniform":
                notes.append("allocation global: per-layer widths are chosen at run time; shown as uniform")
        elif st.type == "awq":
            from gqaprune.quant.awq import awq_width_problems

            per_layer = [f"stages[{j}] {s.type}" for j, s in enumerate(recipe.stages[:si])
                         if getattr(s, "allocation", "uniform") != "uniform" or getattr(s, "protect_layers", [])]
            if per_layer:
                raise InputError(f"{where}: the awq stage quantizes a model with one shape in every layer; "
                                 f"{', '.join(per_layer)} give per-layer shapes (use allocation: uniform and no "
                                 "protect_layers before awq)")

            problems = awq_width_problems(saved_arch, getattr(config, adapter.config.hidden_size), shapes,
                                          head_dim_of(config, adapter), st.group_size)
            if problems:
                raise InputError(f"{where}: AutoAWQ cannot quantize what the earlier stages leave: "
                                 + "; ".join(problems))
            bpp = 0.5 + 4.0 / st.group_size  # int4 weights plus fp16 scale and packed zero per group
            notes.append("weights 4-bit (embeddings and norms stay in 16-bit; shown as a uniform estimate)")
        plans.append(_summary(f"{si}:{st.type}", model, adapter, bpp, notes))
    final = model_shapes(model, adapter)
    heads = {s["num_attention_heads"] for s in final}
    if convert:
        plans[-1].notes.append("save_as: mistral: saved as MistralForCausalLM (the same computation), which stock "
                               "from_pretrained reloads")
    elif arch == "LlamaForCausalLM" and len(heads) == 1:
        h = heads.pop()
        if getattr(config, "hidden_size") % h:
            if any(st.type == "awq" for st in recipe.stages):
                raise InputError(f"{h} query heads do not divide hidden_size {config.hidden_size}, which LlamaConfig "
                                 "requires, so the pruned Llama can only be saved per-layer, which the awq stage "
                                 "does not take; add save_as: mistral to the recipe (or keep a head count that "
                                 f"divides {config.hidden_size})")
            plans[-1].notes.append(
                f"{h} heads do not divide hidden_size {config.hidden_size}, which LlamaConfig requires: the output "
                "is saved with per-layer shapes (reload with gqaprune.load_pretrained or trust_remote_code=True; "
                "save_as: mistral saves a folder stock from_pretrained reloads)")
    return plans


def check_save_as(recipe: Recipe, config, arch: str) -> bool:
    """The recipe's ``save_as`` against the source model (before any weights load). Returns True when the run
    will convert the pruned model (a Llama with ``save_as: mistral``); raises InputError when it cannot."""
    if recipe.save_as == "auto":
        return False
    from gqaprune.arch.convert import save_as_mistral_problem

    problem = save_as_mistral_problem(config)
    if problem:
        raise InputError(problem)
    if arch.removeprefix("PerLayer") == "MistralForCausalLM":
        return False  # already a Mistral: saved as it is
    if getattr(config, "gqaprune_layers", None):
        raise InputError("save_as: mistral needs one shape in every layer, but the source model is per-layer-shaped "
                         "(config.gqaprune_layers); use save_as: auto")
    per_layer = [f"stages[{j}] {s.type}" for j, s in enumerate(recipe.stages)
                 if getattr(s, "allocation", "uniform") != "uniform" or getattr(s, "protect_layers", [])]
    if per_layer:
        raise InputError(f"save_as: mistral needs one shape in every layer; {', '.join(per_layer)} give per-layer "
                         "shapes (use allocation: uniform and no protect_layers, or save_as: auto)")
    return True


def llama_stock_head_counts(config) -> list[int]:
    """Head counts a stock LlamaConfig accepts for this hidden size (divisors of hidden_size up to the model's)."""
    return [h for h in range(1, config.num_attention_heads + 1) if config.hidden_size % h == 0]
