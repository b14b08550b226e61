"""`gqaprune run`: recipe -> model -> stages -> save -> reload -> compare -> evaluate -> output folder.

Order of work: everything that can be checked without weights (recipe, output path, config,
adapter, plan), then every input that is cheap to read (model folder, tokenizer, calibration
and evaluation tokens), and only then the weights. Bad input is an InputError (exit 2) raised
before any folder is created.

The steps live beside this file: ``runtime`` (seeds, device, dtypes, threads), ``io.output`` (the
output folder is built in a temporary folder and renamed into place; signals), ``evaluation.checks``
(evaluation, the finite-logits check, quality gates), ``arch.convert`` (``save_as: mistral``),
``stages.awq`` (the AWQ output) and ``report.build`` / ``report.provenance`` (report.json and its hashes).

Reproducibility: with the same recipe, model files, data and library versions (and the same
torch thread count and hardware), every output file except report.json and README.md
(which hold timings) is byte-identical between runs; ``gqaprune verify OUTPUT`` recomputes the
output hashes that report.json records.
"""

from __future__ import annotations

import copy
import os
import shlex
import time
from pathlib import Path

import torch

from gqaprune.arch.adapter import check_adapter_on_model, kv_cache_bytes_per_token, model_shapes, resolve_adapter
from gqaprune.arch.convert import convert_for_save
from gqaprune.context import RunContext
from gqaprune.errors import CheckFailed, GateFailed, InputError
from gqaprune.evaluation.checks import check_finite, check_gates, evaluate, perplexity_tokens
from gqaprune.evaluation.perplexity import perplexity
from gqaprune.io.data import calibration_windows
from gqaprune.io.output import atomic_output, check_output_path, remove_stale_temps, temp_names
from gqaprune.io.placement import load_for_run, placement_info
from gqaprune.io.sources import load_tokenizer, read_config, resolve_model
from gqaprune.plan import simulate
from gqaprune.recipe import default_eval, load_recipe
from gqaprune.report.build import build_report, write_report_files
from gqaprune.runtime import (count_params, log, pick_runtime, process_rank, runtime_info, seed_everything,
                              source_dtype_of, torch_threads)
from gqaprune.stages import build_stage
from gqaprune.stages.awq import awq_output

ROUNDTRIP_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}  # max |logit diff|


def run(recipe_path: str, output: str | None = None, force: bool = False, progress: bool = True,
        command: str | None = None) -> dict:
    """Run a recipe; returns the report. Raises GqaError subclasses on failure."""
    t_start = time.perf_counter()
    recipe, recipe_text = load_recipe(recipe_path)
    if not (output or recipe.output):
        raise InputError(f"{recipe_path}: no output folder (set `output:` in the recipe or pass --output)")
    out = Path(output or recipe.output)
    check_output_path(out, force, recipe.model)

    # -- everything checkable without weights ------------------------------------------------
    config = read_config(recipe.model, recipe.trust_remote_code, progress)
    adapter = resolve_adapter(recipe.adapter, config.architectures)
    plans = simulate(recipe, config, adapter)
    eval_cfg = default_eval(recipe)
    command = command or _equivalent_command(recipe_path, output, force)

    is_main = process_rank() == 0
    with atomic_output(out, commit=is_main) as tmp, torch_threads(recipe.runtime.threads):
        from gqaprune.io.checkpoint import _quiet_transformers  # no "sequence longer than model max" warnings

        with _quiet_transformers():
            inputs = prepare_inputs(recipe, config, eval_cfg, progress)  # bad input fails here, before any folder
        if is_main:
            for name in remove_stale_temps(out):
                log(f"removed {name}, left by an earlier run that was killed")
        report = _run_inner(recipe, recipe_text, recipe_path, config, adapter, plans, eval_cfg, inputs, out, tmp,
                            progress, is_main, command, t_start)
    if not is_main:
        return report
    log(f"wrote {out} in {time.perf_counter() - t_start:.1f}s")
    if report["status"] != "ok":
        failed = [k for k, g in report["gates"].items() if not g["passed"]]
        raise GateFailed(f"quality gate failed: " + "; ".join(
            f"{k} = {report['gates'][k]['value']:.4g} (limit {report['gates'][k]['limit']})" for k in failed)
            + f"; the output is kept for inspection at {out}")
    return report


def _equivalent_command(recipe_path, output, force) -> str:
    parts = ["gqaprune", "run", str(recipe_path)] + (["--output", str(output)] if output else []) \
        + (["--force"] if force else [])
    return " ".join(shlex.quote(p) for p in parts)


def prepare_inputs(recipe, config, eval_cfg, progress: bool) -> dict:
    """The model folder, tokenizer, calibration windows and evaluation tokens: every input that is cheap
    to read, read (and checked) before any weights load and before any folder is created."""
    t0 = time.perf_counter()
    model_dir = resolve_model(recipe.model, progress)  # a builtin is trained / converted here on first use
    tokenizer = load_tokenizer(model_dir)
    cal = recipe.calibration
    calib = calibration_windows(tokenizer, cal.source, cal.split, cal.samples, cal.seq_len, recipe.seed, cal.field)
    eval_tokens = perplexity_tokens(tokenizer, eval_cfg)
    vocab = getattr(config, "vocab_size", None)
    for what, t in (("calibration", calib), ("evaluation", eval_tokens)):
        if vocab and t is not None and t.numel() and int(t.max()) >= vocab:
            raise InputError(f"the tokenizer in '{model_dir}' gives {what} token id {int(t.max())}, but the model's "
                             f"vocab_size is {vocab}: tokenizer and model do not belong together")
    return {"model_dir": model_dir, "tokenizer": tokenizer, "calib": calib, "eval_tokens": eval_tokens,
            "seconds": time.perf_counter() - t0}


def _run_inner(recipe, recipe_text, recipe_path, config, adapter, plans, eval_cfg, inputs: dict, out: Path, tmp: Path,
               progress, is_main, command, t_start) -> dict:
    """Load, evaluate, run the stages, convert, save and reload, evaluate again, write the report into ``tmp``."""
    if recipe.calibration.pipeline == "layerwise":  # one decoder layer in memory at a time
        from gqaprune.execution.run import run_layerwise

        return run_layerwise(recipe, recipe_text, recipe_path, config, adapter, plans, eval_cfg, inputs, out, tmp,
                             progress, command, t_start)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    tokenizer, calib, eval_tokens = inputs["tokenizer"], inputs["calib"], inputs["eval_tokens"]
    device, dtype, save_dtype = pick_runtime(recipe.runtime, source_dtype_of(config))
    seed_everything(recipe.seed)
    log(f"loading {recipe.model} ({config.architectures[0]}, adapter {adapter.name}) on {device} in {dtype}")
    model, load_map = load_for_run(inputs["model_dir"], dtype, device, recipe.runtime, temp_names(out, os.getpid())[3])
    check_adapter_on_model(model, adapter)
    check_finite(model, calib[:2], f"{recipe.model}", "before any stage")
    timings["load"] = time.perf_counter() - t

    before = _evaluate_timed(model, tokenizer, eval_cfg, eval_tokens, progress, "before", timings)
    params_before = count_params(model)
    kv_bytes = save_dtype.itemsize  # KV cache bytes are counted in the saved dtype
    kv_before = kv_cache_bytes_per_token(model, adapter, kv_bytes)

    ctx = RunContext(model=model, adapter=adapter, tokenizer=tokenizer, recipe=recipe, calib=calib,
                     eval_tokens=eval_tokens, progress=progress, is_main_process=is_main)
    stage_reports, awq_cfg = _run_stages(ctx, eval_cfg, kv_bytes)
    if not is_main:
        return {"status": "ok", "rank": os.environ.get("RANK")}

    probe = calib[: min(4, calib.shape[0])]
    if eval_tokens is not None and eval_tokens.numel() >= 4 * 64:
        probe = eval_tokens[: 4 * 64].reshape(4, 64)
    t = time.perf_counter()
    model, save_adapter, save_as = convert_for_save(ctx.model, adapter, recipe.save_as, probe, dtype)
    if save_as is not None:
        ctx.model = model
        timings["convert"] = time.perf_counter() - t

    t = time.perf_counter()
    reloaded, saved, roundtrip, awq_report = _save_and_reload(model, save_adapter, tokenizer, awq_cfg, recipe, tmp,
                                                              probe, device, save_dtype, progress,
                                                              temp_names(out, os.getpid())[3])
    del model
    timings["awq" if awq_cfg is not None else "save"] = time.perf_counter() - t  # incl. reload + logit check
    if not roundtrip["ok"]:
        raise CheckFailed(f"round trip failed: logits of the model reloaded from disk differ from the in-memory "
                          f"model by {roundtrip['max_abs_logit_diff']:.3g} (tolerance {roundtrip['tolerance']}); "
                          f"nothing was written at {out}")
    reloaded.to(dtype)
    after = _evaluate_timed(reloaded, tokenizer, eval_cfg, eval_tokens, progress, "after", timings)
    report = build_report(recipe=recipe, recipe_text=recipe_text, recipe_path=recipe_path, command=command,
                          config=config, adapter=adapter, inputs=inputs, eval_cfg=eval_cfg, plans=plans,
                          stage_reports=stage_reports, before=before, after=after,
                          gates=check_gates(eval_cfg.gates, before, after), params_before=params_before,
                          kv_before=kv_before, output=saved, roundtrip=roundtrip, awq_report=awq_report,
                          save_as=save_as, timings=timings,
                          runtime=runtime_info(device, dtype, save_dtype,
                                               None if load_map is None else placement_info(load_map)))
    write_report_files(report, recipe_text, tmp, t_start)
    return report


def _evaluate_timed(model, tokenizer, eval_cfg, eval_tokens, progress, label: str, timings: dict) -> dict:
    t = time.perf_counter()
    result = evaluate(model, tokenizer, eval_cfg, eval_tokens, progress, label)
    timings[f"eval_{label}"] = time.perf_counter() - t
    if "perplexity" in result:
        log(f"perplexity {label}: {result['perplexity']:.3f}")
    return result


def _run_stages(ctx: RunContext, eval_cfg, kv_bytes: int) -> tuple[list[dict], object]:
    """Every stage but awq (an output stage, applied when saving) in order: (report entries, awq config or None)."""
    stages = [build_stage(st) for st in ctx.recipe.stages]
    if any(stage.needs_teacher() for stage in stages):
        ctx.teacher = copy.deepcopy(ctx.model).eval().requires_grad_(False)  # the model before any pruning
    stage_reports = []
    awq_cfg = None
    for si, (st, stage) in enumerate(zip(ctx.recipe.stages, stages)):
        if stage.writes_output:  # awq: quantizes the saved model when the output is written
            awq_cfg = st
            continue
        t = time.perf_counter()
        p_before = count_params(ctx.model)
        log(f"stage {si}: {st.type}")
        entry = {"type": st.type, "index": si}
        entry.update(stage.apply(ctx))
        check_finite(ctx.model, ctx.calib[:2], f"stage {si} ({st.type})")
        entry["params_before"], entry["params_after"] = p_before, count_params(ctx.model)
        entry["kv_cache_bytes_per_token_after"] = kv_cache_bytes_per_token(ctx.model, ctx.adapter, kv_bytes)
        if ctx.eval_tokens is not None:
            p = eval_cfg.perplexity
            entry["perplexity_after"] = perplexity(ctx.model, ctx.eval_tokens, p.seq_len, p.stride, p.batch_size,
                                                   ctx.progress, desc=f"ppl after stage {si}")["perplexity"]
        entry["seconds"] = round(time.perf_counter() - t, 3)
        stage_reports.append(entry)
    ctx.teacher = None
    return stage_reports, awq_cfg


def _save_and_reload(model, adapter, tokenizer, awq_cfg, recipe, tmp: Path, probe, device, save_dtype, progress,
                     offload_default: Path):
    """Save into ``tmp`` (or quantize, with an awq stage), reload from disk (placed as the run was, under
    runtime.device_map, offloading into ``offload_default``) and compare logits on ``probe``.
    Returns (reloaded model, {"kind", "loader", "params_after", "per_layer", "hidden_size"}, report["roundtrip"],
    report["awq"])."""
    from gqaprune.io.checkpoint import cast_parameters, save_model  # looked up at call time (tests replace it)

    tmp.mkdir(parents=True)  # (creates the output's parent folders too)
    model.eval()
    cast_parameters(model, save_dtype)  # what is saved (and reloaded) is exactly what the round trip compares against
    with torch.no_grad():
        ref_logits = model(input_ids=probe.to(device), use_cache=False).logits.float().cpu()
    if awq_cfg is None:
        info = save_model(model, adapter, tmp, tokenizer=tokenizer, dtype=save_dtype)
        reloaded, _ = load_for_run(tmp, save_dtype, device, recipe.runtime, offload_default)
        saved = {"kind": "uniform" if info["uniform"] else "per_layer", "loader": info["loader"],
                 "params_after": count_params(reloaded), "per_layer": model_shapes(reloaded, adapter)}
        awq_report = None
    else:
        reloaded, kind, loader, awq_report = awq_output(model, adapter, tokenizer, awq_cfg, recipe, tmp, probe,
                                                        save_dtype, progress)
        saved = {"kind": kind, "loader": loader, "params_after": awq_report["params_fp"],
                 "per_layer": awq_report["per_layer"]}
    saved["hidden_size"] = int(getattr(reloaded.config, adapter.config.hidden_size))  # hidden_prune changes it
    with torch.no_grad():
        new_logits = reloaded(input_ids=probe.to(device), use_cache=False).logits.float().cpu()
    diff = float((new_logits - ref_logits).abs().max())
    tol = ROUNDTRIP_TOL.get(save_dtype, 1e-4) if awq_cfg is None else None
    roundtrip = {"ok": bool(torch.isfinite(new_logits).all()) and (tol is None or diff <= tol),
                 "max_abs_logit_diff": diff, "tolerance": tol, "loader": saved["loader"], "kind": saved["kind"]}
    if awq_report is not None:
        roundtrip.update(ok=roundtrip["ok"] and awq_report["verified"], awq=awq_report["verification"])
    return reloaded, saved, roundtrip, awq_report
