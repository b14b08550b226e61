"""Opt-in conversion of a pruned Llama into a stock ``MistralForCausalLM`` (recipe key ``save_as: mistral``).

Why: ``LlamaConfig`` refuses ``hidden_size % num_attention_heads != 0`` even with an explicit ``head_dim``, so a
uniformly pruned Llama with, say, 24 of 32 heads (hidden 4096) cannot be written as a stock Llama folder and is
saved in gqaprune's per-layer format (remote code). ``MistralConfig`` accepts any head count with an explicit
``head_dim``, and for a Llama without biases (``attention_bias`` and ``mlp_bias`` false) Mistral's modeling code
is the same computation as Llama's when ``sliding_window`` is None: same projections, RMSNorm, gated MLP, RoPE
(``rope_parameters`` are carried over unchanged, so linear / dynamic / yarn / llama3 scaling stays exact) and
causal mask. The converted folder reloads with stock ``AutoModelForCausalLM.from_pretrained(path)``.

Only models with one shape in every layer are converted: a per-layer-shaped Llama (heads, KV heads or MLP
width differing between layers) would still need gqaprune's remote code as a Mistral, so converting it gains
nothing, and it is refused (``gqaprune validate`` refuses recipes that lead there, see ``gqaprune.plan``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from gqaprune.errors import CheckFailed, InputError

SAVE_AS_CHOICES = ("auto", "mistral")
# save_as: mistral maps this class onto that one (and the saved model's roles onto that builtin adapter)
MISTRAL_FROM, MISTRAL_TO, MISTRAL_ADAPTER = "LlamaForCausalLM", "MistralForCausalLM", "mistral"
CONVERTIBLE = (MISTRAL_FROM, MISTRAL_TO)  # MistralForCausalLM: already Mistral, nothing to do
# LlamaConfig keys that MistralConfig does not have; dropped (after checking they change nothing)
_LLAMA_ONLY = ("attention_bias", "mlp_bias", "pretraining_tp", "layer_types")
_NOT_COPIED = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path",
               "gqaprune_layers", "gqaprune_roles", "gqaprune_num_key_value_groups")
CONVERT_TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def _get(config, key, default=None):
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def save_as_mistral_problem(config) -> str | None:
    """Why a model with this config (object or dict) cannot be saved with ``save_as: mistral``; None if it can."""
    archs = list(_get(config, "architectures") or [])
    arch = archs[0].removeprefix("PerLayer") if archs else None
    if arch == "MistralForCausalLM":
        return None
    if arch != "LlamaForCausalLM":
        return (f"save_as: mistral converts a LlamaForCausalLM without biases (or keeps a MistralForCausalLM); "
                f"this model is {arch or 'of unknown architecture'} (use save_as: auto)")
    biased = [k for k in ("attention_bias", "mlp_bias") if _get(config, k, False)]
    if biased:
        has = " and ".join(f"{k}: true" for k in biased)
        return (f"save_as: mistral needs a Llama without biases, but this one has {has} "
                "(Mistral layers have no biases; use save_as: auto)")
    layer_types = _get(config, "layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        return f"save_as: mistral needs full attention in every layer; layer_types is {sorted(set(layer_types))}"
    return None


def mistral_config_from_llama(config, shape: dict, head_dim: int):
    """A ``MistralConfig`` with the Llama config's values, the given layer ``shape`` (num_attention_heads,
    num_key_value_heads, intermediate_size), an explicit ``head_dim`` and ``sliding_window`` None.
    ``rope_parameters`` (transformers 5: rope type, theta and scaling, formerly ``rope_scaling``) is copied
    as it is."""
    from transformers import MistralConfig

    problem = save_as_mistral_problem({**config.to_dict(), "architectures": ["LlamaForCausalLM"]})
    if problem:
        raise InputError(problem)
    d = config.to_dict()
    for key in (*_LLAMA_ONLY, *_NOT_COPIED):
        d.pop(key, None)
    d.update({"num_attention_heads": int(shape["num_attention_heads"]),
              "num_key_value_heads": int(shape["num_key_value_heads"]),
              "intermediate_size": int(shape["intermediate_size"]),
              "head_dim": int(head_dim), "sliding_window": None})
    cfg = MistralConfig(**d)
    if cfg.to_dict().get("rope_parameters") != config.to_dict().get("rope_parameters"):  # never silently drop RoPE
        raise CheckFailed(f"MistralConfig changed the RoPE parameters {config.to_dict().get('rope_parameters')} "
                          f"to {cfg.to_dict().get('rope_parameters')}")
    cfg.architectures = ["MistralForCausalLM"]
    cfg._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    return cfg


def probe_ids(vocab_size: int, max_len: int | None = None, batch: int = 2, seq: int = 32) -> torch.Tensor:
    """A fixed batch of token ids (seeded, independent of the global RNG)."""
    if max_len:
        seq = max(2, min(seq, int(max_len)))
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, int(vocab_size), (batch, seq), generator=gen)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


def llama_to_mistral(model: nn.Module, input_ids: torch.Tensor | None = None,
                     tol: float | None = None) -> tuple[nn.Module, float]:
    """Convert a ``LlamaForCausalLM`` (pruned or not; one shape in every layer; no biases) into a
    ``MistralForCausalLM`` holding the same weight tensors (shared, not copied), and prove they compute the
    same: both run on ``input_ids`` (default: a fixed seeded batch) and ``CheckFailed`` is raised when the
    max |logit diff| exceeds ``tol`` (default 1e-5 in fp32; 2e-2 / 1e-2 in bf16 / fp16).

    Layer shapes are read from the weights (pruning stages leave the global config keys stale until save), so
    a Llama whose layers differ in heads, KV heads or MLP width is refused with ``CheckFailed``: as a Mistral it
    would still need gqaprune's per-layer remote code. Returns ``(mistral_model, max_abs_logit_diff)``; the
    Mistral model is in eval mode, on the Llama's device and dtype, with its generation config."""
    from transformers import MistralForCausalLM

    from gqaprune.arch.adapter import builtin_adapters, head_dim_of, model_shapes
    from gqaprune.io.checkpoint import _quiet_transformers, stock_class

    name = stock_class(model).__name__
    if name != "LlamaForCausalLM":
        raise InputError(f"llama_to_mistral converts a LlamaForCausalLM; got {name}")
    config = model.config
    problem = save_as_mistral_problem({**config.to_dict(), "architectures": ["LlamaForCausalLM"]})
    if problem:
        raise InputError(problem)
    adapter = builtin_adapters()["llama"]
    shapes = model_shapes(model, adapter)
    if not shapes:
        raise CheckFailed("the model has no decoder layers left")
    if any(s != shapes[0] for s in shapes):
        raise CheckFailed("save_as: mistral needs one shape in every layer (a per-layer-shaped Mistral would still "
                          "need gqaprune's remote code); the layers have shapes "
                          + ", ".join(f"{i}: {s['num_attention_heads']}/{s['num_key_value_heads']}/"
                                      f"{s['intermediate_size']}" for i, s in enumerate(shapes))
                          + " (heads/KV heads/MLP width); use save_as: auto")
    shape = shapes[0]
    if shape["num_key_value_heads"] < 1 or shape["num_attention_heads"] % shape["num_key_value_heads"]:
        raise CheckFailed(f"{shape['num_attention_heads']} query heads are not a multiple of "
                          f"{shape['num_key_value_heads']} KV heads")
    cfg = mistral_config_from_llama(config, shape, head_dim_of(config, adapter))
    if len(shapes) != cfg.num_hidden_layers:
        raise CheckFailed(f"the config says {cfg.num_hidden_layers} layers, the model has {len(shapes)}")
    param = next(model.parameters())
    cfg.dtype = param.dtype

    with _quiet_transformers(), torch.device("meta"):  # no memory, no init: the Llama's tensors are assigned below
        mistral = MistralForCausalLM(cfg)
    state = model.state_dict()
    try:
        mistral.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckFailed(f"the Llama's weights do not fit MistralForCausalLM: {str(e).splitlines()[0]}") from None
    if cfg.tie_word_embeddings:
        mistral.tie_weights()
    # Non-persistent buffers (RoPE inv_freq) are not in the state dict: rebuild the modules that hold them from
    # the Mistral config, so a RoPE parameter lost in the conversion shows up as a logit difference below.
    llama_buffers = dict(model.named_buffers())
    for mod_name, module in list(mistral.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if not hasattr(module, "rope_type"):
            raise CheckFailed(f"MistralForCausalLM module '{mod_name}' has buffers that are not in the state dict")
        fresh = type(module)(config=cfg)
        for b_name, buf in fresh.named_buffers(recurse=False):
            ref = llama_buffers.get(f"{mod_name}.{b_name}")
            setattr(fresh, b_name, buf.to(device=param.device, dtype=ref.dtype if ref is not None else buf.dtype))
        parent_name, _, child = mod_name.rpartition(".")
        setattr(mistral.get_submodule(parent_name) if parent_name else mistral, child, fresh)
    meta = [n for n, t in [*mistral.named_parameters(), *mistral.named_buffers()] if t.is_meta]
    if meta:
        raise CheckFailed(f"MistralForCausalLM tensors left unset after the conversion: {', '.join(meta[:5])}")
    if getattr(model, "generation_config", None) is not None:
        mistral.generation_config = copy.deepcopy(model.generation_config)
    mistral.eval()

    ids = input_ids if input_ids is not None else probe_ids(cfg.vocab_size, cfg.max_position_embeddings)
    was_training = model.training
    model.eval()
    try:
        diff = float((_logits(mistral, ids) - _logits(model, ids)).abs().max())
    finally:
        model.train(was_training)
    limit = CONVERT_TOL.get(param.dtype, 1e-5) if tol is None else tol
    if not diff <= limit:  # also catches NaN
        raise CheckFailed(f"save_as: mistral: the converted MistralForCausalLM differs from the Llama by "
                          f"max |logit diff| {diff:.3g} (tolerance {limit:g}); nothing was written")
    return mistral, diff


def convert_for_save(model: nn.Module, adapter, save_as: str, probe: torch.Tensor, dtype: torch.dtype):
    """The runner's ``save_as`` step, after the last pruning/recover stage and before saving (and before AWQ):
    with ``save_as: mistral`` a Llama becomes a ``MistralForCausalLM`` (checked on the ``probe`` logits), so the
    round trip reloads the Mistral folder with stock from_pretrained and compares it with the converted model.

    Returns ``(model, adapter of the model to save, report["save_as"] entry or None when nothing was converted)``;
    the report's ``model.adapter`` stays the source's."""
    from gqaprune.arch.adapter import builtin_adapters
    from gqaprune.io.checkpoint import stock_class
    from gqaprune.runtime import log

    if save_as != "mistral" or stock_class(model).__name__ != MISTRAL_FROM:
        return model, adapter, None
    model.eval()
    converted_from = stock_class(model).__name__
    model, conv_diff = llama_to_mistral(model, input_ids=probe)
    entry = {"architecture": stock_class(model).__name__, "converted_from": converted_from,
             "max_abs_logit_diff": conv_diff, "tolerance": CONVERT_TOL.get(dtype, 1e-5)}
    log(f"save_as: mistral: converted to {entry['architecture']}, max |logit diff| {conv_diff:.3g}")
    return model, builtin_adapters()[MISTRAL_ADAPTER], entry
