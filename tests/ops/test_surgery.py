"""Surgery == masking: pruned logits equal the original model with exactly those units zeroed."""

import copy

import pytest
import torch

from gqaprune.arch.adapter import decoder_layers, get_module, model_shapes, resolve_adapter
from gqaprune.ops.surgery import drop_layers, prune_channels, prune_heads
from tiny import FAMILIES, tiny_inputs, tiny_model


def _adapter(model):
    return resolve_adapter("auto", model.config.architectures)


def _mask_o_columns(model, adapter, layer_idx, heads, head_dim):
    o = get_module(decoder_layers(model, adapter)[layer_idx], adapter.layer.o)
    with torch.no_grad():
        for h in heads:
            o.weight[:, h * head_dim:(h + 1) * head_dim] = 0


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kw).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("unit", ["group", "query_head"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_head_pruning_equals_masking(family, unit, attn):
    model = tiny_model(family, attn_implementation=attn)
    adapter = _adapter(model)
    hd, g = 16, 4
    ref = copy.deepcopy(model)
    # layer 0: drop group 1 (or q heads 1 and 6); layer 2: drop group 0 (or q heads 0 and 7)
    plans = {0: {0: [0, 1, 2, 3]} if unit == "group" else {0: [0, 2, 3], 1: [4, 5, 7]},
             2: {1: [4, 5, 6, 7]} if unit == "group" else {0: [1, 2, 3], 1: [4, 5, 6]}}
    for layer_idx, keep in plans.items():
        kept = {h for qs in keep.values() for h in qs}
        _mask_o_columns(ref, adapter, layer_idx, sorted(set(range(8)) - kept), hd)
        prune_heads(model, adapter, layer_idx, keep)
    ids = tiny_inputs()
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), atol=1e-5, rtol=0)
    shapes = model_shapes(model, adapter)
    for s in shapes:
        assert s["num_attention_heads"] % s["num_key_value_heads"] == 0
    assert shapes[0]["num_key_value_heads"] == (1 if unit == "group" else 2)
    assert shapes[0]["num_attention_heads"] == (4 if unit == "group" else 6)
    assert shapes[1] == {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 96}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_with_cache_equals_without_after_head_pruning(family, attn):
    model = tiny_model(family, attn_implementation=attn)
    adapter = _adapter(model)
    prune_heads(model, adapter, 0, {1: [4, 5, 6, 7]})  # one group left in layer 0
    prune_heads(model, adapter, 1, {0: [0, 1], 1: [4, 5]})  # ratio 2 in layer 1, 4 elsewhere
    ids = tiny_inputs(batch=1, seq=6)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = model.generate(ids, use_cache=True, **kw)
        b = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_channel_pruning_equals_masking(family):
    model = tiny_model(family)
    adapter = _adapter(model)
    ref = copy.deepcopy(model)
    keep = sorted(set(range(96)) - {0, 5, 17, 40, 41, 95})
    removed = sorted(set(range(96)) - set(keep))
    down = get_module(decoder_layers(ref, adapter)[1], adapter.layer.down)
    with torch.no_grad():
        down.weight[:, removed] = 0
    prune_channels(model, adapter, 1, keep)
    ids = tiny_inputs()
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), atol=1e-5, rtol=0)
    assert model_shapes(model, adapter)[1]["intermediate_size"] == 90


def _skip_layers(model, adapter, skip):
    handles = []
    for i in skip:
        layer = decoder_layers(model, adapter)[i]

        def identity(mod, args, kwargs, out):
            return args[0] if args else kwargs["hidden_states"]

        handles.append(layer.register_forward_hook(identity, with_kwargs=True))
    return handles


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("drop", [[1, 2], [1]])
def test_layer_drop_equals_skipping(family, drop):
    # Gemma3's 4 tiny layers are sliding, sliding, full, sliding (window 4 < 12 tokens): dropping layer 1
    # shifts the full-attention layer to index 1, so a layer_types list not kept in step changes the logits.
    model = tiny_model(family, num_hidden_layers=4)
    adapter = _adapter(model)
    ref = copy.deepcopy(model)
    kept = [i for i in range(4) if i not in drop]
    _skip_layers(ref, adapter, drop)
    drop_layers(model, adapter, drop)
    ids = tiny_inputs()
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), atol=1e-5, rtol=0)
    assert model.config.num_hidden_layers == len(kept)
    assert [l.self_attn.layer_idx for l in decoder_layers(model, adapter)] == list(range(len(kept)))
    if getattr(model.config, "layer_types", None) is not None:
        assert model.config.layer_types == [ref.config.layer_types[i] for i in kept]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    ids1 = tiny_inputs(batch=1, seq=5)
    with torch.no_grad():
        assert torch.equal(model.generate(ids1, use_cache=True, **kw), model.generate(ids1, use_cache=False, **kw))
