"""SliceGPT baseline (benchmarks/peers/slicegpt.py): rotation alone keeps the logits; slicing gives the counted shapes."""

import pytest
import torch

from benchmarks.peers.slicegpt import SlicedLlamaLayer, slicegpt_param_count, slicegpt_prune
from tiny import tiny_inputs, tiny_model


def _tied_llama():
    model = tiny_model("llama")  # untied; tie the head to the embeddings as SmolLM2's are
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    return model


def _calib():
    return torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make", [lambda: tiny_model("llama"), _tied_llama], ids=["untied", "tied"])
def test_rotation_without_slicing_keeps_the_logits(make):
    model = make()
    x = tiny_inputs()
    with torch.no_grad():
        before = model(input_ids=x).logits
    rep = slicegpt_prune(model, _calib(), kept=64, batch_size=4)
    assert all(isinstance(l, SlicedLlamaLayer) for l in model.model.layers)
    with torch.no_grad():
        after = model(input_ids=x).logits
    assert (after - before).abs().max() < 1e-4
    # rotation without slicing: the rotations really are not the identity (else the check proves nothing)
    assert (model.model.layers[0].attn_shortcut_Q - torch.eye(64)).abs().max() > 0.1
    assert rep["untied_lm_head"] == (make is _tied_llama)


@pytest.mark.parametrize("make", [lambda: tiny_model("llama"), _tied_llama], ids=["untied", "tied"])
def test_slicing_shapes_and_hand_counted_parameters(make):
    model = make()
    rep = slicegpt_prune(model, _calib(), kept=48, batch_size=4)
    with torch.no_grad():
        logits = model(input_ids=tiny_inputs()).logits
    assert logits.shape == (2, 12, 96) and torch.isfinite(logits).all()
    d, full, v, q, kv, inter, n = 48, 64, 96, 8 * 16, 2 * 16, 96, 3
    layer = d * (q + kv + kv) + q * d + 2 * d * inter + inter * d  # q/k/v in, o out, gate/up in, down out
    shortcuts = n * d * d + (n - 1) * d * d + d * full  # attention, MLP (the last MLP shortcut is d x full)
    hand = v * d + v * full + n * layer + inter * (full - d) + shortcuts  # embeddings, head (full), last down full
    assert rep["params"] == hand == sum(p.numel() for p in model.parameters())
    assert rep["params"] == slicegpt_param_count(model.config, d)
    assert rep["shortcut_params"] == shortcuts
    last = model.model.layers[-1]
    assert model.model.embed_tokens.weight.shape == (v, d) and model.lm_head.weight.shape == (v, full)
    assert last.mlp.down_proj.weight.shape == (full, inter) and last.mlp_shortcut_Q.shape == (d, full)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (q, d)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (d, inter)
