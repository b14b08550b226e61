"""recover stage: LoRA targets and merge, flags and determinism, recovery after pruning, distillation
from the pre-pruning teacher, and a 2-process data-parallel run through `accelerate launch`."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gqaprune.arch.adapter import decoder_layers, model_shapes, resolve_adapter
from gqaprune.context import RunContext
from gqaprune.io.data import calibration_windows, token_stream
from gqaprune.errors import InputError
from gqaprune.recipe import HeadPruneStage, RecoverStage, parse_recipe
from gqaprune.stages.head_prune import HeadPrune
from gqaprune.stages.recover import Recover, apply_lora, lora_target_modules, merge_lora
from gqaprune.ops.surgery import prune_channels, prune_heads
from tiny import builtin_tokenizer, save_tiny, tiny_inputs, tiny_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and does not fight parallel jobs
    yield
    torch.set_num_threads(before)


def _recipe(**kw):
    text = "model: x\noutput: o\nstages: [{type: recover}]\ncalibration: {samples: 8, seq_len: 64, batch_size: 8}\n"
    r = parse_recipe(text)
    return r.model_copy(update=kw) if kw else r


def _ctx(model, tok, eval_tokens=None, calib=None, **kw) -> RunContext:
    adapter = resolve_adapter("auto", model.config.architectures)
    recipe = _recipe(**kw)
    if calib is None:
        calib = calibration_windows(tok, "builtin:pydoc", "train", 8, 64, 0)
    return RunContext(model=model, adapter=adapter, tokenizer=tok, recipe=recipe, calib=calib,
                      eval_tokens=eval_tokens, progress=False)


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


@pytest.fixture(scope="module")
def heldout(tok):
    return token_stream(tok, "builtin:pydoc", "validation")[:4096]


@pytest.fixture(scope="module")
def trained(tok):
    """A tiny Llama (GQA 4:1) trained briefly on the pydoc train split, so that it has structure to lose."""
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                       num_hidden_layers=2, intermediate_size=128, max_position_embeddings=128).train()
    stream = token_stream(tok, "builtin:pydoc", "train")
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        starts = torch.randint(0, stream.numel() - 65, (16,), generator=gen)
        b = torch.stack([stream[s: s + 65] for s in starts.tolist()])
        logits = model(input_ids=b[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _ppl(model, tokens):
    from gqaprune.evaluation.perplexity import perplexity

    return perplexity(model, tokens, seq_len=128, progress=False)["perplexity"]  # the default eval window


# --- LoRA targets and merge ----------------------------------------------------------------------


@pytest.mark.parametrize("family, per_layer", [("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"]),
                                               ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
                                               ("phi", ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"])])
def test_lora_targets_come_from_the_adapter_roles(family, per_layer):
    model = tiny_model(family)
    adapter = resolve_adapter("auto", model.config.architectures)
    all_roles = list(RecoverStage(type="recover").target_roles)
    paths = lora_target_modules(model, adapter, all_roles)
    n = len(decoder_layers(model, adapter))
    assert len(paths) == n * len(per_layer)
    assert {p.rsplit(".", 1)[1] for p in paths} == set(per_layer)
    assert all(isinstance(model.get_submodule(p), nn.Linear) for p in paths)
    if family == "llama":
        assert lora_target_modules(model, adapter, ["q", "v"]) == [
            f"model.layers.{i}.self_attn.{m}" for i in range(n) for m in ("q_proj", "v_proj")]
    if family == "phi3":  # a role the adapter does not have is skipped; none at all is an error
        with pytest.raises(InputError, match="none of target_roles"):
            lora_target_modules(model, adapter, ["q", "k"])


def _per_layer_pruned(family: str):
    """A tiny model whose layers have different shapes (heads pruned in layer 0, MLP channels in layer 1)."""
    model = tiny_model(family)
    adapter = resolve_adapter("auto", model.config.architectures)
    prune_heads(model, adapter, 0, {0: [0, 1], 1: [4, 5]})  # 8 -> 4 query heads, 2 KV heads
    prune_channels(model, adapter, 1, list(range(0, 96, 2)))  # MLP 96 -> 48
    shapes = model_shapes(model, adapter)
    assert shapes[0] != shapes[1] != shapes[2]
    return model, adapter, shapes


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_lora_merge_gives_the_peft_models_logits(family):
    model, adapter, shapes = _per_layer_pruned(family)
    cls = type(model)
    torch.manual_seed(3)
    peft_model = apply_lora(model, adapter, RecoverStage(type="recover", lora_rank=4))
    with torch.no_grad():  # B starts at zero (a no-op adapter); make the adapters matter
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    ids = tiny_inputs()
    peft_model.eval()
    with torch.no_grad():
        ref = peft_model(input_ids=ids, use_cache=False).logits
        base_only = copy.deepcopy(peft_model)
        with base_only.disable_adapter():
            plain = base_only(input_ids=ids, use_cache=False).logits
    assert (ref - plain).abs().max() > 1e-3  # the adapters change the output
    merged = merge_lora(peft_model)
    with torch.no_grad():
        out = merged(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert type(merged) is cls
    assert model_shapes(merged, adapter) == shapes
    assert not [n for n, m in merged.named_modules() if type(m).__module__.startswith("peft")]
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("_proj", "dense", "fc1", "fc2")))


# --- the stage: flags, report, determinism ------------------------------------------------------


def test_recover_report_flags_and_eval_mode(tok, heldout):
    model = tiny_model("llama", vocab_size=len(tok), num_hidden_layers=2)
    model.get_submodule("model.embed_tokens").weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ctx = _ctx(model, tok, eval_tokens=heldout[:512])
    lora_count = sum(2 * (m.in_features + m.out_features) for m in
                     (model.get_submodule(p) for p in lora_target_modules(model, ctx.adapter, ["q", "k", "v", "o",
                                                                                              "gate", "up", "down"])))
    rep = Recover(RecoverStage(type="recover", method="lora", steps=3, batch_size=2, seq_len=32, log_every=2,
                               lora_rank=2)).apply(ctx)
    assert type(ctx.model) is type(model) and not ctx.model.training
    assert {n: p.requires_grad for n, p in ctx.model.named_parameters()} == flags
    assert all(p.grad is None for p in ctx.model.parameters())
    assert rep["method"] == "lora" and rep["steps"] == 3 and rep["world_size"] == 1
    assert rep["trainable_params"] == lora_count  # the LoRA weights only
    assert rep["trainable_params"] < rep["total_params_while_training"] / 10
    assert [e["step"] for e in rep["loss_curve"]] == [1, 2, 3]  # first, every log_every, last
    assert rep["loss_first"] == rep["loss_curve"][0]["loss"] and rep["loss_last"] == rep["loss_curve"][-1]["loss"]
    assert rep["heldout_perplexity"]["before"] > 0 and rep["heldout_perplexity"]["after"] > 0
    assert rep["heldout_perplexity"]["tokens"] == 512
    assert rep["data"]["source"] == "builtin:pydoc" and rep["data"]["split"] == "train"


def test_recover_is_deterministic_given_the_seed(tok):
    base = tiny_model("llama", vocab_size=len(tok), num_hidden_layers=2)

    def run(seed):
        ctx = _ctx(copy.deepcopy(base), tok, seed=seed)
        rng = torch.get_rng_state()
        rep = Recover(RecoverStage(type="recover", method="full", steps=3, batch_size=2, seq_len=32,
                                   lr=1e-3)).apply(ctx)
        assert torch.equal(rng, torch.get_rng_state())  # the stage does not disturb the global RNG
        return ctx.model.state_dict(), rep["loss_curve"]

    a, ca = run(0)
    b, cb = run(0)
    c, _ = run(1)
    assert ca == cb
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_missing_teacher_is_a_clear_error(tok):
    from gqaprune.errors import CheckFailed

    ctx = _ctx(tiny_model("llama", vocab_size=len(tok), num_hidden_layers=1), tok)
    with pytest.raises(CheckFailed, match="teacher"):
        Recover(RecoverStage(type="recover", method="distill", steps=1)).apply(ctx)


def test_only_distill_asks_the_runner_for_a_teacher():
    """The runner keeps the pre-pruning copy exactly when a stage's needs_teacher() says so."""
    assert [Recover(RecoverStage(type="recover", method=m)).needs_teacher() for m in ("lora", "full", "distill")] \
        == [False, False, True]
    assert not HeadPrune(HeadPruneStage(type="head_prune", prune_ratio=0.5)).needs_teacher()  # Stage's default


# --- recovery after pruning ---------------------------------------------------------------------


def _prune_hard(ctx):
    """Half the GQA groups, then all but one query head per group (8 -> 1 query heads), no repair."""
    HeadPrune(HeadPruneStage(type="head_prune", prune_ratio=0.5, reconstruct="none")).apply(ctx)
    HeadPrune(HeadPruneStage(type="head_prune", unit="query_head", keep_q_per_kv=1, reconstruct="none")).apply(ctx)


def test_recover_lowers_perplexity_after_pruning(tok, heldout, trained):
    cfg = RecoverStage(type="recover", method="lora", steps=40, lr=5e-3, batch_size=8, seq_len=64, lora_rank=8)
    ctx = _ctx(copy.deepcopy(trained), tok, eval_tokens=heldout)
    ppl_trained = _ppl(trained, heldout)
    _prune_hard(ctx)
    ppl_pruned = _ppl(ctx.model, heldout)
    assert ppl_pruned > 1.3 * ppl_trained
    rep = Recover(cfg).apply(ctx)
    assert rep["heldout_perplexity"]["before"] == pytest.approx(ppl_pruned)
    assert rep["heldout_perplexity"]["after"] == pytest.approx(_ppl(ctx.model, heldout))
    # the same fine-tune on the unpruned model: what plain extra training gives, without anything to recover
    ctx0 = _ctx(copy.deepcopy(trained), tok, eval_tokens=heldout)
    rep0 = Recover(cfg).apply(ctx0)
    print(f"\nppl trained {ppl_trained:.1f}, pruned {ppl_pruned:.1f}, recovered {rep['heldout_perplexity']['after']:.1f}; "
          f"unpruned + same fine-tune {rep0['heldout_perplexity']['after']:.1f}")
    # measured (150 pretraining steps): trained 175, pruned 243, recovered 180; unpruned + fine-tune 175 -> 167
    assert rep["heldout_perplexity"]["after"] < 0.85 * ppl_pruned
    gain = 1 - rep["heldout_perplexity"]["after"] / ppl_pruned
    gain0 = 1 - rep0["heldout_perplexity"]["after"] / rep0["heldout_perplexity"]["before"]
    assert gain > gain0 + 0.1  # recovery, not just more training
    assert rep["loss_last"] < rep["loss_first"]


def _kl_to(teacher, student, windows, temperature=1.0):
    from gqaprune.stages.recover import kd_loss

    with torch.no_grad():
        return float(kd_loss(student(input_ids=windows, use_cache=False).logits,
                             teacher(input_ids=windows, use_cache=False).logits, temperature))


def test_distill_pulls_the_pruned_student_towards_the_pre_pruning_teacher(tok, heldout, trained):
    windows = heldout[: 8 * 64].reshape(8, 64)
    ctx = _ctx(copy.deepcopy(trained), tok, eval_tokens=heldout)
    ctx.teacher = copy.deepcopy(trained).eval().requires_grad_(False)  # what the runner does before stage 0
    _prune_hard(ctx)
    pruned = copy.deepcopy(ctx.model)
    kl_before = _kl_to(trained, ctx.model, windows)
    rep = Recover(RecoverStage(type="recover", method="distill", alpha=1.0, temperature=2.0, steps=30, lr=2e-3,
                               batch_size=8, seq_len=64, log_every=10)).apply(ctx)
    kl_after = _kl_to(trained, ctx.model, windows)
    print(f"\nKL(original || student) on held-out windows: pruned {kl_before:.3f}, after distill {kl_after:.3f}; "
          f"training KL {rep['loss_curve'][0]['kl']:.3f} -> {rep['loss_curve'][-1]['kl']:.3f}")
    # measured: KL(original || student) at T=1 0.362 pruned -> 0.056 after 30 steps; training KL 0.288 -> 0.062
    assert kl_after < 0.3 * kl_before
    curve = rep["loss_curve"]
    assert all(e["lm"] == 0 for e in curve)  # alpha = 1: the KL term alone
    assert curve[0]["kl"] > 0.1 and curve[-1]["kl"] < curve[0]["kl"]
    assert all(torch.equal(ctx.teacher.state_dict()[k], trained.state_dict()[k]) for k in trained.state_dict())

    # the control: had the teacher been the pruned model, the first KL would be zero
    ctx2 = _ctx(copy.deepcopy(pruned), tok)
    ctx2.teacher = copy.deepcopy(pruned).eval().requires_grad_(False)
    rep2 = Recover(RecoverStage(type="recover", method="distill", alpha=1.0, temperature=2.0, steps=1,
                                batch_size=8, seq_len=64)).apply(ctx2)
    assert rep2["loss_curve"][0]["kl"] < 1e-6


# --- the runner: teacher before pruning, and a 2-process run ------------------------------------


def _write_recipe(path: Path, model: Path, out: Path, recover: str, extra_stages: str = "") -> Path:
    path.write_text(f"""name: recover-test
model: {model}
seed: 0
runtime: {{device: cpu}}
calibration: {{source: builtin:pydoc, split: train, samples: 4, seq_len: 32, batch_size: 4}}
stages:
  - {{type: head_prune, unit: group, prune_ratio: 0.5, score: magnitude, reconstruct: none}}
  - {recover}
{extra_stages}eval: {{perplexity: {{max_tokens: 1000}}, lm_eval: {{tasks: []}}}}
output: {out}
""")
    return path


def test_runner_gives_distill_the_model_before_pruning(tmp_path):
    from gqaprune.runner import run

    save_tiny("llama", tmp_path / "m")
    recipe = _write_recipe(tmp_path / "r.yaml", tmp_path / "m", tmp_path / "out",
                           "{type: recover, method: distill, alpha: 1.0, steps: 2, batch_size: 2, seq_len: 32}")
    report = run(str(recipe), progress=False)
    st = report["stages"][1]
    assert st["type"] == "recover" and st["method"] == "distill"
    assert st["loss_curve"][0]["kl"] > 1e-4  # the teacher is not the pruned model (that would give 0)
    assert set(st["heldout_perplexity"]) == {"before", "after", "tokens"} and st["perplexity_after"] > 0


@pytest.mark.slow
def test_two_process_run_trains_data_parallel_and_writes_one_folder(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` starts two processes (torchrun); on a host without GPUs
    the stage's Accelerator(cpu=True) joins them over gloo on CPU. (`--cpu --num_processes 2` starts ONE process
    in accelerate 1.x unless an MPI hostfile is given.)"""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not on PATH")
    save_tiny("llama", tmp_path / "m")
    outs = tmp_path / "outs"
    outs.mkdir()
    recipe = _write_recipe(tmp_path / "r.yaml", tmp_path / "m", outs / "run", (
        "{type: recover, method: lora, steps: 4, lr: 1.0e-3, batch_size: 2, seq_len: 32, log_every: 2}"))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    t = time.perf_counter()
    proc = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                           "-m", "gqaprune", "run", str(recipe), "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in outs.iterdir()] == ["run"]  # one folder, no temporary leftovers
    report = json.loads((outs / "run" / "report.json").read_text())
    rec = report["stages"][1]
    assert rec["type"] == "recover" and rec["world_size"] == 2 and rec["windows_per_step"] == 4
    assert proc.stderr.count("gqaprune: wrote") == 1
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(outs / "run"))
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    assert reloaded.config.num_key_value_heads == 1
    with torch.no_grad():
        assert torch.isfinite(reloaded(input_ids=tiny_inputs(vocab_size=100)).logits).all()
    print(f"2-process run: {time.perf_counter() - t:.1f}s")


# --- the shipped iterative recipe ---------------------------------------------------------------


def test_iterative_recipe_validates():
    from click.testing import CliRunner

    from gqaprune.cli import main

    res = CliRunner().invoke(main, ["validate", str(REPO / "recipes" / "iterative.yaml")])
    assert res.exit_code == 0, res.output
    from gqaprune.recipe import load_recipe

    recipe, _ = load_recipe(REPO / "recipes" / "iterative.yaml")
    assert [s.type for s in recipe.stages] == ["head_prune", "recover", "head_prune", "recover"]
    assert recipe.model == "builtin:tiny-llama"


@pytest.mark.builtin
def test_recover_on_the_builtin_tiny_llama(tok):
    from gqaprune.builtin.tiny import resolve_builtin
    from gqaprune.io.checkpoint import load_pretrained

    model = load_pretrained(resolve_builtin("builtin:tiny-llama", progress=False))
    heldout = token_stream(tok, "builtin:pydoc", "validation")[:4096]
    calib = calibration_windows(tok, "builtin:pydoc", "train", 16, 128, 0)
    ctx = _ctx(model, tok, eval_tokens=heldout, calib=calib)
    ppl_trained = _ppl(model, heldout)
    HeadPrune(HeadPruneStage(type="head_prune", prune_ratio=0.5, reconstruct="none")).apply(ctx)  # 2 -> 1 KV group
    rep = Recover(RecoverStage(type="recover", method="lora", steps=20, lr=2e-3, batch_size=8, seq_len=128,
                               lora_rank=8)).apply(ctx)
    print(f"\nbuiltin tiny-llama ppl {ppl_trained:.1f}; half the groups pruned {rep['heldout_perplexity']['before']:.1f}; "
          f"after 20 LoRA steps {rep['heldout_perplexity']['after']:.1f} ({rep['train_seconds']:.0f}s)")
    # measured: 140.4 trained; 244.3 with half the groups pruned (no repair); 173.2 after 20 LoRA steps (x0.71)
    assert rep["heldout_perplexity"]["after"] < 0.8 * rep["heldout_perplexity"]["before"]
