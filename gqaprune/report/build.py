"""report.json: one dict built from what the run measured, and the files written beside the model.

The keys are the contract of DESIGN.md ("report.json"); ``write_report_files`` writes recipe.yaml,
plots/, report.json (with ``files_sha256`` of everything but the unhashed files) and README.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from gqaprune.builtin.smollm2 import gguf_info
from gqaprune.evaluation.generations import generations_report
from gqaprune import __version__
from gqaprune.recipe import recipe_sha256
from gqaprune.report.provenance import (UNHASHED_OUTPUT_FILES, hash_folder, input_hashes, sha256_file, source_sha256,
                                        tokens_sha256, versions)


def _data(recipe, eval_cfg, calib, eval_tokens) -> dict:
    cal = recipe.calibration
    calibration = {"source": cal.source, "split": cal.split, "field": cal.field, "samples": cal.samples,
                   "seq_len": cal.seq_len, "source_sha256": source_sha256(cal.source), "sha256": tokens_sha256(calib)}
    p = eval_cfg.perplexity
    if p is None:
        return {"calibration": calibration, "eval": {"sha256": None, "tokens": 0}}
    ev = {"source": p.source, "split": p.split, "field": p.field, "source_sha256": source_sha256(p.source),
          "sha256": tokens_sha256(eval_tokens), "tokens": 0 if eval_tokens is None else int(eval_tokens.numel())}
    return {"calibration": calibration, "eval": ev}


def phases_seconds(prepare: float, timings: dict[str, float], stage_reports: list[dict]) -> dict[str, float]:
    """Wall seconds of each phase, in run order: prepare (resolve the model, which trains or converts a builtin on
    first use, and read the data), load, eval_before, stages, convert (save_as), save or awq (each with the reload
    and logit check), eval_after; write_report_files adds report (plots, hashes)."""
    phases = {"prepare": prepare, "load": timings.get("load", 0.0), "eval_before": timings.get("eval_before", 0.0),
              "stages": sum(s["seconds"] for s in stage_reports)}
    phases.update({k: timings[k] for k in ("convert", "save", "awq", "eval_after") if k in timings})
    return {k: round(v, 2) for k, v in phases.items()}


def build_report(*, recipe, recipe_text: str, recipe_path, command: str, config, adapter, inputs: dict, eval_cfg,
                 plans, stage_reports: list, before: dict, after: dict, gates: dict, params_before: int,
                 kv_before: int, output: dict, roundtrip: dict, awq_report: dict | None, save_as: dict | None,
                 timings: dict, runtime: dict) -> dict:
    """The report of a finished run. ``output``: {"kind", "loader", "params_after", "per_layer", "hidden_size"} of the saved
    model; ``inputs``: the run's model folder, calibration windows and evaluation tokens."""
    per_layer = output["per_layer"]
    report = {
        "status": "ok" if all(g["passed"] for g in gates.values()) else "failed",
        "gates": gates,
        "gqaprune_version": __version__,
        "recipe_sha256": recipe_sha256(recipe_text),
        "recipe_name": recipe.name,
        "command": command,
        "recipe_path": str(recipe_path),
        "model": {"source": recipe.model, "architecture": config.architectures[0], "adapter": adapter.name,
                  "adapter_sha256": sha256_file(Path(adapter.source)) if adapter.source else None,
                  "folder": str(inputs["model_dir"]), "files_sha256": input_hashes(Path(inputs["model_dir"])),
                  "gguf": gguf_info(Path(inputs["model_dir"]))},  # set when dequantized from a GGUF file
        "data": _data(recipe, eval_cfg, inputs["calib"], inputs["eval_tokens"]),
        "unhashed_files": list(UNHASHED_OUTPUT_FILES),
        "params_before": params_before,
        "params_after": output["params_after"],
        "kv_cache_bytes_per_token_before": kv_before,
        "kv_cache_bytes_per_token_after": (stage_reports[-1]["kv_cache_bytes_per_token_after"] if stage_reports
                                           else kv_before),
        "stages": stage_reports,
        "shapes_after": {"num_hidden_layers": len(per_layer), "head_dim": getattr(config, "head_dim", None),
                         "hidden_size": output["hidden_size"], "per_layer": per_layer},
        "plan": [p.as_dict() for p in plans],
        "roundtrip": roundtrip,
        "eval": {"before": before, "after": after,
                 "lm_eval": {"before": before.get("lm_eval", {}), "after": after.get("lm_eval", {})}},
        "awq": awq_report,
        "timings_seconds": {k: round(v, 2) for k, v in timings.items()},
        "phases_seconds": phases_seconds(inputs.get("seconds", 0.0), timings, stage_reports),
        "generations": generations_report(eval_cfg, before, after),
        "runtime": runtime,
        "versions": versions(),
        "output_kind": output["kind"],
        "loader": output["loader"],
    }
    if save_as is not None:
        report["save_as"] = save_as
    return report


def write_report_files(report: dict, recipe_text: str, folder: Path, t_start: float) -> None:
    """recipe.yaml, plots/, then report.json (hashes of the files before it, total seconds since ``t_start``)
    and README.md into ``folder``, which already holds the model."""
    from gqaprune.report.card import write_card
    from gqaprune.report.plots import write_plots

    (folder / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
    t = time.perf_counter()
    write_plots(report, folder / "plots")
    report["files_sha256"] = hash_folder(folder)
    report.setdefault("phases_seconds", {})["report"] = round(time.perf_counter() - t, 2)
    report["seconds_total"] = round(time.perf_counter() - t_start, 2)
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    write_card(report, recipe_text, folder / "README.md")
