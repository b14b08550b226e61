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

# families whose tiny model mixes sliding-window and full-attention layers: the layer-wise pipeline refuses them
MIXED_ATTENTION = ("gemma3",)
REFUSAL = r"calibration.pipeline: layerwise: the model mixes attention kinds .*sliding.*use calibration.pipeline: in_memory"


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
    assert (len(set(getattr(model.config, "layer_types", None) or [])) > 1) == (request.param in MIXED_ATTENTION)
    return request.param, folder, model.config.vocab_size


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_layerwise_equals_in_memory_sequential(source, allocation, tmp_path):
    from gqaprune.errors import InputError
    from gqaprune.plan import simulate

    family, folder, vocab = source
    calib = _calib(vocab)
    probe = _calib(vocab)[:2]
    if family in MIXED_ATTENTION:  # refused by validate (simulate), and by the pipeline itself
        model = load_pretrained(folder, dtype=torch.float32)
        adapter = resolve_adapter("auto", model.config.architectures)
        with pytest.raises(InputError, match=REFUSAL):
            simulate(_recipe(allocation, "layerwise"), model.config, adapter)
        simulate(_recipe("uniform", "in_memory"), model.config, adapter)  # the same recipe in memory is valid
        with pytest.raises(InputError, match=REFUSAL):
            prune_layerwise(_recipe(allocation, "layerwise"), folder, adapter, calib, tmp_path / "lw",
                            dtype=torch.float32, save_dtype=torch.float32, probe=probe, progress=False)
        assert not (tmp_path / "lw").exists()
        return
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


def test_streamed_perplexity_equals_in_memory(source):
    from gqaprune.evaluation.perplexity import perplexity
    from gqaprune.execution.layerwise import streamed_perplexity

    family, folder, vocab = source
    model = load_pretrained(folder, dtype=torch.float32)
    adapter = resolve_adapter("auto", model.config.architectures)
    tokens = torch.randint(3, vocab, (150,), generator=torch.Generator().manual_seed(2))
    if family in MIXED_ATTENTION:
        from gqaprune.errors import InputError

        with pytest.raises(InputError, match=REFUSAL):
            streamed_perplexity(folder, adapter, tokens, 40, 30, 2, torch.float32)
        return
    want = perplexity(model, tokens, seq_len=40, stride=30, batch_size=2, progress=False)
    got = streamed_perplexity(folder, adapter, tokens, 40, 30, 2, torch.float32)
    assert got["tokens"] == want["tokens"] and got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)


def test_run_layerwise_writes_a_checked_output(tmp_path):
    import json

    from gqaprune.io.checkpoint import load_pretrained as load
    from gqaprune.runner import run
    from tiny import write_recipe

    save_tiny("llama", tmp_path / "src", num_hidden_layers=4)
    recipe = write_recipe(tmp_path, tmp_path / "src", """  - {type: layer_drop, num_layers: 1}
  - {type: head_prune, prune_ratio: 0.5, score: magnitude}
  - {type: neuron_prune, prune_ratio: 0.25, score: activation, align: 8, allocation: global}
""", calibration="{samples: 8, seq_len: 32, batch_size: 4, sequential: true, pipeline: layerwise}")
    report = run(str(recipe), progress=False)
    out = tmp_path / "out"
    assert report["status"] == "ok" and report["roundtrip"]["ok"] and report["roundtrip"]["max_abs_logit_diff"] <= 1e-4
    allocator = report["pipeline"].pop("allocator")
    assert report["pipeline"] == {"kind": "layerwise", "sweeps": 4, "max_live_decoder_layers": 1}
    assert "fixed at 1 MiB" in allocator or allocator.startswith("unchanged")
    assert report["eval"]["after"]["perplexity"] > 1 and report["eval"]["before"]["perplexity"] > 1
    assert json.loads((out / "report.json").read_text())["params_after"] < report["params_before"]
    model = load(out)  # the output reloads with the ordinary loader, with the shapes the report gives
    assert len(model.model.layers) == 3 == report["shapes_after"]["num_hidden_layers"]
    assert report["shapes_after"]["hidden_size"] == model.config.hidden_size
    assert report["params_after"] == sum(p.numel() for p in model.parameters())


def test_never_more_than_one_decoder_layer_in_memory(tmp_path, monkeypatch):
    """Every read of layer tensors happens while no other decoder layer holds weights, and reads one layer;
    the whole model is never loaded."""
    import transformers

    from gqaprune.execution import weights as w

    save_tiny("qwen2", tmp_path / "src", num_hidden_layers=5)
    adapter = resolve_adapter("qwen2", None)
    seen = {"loads": 0, "most_live": 0}
    real_materialize, real_read = layerwise.materialize_layer, w.SafetensorsFolder.read

    def counting_materialize(shell, adapter, index, weights, source_index, dtype):
        assert w.live_layers(shell, adapter) == 0, "a decoder layer still holds weights when the next is read"
        layer = real_materialize(shell, adapter, index, weights, source_index, dtype)
        seen["loads"] += 1
        seen["most_live"] = max(seen["most_live"], w.live_layers(shell, adapter))
        return layer

    def one_layer_read(self, names):
        layers = {n.split(".")[2] for n in names if n.startswith("model.layers.")}
        assert len(layers) <= 1, f"one read touched layers {sorted(layers)}"
        return real_read(self, names)

    def no_whole_model(*a, **k):
        raise AssertionError("the layer-wise pipeline loaded the whole model")

    monkeypatch.setattr(layerwise, "materialize_layer", counting_materialize)
    monkeypatch.setattr(w.SafetensorsFolder, "read", one_layer_read)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", no_whole_model)
    recipe = _recipe("global", "layerwise")
    calib = _calib(96)
    out = prune_layerwise(recipe, tmp_path / "src", adapter, calib.clamp_max(95), tmp_path / "lw",
                          dtype=torch.float32, save_dtype=torch.float32, probe=calib[:2].clamp_max(95), progress=False)
    # sweeps: layer scores (5 layers), repair statistics (up to the dropped run), 2 global scoring sweeps and the
    # main sweep over the 4 kept layers
    dropped = out["stages"][0]["dropped_layers"][0]
    assert seen["loads"] == 5 + (dropped + 1) + 4 + 4 + 4
    assert seen["most_live"] == 1 and out["max_live_layers"] == 1 and out["sweeps"] == 5


def test_taylor_with_layerwise_is_a_validate_error_naming_the_alternatives():
    from gqaprune.errors import InputError

    from gqaprune.scoring.registry import CHANNEL_SCORES, HEAD_SCORES

    for stage, scores in (("head_prune", HEAD_SCORES), ("neuron_prune", CHANNEL_SCORES)):
        names = ", ".join(n for n, s in scores.items() if s.layer_local)  # the registry's layer-local scores
        assert "activation" in names and "reconstruction" in names and "taylor" not in names
        refused = {"taylor": "needs whole-model gradients", "taylor2": "needs whole-model gradients",
                   "ablation": "measures the whole model's loss"}
        for score in (n for n in refused if n in scores):
            text = (f"model: x\noutput: o\ncalibration: {{pipeline: layerwise}}\n"
                    f"stages:\n  - {{type: {stage}, prune_ratio: 0.5, score: {score}}}\n")
            with pytest.raises(InputError, match=f"score {score} {refused[score]}.*use a layer-local score: {names} "):
                parse_recipe(text)
        for score in (n for n, s in scores.items() if s.layer_local):  # every layer-local score is accepted
            text = (f"model: x\noutput: o\ncalibration: {{pipeline: layerwise}}\n"
                    f"stages:\n  - {{type: {stage}, prune_ratio: 0.5, score: {score}, allocation: global}}\n")
            assert parse_recipe(text).stages[0].score == score
    by_importance = ("model: x\noutput: o\ncalibration: {pipeline: layerwise}\nstages:\n"
                     "  - {type: head_prune, prune_ratio: 0.5, score: activation, allocation: by_layer_importance}\n")
    with pytest.raises(InputError, match="allocation by_layer_importance is not available with calibration.pipeline: "
                                         "layerwise; use uniform or global"):
        parse_recipe(by_importance)
    ok = "model: x\noutput: o\ncalibration: {pipeline: layerwise}\nstages:\n  - {type: head_prune, prune_ratio: 0.5, score: activation}\n"
    assert parse_recipe(ok).calibration.pipeline == "layerwise"
    assert parse_recipe(ok.replace("pipeline: layerwise", "samples: 8")).calibration.pipeline == "in_memory"
    with pytest.raises(InputError, match="recover needs the whole model and cannot run with calibration.pipeline: "
                                         "layerwise"):
        parse_recipe(ok + "  - {type: recover, steps: 2}\n")
    with pytest.raises(InputError, match="stages\\[0\\] hidden_prune needs the whole model"):
        parse_recipe(ok.replace("head_prune, prune_ratio: 0.5, score: activation", "hidden_prune, prune_ratio: 0.1"))


def test_validate_refuses_layerwise_on_sliding_window_layers_in_one_line(tmp_path):
    from click.testing import CliRunner

    from gqaprune.cli import main
    from tiny import write_recipe

    save_tiny("gemma3", tmp_path / "src", num_hidden_layers=4)
    stages = "  - {type: head_prune, prune_ratio: 0.5, score: magnitude}\n"
    bad = write_recipe(tmp_path, tmp_path / "src", stages, calibration="{samples: 8, pipeline: layerwise}")
    res = CliRunner().invoke(main, ["validate", str(bad)])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "mixes attention kinds ['full_attention', 'sliding_attention']" in res.output
    assert len(res.output.strip().splitlines()) == 1
    good = write_recipe(tmp_path, tmp_path / "src", stages, calibration="{samples: 8}")
    assert CliRunner().invoke(main, ["validate", str(good)]).exit_code == 0


@pytest.mark.parametrize("tied", [False, True])
def test_sweeps_never_hold_embeddings_or_lm_head(tmp_path, monkeypatch, tied):
    """While any decoder layer is loaded (pruning sweeps and the streamed read-back), the embeddings, final norm
    and lm_head are on the meta device; the output still has them (a tied head as the embeddings) and its
    streamed logits equal the reloaded model's."""
    from tiny import builtin_tokenizer, tiny_model

    from gqaprune.execution import weights as w

    tok = builtin_tokenizer()
    model = tiny_model("llama", seed=0, num_hidden_layers=4, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model.save_pretrained(str(tmp_path / "src"))
    tok.save_pretrained(str(tmp_path / "src"))
    adapter = resolve_adapter("llama", None)
    seen = {"loads": 0}
    real_materialize = layerwise.materialize_layer

    def checking_materialize(shell, adapter, index, weights, source_index, dtype):
        layer = real_materialize(shell, adapter, index, weights, source_index, dtype)
        held = w.live_non_layer(shell, adapter)
        assert not held, f"non-layer weights {held} held while decoder layer {index} is loaded"
        seen["loads"] += 1
        return layer

    monkeypatch.setattr(layerwise, "materialize_layer", checking_materialize)
    calib = _calib(len(tok))
    out = prune_layerwise(_recipe("uniform", "layerwise"), tmp_path / "src", adapter, calib, tmp_path / "lw",
                          dtype=torch.float32, save_dtype=torch.float32, probe=calib[:2], progress=False)
    streamed, most = streamed_logits(tmp_path / "lw", adapter, calib[:2], torch.float32, 3)
    assert seen["loads"] > 3 * 4 and most == 1
    saved = load_pretrained(tmp_path / "lw", dtype=torch.float32)
    names = set(w.SafetensorsFolder(tmp_path / "lw").file_of)
    assert ("lm_head.weight" in names) == (not tied) and "model.embed_tokens.weight" in names
    assert (saved.lm_head.weight.data_ptr() == saved.model.embed_tokens.weight.data_ptr()) == tied
    torch.testing.assert_close(saved.lm_head.weight, model.lm_head.weight)
    torch.testing.assert_close(saved.model.norm.weight, model.model.norm.weight)
    with torch.no_grad():
        want = saved(input_ids=calib[:2], use_cache=False).logits
    assert float((streamed - want).abs().max()) <= 1e-4 and float((out["probe_logits"] - want).abs().max()) <= 1e-4
