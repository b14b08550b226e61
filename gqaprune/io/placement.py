"""``runtime.device_map: auto``: load a model with accelerate's big-model placement and make it prunable.

transformers' ``from_pretrained(device_map="auto", max_memory=..., offload_folder=...)`` asks accelerate for a
device per module (filling the GPUs in order within ``max_memory``, then the CPU, then disk) and attaches hooks
that move each module's inputs to its device. A module accelerate *offloads* (placed on "disk", or on "cpu"
while the run computes on a GPU) keeps no weights: its parameters sit on the meta device and its hook reads
them from a weights map for each forward pass and drops them afterwards. Forward passes work on such a model,
but the pruning passes do not: surgery and least-squares repair read and replace ``Linear.weight``, Taylor
reads ``param.grad`` (which would land on the hook's temporary copy), and saving reads the state dict.

So ``materialise`` reads every offloaded weight into RAM once, after loading, removes the hooks and places the
model again with those modules computed on the CPU (modules accelerate put on a GPU stay there). What spreading
buys is therefore several GPUs for one in-memory run (Taylor's backward included); cpu/disk placement only lets
the load stage a model through disk, and the pruning then needs its offloaded part in RAM.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from gqaprune.errors import InputError
from gqaprune.runtime import log

OFFLOADED = ("cpu", "disk")  # device-map values whose weights may sit behind accelerate hooks


@contextmanager
def offload_folder(runtime, default: Path):
    """The folder accelerate may write offloaded weights into, removed on exit: a fresh temporary folder inside
    ``runtime.offload_folder`` when the recipe names one, else ``default`` (beside the output; created here)."""
    if runtime.offload_folder is not None:
        parent = Path(runtime.offload_folder)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix="gqaprune-offload-", dir=parent))
        except OSError as e:
            raise InputError(f"runtime.offload_folder: cannot create a folder in '{parent}' "
                             f"({e.strerror or e})") from None
    else:
        folder = default
        folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def placement_kwargs(runtime, folder: Path) -> dict:
    """The ``from_pretrained`` arguments for the recipe's runtime block (transformers 5 names)."""
    return {"device_map": runtime.device_map, "max_memory": dict(runtime.max_memory or {}) or None,
            "offload_folder": str(folder)}


def load_placed(path, dtype, runtime, default_folder: Path) -> tuple[nn.Module, dict]:
    """(the model from ``path`` placed by accelerate within ``runtime.max_memory`` and materialised for pruning,
    the device map accelerate chose at load: {module path: GPU index | "cpu" | "disk"}). The offload folder
    lives only while loading: once materialised, no module reads from it."""
    from gqaprune.io.checkpoint import load_pretrained  # looked up at call time (tests replace it)

    _check_devices(runtime)
    with offload_folder(runtime, default_folder) as folder:
        model = load_pretrained(path, dtype=dtype, placement=placement_kwargs(runtime, folder))
        load_map = dict(getattr(model, "hf_device_map", None) or {"": "cpu"})  # none: all on one device
        _log_placement(load_map)
        materialise(model, load_map)
    return model, load_map


def load_for_run(path, dtype, device, runtime, default_folder: Path) -> tuple[nn.Module, dict | None]:
    """The model from ``path`` as the run places it: on ``device``, or spread by accelerate under
    runtime.device_map (then also the device map chosen at load; None otherwise)."""
    if runtime.device_map is None:
        from gqaprune.io.checkpoint import load_pretrained  # looked up at call time (tests replace it)

        return load_pretrained(path, dtype=dtype, device=str(device)), None
    return load_placed(path, dtype, runtime, default_folder)


def _check_devices(runtime) -> None:
    """The GPUs max_memory names exist here, and device: cpu is not contradicted (checked where the run runs:
    validate may run on another machine)."""
    import torch

    n = torch.cuda.device_count()
    named = [k for k in (runtime.max_memory or {}) if isinstance(k, int)]
    for k in named:
        if k >= n:
            raise InputError(f"runtime.max_memory names GPU {k}, but this machine has {n} GPU(s); valid devices: "
                             + ", ".join([str(i) for i in range(n)] + ["cpu", "disk"]))
    if runtime.device == "cpu" and n and (runtime.max_memory is None or named):
        raise InputError("runtime.device is cpu, but device_map: auto would place modules on the GPUs; give "
                         "max_memory with cpu and disk only, or use device: auto")


def _log_placement(load_map: dict) -> None:
    counts = {str(d): sum(1 for v in load_map.values() if v == d) for d in dict.fromkeys(load_map.values())}
    log("device_map: " + ", ".join(f"{n} module(s) on {d}" for d, n in counts.items()))


def offloaded_bytes(model: nn.Module) -> int:
    """Bytes of the parameters accelerate keeps outside their modules (on the meta device in the module)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "meta")


def _placed_on(param: str, load_map: dict):
    """The device-map value of the module holding ``param`` (the longest matching module path)."""
    owner = max((k for k in load_map if k == "" or param == k or param.startswith(k + ".")), key=len)
    return load_map[owner]


def _check_ram(model: nn.Module, load_map: dict) -> None:
    """The disk-placed weights fit in the RAM left (offloaded "cpu" weights are in RAM already)."""
    import psutil

    need = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if p.device.type == "meta" and _placed_on(n, load_map) == "disk")
    free = int(psutil.virtual_memory().available)
    if need > free:
        raise InputError(f"runtime.device_map: {need / 2**30:.2f} GiB of weights were placed on disk, but the "
                         f"pruning stages need them in RAM ({free / 2**30:.2f} GiB available); raise the GPUs' "
                         "runtime.max_memory or use calibration.pipeline: layerwise")


def materialise(model: nn.Module, load_map: dict) -> None:
    """Give every offloaded module its weights in RAM, then place the model again without offloading: modules
    on a GPU stay there, modules on cpu or disk are computed on the CPU. Without offloaded modules it does
    nothing (the hooks of a model spread over GPUs hold no weights)."""
    from accelerate import dispatch_model
    from accelerate.hooks import AlignDevicesHook, SequentialHook, remove_hook_from_submodules
    from accelerate.utils import find_tied_parameters, named_module_tensors, retie_parameters, set_module_tensor_to_device

    if offloaded_bytes(model) == 0:
        return
    _check_ram(model, load_map)
    tied = find_tied_parameters(model)  # per-module loading below would untie them
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in hook.hooks if isinstance(hook, SequentialHook) else [hook]:
            if not (isinstance(h, AlignDevicesHook) and h.offload):
                continue
            # the same tensors the hook's pre_forward would load (a fresh copy: safetensors or memmap read)
            for name, _ in named_module_tensors(module, include_buffers=h.offload_buffers,
                                                recurse=h.place_submodules, remove_non_persistent=True):
                set_module_tensor_to_device(module, name, "cpu", value=h.weights_map[name])
    remove_hook_from_submodules(model)
    retie_parameters(model, tied)
    still = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert not still, f"parameters left on the meta device after materialising: {still[:5]}"
    placed = {name: "cpu" if device in OFFLOADED else device for name, device in load_map.items()}
    if set(placed.values()) == {"cpu"}:  # one device: a plain CPU model, no hooks at all
        del model.hf_device_map
        return
    # main_device cpu: accelerate then offloads nothing (only "disk" entries, of which there are none left)
    dispatch_model(model, device_map=placed, main_device="cpu")


def placement_info(load_map: dict) -> dict:
    """The report's ``runtime.device_map`` entry: where accelerate placed each module at load."""
    return {name or "(model)": (device if isinstance(device, str) else f"cuda:{device}")
            for name, device in load_map.items()}




def placement_budget(runtime) -> tuple[str, int]:
    """(what, bytes) a ``device_map: auto`` run can hold, for ``gqaprune plan`` / ``validate``: the GPUs it may
    use (those ``max_memory`` names, at that size; every visible GPU, whole, without max_memory) plus this
    machine's RAM, which holds whatever accelerate placed on cpu or disk once it is materialised (disk is not
    counted). The estimate compared with it is the whole run's, so for a run spread over several GPUs the
    comparison is optimistic: activations and Grams sit on the GPU of their layer."""
    import psutil
    import torch

    from gqaprune.recipe import memory_size_bytes

    if runtime.max_memory is None:
        gpus = [int(torch.cuda.get_device_properties(i).total_memory) for i in range(torch.cuda.device_count())]
    else:
        gpus = [memory_size_bytes(size) for device, size in runtime.max_memory.items() if isinstance(device, int)]
    what = f"device_map: auto over {len(gpus)} GPU(s) and RAM" if gpus else "device_map: auto, RAM"
    return what, sum(gpus) + int(psutil.virtual_memory().total)
