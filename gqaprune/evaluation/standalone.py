"""`gqaprune eval MODEL`: perplexity and lm-eval on any saved folder (uniform, per-layer or AWQ)."""

from __future__ import annotations

import json
from pathlib import Path

from gqaprune.evaluation.checks import evaluate, perplexity_tokens
from gqaprune.recipe import EvalConfig, LmEvalConfig, default_eval, load_recipe
from gqaprune.io.sources import load_tokenizer, resolve_model


def load_any(folder: Path):
    """(model, kind) for a gqaprune output or any HF folder; AWQ folders are dequantized on the CPU."""
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("quantization_config", {}).get("quant_method") == "awq":
        from gqaprune.quant.awq import load_dequantized

        return load_dequantized(folder), "awq"
    from gqaprune.io.checkpoint import load_pretrained

    return load_pretrained(folder), "per_layer" if cfg.get("gqaprune_layers") else "uniform"


def evaluate_folder(model_spec: str, recipe_path: str | None = None, tasks: str | None = None) -> dict:
    folder = resolve_model(model_spec)
    if recipe_path:
        recipe, _ = load_recipe(recipe_path)
        eval_cfg = default_eval(recipe)
    else:
        eval_cfg = EvalConfig()
    if tasks is not None:
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        eval_cfg = eval_cfg.model_copy(update={"lm_eval": LmEvalConfig(**{**eval_cfg.lm_eval.model_dump(), "tasks": names})})
    model, kind = load_any(folder)
    tokenizer = load_tokenizer(folder)
    tokens = perplexity_tokens(tokenizer, eval_cfg)
    res = evaluate(model, tokenizer, eval_cfg, tokens, progress=True, label=str(folder))
    return {"model": str(folder), "kind": kind, **res}
