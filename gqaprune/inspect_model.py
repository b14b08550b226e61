"""`gqaprune inspect`: what a model is, from its config, and which pruning amounts are valid."""

from __future__ import annotations

from gqaprune.arch.adapter import LAYER_ROLE_PATHS, head_dim_of, resolve_adapter, stock_head_counts
from gqaprune.arch.convert import MISTRAL_FROM, MISTRAL_TO, save_as_mistral_problem
from gqaprune.plan import meta_model
from gqaprune.io.sources import read_config


def inspect_model(spec: str, adapter_spec: str = "auto") -> dict:
    config = read_config(spec, progress=False)
    adapter = resolve_adapter(adapter_spec, config.architectures)
    model = meta_model(config)
    k = adapter.config
    n_q, n_kv = getattr(config, k.num_heads), getattr(config, k.num_kv_heads)
    per_layer = getattr(config, "gqaprune_layers", None)
    g = n_q // n_kv
    by_role: dict[str, int] = {}
    for name, p in model.named_parameters():
        role = "other"
        for r in LAYER_ROLE_PATHS:
            if r in ("attention", "mlp"):  # containers; their parameters belong to the roles inside
                continue
            path = getattr(adapter.layer, r)
            if path and f".{path}." in f".{name}" :
                role = r
        for r in ("embed", "final_norm", "lm_head"):
            if name.startswith(getattr(adapter.model, r) + "."):
                role = r
        by_role[role] = by_role.get(role, 0) + p.numel()
    info = {
        "architecture": config.architectures[0],
        "adapter": adapter.name,
        "layers": getattr(config, k.num_layers),
        "hidden_size": getattr(config, k.hidden_size),
        "heads": n_q,
        "kv_heads": n_kv,
        "group_size": g,
        "head_dim": head_dim_of(config, adapter),
        "intermediate_size": getattr(config, k.intermediate_size),
        "per_layer_shapes": per_layer,
        "valid_keep_kv_heads": list(range(1, n_kv)),
        "valid_group_prune_ratios": [f"{j}/{n_kv}" for j in range(1, n_kv)],
        "valid_keep_q_per_kv": list(range(1, g)),
        "valid_query_head_prune_ratios": [f"{j}/{g}" for j in range(1, g)],
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameters_by_role": by_role,
    }
    stock = stock_head_counts(config, adapter)
    if stock is not None:  # the stock config class takes only head counts that divide hidden_size
        ok = set(stock)
        info["head_counts_that_reload_stock"] = sorted(ok)
        info["keep_kv_heads_that_reload_stock"] = [j for j in range(1, n_kv) if j * g in ok]
        info["keep_q_per_kv_that_reload_stock"] = [j for j in range(1, g) if j * n_kv in ok]
    if config.architectures[0] == MISTRAL_FROM:
        problem = save_as_mistral_problem(config)
        if problem is None and not per_layer:
            info["head_counts_that_reload_stock_with_save_as_mistral"] = sorted(
                {kv * q for kv in range(1, n_kv + 1) for q in range(1, g + 1)})
            info["save_as_mistral"] = (f"with save_as: mistral (saved as {MISTRAL_TO}, the same computation) "
                                       "every head count that keeps a whole number of query heads per KV head "
                                       "reloads with stock from_pretrained")
        else:
            info["save_as_mistral"] = f"not available: {problem or 'the model is per-layer-shaped'}"
    return info
