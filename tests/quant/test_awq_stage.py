"""The awq stage end to end on the builtin tiny Llama: prune (uniform, aligned), quantize, verify from disk."""

import json

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from gqaprune.cli import main

RECIPE = """\
model: builtin:tiny-llama
calibration: {{samples: 16, seq_len: 128}}
stages:
  - {{type: head_prune, unit: group, prune_ratio: 0.5, score: taylor}}
  - {{type: neuron_prune, prune_ratio: 0.25, align: 128}}
  - {{type: awq, w_bit: 4, group_size: 128, samples: 8, seq_len: 128}}
eval: {{perplexity: {{max_tokens: 4000}}, lm_eval: {{tasks: []}}}}
output: {out}
"""


@pytest.mark.builtin
def test_prune_then_awq_verified_from_disk(tmp_path):
    out = tmp_path / "awq"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(out=out))
    res = CliRunner().invoke(main, ["run", str(recipe), "--quiet"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "awq"
    assert cfg["quantization_config"]["bits"] == 4
    rep = json.loads((out / "report.json").read_text())
    assert rep["output_kind"] == "awq" and rep["roundtrip"]["ok"]
    awq = rep["awq"]
    assert awq["verified"] and awq["compression_ratio"] > 2.0
    fp_ppl = rep["stages"][-1]["perplexity_after"]  # pruned, before quantization
    q_ppl = rep["eval"]["after"]["perplexity"]  # dequantized from the bytes on disk
    assert q_ppl <= 1.10 * fp_ppl, (fp_ppl, q_ppl)  # stated bound: 4-bit costs at most 10% perplexity here
    assert (out / "recipe.yaml").read_text() == recipe.read_text()
    # gqaprune eval understands the AWQ folder
    res = CliRunner().invoke(main, ["eval", str(out), "--tasks", "", "--json"])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.output[res.output.index("{"):])
    assert ev["kind"] == "awq" and ev["perplexity"] > 1
    # a corrupted qweight on disk fails verification with a message naming the tensor
    from gqaprune.errors import CheckFailed
    from gqaprune.quant.awq import verify_awq_folder

    shard = next(out.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(k for k in sorted(tensors) if k.endswith("down_proj.scales"))
    tensors[name] = tensors[name] * float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckFailed, match=name.replace(".", r"\.")):
        verify_awq_folder(out)
