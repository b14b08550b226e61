"""`gqaprune run`: recipe -> model -> stages -> save -> reload -> compare -> evaluate -> output folder.

Order of work: everything that can be checked without weights (recipe, output path, config,
adapter, plan), then every input that is cheap to read (model folder, tokenizer, calibration
and evaluation tokens), and only then the weights. Bad input is an InputError (exit 2) raised
before any folder is created.

With ``save_as: mistral`` a Llama is converted to ``MistralForCausalLM`` (``gqaprune.arch.convert``, checked on
logits) after the last pruning/recover stage and before saving (and before AWQ), so the round trip reloads
the Mistral folder with stock from_pretrained and compares it with the converted in-memory model.

Everything is built in a temporary folder ``.<name>.gqaprune-tmp-<pid>`` beside the output
path and renamed into place at the end, so the output path never holds a half-written
folder. SIGINT/SIGTERM at any point remove the temporary folders (also the AWQ stage's
``-fp`` folder) and exit with 128 + the signal number; temporary folders left by a killed run
(SIGKILL, power loss) are removed by the next run at the same output path.

Reproducibility: with the same recipe, model files, data and library versions (and the same
torch thread count and hardware), every output file except report.json and README.md
(which hold timings) is byte-identical between runs; ``report.json`` records the sha256 of
the recipe, of every input model file, of the calibration and evaluation tokens (and of file
sources), of every output file (``files_sha256``, without report.json and README.md), the
library versions and the command; ``gqaprune verify OUTPUT`` recomputes the output hashes.
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
from gqaprune.arch.adapter import check_adapter_on_model, kv_cache_bytes_per_token, model_shapes, resolve_adapter
from gqaprune.context import RunContext
from gqaprune.io.data import calibration_windows, token_stream
from gqaprune.errors import CheckFailed, GateFailed, InputError
from gqaprune.evaluation.perplexity import perplexity
from gqaprune.plan import simulate
from gqaprune.recipe import default_eval, load_recipe, recipe_sha256
from gqaprune.io.sources import is_builtin, load_tokenizer, read_config, resolve_model
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


_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")  # torchrun/accelerate, MPI launchers


def process_rank() -> int:
    """This process's rank under a multi-process launcher (0 when launched alone)."""
    for var in _RANK_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def pick_runtime(runtime, source_dtype) -> tuple[torch.device, torch.dtype, torch.dtype]:
    cuda = torch.cuda.is_available()
    if runtime.device == "cuda" and not cuda:
        raise InputError("runtime.device is cuda but no CUDA device is available (use auto or cpu)")
    use_cuda = runtime.device == "cuda" or (runtime.device == "auto" and cuda)
    # one GPU per process under a multi-process launcher
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")
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


UNHASHED_OUTPUT_FILES = ("report.json", "README.md")  # they hold timings; every other output file is hashed


def hash_folder(folder: Path, skip=UNHASHED_OUTPUT_FILES) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative POSIX paths, sorted), except ``skip``."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() not in skip}


@torch.no_grad()
def check_finite(model, ids: torch.Tensor, where: str, when: str = "after this stage") -> None:
    logits = model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).sum())
        raise CheckFailed(f"{where}: the model produces NaN or inf logits ({bad} values) {when}; nothing was written")


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
    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class _Signals:
    """SIGINT/SIGTERM raise _Interrupted in the main thread, except while ``defer`` is set (moving the
    finished folder into place, cleaning up): then the signal is only recorded."""

    def __init__(self):
        self.defer = False
        self.pending: int | None = None
        self.old: dict = {}

    def _handler(self, signum, frame):
        if self.defer:
            self.pending = self.pending or signum
            return
        raise _Interrupted(signum)

    def install(self) -> None:
        if _is_main_thread():
            self.old = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)
        self.old = {}


def check_output_path(out: Path, force: bool) -> None:
    """The output path can be created (or replaced with --force) — checked before any work."""
    if out.is_symlink() or out.exists():
        if not out.is_dir():
            raise InputError(f"output path '{out}' exists and is not a folder")
        if not force:
            raise InputError(f"output folder '{out}' exists; pass --force to replace it")
    parent = out.absolute().parent
    while not (parent.is_symlink() or parent.exists()):
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"cannot create the output folder '{out}': '{parent}' is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create the output folder '{out}': no permission to write in '{parent}'")


def _check_not_inside(out: Path, model_spec: str) -> None:
    if is_builtin(model_spec):
        return
    o, m = out.resolve(), Path(model_spec).expanduser().resolve()
    if o == m or o in m.parents:
        raise InputError(f"the output folder '{out}' would replace the model folder '{model_spec}'; choose another output")


def _temp_names(out: Path, pid: int | str) -> list[Path]:
    return [out.parent / f".{out.name}.gqaprune-tmp-{pid}", out.parent / f".{out.name}.gqaprune-tmp-{pid}-fp",
            out.parent / f".{out.name}.gqaprune-old-{pid}"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(out: Path) -> list[str]:
    """Remove the temporary folders that killed runs (SIGKILL, power loss) left beside ``out``."""
    removed = []
    if not out.parent.is_dir():
        return removed
    prefixes = (f".{out.name}.gqaprune-tmp-", f".{out.name}.gqaprune-old-")
    for p in sorted(out.parent.iterdir()):
        if not p.name.startswith(prefixes):
            continue
        pid = p.name.split("-")[-2 if p.name.endswith("-fp") else -1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def _equivalent_command(recipe_path, output, force) -> str:
    import shlex

    parts = ["gqaprune", "run", str(recipe_path)] + (["--output", str(output)] if output else []) \
        + (["--force"] if force else [])
    return " ".join(shlex.quote(p) for p in parts)


def run(recipe_path: str, output: str | None = None, force: bool = False, progress: bool = True,
        command: str | None = None) -> dict:
    """Run a recipe; returns the report. Raises GqaError subclasses on failure."""
    t_start = time.perf_counter()
    recipe, recipe_text = load_recipe(recipe_path)
    if not (output or recipe.output):
        raise InputError(f"{recipe_path}: no output folder (set `output:` in the recipe or pass --output)")
    out = Path(output or recipe.output)
    check_output_path(out, force)
    _check_not_inside(out, recipe.model)

    # -- everything checkable without weights ------------------------------------------------
    config = read_config(recipe.model, recipe.trust_remote_code, progress)
    adapter = resolve_adapter(recipe.adapter, config.architectures)
    plans = simulate(recipe, config, adapter)
    eval_cfg = default_eval(recipe)
    command = command or _equivalent_command(recipe_path, output, force)

    is_main = process_rank() == 0
    tmp = _temp_names(out, os.getpid())[0]
    threads_before = torch.get_num_threads()
    sig = _Signals()
    sig.install()
    committed = False
    try:
        if recipe.runtime.threads:
            torch.set_num_threads(recipe.runtime.threads)
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
        sig.defer = True  # from here a signal is recorded, not raised: the rename below must not be cut in half
        if sig.pending:
            raise _Interrupted(sig.pending)
        trash = _temp_names(out, os.getpid())[2]
        if out.exists():  # --force: move the old folder aside first, so the path is never half-written
            os.replace(out, trash)
        os.replace(tmp, out)
        committed = True
    except _Interrupted as e:
        raise CheckFailed(f"{e}; nothing was written at {out}", exit_code=128 + e.signum) from None
    except OSError as e:
        raise CheckFailed(f"cannot write the output ({e.strerror or e}: {e.filename or out}); "
                          f"nothing was written at {out}") from None
    finally:
        sig.defer = True
        for p in _temp_names(out, os.getpid()):
            shutil.rmtree(p, ignore_errors=True)
        sig.restore()
        torch.set_num_threads(threads_before)
    if committed and sig.pending:
        log(f"{signal.Signals(sig.pending).name} arrived while the finished output was moved into place; "
            f"the output at {out} is complete")
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


def prepare_inputs(recipe, config, eval_cfg, progress: bool) -> dict:
    """The model folder, tokenizer, calibration windows and evaluation tokens: every input that is cheap
    to read, read (and checked) before any weights load and before any folder is created."""
    model_dir = resolve_model(recipe.model, progress)
    tokenizer = load_tokenizer(model_dir)
    cal = recipe.calibration
    calib = calibration_windows(tokenizer, cal.source, cal.split, cal.samples, cal.seq_len, recipe.seed, cal.field)
    eval_tokens = perplexity_tokens(tokenizer, eval_cfg)
    vocab = getattr(config, "vocab_size", None)
    for what, t in (("calibration", calib), ("evaluation", eval_tokens)):
        if vocab and t is not None and t.numel() and int(t.max()) >= vocab:
            raise InputError(f"the tokenizer in '{model_dir}' gives {what} token id {int(t.max())}, but the model's "
                             f"vocab_size is {vocab}: tokenizer and model do not belong together")
    return {"model_dir": model_dir, "tokenizer": tokenizer, "calib": calib, "eval_tokens": eval_tokens}


def _run_inner(recipe, recipe_text, recipe_path, config, adapter, plans, eval_cfg, inputs: dict, out: Path, tmp: Path,
               progress, is_main, command, t_start) -> dict:
    from gqaprune.io.checkpoint import load_pretrained, save_model

    timings: dict[str, float] = {}
    t = time.perf_counter()
    model_dir, tokenizer = inputs["model_dir"], inputs["tokenizer"]
    calib, eval_tokens = inputs["calib"], inputs["eval_tokens"]
    cal = recipe.calibration
    src_dtype = source_dtype_of(config)
    device, dtype, save_dtype = pick_runtime(recipe.runtime, src_dtype)
    seed_everything(recipe.seed)
    log(f"loading {recipe.model} ({config.architectures[0]}, adapter {adapter.name}) on {device} in {dtype}")
    model = load_pretrained(model_dir, dtype=dtype, device=str(device))
    check_adapter_on_model(model, adapter)
    check_finite(model, calib[:2], f"{recipe.model}", "before any stage")
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    before = evaluate(model, tokenizer, eval_cfg, eval_tokens, progress, "before")
    timings["eval_before"] = time.perf_counter() - t
    if "perplexity" in before:
        log(f"perplexity before: {before['perplexity']:.3f}")
    params_before = count_params(model)
    kv_bytes = save_dtype.itemsize  # KV cache bytes are counted in the saved dtype
    kv_before = kv_cache_bytes_per_token(model, adapter, kv_bytes)

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
        entry["kv_cache_bytes_per_token_after"] = kv_cache_bytes_per_token(ctx.model, adapter, kv_bytes)
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

    probe = calib[: min(4, calib.shape[0])]
    if eval_tokens is not None and eval_tokens.numel() >= 4 * 64:
        probe = eval_tokens[: 4 * 64].reshape(4, 64)

    # -- save_as: mistral (opt-in): the same computation in a class stock from_pretrained reloads ----------
    save_adapter = adapter  # the roles of the saved model (report["model"]["adapter"] stays the source's)
    save_as = None
    from gqaprune.io.checkpoint import stock_class

    if recipe.save_as == "mistral" and stock_class(model).__name__ == "LlamaForCausalLM":
        from gqaprune.arch.adapter import builtin_adapters
        from gqaprune.arch.convert import CONVERT_TOL, llama_to_mistral

        t = time.perf_counter()
        model.eval()
        converted_from = stock_class(model).__name__
        model, conv_diff = llama_to_mistral(model, input_ids=probe)
        ctx.model = model
        save_adapter = builtin_adapters()["mistral"]
        save_as = {"architecture": stock_class(model).__name__, "converted_from": converted_from,
                   "max_abs_logit_diff": conv_diff, "tolerance": CONVERT_TOL.get(dtype, 1e-5)}
        timings["convert"] = time.perf_counter() - t
        log(f"save_as: mistral: converted to {save_as['architecture']}, max |logit diff| {conv_diff:.3g}")

    # -- save, reload from disk, compare -----------------------------------------------------
    t = time.perf_counter()
    tmp.mkdir(parents=True)  # (creates the output's parent folders too)
    model.eval()
    model.to(save_dtype)  # what is saved is exactly what the round trip compares against
    with torch.no_grad():
        ref_logits = model(input_ids=probe.to(device), use_cache=False).logits.float().cpu()
    if awq_cfg is None:
        saved = save_model(model, save_adapter, tmp, tokenizer=tokenizer, dtype=save_dtype)
        del model
        reloaded = load_pretrained(tmp, dtype=save_dtype, device=str(device))
        kind = "uniform" if saved["uniform"] else "per_layer"
        loader = saved["loader"]
        awq_report = None
    else:
        reloaded, kind, loader, awq_report = _awq_output(model, save_adapter, tokenizer, awq_cfg, recipe, tmp, probe,
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

    per_layer = model_shapes(reloaded, save_adapter) if awq_cfg is None else awq_report["per_layer"]
    import transformers

    report = {
        "status": status,
        "gates": gates,
        "gqaprune_version": __version__,
        "recipe_sha256": recipe_sha256(recipe_text),
        "recipe_name": recipe.name,
        "command": command,
        "recipe_path": str(recipe_path),
        "model": {"source": recipe.model, "architecture": config.architectures[0], "adapter": adapter.name,
                  "adapter_sha256": sha256_file(Path(adapter.source)) if adapter.source else None,
                  "folder": str(model_dir), "files_sha256": _input_hashes(Path(model_dir))},
        "data": {"calibration": {"source": cal.source, "split": cal.split, "field": cal.field, "samples": cal.samples,
                                 "seq_len": cal.seq_len, "source_sha256": _source_sha(cal.source),
                                 "sha256": _tokens_sha(calib)},
                 "eval": _eval_data(eval_cfg, eval_tokens)},
        "unhashed_files": list(UNHASHED_OUTPUT_FILES),
        "params_before": params_before,
        "params_after": count_params(reloaded) if awq_cfg is None else awq_report["params_fp"],
        "kv_cache_bytes_per_token_before": kv_before,
        "kv_cache_bytes_per_token_after": (stage_reports[-1]["kv_cache_bytes_per_token_after"] if stage_reports
                                           else kv_before),
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
    if save_as is not None:
        report["save_as"] = save_as
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
    from gqaprune.io.checkpoint import save_model
    from gqaprune.io.data import load_units
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


_INPUT_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".py", ".tiktoken", ".jinja")
_NOT_INPUTS = ("builtin_info.json",)  # a builtin's training log (timings), not read when loading


def _input_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file of a model folder that loading it can read (weights, configs, tokenizer, code);
    a builtin model's cached folder likewise."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix in _INPUT_SUFFIXES and p.name not in _NOT_INPUTS}


def _source_sha(source: str) -> str | None:
    """sha256 of a text source file (None for builtin:pydoc, whose text comes with Python, and for datasets)."""
    path = Path(source).expanduser()
    return sha256_file(path) if not source.startswith("builtin:") and path.is_file() else None


def _eval_data(eval_cfg, eval_tokens) -> dict:
    p = eval_cfg.perplexity
    if p is None:
        return {"sha256": None, "tokens": 0}
    return {"source": p.source, "split": p.split, "field": p.field, "source_sha256": _source_sha(p.source),
            "sha256": _tokens_sha(eval_tokens), "tokens": 0 if eval_tokens is None else int(eval_tokens.numel())}


def _tokens_sha(t) -> str | None:
    if t is None:
        return None
    return hashlib.sha256(t.to(torch.int64).numpy().tobytes()).hexdigest()


def _versions() -> dict:
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    from importlib.metadata import PackageNotFoundError, version

    v["gqaprune"] = __version__
    v["numpy"] = np.__version__
    for name in ("lm_eval", "peft", "accelerate", "autoawq", "safetensors", "tokenizers", "matplotlib", "pydantic",
                 "datasets"):
        try:
            v[name] = version(name)
        except PackageNotFoundError:
            pass
    return v
