"""runtime.device_map: auto (gqaprune.io.placement), on this CPU-only machine.

A small ``max_memory: {cpu: ...}`` makes accelerate put part of builtin:tiny-llama on disk, so the load really
goes through accelerate's offload hooks; the run must then prune exactly what the same recipe prunes without
device_map. A model dispatched with hooks but nothing offloaded stands in for the several-GPU placement (the
hooks are the same; only the devices differ), and must prune through its hooks like a plain model.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gqaprune.builtin.tiny import resolve_builtin
from gqaprune.errors import InputError
from gqaprune.io.checkpoint import load_pretrained
from gqaprune.io.placement import load_placed, offloaded_bytes, placement_kwargs
from gqaprune.recipe import Runtime, parse_recipe
from tiny import write_recipe

MODEL = "builtin:tiny-llama"  # 4 layers, hidden 384, tied embeddings, 30 MB in fp32
# 24 MB: embeddings and two layers fit the CPU budget, two layers, the final norm and the rotary table go to disk
SPREAD = Runtime(device_map="auto", max_memory={"cpu": "24MB"})
NO_EVAL = "eval: {perplexity: null, lm_eval: {tasks: []}}\n"
CALIB = "{samples: 8, seq_len: 32, batch_size: 4}"
STAGES = ("  - {type: layer_drop, num_layers: 1}\n"
          "  - {type: head_prune, unit: query_head, prune_ratio: 0.5, score: taylor}\n"
          "  - {type: neuron_prune, prune_ratio: 0.25, align: 8}\n")  # least-squares repair (the default)


@pytest.fixture(scope="module")
def folder():
    return resolve_builtin(MODEL, progress=False)


def _ids(n: int = 24) -> torch.Tensor:
    return (torch.arange(2 * n).reshape(2, n) * 37) % 2048


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids(), use_cache=False).logits


def test_load_offloads_to_disk_then_materialises(folder, tmp_path):
    off = tmp_path / "off"
    raw = load_pretrained(folder, dtype=torch.float32, placement=placement_kwargs(SPREAD, off))
    assert set(raw.hf_device_map.values()) == {"cpu", "disk"}, raw.hf_device_map
    assert offloaded_bytes(raw) > 0  # weights behind accelerate's hooks, not in the modules

    model, load_map = load_placed(folder, torch.float32, SPREAD, tmp_path / "off2")
    assert load_map == raw.hf_device_map
    assert offloaded_bytes(model) == 0 and not hasattr(model, "hf_device_map")
    assert not [n for n, m in model.named_modules() if hasattr(m, "_hf_hook")]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert not (tmp_path / "off2").exists()  # the offload folder lives only while loading
    plain = load_pretrained(folder, dtype=torch.float32)
    for name, p in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name
    torch.testing.assert_close(_logits(model), _logits(plain), atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(raw), _logits(plain), atol=1e-5, rtol=0)  # forward through the hooks


def test_offloaded_run_prunes_like_the_plain_run(tmp_path):
    from gqaprune.runner import run

    spread = "runtime: {threads: 1, device_map: auto, max_memory: {cpu: 24MB}, offload_folder: %s}\n"
    a = write_recipe(tmp_path, MODEL, STAGES, out="out_a", calibration=CALIB, eval_block=NO_EVAL,
                     runtime=spread % (tmp_path / "offload"), name="a.yaml")
    b = write_recipe(tmp_path, MODEL, STAGES, out="out_b", calibration=CALIB, eval_block=NO_EVAL,
                     runtime="runtime: {threads: 1}\n", name="b.yaml")
    rep_a, rep_b = run(str(a), progress=False), run(str(b), progress=False)
    placed = rep_a["runtime"]["device_map"]
    assert "disk" in placed.values() and "cpu" in placed.values(), placed
    assert "device_map" not in rep_b["runtime"]
    assert rep_a["roundtrip"]["ok"] and rep_a["shapes_after"] == rep_b["shapes_after"]
    assert [s["type"] for s in rep_a["stages"]] == ["layer_drop", "head_prune", "neuron_prune"]

    out_a, out_b = tmp_path / "out_a", tmp_path / "out_b"
    wa, wb = load_file(out_a / "model.safetensors"), load_file(out_b / "model.safetensors")
    assert sorted(wa) == sorted(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0, msg=name)
    stock_a = AutoModelForCausalLM.from_pretrained(out_a)  # uniform shapes: stock transformers reloads it
    stock_b = AutoModelForCausalLM.from_pretrained(out_b)
    assert json.loads((out_a / "config.json").read_text())["num_hidden_layers"] == 3
    torch.testing.assert_close(_logits(stock_a.eval()), _logits(stock_b.eval()), atol=1e-5, rtol=0)
    # nothing left behind: the recipe's offload folder is kept but emptied, no temporary folder beside the output
    assert list((tmp_path / "offload").iterdir()) == []
    assert not [p.name for p in tmp_path.iterdir() if ".gqaprune-" in p.name]


def test_pruning_through_accelerate_hooks(folder):
    """Several GPUs without offload: every block keeps its weights and an accelerate hook. Forced hooks on one
    CPU give the same hooks; Taylor's backward, the statistics hooks, surgery and repair go through them."""
    from accelerate import dispatch_model

    from gqaprune.arch.adapter import resolve_adapter
    from gqaprune.context import RunContext
    from gqaprune.stages import build_stage

    # global: scores compared across layers; hidden_prune: embeddings, norms and every matrix edited in place
    stages = (STAGES.replace("align: 8}", "align: 8, allocation: global}")
              + "  - {type: hidden_prune, prune_ratio: 0.25, align: 8}\n")
    recipe = parse_recipe(f"model: {MODEL}\ncalibration: {CALIB}\nstages:\n{stages}")
    calib = torch.randint(0, 2048, (8, 32), generator=torch.Generator().manual_seed(0))
    blocks = ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"] + [f"model.layers.{i}" for i in range(4)]
    weights = []
    for hooked in (False, True):
        model = load_pretrained(folder, dtype=torch.float32)
        if hooked:
            dispatch_model(model, device_map=dict.fromkeys(blocks, "cpu"), main_device="cpu", force_hooks=True)
            assert hasattr(model.model.layers[3], "_hf_hook")
        adapter = resolve_adapter("auto", model.config.architectures)
        ctx = RunContext(model=model, adapter=adapter, tokenizer=None, recipe=recipe, calib=calib, progress=False)
        torch.manual_seed(0)
        for st in recipe.stages:
            build_stage(st).apply(ctx)
        if hooked:  # the blocks kept their hooks through layer_drop and surgery
            assert all(hasattr(layer, "_hf_hook") for layer in ctx.model.model.layers)
        weights.append((ctx.model.state_dict(), _logits(ctx.model)))
    (plain_sd, plain_logits), (hooked_sd, hooked_logits) = weights
    assert {k: v.shape for k, v in plain_sd.items()} == {k: v.shape for k, v in hooked_sd.items()}
    for name, p in plain_sd.items():
        torch.testing.assert_close(hooked_sd[name], p, atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(hooked_logits, plain_logits, atol=1e-5, rtol=0)


BASE = f"model: {MODEL}\nstages:\n  - {{type: layer_drop, num_layers: 1}}\n"


@pytest.mark.parametrize("text, message", [
    (BASE + "runtime: {device_map: balanced}\n", r"runtime.device_map: Input should be 'auto' \(got 'balanced'\)"),
    (BASE + "runtime: {device_map: auto, max_memory: {gpu: 2GiB}}\n",
     "max_memory: unknown device 'gpu'; use GPU indices 0, 1, ..., cpu or disk"),
    (BASE + "runtime: {device_map: auto, max_memory: {cpu: lots}}\n", "max_memory.cpu: 'lots' is not a size"),
    (BASE + "runtime: {max_memory: {cpu: 2GiB}}\n", "max_memory is used only with device_map: auto"),
    (BASE + "runtime: {offload_folder: offdir}\n", "offload_folder is used only with device_map: auto"),
    (BASE + "runtime: {device_map: auto}\ncalibration: {pipeline: layerwise}\n",
     "runtime.device_map: auto needs calibration.pipeline: in_memory"),
    (BASE + "  - {type: recover, steps: 2}\nruntime: {device_map: auto}\n",
     r"stages\[1\] recover is not available with runtime.device_map: auto"),
    (BASE + "  - {type: awq}\nruntime: {device_map: auto}\n",
     r"stages\[1\] awq is not available with runtime.device_map: auto"),
])
def test_validate_errors(text, message):
    with pytest.raises(InputError, match=message) as err:
        parse_recipe(text)
    assert "\n" not in str(err.value)  # one line


def test_accepted_placements():
    rt = parse_recipe(BASE + "runtime: {device_map: auto, max_memory: {0: 70GiB, '1': 70GiB, cpu: 200GiB}}\n").runtime
    assert rt.max_memory == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}  # YAML '1' is GPU 1, as accelerate wants
    assert parse_recipe(BASE).runtime.device_map is None


def test_plan_compares_with_the_spread_budget():
    """plan/validate measure a device_map run against the GPUs max_memory names plus RAM (where cpu/disk
    modules end up), not against one device."""
    import psutil

    from gqaprune.io.placement import placement_budget

    ram = psutil.virtual_memory().total
    two = Runtime(device_map="auto", max_memory={0: "1GiB", 1: 2 * 2**30, "cpu": "24MB", "disk": "100GB"})
    assert placement_budget(two) == ("device_map: auto over 2 GPU(s) and RAM", 3 * 2**30 + ram)
    assert placement_budget(SPREAD) == ("device_map: auto, RAM", ram)


def test_a_gpu_this_machine_lacks_is_a_one_line_error(folder, tmp_path):
    if torch.cuda.device_count() > 3:
        pytest.skip("this machine has GPU 3")
    with pytest.raises(InputError, match=r"runtime.max_memory names GPU 3, but this machine has \d GPU\(s\)"):
        load_placed(folder, torch.float32, Runtime(device_map="auto", max_memory={3: "1GiB"}), tmp_path / "off")
    assert not (tmp_path / "off").exists()


def test_disk_weights_that_do_not_fit_in_ram_are_a_one_line_error(folder, tmp_path, monkeypatch):
    import psutil

    class Tiny:  # 1 MB of RAM left: less than the two layers accelerate put on disk
        available = 2**20

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny)
    with pytest.raises(InputError, match=r"runtime.device_map: 0.0\d GiB of weights were placed on disk, but the "
                                         r"pruning stages need them in RAM \(0.00 GiB available\)"):
        load_placed(folder, torch.float32, SPREAD, tmp_path / "off")
    assert not (tmp_path / "off").exists()
