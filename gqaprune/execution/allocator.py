"""Make freed large tensors go back to the OS during a layer-wise run (glibc only).

A layer-wise run frees and reallocates tensors of a few MB to a few hundred MB once per decoder layer. glibc
serves an allocation from its heap once its mmap threshold has risen past that size (it raises the threshold
each time an mmapped block is freed, up to 32 MiB), and heap blocks are kept by the process after they are
freed. On the TinyLlama-1.1B shape that retention was 0.7 GiB of a 2.2 GiB peak (benchmarks/layerwise_scale.py;
RESULTS.md). Fixing the threshold at 1 MiB, as the MALLOC_MMAP_THRESHOLD_ environment variable would, serves
every larger tensor with its own mapping, returned whole when freed; the memory plan counts live tensors only.

The setting is process-wide and stays for the rest of the process: glibc has no call to read the previous one
back. Elsewhere (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1 << 20


def return_large_frees_to_os() -> str:
    """Fix glibc's mmap and trim thresholds at THRESHOLD_BYTES; returns what was done, for the report."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "unchanged (not glibc)"
    if not (mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) and mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES)):
        return "unchanged (mallopt refused)"
    return f"glibc mmap and trim thresholds fixed at {THRESHOLD_BYTES // 2**20} MiB"
