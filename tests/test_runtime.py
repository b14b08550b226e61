"""The process a run executes in: rank, device and dtypes, seeds, thread count."""

import random

import pytest
import torch

from gqaprune.errors import InputError
from gqaprune.recipe import Runtime
from gqaprune.runtime import (count_params, pick_runtime, process_rank, runtime_info, seed_everything, source_dtype_of,
                              torch_threads)


def test_process_rank_from_launcher_variables(monkeypatch):
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert process_rank() == 0
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    assert process_rank() == 2
    monkeypatch.setenv("RANK", "x")  # not a number: ignored, the next launcher's variable counts
    assert process_rank() == 2
    monkeypatch.setenv("RANK", "3")
    assert process_rank() == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")
def test_pick_runtime_on_cpu():
    assert pick_runtime(Runtime(), torch.bfloat16) == (torch.device("cpu"), torch.float32, torch.bfloat16)
    assert pick_runtime(Runtime(device="cpu", dtype="bfloat16", save_dtype="float16"), torch.float32) == (
        torch.device("cpu"), torch.bfloat16, torch.float16)
    with pytest.raises(InputError, match="runtime.device is cuda but no CUDA device is available"):
        pick_runtime(Runtime(device="cuda"), torch.float32)


def test_source_dtype_of_config():
    class Cfg:
        pass

    c = Cfg()
    assert source_dtype_of(c) == torch.float32  # no dtype recorded
    c.dtype = torch.bfloat16
    assert source_dtype_of(c) == torch.bfloat16
    c.dtype = "float16"
    assert source_dtype_of(c) == torch.float16
    c.dtype = "int8"  # not a dtype we compute in
    assert source_dtype_of(c) == torch.float32


def test_seed_everything_repeats_every_stream():
    seed_everything(7)
    a = (random.random(), torch.rand(3))
    torch.rand(5)
    seed_everything(7)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_torch_threads_sets_and_gives_back_even_on_error():
    before = torch.get_num_threads()
    want = 2 if before != 2 else 1
    with pytest.raises(RuntimeError):
        with torch_threads(want):
            assert torch.get_num_threads() == want
            assert runtime_info(torch.device("cpu"), torch.float32, torch.bfloat16) == {
                "device": "cpu", "dtype": "float32", "save_dtype": "bfloat16", "threads": want}
            raise RuntimeError("stage failed")
    assert torch.get_num_threads() == before
    with torch_threads(None):  # not set in the recipe: torch's choice stays
        assert torch.get_num_threads() == before


def test_count_params():
    assert count_params(torch.nn.Linear(3, 4)) == 3 * 4 + 4
