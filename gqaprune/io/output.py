"""The output folder is written whole or not at all.

Everything is built in a temporary folder ``.<name>.gqaprune-tmp-<pid>`` beside the output path and
renamed into place at the end, so the output path never holds a half-written folder. SIGINT/SIGTERM at
any point remove the temporary folders (also the AWQ stage's ``-fp`` folder) and end the run with a
CheckFailed whose exit code is 128 + the signal number; temporary folders left by a killed run (SIGKILL,
power loss) are removed by the next run at the same output path (``remove_stale_temps``).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from gqaprune.errors import CheckFailed, InputError
from gqaprune.io.sources import is_builtin
from gqaprune.runtime import log


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived; a BaseException so that no ``except Exception`` in a stage swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class _Signals:
    """SIGINT/SIGTERM raise Interrupted in the main thread, except while ``defer`` is set (moving the
    finished folder into place, cleaning up): then the signal is only recorded."""

    def __init__(self):
        self.defer = False
        self.pending: int | None = None
        self.old: dict = {}

    def _handler(self, signum, frame):
        if self.defer:
            self.pending = self.pending or signum
            return
        raise Interrupted(signum)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            self.old = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)
        self.old = {}


def check_output_path(out: Path, force: bool, model_spec: str) -> None:
    """The output path can be created (or replaced with --force) and is not the model folder or inside it:
    checked before any work."""
    if out.is_symlink() or out.exists():
        if not out.is_dir():
            raise InputError(f"output path '{out}' exists and is not a folder")
        if not force:
            raise InputError(f"output folder '{out}' exists; pass --force to replace it")
    parent = out.absolute().parent
    while not (parent.is_symlink() or parent.exists()):
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"cannot create the output folder '{out}': '{parent}' is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create the output folder '{out}': no permission to write in '{parent}'")
    if not is_builtin(model_spec):
        o, m = out.resolve(), Path(model_spec).expanduser().resolve()
        if o == m or o in m.parents:
            raise InputError(f"the output folder '{out}' would replace the model folder '{model_spec}'; "
                             "choose another output")


def temp_names(out: Path, pid: int | str) -> list[Path]:
    """[the folder being built, the AWQ stage's unquantized folder, the replaced output moved aside,
    accelerate's offload folder under runtime.device_map: auto]."""
    return [out.parent / f".{out.name}.gqaprune-tmp-{pid}", out.parent / f".{out.name}.gqaprune-tmp-{pid}-fp",
            out.parent / f".{out.name}.gqaprune-old-{pid}", out.parent / f".{out.name}.gqaprune-tmp-{pid}-offload"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(out: Path) -> list[str]:
    """Remove the temporary folders that killed runs (SIGKILL, power loss) left beside ``out``."""
    removed = []
    if not out.parent.is_dir():
        return removed
    prefixes = (f".{out.name}.gqaprune-tmp-", f".{out.name}.gqaprune-old-")
    for p in sorted(out.parent.iterdir()):
        if not p.name.startswith(prefixes):
            continue
        pid = p.name.split("-")[-2 if p.name.endswith(("-fp", "-offload")) else -1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


@contextmanager
def atomic_output(out: Path, commit: bool = True):
    """Yields the temporary folder to build the output in (not yet created). On a normal exit with ``commit``
    it replaces ``out`` in one rename (an existing ``out`` is moved aside first); on any exit every temporary
    folder is removed. Signals and OSErrors inside become one-line CheckFailed errors."""
    sig = _Signals()
    sig.install()
    committed = False
    tmp, _, trash, _ = temp_names(out, os.getpid())
    try:
        yield tmp
        if commit:
            sig.defer = True  # from here a signal is recorded, not raised: the rename must not be cut in half
            if sig.pending:
                raise Interrupted(sig.pending)
            if out.exists():  # --force: move the old folder aside first, so the path is never half-written
                os.replace(out, trash)
            os.replace(tmp, out)
            committed = True
    except Interrupted as e:
        raise CheckFailed(f"{e}; nothing was written at {out}", exit_code=128 + e.signum) from None
    except OSError as e:
        raise CheckFailed(f"cannot write the output ({e.strerror or e}: {e.filename or out}); "
                          f"nothing was written at {out}") from None
    finally:
        sig.defer = True
        for p in temp_names(out, os.getpid()):
            shutil.rmtree(p, ignore_errors=True)
        sig.restore()
    if committed and sig.pending:
        log(f"{signal.Signals(sig.pending).name} arrived while the finished output was moved into place; "
            f"the output at {out} is complete")
