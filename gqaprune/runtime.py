"""The process a run executes in: logging, seeds, rank, device and dtypes, thread count."""

from __future__ import annotations

import os
import random
import sys
from contextlib import contextmanager

import numpy as np
import torch

from gqaprune.errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")  # torchrun/accelerate, MPI launchers


def log(msg: str) -> None:
    print(f"gqaprune: {msg}", file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def process_rank() -> int:
    """This process's rank under a multi-process launcher (0 when launched alone)."""
    for var in _RANK_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def pick_runtime(runtime, source_dtype) -> tuple[torch.device, torch.dtype, torch.dtype]:
    """(device, compute dtype, save dtype) from the recipe's runtime block and the source model's dtype."""
    cuda = torch.cuda.is_available()
    if runtime.device == "cuda" and not cuda:
        raise InputError("runtime.device is cuda but no CUDA device is available (use auto or cpu)")
    use_cuda = runtime.device == "cuda" or (runtime.device == "auto" and cuda)
    # one GPU per process under a multi-process launcher
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")
    if runtime.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[runtime.dtype]
    save = source_dtype if runtime.save_dtype == "auto" else DTYPES[runtime.save_dtype]
    return device, dtype, save


def source_dtype_of(config) -> torch.dtype:
    dt = getattr(config, "dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    return DTYPES.get(str(dt), torch.float32)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op thread count set to ``threads`` (unchanged when None/0), and given back afterwards."""
    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(before)


def runtime_info(device: torch.device, dtype: torch.dtype, save_dtype: torch.dtype,
                 device_map: dict | None = None) -> dict:
    """The report's ``runtime`` block: where and in which precision the run computed and saved (with
    runtime.device_map: auto, also where accelerate placed each module at load)."""
    info = {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "save_dtype": str(save_dtype).removeprefix("torch."), "threads": torch.get_num_threads()}
    if device_map is not None:
        info["device_map"] = device_map
    return info
