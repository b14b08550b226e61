"""SliceGPT (Ashkboos et al., "SliceGPT: Compress Large Language Models by Deleting Rows and Columns", ICLR 2024;
reference code github.com/microsoft/TransformerCompression, src/slicegpt/rotate.py ``rotate_and_slice_sequential``
and layernorm_fusion.py), re-implemented for the hidden_prune benchmark (a baseline, not a gqaprune feature).

Llama family (LlamaForCausalLM) only. Steps, as in the paper's sequential variant with a constant slicing
schedule (their ``ConstSlicingScheduler``, ``do_slice_head=False``, the default of their scripts):

1. LayerNorm fusion: each RMSNorm's weight is folded into the columns of the linear layers that read it
   (input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, the final norm -> lm_head) and the norm
   becomes a weightless RMSNorm that divides by the ORIGINAL width D even after slicing (their ``RMSN``).
   Tied embeddings are untied first (the head is a clone of the embedding matrix).
2. Embeddings: Q_0 = PCA of the embedding outputs on the calibration windows; E <- E Q_0[:, :d].
3. Per layer l, sequentially on the already rotated-and-sliced model's activations:
   - attention inputs q/k/v <- W Q_in[:, :d], the attention shortcut starts as Q_in^T[:d, :];
   - Q_mid = PCA of the input of post_attention_layernorm (the residual after attention, full width D);
     o_proj <- (Q_mid^T W_o)[:d], attention shortcut <- Q_in^T[:d] Q_mid[:, :d] (d x d);
     gate/up <- W Q_mid[:, :d], the MLP shortcut starts as Q_mid^T[:d, :];
   - Q_out = PCA of the layer's output (full width D, with the attention/MLP boundary already sliced);
     down_proj <- (Q_out^T W_down)[:dim], MLP shortcut <- Q_mid^T[:d] Q_out[:, :dim] (d x dim);
     dim = d except the last layer, whose output stays D wide (the head is not sliced, do_slice_head=False).
   - The next layer's calibration inputs are the outputs rotated and sliced, Q_in <- Q_out.
4. Head: lm_head <- W_head Q_L (rotated, not sliced).

PCA as theirs: eigenvectors of sum_t x_t x_t^T (no centering) + 0.01 * mean(diag) * I, in float64, sorted by
descending eigenvalue. The residual stream of every layer reads ``residual @ shortcut_Q + block(x)``, so decoder
layers are replaced by a small wrapper (``SlicedLlamaLayer``); the result is not a stock architecture. The
shortcut matrices are nn.Parameters, so ``model.parameters()`` counts them, and the untied head too.
"""

from __future__ import annotations

import time

import torch
from torch import nn


class RMSN(nn.Module):
    """RMSNorm without weight, dividing by ``mean_dim`` (the original width) whatever the input width (SliceGPT's RMSN)."""

    def __init__(self, mean_dim: int, eps: float):
        super().__init__()
        self.mean_dim, self.eps = mean_dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / self.mean_dim + self.eps)
        return x.to(dtype)


class SlicedLlamaLayer(nn.Module):
    """A Llama decoder layer whose residual path goes through the shortcut matrices (identity while None)."""

    def __init__(self, layer: nn.Module, width: int, eps: float):
        super().__init__()
        self.self_attn, self.mlp = layer.self_attn, layer.mlp
        self.input_layernorm = RMSN(width, eps)
        self.post_attention_layernorm = RMSN(width, eps)
        self.attn_shortcut_Q: nn.Parameter | None = None
        self.mlp_shortcut_Q: nn.Parameter | None = None

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        residual = hidden_states
        h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                              position_ids=position_ids, cache=cache, use_cache=use_cache,
                              position_embeddings=position_embeddings, **kwargs)
        h = (residual if self.attn_shortcut_Q is None else residual @ self.attn_shortcut_Q) + h
        residual = h
        h = self.mlp(self.post_attention_layernorm(h))
        return (residual if self.mlp_shortcut_Q is None else residual @ self.mlp_shortcut_Q) + h


def pca(xs: list[torch.Tensor]) -> torch.Tensor:
    """Eigenvectors (columns, descending eigenvalue) of the damped uncentered second moment of the rows of ``xs``."""
    h = None
    for x in xs:
        x = x.reshape(-1, x.shape[-1]).double()
        h = x.T @ x if h is None else h + x.T @ x
    h.diagonal().add_(0.01 * h.diagonal().mean())
    val, vec = torch.linalg.eigh(h)
    return vec[:, torch.argsort(val, descending=True)]


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight = nn.Parameter(weight.to(linear.weight.dtype).contiguous(), requires_grad=False)
    linear.out_features, linear.in_features = weight.shape
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(linear.bias.dtype).contiguous(), requires_grad=False)


def _rotate_in(linear: nn.Linear, q: torch.Tensor, d: int) -> None:
    """A linear layer reading the rotated stream: W <- W Q[:, :d]."""
    _set(linear, (linear.weight.double() @ q)[:, :d])


def _rotate_out(linear: nn.Linear, q: torch.Tensor, d: int) -> None:
    """A linear layer writing the rotated stream: W <- (Q^T W)[:d] (and its bias)."""
    b = None if linear.bias is None else (q.T @ linear.bias.double())[:d]
    _set(linear, (q.T @ linear.weight.double())[:d], b)


def _fuse(norm: nn.Module, linears: list[nn.Linear]) -> None:
    w = norm.weight.detach().double()
    for lin in linears:
        _set(lin, lin.weight.double() * w[None, :])


def _param(t: torch.Tensor, dtype) -> nn.Parameter:
    return nn.Parameter(t.to(dtype).contiguous(), requires_grad=False)


class _Stop(Exception):
    pass


@torch.no_grad()
def _layer0_inputs(model, calib: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], list[dict]]:
    """The first decoder layer's input and keyword arguments (mask, position embeddings) per calibration batch."""
    inps, kws = [], []

    def grab(module, args, kwargs):
        inps.append((args[0] if args else kwargs.pop("hidden_states")).detach())
        kws.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, calib.shape[0], batch_size):
            try:
                model(input_ids=calib[i: i + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return inps, kws


@torch.no_grad()
def _signals(layer: SlicedLlamaLayer, inps, kws) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(inputs of post_attention_layernorm, layer outputs) for every calibration batch."""
    mids = []
    handle = layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: mids.append(a[0].detach()))
    try:
        outs = [layer(x, **kw) for x, kw in zip(inps, kws)]
    finally:
        handle.remove()
    return mids, outs


def slicegpt_param_count(config, kept: int) -> int:
    """The parameters ``slicegpt_prune`` leaves on a Llama config at width ``kept`` (head not sliced, norms fused,
    untied head, two shortcut matrices per layer; the last layer's MLP output and shortcut stay full width)."""
    v, width, n = config.vocab_size, config.hidden_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or width // config.num_attention_heads
    q, kv, inter = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
    per_layer = kept * (q + 2 * kv) + q * kept + 2 * inter * kept + inter * kept + kept * kept + kept * kept
    last_extra = inter * (width - kept) + kept * (width - kept)  # down_proj and MLP shortcut keep the full width
    return v * kept + v * width + n * per_layer + last_extra


@torch.no_grad()
def slicegpt_prune(model, calib: torch.Tensor, kept: int, batch_size: int = 8) -> dict:
    """Rotate (one PCA basis per residual position) and slice ``model`` in place to residual width ``kept``."""
    t0 = time.perf_counter()
    if type(model).__name__ != "LlamaForCausalLM":
        raise NotImplementedError(f"slicegpt_prune: Llama only, not {type(model).__name__}")
    cfg, inner = model.config, model.model
    width, eps = cfg.hidden_size, cfg.rms_norm_eps
    if not 0 < kept <= width:
        raise ValueError(f"kept {kept} outside 1..{width}")
    dtype = inner.embed_tokens.weight.dtype
    params_before = sum(p.numel() for p in model.parameters())
    tied = model.lm_head.weight is inner.embed_tokens.weight
    if tied:  # the head gets its own rotation (Q_L) and the embeddings theirs (Q_0): untie
        model.lm_head.weight = nn.Parameter(inner.embed_tokens.weight.detach().clone(), requires_grad=False)
        cfg.tie_word_embeddings = False
        if hasattr(cfg, "get_text_config"):
            cfg.get_text_config().tie_word_embeddings = False

    # 1. LayerNorm fusion
    layers = inner.layers
    for i, layer in enumerate(layers):
        a, m = layer.self_attn, layer.mlp
        _fuse(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj])
        _fuse(layer.post_attention_layernorm, [m.gate_proj, m.up_proj])
        layers[i] = SlicedLlamaLayer(layer, width, eps)
    _fuse(inner.norm, [model.lm_head])
    inner.norm = RMSN(width, eps)

    # 2. embeddings
    inps, kws = _layer0_inputs(model, calib, batch_size)
    q = pca(inps)
    emb = inner.embed_tokens
    emb.weight = _param((emb.weight.double() @ q)[:, :kept], dtype)
    emb.embedding_dim = kept
    inps = [(x.double() @ q)[..., :kept].to(dtype) for x in inps]

    # 3. layers, sequentially
    for i, layer in enumerate(layers):
        a, m = layer.self_attn, layer.mlp
        last = i == len(layers) - 1
        for lin in (a.q_proj, a.k_proj, a.v_proj):
            _rotate_in(lin, q, kept)
        shortcut = q.T[:kept]  # (kept, width)
        layer.attn_shortcut_Q = _param(shortcut, dtype)

        mids, _ = _signals(layer, inps, kws)
        q_mid = pca(mids)
        layer.attn_shortcut_Q = _param(shortcut @ q_mid[:, :kept], dtype)
        _rotate_out(a.o_proj, q_mid, kept)
        for lin in (m.gate_proj, m.up_proj):
            _rotate_in(lin, q_mid, kept)
        shortcut = q_mid.T[:kept]
        layer.mlp_shortcut_Q = _param(shortcut, dtype)
        del mids

        _, outs = _signals(layer, inps, kws)
        q = pca(outs)
        dim = width if last else kept
        layer.mlp_shortcut_Q = _param(shortcut @ q[:, :dim], dtype)
        _rotate_out(m.down_proj, q, dim)
        inps = [(x.double() @ q)[..., :dim].to(dtype) for x in outs]
        del outs

    # 4. head: rotated by the last layer's output basis, not sliced
    _set(model.lm_head, model.lm_head.weight.double() @ q)

    params = sum(p.numel() for p in model.parameters())
    shortcuts = sum(l.attn_shortcut_Q.numel() + l.mlp_shortcut_Q.numel() for l in layers)
    head = model.lm_head.weight.numel() if tied else 0
    return {"params": params, "params_before": params_before, "kept": kept, "shortcut_params": shortcuts,
            "untied_head_params": head, "untied_lm_head": tied, "seconds": round(time.perf_counter() - t0, 1),
            "note": (f"SliceGPT sequential rotate-and-slice to {kept}/{width}: per-layer PCA rotations, "
                     f"{shortcuts:,} shortcut-matrix parameters"
                     + (f", head untied ({head:,} parameters, rotated, not sliced)" if tied
                        else ", head rotated, not sliced") + "; norms fused into the linear layers")}
