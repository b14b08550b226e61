"""The finite-logits check, quality gates and the perplexity token stream of the eval block."""

import pytest
import torch

from gqaprune.errors import CheckFailed
from gqaprune.evaluation.checks import check_finite, check_gates, perplexity_tokens
from gqaprune.recipe import EvalConfig, Gates, PerplexityEval
from tiny import tiny_inputs, tiny_model

BEFORE = {"perplexity": 10.0, "lm_eval": {"arc": {"acc": 0.50, "acc_norm": 0.625}}}
AFTER = {"perplexity": 12.0, "lm_eval": {"arc": {"acc": 0.45, "acc_norm": 0.5}}}


def test_gates_pass_and_fail_at_their_limits():
    g = check_gates(Gates(max_ppl_ratio=1.2, min={"arc/acc": 0.45}, max_drop={"arc/acc_norm": 0.125}), BEFORE, AFTER)
    assert set(g) == {"max_ppl_ratio", "min:arc/acc", "max_drop:arc/acc_norm"}
    assert g["max_ppl_ratio"]["value"] == pytest.approx(1.2) and g["max_ppl_ratio"]["passed"]
    assert g["min:arc/acc"] == {"limit": 0.45, "value": 0.45, "passed": True}
    assert g["max_drop:arc/acc_norm"] == {"limit": 0.125, "value": 0.125, "passed": True}
    g = check_gates(Gates(max_ppl_ratio=1.19, min={"arc/acc": 0.46}, max_drop={"arc/acc_norm": 0.12}), BEFORE, AFTER)
    assert [v["passed"] for v in g.values()] == [False, False, False]


def test_no_gates_and_ppl_gate_without_perplexity():
    assert check_gates(Gates(), BEFORE, AFTER) == {}
    assert check_gates(Gates(max_ppl_ratio=1.0), {}, {}) == {}  # perplexity off: nothing to compare


def test_gate_on_a_missing_metric_names_what_exists():
    with pytest.raises(CheckFailed, match=r"gate 'arc/f1': no such lm-eval result \(have: arc/acc, arc/acc_norm\)"):
        check_gates(Gates(min={"arc/f1": 0.1}), BEFORE, AFTER)


def test_check_finite_passes_and_names_the_stage_on_nan():
    model = tiny_model("llama")
    ids = tiny_inputs()
    check_finite(model, ids, "stage 0 (head_prune)")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(CheckFailed, match=r"stage 0 \(head_prune\): the model produces NaN or inf logits "
                                          r"\(\d+ values\) after this stage; nothing was written"):
        check_finite(model, ids, "stage 0 (head_prune)")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(CheckFailed, match="before any stage"):
        check_finite(model, ids, "m", "before any stage")


def test_perplexity_tokens_off_truncated_and_from_a_file(tmp_path):
    from tiny import builtin_tokenizer

    tok = builtin_tokenizer()
    assert perplexity_tokens(tok, EvalConfig(perplexity=None)) is None
    t = perplexity_tokens(tok, EvalConfig(perplexity=PerplexityEval(max_tokens=100)))
    assert t.dim() == 1 and t.numel() == 100
    src = tmp_path / "eval.txt"
    src.write_text("first paragraph of text\n\nsecond paragraph")
    t2 = perplexity_tokens(tok, EvalConfig(perplexity=PerplexityEval(source=str(src), split="all")))
    assert t2.numel() >= 2 and not torch.equal(t2[: t.numel()], t[: t2.numel()])  # read from the file, not pydoc
