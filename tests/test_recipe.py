"""Recipe validation: shipped recipes pass; bad input is exit 2, a message naming the problem, nothing written."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from gqaprune.cli import main
from gqaprune.errors import InputError
from gqaprune.recipe import parse_recipe

RECIPES = [pytest.param(p, marks=pytest.mark.real) if "builtin:smollm2-135m" in p.read_text() else p
           for p in sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: getattr(p, "name", None))
def test_shipped_recipe_validates(path):
    res = CliRunner().invoke(main, ["validate", str(path)])
    assert res.exit_code == 0, res.output
    assert "ok" in res.output


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny import save_tiny

    folder = tmp_path_factory.mktemp("m") / "tiny-llama"
    save_tiny("llama", folder)
    return folder


BAD = {
    "bad_yaml": ("model: [\n", "not valid YAML"),
    "unknown_key": ("model: {m}\noutput: o\nstages:\n  - type: layer_drop\n    num_layers: 1\n    bogus: 2\n",
                    "stages.0.bogus: unknown key"),
    "wrong_type": ("model: {m}\noutput: o\nstages:\n  - type: layer_drop\n    num_layers: two\n", "num_layers"),
    "empty_stages": ("model: {m}\noutput: o\nstages: []\n", "stages"),
    "stage_after_awq": ("model: {m}\noutput: o\nstages:\n  - type: awq\n  - type: layer_drop\n    num_layers: 1\n",
                        "awq must be the last stage"),
    "ratio_zero": ("model: {m}\noutput: o\nstages:\n  - type: head_prune\n    prune_ratio: 0\n", "prune_ratio"),
    "ratio_one": ("model: {m}\noutput: o\nstages:\n  - type: neuron_prune\n    prune_ratio: 1.0\n", "prune_ratio"),
    "inexact_ratio": ("model: {m}\noutput: o\nstages:\n  - type: head_prune\n    prune_ratio: 0.3\n",
                      "valid ratios: 1/2"),
    "keep_too_many_kv": ("model: {m}\noutput: o\nstages:\n  - type: head_prune\n    keep_kv_heads: 4\n",
                         "keep_kv_heads 4 is not valid"),
    "query_ratio_invalid": ("model: {m}\noutput: o\nstages:\n  - type: head_prune\n    unit: query_head\n"
                            "    prune_ratio: 0.3\n", "valid ratios: 1/4 (0.25), 1/2 (0.5), 3/4 (0.75)"),
    "protect_out_of_range": ("model: {m}\noutput: o\nstages:\n  - type: head_prune\n    prune_ratio: 0.5\n"
                             "    protect_layers: [7]\n", "protect_layers index 7 is out of range"),
    "drop_every_layer": ("model: {m}\noutput: o\nstages:\n  - type: layer_drop\n    num_layers: 3\n"
                         "    protect_first: 0\n    protect_last: 0\n", "would remove every layer"),
    "missing_model": ("model: /nonexistent/model\noutput: o\nstages:\n  - type: layer_drop\n    num_layers: 1\n",
                      "does not exist"),
    "unknown_stage": ("model: {m}\noutput: o\nstages:\n  - type: sparsify\n", "unknown stage type 'sparsify'"),
    "neuron_unaligned": ("model: {m}\noutput: o\nstages:\n  - type: neuron_prune\n    keep: 50\n    align: 64\n",
                         "multiple of 64"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_is_exit_2_with_message_and_nothing_written(case, tiny_folder, tmp_path):
    text, expected = BAD[case]
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "o"
    recipe.write_text(text.format(m=tiny_folder).replace("output: o", f"output: {out}"))
    for cmd in (["validate", str(recipe)], ["run", str(recipe)]):
        res = CliRunner().invoke(main, cmd)
        assert res.exit_code == 2, (cmd, res.output)
        assert expected in res.output, res.output
        assert "Traceback" not in res.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r.yaml"]


def test_yaml_error_names_the_line(tmp_path):
    with pytest.raises(InputError, match=r"r.yaml:4: stages.0.bogus: unknown key"):
        parse_recipe("model: x\nstages:\n  - type: head_prune\n    bogus: 1\n    prune_ratio: 0.5\n", "r.yaml")


def test_unsupported_architecture(tmp_path, tiny_folder):
    import json
    import shutil

    folder = tmp_path / "gpt"
    shutil.copytree(tiny_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {folder}\noutput: {tmp_path / 'o'}\nstages:\n  - type: layer_drop\n    num_layers: 1\n")
    res = CliRunner().invoke(main, ["validate", str(recipe)])
    assert res.exit_code == 2
    assert "no adapter for architecture GPTBigCodeForCausalLM" in res.output and "Write one" in res.output


def test_config_without_architectures(tmp_path, tiny_folder):
    import json
    import shutil

    folder = tmp_path / "noarch"
    shutil.copytree(tiny_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["architectures"]
    (folder / "config.json").write_text(json.dumps(cfg))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {folder}\noutput: {tmp_path / 'o'}\nstages:\n  - type: layer_drop\n    num_layers: 1\n")
    res = CliRunner().invoke(main, ["validate", str(recipe)])
    assert res.exit_code == 2 and "no 'architectures'" in res.output


def test_schema_commands():
    import json

    res = CliRunner().invoke(main, ["schema"])
    assert res.exit_code == 0 and "head_prune" in res.output
    json.loads(res.output)
    res = CliRunner().invoke(main, ["schema", "--adapter"])
    assert res.exit_code == 0 and "qkv_layout" in res.output
