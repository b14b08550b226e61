"""Perplexity over a token stream.

Windows of ``seq_len`` tokens start every ``stride`` tokens (default ``stride =
seq_len``: disjoint windows). In a window, only tokens not scored by an earlier
window count (all of them in the first window), each predicted with the window's
preceding context, so every token after the first is scored exactly once.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seq_len: int = 128, stride: int | None = None, batch_size: int = 8,
               progress: bool = True, desc: str = "perplexity") -> dict:
    """Perplexity of ``model`` on the 1-D LongTensor ``tokens``; returns {perplexity, nll, tokens}."""
    stride = stride or seq_len
    assert 1 <= stride <= seq_len
    n = tokens.numel()
    if n < 2:
        raise ValueError("need at least two tokens to measure perplexity")
    windows = []  # (start, first scored target position inside the window)
    start, scored_to = 0, 0
    while True:
        end = min(start + seq_len, n)
        first = max(scored_to - start, 1) if start > 0 else 1
        windows.append((start, end, first))
        scored_to = end
        if end >= n:
            break
        start += stride
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tok = 0.0, 0
    for b in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = windows[b: b + batch_size]
        width = max(e - s for s, e, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        score = torch.zeros(len(chunk), width, dtype=torch.bool)
        for i, (s, e, first) in enumerate(chunk):
            ids[i, : e - s] = tokens[s:e]
            mask[i, : e - s] = 1
            score[i, first: e - s] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        target = ids[:, 1:].to(device)
        nll = -logp.gather(-1, target[..., None])[..., 0]  # (B, T-1)
        sel = score[:, 1:].to(device)
        total_nll += float(nll[sel].double().sum())
        total_tok += int(sel.sum())
    model.train(was_training)
    mean = total_nll / total_tok
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tok}
