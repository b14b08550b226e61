"""calibration.pipeline: layerwise reproduces the in-memory run with calibration.sequential: true."""

import pytest
import torch

from gqaprune.arch.adapter import resolve_adapter
from gqaprune.context import RunContext
from gqaprune.execution import layerwise
from gqaprune.execution.layerwise import prune_layerwise, streamed_logits
from gqaprune.io.checkpoint import load_pretrained
from gqaprune.recipe import parse_recipe
from gqaprune.stages import build_stage
from tiny import FAMILIES, save_tiny


def _recipe(allocation: str, pipeline: str):
    unit = "group" if allocation == "uniform" else "query_head"
    return parse_recipe(f"""
model: x
output: o
calibration: {{samples: 8, seq_len: 24, batch_size: 3, sequential: true, pipeline: {pipeline}}}
stages:
  - {{type: layer_drop, num_layers: 1, score: block_influence}}
  - {{type: head_prune, unit: {unit}, prune_ratio: 0.5, score: activation, allocation: {allocation}}}
  - {{type: neuron_prune, prune_ratio: 0.25, score: reconstruction, align: 8, allocation: {allocation}}}
""")


def _calib(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (8, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module", params=FAMILIES)
def source(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"src-{request.param}")
    model, tok = save_tiny(request.param, folder, num_hidden_layers=5)
    return request.param, folder, model.config.vocab_size


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_layerwise_equals_in_memory_sequential(source, allocation, tmp_path):
    family, folder, vocab = source
    calib = _calib(vocab)
    probe = _calib(vocab)[:2]
    # in memory, sequential
    recipe = _recipe(allocation, "in_memory")
    model = load_pretrained(folder, dtype=torch.float32)
    adapter = resolve_adapter("auto", model.config.architectures)
    ctx = RunContext(model=model, adapter=adapter, tokenizer=None, recipe=recipe, calib=calib, progress=False)
    ref = [build_stage(st).apply(ctx) for st in recipe.stages]
    # layer-wise
    out = prune_layerwise(_recipe(allocation, "layerwise"), folder, adapter, calib, tmp_path / "lw",
                          dtype=torch.float32, save_dtype=torch.float32, probe=probe, progress=False)
    assert out["max_live_layers"] == 1
    got = out["stages"]
    assert got[0]["dropped_layers"] == ref[0]["dropped_layers"]
    assert [r["repaired_layer"] for r in got[0]["repairs"]] == [r["repaired_layer"] for r in ref[0]["repairs"]]
    assert [r.get("rel_error_lsq") for r in got[0]["repairs"]] == pytest.approx(
        [r.get("rel_error_lsq") for r in ref[0]["repairs"]], rel=1e-5)
    assert [e["removed_q_heads"] for e in got[1]["layers"]] == [e["removed_q_heads"] for e in ref[1]["layers"]]
    assert [e["removed_kv_heads"] for e in got[1]["layers"]] == [e["removed_kv_heads"] for e in ref[1]["layers"]]
    assert [e["width_after"] for e in got[2]["layers"]] == [e["width_after"] for e in ref[2]["layers"]]
    # the same weights (so the same kept channels), and the same logits
    saved = load_pretrained(tmp_path / "lw", dtype=torch.float32)
    mine, theirs = saved.state_dict(), model.state_dict()
    assert mine.keys() == theirs.keys()
    for name in theirs:
        assert mine[name].shape == theirs[name].shape, name
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():
        want = model(input_ids=probe, use_cache=False).logits
        assert float((saved(input_ids=probe, use_cache=False).logits - want).abs().max()) <= 1e-4
    assert float((out["probe_logits"] - want).abs().max()) <= 1e-4
    streamed, most = streamed_logits(tmp_path / "lw", adapter, probe, torch.float32, 3)
    assert most == 1 and float((streamed - want).abs().max()) <= 1e-4
