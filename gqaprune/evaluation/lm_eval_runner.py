"""Run lm-eval on a model object, offline, and flatten its results.

``run_lm_eval(model, tokenizer, tasks)`` wraps ``lm_eval.simple_evaluate`` with
``HFLM(pretrained=model, tokenizer=tokenizer)`` and a ``TaskManager`` that
knows the package's shipped tasks (:mod:`gqaprune.evaluation.local_tasks`)
plus an optional user ``include_path``. Nothing touches the network: the Hub
and ``datasets`` are put in offline mode for the duration of the call, and a
task whose data is not on this machine is an :class:`InputError` naming it.

Results are ``{task: {metric: value, metric_stderr: value, ...}}`` with lm-eval's
``,none`` filter suffix removed (other filters keep a ``,<filter>`` suffix),
only JSON-friendly numbers (a stderr lm-eval could not compute is left out).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from pathlib import Path

from gqaprune.errors import InputError
from gqaprune.evaluation.local_tasks import LOCAL_TASKS, MC_TASK, ROLLING_TASK, task_dir

__all__ = ["LOCAL_TASKS", "run_lm_eval", "primary_metrics"]

_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "DISABLE_MULTIPROC": "1"}

# metric shown in tables for a task, in order of preference
_PRIMARY = ("acc", "word_perplexity", "exact_match", "acc_norm", "f1", "bits_per_byte", "perplexity")

_full_manager_cache: dict[tuple[str, ...], object] = {}


@contextlib.contextmanager
def _offline():
    """HF Hub and datasets offline (env and the already-imported module flags), restored afterwards."""
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    os.environ.update(_OFFLINE_ENV)
    patched: list[tuple[object, str, object]] = []
    for modname, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                           ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        try:
            mod = __import__(modname, fromlist=["_"])
        except ImportError:  # pragma: no cover - both are dependencies of lm-eval
            continue
        for attr in attrs:
            if hasattr(mod, attr):
                patched.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, value in reversed(patched):
            setattr(mod, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet(level: int = logging.WARNING):
    """lm-eval (and datasets) log at ``level`` or above only, restored afterwards."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets", "evaluate")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    bars = None
    try:
        import datasets

        bars = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass
    try:
        yield
    finally:
        for lg, lv in zip(loggers, saved):
            lg.setLevel(lv)
        if bars:
            import datasets

            datasets.utils.logging.enable_progress_bar()


@contextlib.contextmanager
def _no_task_progress(enabled: bool):
    """Silence the per-document progress bar lm-eval draws while building requests."""
    if enabled:
        yield
        return
    import lm_eval.api.task as task_mod

    orig = getattr(task_mod, "tqdm", None)
    if orig is None:  # pragma: no cover - other lm-eval versions
        yield
        return
    task_mod.tqdm = functools.partial(orig, disable=True)
    try:
        yield
    finally:
        task_mod.tqdm = orig


def _make_lm(model, tokenizer, batch_size: int, progress: bool):
    from lm_eval.models.huggingface import HFLM

    class _HFLM(HFLM):
        """HFLM whose request progress bars follow ``progress``."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not progress)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not progress)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or not progress, **kw)

    with _quiet(logging.ERROR):  # HFLM warns that a model object skips its loading options
        return _HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


@contextlib.contextmanager
def _rng_restored():
    """Give back the global python/numpy/torch RNG states that simple_evaluate reseeds."""
    import random

    import numpy as np
    import torch

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _include_paths(include_path: str | os.PathLike | None) -> list[str]:
    paths = [str(task_dir())]
    if include_path is not None and str(include_path) != "":
        p = Path(include_path).expanduser()
        if not p.exists():
            raise InputError(f"lm-eval include_path '{include_path}' does not exist")
        paths.append(str(p.resolve()))
    return paths


def _unknown_error(unknown: list[str]) -> InputError:
    names = ", ".join(f"'{t}'" for t in unknown)
    return InputError(
        f"unknown lm-eval task {names}; the package's offline tasks are {', '.join(LOCAL_TASKS)} "
        f"(other lm-eval tasks need their data available offline; add your own task YAMLs with include_path)"
    )


@functools.lru_cache(maxsize=1)
def _lm_eval_task_text() -> str:
    """The text of lm-eval's own task configs (YAML and Python), read once.

    Every name lm-eval registers (task, group or tag) is written literally in
    one of these files, so a name absent from this text is certainly unknown;
    reading them is ~10x faster than lm-eval parsing them into its index.
    """
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    parts = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith((".yaml", ".yml", ".py")):
                with open(os.path.join(dirpath, f), encoding="utf-8", errors="replace") as fh:
                    parts.append(fh.read())
    return "\n".join(parts)


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def _task_manager(tasks: list[str], paths: list[str]):
    """A TaskManager that knows ``tasks``: ours and the user's first (fast), lm-eval's own if needed."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=paths, include_defaults=False)
    missing = [t for t in tasks if not _known(tm, t)]
    if not missing:
        return tm
    surely_unknown = [t for t in missing if not _is_pattern(t) and t not in _lm_eval_task_text()]
    if surely_unknown:
        raise _unknown_error(surely_unknown)
    key = tuple(paths)
    if key not in _full_manager_cache:  # scanning lm-eval's ~15k task configs takes seconds
        _full_manager_cache[key] = TaskManager(include_path=paths, include_defaults=True)
    tm = _full_manager_cache[key]
    unknown = [t for t in tasks if not _known(tm, t)]
    if unknown:
        raise _unknown_error(unknown)
    return tm


def _known(tm, name: str) -> bool:
    if name in tm.all_tasks:
        return True
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return True
    return bool(tm.match_tasks([name])) if _is_pattern(name) else False


def _expand(tm, tasks: list[str]) -> list[str]:
    """Glob patterns (``gqaprune_*``) replaced by the task names they match, order kept, no repeats."""
    out: list[str] = []
    for t in tasks:
        for name in (sorted(tm.match_tasks([t])) if _is_pattern(t) else [t]):
            if name not in out:
                out.append(name)
    return out


def _is_offline_data_error(exc: BaseException) -> bool:
    """Does ``exc`` (or its cause chain) say the data would have to be fetched?"""
    names = ("OfflineModeIsEnabled", "ConnectionError", "LocalEntryNotFoundError", "DatasetNotFoundError",
             "FileNotFoundError", "DataFilesNotFoundError", "EmptyDatasetError", "HfHubHTTPError",
             "RepositoryNotFoundError", "GatedRepoError", "ConnectTimeout", "ReadTimeout", "HTTPError")
    words = ("offline", "couldn't reach", "could not reach", "connection", "not found on the hub",
             "doesn't exist on the hub", "no such file", "unable to find", "couldn't find")
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(type(e).__name__ == n or n in [c.__name__ for c in type(e).__mro__] for n in names):
            return True
        if any(w in str(e).lower() for w in words):
            return True
        e = e.__cause__ or e.__context__
    return False


def _load_tasks(tm, tasks: list[str]) -> dict:
    """Build each task (this is where datasets load); a missing dataset names its task."""
    loaded: dict = {"tasks": {}, "groups": {}, "group_map": {}}
    for name in tasks:
        try:
            one = tm.load([name])
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - lm-eval/datasets raise many kinds
            if _is_offline_data_error(e):
                raise InputError(
                    f"lm-eval task '{name}': its dataset is not available offline "
                    f"(gqaprune never downloads; its data must be available offline, e.g. in the local "
                    f"datasets cache or as local files named by a task YAML in include_path): "
                    f"{type(e).__name__}: {_first_line(e)}"
                ) from None
            raise InputError(f"lm-eval task '{name}' could not be loaded: {type(e).__name__}: {_first_line(e)}") from None
        for k in loaded:
            loaded[k].update(one.get(k) or {})
    return loaded


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else ""


def _clean(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        v = float(value) if isinstance(value, float) else value
        return v if not (isinstance(v, float) and math.isnan(v)) else None
    try:  # numpy scalars, 0-d tensors
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def flatten_results(raw: dict) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` section as ``{task: {metric: value}}`` (``,none`` dropped, ``_stderr`` kept)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (raw.get("results") or {}).items():
        flat: dict[str, float] = {}
        for key, value in metrics.items():
            if key == "alias" or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric},{filt}"
            v = _clean(value)
            if v is not None:
                flat[name] = v
        n = (raw.get("n-samples") or {}).get(task)
        if isinstance(n, dict) and "effective" in n:
            flat["samples"] = int(n["effective"])
        out[task] = flat
    return out


def run_lm_eval(model, tokenizer, tasks: list[str] | tuple[str, ...] | None = None,
                include_path: str | os.PathLike | None = None, limit: int | float | None = None,
                batch_size: int = 8, num_fewshot: int | None = None, seed: int = 0,
                bootstrap_iters: int = 100, progress: bool = False) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` (a loaded HF causal LM, on any device) on lm-eval ``tasks``, offline.

    ``tasks`` defaults to :data:`LOCAL_TASKS`; names may be glob patterns
    (``gqaprune_*``). ``include_path`` is a folder (or file) of extra task
    YAMLs. Returns ``{task: {metric: value, ...}}`` with ``<metric>_stderr``
    entries where lm-eval computed them and ``samples`` (documents evaluated).
    Seeds python, numpy, torch and few-shot sampling from ``seed`` (the
    caller's global RNG states are restored afterwards). The model is evaluated
    in eval mode on its own device; its train/eval mode is restored afterwards.
    ``progress`` shows lm-eval's progress bars.
    """
    tasks = list(LOCAL_TASKS if not tasks else tasks)
    bad = [t for t in tasks if not isinstance(t, str) or not t.strip()]
    if bad:
        raise InputError(f"lm-eval task names must be non-empty strings, got {bad!r}")
    if limit is not None and (isinstance(limit, bool) or limit <= 0):
        raise InputError(f"lm-eval limit must be a positive number (count, or fraction < 1), got {limit!r}")
    if batch_size < 1:
        raise InputError(f"lm-eval batch_size must be >= 1, got {batch_size}")
    paths = _include_paths(include_path)

    was_training = getattr(model, "training", False)
    with _offline(), _quiet(), _no_task_progress(progress), _rng_restored():
        import lm_eval

        tm = _task_manager(tasks, paths)
        tasks = _expand(tm, tasks)
        loaded = _load_tasks(tm, tasks)
        lm = _make_lm(model, tokenizer, batch_size, progress)
        try:
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(loaded["tasks"].values()) if not loaded["groups"] else tasks,
                task_manager=tm,
                num_fewshot=num_fewshot,
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        finally:
            if was_training:
                model.train()
    return flatten_results(raw or {})


def primary_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """One headline number per task: ``acc`` for multiple choice, ``word_perplexity`` for rolling tasks."""
    out: dict[str, float] = {}
    for task, metrics in results.items():
        for m in _PRIMARY:
            if m in metrics:
                out[task] = metrics[m]
                break
        else:
            nums = [k for k, v in metrics.items() if not k.endswith("_stderr") and k != "samples"
                    and isinstance(v, (int, float))]
            if nums:
                out[task] = metrics[sorted(nums)[0]]
    return out


PRIMARY_METRIC = {MC_TASK: "acc", ROLLING_TASK: "word_perplexity"}
