"""Evaluation of an in-memory model (perplexity and lm-eval), the finite-logits check and the quality gates."""

from __future__ import annotations

import time

import torch

from gqaprune.errors import CheckFailed, InputError
from gqaprune.evaluation.perplexity import perplexity
from gqaprune.io.data import token_stream


@torch.no_grad()
def check_finite(model, ids: torch.Tensor, where: str, when: str = "after this stage") -> None:
    """CheckFailed naming ``where`` when the model gives NaN or inf logits on ``ids``."""
    logits = model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).sum())
        raise CheckFailed(f"{where}: the model produces NaN or inf logits ({bad} values) {when}; nothing was written")


def perplexity_tokens(tokenizer, eval_cfg) -> torch.Tensor | None:
    """The held-out token stream of the eval block's perplexity source (None when perplexity is off)."""
    if eval_cfg.perplexity is None:
        return None
    p = eval_cfg.perplexity
    tokens = token_stream(tokenizer, p.source, p.split, p.field)
    if p.max_tokens:
        tokens = tokens[: p.max_tokens]
    if tokens.numel() < 2:
        raise InputError(f"evaluation source '{p.source}' ({p.split}) has {tokens.numel()} tokens; "
                         "perplexity needs at least 2")
    return tokens


def evaluate(model, tokenizer, eval_cfg, eval_tokens, progress: bool, label: str) -> dict:
    """Perplexity on ``eval_tokens`` (when given) and the eval block's lm-eval tasks (all local tasks when unset)."""
    out: dict = {}
    if eval_cfg.perplexity is not None and eval_tokens is not None:
        p = eval_cfg.perplexity
        out.update(perplexity(model, eval_tokens, p.seq_len, p.stride, p.batch_size, progress, desc=f"ppl {label}"))
    tasks = eval_cfg.lm_eval.tasks
    from gqaprune.evaluation.local_tasks import LOCAL_TASKS

    tasks = list(LOCAL_TASKS) if tasks is None else tasks
    if tasks:
        from gqaprune.evaluation.lm_eval_runner import run_lm_eval  # imports lm_eval only when tasks are asked for

        le = eval_cfg.lm_eval
        t0 = time.perf_counter()
        out["lm_eval"] = run_lm_eval(model, tokenizer, tasks, include_path=le.include_path, limit=le.limit,
                                     batch_size=le.batch_size, num_fewshot=le.num_fewshot)
        out["lm_eval_seconds"] = round(time.perf_counter() - t0, 2)
    from gqaprune.evaluation.generations import greedy_continuations, prompts_of

    if prompts_of(eval_cfg):
        out["generations"] = greedy_continuations(model, tokenizer, prompts_of(eval_cfg), progress=progress,
                                                  desc=f"generations {label}")
    return out


def check_gates(gates, before: dict, after: dict) -> dict:
    """{gate name: {limit, value, passed}} for the eval block's gates; CheckFailed for a gate on a missing metric."""
    result = {}
    if gates.max_ppl_ratio is not None and "perplexity" in before:
        ratio = after["perplexity"] / before["perplexity"]
        result["max_ppl_ratio"] = {"limit": gates.max_ppl_ratio, "value": ratio, "passed": ratio <= gates.max_ppl_ratio}

    def metric(ev, key):
        task, _, name = key.partition("/")
        try:
            return float(ev["lm_eval"][task][name])
        except KeyError:
            raise CheckFailed(f"gate '{key}': no such lm-eval result (have: "
                              + ", ".join(f"{t}/{m}" for t, ms in ev.get("lm_eval", {}).items() for m in ms) + ")")

    for key, limit in gates.min.items():
        v = metric(after, key)
        result[f"min:{key}"] = {"limit": limit, "value": v, "passed": v >= limit}
    for key, limit in gates.max_drop.items():
        drop = metric(before, key) - metric(after, key)
        result[f"max_drop:{key}"] = {"limit": limit, "value": drop, "passed": drop <= limit}
    return result
