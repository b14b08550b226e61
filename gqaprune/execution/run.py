"""`gqaprune run` with calibration.pipeline: layerwise: prune, save, check and evaluate without ever loading
the whole model (gqaprune.execution.layerwise). The output folder and report.json have the in-memory run's
layout; evaluation is the held-out perplexity, streamed layer by layer (lm-eval tasks need the whole model
and are not run: report["eval"]["lm_eval"] is empty and says why)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from gqaprune import __version__
from gqaprune.arch.adapter import kv_cache_bytes_per_token
from gqaprune.errors import CheckFailed
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
    from gqaprune import runner as r  # the shared report helpers (hashes, versions, gates)
    from gqaprune.recipe import recipe_sha256

    timings: dict[str, float] = {}
    model_dir, tokenizer, calib, eval_tokens = (inputs["model_dir"], inputs["tokenizer"], inputs["calib"],
                                                inputs["eval_tokens"])
    _, dtype, save_dtype = r.pick_runtime(recipe.runtime, r.source_dtype_of(config))
    r.seed_everything(recipe.seed)
    r.log(f"layer-wise: {recipe.model} ({config.architectures[0]}, adapter {adapter.name}) on cpu in {dtype}")
    source_shell = build_shell(model_dir, dtype)  # meta: shapes and parameter counts only
    params_before = r.count_params(source_shell)
    kv_before = kv_cache_bytes_per_token(source_shell, adapter, save_dtype.itemsize)
    del source_shell

    t = time.perf_counter()
    before = _ppl(model_dir, adapter, eval_cfg, eval_tokens, dtype, progress, "before")
    timings["eval_before"] = time.perf_counter() - t
    probe = calib[: min(4, calib.shape[0])]
    if eval_tokens is not None and eval_tokens.numel() >= 4 * 64:
        probe = eval_tokens[: 4 * 64].reshape(4, 64)

    t = time.perf_counter()
    tmp.mkdir(parents=True)
    res = prune_layerwise(recipe, model_dir, adapter, calib, tmp, dtype=dtype, save_dtype=save_dtype,
                          tokenizer=tokenizer, probe=probe, progress=progress)
    timings["prune_and_save"] = time.perf_counter() - t
    t = time.perf_counter()
    new_logits, _ = streamed_logits(tmp, adapter, probe, save_dtype, recipe.calibration.batch_size, progress)
    diff = float((new_logits - res["probe_logits"]).abs().max())
    tol = r.ROUNDTRIP_TOL.get(save_dtype, 1e-4)
    roundtrip = {"ok": bool(torch.isfinite(new_logits).all()) and diff <= tol, "max_abs_logit_diff": diff,
                 "tolerance": tol, "kind": "uniform" if res["uniform"] else "per_layer",
                 "loader": "from_pretrained" if res["uniform"] else "gqaprune.load_pretrained",
                 "streamed": True}
    timings["roundtrip"] = time.perf_counter() - t
    if not roundtrip["ok"]:
        raise CheckFailed(f"round trip failed: logits of the layers read back from disk differ from the run's by "
                          f"{diff:.3g} (tolerance {tol}); nothing was written at {out}")
    t = time.perf_counter()
    after = _ppl(tmp, adapter, eval_cfg, eval_tokens, dtype, progress, "after")
    timings["eval_after"] = time.perf_counter() - t
    gates = r.check_gates(eval_cfg.gates, before, after)
    out_shell = build_shell(tmp, dtype)
    shapes = res["shapes_after"]
    report = {
        "status": "ok" if all(g["passed"] for g in gates.values()) else "failed",
        "gates": gates, "gqaprune_version": __version__, "recipe_sha256": recipe_sha256(recipe_text),
        "recipe_name": recipe.name, "command": command, "recipe_path": str(recipe_path),
        "pipeline": {"kind": "layerwise", "sweeps": res["sweeps"], "max_live_decoder_layers": res["max_live_layers"]},
        "model": {"source": recipe.model, "architecture": config.architectures[0], "adapter": adapter.name,
                  "folder": str(model_dir), "files_sha256": r._input_hashes(Path(model_dir))},
        "data": {"calibration": {"source": recipe.calibration.source, "samples": recipe.calibration.samples,
                                 "seq_len": recipe.calibration.seq_len, "sha256": r._tokens_sha(calib)},
                 "eval": r._eval_data(eval_cfg, eval_tokens)},
        "unhashed_files": list(r.UNHASHED_OUTPUT_FILES),
        "params_before": params_before, "params_after": r.count_params(out_shell),
        "kv_cache_bytes_per_token_before": kv_before,
        "kv_cache_bytes_per_token_after": kv_cache_bytes_per_token(out_shell, adapter, save_dtype.itemsize),
        "stages": res["stages"],
        "shapes_after": {"num_hidden_layers": len(shapes), "head_dim": getattr(config, "head_dim", None),
                         "per_layer": shapes},
        "plan": [p.as_dict() for p in plans],
        "roundtrip": roundtrip,
        "eval": {"before": before, "after": after,
                 "lm_eval": {"before": {}, "after": {}, "skipped": "lm-eval needs the whole model in memory; "
                             "run `gqaprune eval OUTPUT` where it fits"}},
        "awq": None,
        "timings_seconds": {k: round(v, 2) for k, v in timings.items()},
        "runtime": {"device": "cpu", "dtype": str(dtype).removeprefix("torch."),
                    "save_dtype": str(save_dtype).removeprefix("torch."), "threads": torch.get_num_threads()},
        "versions": r._versions(),
        "output_kind": roundtrip["kind"], "loader": roundtrip["loader"],
    }
    (tmp / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
    from gqaprune.report.card import write_card
    from gqaprune.report.plots import write_plots

    write_plots(report, tmp / "plots")
    report["files_sha256"] = r.hash_folder(tmp)
    report["seconds_total"] = round(time.perf_counter() - t_start, 2)
    (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    write_card(report, recipe_text, tmp / "README.md")
    return report
