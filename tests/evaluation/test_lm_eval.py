"""lm-eval integration: the shipped offline tasks, the runner and its errors (CPU, no network)."""

from __future__ import annotations

import json
import math
import shutil
import socket
import textwrap
from pathlib import Path

import pytest

from gqaprune.io.data import load_units
from gqaprune.errors import InputError
from gqaprune.evaluation import local_tasks
from gqaprune.evaluation.lm_eval_runner import LOCAL_TASKS, primary_metrics, run_lm_eval

MC, ROLLING = local_tasks.MC_TASK, local_tasks.ROLLING_TASK


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def local_results(tmp_path_factory, bpe_tokenizer, tiny_llama):
    """Both shipped tasks on the random-init tiny Llama (one run shared by several tests)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GQAPRUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        return run_lm_eval(tiny_llama, bpe_tokenizer, list(LOCAL_TASKS))
    finally:
        mp.undo()


# --------------------------------------------------------------------------- task files

def test_task_files_are_deterministic(task_cache):
    first = local_tasks.task_dir()
    assert first.parent == task_cache / "lm_eval_tasks"
    files = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}
    assert {f"{t}{ext}" for t in LOCAL_TASKS for ext in (".yaml", ".jsonl")} <= set(files)
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".tmp")]  # no temp dirs left over

    # found again without rewriting, and rebuilt byte for byte after removal
    assert local_tasks.task_dir() == first
    shutil.rmtree(first)
    again = local_tasks.task_dir()
    assert again == first
    assert {p.name: p.read_bytes() for p in again.iterdir() if p.is_file()} == files


def test_task_folder_repairs_a_damaged_copy(task_cache):
    folder = local_tasks.task_dir()
    text = (folder / f"{MC}.jsonl").read_bytes()
    (folder / f"{MC}.jsonl").unlink()
    assert local_tasks.task_dir() == folder
    assert (folder / f"{MC}.jsonl").read_bytes() == text


def test_task_yaml_points_at_local_json(task_cache):
    import yaml

    folder = local_tasks.task_dir()
    for task in LOCAL_TASKS:
        cfg = yaml.safe_load((folder / f"{task}.yaml").read_text())
        assert cfg["task"] == task
        assert cfg["dataset_path"] == "json"
        data = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert data.is_absolute() and data.is_file() and data.parent == folder
        assert cfg["test_split"] == "test"
        # datasets keeps its Arrow copy inside the task folder, not in the user's HF cache
        assert Path(cfg["dataset_kwargs"]["cache_dir"]).parent == folder
    assert yaml.safe_load((folder / f"{ROLLING}.yaml").read_text())["output_type"] == "loglikelihood_rolling"
    assert yaml.safe_load((folder / f"{MC}.yaml").read_text())["output_type"] == "multiple_choice"


def _split():
    return load_units("builtin:pydoc", "validation"), load_units("builtin:pydoc", "train")


def _norm(text: str) -> str:
    return " ".join(text.split())


def test_mc_items_are_well_formed():
    units, train = _split()
    docs = local_tasks.mc_docs(units, train)
    assert docs == local_tasks.mc_docs(units, train)  # deterministic
    assert 180 <= len(docs) <= local_tasks.MC_ITEMS
    train_text = "\n".join(_norm(t) for t in train)
    labels = [d["label"] for d in docs]
    for d in docs:
        contexts, cont = d["contexts"], d["continuation"]
        assert len(contexts) == 4 and len(set(contexts)) == 4
        assert 0 <= d["label"] < 4
        assert local_tasks.MC_CONT_MIN <= len(cont) <= local_tasks.MC_CONT_MAX
        true = contexts[d["label"]]
        own = _norm(units[d["paragraph"]])
        assert true + " " + cont in own  # the continuation follows the true context
        assert own not in train_text and cont not in train_text  # held out from training text
        for i, c in enumerate(contexts):
            assert local_tasks.MC_PREFIX_MIN <= len(c) <= local_tasks.MC_PREFIX_MAX
            assert c == c.strip() and "  " not in c
            if i != d["label"]:
                assert c + " " + cont not in own and c not in own  # from other paragraphs
                assert abs(len(c) - len(true)) <= local_tasks.MC_CTX_TOLERANCE  # length gives nothing away
    # the answer position is spread over the four slots
    assert all(30 <= labels.count(k) <= 70 for k in range(4))


def test_rolling_docs_are_held_out():
    units, train = _split()
    docs = local_tasks.rolling_docs(units, train)
    assert len(docs) == local_tasks.ROLLING_DOCS
    assert all(len(d["text"]) >= local_tasks.ROLLING_MIN_CHARS and d["text"] in units for d in docs)
    # pydoc repeats passages across topics; none of the repeated ones is scored
    train_text = "\n".join(_norm(t) for t in train)
    assert not [d for d in docs if _norm(d["text"]) in train_text]
    assert len(local_tasks.heldout_units(units, train)) < len(units)


# --------------------------------------------------------------------------- running

def test_local_tasks_run_offline(local_results):
    res = local_results
    assert set(res) == set(LOCAL_TASKS)
    json.dumps(res)  # JSON-serialisable

    roll = res[ROLLING]
    assert {"word_perplexity", "byte_perplexity", "bits_per_byte"} <= set(roll)
    assert not any("," in k for k in roll)
    assert roll["samples"] == local_tasks.ROLLING_DOCS
    assert roll["byte_perplexity"] > 1 and roll["word_perplexity"] > roll["byte_perplexity"]
    assert math.isclose(roll["bits_per_byte"], math.log2(roll["byte_perplexity"]), rel_tol=1e-6)

    mc = res[MC]
    assert {"acc", "acc_stderr"} <= set(mc)
    assert 180 <= mc["samples"] <= local_tasks.MC_ITEMS
    assert 0.0 <= mc["acc"] <= 1.0

    assert primary_metrics(res) == {ROLLING: roll["word_perplexity"], MC: mc["acc"]}


def test_random_init_model_is_near_chance(local_results):
    # ~200 items, chance 0.25, sd ~0.03: a random model lands well inside this band
    mc = local_results[MC]
    assert 0.13 <= mc["acc"] <= 0.37, mc


def test_run_is_deterministic_and_offline(task_cache, no_network, bpe_tokenizer, tiny_llama, local_results):
    import torch

    tiny_llama.train()  # the runner evaluates in eval mode and gives the mode back
    rng = torch.get_rng_state()
    try:
        res = run_lm_eval(tiny_llama, bpe_tokenizer, [MC, ROLLING], limit=20)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left as it was
    assert res[MC]["samples"] == 20 and res[ROLLING]["samples"] == 20
    again = run_lm_eval(tiny_llama, bpe_tokenizer, [MC, ROLLING], limit=20)
    assert res == again


def test_task_patterns_expand(task_cache, bpe_tokenizer, tiny_llama):
    res = run_lm_eval(tiny_llama, bpe_tokenizer, ["gqaprune_pydoc_*"], limit=3)
    assert set(res) == set(LOCAL_TASKS)


def test_unknown_task_is_an_input_error(task_cache, no_network, bpe_tokenizer, tiny_llama):
    with pytest.raises(InputError) as err:
        run_lm_eval(tiny_llama, bpe_tokenizer, [MC, "no_such_task_xyz"])
    msg = str(err.value)
    assert "no_such_task_xyz" in msg and MC in msg and ROLLING in msg
    assert err.value.exit_code == 2


def _write_user_task(folder: Path, name: str, dataset: str | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if dataset is None:  # a local JSONL dataset
        data = folder / f"{name}.jsonl"
        rows = [
            {"q": "The result of the function is", "choices": ["returned to the caller.", "purple elephants sang."], "label": 0},
            {"q": "A list is a mutable", "choices": ["banana of seven.", "sequence of items."], "label": 1},
            {"q": "The exception is", "choices": ["raised when an error occurs.", "quickly green under."], "label": 0},
        ]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        source = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
    else:
        source = f"dataset_path: {dataset}\n"
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n" + source + textwrap.dedent("""\
            output_type: multiple_choice
            test_split: test
            doc_to_text: q
            doc_to_target: label
            doc_to_choice: choices
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
            """)
    )


def test_include_path_user_task(task_cache, tmp_path, no_network, bpe_tokenizer, tiny_llama):
    user = tmp_path / "my_tasks"
    _write_user_task(user, "my_local_mc", None)
    res = run_lm_eval(tiny_llama, bpe_tokenizer, ["my_local_mc", MC], include_path=str(user), limit=10)
    assert set(res) == {"my_local_mc", MC}
    assert res["my_local_mc"]["samples"] == 3
    assert res["my_local_mc"]["acc"] in (0.0, 1 / 3, 2 / 3, 1.0)


def test_task_without_offline_data_is_an_input_error(task_cache, tmp_path, no_network, bpe_tokenizer, tiny_llama):
    user = tmp_path / "my_tasks"
    _write_user_task(user, "my_hub_task", "some-org/not-on-this-machine")
    with pytest.raises(InputError) as err:
        run_lm_eval(tiny_llama, bpe_tokenizer, ["my_hub_task"], include_path=user)
    msg = str(err.value)
    assert "my_hub_task" in msg and "offline" in msg


def test_missing_include_path_is_an_input_error(task_cache, tmp_path, bpe_tokenizer, tiny_llama):
    with pytest.raises(InputError, match="include_path"):
        run_lm_eval(tiny_llama, bpe_tokenizer, [MC], include_path=tmp_path / "nope")


def test_primary_metrics_picks_headline_numbers():
    res = {
        MC: {"acc": 0.5, "acc_norm": 0.6, "acc_stderr": 0.01, "samples": 200},
        ROLLING: {"word_perplexity": 12.0, "byte_perplexity": 2.0, "bits_per_byte": 1.0, "samples": 60},
        "some_gen_task": {"exact_match,strict-match": 0.25, "samples": 5},
    }
    assert primary_metrics(res) == {MC: 0.5, ROLLING: 12.0, "some_gen_task": 0.25}


# --------------------------------------------------------------------------- trained builtin model

def _have_builtin() -> bool:
    try:
        from gqaprune.builtin.tiny import resolve_builtin  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.builtin
@pytest.mark.skipif(not _have_builtin(), reason="gqaprune.builtin.tiny is not available")
def test_trained_builtin_model_beats_chance(no_network):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gqaprune.builtin.tiny import resolve_builtin

    folder = resolve_builtin("builtin:tiny-llama", progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    res = run_lm_eval(model, tokenizer, list(LOCAL_TASKS))
    # measured: acc 0.588 +- 0.035 (199 items; random-init models 0.20-0.29), bits/byte 2.12
    assert res[MC]["acc"] >= 0.45, res
    assert res[ROLLING]["bits_per_byte"] < 3.0, res
