"""The scoring pass's Gram matrices and held-out inputs (what a one-shot repair reads)."""

import torch

from gqaprune.arch.adapter import decoder_layers, get_module, resolve_adapter
from gqaprune.schema import held_out_from
from gqaprune.scoring.gather import gather_stats
from gqaprune.scoring.stats import role_paths
from tiny import tiny_model

CALIB = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))  # 8 windows of 16 tokens


def _down_inputs(model, adapter, layer: int) -> torch.Tensor:
    """(8 * 16, inter): the down projection's inputs, window after window, from one plain forward."""
    xs = []
    h = get_module(decoder_layers(model, adapter)[layer], adapter.layer.down).register_forward_pre_hook(
        lambda m, args: xs.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=CALIB, use_cache=False)
    h.remove()
    return xs[0]


def test_held_out_split_counts_whole_windows_and_never_holds_out_everything():
    assert held_out_from((8, 16), 0.25) == 6 * 16
    assert held_out_from((8, 16), 0.01) == 7 * 16  # at least one window
    assert held_out_from((2, 16), 0.9) == 16  # never all of them
    assert held_out_from((1, 16), 0.5) is None and held_out_from((8, 16), 0.0) is None


def test_gram_counts_every_token_and_the_held_out_inputs_are_those_of_the_last_windows():
    model = tiny_model("llama").eval()
    adapter = resolve_adapter("auto", model.config.architectures)
    hold = 5 * 16  # windows 5..7; with batches of 4 windows the split falls inside the second batch
    stats = gather_stats(frozenset({"gram", "input_sq"}), model, adapter, CALIB, axis="channels", batch_size=4,
                         progress=False, hold_from=hold)
    for layer in range(len(decoder_layers(model, adapter))):
        x = _down_inputs(model, adapter, layer)
        path = role_paths(adapter, layer, ["down"])["down"]
        torch.testing.assert_close(stats.gram[path], x.T @ x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.cat(stats.held[path]), x[hold:], rtol=1e-5, atol=1e-6)
    plain = gather_stats(frozenset({"gram"}), model, adapter, CALIB, axis="channels", batch_size=4, progress=False)
    assert plain.held == {}
