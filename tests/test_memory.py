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


def _estimate(stages: str, calibration: str = "{samples: 4, seq_len: 16, batch_size: 2}",
              evaluation: str = "{seq_len: 16, batch_size: 1}"):
    # by default a small evaluation batch, so the stages (not the logits at the run's ends) set the peak
    recipe = parse_recipe(f"model: x\noutput: o\ncalibration: {calibration}\n"
                          f"eval: {{perplexity: {evaluation}}}\nstages:\n{stages}")
    config = tiny_config("llama")
    config.architectures = ["LlamaForCausalLM"]
    adapter = resolve_adapter("llama", None)
    return memory.estimate(recipe, config, adapter, simulate(recipe, config, adapter), 4)


def test_weights_and_grams_to_the_byte():
    est = _estimate("  - {type: neuron_prune, prune_ratio: 0.25, score: activation, align: 8, reconstruct_holdout: 0}\n")
    mem, lw = est["in_memory"].parts, est["layerwise"].parts
    assert LAYER == 39040 and mem["weights"] == (3 * LAYER + NON_LAYER) * 4 == 517888
    assert lw["weights"] == LAYER * 4 == 156160  # the sweeps hold one decoder layer, no embeddings or lm_head
    # one fp64 solve: the kept 72 x 72 block damped in place, its Cholesky factor, the right-hand side W C[:, K]
    # and the solution (64 x 72 each)
    solve = (2 * 72 * 72 + 2 * 64 * 72) * 8
    assert mem["grams"] == 3 * 96 * 96 * 4 + solve == 267264  # a down_proj Gram per layer, fp32
    assert lw["grams"] == 96 * 96 * 4 + solve == 193536  # one layer's
    assert lw["activations"] >= 2 * 4 * 16 * 64 * 4  # two streams of every calibration token's hidden state


def test_held_out_repair_adds_the_held_out_inputs_and_one_solve_matrix():
    est = _estimate("  - {type: neuron_prune, prune_ratio: 0.25, score: activation, align: 8}\n")  # holdout 0.25
    mem, lw = est["in_memory"].parts, est["layerwise"].parts
    held = 16  # one of the 4 windows of 16 tokens
    # per layer, beside its fp32 Gram: the held-out tokens' 96 down_proj inputs (fp32); the solves: the fit block,
    # the candidate's damped copy and its Cholesky factor (72 x 72), W C[:, K] and the solution (64 x 72), the
    # held-out inputs and outputs in fp64 (16 x (96 + 64)), and the fit's right-hand side (64 x 72)
    solve = (3 * 72 * 72 + 3 * 64 * 72 + held * (96 + 64)) * 8
    assert mem["grams"] == 3 * (96 * 96 + held * 96) * 4 + solve == 384512
    assert lw["grams"] == (96 * 96 + held * 96) * 4 + solve == 298496


def test_sequential_and_taylor_terms():
    est = _estimate("  - {type: head_prune, prune_ratio: 0.5, score: taylor}\n",
                    "{samples: 4, seq_len: 16, batch_size: 2, sequential: true}")
    mem = est["in_memory"].parts
    params = 3 * LAYER + NON_LAYER
    assert mem["dense_copy"] == params * 4  # the model before the stage, kept for the repair targets
    # no whole-model Grams; one layer's paired fp64 Grams (X^T X, X^T X', X'^T X'), the copy of X'^T X' the solve
    # damps, its Cholesky factor, the right-hand side and the solution (64 of 128 o_proj inputs kept, out 64)
    solve = (2 * 64 * 64 + 2 * 64 * 64) * 8
    assert mem["grams"] == (128 * 128 + 128 * 64 + 64 * 64) * 8 + solve == 360448
    lw = est["layerwise"].parts  # layer-wise: X'^T X' damped, its factor, W X^T X' and the solution; no (in, in)
    assert lw["grams"] == solve == 131072
    assert mem["gradients"] == LAYER * 4  # one tensor's gradient at a time: the largest (a layer's worth here)


@pytest.mark.parametrize("holdout,triples", [(0.25, 3), (0, 1)])
def test_hidden_repair_counts_the_dense_copy_and_the_reader_solve(holdout, triples):
    est = _estimate(f"  - {{type: hidden_prune, prune_ratio: 0.25, align: 8, reconstruct_holdout: {holdout}}}\n")
    mem = est["in_memory"].parts
    assert mem["dense_copy"] == (3 * LAYER + NON_LAYER) * 4  # the model before slicing
    # 48 of 64 channels kept; the fp64 triple X^T X, X^T X', X'^T X' (with held-out windows also the held-out and
    # the fitting triples), the damped 48 x 48 block and its factor, and for the widest reader (q_proj, 128 rows;
    # the untied head has 96) its weight (128 x 64), W_K, the right-hand side and the solution (128 x 48 each)
    triple = 64 * 64 + 64 * 48 + 48 * 48
    assert mem["grams"] == (triples * triple + 2 * 48 * 48 + 128 * 64 + 3 * 128 * 48) * 8


def test_layer_drop_repair_solves_one_run_with_no_layer_loaded():
    # the layer-wise peak of a repaired drop is its solve: C (96 x 96 MLP inputs) widened to fp64 and damped in
    # place, its Cholesky factor, X^T D (96 x 64) in fp32 and fp64, the fp64 correction; no decoder layer loaded
    solve = (2 * 96 * 96 + 2 * 96 * 64) * 8 + 96 * 64 * 4
    lw = _estimate("  - {type: layer_drop, num_layers: 1}\n")["layerwise"]
    assert lw.peak_stage == "0:layer_drop" and lw.parts["weights"] == 0 and lw.parts["grams"] == solve == 270336
    # two dropped runs: the first run's correction E (64 x 96 fp32) is held while the second is solved
    lw = _estimate("  - {type: layer_drop, num_layers: 2, protect_last: 0}\n")["layerwise"]
    assert lw.parts["grams"] == solve + 64 * 96 * 4
    # without repair the drop's sweeps hold one layer and no Gram
    lw = _estimate("  - {type: layer_drop, num_layers: 1, reconstruct: none}\n")["layerwise"]
    assert lw.parts["weights"] == LAYER * 4 and lw.parts["grams"] == 0


def test_the_ends_hold_three_fp32_logits_of_the_larger_batch_and_the_evaluation_stream():
    est = _estimate("  - {type: neuron_prune, prune_ratio: 0.25, score: activation, align: 8}\n",
                    evaluation="{seq_len: 64, batch_size: 8, max_tokens: 2048}")
    lw = est["layerwise"]
    assert lw.peak_stage == "ends"
    streams = max(2 * 64 * 64 * 4, 2048 * 64 * 4)  # two calibration streams (64 tokens) or the 2,048 evaluation tokens
    batch = 2 * 16 * (4 * 64 + 2 * 96) * 4 + 2 * 16 * 8 * 16 * 4  # a calibration batch's residuals, MLP, scores
    logits = 8 * 64 * 96 * 4 * 3  # the evaluation batch (512 tokens > 32) x vocab 96, fp32, three buffers
    assert lw.parts["activations"] == streams + batch + logits == 1187840
    assert lw.parts["weights"] == (96 * 64 + 64) * 4  # the lm_head and final norm (> embeddings), no decoder layer


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
