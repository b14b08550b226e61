"""Greedy generations: the repeated 4-gram share, a model forced to repeat, and the card / report.json entries."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from gqaprune.cli import main
from gqaprune.evaluation.generations import DEFAULT_PROMPTS, greedy_continuations, repeated_ngram_share


def test_repeated_ngram_share_values():
    assert repeated_ngram_share([7] * 40) == pytest.approx(1 - 1 / 37)  # 37 4-grams, one distinct
    assert repeated_ngram_share([7] * 4) == 0.0  # a single 4-gram repeats nothing
    assert repeated_ngram_share(list(range(40))) == 0.0
    assert repeated_ngram_share([1, 2, 3]) == 0.0  # shorter than one 4-gram
    # 1234 2341 3412 4123 1234: five 4-grams, four distinct
    assert repeated_ngram_share([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(0.2)


def test_normal_text_repeats_little():
    from tiny import builtin_tokenizer

    from gqaprune.io.data import token_stream

    tok = builtin_tokenizer()
    ids = token_stream(tok, "builtin:pydoc", "validation")[:400].tolist()
    share = repeated_ngram_share(ids)
    assert 0.0 <= share < 0.1, share


@pytest.fixture(scope="module")
def tiny_lm():
    from tiny import builtin_tokenizer, tiny_model

    tok = builtin_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return model, tok


def test_model_forced_to_one_token_scores_maximal_repetition(tiny_lm):
    model, tok = tiny_lm
    forced = 5
    assert forced != tok.eos_token_id
    bias = torch.zeros(model.config.vocab_size)
    bias[forced] = 1e4  # every next-token argmax is `forced`
    model.lm_head.bias = torch.nn.Parameter(bias)
    try:
        res = greedy_continuations(model, tok, ["The capital of France is", "Once upon a time"], max_new_tokens=40)
    finally:
        model.lm_head.bias = None
    expected = 1 - 1 / 37  # 40 copies of one token: 37 4-grams, 1 distinct; the largest value 40 tokens allow
    assert res["repeated_4gram_share_per_prompt"] == [pytest.approx(expected)] * 2
    assert res["repeated_4gram_share"] == pytest.approx(expected)
    assert res["texts"][0] == tok.decode([forced] * 40)


def test_default_prompts_one_text_each_and_mean_share(tiny_lm):
    model, tok = tiny_lm
    res = greedy_continuations(model, tok, list(DEFAULT_PROMPTS), max_new_tokens=40)
    assert len(res["texts"]) == len(DEFAULT_PROMPTS)
    assert all(0.0 <= s <= 1.0 for s in res["repeated_4gram_share_per_prompt"])
    assert res["repeated_4gram_share"] == pytest.approx(sum(res["repeated_4gram_share_per_prompt"]) / 4)


def _recipe(tmp_path, src, name, prompts_line):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(
        f"model: {src}\nruntime: {{threads: 1}}\ncalibration: {{samples: 8, seq_len: 32, batch_size: 4}}\n"
        "stages:\n  - {type: layer_drop, num_layers: 1}\n"
        "eval:\n  perplexity: {max_tokens: 300, seq_len: 64}\n  lm_eval: {tasks: []}\n"
        f"{prompts_line}output: {tmp_path / name}\n")
    return recipe


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from tiny import save_tiny

    folder = tmp_path_factory.mktemp("src") / "llama"
    save_tiny("llama", folder, num_hidden_layers=3)
    return folder


def test_run_records_generations_in_report_and_card(tmp_path, src):
    prompts = ["Return the value of", "A module is a file"]
    recipe = _recipe(tmp_path, src, "gens", f"  prompts: {json.dumps(prompts)}\n")
    res = CliRunner().invoke(main, ["run", str(recipe), "--quiet"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "gens" / "report.json").read_text())
    gens = rep["generations"]
    assert gens["prompts"] == prompts and gens["max_new_tokens"] == 40 and gens["ngram"] == 4
    for side in ("before", "after"):
        assert len(gens[side]["texts"]) == 2
        assert 0.0 <= gens[side]["repeated_4gram_share"] <= 1.0
        assert rep["eval"][side]["repeated_4gram_share"] == gens[side]["repeated_4gram_share"]
        assert "generations" not in rep["eval"][side]  # texts live in one place
    card = (tmp_path / "gens" / "README.md").read_text()
    assert "## Generations" in card and "repeated 4-grams in greedy continuations" in card
    for i, p in enumerate(prompts):
        assert f"**Prompt:** `{p}`" in card
        for side in ("before", "after"):
            first_line = (p + gens[side]["texts"][i]).splitlines()[0]
            assert f"> {first_line}".rstrip() in card


def test_empty_prompts_turn_generations_off(tmp_path, src):
    recipe = _recipe(tmp_path, src, "nogens", "  prompts: []\n")
    res = CliRunner().invoke(main, ["run", str(recipe), "--quiet"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "nogens" / "report.json").read_text())
    assert rep["generations"] is None and "repeated_4gram_share" not in rep["eval"]["after"]
    assert "## Generations" not in (tmp_path / "nogens" / "README.md").read_text()


@pytest.mark.parametrize("line, message", [
    ("  prompts: ['ok', '  ']\n", "prompts[1] is empty"),
    ("  prompts: 'one string'\n", "eval.prompts: Input should be a valid list"),
    ("  prompt: ['x']\n", "eval.prompt: unknown key"),
])
def test_bad_prompts_are_exit_2(tmp_path, src, line, message):
    recipe = _recipe(tmp_path, src, "bad", line)
    res = CliRunner().invoke(main, ["validate", str(recipe)])
    assert res.exit_code == 2 and message in res.output, res.output
