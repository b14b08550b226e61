"""Save and reload pruned models, uniform or per-layer-shaped.

A model whose layers all keep one shape is saved as a stock HF folder (the global config keys carry the
shape, with an explicit head_dim), which stock ``AutoModelForCausalLM.from_pretrained(path)`` reloads.

A model whose layers differ (heads, KV heads, Q/KV ratio or MLP width per layer) keeps global config keys
that its stock config class accepts and records the real shapes in ``config.gqaprune_layers`` (one dict per
layer) with the role paths in ``config.gqaprune_roles``. ``modeling_perlayer.py`` is copied next to the
weights and ``auto_map`` points at its ``PerLayer<Stock>ForCausalLM``, so stock
``from_pretrained(path, trust_remote_code=True)`` reloads it; ``load_pretrained`` reloads it without
remote code. Weights are always safetensors, never pickles.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from gqaprune.arch import modeling_perlayer
from gqaprune.arch.adapter import Adapter, cfg_get, head_dim_of, model_shapes
from gqaprune.errors import CheckFailed, InputError

SHAPE_KEYS = modeling_perlayer.SHAPE_KEYS
PER_LAYER_KEYS = ("gqaprune_layers", "gqaprune_roles", "gqaprune_num_key_value_groups")
MODELING_FILE = "modeling_perlayer.py"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


# --- config ------------------------------------------------------------------------------------


def stock_class(model_or_cls) -> type:
    """The transformers class behind a model (a remote-code ``PerLayer*`` subclass maps to its base)."""
    cls = model_or_cls if isinstance(model_or_cls, type) else type(model_or_cls)
    for c in cls.__mro__:
        if c.__module__.startswith("transformers.") and issubclass(c, nn.Module):
            return c
    return cls


@contextlib.contextmanager
def _quiet_transformers():
    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _config_dict(config) -> dict:
    d = config.to_dict()
    for key in (*PER_LAYER_KEYS, "auto_map"):
        d.pop(key, None)
    return d


def _fits(model: nn.Module, cand: dict) -> bool:
    """Does the stock class, built from config dict ``cand`` (+ per-layer shapes if given), have exactly the
    model's parameter names and shapes? Built on the meta device: no memory, no init cost."""
    config = model.config
    try:
        with _quiet_transformers():
            cfg = type(config).from_dict(dict(cand))
    except Exception:  # the config class refuses the values (e.g. LlamaConfig: hidden_size % heads)
        return False
    cfg._attn_implementation = "eager"
    try:
        with _quiet_transformers(), torch.device("meta"):
            probe = stock_class(model)(cfg)
            modeling_perlayer.apply_per_layer_shapes(probe, cfg)
    except Exception:
        return False
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    return want == got


def _set_keys(config, values: dict) -> None:
    for key, value in values.items():
        setattr(config, key, value)


def _drop_keys(config, keys) -> None:
    for key in keys:
        if key in config.__dict__:
            delattr(config, key)


def finalize_config(model: nn.Module, adapter: Adapter) -> bool:
    """Make ``model.config`` describe the model's real layer shapes. Returns True when every layer has one
    shape and the stock config class can express it (stock ``from_pretrained`` reloads it), False when the
    shapes are recorded per layer (``config.gqaprune_layers`` / ``gqaprune_roles``)."""
    config = model.config
    keys = adapter.config
    head_dim = head_dim_of(config, adapter)
    hidden = int(cfg_get(config, adapter, "hidden_size"))
    shapes = model_shapes(model, adapter)
    if not shapes:
        raise CheckFailed("the model has no decoder layers left")
    for i, s in enumerate(shapes):
        if s["num_key_value_heads"] < 1 or s["num_attention_heads"] % s["num_key_value_heads"]:
            raise CheckFailed(f"layer {i} has {s['num_attention_heads']} query heads and "
                              f"{s['num_key_value_heads']} KV heads; each KV head needs a whole group of query heads")

    def global_values(s: dict) -> dict:
        return {keys.num_heads: s["num_attention_heads"], keys.num_kv_heads: s["num_key_value_heads"],
                keys.intermediate_size: s["intermediate_size"], keys.head_dim: head_dim}

    base = _config_dict(config)
    if all(s == shapes[0] for s in shapes):
        cand = {**base, **global_values(shapes[0])}
        if _fits(model, cand):
            _set_keys(config, global_values(shapes[0]))
            _drop_keys(config, PER_LAYER_KEYS)
            return True

    per_layer = {
        "gqaprune_layers": [{k: int(s[k]) for k in SHAPE_KEYS} for s in shapes],
        "gqaprune_roles": {"layers": adapter.model.layers, "layer": adapter.layer.model_dump(),
                           "head_dim": head_dim, "hidden_size": hidden},
        # the Q/KV ratio of each layer: set on each attention module at load (sync_layer_attributes)
        "gqaprune_num_key_value_groups": [s["num_attention_heads"] // s["num_key_value_heads"] for s in shapes],
    }
    current = {"num_attention_heads": cfg_get(config, adapter, "num_heads"),
               "num_key_value_heads": cfg_get(config, adapter, "num_kv_heads"),
               "intermediate_size": cfg_get(config, adapter, "intermediate_size")}
    widest = {k: max(s[k] for s in shapes) for k in SHAPE_KEYS}
    heads_for_hidden = max(hidden // head_dim, 1)
    candidates = [current, widest, {**widest, "num_attention_heads": heads_for_hidden,
                                    "num_key_value_heads": 1}]
    for glob in candidates:
        if any(v is None for v in glob.values()):
            continue
        values = {**global_values(glob), **per_layer}
        if _fits(model, {**base, **values}):
            _set_keys(config, values)
            return False
    raise CheckFailed(f"cannot describe the layer shapes of this {type(config).__name__} in a config that "
                      f"{stock_class(model).__name__} rebuilds with the same weight shapes: {shapes}")


# --- save --------------------------------------------------------------------------------------


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise InputError(f"unknown dtype '{dtype}'; use float32, float16 or bfloat16")
    return value


def fix_config_json(folder: Path, stock: type, target: torch.dtype | None, uniform: bool, old_auto_map) -> None:
    """Rewrite ``folder/config.json``: stock architecture name, exact auto_map (the per-layer class for a
    per-layer model, whose modeling file is copied beside it), saved dtype."""
    cfg_path = folder / "config.json"
    data = json.loads(cfg_path.read_text(encoding="utf-8"))
    data["architectures"] = [stock.__name__]
    data.pop("auto_map", None)
    if target is not None:
        data["dtype"] = str(target).removeprefix("torch.")
    custom = not stock.__module__.startswith("transformers.")
    if custom and old_auto_map:
        data["auto_map"] = old_auto_map  # a remote-code architecture: keep the author's code references
    if not uniform:
        data["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{modeling_perlayer.per_layer_class(stock).__name__}"}
        shutil.copyfile(Path(modeling_perlayer.__file__), folder / MODELING_FILE)
    else:
        for key in PER_LAYER_KEYS:
            data.pop(key, None)
        stale = folder / MODELING_FILE
        if stale.exists():
            stale.unlink()
    cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Parameters to ``dtype`` in place, buffers as they are: the model as from_pretrained(dtype=...) builds it.
    ``model.to(dtype)`` would also cast float buffers such as the rotary ``inv_freq``, which a fresh load keeps
    in float32; in bfloat16 that moves the logits by ~0.06 on 128 tokens of a tiny Llama."""
    for p in model.parameters():  # a tied parameter is visited once
        if p.is_floating_point():
            p.data = p.data.to(dtype)


def save_model(model: nn.Module, adapter: Adapter, folder, tokenizer=None, dtype=None) -> dict:
    """Write the model (safetensors), config, generation config and tokenizer into ``folder``.

    Returns {"uniform": bool, "loader": "from_pretrained" | "gqaprune.load_pretrained"}; a per-layer model
    also reloads with stock ``from_pretrained(folder, trust_remote_code=True)``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uniform = finalize_config(model, adapter)
    stock = stock_class(model)
    config = model.config
    target = _as_dtype(dtype)
    state_dict = None
    if target is not None and target != model.dtype:
        state_dict = {k: (v.to(target) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    had_auto_map = "auto_map" in config.__dict__
    old_auto_map = config.__dict__.get("auto_map")
    try:
        model.save_pretrained(str(folder), state_dict=state_dict)
    finally:
        # save_pretrained writes the class name into config.architectures (and, for a remote-code class,
        # an auto_map); keep the in-memory config as it was, with the stock architecture name
        config.architectures = [stock.__name__]
        if had_auto_map:
            config.auto_map = old_auto_map
        elif "auto_map" in config.__dict__:
            del config.auto_map

    fix_config_json(folder, stock, target, uniform, old_auto_map)
    for pattern in PICKLE_PATTERNS:
        for f in folder.glob(pattern):
            raise CheckFailed(f"save wrote a pickle file '{f.name}'; gqaprune saves safetensors only")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return {"uniform": uniform, "loader": "from_pretrained" if uniform else "gqaprune.load_pretrained"}


# --- load --------------------------------------------------------------------------------------


def _check_folder(path: Path) -> dict:
    if not path.exists():
        raise InputError(f"model folder '{path}' does not exist")
    if not path.is_dir():
        raise InputError(f"'{path}' is not a folder; give the folder holding config.json and model*.safetensors")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"'{path}' has no config.json; it is not a saved HF model folder")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{cfg_path}: cannot read the config ({e})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{cfg_path}: the config must be a JSON object")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [f.name for pattern in PICKLE_PATTERNS for f in path.glob(pattern)]
        if pickles:
            raise InputError(f"'{path}' holds only pickle weights ({', '.join(sorted(pickles))}); gqaprune loads "
                             "safetensors only (convert with save_pretrained in a trusted environment)")
        raise InputError(f"'{path}' has no model*.safetensors weights")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            needed = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{index}: unreadable safetensors index ({e})") from None
        missing = sorted(n for n in needed if not (path / n).is_file())
        if missing:
            raise InputError(f"{index} names weight files that are missing: {', '.join(missing)}")
    for f in files:
        _check_safetensors(f)
    return raw


def _check_safetensors(file: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def _check_loading_info(path: Path, info: dict) -> None:
    problems = []
    for key, what in (("missing_keys", "missing from the checkpoint"), ("unexpected_keys", "not in the model"),
                      ("mismatched_keys", "with a different shape"), ("error_msgs", "errors")):
        items = info.get(key) or []
        if items:
            items = sorted(x[0] if isinstance(x, tuple) else str(x) for x in items)
            problems.append(f"{len(items)} {what} ({', '.join(items[:5])}{', ...' if len(items) > 5 else ''})")
    if problems:
        raise CheckFailed(f"'{path}': the weights do not match the model built from its config: "
                          + "; ".join(problems))


def _stock_class_for(config, raw: dict) -> type:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for name in raw.get("architectures") or []:
        name = name.removeprefix("PerLayer")
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and cls.__module__.startswith("transformers."):
            return cls
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None:
        raise InputError(f"no transformers causal-LM class for model_type '{getattr(config, 'model_type', None)}'")
    return cls


def load_pretrained(path, dtype=None, device="cpu", attn_implementation=None, placement: dict | None = None
                    ) -> nn.Module:
    """Load a gqaprune output folder of either kind (uniform or per-layer-shaped), without remote code.

    Only safetensors weights are read; every weight of the model must be in the checkpoint and every
    checkpoint tensor must belong to the model, with the same shape. ``placement`` ({"device_map": "auto",
    "max_memory": ..., "offload_folder": ...}, see gqaprune.io.placement) loads through accelerate's big-model
    placement instead of onto ``device``: the model comes back dispatched, with ``model.hf_device_map``."""
    import transformers
    from safetensors import SafetensorError

    path = Path(path)
    raw = _check_folder(path)
    # mismatched shapes are reported (and refused) by _check_loading_info, naming the tensors
    kwargs = {"ignore_mismatched_sizes": True}
    target = _as_dtype(dtype)
    kwargs["dtype"] = target if target is not None else "auto"
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if placement is not None:
        kwargs.update(placement)
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any config failure is a bad folder
        raise InputError(f"{path / 'config.json'}: cannot build the model config ({e})") from None
    per_layer = bool(raw.get("gqaprune_layers"))
    try:
        if per_layer:
            stock = _stock_class_for(config, raw)
            cls = modeling_perlayer.per_layer_class(stock)
            model, info = cls.from_pretrained(str(path), config=config, output_loading_info=True,
                                              local_files_only=True, **kwargs)
            model.__class__ = stock  # the stock class with rebuilt layers: saves and resolves like the original
        else:
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), config=config, output_loading_info=True, local_files_only=True, **kwargs)
    except SafetensorError as e:
        raise InputError(f"'{path}': corrupt safetensors weights ({e})") from None
    except (OSError, RuntimeError, ValueError) as e:
        # e.g. weights whose shapes do not match the config (transformers raises on mismatched sizes)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"'{path}': cannot load the model from its config and weights: {first}") from None
    _check_loading_info(path, info)
    if device is not None and placement is None:
        model.to(device)
    return model.eval()
