"""AutoAWQ 4-bit backend: width checks, quantization, and an independent verifier.

Everything that touches AutoAWQ lives in this one module.

* :func:`awq_width_problems` says, from shapes alone (no weights), whether
  AutoAWQ can quantize a model; the recipe validator uses it across stages.
* :func:`quantize_folder` runs AutoAWQ (GEMM, zero point, 4 bit) on a saved HF
  folder and writes exactly the folder AutoAWQ's ``save_quantized`` writes
  (``config.json`` with ``quantization_config``, ``model*.safetensors`` holding
  ``qweight``/``qzeros``/``scales``), plus the tokenizer files.
* :func:`load_dequantized` / :func:`verify_awq_folder` read that folder back
  WITHOUT AutoAWQ or any quantized kernel (those need a GPU): the packed int4
  tensors are unpacked here (:func:`unpack_int4`), dequantized into a stock
  transformers model, and compared with the unquantized model's logits.

AutoAWQ (``autoawq`` 0.2.9) is deprecated and no longer maintained upstream
(the project moved into vLLM's llm-compressor). Importing it emits a long
``DeprecationWarning`` and also resets the process-wide warning filter for
``DeprecationWarning``; :func:`_import_awq` imports it inside
``warnings.catch_warnings(record=True)`` so the notice is swallowed and the
global filters are restored. It still works with the installed torch /
transformers for the families whose adapter has an ``awq`` section (AutoAWQ model type and its
scale groups: llama, mistral, qwen2, qwen3, phi3), each quantized and verified on this machine (see
tests/quant/test_awq.py). Module layouts come from the adapter, never from tables here.

One AutoAWQ bug matters on CPU and is worked around here: its scale search keeps
the "original" weights via ``.cpu()``, which on a CPU model aliases the live
weights, so the grid search scales them in place and corrupts them (logits off by
~8 % before any quantization on a trained tiny Llama). :func:`_quantizer_cls`
subclasses ``AwqQuantizer`` to snapshot real copies; nothing else is changed.

Packing (AutoAWQ ``WQLinear_GEMM.from_linear``, checked in the installed
source ``awq/modules/linear/gemm.py``): for a Linear with weight ``(out, in)``
the integer codes are laid out ``(in, out)``; every 8 consecutive output
columns ``8c .. 8c+7`` go into int32 column ``c`` of ``qweight`` ``(in, out/8)``,
nibble ``i`` (bits ``4i .. 4i+3``) holding column ``8c + [0, 2, 4, 6, 1, 3, 5, 7][i]``.
``qzeros`` ``(in/group, out/8)`` packs the zero codes the same way and
``scales`` is ``(in/group, out)`` float16. Dequantized weight
``W[o, i] = (code[i, o] - zero[i // group, o]) * scale[i // group, o]``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from gqaprune.arch.adapter import Adapter, builtin_adapters, resolve_adapter
from gqaprune.errors import CheckFailed, InputError

# AutoAWQ skips the clip search for Linears whose name contains one of these
# (awq/quantize/quantizer.py, _search_best_clip); every other Linear is clipped,
# and the clip search needs out_features % 64 == 0.
_CLIP_SKIP = ("q_", "k_", "query", "key", "Wqkv")
CLIP_OUT_MULTIPLE = 64
PACK = 8  # int4 values per int32
GROUP_SIZES = (32, 64, 128)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a packed int32 holds column 8c + AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column 8c + j sits in nibble AWQ_REVERSE_ORDER[j]

# Default acceptance bound of verify_awq_folder (see its docstring for the numbers behind it).
DEFAULT_MAX_REL_LOGIT_ERR = 0.25
DEFAULT_MIN_TOP1_AGREEMENT = 0.5


# --------------------------------------------------------------------------- import


def _import_awq():
    """Import AutoAWQ without its deprecation notice and without letting it
    change the global warning filters (it calls ``warnings.simplefilter``)."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        try:
            import awq  # noqa: F401
            from awq.models._config import AwqConfig
            from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP
            from awq.modules.linear.gemm import WQLinear_GEMM
        except Exception as e:  # pragma: no cover - depends on the environment
            raise InputError(
                f"the AWQ stage needs the 'autoawq' package (pip install autoawq==0.2.9): cannot import it ({e})"
            ) from None
    return AwqConfig, AWQ_CAUSAL_LM_MODEL_MAP, WQLinear_GEMM


_QUANTIZER_CLS = None


def _quantizer_cls():
    """AutoAWQ's ``AwqQuantizer`` with its CPU aliasing bug fixed.

    ``AwqQuantizer._compute_best_scale`` keeps the "original" weights as
    ``{k: v.cpu() for k, v in module.state_dict().items()}`` and then scales the
    weights IN PLACE (``fc.weight.mul_``) for each of its 20 grid points, restoring
    from that copy after each. On a GPU ``.cpu()`` copies; on the CPU it returns the
    same tensor, so every trial corrupts the "original": the grid search compares
    cumulatively rescaled weights, and the weights it leaves behind are not the model's.
    Measured on a trained tiny Llama: AutoAWQ's scale step alone (``export_compatible``,
    no clip, no quantization), which is mathematically lossless, changed the logits by
    7.8 % (relative) with the stock class and by < 1e-5 with this one. The fix snapshots
    real copies; the rest of the algorithm is AutoAWQ's, unchanged.
    """
    global _QUANTIZER_CLS
    if _QUANTIZER_CLS is None:
        _import_awq()
        from awq.quantize.quantizer import AwqQuantizer

        class CpuSafeAwqQuantizer(AwqQuantizer):
            def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs={}):
                stock = module2inspect.state_dict

                def cloned_state_dict(*args, **kw):
                    return {k: v.clone() for k, v in stock(*args, **kw).items()}

                module2inspect.state_dict = cloned_state_dict  # instance attribute shadows the method
                try:
                    return super()._compute_best_scale(
                        x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs
                    )
                finally:
                    del module2inspect.state_dict

        _QUANTIZER_CLS = CpuSafeAwqQuantizer
    return _QUANTIZER_CLS




def _run_awq(model, model_type: str, windows: list[list[int]], quant_config: dict, n_parallel: int,
             progress: bool = False, quantizer_cls=None, **awq_kwargs):
    """AutoAWQ's ``quantize`` on an in-memory model (modified in place), with
    :func:`_quantizer_cls`; returns the AutoAWQ wrapper (``save_quantized`` writes the folder)."""
    AwqConfig, model_map, _ = _import_awq()
    wrapper = model_map[model_type](model, model_type, is_quantized=False, config=model.config,
                                    quant_config=AwqConfig(), processor=None)
    old_use_cache = model.config.use_cache
    model.config.use_cache = False  # AutoAWQ replays layers; a KV cache would grow across replays
    try:
        with _quiet(progress), torch.no_grad():
            wrapper.quantize(
                None,
                quant_config=quant_config,
                calib_data=windows,
                n_parallel_calib_samples=n_parallel,
                max_calib_samples=len(windows),
                max_calib_seq_len=len(windows[0]),
                quantizer_cls=quantizer_cls or _quantizer_cls(),
                **awq_kwargs,
            )
    finally:
        model.config.use_cache = old_use_cache
    return wrapper


@contextlib.contextmanager
def _quiet(progress: bool):
    """Silence AutoAWQ's warnings and (unless ``progress``) its and transformers' tqdm bars,
    restoring everything afterwards."""
    import functools

    from transformers.utils import logging as hf_logging

    _import_awq()
    patched = []
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        import awq.models.base as awq_base
        import awq.quantize.quantizer as awq_quantizer

        for mod in (awq_quantizer, awq_base):
            orig = getattr(mod, "tqdm", None)
            if orig is not None:
                patched.append((mod, orig))
                mod.tqdm = functools.partial(orig, disable=True)
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for mod, orig in patched:
            mod.tqdm = orig
        if bars_were_on and not progress:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- width rules


def _linear_problem(where: str, name: str, in_f: int, out_f: int, group_size: int, what_in: str, what_out: str) -> list[str]:
    if in_f <= 0 or out_f <= 0:
        return [f"{where}: {name} has an empty shape ({out_f} x {in_f}); AWQ cannot quantize it"]
    out: list[str] = []
    if in_f % group_size:
        out.append(f"{where}: {name} in-features {in_f} ({what_in}) is not a multiple of group_size {group_size}")
    clipped = not any(s in name.rsplit(".", 1)[-1] for s in _CLIP_SKIP)
    if clipped and out_f % CLIP_OUT_MULTIPLE:
        out.append(
            f"{where}: {name} out-features {out_f} ({what_out}) is not a multiple of {CLIP_OUT_MULTIPLE} "
            "(AutoAWQ's clip search needs it)"
        )
    elif out_f % PACK:
        out.append(f"{where}: {name} out-features {out_f} ({what_out}) is not a multiple of {PACK} (int4 packing needs it)")
    return out


def _layer_linears(adapter: Adapter, hidden: int, heads: int, kv: int, inter: int,
                   head_dim: int) -> list[tuple[str, int, int, str, str]]:
    """(module path, in, out, what_in, what_out) of the Linears AutoAWQ quantizes in one decoder layer."""
    hid = f"hidden_size {hidden}"
    q = f"num_attention_heads {heads} x head_dim {head_dim}"
    kvw = f"num_key_value_heads {kv} x head_dim {head_dim}"
    mlp = f"intermediate_size {inter}"
    qkv = f"(num_attention_heads {heads} + 2 x num_key_value_heads {kv}) x head_dim {head_dim}"
    widths = {  # role -> (in, out, what_in, what_out)
        "q": (hidden, heads * head_dim, hid, q),
        "k": (hidden, kv * head_dim, hid, kvw),
        "v": (hidden, kv * head_dim, hid, kvw),
        "qkv": (hidden, (heads + 2 * kv) * head_dim, hid, qkv),
        "o": (heads * head_dim, hidden, q, hid),
        "gate": (hidden, inter, hid, mlp),
        "up": (hidden, inter, hid, mlp),
        "gate_up": (hidden, 2 * inter, hid, f"2 x {mlp}"),
        "down": (inter, hidden, mlp, hid),
    }
    return [(getattr(adapter.layer, r), *widths[r]) for r in adapter.awq_linear_roles()]


def _merge_by_layer(per_layer_msgs: list[list[str]]) -> list[str]:
    """Collapse identical per-layer messages ("layer i: rest") into one naming the layers."""
    seen: dict[str, list[int]] = {}
    for i, msgs in enumerate(per_layer_msgs):
        for m in msgs:
            _, _, rest = m.partition(": ")
            seen.setdefault(rest, []).append(i)
    out = []
    for rest, layers in seen.items():
        if len(layers) == len(per_layer_msgs) and len(layers) > 1:
            where = "every layer"
        elif len(layers) == 1:
            where = f"layer {layers[0]}"
        else:
            where = "layers " + ", ".join(map(str, layers))
        out.append(f"{where}: {rest}")
    return out


def supported_architectures_text() -> str:
    return ", ".join(sorted(a for ad in builtin_adapters().values() if ad.awq for a in ad.architectures))


def unsupported_problem(adapter: Adapter) -> str | None:
    if adapter.awq is not None:
        return None
    return (f"architecture {'/'.join(adapter.architectures)} is not supported by the AWQ stage (adapter "
            f"'{adapter.name}' has no awq section); supported: {supported_architectures_text()}")


def awq_width_problems(adapter: Adapter, hidden_size: int, per_layer: list[dict], head_dim: int,
                       group_size: int) -> list[str]:
    """Human-readable reasons AutoAWQ (GEMM, 4 bit) cannot quantize a model of these shapes; empty if it can.

    ``per_layer`` items carry ``num_attention_heads``, ``num_key_value_heads`` and
    ``intermediate_size``. Rules (from AutoAWQ 0.2.9's source, confirmed by runs):

    * the adapter must have an ``awq`` section (AutoAWQ's model type and scale groups);
    * ``group_size`` must be one of 32, 64, 128 (the GEMM kernels' sizes);
    * every quantized Linear's in-features must be a multiple of ``group_size``:
      ``hidden_size`` (q/k/v, gate/up, Phi-3 qkv/gate_up), heads x head_dim (o_proj),
      ``intermediate_size`` (down_proj);
    * out-features of the Linears AutoAWQ clips (all but q_proj/k_proj: v_proj, o_proj,
      gate/up/down, Phi-3 qkv_proj and gate_up_proj) must be multiples of 64; the others of 8.

    Layers with different shapes are NOT a problem for AutoAWQ itself: it works layer by
    layer from the module shapes (verified: a Llama whose layers have 2 and 4 query heads,
    1 and 2 KV heads, MLP widths 256 and 128 quantizes and verifies; tests/quant/test_awq.py).
    The runner still refuses per-layer shapes before an awq stage (plan and ``gqaprune.stages.awq.awq_output``): an AWQ
    folder is reloaded by AutoAWQ and transformers from the global config alone, which cannot
    describe them, so such an output would quantize but not reload.
    """
    problem = unsupported_problem(adapter)
    if problem:
        return [problem]
    if group_size not in GROUP_SIZES:
        return [f"group_size {group_size} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}"]
    if head_dim <= 0:
        return [f"head_dim {head_dim} must be positive"]
    if not per_layer:
        return ["the model has no decoder layers to quantize"]
    per_layer_msgs = []
    for i, layer in enumerate(per_layer):
        try:
            heads = int(layer["num_attention_heads"])
            kv = int(layer["num_key_value_heads"])
            inter = int(layer["intermediate_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(
                f"per_layer[{i}] needs integer num_attention_heads, num_key_value_heads, intermediate_size ({e})"
            ) from None
        msgs = []
        for name, in_f, out_f, w_in, w_out in _layer_linears(adapter, hidden_size, heads, kv, inter, head_dim):
            msgs += _linear_problem(f"layer {i}", name, in_f, out_f, group_size, w_in, w_out)
        per_layer_msgs.append(msgs)
    return _merge_by_layer(per_layer_msgs)


def _module_width_problems(layers: nn.ModuleList, group_size: int) -> list[str]:
    """The same rules, applied to the Linears actually present in a loaded model."""
    per_layer_msgs = []
    for i, layer in enumerate(layers):
        msgs = []
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                msgs += _linear_problem(f"layer {i}", name, mod.in_features, mod.out_features, group_size, "in", "out")
        per_layer_msgs.append(msgs)
    return _merge_by_layer(per_layer_msgs)


# --------------------------------------------------------------------------- packing


def _check_w_bit(w_bit: int) -> None:
    if w_bit != 4:
        raise InputError(f"w_bit {w_bit} is not supported: AutoAWQ GEMM packs 4-bit weights only (w_bit: 4)")


def unpack_int4(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    w_bit: int = 4,
    group_size: int = 128,
    name: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpack AutoAWQ GEMM tensors.

    Returns ``(codes, zeros, weight)``: ``codes`` int32 ``(in, out)`` in
    ``[0, 2**w_bit - 1]``, ``zeros`` int32 ``(in/group, out)``, and the
    dequantized float32 ``weight`` in ``nn.Linear`` layout ``(out, in)``.
    ``name`` is the Linear's module path; errors (raised as :class:`CheckFailed`)
    name the offending tensor, e.g. ``model.layers.0.self_attn.q_proj.qweight``.
    """
    _check_w_bit(w_bit)
    p = f"{name}." if name else ""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise CheckFailed(f"{p}qweight: expected a 2-D int32 tensor, found {qweight.dtype} {tuple(qweight.shape)}")
    in_f, packed = qweight.shape
    out_f = packed * PACK
    if in_f == 0 or packed == 0:
        raise CheckFailed(f"{p}qweight: empty shape {tuple(qweight.shape)}")
    if group_size <= 0 or in_f % group_size:
        raise CheckFailed(f"{p}qweight: in-features {in_f} is not a multiple of group_size {group_size}")
    n_groups = in_f // group_size
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (n_groups, packed):
        raise CheckFailed(
            f"{p}qzeros: expected int32 {(n_groups, packed)} for qweight {tuple(qweight.shape)} and group_size {group_size}, "
            f"found {qzeros.dtype} {tuple(qzeros.shape)}"
        )
    if not scales.is_floating_point() or tuple(scales.shape) != (n_groups, out_f):
        raise CheckFailed(
            f"{p}scales: expected a float tensor {(n_groups, out_f)} for qweight {tuple(qweight.shape)} and group_size {group_size}, "
            f"found {scales.dtype} {tuple(scales.shape)}"
        )
    s = scales.float()
    if not torch.isfinite(s).all():
        bad = int((~torch.isfinite(s)).sum())
        raise CheckFailed(f"{p}scales: {bad} of {s.numel()} values are NaN or inf")
    if (s <= 0).any():
        bad = int((s <= 0).sum())
        raise CheckFailed(f"{p}scales: {bad} of {s.numel()} values are <= 0 (AutoAWQ scales are always positive)")

    codes = _unpack_cols(qweight, w_bit)
    zeros = _unpack_cols(qzeros, w_bit)
    top = 2**w_bit - 1
    for t, what in ((codes, "qweight"), (zeros, "qzeros")):
        # With int32 storage every 4-bit field is in range by construction; kept as a guard.
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > top):
            raise CheckFailed(f"{p}{what}: unpacked codes outside [0, {top}] (min {int(t.min())}, max {int(t.max())})")
    zr = zeros.repeat_interleave(group_size, dim=0)
    sr = s.repeat_interleave(group_size, dim=0)
    weight = ((codes - zr).float() * sr).t().contiguous()
    return codes, zeros, weight


def _unpack_cols(packed: torch.Tensor, w_bit: int) -> torch.Tensor:
    rows, cols = packed.shape
    shifts = torch.arange(0, 32, w_bit, dtype=torch.int32, device=packed.device)
    nib = torch.bitwise_and(torch.bitwise_right_shift(packed[:, :, None], shifts[None, None, :]), 2**w_bit - 1)
    nib = nib.reshape(rows, cols * PACK)
    idx = torch.arange(cols * PACK, device=packed.device).view(cols, PACK)[:, list(AWQ_REVERSE_ORDER)].reshape(-1)
    return nib[:, idx].to(torch.int32)


def pack_int4(codes: torch.Tensor, zeros: torch.Tensor, w_bit: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`unpack_int4` for the integer parts: ``codes`` ``(in, out)`` and
    ``zeros`` ``(in/group, out)`` with values in ``[0, 2**w_bit - 1]`` -> ``(qweight, qzeros)``
    int32 in AutoAWQ GEMM order (``scales`` are stored unpacked, as they are)."""
    _check_w_bit(w_bit)
    return _pack_cols(codes, w_bit, "codes"), _pack_cols(zeros, w_bit, "zeros")


def _pack_cols(vals: torch.Tensor, w_bit: int, what: str) -> torch.Tensor:
    if vals.dim() != 2 or vals.shape[1] % PACK:
        raise CheckFailed(f"{what}: expected a 2-D tensor whose second dim is a multiple of {PACK}, found {tuple(vals.shape)}")
    v = vals.to(torch.int64)
    top = 2**w_bit - 1
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > top):
        raise CheckFailed(f"{what}: values outside [0, {top}] (min {int(v.min())}, max {int(v.max())})")
    rows, cols = v.shape
    v = v.view(rows, cols // PACK, PACK)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, w_bit, dtype=torch.int64, device=v.device)
    word = (v << shifts).sum(dim=-1)  # in [0, 2**32)
    word = torch.where(word >= 2**31, word - 2**32, word)  # two's complement int32
    return word.to(torch.int32)


# --------------------------------------------------------------------------- quantize


def _read_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not folder.is_dir():
        raise InputError(f"model folder '{folder}' does not exist")
    if not cfg_path.is_file():
        raise InputError(f"'{folder}' is not a model folder: it has no config.json")
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{cfg_path}: cannot read it as JSON ({e})") from None


def _architecture_of(cfg: dict, folder: Path) -> str:
    archs = cfg.get("architectures") or []
    if not archs:
        raise InputError(f"{folder / 'config.json'}: no 'architectures' entry; cannot tell which model class it is")
    return archs[0]


def _calibration_windows(tokenizer, texts: list[str], seq_len: int, n_samples: int) -> tuple[list[list[int]], int]:
    """Concatenate the tokenized texts (EOS between them) and cut the first
    ``n_samples`` windows of exactly ``seq_len`` tokens. Deterministic."""
    if not texts or not any(t.strip() for t in texts):
        raise InputError("AWQ calibration needs text: the calibration source gave none")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = seq_len * n_samples
    for t in texts:
        if not t.strip():
            continue
        ids.extend(int(i) for i in tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
        if len(ids) >= need:
            break
    n = min(n_samples, len(ids) // seq_len)
    if n == 0:
        raise InputError(
            f"AWQ calibration texts give only {len(ids)} tokens, fewer than one window of max_calib_seq_len={seq_len}; "
            "give more text or a shorter max_calib_seq_len"
        )
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)], len(ids)


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def quantize_folder(src: Path, dst: Path, calib_texts: list[str], w_bit: int = 4, group_size: int = 128,
                    zero_point: bool = True, max_calib_seq_len: int = 256, n_samples: int = 32, *,
                    n_parallel_calib_samples: int = 8, seed: int = 0, save_dtype: torch.dtype | None = torch.float16,
                    architecture: str | None = None, adapter: Adapter | None = None,
                    model_loader: Callable[[Path], nn.Module] | None = None, trust_remote_code: bool = False,
                    progress: bool = False) -> dict:
    """Quantize the HF folder ``src`` (model + tokenizer) with AutoAWQ into ``dst``.

    AWQ GEMM, ``w_bit`` 4, zero point, ``group_size`` in (32, 64, 128), calibrated on the first
    ``n_samples`` windows of ``max_calib_seq_len`` tokens of ``calib_texts`` (:func:`_calibration_windows`),
    with AutoAWQ's quantizer with its CPU aliasing bug fixed (:func:`_quantizer_cls`). The model is loaded
    as :func:`_load_for_calibration` says; ``adapter`` (default: the builtin adapter of ``architecture``,
    itself defaulting to ``config.architectures[0]``) gives the AutoAWQ model type and where the decoder
    layers are. ``save_dtype`` (default float16, what AWQ kernels run in; ``None`` keeps the calibration
    dtype) is the dtype of the unquantized tensors (embeddings, norms, lm_head) on disk. ``dst`` (absent or
    empty) gets what :func:`_write_awq_folder` writes, whole or not at all.

    Deterministic: same inputs give byte-identical safetensors (torch is seeded with
    ``seed``; AutoAWQ's search itself has no randomness).

    Returns info: ``seconds`` (wall) and ``cpu_seconds`` of the AutoAWQ run,
    ``seconds_total``, calibration windows/tokens, ``num_qlinears``, file sizes.
    Raises :class:`InputError` for bad arguments, inputs or widths (before any AutoAWQ
    work), :class:`CheckFailed` when AutoAWQ itself fails or the folder cannot be written.
    """
    t_total = time.perf_counter()
    src, dst = Path(src), Path(dst)
    _check_quantize_arguments(w_bit, group_size, zero_point, max_calib_seq_len, n_samples, n_parallel_calib_samples)
    cfg, arch, adapter = _unquantized_source(src, architecture, adapter)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise InputError(f"AWQ output '{dst}' already exists and is not empty")

    _, _, WQLinear_GEMM = _import_awq()
    tokenizer = _load_tokenizer(src)
    torch.manual_seed(seed)
    model = _load_for_calibration(src, cfg, model_loader, trust_remote_code, progress)
    problems = _module_width_problems(model.get_submodule(adapter.model.layers), group_size)
    if problems:
        raise InputError("AutoAWQ cannot quantize this model's shapes:\n  - " + "\n  - ".join(problems))
    windows, n_tokens = _calibration_windows(tokenizer, calib_texts, max_calib_seq_len, n_samples)

    quant_config = {"zero_point": zero_point, "q_group_size": group_size, "w_bit": w_bit, "version": "GEMM"}
    wrapper, seconds, cpu_seconds = _quantize_in_place(model, adapter.awq.model_type, windows, quant_config,
                                                       n_parallel_calib_samples, progress)
    num_q = sum(isinstance(m, WQLinear_GEMM) for m in model.modules())
    if num_q == 0:
        raise CheckFailed("AutoAWQ quantized no Linear layers")
    if save_dtype is not None:
        model.to(save_dtype)  # int32 qweight/qzeros are not floating point and stay as they are
        model.config.dtype = save_dtype
    _write_awq_folder(wrapper, tokenizer, src, dst, progress)

    files = {p.name: p.stat().st_size for p in _safetensors_files(dst)}
    from importlib.metadata import version as _v

    return {"architecture": arch, "awq_model_type": adapter.awq.model_type, "w_bit": w_bit, "group_size": group_size,
            "zero_point": zero_point, "version": "gemm", "calib_windows": len(windows),
            "calib_seq_len": max_calib_seq_len, "calib_tokens_available": n_tokens, "num_qlinears": num_q,
            "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
            "seconds_total": round(time.perf_counter() - t_total, 3), "safetensors_bytes": sum(files.values()),
            "files_bytes": files, "autoawq_version": _v("autoawq")}


def _check_quantize_arguments(w_bit: int, group_size: int, zero_point: bool, max_calib_seq_len: int,
                              n_samples: int, n_parallel_calib_samples: int) -> None:
    """The settings AutoAWQ's GEMM format can hold, checked before anything is read."""
    _check_w_bit(w_bit)
    if not zero_point:
        raise InputError("zero_point: false is not supported: AutoAWQ's GEMM format stores zero points (qzeros)")
    if group_size not in GROUP_SIZES:
        raise InputError(f"group_size {group_size} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}")
    if max_calib_seq_len < 1 or n_samples < 1 or n_parallel_calib_samples < 1:
        raise InputError("max_calib_seq_len, n_samples and n_parallel_calib_samples must be positive")


def _unquantized_source(src: Path, architecture: str | None, adapter: Adapter | None) -> tuple[dict, str, Adapter]:
    """(config.json of ``src``, its architecture, the adapter), refusing a folder that is already quantized
    and a family AutoAWQ cannot quantize."""
    cfg = _read_config(src)
    if "quantization_config" in cfg:
        qm = (cfg["quantization_config"] or {}).get("quant_method", "?")
        raise InputError(f"'{src}' is already quantized ({qm}); AWQ needs an unquantized model")
    arch = architecture or _architecture_of(cfg, src).removeprefix("PerLayer")
    adapter = adapter or resolve_adapter("auto", [arch])
    problem = unsupported_problem(adapter)
    if problem:
        raise InputError(problem)
    return cfg, arch, adapter


def _load_tokenizer(src: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src))
    except Exception as e:
        raise InputError(f"'{src}' has no usable tokenizer files (AWQ calibration needs one): {e}") from None


def _load_for_calibration(src: Path, cfg: dict, model_loader: Callable[[Path], nn.Module] | None,
                          trust_remote_code: bool, progress: bool) -> nn.Module:
    """The model of ``src`` in the calibration dtype (float32 on CPU, float16 on CUDA), in eval mode:
    ``model_loader(src)`` if given; a per-layer-shaped gqaprune folder (``gqaprune_layers`` in config.json)
    with ``gqaprune.io.checkpoint.load_pretrained``; else stock ``AutoModelForCausalLM.from_pretrained``."""
    from transformers import AutoModelForCausalLM

    calib_dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    try:
        with _quiet(progress):
            if model_loader is not None:
                model = model_loader(src)
            elif cfg.get("gqaprune_layers"):
                from gqaprune.io.checkpoint import load_pretrained

                model = load_pretrained(src, dtype=calib_dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(str(src), dtype=calib_dtype, trust_remote_code=trust_remote_code)
    except (InputError, CheckFailed):
        raise
    except Exception as e:
        raise InputError(f"cannot load the model in '{src}' for AWQ: {e}") from None
    return model.to(calib_dtype).eval()


def _quantize_in_place(model, model_type: str, windows: list[list[int]], quant_config: dict, n_parallel: int,
                       progress: bool):
    """:func:`_run_awq` with any AutoAWQ failure as one CheckFailed line: (wrapper, wall seconds, CPU seconds)."""
    t0 = time.perf_counter()
    c0 = time.process_time()
    try:
        wrapper = _run_awq(model, model_type, windows, quant_config, n_parallel, progress)
    except (InputError, CheckFailed):
        raise
    except Exception as e:
        raise CheckFailed(f"AutoAWQ quantization failed: {type(e).__name__}: {e}") from None
    return wrapper, time.perf_counter() - t0, time.process_time() - c0


def _write_awq_folder(wrapper, tokenizer, src: Path, dst: Path, progress: bool) -> None:
    """AutoAWQ's own ``save_quantized`` output (``config.json`` with ``quantization_config``,
    ``model*.safetensors``) plus the tokenizer files and any ``*.py`` remote code of ``src``, written into a
    temporary sibling of ``dst`` and renamed into place, so a failure never leaves a half-written ``dst``."""
    tmp = dst.parent / f".{dst.name}.awq-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet(progress):
            wrapper.save_quantized(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        for py in src.glob("*.py"):  # remote code named by auto_map (per-layer-shaped models)
            shutil.copyfile(py, tmp / py.name)
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckFailed(f"writing the AWQ folder '{dst}' failed: {e}") from None



# --------------------------------------------------------------------------- load + verify


def _read_quant_config(cfg: dict, folder: Path) -> dict:
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "awq":
        raise InputError(f"'{folder}' is not an AWQ folder: config.json has no quantization_config with quant_method 'awq'")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise InputError(f"{folder / 'config.json'}: AWQ version '{version}' is not supported (only gemm)")
    if not qc.get("zero_point", True):
        raise InputError(f"{folder / 'config.json'}: AWQ without zero point is not supported")
    bits = int(qc.get("bits", 4))
    _check_w_bit(bits)
    group_size = int(qc.get("group_size", 128))
    if group_size <= 0:
        raise InputError(f"{folder / 'config.json'}: group_size {group_size} must be positive")
    return {"bits": bits, "group_size": group_size, "modules_to_not_convert": qc.get("modules_to_not_convert") or []}


def _read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = _safetensors_files(folder)
    if not files:
        raise CheckFailed(f"'{folder}' has no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    sizes: dict[str, int] = {}
    for f in files:
        sizes[f.name] = f.stat().st_size
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckFailed(f"{f}: cannot read it as safetensors ({e})") from None
        for k, v in part.items():
            if k in tensors:
                raise CheckFailed(f"tensor {k} appears in more than one safetensors file")
            tensors[k] = v
    return tensors, sizes


def _load(folder: Path, dtype: torch.dtype, build_model: Callable[[Any], nn.Module] | None) -> tuple[nn.Module, dict]:
    folder = Path(folder)
    cfg = _read_config(folder)
    qc = _read_quant_config(cfg, folder)
    arch = _architecture_of(cfg, folder)
    model = _build_model(folder, cfg, arch, dtype, build_model)

    tensors, sizes = _read_tensors(folder)
    group_size, bits = qc["group_size"], qc["bits"]
    new_sd, used = _dequantized_linears(model, tensors, bits, group_size, dtype)
    num_q = sum(k.endswith(".qweight") for k in used)
    if num_q == 0:
        raise CheckFailed(f"'{folder}' holds no qweight tensors matching the modules of {arch}")
    _add_stored_tensors(model, tensors, new_sd, used, arch)
    extra = sorted(set(tensors) - used)
    if extra:
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        raise CheckFailed(f"unexpected tensors in '{folder}' that no module of {arch} takes: {', '.join(extra[:5])}{more}")
    model.load_state_dict(new_sd, strict=True)
    info = {
        "architecture": arch,
        "num_qlinears": num_q,
        "w_bit": bits,
        "group_size": group_size,
        "codes_ok": True,
        "safetensors_bytes": sum(sizes.values()),
        "files_bytes": sizes,
    }
    return model, info


def _build_model(folder: Path, cfg: dict, arch: str, dtype: torch.dtype,
                 build_model: Callable[[Any], nn.Module] | None) -> nn.Module:
    """The unquantized model ``config.json`` (minus ``quantization_config``) describes, randomly initialised,
    in ``dtype`` and eval mode: ``build_model(config)``, or the transformers class ``arch`` (its per-layer
    version for a gqaprune per-layer-shaped folder)."""
    import transformers
    from transformers import AutoConfig

    plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
    try:
        config = AutoConfig.for_model(**plain)
    except Exception as e:
        raise InputError(f"{folder / 'config.json'}: cannot build a transformers config from it ({e})") from None
    if build_model is not None:
        model = build_model(config)
    else:
        cls = getattr(transformers, arch.removeprefix("PerLayer"), None)
        if cls is None:
            raise InputError(f"{folder / 'config.json'}: architecture {arch} is not a transformers model class")
        if cfg.get("gqaprune_layers"):
            # per-layer-shaped (gqaprune.arch.modeling_perlayer): the stock class with its layers rebuilt
            from gqaprune.arch.modeling_perlayer import per_layer_class

            cls = per_layer_class(cls)
        model = cls(config)
    return model.to(dtype).eval()


def _dequantized_linears(model: nn.Module, tensors: dict[str, torch.Tensor], bits: int, group_size: int,
                         dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(state-dict entries, tensor names used) of every nn.Linear of ``model`` that has a ``qweight`` on disk:
    its weight unpacked and dequantized from qweight/qzeros/scales, checked against the module's shape and
    for finite values, and its bias as stored."""
    new_sd: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or f"{name}.qweight" not in tensors:
            continue
        for part in ("qzeros", "scales"):
            if f"{name}.{part}" not in tensors:
                raise CheckFailed(f"missing tensor {name}.{part} (its qweight is present)")
        qw, qz, sc = tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"]
        _, _, w = unpack_int4(qw, qz, sc, bits, group_size, name=name)
        if tuple(w.shape) != tuple(mod.weight.shape):
            raise CheckFailed(
                f"{name}.qweight: shape {tuple(qw.shape)} unpacks to weight {tuple(w.shape)} (out, in), "
                f"but the model built from config.json has {tuple(mod.weight.shape)}"
            )
        if not torch.isfinite(w).all():
            raise CheckFailed(f"{name}.qweight: dequantized weight has NaN or inf values")
        new_sd[f"{name}.weight"] = w.to(dtype)
        used.update({f"{name}.qweight", f"{name}.qzeros", f"{name}.scales"})
        if mod.bias is not None:
            b = tensors.get(f"{name}.bias")
            if b is None:
                raise CheckFailed(f"missing tensor {name}.bias")
            new_sd[f"{name}.bias"] = b
            used.add(f"{name}.bias")
    return new_sd, used


def _add_stored_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], new_sd: dict[str, torch.Tensor],
                        used: set[str], arch: str) -> None:
    """Every other state-dict entry of ``model`` (embeddings, norms, lm_head) as stored, into ``new_sd``
    (names taken go into ``used``); checked for shape and finite values."""
    # Parameters that share storage (tied embeddings) are saved once.
    alias: dict[int, list[str]] = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        alias.setdefault(id(p), []).append(key)
    alias_of = {k: ks for ks in alias.values() for k in ks}

    for key, ref in model.state_dict().items():
        if key in new_sd:
            continue
        if key in tensors:
            t = tensors[key]
            used.add(key)
        else:
            twin = next((k for k in alias_of.get(key, []) if k != key and k in tensors), None)
            if twin is None:
                raise CheckFailed(f"missing tensor {key} (the {arch} model built from config.json needs it)")
            t = tensors[twin]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckFailed(f"{key}: shape {tuple(t.shape)} on disk, {tuple(ref.shape)} expected from config.json")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckFailed(f"{key}: has NaN or inf values")
        new_sd[key] = t.to(ref.dtype)


def load_dequantized(folder: Path, dtype: torch.dtype = torch.float32, build_model: Callable[[Any], nn.Module] | None = None):
    """Rebuild the model in an AWQ folder as a plain (dequantized) transformers model.

    Builds the stock transformers class named by ``config.json`` (``architectures[0]``,
    config minus ``quantization_config``; or ``build_model(config)`` for per-layer-shaped
    models) and fills EVERY parameter from the tensors on disk: quantized Linears from
    ``qweight``/``qzeros``/``scales`` (+ ``bias``), everything else (embeddings, norms
    that carry AWQ's folded activation scales, lm_head) as stored. Needs neither
    AutoAWQ nor a GPU. Raises :class:`CheckFailed` naming the tensor on a missing or
    unexpected tensor, a bad shape, an out-of-range code, or NaN/inf/non-positive scales.
    """
    return _load(Path(folder), dtype, build_model)[0]


@torch.no_grad()
def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        return model(input_ids=input_ids.to(dev)).logits.float().cpu()
    finally:
        model.train(was_training)


def verify_awq_folder(
    folder: Path,
    reference_model: nn.Module | None = None,
    input_ids: torch.Tensor | None = None,
    max_rel_logit_err: float = DEFAULT_MAX_REL_LOGIT_ERR,
    min_top1_agreement: float = DEFAULT_MIN_TOP1_AGREEMENT,
    build_model: Callable[[Any], nn.Module] | None = None,
) -> dict:
    """Check an AWQ folder from its tensors alone, and against the unquantized model.

    Always: :func:`load_dequantized` (every code/zero unpacked and range-checked,
    every scale finite and positive, every parameter present with the right shape,
    no stray tensors). With ``reference_model``: logits of both on ``input_ids``
    (default: a fixed pseudo-random batch, 2 x 64 tokens, seed 0; pass real text for a
    meaningful top-1 number), reporting ``max_abs_logit_diff``, ``rel_logit_err``
    = ||q - r|| / ||r|| and ``top1_agreement``; :class:`CheckFailed` if
    ``rel_logit_err > max_rel_logit_err`` or ``top1_agreement < min_top1_agreement``.

    Default bound: rel_logit_err <= 0.25 and top1_agreement >= 0.5 -- a detector of
    broken folders, not a quality gate (the runner's perplexity gate is that). Measured
    on this machine, AutoAWQ w4 g128, logits on held-out pydoc text:

    * builtin:tiny-llama (trained, hidden 384, 4 layers): rel 0.010, top-1 0.984
      (plain round-to-nearest 4 bit: 0.011 / 0.979; perplexity 149.22 -> 149.30);
    * a trained 2-layer Llama, hidden 128: rel 0.055, top-1 0.94 (RTN 0.061 / 0.94);
    * random-init 2-layer test models, hidden 128 (worst case: Gaussian weights, no
      structure for AWQ to use): rel 0.144 / top-1 0.73 (Llama, Mistral), 0.139 / 0.78
      (Phi-3), 0.069 / 0.99 (Qwen2, tied embeddings); RTN on the Llama: 0.158 / 0.70;
    * corrupted folders, one whole qweight bit-inverted (every code c -> 15 - c): trained
      model rel 0.32-1.34 with top-1 <= 0.55; random model rel 0.55-1.30 for v/o/MLP
      matrices (q/k barely matter in a random model's near-uniform attention).

    So 0.25 sits ~4x above honest 4-bit error on trained models and above the worst
    random-init case, and below every whole-matrix corruption of a trained model. Sparse
    bit flips (1 % of one qweight's bytes) stay within honest error: they are valid codes,
    and only file hashes (report.json ``files_sha256``) catch them.
    """
    model, info = _load(Path(folder), torch.float32, build_model)
    out = {"ok": True, **info}
    if reference_model is None:
        return out
    if input_ids is None:
        g = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, int(model.config.vocab_size), (2, 64), generator=g)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    ref = _logits(reference_model, input_ids)
    got = _logits(model, input_ids)
    if ref.shape != got.shape:
        raise CheckFailed(f"logit shapes differ: reference {tuple(ref.shape)}, AWQ {tuple(got.shape)}")
    diff = got - ref
    rel = float(diff.norm() / ref.norm().clamp_min(1e-12))
    top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    out.update(
        {
            "max_abs_logit_diff": float(diff.abs().max()),
            "rel_logit_err": rel,
            "top1_agreement": top1,
            "num_tokens_compared": int(input_ids.numel()),
            "bound": {"max_rel_logit_err": max_rel_logit_err, "min_top1_agreement": min_top1_agreement},
        }
    )
    if not math.isfinite(rel) or rel > max_rel_logit_err or top1 < min_top1_agreement:
        out["ok"] = False
        raise CheckFailed(
            f"AWQ output '{folder}' is too far from the unquantized model: relative logit error {rel:.4f} "
            f"(limit {max_rel_logit_err}), top-1 agreement {top1:.3f} (minimum {min_top1_agreement}), "
            f"max |logit diff| {out['max_abs_logit_diff']:.4f}"
        )
    return out
