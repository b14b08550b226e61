"""Hidden-size surgery == masking; rotation keeps the function; repair is never worse than slicing."""

import copy

import pytest
import torch

from gqaprune.arch.adapter import decoder_layers, get_module, resolve_adapter
from gqaprune.ops.hidden import (_accumulate, _refit, is_tied, layer_norm_paths, norm_weight_offset, pca_rotation,
                                 prune_hidden, repair_readers, subtracts_mean,
                                 rotate_residual, rotation_problem, untie_lm_head, writers)
from gqaprune.ops.reconstruct import damp_grid
from tiny import FAMILIES, tiny_inputs, tiny_model

RMS_FAMILIES = [f for f in FAMILIES if f not in ("phi", "gemma3")]  # gemma3: output norms refuse rotation
KEEP = sorted(set(range(64)) - {0, 3, 4, 17, 30, 31, 45, 50, 62, 63})  # 54 of 64 channels, scattered


def _model(family, tied):
    model = tiny_model(family)
    adapter = resolve_adapter("auto", model.config.architectures)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    elif is_tied(model, adapter):  # gemma3's tiny model is tied as released
        untie_lm_head(model, adapter)
    return model, adapter


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _masked_reference(model, adapter, keep):
    """The original model with the removed channels zeroed in the embedding and in every output projection
    (rows and bias), and every norm computed over the kept channels only (zero on the removed ones)."""
    ref = copy.deepcopy(model)
    removed = sorted(set(range(model.config.hidden_size)) - set(keep))
    k = torch.tensor(keep)
    with torch.no_grad():
        get_module(ref, adapter.model.embed).weight[:, removed] = 0
        for layer in decoder_layers(ref, adapter):
            for path in writers(adapter):
                lin = get_module(layer, path)
                lin.weight[removed, :] = 0
                if lin.bias is not None:
                    lin.bias[removed] = 0

    offset = norm_weight_offset(adapter)  # Gemma's RMSNorm scales by (1 + weight)
    layer_norm = subtracts_mean(adapter)

    def norm_over_kept(mod, args, out):
        x = args[0][..., k].float()
        eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
        if layer_norm:
            y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
            y = y * mod.weight[k] + mod.bias[k]
        else:
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + mod.weight[k].float())
        full = torch.zeros_like(out)
        full[..., k] = y.to(out.dtype)
        return full

    norms = [get_module(ref, adapter.model.final_norm)]
    for layer in decoder_layers(ref, adapter):
        norms += [get_module(layer, p) for p in layer_norm_paths(adapter)]
    for norm in norms:
        norm.register_forward_hook(norm_over_kept)
    return ref


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_hidden_slicing_equals_masked_reference(family, tied):
    model, adapter = _model(family, tied)
    ref = _masked_reference(model, adapter, KEEP)
    prune_hidden(model, adapter, torch.tensor(KEEP))
    ids = tiny_inputs()
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), atol=1e-5, rtol=0)
    assert model.config.hidden_size == 54 and model.config.head_dim == 16
    assert get_module(model, adapter.model.embed).weight.shape == (96, 54)
    assert is_tied(model, adapter) == tied
    for layer in decoder_layers(model, adapter):
        assert get_module(layer, adapter.layer.o).out_features == 54
        assert get_module(layer, adapter.layer.down).out_features == 54
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ids1 = tiny_inputs(batch=1, seq=5)
    with torch.no_grad():  # the KV cache path agrees with the no-cache path at the new width
        assert torch.equal(model.generate(ids1, use_cache=True, **kw), model.generate(ids1, use_cache=False, **kw))


@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_model_saves_and_stock_from_pretrained_reloads_it(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from gqaprune.io.checkpoint import save_model

    model, adapter = _model(family, family == "gemma3")
    keep = list(range(8, 56))  # 48 channels: every tiny family's head count divides it
    prune_hidden(model, adapter, torch.tensor(keep))
    ids = tiny_inputs()
    want = _logits(model, ids)
    saved = save_model(model, adapter, tmp_path)
    assert saved["uniform"]
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert reloaded.config.hidden_size == 48 and reloaded.config.head_dim == 16
    torch.testing.assert_close(_logits(reloaded, ids), want, atol=1e-5, rtol=0)


def _random_orthogonal(n, seed=0):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@pytest.mark.parametrize("family", RMS_FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_rotation_alone_keeps_the_logits(family, tied):
    model, adapter = _model(family, tied)
    ids = tiny_inputs()
    before = _logits(model, ids)
    calib = tiny_inputs(batch=4, seq=16, seed=3)
    q, evals = pca_rotation(model, adapter, calib, batch_size=2, progress=False)
    assert bool((evals[:-1] >= evals[1:]).all())
    rotate_residual(model, adapter, q)
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-4, rtol=0)
    assert not is_tied(model, adapter) and model.config.tie_word_embeddings is False  # the head carries the norm
    norms = [get_module(model, adapter.model.final_norm)] + [
        get_module(layer, p) for layer in decoder_layers(model, adapter) for p in layer_norm_paths(adapter)]
    assert all(bool((n.weight == 1).all()) for n in norms)
    # a different (random) orthogonal matrix also keeps them: nothing depends on Q being PCA's
    rotate_residual(model, adapter, _random_orthogonal(64))
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-4, rtol=0)


def test_rotation_refuses_layernorm_and_output_norms_with_the_reason():
    phi = _model("phi", False)
    assert "LayerNorm" in rotation_problem(*phi) and "subtracts the channel mean" in rotation_problem(*phi)
    if "gemma3" in FAMILIES:
        assert "post_attention_layernorm" in rotation_problem(*_model("gemma3", True))
    assert rotation_problem(*_model("llama", False)) is None


@pytest.mark.parametrize("family", [f for f in ("llama", "qwen2", "phi3", "phi", "gemma3") if f in FAMILIES])
def test_repair_is_never_worse_than_slicing_and_lowers_the_error(family):
    model, adapter = _model(family, False)
    calib = tiny_inputs(batch=8, seq=16, seed=5)
    dense = copy.deepcopy(model)
    prune_hidden(model, adapter, torch.tensor(KEEP))
    sliced = copy.deepcopy(model)
    report = repair_readers(dense, model, adapter, calib, batch_size=4, progress=False)
    errs = [e for layer in report["layers"] for k, e in layer.items() if k != "layer"] + [report["lm_head"]]
    readers_per_layer = {"llama": 5, "qwen2": 5, "phi3": 2, "phi": 4, "gemma3": 5}[family]  # q k v gate up | qkv gate_up | q k v fc1
    assert len(errs) == 3 * readers_per_layer + 1
    for e in errs:
        assert 0 <= e["rel_error_lsq"] <= e["rel_error_slice"] + 1e-12
    assert sum(e["rel_error_lsq"] for e in errs) < 0.9 * sum(e["rel_error_slice"] for e in errs)

    def loss(m):
        with torch.no_grad():
            return float(m(input_ids=calib, labels=calib, use_cache=False).loss)

    def dense_kl(m):  # distance to the unpruned model's next-token distributions on the calibration tokens
        with torch.no_grad():
            p = torch.log_softmax(dense(input_ids=calib, use_cache=False).logits, -1)
            q = torch.log_softmax(m(input_ids=calib, use_cache=False).logits, -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    assert dense_kl(model) < dense_kl(sliced)
    assert torch.isfinite(torch.tensor(loss(model)))


def _paired_grams(x, xp):
    return x.T @ x, x.T @ xp, xp.T @ xp


def _direct_error(x, xp, w, w_kept) -> float:
    y = x @ w.T
    return float((y - xp @ w_kept.T).pow(2).sum() / y.pow(2).sum())


def test_reader_refit_keeps_the_slice_when_a_refit_only_fits_the_calibration_tokens():
    # the removed channels are independent of the kept ones, so W_K is the best kept weight anywhere; 40 fitting
    # tokens in 48 kept dimensions let a refit reproduce them on the calibration tokens only
    torch.manual_seed(3)
    x = torch.randn(240, 64, dtype=torch.float64)
    keep = torch.arange(48)
    xp = x[:, keep] * 1.1  # renormalised over the kept channels
    w = torch.randn(8, 64, dtype=torch.float64)
    every, held = _paired_grams(x, xp), _paired_grams(x[40:], xp[40:])
    overfit = _refit(w, w[:, keep], _paired_grams(x[:40], xp[:40]), 0.01)[0]
    assert _direct_error(x[40:], xp[40:], w, overfit) > _direct_error(x[40:], xp[40:], w, w[:, keep])  # a real trap
    new, info = _refit(w, w[:, keep], every, 0.01, held, 200)
    assert info["damp_chosen"] == "slice" and info["held_out_tokens"] == 200
    assert torch.equal(new, w[:, keep])
    assert info["rel_error_lsq"] == info["rel_error_slice"] == pytest.approx(_direct_error(x, xp, w, w[:, keep]))


def test_reader_refit_scores_each_damping_on_unseen_tokens_and_refits_the_winner_on_all():
    torch.manual_seed(4)
    base = torch.randn(600, 12, dtype=torch.float64)
    x = torch.cat([base, base @ torch.randn(12, 4, dtype=torch.float64)], dim=1)  # removed inputs: linear in the kept
    keep = torch.arange(12)
    xp = x[:, keep] * 0.9
    w = torch.randn(5, 16, dtype=torch.float64)
    w_k = w[:, keep]
    new, info = _refit(w, w_k, _paired_grams(x, xp), 0.01, _paired_grams(x[450:], xp[450:]), 150)
    assert info["damp_chosen"] == 0.01
    assert info["held_out_rel_error"]["0.01"] < 1e-3 < info["held_out_rel_error"]["slice"]

    def explicit(xf, xpf, damp):  # (W X^T X' + lam W_K)(X'^T X' + lam I)^-1, lam = damp * mean diag
        c_kept = xpf.T @ xpf
        lam = damp * float(torch.diagonal(c_kept).mean())
        return (w @ xf.T @ xpf + lam * w_k) @ torch.linalg.inv(c_kept + lam * torch.eye(12, dtype=torch.float64))

    for damp in damp_grid(0.01):  # each candidate was fitted on the first 450 tokens only
        held_err = _direct_error(x[450:], xp[450:], w, explicit(x[:450], xp[:450], damp))
        assert info["held_out_rel_error"][str(damp)] == pytest.approx(held_err, rel=1e-6)
    torch.testing.assert_close(new, explicit(x, xp, 0.01))
    assert info["rel_error_lsq"] == pytest.approx(_direct_error(x, xp, w, new), abs=1e-9)


def test_held_out_grams_count_the_tokens_from_hold_from_on_across_batches():
    torch.manual_seed(5)
    x, xp = torch.randn(40, 6, dtype=torch.float64), torch.randn(40, 4, dtype=torch.float64)
    batches = [(x[s: s + 16], xp[s: s + 16]) for s in range(0, 40, 16)]  # 16, 16, 8 tokens
    every, held, n_held = _accumulate(iter(batches), hold_from=24)  # starts inside the second batch
    assert n_held == 16
    for got, want in zip(every + held, _paired_grams(x, xp) + _paired_grams(x[24:], xp[24:])):
        torch.testing.assert_close(got, want)
    assert _accumulate(iter(batches), None)[1:] == (None, 0)


def test_reader_repair_with_holdout_reports_a_choice_per_reader():
    model, adapter = _model("llama", False)
    calib = tiny_inputs(batch=8, seq=16, seed=5)
    dense = copy.deepcopy(model)
    prune_hidden(model, adapter, torch.tensor(KEEP))
    report = repair_readers(dense, model, adapter, calib, batch_size=5, progress=False, holdout=0.25)
    errs = [e for layer in report["layers"] for k, e in layer.items() if k != "layer"] + [report["lm_head"]]
    assert len(errs) == 3 * 5 + 1
    for e in errs:
        assert e["held_out_tokens"] == 2 * 16  # the last 2 of 8 windows, inside the batch of windows 5-7
        assert e["held_out_rel_error"][str(e["damp_chosen"])] == min(e["held_out_rel_error"].values())
        assert 0 <= e["rel_error_lsq"] <= e["rel_error_slice"] + 1e-12
