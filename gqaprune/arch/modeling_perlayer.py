"""Per-layer-shaped decoder models: every layer may keep its own heads, KV heads and MLP width.

This file is SELF-CONTAINED (torch, transformers and the standard library only): gqaprune copies it
verbatim next to the weights of a per-layer-shaped model, and ``config.json`` points at it with

    "auto_map": {"AutoModelForCausalLM": "modeling_perlayer.PerLayer<Stock>ForCausalLM"}

so that stock ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads the model.

The config of such a model keeps the stock ``model_type`` and global keys (values the stock config class
accepts) and adds:

    gqaprune_layers: [{"num_attention_heads": H, "num_key_value_heads": K, "intermediate_size": I}, ...]
    gqaprune_roles:  {"layers": "model.layers", "layer": {...module paths of the layer roles...},
                      "head_dim": D, "hidden_size": E}

A ``PerLayer<Stock>ForCausalLM`` class is the stock class whose layers are rebuilt to those shapes
before the weights load. Heads are counted from tensor shapes by the stock attention code; what does
not follow from the shapes (``num_key_value_groups``, which drives repeat_kv in eager and SDPA
attention; Phi-3 reading ``config.num_attention_heads`` in its forward) is set per layer by
``sync_layer_attributes``.
"""

from __future__ import annotations

import transformers
from torch import nn

SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")

# Attribute names that some attention / MLP modules keep as plain ints.
_ATTN_HEAD_ATTRS = ("num_heads", "num_attention_heads")
_ATTN_KV_ATTRS = ("num_key_value_heads", "num_kv_heads")
_ATTN_GROUP_ATTRS = ("num_key_value_groups",)
_MLP_WIDTH_ATTRS = ("intermediate_size",)


class LayerConfig:
    """A live per-layer view of a model config: the layer's own shape values, everything else (for example
    ``_attn_implementation``, which ``set_attn_implementation`` changes on the model's config) read from
    the global config at access time."""

    def __init__(self, parent, **overrides):
        if isinstance(parent, LayerConfig):
            parent = parent.__dict__["_parent"]
        object.__setattr__(self, "_parent", parent)
        object.__setattr__(self, "_overrides", dict(overrides))

    def __getattr__(self, name):
        d = self.__dict__
        overrides = d.get("_overrides")
        if overrides is not None and name in overrides:
            return overrides[name]
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # copy/pickle protocol lookups must not reach the parent
        parent = d.get("_parent")
        if parent is None:
            raise AttributeError(name)
        return getattr(parent, name)

    def __setattr__(self, name, value):
        if name in ("_parent", "_overrides"):
            object.__setattr__(self, name, value)
        else:
            self.__dict__["_overrides"][name] = value

    def __delattr__(self, name):
        self.__dict__["_overrides"].pop(name, None)

    def __repr__(self):
        parent = self.__dict__.get("_parent")
        return f"LayerConfig({type(parent).__name__}, {self.__dict__.get('_overrides')})"


def _get(root: nn.Module, path: str | None):
    return root.get_submodule(path) if path else None


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def _check_shape(shape: dict) -> tuple[int, int, int]:
    try:
        h, k, i = (int(shape[key]) for key in SHAPE_KEYS)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"a per-layer shape needs integer {', '.join(SHAPE_KEYS)}; got {shape!r}") from None
    if h < 1 or k < 1 or i < 1:
        raise ValueError(f"a layer needs at least one head, one KV head and one MLP channel; got {shape!r}")
    if h % k != 0:
        raise ValueError(f"{h} query heads are not a multiple of {k} KV heads in shape {shape!r}")
    return h, k, i


def _set_int_attrs(module: nn.Module, names, value: int) -> None:
    for name in names:
        current = getattr(module, name, None)
        if isinstance(current, int) and not isinstance(current, bool):
            setattr(module, name, value)


def _unwrap(config):
    return config.__dict__["_parent"] if isinstance(config, LayerConfig) else config


def sync_layer_attributes(layer: nn.Module, roles: dict, shape: dict, config) -> None:
    """Set the module attributes that depend on the layer's head counts and MLP width.

    Call after the layer's Linear modules have been sliced/rebuilt to ``shape``. Sets, where the module
    has them: ``num_key_value_groups`` (repeat_kv in eager and SDPA attention), ``num_key_value_heads``,
    ``num_heads``/``num_attention_heads``, the MLP's ``intermediate_size``; and gives an attention or MLP
    module that keeps a ``config`` (Phi-3 reads ``config.num_attention_heads`` in forward) its own
    per-layer view of ``config`` with the layer's values.
    """
    h, k, i = _check_shape(shape)
    attn = _get(layer, roles["attention"])
    _set_int_attrs(attn, _ATTN_HEAD_ATTRS, h)
    _set_int_attrs(attn, _ATTN_KV_ATTRS, k)
    _set_int_attrs(attn, _ATTN_GROUP_ATTRS, h // k)
    mlp = _get(layer, roles["mlp"])
    _set_int_attrs(mlp, _MLP_WIDTH_ATTRS, i)
    overrides = {"num_attention_heads": h, "num_key_value_heads": k, "intermediate_size": i}
    for module in (attn, mlp):
        own = getattr(module, "config", None)
        if own is not None:
            parent = _unwrap(config if config is not None else own)
            module.config = LayerConfig(parent, **overrides)


def _new_linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    w = old.weight
    return nn.Linear(in_features, out_features, bias=old.bias is not None, device=w.device, dtype=w.dtype)


def _replace(layer: nn.Module, path: str, in_features: int | None, out_features: int | None) -> None:
    old = _get(layer, path)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"'{path}' is a {type(old).__name__}, expected torch.nn.Linear")
    fin = old.in_features if in_features is None else in_features
    fout = old.out_features if out_features is None else out_features
    if (fin, fout) == (old.in_features, old.out_features):
        return
    _set(layer, path, _new_linear(old, fin, fout))


def reshape_layer(layer: nn.Module, roles: dict, shape: dict, head_dim: int, hidden_size: int, config=None) -> None:
    """Rebuild the layer's projections for ``shape`` (new, uninitialised ``nn.Linear`` where the shape
    changes; bias presence, dtype and device, including ``meta``, are kept), then sync the attributes.
    ``config`` is the model's global config (default: the one the layer's modules hold)."""
    h, k, i = _check_shape(shape)
    d = int(head_dim)
    if roles.get("qkv"):
        _replace(layer, roles["qkv"], None, (h + 2 * k) * d)
    else:
        _replace(layer, roles["q"], None, h * d)
        _replace(layer, roles["k"], None, k * d)
        _replace(layer, roles["v"], None, k * d)
    o = _get(layer, roles["o"])
    if o.out_features != hidden_size:
        raise ValueError(f"'{roles['o']}' outputs {o.out_features}, hidden_size is {hidden_size}")
    _replace(layer, roles["o"], h * d, None)
    if roles.get("gate_up"):
        _replace(layer, roles["gate_up"], None, 2 * i)
    else:
        if roles.get("gate"):
            _replace(layer, roles["gate"], None, i)
        _replace(layer, roles["up"], None, i)
    _replace(layer, roles["down"], i, None)
    sync_layer_attributes(layer, roles, shape, config)


def _dims(config, roles_cfg: dict) -> tuple[int, int]:
    head_dim = roles_cfg.get("head_dim") or getattr(config, "head_dim", None)
    hidden = roles_cfg.get("hidden_size") or getattr(config, "hidden_size", None)
    if not head_dim:
        head_dim = hidden // config.num_attention_heads
    return int(head_dim), int(hidden)


def apply_per_layer_shapes(model: nn.Module, config=None) -> None:
    """Rebuild every layer to ``config.gqaprune_layers`` (no-op for a config without it)."""
    config = model.config if config is None else config
    per_layer = getattr(config, "gqaprune_layers", None)
    if not per_layer:
        return
    roles_cfg = getattr(config, "gqaprune_roles", None)
    if not roles_cfg or "layers" not in roles_cfg or "layer" not in roles_cfg:
        raise ValueError("config has gqaprune_layers but no gqaprune_roles {'layers': ..., 'layer': {...}}")
    layers = model.get_submodule(roles_cfg["layers"])
    if len(layers) != len(per_layer):
        raise ValueError(f"config.gqaprune_layers has {len(per_layer)} entries but the model has {len(layers)} "
                         "layers")
    head_dim, hidden = _dims(config, roles_cfg)
    roles = roles_cfg["layer"]
    for layer, shape in zip(layers, per_layer):
        reshape_layer(layer, roles, shape, head_dim, hidden, config)


# --- remote-code classes ----------------------------------------------------------------------

_PREFIX = "PerLayer"
_CLASSES: dict[type, type] = {}


def per_layer_class(base: type) -> type:
    """``PerLayer<Base>``: the stock class whose layers take their shapes from ``config.gqaprune_layers``.

    The layers are rebuilt before ``post_init`` so that weight initialisation, tied keys and the loader
    see the final shapes (under from_pretrained this happens on the meta device)."""
    if base.__name__.startswith(_PREFIX):
        return base
    cls = _CLASSES.get(base)
    if cls is None:

        def post_init(self):
            apply_per_layer_shapes(self, self.config)
            base.post_init(self)

        name = _PREFIX + base.__name__
        cls = type(name, (base,), {"post_init": post_init, "__module__": __name__, "__qualname__": name,
                                   "__doc__": f"{base.__name__} with per-layer head counts and MLP widths."})
        _CLASSES[base] = cls
    return cls


def __getattr__(name: str):
    """``PerLayer<X>`` for any transformers class ``X``: config.json's auto_map names
    ``modeling_perlayer.PerLayer<stock class>``, and transformers resolves it here by attribute lookup, so no
    family is listed in this file."""
    if name.startswith(_PREFIX):
        base = getattr(transformers, name[len(_PREFIX):], None)
        if isinstance(base, type) and issubclass(base, nn.Module):
            cls = per_layer_class(base)
            globals()[name] = cls
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LayerConfig",
    "apply_per_layer_shapes",
    "per_layer_class",
    "reshape_layer",
    "sync_layer_attributes",
]
