"""Lazy access to a model folder's safetensors and a streaming writer of output shards.

The model being pruned layer-wise is a *shell*: the stock class built without allocating its
parameters (accelerate's init_empty_weights: parameters on the meta device, buffers such as the
rotary frequencies on the CPU). Non-layer tensors are loaded only where they run: the embeddings
for embedding the calibration windows at the start, the final norm and lm_head for the logits at
the end (``load_non_layer`` with a part, ``release_non_layer``). A decoder layer's tensors are read
from disk only when that layer is processed (``materialize_layer``) and dropped back to the meta
device afterwards (``release_layer``), so at most one decoder layer holds real weights at any time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from gqaprune.arch import modeling_perlayer
from gqaprune.arch.adapter import Adapter, decoder_layers
from gqaprune.errors import InputError


class SafetensorsFolder:
    """Tensor name -> file of a folder's safetensors; reads tensors one at a time (safe_open)."""

    def __init__(self, folder):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.file_of: dict[str, Path] = {}
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise InputError(f"'{self.folder}' has no .safetensors weights (the layer-wise pipeline reads only those)")
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    self.file_of[name] = f

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.file_of if n.startswith(prefix))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each file opened once."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.file_of[n], []).append(n)
        for f, ns in by_file.items():
            with safe_open(str(f), framework="pt") as sf:
                for n in ns:
                    out[n] = sf.get_tensor(n)
        return out


def build_shell(folder, dtype: torch.dtype) -> nn.Module:
    """The model class of ``folder`` built from its config alone, every parameter on the meta device."""
    import transformers
    from accelerate import init_empty_weights

    from gqaprune.io.checkpoint import _quiet_transformers, _stock_class_for

    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    stock = _stock_class_for(config, raw)
    with _quiet_transformers(), init_empty_weights(include_buffers=False):
        shell = stock._from_config(config, dtype=dtype)
        modeling_perlayer.apply_per_layer_shapes(shell, config)
    return shell.eval()


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor, dtype: torch.dtype) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(root, name, "cpu", value=value, dtype=dtype if value.is_floating_point() else None)


def cast_via(t: torch.Tensor, via: torch.dtype | None, dtype: torch.dtype) -> torch.Tensor:
    """``t`` cast to ``via`` and then to ``dtype`` (what a run in ``via`` saving in ``dtype`` holds), skipping the
    ``via`` copy when ``via`` represents every value of ``t`` exactly (e.g. bf16 through fp32)."""
    if not t.is_floating_point():
        return t
    exact = via is None or via == t.dtype or (via in (torch.float32, torch.float64)
                                              and torch.finfo(via).bits >= torch.finfo(t.dtype).bits)
    return t.to(dtype) if exact else t.to(via).to(dtype)


def non_layer_names(shell: nn.Module, adapter: Adapter, part: str) -> list[str]:
    """The shell's parameters outside the decoder layers (tied ones under each name) in ``part``: 'embed' (the
    embeddings, all that runs before the first decoder layer), 'head' (the rest: final norm, lm_head) or 'all'."""
    layers, embed = f"{adapter.model.layers}.", f"{adapter.model.embed}."
    names = [n for n, _ in shell.named_parameters(remove_duplicate=False) if not n.startswith(layers)]
    if part == "all":
        return names
    assert part in ("embed", "head"), part
    return [n for n in names if n.startswith(embed) == (part == "embed")]


def load_non_layer(shell: nn.Module, adapter: Adapter, weights: SafetensorsFolder, dtype: torch.dtype,
                   part: str = "all", via: torch.dtype | None = None) -> None:
    """The non-layer tensors of ``part`` (non_layer_names) onto the CPU in ``dtype`` (cast through ``via`` first
    when given, so they equal the run dtype's tensors cast to ``dtype``). A tied lm_head is loaded from the
    embeddings' tensor."""
    tied = getattr(shell.config, "tie_word_embeddings", False)
    head, embed = f"{adapter.model.lm_head}.weight", f"{adapter.model.embed}.weight"
    wanted = non_layer_names(shell, adapter, part)
    if tied and head in wanted:  # the tied head is the embedding matrix (tie_weights points it there)
        wanted = [n for n in wanted if n not in (head, embed)] + [embed]
    missing = [n for n in non_layer_names(shell, adapter, "all") if n not in weights.file_of
               and not (tied and n == head)]
    if missing:
        raise InputError(f"'{weights.folder}': the weights have no tensor for {', '.join(missing)}")
    for name in wanted:  # one tensor at a time: the cast copies are transient
        t = weights.read([name])[name]
        _set_tensor(shell, name, cast_via(t, via, dtype), dtype)
    if tied:
        shell.tie_weights()


def release_non_layer(shell: nn.Module, adapter: Adapter) -> None:
    """Embeddings, final norm and lm_head back to the meta device (a tied head with its embeddings)."""
    from accelerate.utils import set_module_tensor_to_device

    for name in non_layer_names(shell, adapter, "all"):
        set_module_tensor_to_device(shell, name, "meta")


def live_non_layer(shell: nn.Module, adapter: Adapter) -> list[str]:
    """The non-layer parameters that hold real weights now."""
    params = dict(shell.named_parameters(remove_duplicate=False))
    return [n for n in non_layer_names(shell, adapter, "all") if params[n].device.type != "meta"]


def materialize_layer(shell: nn.Module, adapter: Adapter, index: int, weights: SafetensorsFolder,
                      source_index: int, dtype: torch.dtype) -> nn.Module:
    """Decoder layer ``index`` of the shell with the tensors of layer ``source_index`` read from disk."""
    layer = decoder_layers(shell, adapter)[index]
    src = f"{adapter.model.layers}.{source_index}."
    tensors = weights.read(weights.names(src))
    want = {n for n, _ in layer.named_parameters()}
    got = {n[len(src):] for n in tensors}
    if want != got:
        raise InputError(f"'{weights.folder}': layer {source_index} has tensors {sorted(got ^ want)} that do not "
                         "match the model class")
    for name, t in tensors.items():
        _set_tensor(layer, name[len(src):], t, dtype)
    return layer


def release_layer(shell: nn.Module, adapter: Adapter, index: int) -> None:
    """Back to the meta device: the layer keeps its (pruned) shapes for the config, no memory."""
    decoder_layers(shell, adapter)[index].to("meta")


def live_layers(shell: nn.Module, adapter: Adapter) -> int:
    """How many decoder layers of the shell hold real weights now."""
    return sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in decoder_layers(shell, adapter))


class ShardWriter:
    """One safetensors shard per call, written as the run goes; the index is written by ``finish``."""

    def __init__(self, folder, n_shards: int, dtype: torch.dtype):
        self.dtype = dtype  # the saved dtype; callers cast floating tensors to it
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n_shards = n_shards
        self.count = 0
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.count += 1
        assert self.count <= self.n_shards, "more shards than announced"
        name = f"model-{self.count:05d}-of-{self.n_shards:05d}.safetensors"
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(self.folder / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            self.weight_map[k] = name
            self.total += v.numel() * v.element_size()

    def finish(self) -> None:
        assert self.count == self.n_shards, f"wrote {self.count} of {self.n_shards} shards"
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
