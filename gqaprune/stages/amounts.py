"""How many units a pruning stage removes, checked against the model's shape (no weights needed)."""

from __future__ import annotations

from fractions import Fraction

from gqaprune.errors import InputError


def _from_ratio(ratio: float, total: int, round_mode: str, what: str, hint: str) -> int:
    exact = ratio * total
    n = round(exact)
    valid = ", ".join(f"{Fraction(j, total)} ({j / total:.4g})" for j in range(1, total))
    if round_mode == "exact" and abs(exact - n) > 1e-9:
        raise InputError(f"prune_ratio {ratio} cannot be met exactly: {what} has {total} units; "
                         f"valid ratios: {valid or 'none'}{hint} (or set round: nearest)")
    if not 1 <= n <= total - 1:
        raise InputError(f"prune_ratio {ratio} of {total} {what} removes {n}; it must remove between 1 and "
                         f"{total - 1}; valid ratios: {valid or 'none'}{hint}")
    return n


def heads_removed(cfg, n_q: int, n_kv: int, stage: str = "head_prune") -> int:
    """Groups removed per layer (unit: group) or query heads removed per group (unit: query_head)."""
    group = n_q // n_kv
    if cfg.unit == "group":
        if n_kv < 2:
            raise InputError(f"{stage}: the model has {n_kv} KV head; unit: group needs at least 2 (use unit: query_head)")
        if cfg.keep_kv_heads is not None:
            if not 1 <= cfg.keep_kv_heads < n_kv:
                raise InputError(f"{stage}: keep_kv_heads {cfg.keep_kv_heads} is not valid for a model with {n_kv} "
                                 f"KV heads; valid: {', '.join(map(str, range(1, n_kv)))}")
            n = n_kv - cfg.keep_kv_heads
        else:
            n = _from_ratio(cfg.prune_ratio, n_kv, cfg.round, "KV groups", f" (keep_kv_heads 1..{n_kv - 1})")
        if n_kv - n < cfg.min_groups_per_layer:
            raise InputError(f"{stage}: keeping {n_kv - n} groups per layer is below min_groups_per_layer "
                             f"{cfg.min_groups_per_layer}")
        return n
    if group < 2:
        raise InputError(f"{stage}: the model has {group} query head per KV head; unit: query_head needs at least 2 "
                         "(use unit: group)")
    if cfg.keep_q_per_kv is not None:
        if not 1 <= cfg.keep_q_per_kv < group:
            raise InputError(f"{stage}: keep_q_per_kv {cfg.keep_q_per_kv} is not valid with {group} query heads per "
                             f"KV head; valid: {', '.join(map(str, range(1, group)))}")
        return group - cfg.keep_q_per_kv
    return _from_ratio(cfg.prune_ratio, group, cfg.round, "query heads per group",
                       f" (keep_q_per_kv 1..{group - 1})")


def aligned_keep(width: int, cfg, stage: str = "neuron_prune", what: str = "intermediate size") -> tuple[int, int]:
    """(kept width, width before alignment): kept is a multiple of align, rounded down only as needed."""
    want = cfg.keep if cfg.keep is not None else round(width * (1 - cfg.prune_ratio))
    if cfg.keep is not None and not 1 <= cfg.keep < width:
        raise InputError(f"{stage}: keep {cfg.keep} must be between 1 and {width - 1} ({what} {width})")
    kept = (want // cfg.align) * cfg.align
    if kept < cfg.align or kept >= width:
        raise InputError(f"{stage}: keeping {want} of {width} channels aligned to {cfg.align} leaves {kept}; "
                         f"choose a ratio or keep giving a multiple of {cfg.align} between {cfg.align} and "
                         f"{(width - 1) // cfg.align * cfg.align}")
    return kept, want


def protected(layers: list[int], n_layers: int, stage: str) -> set[int]:
    out = set()
    for i in layers:
        if not -n_layers <= i < n_layers:
            raise InputError(f"{stage}: protect_layers index {i} is out of range for {n_layers} layers "
                             f"(valid: {-n_layers}..{n_layers - 1})")
        out.add(i % n_layers)
    if len(out) == n_layers:
        raise InputError(f"{stage}: protect_layers protects every layer; nothing would be pruned")
    return out


def spread(total: int, weights: dict[int, float], capacity: dict[int, int]) -> dict[int, int]:
    """Integer split of ``total`` proportional to ``weights``, each at most ``capacity`` (largest remainder)."""
    alloc = {i: 0 for i in weights}
    remaining = total
    active = {i for i in weights if capacity[i] > 0}
    while remaining > 0 and active:
        wsum = sum(weights[i] for i in active) or 1.0
        share = {i: remaining * weights[i] / wsum for i in active}
        step = {i: min(int(share[i]), capacity[i] - alloc[i]) for i in active}
        if sum(step.values()) == 0:  # hand out one at a time by largest share
            i = max(active, key=lambda k: (share[k], -k))
            step = {i: 1}
        for i, s in step.items():
            alloc[i] += s
            remaining -= s
        active = {i for i in active if alloc[i] < capacity[i]}
    return alloc
