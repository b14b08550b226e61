"""Release builds: bit-identical rebuilds, interruption, bad input, numerical faults, security.

Every run here pins ``runtime.threads: 1``: on a machine with more busy threads than cores,
torch's OpenMP pool spins and a tiny model's scoring pass gets ~50x slower with 2 threads.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gqaprune.cli import main
from gqaprune.errors import CheckFailed
from tiny import write_recipe

REPO = Path(__file__).resolve().parent.parent
STAGES = ("  - {type: layer_drop, num_layers: 1}\n"
          "  - {type: head_prune, prune_ratio: 0.5}\n"
          "  - {type: neuron_prune, prune_ratio: 0.25, align: 8}\n")
NO_EVAL = "eval: {perplexity: null, lm_eval: {tasks: []}}\n"
SMALL_EVAL = "eval: {perplexity: {max_tokens: 300, seq_len: 64}, lm_eval: {tasks: []}}\n"


def _recipe(folder: Path, model, stages=STAGES, eval_block=SMALL_EVAL, name="r.yaml", **kw) -> Path:
    return write_recipe(folder, model, stages, eval_block=eval_block, name=name, runtime="runtime: {threads: 1}\n", **kw)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tiny import save_tiny

    folder = tmp_path_factory.mktemp("src") / "llama"
    save_tiny("llama", folder, num_hidden_layers=3)
    return folder


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# --- 1. bit-identical rebuilds ------------------------------------------------------------------


def test_two_runs_give_identical_output_files_and_report_records_inputs(tmp_path, llama_dir):
    from gqaprune.report.provenance import UNHASHED_OUTPUT_FILES, hash_folder, sha256_file

    recipe = _recipe(tmp_path, llama_dir)
    threads = torch.get_num_threads()
    a = CliRunner().invoke(main, ["run", str(recipe), "--quiet", "--output", str(tmp_path / "a")])
    assert a.exit_code == 0, a.output
    # disturb every global RNG and the thread count: the runner must seed and restore what it uses
    random.seed(123)
    torch.manual_seed(123)
    torch.rand(7)
    b = CliRunner().invoke(main, ["run", str(recipe), "--quiet", "--output", str(tmp_path / "b")])
    assert b.exit_code == 0, b.output
    ra = json.loads((tmp_path / "a" / "report.json").read_text())
    rb = json.loads((tmp_path / "b" / "report.json").read_text())
    assert ra["files_sha256"] == rb["files_sha256"]
    assert {"config.json", "model.safetensors", "recipe.yaml", "tokenizer.json"} <= set(ra["files_sha256"])
    assert any(k.startswith("plots/") and k.endswith(".png") for k in ra["files_sha256"])
    assert not set(UNHASHED_OUTPUT_FILES) & set(ra["files_sha256"])
    assert ra["unhashed_files"] == ["report.json", "README.md"]
    for name in ra["files_sha256"]:  # byte-identical, not just equal hashes in the reports
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert hash_folder(tmp_path / "a") == ra["files_sha256"]
    # the inputs are pinned: recipe, every model file, data tokens, versions, command
    assert ra["recipe_sha256"] == rb["recipe_sha256"] == sha256_file(recipe)
    want = {p.name: sha256_file(p) for p in llama_dir.iterdir()}
    assert ra["model"]["files_sha256"] == want and "model.safetensors" in want
    assert ra["data"]["calibration"]["sha256"] == rb["data"]["calibration"]["sha256"]
    assert ra["data"]["eval"]["sha256"] and ra["data"]["eval"]["tokens"] == 300
    assert {"python", "torch", "transformers", "safetensors", "gqaprune"} <= set(ra["versions"])
    assert ra["command"].startswith("gqaprune run ") and "--output" in ra["command"]
    assert ra["runtime"]["threads"] == 1
    assert torch.get_num_threads() == threads  # threads: 1 did not leak out of the runs
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output


def test_builtin_model_files_are_hashed_in_the_report(tmp_path, llama_dir, monkeypatch):
    """A builtin's cached folder is pinned like a local folder (a stand-in folder takes the cache slot)."""
    from gqaprune.builtin import tiny as bm
    from gqaprune.report.provenance import sha256_file
    from gqaprune.runner import run

    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path / "cache"))
    cached = bm.builtin_folder("builtin:tiny-llama")
    shutil.copytree(llama_dir, cached)
    (cached / "builtin_info.json").write_text('{"train_seconds": 1.0}')  # a training log, not a model input
    recipe = _recipe(tmp_path, "builtin:tiny-llama", stages="  - {type: layer_drop, num_layers: 1}\n",
                     eval_block=NO_EVAL)
    rep = run(str(recipe), progress=False)
    assert rep["model"]["files_sha256"] == {p.name: sha256_file(p) for p in llama_dir.iterdir()}
    assert rep["model"]["folder"] == str(cached)


# --- 2. atomic output and interruption ----------------------------------------------------------


def _no_traces(folder: Path, out: str = "out") -> None:
    assert not (folder / out).exists()
    left = [p.name for p in folder.iterdir() if p.name.startswith(f".{out}.gqaprune-")]
    assert not left, left


def test_sigterm_during_scoring_leaves_nothing_and_rerun_passes(tmp_path, llama_dir):
    from gqaprune.runner import run

    # enough calibration that the head scores take a few seconds
    recipe = _recipe(tmp_path, llama_dir, stages="  - {type: head_prune, prune_ratio: 0.5}\n",
                     calibration="{samples: 192, seq_len: 64, batch_size: 16}", eval_block=NO_EVAL)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "gqaprune", "run", str(recipe), "--quiet"], cwd=tmp_path,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "stage 0" in line:  # logged just before the stage's scoring pass starts
                proc.send_signal(signal.SIGTERM)
                break
        _, rest = proc.communicate(timeout=120)
        seen.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(seen)
    assert any("stage 0" in s for s in seen), err
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM; nothing was written" in err and "Traceback" not in err
    _no_traces(tmp_path)
    # a killed run's temporary folder (dead pid) is cleaned up by the next run
    stale = tmp_path / ".out.gqaprune-tmp-4194999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    rep = run(str(recipe), progress=False)
    assert rep["status"] == "ok" and (tmp_path / "out" / "model.safetensors").is_file()
    assert not stale.exists()


def test_sigint_during_save_leaves_nothing(tmp_path, llama_dir, monkeypatch):
    import gqaprune.io.checkpoint as ckpt
    from gqaprune.runner import run

    real_save = ckpt.save_model
    seen = {}

    def save_then_interrupt(model, adapter, folder, **kw):
        info = real_save(model, adapter, folder, **kw)
        seen["files"] = _listing(Path(folder))
        os.kill(os.getpid(), signal.SIGINT)  # half way through writing the output folder
        time.sleep(5)
        return info

    monkeypatch.setattr(ckpt, "save_model", save_then_interrupt)
    recipe = _recipe(tmp_path, llama_dir, stages="  - {type: layer_drop, num_layers: 1}\n", eval_block=NO_EVAL)
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    with pytest.raises(CheckFailed, match="interrupted by SIGINT; nothing was written") as e:
        run(str(recipe), progress=False)
    assert e.value.exit_code == 128 + signal.SIGINT
    assert "model.safetensors" in seen["files"]
    _no_traces(tmp_path)
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored


def test_sigterm_during_awq_removes_both_temporary_folders(tmp_path, monkeypatch):
    from tiny import save_tiny

    import gqaprune.quant.awq as awq
    from gqaprune.runner import run

    src = tmp_path / "awq-src"
    save_tiny("llama", src, hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
              head_dim=64, num_hidden_layers=2)
    seen = {}

    def quantize_then_terminate(fp_dir, out_dir, *a, **kw):
        seen["fp"] = Path(fp_dir).is_dir() and (Path(fp_dir) / "model.safetensors").is_file()
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "partial.safetensors").write_bytes(b"x")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(awq, "quantize_folder", quantize_then_terminate)
    recipe = _recipe(tmp_path, src, stages="  - {type: awq, group_size: 64}\n", eval_block=NO_EVAL)
    with pytest.raises(CheckFailed, match="interrupted by SIGTERM") as e:
        run(str(recipe), progress=False)
    assert e.value.exit_code == 128 + signal.SIGTERM and seen["fp"]
    _no_traces(tmp_path)


def test_disk_full_while_saving_is_one_line_and_leaves_nothing(tmp_path, llama_dir, monkeypatch):
    import errno

    import gqaprune.io.checkpoint as ckpt

    real_save = ckpt.save_model

    def save_until_full(model, adapter, folder, **kw):
        real_save(model, adapter, folder, **kw)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(ckpt, "save_model", save_until_full)
    recipe = _recipe(tmp_path, llama_dir, stages="  - {type: layer_drop, num_layers: 1}\n", eval_block=NO_EVAL)
    res = CliRunner().invoke(main, ["run", str(recipe), "--quiet"])
    assert res.exit_code == 1, res.output
    (line,) = _error_lines(res.output)
    assert line.startswith("error: cannot write the output (No space left on device: ") and "Traceback" not in res.output
    assert line.endswith(f"nothing was written at {tmp_path / 'out'}")
    _no_traces(tmp_path)


def test_output_under_a_file_is_a_clear_error_before_any_work(tmp_path, llama_dir):
    (tmp_path / "somefile").write_text("not a folder")
    recipe = _recipe(tmp_path, llama_dir, out="somefile/out")
    before = _listing(tmp_path)
    res = CliRunner().invoke(main, ["run", str(recipe)])
    assert res.exit_code == 2, res.output
    assert _error_lines(res.output) == [f"error: cannot create the output folder '{tmp_path / 'somefile/out'}': "
                                        f"'{tmp_path / 'somefile'}' is a file, not a folder"]
    assert "Traceback" not in res.output and "loading" not in res.output  # nothing loaded
    assert _listing(tmp_path) == before


def test_output_that_would_replace_the_model_folder_is_refused(tmp_path, llama_dir):
    recipe = _recipe(tmp_path, llama_dir)
    res = CliRunner().invoke(main, ["run", str(recipe), "--force", "--output", str(llama_dir)])
    assert res.exit_code == 2 and "would replace the model folder" in res.output
    assert (llama_dir / "model.safetensors").is_file()


# --- 3. bad input: one clear line, exit 2, nothing written ----------------------------------------


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _case_keep_no_group(tmp, src):
    return _recipe(tmp, src, stages="  - {type: head_prune, keep_kv_heads: 0}\n"), "keep_kv_heads"


def _case_model_is_a_file(tmp, src):
    (tmp / "weights.bin").write_bytes(b"\0" * 16)
    return _recipe(tmp, tmp / "weights.bin"), "is not a folder"


def _case_unreadable_config(tmp, src):
    m = _copy_model(src, tmp / "m")
    (m / "config.json").write_text("{not json")
    return _recipe(tmp, m), "config.json"


def _case_truncated_safetensors(tmp, src):
    m = _copy_model(src, tmp / "m")
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[: len(data) // 2])
    return _recipe(tmp, m), f"{m / 'model.safetensors'}: corrupt or truncated safetensors file"


def _case_corrupt_safetensors_header(tmp, src):
    m = _copy_model(src, tmp / "m")
    data = bytearray((m / "model.safetensors").read_bytes())
    data[8:40] = b"#" * 32  # the JSON header
    (m / "model.safetensors").write_bytes(bytes(data))
    return _recipe(tmp, m), f"{m / 'model.safetensors'}: corrupt or truncated safetensors file"


def _case_calibration_shorter_than_a_window(tmp, src):
    (tmp / "short.txt").write_text("just a few words of text\n")
    return (_recipe(tmp, src, calibration=f"{{source: {tmp / 'short.txt'}, seq_len: 128}}"),
            f"calibration source '{tmp / 'short.txt'}' (train) has")


def _case_empty_calibration_file(tmp, src):
    (tmp / "empty.txt").write_text("")
    return (_recipe(tmp, src, calibration=f"{{source: {tmp / 'empty.txt'}}}"),
            f"text source '{tmp / 'empty.txt'}' has no text in split 'train'")


def _case_missing_eval_source(tmp, src):
    return (_recipe(tmp, src, eval_block=f"eval: {{perplexity: {{source: {tmp / 'nope.jsonl'}}}}}\n"),
            f"text source '{tmp / 'nope.jsonl'}' does not exist")


def _case_tokenizer_missing(tmp, src):
    m = _copy_model(src, tmp / "m")
    for f in m.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            f.unlink()
    return _recipe(tmp, m), "has no usable tokenizer"


def _case_tokenizer_of_another_model(tmp, src):
    from tiny import save_tiny

    save_tiny("llama", tmp / "m", num_hidden_layers=3, vocab_size=64)
    return _recipe(tmp, tmp / "m"), "tokenizer and model do not belong together"


def _case_adapter_path_does_not_resolve(tmp, src):
    text = (REPO / "adapters" / "llama.yaml").read_text().replace("name: llama", "name: mine")
    (tmp / "mine.yaml").write_text(text.replace("o: self_attn.o_proj", "o: self_attn.out_proj"))
    return (_recipe(tmp, src, extra=f"adapter: {tmp / 'mine.yaml'}\n"),
            "adapter 'mine': role 'o' path 'model.layers.0.self_attn.out_proj' does not resolve")


def _case_architecture_without_adapter(tmp, src):
    m = _copy_model(src, tmp / "m")
    _edit_config(m, architectures=["GPTBigCodeForCausalLM"])
    return _recipe(tmp, m), "no adapter for architecture GPTBigCodeForCausalLM"


def _case_pickle_only_weights(tmp, src):
    from safetensors.torch import load_file

    m = _copy_model(src, tmp / "m")
    torch.save(load_file(m / "model.safetensors"), m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()
    return _recipe(tmp, m), "holds only pickle weights (pytorch_model.bin); gqaprune loads safetensors only"


def _case_remote_code_without_trust(tmp, src):
    m = _copy_model(src, tmp / "m")
    _edit_config(m, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    return _recipe(tmp, m), "needs remote code"


def _case_python_tag_in_yaml(tmp, src):
    r = _recipe(tmp, src)
    r.write_text(r.read_text() + f"name: !!python/object/apply:os.system ['touch {tmp / 'pwned'}']\n")
    return r, "not valid YAML"


BAD_INPUT = {f.__name__.removeprefix("_case_"): f for f in (
    _case_keep_no_group, _case_model_is_a_file, _case_unreadable_config, _case_truncated_safetensors,
    _case_corrupt_safetensors_header, _case_calibration_shorter_than_a_window, _case_empty_calibration_file,
    _case_missing_eval_source, _case_tokenizer_missing, _case_tokenizer_of_another_model,
    _case_adapter_path_does_not_resolve, _case_architecture_without_adapter, _case_pickle_only_weights,
    _case_remote_code_without_trust, _case_python_tag_in_yaml)}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, llama_dir):
    recipe, expected = BAD_INPUT[case](tmp_path, llama_dir)
    before = _listing(tmp_path)
    res = CliRunner().invoke(main, ["run", str(recipe), "--quiet"])
    assert res.exit_code == 2, res.output
    lines = _error_lines(res.output)
    assert len(lines) == 1 and expected in lines[0], res.output
    assert "Traceback" not in res.output
    assert _listing(tmp_path) == before  # no output, no temporary folder, nothing else
    assert not (tmp_path / "pwned").exists()


# --- 4. numerical faults ------------------------------------------------------------------------


def test_nan_after_a_stage_fails_naming_it_and_writes_nothing(tmp_path, llama_dir, monkeypatch):
    from gqaprune.stages.head_prune import HeadPrune

    real_apply = HeadPrune.apply

    def apply_then_poison(self, ctx):
        entry = real_apply(self, ctx)
        with torch.no_grad():
            ctx.model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("nan")
        return entry

    monkeypatch.setattr(HeadPrune, "apply", apply_then_poison)
    recipe = _recipe(tmp_path, llama_dir, eval_block=NO_EVAL)
    before = _listing(tmp_path)
    res = CliRunner().invoke(main, ["run", str(recipe), "--quiet"])
    assert res.exit_code == 1, res.output
    (line,) = _error_lines(res.output)
    assert line.startswith("error: stage 1 (head_prune): the model produces NaN or inf logits (")
    assert line.endswith(" values) after this stage; nothing was written")
    assert "stage 2" not in res.output  # the run stopped there
    assert _listing(tmp_path) == before


# --- 5. security ---------------------------------------------------------------------------------


def test_trusted_remote_code_is_still_never_imported(tmp_path, llama_dir):
    m = _copy_model(llama_dir, tmp_path / "m")
    marker = tmp_path / "imported"
    evil = f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import LlamaConfig as XConfig\n" \
           "from transformers import LlamaForCausalLM as XForCausalLM\n"
    (m / "configuration_x.py").write_text(evil)
    (m / "modeling_x.py").write_text(evil)
    _edit_config(m, auto_map={"AutoConfig": "configuration_x.XConfig",
                              "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    recipe = _recipe(tmp_path, m, stages="  - {type: layer_drop, num_layers: 1}\n", eval_block=NO_EVAL,
                     extra="trust_remote_code: true\n")
    res = CliRunner().invoke(main, ["run", str(recipe), "--quiet"])
    assert res.exit_code == 0, res.output
    assert not marker.exists()  # built from transformers' own classes, the folder's code never ran
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "modeling_x.py" in rep["model"]["files_sha256"]  # but it is pinned among the inputs
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in cfg and not (tmp_path / "out" / "modeling_x.py").exists()
