"""Architecture adapters: one YAML data file per family maps generic roles to module paths.

An adapter names, for a model family, where the embedding, the decoder layers,
the final norm and the lm_head live, and inside each layer where q/k/v/o (or a
fused qkv with a named row layout) and gate/up/down (or a fused gate_up, or a
non-gated up/down pair) live. Fused layouts come from a small closed set known
to this code, never from an import path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from torch import nn

from gqaprune.errors import InputError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigKeys(_Strict):
    """Names of the HF config keys that hold each dimension."""

    num_layers: str = "num_hidden_layers"
    num_heads: str = "num_attention_heads"
    num_kv_heads: str = "num_key_value_heads"
    head_dim: str = "head_dim"
    hidden_size: str = "hidden_size"
    intermediate_size: str = "intermediate_size"
    per_layer_lists: list[str] = []  # config lists indexed by layer (e.g. layer_types), kept in step on layer drop
    layer_count_keys: list[str] = []  # config ints that count layers (e.g. max_window_layers), clipped on layer drop
    # the stock config class refuses hidden_size % num_attention_heads != 0 (LlamaConfig, Gemma3TextConfig):
    # a pruned head count that breaks it is saved with per-layer shapes
    stock_head_count_divides_hidden: bool = False


class ModelRoles(_Strict):
    embed: str
    layers: str
    final_norm: str
    lm_head: str


# Row layouts of fused projections that the surgery code knows.
QkvLayout = Literal["q_k_v_rows"]  # rows [q (H*D) | k (K*D) | v (K*D)], Phi-3 qkv_proj
GateUpLayout = Literal["gate_up_rows"]  # rows [gate (I) | up (I)], Phi-3 gate_up_proj


class LayerRoles(_Strict):
    attention: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    qkv_layout: QkvLayout | None = None
    o: str
    mlp: str
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None
    gate_up_layout: GateUpLayout | None = None
    down: str
    input_norm: str  # normalises the attention's input
    # normalises the MLP's input (Gemma: pre_feedforward_layernorm); absent when attention and MLP run in
    # parallel on the same normed input (Phi-1/2)
    post_attention_norm: str | None = None
    # Normalisation applied to a sublayer's OUTPUT before the residual add (Gemma2/3, OLMo2):
    # h = h + post_attn_output_norm(attn(input_norm(h))), h = h + post_mlp_output_norm(mlp(post_attention_norm(h))).
    post_attn_output_norm: str | None = None
    post_mlp_output_norm: str | None = None
    # Per-head normalisation of queries and keys (Qwen3, Gemma3): weight of size head_dim, shared by all heads,
    # so head pruning leaves it as it is.
    q_norm: str | None = None
    k_norm: str | None = None
    parallel_attn_mlp: bool = False

    @model_validator(mode="after")
    def _one_form_each(self):
        separate = [self.q, self.k, self.v]
        if self.qkv is None:
            if any(x is None for x in separate):
                raise ValueError("give q, k and v, or qkv with qkv_layout")
        else:
            if any(x is not None for x in separate):
                raise ValueError("give either q/k/v or the fused qkv, not both")
            if self.qkv_layout is None:
                raise ValueError("a fused qkv needs qkv_layout (one of: q_k_v_rows)")
        if self.gate_up is not None:
            if self.gate is not None or self.up is not None:
                raise ValueError("give either gate/up or the fused gate_up, not both")
            if self.gate_up_layout is None:
                raise ValueError("a fused gate_up needs gate_up_layout (one of: gate_up_rows)")
        elif self.up is None:
            raise ValueError("give up (and gate for a gated MLP), or the fused gate_up")
        if not self.parallel_attn_mlp and self.post_attention_norm is None:
            raise ValueError("post_attention_norm is required unless parallel_attn_mlp is true")
        return self

    @property
    def fused_qkv(self) -> bool:
        return self.qkv is not None

    @property
    def fused_gate_up(self) -> bool:
        return self.gate_up is not None

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.gate_up is not None


class NormSpec(_Strict):
    """How the family's norms compute: RMSNorm or LayerNorm; Gemma's RMSNorm multiplies by (1 + w)
    (weight_offset 1), so a weight of zeros is the identity scale."""

    kind: Literal["rms", "layer"] = "rms"
    weight_offset: Literal[0, 1] = 0


class EmbeddingSpec(_Strict):
    """Gemma multiplies the token embeddings by sqrt(hidden_size) before the first layer."""

    scale: Literal["none", "sqrt_hidden"] = "none"


# Layer roles that are nn.Linear projections, and their (in, out) widths in terms of the layer's shape:
# H query heads, K KV heads, D head_dim, E hidden_size, I MLP width.
LINEAR_ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")
NORM_ROLES = ("input_norm", "post_attention_norm", "post_attn_output_norm", "post_mlp_output_norm", "q_norm", "k_norm")


class AwqScaleGroup(_Strict):
    """Linears that AutoAWQ scales with one per-channel scale, folded into the output of ``prev``
    (a norm role, or the Linear role feeding them)."""

    prev: str
    linears: list[str]


class AwqSpec(_Strict):
    """How AutoAWQ quantizes this family; absent, the awq stage refuses the family. The scale groups are
    AutoAWQ's own layout for ``model_type`` (awq/models/<type>.py); gqaprune quantizes every Linear they
    name and checks those widths before any weights load."""

    model_type: str
    scale_groups: list[AwqScaleGroup]


class Adapter(_Strict):
    """One architecture family. Unknown fields are errors."""

    name: str
    architectures: list[str]
    description: str = ""
    config: ConfigKeys = ConfigKeys()
    model: ModelRoles
    layer: LayerRoles
    norm: NormSpec = NormSpec()
    embedding: EmbeddingSpec = EmbeddingSpec()
    awq: AwqSpec | None = None
    source: str = ""  # file it was read from (filled by the loader)

    @model_validator(mode="after")
    def _awq_roles_exist(self):
        for g in self.awq.scale_groups if self.awq else []:
            for role in [g.prev, *g.linears]:
                allowed = LINEAR_ROLES + NORM_ROLES if role == g.prev else LINEAR_ROLES
                if role not in allowed or getattr(self.layer, role) is None:
                    raise ValueError(f"awq.scale_groups: '{role}' is not a {'' if role == g.prev else 'Linear '}"
                                     f"role this adapter defines")
        return self

    def awq_linear_roles(self) -> list[str]:
        """The Linear roles AutoAWQ quantizes, in layer order (empty without an awq section)."""
        named = {r for g in self.awq.scale_groups for r in g.linears} if self.awq else set()
        return [r for r in LINEAR_ROLES if r in named]


def builtin_adapter_dir() -> Path:
    """adapters/ ships inside the wheel as gqaprune/adapters; a source checkout has it at the top."""
    package = Path(__file__).resolve().parent.parent  # gqaprune/
    for cand in (package / "adapters", package.parent / "adapters"):
        if cand.is_dir() and any(cand.glob("*.yaml")):
            return cand
    raise InputError("the builtin adapters folder is missing from this installation")


def load_adapter_file(path: Path) -> Adapter:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot read adapter file '{path}': {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}{where}: adapter is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: an adapter file must be a mapping")
    try:
        return Adapter(**raw, source=str(path))
    except ValidationError as e:
        raise InputError(f"{path}: invalid adapter: {format_validation_error(e)}") from None


def format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def builtin_adapters() -> dict[str, Adapter]:
    return {p.stem: load_adapter_file(p) for p in sorted(builtin_adapter_dir().glob("*.yaml"))}


def resolve_adapter(spec: str, architectures: list[str] | None) -> Adapter:
    """``auto`` picks by config.architectures; a known name; or a path to a user's file."""
    known = builtin_adapters()
    if spec == "auto":
        archs = architectures or []
        if not archs:
            raise InputError("the model's config.json has no 'architectures'; set `adapter:` in the recipe to one of "
                             f"{', '.join(known)} or to an adapter file")
        for adapter in known.values():
            if any(a in adapter.architectures for a in archs):
                return adapter
        raise InputError(
            f"no adapter for architecture {archs[0]}; known: "
            + ", ".join(f"{n} ({'/'.join(a.architectures)})" for n, a in known.items())
            + ". Write one: copy adapters/llama.yaml, set `architectures` and the module paths of each role, "
            "and point the recipe's `adapter:` at the file (see `gqaprune schema --adapter`)"
        )
    if spec in known:
        return known[spec]
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise InputError(f"adapter file '{spec}' does not exist")
        return load_adapter_file(path)
    raise InputError(f"unknown adapter '{spec}'; use auto, one of {', '.join(known)}, or a path to an adapter .yaml")


# Every layer role that names a module path, in a fixed order.
LAYER_ROLE_PATHS = ("attention", "q", "k", "v", "qkv", "o", "mlp", "gate", "up", "gate_up", "down", "input_norm",
                    "post_attention_norm", "post_attn_output_norm", "post_mlp_output_norm", "q_norm", "k_norm")


# --- access to a loaded model through the roles ---------------------------------------------


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def decoder_layers(model: nn.Module, adapter: Adapter) -> nn.ModuleList:
    return get_module(model, adapter.model.layers)


def cfg_get(config, adapter: Adapter, key: str):
    return getattr(config, getattr(adapter.config, key), None)


def head_dim_of(config, adapter: Adapter) -> int:
    hd = cfg_get(config, adapter, "head_dim")
    if hd:
        return int(hd)
    return int(cfg_get(config, adapter, "hidden_size")) // int(cfg_get(config, adapter, "num_heads"))


def layer_shape(layer: nn.Module, adapter: Adapter, head_dim: int) -> dict:
    """Heads, KV heads and MLP width of one decoder layer, read from its weight shapes."""
    r = adapter.layer
    o = get_module(layer, r.o)
    n_heads = o.in_features // head_dim
    if r.fused_qkv:
        qkv = get_module(layer, r.qkv)
        n_kv = (qkv.out_features - n_heads * head_dim) // (2 * head_dim)
    else:
        n_kv = get_module(layer, r.k).out_features // head_dim
    down = get_module(layer, r.down)
    return {"num_attention_heads": n_heads, "num_key_value_heads": n_kv, "intermediate_size": down.in_features}


def stock_head_counts(config, adapter: Adapter) -> list[int] | None:
    """Head counts the stock config class accepts (None: any); see ConfigKeys.stock_head_count_divides_hidden."""
    if not adapter.config.stock_head_count_divides_hidden:
        return None
    hidden, heads = int(cfg_get(config, adapter, "hidden_size")), int(cfg_get(config, adapter, "num_heads"))
    return [h for h in range(1, heads + 1) if hidden % h == 0]


def model_shapes(model: nn.Module, adapter: Adapter) -> list[dict]:
    hd = head_dim_of(model.config, adapter)
    return [layer_shape(layer, adapter, hd) for layer in decoder_layers(model, adapter)]


def kv_cache_bytes_per_token(model: nn.Module, adapter: Adapter, bytes_per_value: int) -> int:
    """Bytes the KV cache grows by per token: a key and a value vector per KV head in every layer."""
    hd = head_dim_of(model.config, adapter)
    return sum(2 * s["num_key_value_heads"] * hd * bytes_per_value for s in model_shapes(model, adapter))


def check_adapter_on_model(model: nn.Module, adapter: Adapter) -> None:
    """Every role resolves and the weight shapes agree with the config; else a clear error."""
    config = model.config
    where = f"adapter '{adapter.name}'"

    def resolve(root, path, role, prefix=""):
        try:
            return get_module(root, path)
        except AttributeError:
            raise InputError(f"{where}: role '{role}' path '{prefix}{path}' does not resolve on "
                             f"{type(model).__name__}") from None

    for role in ("embed", "layers", "final_norm", "lm_head"):
        resolve(model, getattr(adapter.model, role), role)
    layers = decoder_layers(model, adapter)
    n_layers = cfg_get(config, adapter, "num_layers")
    if len(layers) != n_layers:
        raise InputError(f"{where}: model has {len(layers)} layers, config says {n_layers}")
    hidden = cfg_get(config, adapter, "hidden_size")
    hd = head_dim_of(config, adapter)
    per_layer = getattr(config, "gqaprune_layers", None)
    r = adapter.layer
    for i, layer in enumerate(layers):
        p = f"{adapter.model.layers}.{i}."
        for role in LAYER_ROLE_PATHS:
            path = getattr(r, role)
            if path is not None:
                resolve(layer, path, role, p)
        for role in ("q_norm", "k_norm"):
            path = getattr(r, role)
            size = None if path is None else get_module(layer, path).weight.shape[0]
            if size is not None and size != hd:
                raise InputError(f"{where}: role '{role}' ({p}{path}) has {size} weights; a per-head norm has "
                                 f"head_dim={hd}")
        expect = per_layer[i] if per_layer else {
            "num_attention_heads": cfg_get(config, adapter, "num_heads"),
            "num_key_value_heads": cfg_get(config, adapter, "num_kv_heads"),
            "intermediate_size": cfg_get(config, adapter, "intermediate_size"),
        }
        got = layer_shape(layer, adapter, hd)
        for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if got[key] != expect[key]:
                raise InputError(f"{where}: layer {i} has {key}={got[key]} from its weights but the config says "
                                 f"{expect[key]}; the adapter's role paths may point at the wrong modules")
        if got["num_attention_heads"] % max(got["num_key_value_heads"], 1) != 0:
            raise InputError(f"{where}: layer {i} has {got['num_attention_heads']} query heads, not a multiple "
                             f"of its {got['num_key_value_heads']} KV heads")
        o = get_module(layer, r.o)
        if o.out_features != hidden:
            raise InputError(f"{where}: role 'o' ({p}{r.o}) outputs {o.out_features}, hidden_size is {hidden}")
    if next(model.parameters()).device.type != "meta":  # computing needs real weights (plan runs on meta)
        check_norm_and_embedding(model, adapter)


@torch.no_grad()
def check_norm_and_embedding(model: nn.Module, adapter: Adapter) -> None:
    """The adapter's ``norm`` and ``embedding`` sections describe what the modules compute: layer 0's input
    norm on a probe vector with a non-zero mean against RMSNorm / LayerNorm with the declared weight offset,
    and the embedding of token 1 against its weight row times the declared scale."""
    where = f"adapter '{adapter.name}'"
    norm = get_module(decoder_layers(model, adapter)[0], adapter.layer.input_norm)
    w = norm.weight.detach().float().cpu()
    x = torch.linspace(-1.0, 3.0, w.shape[0])  # (hidden,), mean 1: RMSNorm and LayerNorm differ on it
    centred = x - x.mean() if adapter.norm.kind == "layer" else x
    want = centred / centred.pow(2).mean().sqrt() * (adapter.norm.weight_offset + w)
    bias = getattr(norm, "bias", None)
    if bias is not None:
        want = want + bias.detach().float().cpu()
    got = norm(x.to(norm.weight)[None]).float().cpu()[0]
    if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())):
        raise InputError(f"{where}: norm {{kind: {adapter.norm.kind}, weight_offset: {adapter.norm.weight_offset}}} "
                         f"does not match what {adapter.layer.input_norm} computes; check the adapter's norm section")
    embed = get_module(model, adapter.model.embed)
    row = embed.weight[1].detach().float()
    scale = float(cfg_get(model.config, adapter, "hidden_size")) ** 0.5 if adapter.embedding.scale == "sqrt_hidden" \
        else 1.0
    got = embed(torch.tensor([[1]], device=embed.weight.device)).float()[0, 0].cpu()
    if not torch.allclose(got, row.cpu() * scale, rtol=2e-2, atol=1e-6):
        raise InputError(f"{where}: embedding {{scale: {adapter.embedding.scale}}} does not match what "
                         f"{adapter.model.embed} computes; check the adapter's embedding section")
