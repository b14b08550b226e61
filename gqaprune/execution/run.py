"""`gqaprune run` with calibration.pipeline: layerwise: prune, save, check and evaluate without ever loading
the whole model (gqaprune.execution.layerwise). The output folder and report.json have the in-memory run's
layout; evaluation is the held-out perplexity, streamed layer by layer (lm-eval tasks need the whole model
and are not run: report["eval"]["lm_eval"] is empty and says why)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from gqaprune.arch.adapter import kv_cache_bytes_per_token
from gqaprune.errors import CheckFailed
from gqaprune.execution.allocator import return_large_frees_to_os
from gqaprune.execution.layerwise import prune_layerwise, streamed_logits, streamed_perplexity
from gqaprune.execution.weights import build_shell


def _ppl(folder, adapter, eval_cfg, eval_tokens, dtype, progress, label) -> dict:
    if eval_cfg.perplexity is None or eval_tokens is None:
        return {}
    p = eval_cfg.perplexity
    return streamed_perplexity(folder, adapter, eval_tokens, p.seq_len, p.stride, p.batch_size, dtype, progress,
                               desc=f"ppl {label} (layer-wise)")


def run_layerwise(recipe, recipe_text, recipe_path, config, adapter, plans, eval_cfg, inputs: dict, out: Path,
                  tmp: Path, progress, command, t_start) -> dict:
    """Prune, save into ``tmp``, check the round trip, evaluate and write the report (the runner's contract)."""
    from gqaprune.evaluation.checks import check_gates
    from gqaprune.report.build import build_report, write_report_files
    from gqaprune.runner import ROUNDTRIP_TOL
    from gqaprune.runtime import count_params, log, pick_runtime, runtime_info, seed_everything, source_dtype_of

    timings: dict[str, float] = {}
    allocator = return_large_frees_to_os()  # else glibc keeps each layer's freed tensors: see the module
    model_dir, calib, eval_tokens = inputs["model_dir"], inputs["calib"], inputs["eval_tokens"]
    _, dtype, save_dtype = pick_runtime(recipe.runtime, source_dtype_of(config))
    seed_everything(recipe.seed)
    log(f"layer-wise: {recipe.model} ({config.architectures[0]}, adapter {adapter.name}) on cpu in {dtype}")
    source_shell = build_shell(model_dir, dtype)  # meta: shapes and parameter counts only
    params_before = count_params(source_shell)
    kv_before = kv_cache_bytes_per_token(source_shell, adapter, save_dtype.itemsize)
    del source_shell

    t = time.perf_counter()
    before = _ppl(model_dir, adapter, eval_cfg, eval_tokens, dtype, progress, "before")
    timings["eval_before"] = time.perf_counter() - t
    probe = calib[: min(4, calib.shape[0])]
    if eval_tokens is not None and eval_tokens.numel() >= 4 * 64:
        probe = eval_tokens[: 4 * 64].reshape(4, 64)

    t = time.perf_counter()
    res = prune_layerwise(recipe, model_dir, adapter, calib, tmp, dtype=dtype, save_dtype=save_dtype,
                          tokenizer=inputs["tokenizer"], probe=probe, progress=progress)
    timings["prune_and_save"] = time.perf_counter() - t
    t = time.perf_counter()
    new_logits, _ = streamed_logits(tmp, adapter, probe, save_dtype, recipe.calibration.batch_size, progress)
    diff = float((new_logits - res["probe_logits"]).abs().max())
    tol = ROUNDTRIP_TOL.get(save_dtype, 1e-4)
    kind = "uniform" if res["uniform"] else "per_layer"
    loader = "from_pretrained" if res["uniform"] else "gqaprune.load_pretrained"
    roundtrip = {"ok": bool(torch.isfinite(new_logits).all()) and diff <= tol, "max_abs_logit_diff": diff,
                 "tolerance": tol, "kind": kind, "loader": loader, "streamed": True}
    timings["roundtrip"] = time.perf_counter() - t
    if not roundtrip["ok"]:
        raise CheckFailed(f"round trip failed: logits of the layers read back from disk differ from the run's by "
                          f"{diff:.3g} (tolerance {tol}); nothing was written at {out}")
    t = time.perf_counter()
    after = _ppl(tmp, adapter, eval_cfg, eval_tokens, dtype, progress, "after")
    timings["eval_after"] = time.perf_counter() - t
    out_shell = build_shell(tmp, dtype)
    stages = res["stages"]
    if stages:
        stages[-1]["kv_cache_bytes_per_token_after"] = kv_cache_bytes_per_token(out_shell, adapter, save_dtype.itemsize)
    report = build_report(recipe=recipe, recipe_text=recipe_text, recipe_path=recipe_path, command=command,
                          config=config, adapter=adapter, inputs=inputs, eval_cfg=eval_cfg, plans=plans,
                          stage_reports=stages, before=before, after=after,
                          gates=check_gates(eval_cfg.gates, before, after), params_before=params_before,
                          kv_before=kv_before, output={"kind": kind, "loader": loader, "params_after":
                                                       count_params(out_shell), "per_layer": res["shapes_after"],
                                                       "hidden_size": int(getattr(out_shell.config,
                                                                                  adapter.config.hidden_size))},
                          roundtrip=roundtrip, awq_report=None, save_as=None, timings=timings,
                          runtime=runtime_info(torch.device("cpu"), dtype, save_dtype))
    report["pipeline"] = {"kind": "layerwise", "sweeps": res["sweeps"],
                          "max_live_decoder_layers": res["max_live_layers"], "allocator": allocator}
    report["eval"]["lm_eval"]["skipped"] = ("lm-eval needs the whole model in memory; run `gqaprune eval OUTPUT` "
                                            "where it fits")
    write_report_files(report, recipe_text, tmp, t_start)
    return report
