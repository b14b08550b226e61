"""awq: the output stage. It does not change the model in memory: it must be the last stage, and when the output
is written (``awq_output``) it saves the pruned model unquantized into ``<tmp>-fp``, quantizes that folder with
AutoAWQ into ``tmp`` (the output folder being built), verifies the quantized folder from the bytes on disk, and
returns the dequantized model the runner's round trip and "after" evaluation use. The ``-fp`` folder is always
removed. AutoAWQ needs one shape in every layer, with widths its kernels take; the stage's plan checks both
before any weights load.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from gqaprune.arch.adapter import head_dim_of, model_shapes
from gqaprune.context import RunContext
from gqaprune.errors import InputError
from gqaprune.runtime import count_params
from gqaprune.schema import Strict
from gqaprune.stages.base import PlanInput, Planned, Stage, unchanged

AWQ_LOADER = "AutoAWQ (GPU kernels) or gqaprune.quant.awq.load_dequantized (CPU)"

class AwqStage(Strict):
    type: Literal["awq"]
    w_bit: Literal[4] = 4
    group_size: int = Field(128, ge=32)
    zero_point: bool = True
    samples: int = Field(64, ge=1)
    seq_len: int = Field(256, ge=16)


class Awq(Stage):
    name = "awq"
    Config = AwqStage
    writes_output = True

    def plan(self, shapes: list[dict], inp: PlanInput) -> Planned:
        from gqaprune.arch.adapter import resolve_adapter
        from gqaprune.quant.awq import awq_width_problems

        per_layer = [stage_label(j, s) for j, s in enumerate(inp.earlier) if s.gives_per_layer_shapes()]
        if per_layer:
            raise InputError(f"{inp.where}: the awq stage quantizes a model with one shape in every layer; "
                             f"{', '.join(per_layer)} give per-layer shapes (use allocation: uniform and no "
                             "protect_layers before awq)")
        saved = inp.adapter if inp.saved_arch in inp.adapter.architectures else \
            resolve_adapter("auto", [inp.saved_arch])  # save_as: mistral saves with the mistral adapter's roles
        problems = awq_width_problems(saved, getattr(inp.config, inp.adapter.config.hidden_size), shapes,
                                      head_dim_of(inp.config, inp.adapter), self.cfg.group_size)
        if problems:
            raise InputError(f"{inp.where}: AutoAWQ cannot quantize what the earlier stages leave: "
                             + "; ".join(problems))
        bytes_per_param = 0.5 + 4.0 / self.cfg.group_size  # int4 weights plus fp16 scale and packed zero per group
        return Planned(unchanged(shapes), ["weights 4-bit (embeddings and norms stay in 16-bit; shown as a uniform "
                                           "estimate)"], {"bytes_per_param": bytes_per_param})

    def apply(self, ctx: RunContext) -> dict:
        raise RuntimeError("awq writes the output: the runner quantizes the saved model (gqaprune.quant.awq)")


def stage_label(index: int, stage: Stage) -> str:
    return f"stages[{index}] {stage.name}"


def awq_output(model, adapter, tokenizer, awq_cfg, recipe, tmp: Path, probe, save_dtype, progress):
    """Save the pruned model, quantize it with AutoAWQ into tmp, verify from the bytes on disk.
    Returns (dequantized model, output kind "awq", loader, report["awq"])."""
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
        from gqaprune.runtime import log

        log(f"awq: {awq_cfg.w_bit}-bit, group size {awq_cfg.group_size}, {len(model_shapes(model, adapter))} layers "
            f"(AutoAWQ; progress per layer)")
        info = quantize_folder(fp_dir, tmp, texts, w_bit=awq_cfg.w_bit, group_size=awq_cfg.group_size,
                               zero_point=awq_cfg.zero_point, max_calib_seq_len=awq_cfg.seq_len,
                               n_samples=awq_cfg.samples, adapter=adapter, progress=progress)
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
    return deq, "awq", AWQ_LOADER, report
