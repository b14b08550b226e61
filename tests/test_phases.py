"""Progress you can see: AWQ shows a per-layer bar with the time left, and report.json gives each phase's seconds."""

from __future__ import annotations

import json

import pytest

from gqaprune.runner import run

NO_EVAL_BUT_PPL = "eval: {perplexity: {max_tokens: 300, seq_len: 64}, lm_eval: {tasks: []}, prompts: []}\n"


@pytest.fixture(scope="module")
def awq_src(tmp_path_factory):
    from tiny import save_tiny

    folder = tmp_path_factory.mktemp("src") / "llama"
    # AWQ-quantizable widths (multiples of 64); 2 layers
    save_tiny("llama", folder, hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
              head_dim=64, num_hidden_layers=2)
    return folder


def _check_phases(rep: dict, expected: set[str]) -> None:
    phases = rep["phases_seconds"]
    assert set(phases) == expected, phases
    assert all(v >= 0 for v in phases.values()), phases
    assert sum(phases.values()) <= rep["seconds_total"] + 0.05, (phases, rep["seconds_total"])  # rounding slack
    assert phases["stages"] == pytest.approx(sum(s["seconds"] for s in rep["stages"]), abs=0.01)


def test_awq_run_shows_per_layer_progress_and_phase_seconds(tmp_path, awq_src, capfd):
    from tiny import write_recipe

    recipe = write_recipe(tmp_path, awq_src, "  - {type: neuron_prune, prune_ratio: 0.25, align: 64}\n"
                          "  - {type: awq, group_size: 64, samples: 4, seq_len: 32}\n",
                          eval_block=NO_EVAL_BUT_PPL, runtime="runtime: {threads: 1}\n")
    rep = run(str(recipe), progress=True)
    err = capfd.readouterr().err.replace("\r", "\n")
    assert "gqaprune: awq: 4-bit, group size 64, 2 layers" in err
    bars = [line for line in err.splitlines() if line.startswith("AWQ:")]
    assert any("2/2 [" in line for line in bars), bars  # AutoAWQ's bar: one step per decoder layer ...
    assert any("<" in line for line in bars)  # ... with elapsed<remaining time
    _check_phases(rep, {"prepare", "load", "eval_before", "stages", "awq", "eval_after", "report"})
    assert json.loads((tmp_path / "out" / "report.json").read_text())["phases_seconds"] == rep["phases_seconds"]


def test_fp_run_phase_seconds(tmp_path, awq_src):
    from tiny import write_recipe

    recipe = write_recipe(tmp_path, awq_src, "  - {type: head_prune, prune_ratio: 0.5, unit: query_head}\n",
                          eval_block=NO_EVAL_BUT_PPL,
                          runtime="runtime: {threads: 1}\n")
    rep = run(str(recipe), progress=False)
    _check_phases(rep, {"prepare", "load", "eval_before", "stages", "save", "eval_after", "report"})
