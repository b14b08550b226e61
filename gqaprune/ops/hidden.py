"""The residual-stream width (hidden_size): slice it, rotate it, and repair the projections that read it.

Every role that touches the residual stream is either a *writer* (the embedding rows; the output rows of
o/dense and down/fc2, and their biases), a *norm* (a weight, and a bias for LayerNorm, over the stream), or
a *reader* (the input columns of q/k/v or the fused qkv, of gate/up or the fused gate_up or fc1, and of the
LM head). ``prune_hidden`` keeps one channel set in all of them and writes the new ``hidden_size`` into the
config, with ``head_dim`` explicit (it no longer follows from hidden_size / heads).

``rotate_residual`` applies one orthogonal Q (E x E) to the whole stream: with every norm weight folded into
the readers that follow it (the norms become weightless), RMSNorm(Q^T h) = Q^T RMSNorm(h), so rotating every
writer by Q^T and every reader by Q leaves the model's function unchanged. The LM head and a tied
embedding then differ (the head carries the final norm's weight), so a tied head is untied first.
A mean-subtracting LayerNorm does not commute with a rotation (LayerNorm(Q^T h) != Q^T LayerNorm(h) unless
Q keeps the all-ones direction, which PCA does not), so rotation refuses such models (``rotation_problem``).

``repair_readers`` refits every reader, layer by layer, so that on the calibration tokens the already-pruned
model's kept, renormalised inputs reproduce what the reader produced in the model before slicing
(least squares damped toward the plain slice; a reader keeps its plain slice when that is better, and with
held-out windows each reader chooses its damping, or no refit, on tokens it was not fitted on).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from gqaprune.arch.adapter import Adapter, decoder_layers, get_module, head_dim_of, set_module
from gqaprune.ops.reconstruct import _solve, choose_on_held_out
from gqaprune.schema import held_out_from
from gqaprune.ops.surgery import slice_linear


# --- roles that touch the stream -------------------------------------------------------------------


def attention_readers(adapter: Adapter) -> list[str]:
    r = adapter.layer
    return [r.qkv] if r.fused_qkv else [r.q, r.k, r.v]


def mlp_readers(adapter: Adapter) -> list[str]:
    r = adapter.layer
    return [r.gate_up] if r.fused_gate_up else [p for p in (r.gate, r.up) if p is not None]


def reader_groups(adapter: Adapter) -> list[tuple[str, list[str]]]:
    """(norm role path, the reader paths that take that norm's output), in forward order within a layer.
    Parallel attention/MLP (Phi-1/2): one norm feeds both."""
    r = adapter.layer
    if r.parallel_attn_mlp:
        return [(r.input_norm, attention_readers(adapter) + mlp_readers(adapter))]
    return [(r.input_norm, attention_readers(adapter)), (r.post_attention_norm, mlp_readers(adapter))]


def writers(adapter: Adapter) -> list[str]:
    return [adapter.layer.o, adapter.layer.down]


def norm_weight_offset(adapter: Adapter) -> int:
    """The norm scales by (offset + weight): 1 for Gemma's RMSNorm, else 0."""
    return adapter.norm.weight_offset


def subtracts_mean(adapter: Adapter) -> bool:
    """LayerNorm (Phi-1/2) subtracts the channel mean; RMSNorm does not (the adapter is checked against the model)."""
    return adapter.norm.kind == "layer"


def embedding_scaled_by_sqrt_hidden(adapter: Adapter) -> bool:
    return adapter.embedding.scale == "sqrt_hidden"


def output_norm_paths(adapter: Adapter) -> list[str]:
    """Norms on a sublayer's output before the residual add (Gemma 2/3): stream-wide, but no projection follows."""
    r = adapter.layer
    return [p for p in (getattr(r, "post_attn_output_norm", None), getattr(r, "post_mlp_output_norm", None))
            if p is not None]


def layer_norm_paths(adapter: Adapter) -> list[str]:
    """Every stream-wide norm in a layer (q_norm/k_norm are head_dim wide and stay)."""
    return [norm for norm, _ in reader_groups(adapter)] + output_norm_paths(adapter)


def is_tied(model: nn.Module, adapter: Adapter) -> bool:
    return get_module(model, adapter.model.lm_head).weight is get_module(model, adapter.model.embed).weight


def rotation_problem(model: nn.Module, adapter: Adapter) -> str | None:
    """Why ``rotate: pca`` cannot keep this model's function exactly, or None. Works on a meta model."""
    if subtracts_mean(adapter):
        return ("rotate: pca needs RMSNorm, but this model's norms are LayerNorm, which subtracts the channel mean: "
                "LayerNorm(Q^T h) differs from Q^T LayerNorm(h) for a PCA rotation Q, and the RMSNorm that SliceGPT "
                "swaps in is not a module a stock checkpoint of this architecture can load; use rotate: none")
    if output_norm_paths(adapter):
        return (f"rotate: pca cannot fold the weight of the sublayer-output norm ({', '.join(output_norm_paths(adapter))})"
                ": it scales each channel right before the residual add, where no projection follows to take it, "
                "and a channel-wise scale does not commute with a rotation; use rotate: none")
    return None


# --- slicing ---------------------------------------------------------------------------------------


def _slice_vector_param(module: nn.Module, name: str, keep: torch.Tensor) -> None:
    p = getattr(module, name, None)
    if isinstance(p, nn.Parameter):
        setattr(module, name, nn.Parameter(p.detach().index_select(0, keep.to(p.device)), requires_grad=p.requires_grad))


def _slice_norm(norm: nn.Module, keep: torch.Tensor) -> None:
    _slice_vector_param(norm, "weight", keep)
    _slice_vector_param(norm, "bias", keep)
    if isinstance(getattr(norm, "normalized_shape", None), tuple):  # nn.LayerNorm normalises over this shape
        norm.normalized_shape = (int(keep.numel()),)


def _rescale_embedding(model: nn.Module, adapter: Adapter, old: int, new: int) -> None:
    """An embedding multiplied by sqrt(hidden_size) (Gemma) would, once reloaded at the new width, scale by
    sqrt(new): store that scale on the module, multiply the weights by sqrt(old/new) so every token vector stays
    what it was, and divide the final norm's effective weight by the same factor so a tied LM head (the same
    weights) gives the same logits; an untied head is left as it is."""
    embed = get_module(model, adapter.model.embed)
    c = (old / new) ** 0.5
    for name, value in list(vars(embed).items()) + list(embed.named_buffers(recurse=False)):
        if "scale" not in name:
            continue
        if isinstance(value, float) and abs(value - old ** 0.5) < 1e-6 * old:
            setattr(embed, name, new ** 0.5)
        elif isinstance(value, torch.Tensor) and value.dim() == 0 and value.device.type != "meta" \
                and abs(float(value) - old ** 0.5) < 1e-3 * old ** 0.5:
            value.fill_(new ** 0.5)
    with torch.no_grad():
        embed.weight.mul_(c)
        if is_tied(model, adapter):
            norm = get_module(model, adapter.model.final_norm)
            offset = norm_weight_offset(adapter)
            norm.weight.copy_((offset + norm.weight.double()) / c - offset)


def prune_hidden(model: nn.Module, adapter: Adapter, keep: torch.Tensor) -> None:
    """Keep residual-stream channels ``keep`` (sorted indices) everywhere; in place, also on the meta device."""
    config = model.config
    old = int(getattr(config, adapter.config.hidden_size))
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    assert keep.numel() >= 1 and int(keep.max()) < old, f"bad channel set for hidden size {old}"
    head_dim = head_dim_of(config, adapter)  # before hidden_size changes: it may be derived from it
    tied = is_tied(model, adapter)
    embed = get_module(model, adapter.model.embed)
    w = embed.weight  # (vocab, E)
    embed.weight = nn.Parameter(w.detach().index_select(1, keep.to(w.device)), requires_grad=w.requires_grad)
    embed.embedding_dim = int(keep.numel())
    head = get_module(model, adapter.model.lm_head)
    if tied:  # one matrix, sliced once
        head.weight = embed.weight
        head.in_features = int(keep.numel())
    else:
        set_module(model, adapter.model.lm_head, slice_linear(head, cols=keep))
    _slice_norm(get_module(model, adapter.model.final_norm), keep)
    for layer in decoder_layers(model, adapter):
        for norm in layer_norm_paths(adapter):
            _slice_norm(get_module(layer, norm), keep)
        for _, readers in reader_groups(adapter):
            for path in readers:
                set_module(layer, path, slice_linear(get_module(layer, path), cols=keep))
        for path in writers(adapter):
            set_module(layer, path, slice_linear(get_module(layer, path), rows=keep))
    setattr(config, adapter.config.head_dim, head_dim)
    setattr(config, adapter.config.hidden_size, int(keep.numel()))
    if embedding_scaled_by_sqrt_hidden(adapter) and w.device.type != "meta":
        _rescale_embedding(model, adapter, old, int(keep.numel()))
    for module in model.modules():  # plain-int copies of hidden_size some modules keep (not read in forward)
        if type(getattr(module, "hidden_size", None)) is int and module.hidden_size == old:
            module.hidden_size = int(keep.numel())


# --- rotation --------------------------------------------------------------------------------------


def _fold_norm_into(norm: nn.Module, readers: list[nn.Linear], offset: int) -> None:
    """reader(w * n(h)) = (reader * diag(w))(n(h)): move an RMSNorm's effective weight (offset + weight) into
    its readers' columns; the norm's effective weight becomes 1."""
    w = offset + norm.weight.detach().double()
    for lin in readers:
        lin.weight.data = (lin.weight.detach().double() * w[None, :]).to(lin.weight.dtype)
    norm.weight.data.fill_(1.0 - offset)


def untie_lm_head(model: nn.Module, adapter: Adapter) -> None:
    head = get_module(model, adapter.model.lm_head)
    head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        text.tie_word_embeddings = False


def rotate_residual(model: nn.Module, adapter: Adapter, q: torch.Tensor) -> None:
    """Fold every norm weight into its readers, then rotate the stream by orthogonal ``q`` (E, E):
    stream h -> Q^T h, writers W -> Q^T W (and b -> Q^T b), readers W -> W Q. In place; untie a tied head."""
    problem = rotation_problem(model, adapter)
    assert problem is None, problem
    q = q.detach().double().cpu()
    e = q.shape[0]
    assert q.shape == (e, e) and torch.allclose(q.T @ q, torch.eye(e, dtype=q.dtype), atol=1e-8), "Q must be orthogonal"
    if is_tied(model, adapter):
        untie_lm_head(model, adapter)
    layers = decoder_layers(model, adapter)
    for layer in layers:
        for norm, readers in reader_groups(adapter):
            _fold_norm_into(get_module(layer, norm), [get_module(layer, p) for p in readers], norm_weight_offset(adapter))
    head = get_module(model, adapter.model.lm_head)
    _fold_norm_into(get_module(model, adapter.model.final_norm), [head], norm_weight_offset(adapter))

    def right(p: nn.Parameter):  # W -> W Q on the input side
        p.data = (p.detach().double().cpu() @ q).to(device=p.device, dtype=p.dtype)

    def left(p: nn.Parameter):  # rows or bias -> Q^T (rows) on the output side
        p.data = (q.T @ p.detach().double().cpu()).to(device=p.device, dtype=p.dtype)

    right(get_module(model, adapter.model.embed).weight)  # (vocab, E): each token vector v -> Q^T v
    right(head.weight)
    for layer in layers:
        for _, readers in reader_groups(adapter):
            for path in readers:
                right(get_module(layer, path).weight)
        for path in writers(adapter):
            lin = get_module(layer, path)
            left(lin.weight)
            if lin.bias is not None:
                left(lin.bias)


class _Stop(Exception):
    pass


def _norm_input_hooks(model: nn.Module, adapter: Adapter, store: dict) -> list:
    """Pre-hooks on every norm of the stream adding (h / rms(h))^T (h / rms(h)) to store['cov'] (float64)."""
    def hook(mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()  # (tokens, E)
        x = x / x.pow(2).mean(1, keepdim=True).clamp_min(1e-30).sqrt()
        store["cov"] = store.get("cov", 0) + x.T @ x
        store["tokens"] = store.get("tokens", 0) + x.shape[0]

    mods = [get_module(model, adapter.model.final_norm)]
    for layer in decoder_layers(model, adapter):
        mods += [get_module(layer, norm) for norm, _ in reader_groups(adapter)]  # the stream itself enters these
    return [m.register_forward_pre_hook(hook) for m in mods]


def pca_rotation(model: nn.Module, adapter: Adapter, calib: torch.Tensor, batch_size: int,
                 progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q (E, E) with columns the principal directions, eigenvalues descending) of the per-token
    RMS-normalised residual stream at every norm's input over the calibration windows (N, T).
    Normalising per token keeps the few huge-norm tokens (attention sinks) from owning the basis, and
    weighs every norm site alike: it is the stream the readers see."""
    store: dict = {}
    handles = _norm_input_hooks(model, adapter, store)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for b in tqdm(range(0, calib.shape[0], batch_size), desc="residual PCA", disable=not progress, leave=False):
                model(input_ids=calib[b: b + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    evals, evecs = torch.linalg.eigh(store["cov"])  # ascending
    order = torch.argsort(evals, descending=True)
    return evecs[:, order].contiguous(), evals[order].clamp_min(0)


# --- least-squares repair of the readers -------------------------------------------------------------


def _first_arg(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def layer_calls(model: nn.Module, adapter: Adapter, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """(input of layer 0, the keyword arguments each decoder layer is called with) for one batch ``ids``:
    attention masks and position embeddings depend on the tokens only, so both models reuse them."""
    layers = decoder_layers(model, adapter)
    first, kwargs = {}, [None] * len(layers)

    def hook_for(i):
        def hook(mod, args, kw):
            if i == 0:
                first["h"] = _first_arg(args, kw)
            kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
            if i == len(layers) - 1:
                raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return first["h"], kwargs


def _run_layer(layer: nn.Module, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(h, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _reader_input(layer: nn.Module, path: str, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The input of reader ``path`` when ``layer`` runs on ``h``: (tokens, width), float64. Stops there."""
    got = {}

    def hook(mod, args):
        got["x"] = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
        raise _Stop

    handle = get_module(layer, path).register_forward_pre_hook(hook)
    try:
        _run_layer(layer, h, kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got["x"]


def _paired_error(w64: torch.Tensor, grams: tuple, w_kept: torch.Tensor) -> float:
    """||W X - W' X'||^2 / ||W X||^2 from the Gram triple (X^T X, X^T X', X'^T X') of some tokens."""
    c_dense, cross, c_kept = grams
    target = torch.einsum("oi,ij,oj->", w64, c_dense, w64).clamp_min(1e-300)
    return float((target - 2 * torch.einsum("oi,ik,ok->", w64, cross, w_kept)
                  + torch.einsum("ok,kl,ol->", w_kept, c_kept, w_kept)) / target)


def _refit(w: torch.Tensor, w_slice: torch.Tensor, grams: tuple, damp: float,
           held: tuple | None = None, held_tokens: int = 0) -> tuple[torch.Tensor, dict]:
    """The reader weight (out, k) best reproducing W X from X'_K: damped least squares (pulled toward the plain
    slice W_K) or W_K itself, whichever has the smaller relative error ||W X - W' X'||^2 / ||W X||^2 (both
    reported). ``grams`` = (X^T X (E, E), X^T X' (E, k), X'^T X' (k, k)) over every calibration token; with
    ``held`` (the same triple over the held-out tokens, also counted in ``grams``) the damping, or no refit, is
    first chosen by fitting on the other tokens and scoring on the held-out ones (as repair_held_out)."""
    w64, w_k = w.detach().double().cpu(), w_slice.detach().double().cpu()
    info: dict = {}
    if held is not None:
        fit = tuple(a - h for a, h in zip(grams, held))
        wc_fit = w64 @ fit[1]
        damp, info = choose_on_held_out(_paired_error(w64, held, w_k),
                                        lambda d: _paired_error(w64, held, _solve(fit[2], wc_fit, d, prior=w_k)[0]),
                                        damp, held_tokens)
    e_slice = _paired_error(w64, grams, w_k)
    if damp == "slice":
        return w_slice.detach().clone(), {"rel_error_slice": e_slice, "rel_error_lsq": e_slice, **info}
    solved = _solve(grams[2], w64 @ grams[1], damp, prior=w_k)[0]
    e_lsq = _paired_error(w64, grams, solved)
    best = solved if e_lsq < e_slice else w_k
    return best.to(dtype=w_slice.dtype, device=w_slice.device), {"rel_error_slice": e_slice,
                                                                 "rel_error_lsq": min(e_lsq, e_slice), **info}


def _gram_triple(x: torch.Tensor, xp: torch.Tensor) -> tuple:
    return x.T @ x, x.T @ xp, xp.T @ xp


def _add(a: tuple | None, b: tuple) -> tuple:
    return b if a is None else tuple(u + v for u, v in zip(a, b))


def _accumulate(pairs, hold_from: int | None) -> tuple:
    """(Gram triple over every token, the triple over the tokens from ``hold_from`` on or None, how many those
    are) of ``pairs``: (X (tokens, E) dense inputs, X' (tokens, k) sliced inputs) batch by batch, in token order."""
    every = held = None
    start = n_held = 0  # the batch's first token index in the flattened calibration windows
    for x, xp in pairs:
        every = _add(every, _gram_triple(x, xp))
        if hold_from is not None and start + x.shape[0] > hold_from:
            first = max(0, hold_from - start)
            held = _add(held, _gram_triple(x[first:], xp[first:]))
            n_held += x.shape[0] - first
        start += x.shape[0]
    return every, held, n_held


def _grams(dense_layer, layer, path, h_dense, h_pruned, kwargs, hold_from: int | None) -> tuple:
    """_accumulate over reader ``path``'s inputs: X in the dense layer, X' in the sliced one."""
    return _accumulate(((_reader_input(dense_layer, path, hd, kw), _reader_input(layer, path, hp, kw))
                        for hd, hp, kw in zip(h_dense, h_pruned, kwargs)), hold_from)


def repair_readers(dense: nn.Module, model: nn.Module, adapter: Adapter, calib: torch.Tensor, batch_size: int,
                   damp: float = 0.01, progress: bool = True, holdout: float = 0.0) -> dict:
    """Refit every reader of the sliced ``model`` layer by layer against ``dense`` (the same model before
    slicing): layer l's solve sees the inputs the repaired layers < l produce. With ``holdout`` > 0 the last
    windows of ``calib`` choose each reader's damping, or no refit (``_refit``). Returns per-layer errors."""
    device = next(model.parameters()).device
    hold_from = held_out_from(tuple(calib.shape), holdout)
    h_dense, h_pruned, kwargs = [], [], []
    with torch.no_grad():
        for b in range(0, calib.shape[0], batch_size):
            ids = calib[b: b + batch_size].to(device)
            h, kw = layer_calls(model, adapter, ids)
            h_pruned.append(h)
            kwargs.append(kw)
            h_dense.append(layer_calls(dense, adapter, ids)[0])
    dense_layers, layers = decoder_layers(dense, adapter), decoder_layers(model, adapter)
    per_layer = []
    for i in tqdm(range(len(layers)), desc="hidden repair", disable=not progress, leave=False):
        kw_i = [kw[i] for kw in kwargs]
        entry = {"layer": i}
        with torch.no_grad():
            for norm, readers in reader_groups(adapter):
                grams, held, n_held = _grams(dense_layers[i], layers[i], readers[0], h_dense, h_pruned, kw_i, hold_from)
                for path in readers:
                    lin = get_module(layers[i], path)
                    new, errs = _refit(get_module(dense_layers[i], path).weight, lin.weight, grams, damp, held, n_held)
                    lin.weight.copy_(new)
                    entry[path] = errs
            h_dense = [_run_layer(dense_layers[i], h, kw) for h, kw in zip(h_dense, kw_i)]
            h_pruned = [_run_layer(layers[i], h, kw) for h, kw in zip(h_pruned, kw_i)]
        per_layer.append(entry)
    head = {}
    if not is_tied(model, adapter):  # a tied head is the embedding: refitting it would change the inputs too
        with torch.no_grad():
            dn, pn = get_module(dense, adapter.model.final_norm), get_module(model, adapter.model.final_norm)
            grams, held, n_held = _accumulate(
                ((dn(hd).reshape(-1, hd.shape[-1]).double().cpu(), pn(hp).reshape(-1, hp.shape[-1]).double().cpu())
                 for hd, hp in zip(h_dense, h_pruned)), hold_from)
            lin = get_module(model, adapter.model.lm_head)
            new, head = _refit(get_module(dense, adapter.model.lm_head).weight, lin.weight, grams, damp, held, n_held)
            lin.weight.copy_(new)
    return {"layers": per_layer, "lm_head": head or "tied to the embedding: not refit"}
