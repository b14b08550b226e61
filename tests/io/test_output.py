"""The atomic output folder: whole or nothing at the output path, signals, --force, stale temporary folders."""

import os
import signal
import time

import pytest

from gqaprune.errors import CheckFailed, InputError
from gqaprune.io.output import Interrupted, atomic_output, check_output_path, remove_stale_temps, temp_names

DEAD_PID = 4194999  # above Linux's largest pid_max (2**22): no process can have it


def _leftovers(folder, out="out"):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{out}.gqaprune-"))


def test_commit_renames_the_built_folder_into_place(tmp_path):
    out = tmp_path / "out"
    with atomic_output(out) as tmp:
        assert tmp == temp_names(out, os.getpid())[0] and not tmp.exists()
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"weights")
        assert not out.exists()  # nothing at the output path until the end
    assert (out / "model.safetensors").read_bytes() == b"weights"
    assert _leftovers(tmp_path) == []


def test_force_replaces_the_old_folder_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output(out) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path) == []  # the old folder moved aside is removed too


def test_exception_leaves_nothing_and_propagates(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="boom"):
        with atomic_output(out) as tmp:
            tmp.mkdir()
            (tmp / "half.bin").write_bytes(b"x")
            (tmp.parent / f"{tmp.name}-fp").mkdir()  # the AWQ stage's unquantized folder
            raise ValueError("boom")
    assert not out.exists() and _leftovers(tmp_path) == []


def test_interrupted_becomes_a_check_failed_with_the_signal_exit_code(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckFailed, match="interrupted by SIGTERM; nothing was written at") as e:
        with atomic_output(out) as tmp:
            tmp.mkdir()
            raise Interrupted(signal.SIGTERM)
    assert e.value.exit_code == 128 + signal.SIGTERM
    assert not out.exists() and _leftovers(tmp_path) == []


def test_real_sigint_inside_is_caught_and_handlers_are_restored(tmp_path):
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(CheckFailed, match="interrupted by SIGINT") as e:
        with atomic_output(out) as tmp:
            tmp.mkdir()
            assert signal.getsignal(signal.SIGINT) is not before  # our handler while the output is built
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here, long before the sleep ends
    assert e.value.exit_code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before
    assert not out.exists() and _leftovers(tmp_path) == []


def test_os_error_is_one_line_check_failed(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckFailed, match=r"cannot write the output \(No space left on device: .*\); nothing was written"):
        with atomic_output(out) as tmp:
            tmp.mkdir()
            raise OSError(28, "No space left on device", str(tmp / "model.safetensors"))
    assert not out.exists() and _leftovers(tmp_path) == []


def test_no_commit_cleans_up_without_writing(tmp_path):
    out = tmp_path / "out"
    with atomic_output(out, commit=False) as tmp:  # a non-main process of a multi-process run
        tmp.mkdir()
    assert not out.exists() and _leftovers(tmp_path) == []


def test_check_output_path_refusals(tmp_path):
    out = tmp_path / "out"
    check_output_path(out, force=False, model_spec="builtin:tiny-llama")  # free: fine
    out.mkdir()
    with pytest.raises(InputError, match="output folder '.*out' exists; pass --force to replace it"):
        check_output_path(out, force=False, model_spec="builtin:tiny-llama")
    check_output_path(out, force=True, model_spec="builtin:tiny-llama")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="exists and is not a folder"):
        check_output_path(f, force=True, model_spec="builtin:tiny-llama")
    with pytest.raises(InputError, match="'.*file' is a file, not a folder"):
        check_output_path(f / "sub" / "out", force=False, model_spec="builtin:tiny-llama")
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    for bad in (model, tmp_path):  # the model folder itself, or a folder holding it
        with pytest.raises(InputError, match="would replace the model folder"):
            check_output_path(bad, force=True, model_spec=str(model))


def test_remove_stale_temps_removes_only_dead_runs_of_this_output(tmp_path):
    out = tmp_path / "out"
    dead = [p.name for p in temp_names(out, DEAD_PID)]
    alive = [p.name for p in temp_names(out, os.getpid())] + [f".out.gqaprune-tmp-{os.getppid()}"]
    other = [f".other.gqaprune-tmp-{DEAD_PID}", "out-notes"]
    for name in dead + alive + other:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(b"x")
    removed = remove_stale_temps(out)
    assert sorted(removed) == sorted(dead)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(alive + other)
    assert remove_stale_temps(tmp_path / "missing" / "out") == []
