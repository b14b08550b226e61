"""The score registry: every score declares what it reads, and each ranks a planted important unit first."""

import inspect
from pathlib import Path

import pytest
import torch

from gqaprune.arch.adapter import decoder_layers, get_module, head_dim_of, layer_shape, resolve_adapter
from gqaprune.recipe import HeadPruneStage, NeuronPruneStage
from gqaprune.scoring import scores as scores_pkg
from gqaprune.scoring.base import CROSS_LAYER, GRADIENT_STATISTICS, STATISTICS, LayerInput
from gqaprune.scoring.gather import gather_stats
from gqaprune.scoring.registry import CHANNEL_SCORES, HEAD_SCORES
from gqaprune.scoring.stats import calibration_loss, collect_layer_stats
from tiny import tiny_model

ALL = [("heads", n, s) for n, s in HEAD_SCORES.items()] + [("channels", n, s) for n, s in CHANNEL_SCORES.items()]
CALIB = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
LAYER, HEAD, CHANNEL = 1, 5, 17  # the planted unit: query head 5 (in KV group 1), MLP channel 17 of layer 1


@pytest.mark.parametrize("axis,name,score", ALL)
def test_every_score_declares_consistent_needs(axis, name, score):
    assert score.name == name and score.axis == axis
    assert score.needs <= STATISTICS
    assert score.needs_gradients == bool(score.needs & GRADIENT_STATISTICS)
    # layer-local: computable from one layer's inputs, so neither the loss's gradients nor whole-model ablations
    assert score.layer_local == (not score.needs_gradients and "ablation" not in score.needs)
    assert score.cross_layer in CROSS_LAYER


def test_recipe_offers_exactly_the_registered_scores():
    assert HeadPruneStage.model_fields["score"].annotation.__args__ == tuple(HEAD_SCORES)
    assert NeuronPruneStage.model_fields["score"].annotation.__args__ == tuple(CHANNEL_SCORES)


def test_a_score_is_one_file_under_scores():
    files = {p.stem for p in Path(scores_pkg.__file__).parent.glob("*.py")} - {"__init__"}
    registered = {Path(inspect.getfile(type(s))).stem for s in [*HEAD_SCORES.values(), *CHANNEL_SCORES.values()]}
    assert registered == files  # no score defined elsewhere, no file under scores/ left out of the registry
    for s in [*HEAD_SCORES.values(), *CHANNEL_SCORES.values()]:
        assert s.name in Path(inspect.getfile(type(s))).stem.replace("seeded_", "")  # file named after its score


# -- a planted important unit --------------------------------------------------------------------


def _planted_model(axis: str):
    """Layer LAYER with one live unit: every other query head's o columns (or MLP channel's up row and down
    column) are zero, so removing any other unit changes nothing. The live unit's sign is chosen so that it
    lowers the calibration loss: removing it is measurably worse (ablation is a signed loss change)."""
    best = None
    for sign in (1.0, -1.0):
        model = tiny_model("llama")
        adapter = resolve_adapter("auto", model.config.architectures)
        layer = decoder_layers(model, adapter)[LAYER]
        hd = head_dim_of(model.config, adapter)
        with torch.no_grad():
            if axis == "heads":
                o = get_module(layer, adapter.layer.o).weight  # (hidden, n_q * hd)
                keep = o[:, HEAD * hd:(HEAD + 1) * hd].clone()
                o.zero_()
                o[:, HEAD * hd:(HEAD + 1) * hd] = sign * 10 * keep
            else:
                up, down = get_module(layer, adapter.layer.up).weight, get_module(layer, adapter.layer.down).weight
                keep_up, keep_down = up[CHANNEL].clone(), down[:, CHANNEL].clone()
                up.zero_(), down.zero_()
                up[CHANNEL], down[:, CHANNEL] = keep_up, sign * 10 * keep_down
        loss = calibration_loss(model, CALIB, 4)
        if best is None or loss < best[0]:
            best = (loss, model, adapter)
    return best[1], best[2]


def _layer_input(model, adapter, stats, unit="query_head"):
    layer = decoder_layers(model, adapter)[LAYER]
    hd = head_dim_of(model.config, adapter)
    shape = layer_shape(layer, adapter, hd)
    return LayerInput(model, adapter, LAYER, layer, stats, shape["num_attention_heads"], shape["num_key_value_heads"],
                      hd, shape["intermediate_size"], unit=unit, taylor_mix=0.5,
                      generator=lambda salt: torch.Generator().manual_seed(salt))


@pytest.mark.parametrize("name", [n for n in HEAD_SCORES if n not in ("random", "truncate")])
def test_head_score_ranks_the_planted_head_and_its_group_first(name):
    model, adapter = _planted_model("heads")
    score = HEAD_SCORES[name]
    for unit in ("query_head", "group"):
        stats = gather_stats(score.needs, model, adapter, CALIB, axis="heads", unit=unit, batch_size=4,
                             progress=False)
        q, kv = score.compute(_layer_input(model, adapter, stats, unit))
        group_scores = q.reshape(2, 4).sum(1) + kv
        assert int(torch.argmax(group_scores)) == 1, (unit, group_scores)
        if unit == "query_head":
            assert int(torch.argmax(q)) == HEAD and float(q[HEAD]) > 0, q


@pytest.mark.parametrize("name", [n for n in CHANNEL_SCORES if n != "random"])
def test_channel_score_ranks_the_planted_channel_first(name):
    model, adapter = _planted_model("channels")
    score = CHANNEL_SCORES[name]
    stats = gather_stats(score.needs, model, adapter, CALIB, axis="channels", fire_threshold=1e-3, batch_size=4,
                         progress=False)
    s = score.compute(_layer_input(model, adapter, stats))
    assert s.shape == (96,)
    assert int(torch.argmax(s)) == CHANNEL and float(s[CHANNEL]) > float(s.sort().values[-2]), s


def test_baselines_truncate_keeps_first_and_random_is_seeded_per_layer():
    model = tiny_model("llama")
    adapter = resolve_adapter("auto", model.config.architectures)
    u = _layer_input(model, adapter, None)
    q, kv = HEAD_SCORES["truncate"].compute(u)
    assert q.argsort(descending=True).tolist() == list(range(8)) and kv.argsort(descending=True).tolist() == [0, 1]
    a, b = HEAD_SCORES["random"].compute(u), HEAD_SCORES["random"].compute(u)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    u.index = 2  # another layer draws other numbers
    assert not torch.equal(HEAD_SCORES["random"].compute(u)[0], a[0])
    assert torch.equal(CHANNEL_SCORES["random"].compute(u), CHANNEL_SCORES["random"].compute(u))


@pytest.mark.parametrize("axis,name,score", [a for a in ALL if a[2].layer_local and a[2].needs])
def test_layer_local_scores_need_only_the_layers_cached_inputs(axis, name, score):
    """A layer-local score computed from collect_layer_stats on the layer's cached inputs equals the score from
    the whole-model pass: what layer-wise execution relies on."""
    model = tiny_model("llama")
    adapter = resolve_adapter("auto", model.config.architectures)
    layer = decoder_layers(model, adapter)[LAYER]
    full = gather_stats(score.needs, model, adapter, CALIB, axis=axis, fire_threshold=1e-3, batch_size=4,
                        progress=False)
    cached = []
    handle = layer.register_forward_pre_hook(lambda m, a, k: cached.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        for b in range(0, CALIB.shape[0], 4):
            model(input_ids=CALIB[b:b + 4], use_cache=False)
    handle.remove()
    role = "o" if axis == "heads" else "down"
    rel = getattr(adapter.layer, role)
    hd = head_dim_of(model.config, adapter)
    local = collect_layer_stats(layer, cached, input_paths=[rel], head_norm_paths=[rel] if axis == "heads" else [],
                                head_dim=hd, gram="gram" in score.needs, fire_threshold=1e-3,
                                prefix=f"{adapter.model.layers}.{LAYER}.")
    assert local.tokens == full.tokens == CALIB.numel()
    got, want = score.compute(_layer_input(model, adapter, local)), score.compute(_layer_input(model, adapter, full))
    for g, w in zip(got if axis == "heads" else [got], want if axis == "heads" else [want]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
