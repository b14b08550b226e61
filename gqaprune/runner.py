"""`gqaprune run`: recipe -> model -> stages -> save -> reload -> compare -> evaluate -> output folder.

Everything is built in a temporary folder beside the output path and renamed into place
at the end, so the output path never holds a half-written folder. SIGINT/SIGTERM remove
the temporary folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gqaprune import __version__
from gqaprune.adapters import check_adapter_on_model, model_shapes, resolve_adapter
from gqaprune.context import RunContext
from gqaprune.data import calibration_windows, token_stream
from gqaprune.errors import CheckFailed, GateFailed, InputError
from gqaprune.evaluation.perplexity import perplexity
from gqaprune.plan import simulate
from gqaprune.recipe import default_eval, load_recipe, recipe_sha256
from gqaprune.sources import is_builtin, load_tokenizer, read_config, resolve_model
from gqaprune.stages import build_stage

ROUNDTRIP_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}  # max |logit diff|
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def log(msg: str) -> None:
    print(f"gqaprune: {msg}", file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def pick_runtime(runtime, source_dtype) -> tuple[torch.device, torch.dtype, torch.dtype]:
    cuda = torch.cuda.is_available()
    if runtime.device == "cuda" and not cuda:
        raise InputError("runtime.device is cuda but no CUDA device is available (use auto or cpu)")
    device = torch.device("cuda" if (runtime.device == "cuda" or (runtime.device == "auto" and cuda)) else "cpu")
    if runtime.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = _DTYPES[runtime.dtype]
    save = source_dtype if runtime.save_dtype == "auto" else _DTYPES[runtime.save_dtype]
    return device, dtype, save


def source_dtype_of(config) -> torch.dtype:
    dt = getattr(config, "dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    return _DTYPES.get(str(dt), torch.float32)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_folder(folder: Path, skip=("report.json", "README.md")) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and str(p.relative_to(folder)) not in skip}


@torch.no_grad()
def check_finite(model, ids: torch.Tensor, where: str) -> None:
    logits = model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).sum())
        raise CheckFailed(f"{where}: the model produces NaN or inf logits ({bad} values) after this stage")


def evaluate(model, tokenizer, eval_cfg, eval_tokens, progress: bool, label: str) -> dict:
    out: dict = {}
    if eval_cfg.perplexity is not None and eval_tokens is not None:
        p = eval_cfg.perplexity
        out.update(perplexity(model, eval_tokens, p.seq_len, p.stride, p.batch_size, progress, desc=f"ppl {label}"))
    tasks = eval_cfg.lm_eval.tasks
    from gqaprune.evaluation.local_tasks import LOCAL_TASKS

    tasks = list(LOCAL_TASKS) if tasks is None else tasks
    if tasks:
        from gqaprune.evaluation.lm_eval_runner import run_lm_eval

        le = eval_cfg.lm_eval
        t0 = time.perf_counter()
        out["lm_eval"] = run_lm_eval(model, tokenizer, tasks, include_path=le.include_path, limit=le.limit,
                                     batch_size=le.batch_size, num_fewshot=le.num_fewshot)
        out["lm_eval_seconds"] = round(time.perf_counter() - t0, 2)
    return out


def check_gates(gates, before: dict, after: dict) -> dict:
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


class _Interrupted(BaseException):
    pass


def _raise_interrupt(signum, frame):
    raise _Interrupted(f"interrupted by signal {signum}")


def run(recipe_path: str, output: str | None = None, force: bool = False, progress: bool = True,
        command: str | None = None) -> dict:
    """Run a recipe; returns the report. Raises GqaError subclasses on failure."""
    t_start = time.perf_counter()
    recipe, recipe_text = load_recipe(recipe_path)
    out = Path(output or recipe.output or "")
    if not (output or recipe.output):
        raise InputError(f"{recipe_path}: no output folder (set `output:` in the recipe or pass --output)")
    if out.exists() and not force:
        raise InputError(f"output folder '{out}' exists; pass --force to replace it")

    # -- everything checkable without weights ------------------------------------------------
    config = read_config(recipe.model, recipe.trust_remote_code, progress)
    adapter = resolve_adapter(recipe.adapter, config.architectures)
    plans = simulate(recipe, config, adapter)
    eval_cfg = default_eval(recipe)
    if recipe.runtime.threads:
        torch.set_num_threads(recipe.runtime.threads)

    is_main = int(os.environ.get("RANK", "0")) == 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.gqaprune-tmp-{os.getpid()}"
    old_handlers = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGINT)} \
        if _is_main_thread() else {}
    try:
        report = _run_inner(recipe, recipe_text, recipe_path, config, adapter, plans, eval_cfg, out, tmp, progress,
                            is_main, command, t_start)
        if not is_main:
            return report
        if out.exists():  # --force: move the old folder aside first, so the path is never half-written
            trash = out.parent / f".{out.name}.gqaprune-old-{os.getpid()}"
            os.replace(out, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, out)
    except _Interrupted as e:
        raise CheckFailed(f"{e}; nothing was written at {out}", exit_code=130) from None
    except OSError as e:
        raise CheckFailed(f"cannot write the output ({e.strerror or e}: {e.filename or out})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for s, h in old_handlers.items():
            signal.signal(s, h)
    log(f"wrote {out} in {time.perf_counter() - t_start:.1f}s")
    if report["status"] != "ok":
        failed = [k for k, g in report["gates"].items() if not g["passed"]]
        raise GateFailed(f"quality gate failed: " + "; ".join(
            f"{k} = {report['gates'][k]['value']:.4g} (limit {report['gates'][k]['limit']})" for k in failed)
            + f"; the output is kept for inspection at {out}")
    return report


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _run_inner(recipe, recipe_text, recipe_path, config, adapter, plans, eval_cfg, out: Path, tmp: Path, progress,
               is_main, command, t_start) -> dict:
    from gqaprune.checkpoint import load_pretrained, save_model

    timings: dict[str, float] = {}
    t = time.perf_counter()
    model_dir = resolve_model(recipe.model, progress)
    src_dtype = source_dtype_of(config)
    device, dtype, save_dtype = pick_runtime(recipe.runtime, src_dtype)
    seed_everything(recipe.seed)
    log(f"loading {recipe.model} ({config.architectures[0]}, adapter {adapter.name}) on {device} in {dtype}")
    model = load_pretrained(model_dir, dtype=dtype, device=str(device))
    check_adapter_on_model(model, adapter)
    tokenizer = load_tokenizer(model_dir)
    cal = recipe.calibration
    calib = calibration_windows(tokenizer, cal.source, cal.split, cal.samples, cal.seq_len, recipe.seed, cal.field)
    eval_tokens = None
    if eval_cfg.perplexity is not None:
        p = eval_cfg.perplexity
        eval_tokens = token_stream(tokenizer, p.source, p.split, p.field)
        if p.max_tokens:
            eval_tokens = eval_tokens[: p.max_tokens]
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    before = evaluate(model, tokenizer, eval_cfg, eval_tokens, progress, "before")
    timings["eval_before"] = time.perf_counter() - t
    if "perplexity" in before:
        log(f"perplexity before: {before['perplexity']:.3f}")
    params_before = count_params(model)

    ctx = RunContext(model=model, adapter=adapter, tokenizer=tokenizer, recipe=recipe, calib=calib,
                     eval_tokens=eval_tokens, progress=progress, is_main_process=is_main)
    if any(s.type == "recover" and s.method == "distill" for s in recipe.stages):
        ctx.teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the model before any pruning
    stage_reports = []
    awq_cfg = None
    for si, st in enumerate(recipe.stages):
        if st.type == "awq":
            awq_cfg = st
            continue
        t = time.perf_counter()
        p_before = count_params(ctx.model)
        log(f"stage {si}: {st.type}")
        entry = {"type": st.type, "index": si}
        entry.update(build_stage(st).apply(ctx))
        check_finite(ctx.model, calib[:2], f"stage {si} ({st.type})")
        entry["params_before"], entry["params_after"] = p_before, count_params(ctx.model)
        if eval_tokens is not None:
            p = eval_cfg.perplexity
            entry["perplexity_after"] = perplexity(ctx.model, eval_tokens, p.seq_len, p.stride, p.batch_size,
                                                   progress, desc=f"ppl after stage {si}")["perplexity"]
        entry["seconds"] = round(time.perf_counter() - t, 3)
        stage_reports.append(entry)
    model = ctx.model
    ctx.teacher = None
    if not is_main:
        return {"status": "ok", "rank": os.environ.get("RANK")}

    # -- save, reload from disk, compare -----------------------------------------------------
    t = time.perf_counter()
    tmp.mkdir(parents=True)
    model.eval()
    model.to(save_dtype)  # what is saved is exactly what the round trip compares against
    probe = calib[: min(4, calib.shape[0])]
    if eval_tokens is not None and eval_tokens.numel() >= 4 * 64:
        probe = eval_tokens[: 4 * 64].reshape(4, 64)
    with torch.no_grad():
        ref_logits = model(input_ids=probe.to(device), use_cache=False).logits.float().cpu()
    if awq_cfg is None:
        saved = save_model(model, adapter, tmp, tokenizer=tokenizer, dtype=save_dtype)
        del model
        reloaded = load_pretrained(tmp, dtype=save_dtype, device=str(device))
        kind = "uniform" if saved["uniform"] else "per_layer"
        loader = saved["loader"]
        awq_report = None
    else:
        reloaded, kind, loader, awq_report = _awq_output(model, adapter, tokenizer, awq_cfg, recipe, tmp, probe,
                                                         save_dtype, progress)
        del model
    with torch.no_grad():
        new_logits = reloaded(input_ids=probe.to(device), use_cache=False).logits.float().cpu()
    diff = float((new_logits - ref_logits).abs().max())
    tol = ROUNDTRIP_TOL.get(save_dtype, 1e-4) if awq_cfg is None else None
    roundtrip = {"ok": bool(torch.isfinite(new_logits).all()) and (tol is None or diff <= tol),
                 "max_abs_logit_diff": diff, "tolerance": tol, "loader": loader, "kind": kind}
    if awq_report is not None:
        roundtrip.update(ok=roundtrip["ok"] and awq_report["verified"], awq=awq_report["verification"])
    timings["save_reload"] = time.perf_counter() - t
    if not roundtrip["ok"]:
        raise CheckFailed(f"round trip failed: logits of the model reloaded from disk differ from the in-memory "
                          f"model by {diff:.3g} (tolerance {tol}); nothing was written at {out}")
    reloaded.to(dtype)

    t = time.perf_counter()
    after = evaluate(reloaded, tokenizer, eval_cfg, eval_tokens, progress, "after")
    timings["eval_after"] = time.perf_counter() - t
    if "perplexity" in after:
        log(f"perplexity after: {after['perplexity']:.3f}")
    gates = check_gates(eval_cfg.gates, before, after)
    status = "ok" if all(g["passed"] for g in gates.values()) else "failed"

    per_layer = model_shapes(reloaded, adapter) if awq_cfg is None else awq_report["per_layer"]
    import transformers

    report = {
        "status": status,
        "gates": gates,
        "gqaprune_version": __version__,
        "recipe_sha256": recipe_sha256(recipe_text),
        "recipe_name": recipe.name,
        "command": command,
        "model": {"source": recipe.model, "architecture": config.architectures[0], "adapter": adapter.name,
                  "files_sha256": {} if is_builtin(recipe.model) else _input_hashes(Path(model_dir)),
                  "folder_files_sha256": _input_hashes(Path(model_dir))},
        "data": {"calibration": {"source": cal.source, "split": cal.split, "samples": cal.samples,
                                 "seq_len": cal.seq_len, "sha256": _tokens_sha(calib)},
                 "eval": {"sha256": _tokens_sha(eval_tokens), "tokens": 0 if eval_tokens is None else int(eval_tokens.numel())}},
        "params_before": params_before,
        "params_after": count_params(reloaded) if awq_cfg is None else awq_report["params_fp"],
        "stages": stage_reports,
        "shapes_after": {"num_hidden_layers": len(per_layer), "head_dim": getattr(config, "head_dim", None),
                         "per_layer": per_layer},
        "plan": [p.as_dict() for p in plans],
        "roundtrip": roundtrip,
        "eval": {"before": before, "after": after},
        "awq": awq_report,
        "timings_seconds": {k: round(v, 2) for k, v in timings.items()},
        "runtime": {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
                    "save_dtype": str(save_dtype).removeprefix("torch."), "threads": torch.get_num_threads()},
        "versions": _versions(),
        "output_kind": kind,
        "loader": loader,
    }
    report["eval"]["lm_eval"] = {"before": before.get("lm_eval", {}), "after": after.get("lm_eval", {})}
    (tmp / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
    from gqaprune.report.card import write_card
    from gqaprune.report.plots import write_plots

    write_plots(report, tmp / "plots")
    report["files_sha256"] = hash_folder(tmp)
    report["seconds_total"] = round(time.perf_counter() - t_start, 2)
    (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    write_card(report, recipe_text, tmp / "README.md")
    return report


def _awq_output(model, adapter, tokenizer, awq_cfg, recipe, tmp: Path, probe, save_dtype, progress):
    """Save the pruned model, quantize it with AutoAWQ into tmp, verify from the bytes on disk."""
    from gqaprune.checkpoint import save_model
    from gqaprune.data import load_units
    from gqaprune.quant.awq import load_dequantized, quantize_folder, verify_awq_folder

    fp_dir = tmp.parent / f"{tmp.name}-fp"
    try:
        saved = save_model(model, adapter, fp_dir, tokenizer=tokenizer, dtype=save_dtype)
        if not saved["uniform"]:
            raise InputError("the awq stage needs the same shape in every layer (use allocation: uniform)")
        cal = recipe.calibration
        texts = load_units(cal.source, cal.split, cal.field)
        shutil.rmtree(tmp)
        info = quantize_folder(fp_dir, tmp, texts, w_bit=awq_cfg.w_bit, group_size=awq_cfg.group_size,
                               zero_point=awq_cfg.zero_point, max_calib_seq_len=awq_cfg.seq_len,
                               n_samples=awq_cfg.samples)
        verification = verify_awq_folder(tmp, reference_model=model, input_ids=probe)
        fp_bytes = sum(p.stat().st_size for p in fp_dir.glob("*.safetensors"))
    finally:
        shutil.rmtree(fp_dir, ignore_errors=True)
    deq = load_dequantized(tmp, dtype=torch.float32)
    q_bytes = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    report = {"config": awq_cfg.model_dump(), "quantize": info, "verification": verification, "verified": True,
              "fp_safetensors_bytes": fp_bytes, "awq_safetensors_bytes": q_bytes,
              "compression_ratio": fp_bytes / max(q_bytes, 1), "params_fp": count_params(model),
              "per_layer": model_shapes(model, adapter)}
    return deq, "awq", "AutoAWQ (GPU kernels) or gqaprune.quant.awq.load_dequantized (CPU)", report


def _input_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix in (".safetensors", ".json", ".model", ".txt")}


def _tokens_sha(t) -> str | None:
    if t is None:
        return None
    return hashlib.sha256(t.to(torch.int64).numpy().tobytes()).hexdigest()


def _versions() -> dict:
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("lm_eval", "peft", "accelerate", "autoawq", "safetensors", "tokenizers"):
        try:
            v[name] = version(name)
        except PackageNotFoundError:
            pass
    return v
