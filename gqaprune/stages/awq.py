"""The awq stage: it is an output stage, so it runs when the output is written, not in the stage loop.

``awq_output`` saves the pruned model unquantized into ``<tmp>-fp``, quantizes that folder with AutoAWQ into
``tmp`` (the output folder being built), verifies the quantized folder from the bytes on disk, and returns the
dequantized model the runner's round trip and "after" evaluation use. The ``-fp`` folder is always removed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from gqaprune.arch.adapter import model_shapes
from gqaprune.errors import InputError
from gqaprune.runtime import count_params

AWQ_LOADER = "AutoAWQ (GPU kernels) or gqaprune.quant.awq.load_dequantized (CPU)"


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
    return deq, "awq", AWQ_LOADER, report
