"""Lazy access to a model folder's safetensors and a streaming writer of output shards.

The model being pruned layer-wise is a *shell*: the stock class built without allocating its
parameters (accelerate's init_empty_weights: parameters on the meta device, buffers such as the
rotary frequencies on the CPU). Non-layer tensors (embeddings, final norm, lm_head) are loaded
once; a decoder layer's tensors are read from disk only when that layer is processed
(``materialize_layer``) and dropped back to the meta device afterwards (``release_layer``), so at
most one decoder layer holds real weights at any time.
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


def load_non_layer(shell: nn.Module, adapter: Adapter, weights: SafetensorsFolder, dtype: torch.dtype) -> None:
    """Embeddings, final norm, lm_head (everything outside the decoder layers) onto the CPU."""
    prefix = f"{adapter.model.layers}."
    names = [n for n in weights.file_of if not n.startswith(prefix)]
    for name, t in weights.read(names).items():
        _set_tensor(shell, name, t, dtype)
    if getattr(shell.config, "tie_word_embeddings", False):
        shell.tie_weights()
    missing = [n for n, p in shell.named_parameters() if p.device.type == "meta" and not n.startswith(prefix)]
    if missing:
        raise InputError(f"'{weights.folder}': the weights have no tensor for {', '.join(missing)}")


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
