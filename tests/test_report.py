"""Quality gates, lm-eval numbers in the report, the model card and its plots."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from gqaprune.cli import main


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from tiny import save_tiny

    folder = tmp_path_factory.mktemp("src") / "llama"
    save_tiny("llama", folder, num_hidden_layers=3)
    return folder


def _run(tmp_path, src, name, gates=""):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(
        f"model: {src}\nruntime: {{threads: 1}}\ncalibration: {{samples: 8, seq_len: 32, batch_size: 4}}\n"
        "stages:\n  - {type: layer_drop, num_layers: 1}\n  - {type: head_prune, prune_ratio: 0.5}\n"
        "eval:\n  perplexity: {max_tokens: 600, seq_len: 64}\n"
        "  lm_eval: {tasks: [gqaprune_pydoc_mc], limit: 16}\n"
        f"  gates: {{{gates}}}\n"
        f"output: {tmp_path / name}\n")
    res = CliRunner().invoke(main, ["run", str(recipe), "--quiet"])
    return res, tmp_path / name


def test_gates_pass_just_below_and_fail_just_above(tmp_path, src):
    res, out = _run(tmp_path, src, "base")
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    before, after = rep["eval"]["before"]["perplexity"], rep["eval"]["after"]["perplexity"]
    acc = rep["eval"]["lm_eval"]["after"]["gqaprune_pydoc_mc"]["acc"]
    assert 0 <= acc <= 1 and "gqaprune_pydoc_mc" in rep["eval"]["lm_eval"]["before"]
    ratio = after / before

    res, out = _run(tmp_path, src, "pass", f"max_ppl_ratio: {ratio * 1.001}, min: {{gqaprune_pydoc_mc/acc: {acc - 0.01}}}")
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "ok" and all(g["passed"] for g in rep["gates"].values())

    res, out = _run(tmp_path, src, "fail", f"max_ppl_ratio: {ratio * 0.999}")
    assert res.exit_code not in (0, 2), res.output
    assert "max_ppl_ratio" in res.output and "Traceback" not in res.output
    rep = json.loads((out / "report.json").read_text())  # the folder is kept for inspection
    assert rep["status"] == "failed" and rep["gates"]["max_ppl_ratio"]["passed"] is False
    assert (out / "README.md").read_text().startswith("# FAILED")


def test_plots_are_real_pngs_referenced_by_the_card(tmp_path, src):
    import matplotlib.image as mpimg

    res, out = _run(tmp_path, src, "plots")
    assert res.exit_code == 0, res.output
    pngs = sorted((out / "plots").glob("*.png"))
    names = {p.name for p in pngs}
    assert {"stage0_layer_scores.png", "stage1_head_importance.png", "widths_per_layer.png",
            "perplexity_per_stage.png"} <= names
    card = (out / "README.md").read_text()
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(p)
        colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
        assert len(colours) > 8, p.name  # not a blank canvas
        assert f"plots/{p.name}" in card
    for heading in ("## Summary", "## Stages", "## Shapes after", "## How to load", "## Recipe"):
        assert heading in card
