"""Stages on a model whose sublayer outputs are normalised before the residual add (Gemma3: adapter roles
post_attn_output_norm and post_mlp_output_norm): what is refused at validate, what resolves differently,
and that the least-squares repair of o_proj / down_proj stays exact through the output norm."""

import copy

import pytest
import torch

from gqaprune.arch.adapter import decoder_layers, get_module, model_shapes, resolve_adapter
from gqaprune.context import RunContext
from gqaprune.errors import InputError
from gqaprune.plan import simulate
from gqaprune.recipe import HeadPruneStage, LayerDropStage, NeuronPruneStage, Recipe
from gqaprune.stages.head_prune import HeadPrune
from gqaprune.stages.layer_drop import LayerDrop
from gqaprune.stages.neuron_prune import NeuronPrune
from tiny import tiny_inputs, tiny_model


def _ctx(model, stage: dict):
    recipe = Recipe(model="x", output="o", stages=[stage])
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    return RunContext(model=model, adapter=resolve_adapter("auto", model.config.architectures), tokenizer=None,
                      recipe=recipe, calib=calib, progress=False)


def _plan(family, stage: dict, **overrides):
    model = tiny_model(family, **overrides)
    recipe = Recipe(model="x", output="o", stages=[stage])
    return simulate(recipe, model.config, resolve_adapter("auto", model.config.architectures))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_gemma3_adapter_declares_the_output_norms():
    a = resolve_adapter("auto", ["Gemma3ForCausalLM"])
    assert (a.layer.post_attn_output_norm, a.layer.post_mlp_output_norm) == ("post_attention_layernorm",
                                                                            "post_feedforward_layernorm")
    assert a.layer.post_attention_norm == "pre_feedforward_layernorm"  # the MLP's input norm
    assert (a.norm.weight_offset, a.embedding.scale) == (1, "sqrt_hidden")


def test_layer_drop_least_squares_given_explicitly_is_a_validate_error():
    stage = {"type": "layer_drop", "num_layers": 1, "reconstruct": "least_squares"}
    msg = (r"stages\[0\] layer_drop: reconstruct: least_squares is not valid here: adapter 'gemma3' declares "
           r"post_mlp_output_norm \(post_feedforward_layernorm\): the MLP output is normalised before the residual "
           r"add, so refitting mlp.down_proj cannot write the dropped layers' residual update; use reconstruct: none")
    with pytest.raises(InputError, match=msg):
        _plan("gemma3", stage, num_hidden_layers=4)
    model = tiny_model("gemma3", num_hidden_layers=4)
    with pytest.raises(InputError, match=r"^layer_drop: reconstruct: least_squares is not valid here"):
        LayerDrop(LayerDropStage(**stage)).apply(_ctx(model, stage))
    assert len(decoder_layers(model, _ctx(model, stage).adapter)) == 4  # refused before any surgery
    _plan("llama", stage, num_hidden_layers=4)  # no output norm: valid


def test_layer_drop_default_reconstruct_resolves_to_none_with_a_note():
    stage = {"type": "layer_drop", "num_layers": 1}
    plans = _plan("gemma3", stage, num_hidden_layers=4)
    assert any(n.startswith("reconstruct resolves to none: adapter 'gemma3' declares post_mlp_output_norm")
               for n in plans[1].notes)
    assert not any("reconstruct resolves" in n for n in _plan("llama", stage, num_hidden_layers=4)[1].notes)

    ids = tiny_inputs()
    default, plain = tiny_model("gemma3", num_hidden_layers=4), tiny_model("gemma3", num_hidden_layers=4)
    rep = LayerDrop(LayerDropStage(**stage)).apply(_ctx(default, stage))
    LayerDrop(LayerDropStage(**stage, reconstruct="none")).apply(_ctx(plain, stage))
    assert rep["reconstruct"] == "none" and rep["repairs"] == [] and "post_mlp_output_norm" in rep["note"]
    assert torch.equal(_logits(default, ids), _logits(plain, ids))
    assert default.config.layer_types == [["sliding_attention", "sliding_attention", "full_attention",
                                           "sliding_attention"][i] for i in range(4)
                                          if i not in rep["dropped_layers"]]


@pytest.mark.parametrize("stage_type, score", [("head_prune", "activation"), ("head_prune", "reconstruction"),
                                               ("head_prune", "magnitude"), ("neuron_prune", "activation"),
                                               ("neuron_prune", "magnitude")])
def test_global_allocation_with_output_scale_scores_is_a_validate_error(stage_type, score):
    stage = {"type": stage_type, "prune_ratio": 0.5, "allocation": "global", "score": score}
    if stage_type == "neuron_prune":
        stage["align"] = 16
    role = {"head_prune": "post_attn_output_norm \\(post_attention_layernorm\\)",
            "neuron_prune": "post_mlp_output_norm \\(post_feedforward_layernorm\\)"}[stage_type]
    with pytest.raises(InputError, match=rf"stages\[0\] {stage_type}: allocation: global with score: {score} is not "
                                         rf"valid here: adapter 'gemma3' declares {role}, which rescales each layer's"):
        _plan("gemma3", stage)
    _plan("llama", stage)  # no output norm: valid
    _plan("gemma3", {**stage, "allocation": "uniform"})  # one layer at a time: valid
    _plan("gemma3", {**stage, "score": "taylor"})  # a loss change compares across layers: valid


def test_head_repair_through_the_post_attention_output_norm_is_exact():
    # Query head 3 duplicates head 0 (and 7 duplicates 4) in every layer: same q rows, same KV head, the
    # shared q_norm, so the same attention output. Removing 3 and 7 (truncate keeps the first heads) and
    # refitting o_proj by least squares reproduces o_proj's output exactly; post_attention_layernorm reads
    # that output, so the whole model's logits come back. Without the refit they do not.
    torch.manual_seed(0)
    dense = tiny_model("gemma3")
    adapter = resolve_adapter("auto", dense.config.architectures)
    hd = 16
    with torch.no_grad():
        for layer in decoder_layers(dense, adapter):
            q = get_module(layer, adapter.layer.q).weight
            q[3 * hd:4 * hd] = q[0:hd]
            q[7 * hd:8 * hd] = q[4 * hd:5 * hd]
    stage = {"type": "head_prune", "unit": "query_head", "keep_q_per_kv": 3, "score": "truncate",
             "reconstruct_damp": 1e-9}
    ids = tiny_inputs()
    repaired, sliced = copy.deepcopy(dense), copy.deepcopy(dense)
    rep = HeadPrune(HeadPruneStage(**stage)).apply(_ctx(repaired, stage))
    HeadPrune(HeadPruneStage(**stage, reconstruct="none")).apply(_ctx(sliced, stage))
    assert all(l["removed_q_heads"] == [3, 7] for l in rep["layers"])
    ref = _logits(dense, ids)
    torch.testing.assert_close(_logits(repaired, ids), ref, atol=1e-5, rtol=0)
    assert float((_logits(sliced, ids) - ref).abs().max()) > 1e-2


def test_neuron_repair_through_the_post_mlp_output_norm_is_exact():
    # Channels 88..95 are 0.1 x channels 0..7 (same gate row, up row scaled): linearly dependent, and (down
    # columns scaled by 0.3) the smallest by magnitude. Removing them and refitting down_proj reproduces its output exactly;
    # post_feedforward_layernorm reads that output, so the logits come back. Without the refit they do not.
    dense = tiny_model("gemma3")
    adapter = resolve_adapter("auto", dense.config.architectures)
    dup, src = list(range(88, 96)), list(range(8))
    with torch.no_grad():
        for layer in decoder_layers(dense, adapter):
            gate, up = get_module(layer, adapter.layer.gate).weight, get_module(layer, adapter.layer.up).weight
            down = get_module(layer, adapter.layer.down).weight
            gate[dup] = gate[src]
            up[dup] = 0.1 * up[src]
            down[:, dup] *= 0.3
    stage = {"type": "neuron_prune", "keep": 88, "align": 8, "score": "magnitude", "reconstruct_damp": 1e-9}
    ids = tiny_inputs()
    repaired, sliced = copy.deepcopy(dense), copy.deepcopy(dense)
    NeuronPrune(NeuronPruneStage(**stage)).apply(_ctx(repaired, stage))
    NeuronPrune(NeuronPruneStage(**stage, reconstruct="none")).apply(_ctx(sliced, stage))
    assert [s["intermediate_size"] for s in model_shapes(repaired, adapter)] == [88, 88, 88]
    ref = _logits(dense, ids)
    torch.testing.assert_close(_logits(repaired, ids), ref, atol=1e-5, rtol=0)
    assert float((_logits(sliced, ids) - ref).abs().max()) > 1e-3


def test_awq_is_refused_for_a_family_whose_adapter_has_no_awq_section():
    with pytest.raises(InputError, match=r"stages\[1\] awq: AutoAWQ cannot quantize what the earlier stages leave: "
                                         r"architecture Gemma3ForCausalLM is not supported by the AWQ stage \(adapter "
                                         r"'gemma3' has no awq section\); supported: LlamaForCausalLM"):
        model = tiny_model("gemma3")
        recipe = Recipe(model="x", output="o", stages=[{"type": "neuron_prune", "keep": 64, "align": 64},
                                                       {"type": "awq"}])
        simulate(recipe, model.config, resolve_adapter("auto", model.config.architectures))
