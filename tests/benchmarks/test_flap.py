"""FLAP's bias compensation (benchmarks/peers/flap.py): a pruned projection keeps its mean output."""

import torch

from benchmarks.peers import flap
from benchmarks.peers.input_stats import projection_input_stats
from gqaprune.arch.adapter import resolve_adapter
from tiny import tiny_model


def _mean_output(model, module, calib) -> torch.Tensor:
    outs = []
    handle = module.register_forward_hook(lambda m, a, out: outs.append(out.detach().reshape(-1, out.shape[-1])))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    handle.remove()
    return torch.cat(outs).mean(0)  # (hidden,)


def _setup():
    model = tiny_model("llama")  # 8 query / 2 KV heads of 16, MLP 96, hidden 64
    adapter = resolve_adapter("auto", model.config.architectures)
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    return model, adapter, calib, projection_input_stats(model, calib)


def test_flap_bias_keeps_the_mean_output_of_o_proj_without_a_group():
    # layer 0 reads the embeddings and its heads are independent: the kept heads' outputs do not change, so
    # the o_proj mean output is kept only if the bias adds the removed group's mean contribution
    model, adapter, calib, stats = _setup()
    o = model.model.layers[0].self_attn.o_proj
    before = _mean_output(model, o, calib)
    flap._compress(model, adapter, 0, [1], [], stats, g=4, hd=16)
    o = model.model.layers[0].self_attn.o_proj
    assert o.weight.shape == (64, 64) and o.bias is not None
    with_bias = (_mean_output(model, o, calib) - before).abs().max()
    o.bias = None  # without the compensation the mean moves: the check can fail
    without = (_mean_output(model, o, calib) - before).abs().max()
    assert with_bias < 1e-3 * without


def test_flap_bias_keeps_the_mean_output_of_down_proj_without_channels():
    model, adapter, calib, stats = _setup()
    before = _mean_output(model, model.model.layers[0].mlp.down_proj, calib)
    flap._compress(model, adapter, 0, [], list(range(0, 80, 2)), stats, g=4, hd=16)
    down = model.model.layers[0].mlp.down_proj
    assert down.weight.shape == (64, 56)
    with_bias = (_mean_output(model, down, calib) - before).abs().max()
    down.bias = None
    without = (_mean_output(model, down, calib) - before).abs().max()
    assert with_bias < 1e-3 * without
