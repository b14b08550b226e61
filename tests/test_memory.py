"""The plan's memory estimate: weights and Gram matrices to the byte on a hand-computed tiny config."""

import pytest

from gqaprune import memory
from gqaprune.arch.adapter import resolve_adapter
from gqaprune.plan import simulate
from gqaprune.recipe import parse_recipe
from tiny import tiny_config

# tiny llama (tests/tiny.py): hidden 64, MLP 96, 8 query / 2 KV heads of 16, vocab 96, 3 layers, untied
LAYER = 64 * 128 + 64 * 32 + 64 * 32 + 128 * 64 + 3 * 64 * 96 + 2 * 64  # q, k, v, o, gate/up/down, 2 norms = 39,040
NON_LAYER = 96 * 64 + 96 * 64 + 64  # embed, lm_head, final norm = 12,352


def _estimate(stages: str, calibration: str = "{samples: 4, seq_len: 16, batch_size: 2}"):
    recipe = parse_recipe(f"model: x\noutput: o\ncalibration: {calibration}\nstages:\n{stages}")
    config = tiny_config("llama")
    config.architectures = ["LlamaForCausalLM"]
    adapter = resolve_adapter("llama", None)
    return memory.estimate(recipe, config, adapter, simulate(recipe, config, adapter), 4)


def test_weights_and_grams_to_the_byte():
    est = _estimate("  - {type: neuron_prune, prune_ratio: 0.25, score: activation, align: 8}\n")
    mem, lw = est["in_memory"].parts, est["layerwise"].parts
    assert LAYER == 39040 and mem["weights"] == (3 * LAYER + NON_LAYER) * 4 == 517888
    assert lw["weights"] == (LAYER + NON_LAYER) * 4 == 205568
    solve = 5 * 96 * 96 * 8  # one fp64 solve's working set (memory.SOLVE_MATRICES matrices)
    assert mem["grams"] == 3 * 96 * 96 * 4 + solve == 479232  # a down_proj Gram per layer, fp32
    assert lw["grams"] == 96 * 96 * 4 + solve == 405504  # one layer's
    assert lw["activations"] >= 2 * 4 * 16 * 64 * 4  # two streams of every calibration token's hidden state


def test_sequential_and_taylor_terms():
    est = _estimate("  - {type: head_prune, prune_ratio: 0.5, score: taylor}\n",
                    "{samples: 4, seq_len: 16, batch_size: 2, sequential: true}")
    mem = est["in_memory"].parts
    params = 3 * LAYER + NON_LAYER
    assert mem["dense_copy"] == params * 4  # the model before the stage, kept for the repair targets
    assert mem["grams"] == 5 * 128 * 128 * 8  # no whole-model Grams; one layer's paired fp64 Grams and solve
    assert mem["gradients"] == LAYER * 4  # one tensor's gradient at a time: the largest (a layer's worth here)


def test_validate_warns_when_the_chosen_pipeline_does_not_fit(monkeypatch):
    recipe = parse_recipe("model: x\noutput: o\nstages:\n  - {type: head_prune, prune_ratio: 0.5, score: activation}\n")
    config = tiny_config("llama")
    adapter = resolve_adapter("llama", None)
    plans = simulate(recipe, config, adapter)
    est = memory.estimate(recipe, config, adapter, plans, 4)
    monkeypatch.setattr(memory, "device_memory", lambda: ("RAM", est["in_memory"].total - 1))
    lines, warning = memory.memory_lines(recipe, config, adapter, plans)
    assert "calibration.pipeline in_memory needs about" in warning and "layerwise needs about" in warning
    assert any(l.strip().startswith("in_memory") and "does NOT fit (chosen)" in l for l in lines)
    monkeypatch.setattr(memory, "device_memory", lambda: ("RAM", est["in_memory"].total))
    assert memory.memory_lines(recipe, config, adapter, plans)[1] is None
