"""Freed large tensors go back to the OS once return_large_frees_to_os has run (glibc, measured in a fresh process)."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import sys, torch
from gqaprune.execution.allocator import return_large_frees_to_os

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

if sys.argv[1] == "fixed":
    print(return_large_frees_to_os())
x = torch.ones(1 << 20)  # a 4 MiB tensor, mmapped, then freed: glibc raises its mmap threshold past 4 MiB
del x
before = rss()
big, pins = [], []
for _ in range(16):  # 64 MiB in 4 MiB tensors (now from the heap unless fixed), each followed by a 512 KiB one
    big.append(torch.ones(1 << 20))  # that stays, so freeing them cannot just shrink the heap from its top
    pins.append(torch.ones(1 << 17))
del big
print((rss() - before) / 2**20)
"""


def _retained_mib(mode: str) -> tuple[list[str], float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    lines = out.stdout.split()
    return lines, float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_tensors_are_returned_only_with_the_fixed_threshold():
    _, retained_default = _retained_mib("default")
    said, retained_fixed = _retained_mib("fixed")
    assert retained_default > 48  # the probe does reproduce the retention (else the next line proves nothing)
    assert retained_fixed < 16  # the 8 MiB of pins stay in both
    assert "fixed at 1 MiB" in " ".join(said)
