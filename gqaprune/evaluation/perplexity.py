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


def scoring_windows(n: int, seq_len: int, stride: int | None) -> list[tuple[int, int, int]]:
    """(start, end, first scored target position inside the window) of every window over ``n`` tokens."""
    stride = stride or seq_len
    assert 1 <= stride <= seq_len
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
    return windows


def window_batch(tokens: torch.Tensor, chunk: list[tuple[int, int, int]]):
    """(ids, attention mask, scored positions), each (B, width), for a batch of windows (right-padded)."""
    width = max(e - s for s, e, _ in chunk)
    ids = torch.zeros(len(chunk), width, dtype=torch.long)
    mask = torch.zeros(len(chunk), width, dtype=torch.long)
    score = torch.zeros(len(chunk), width, dtype=torch.bool)
    for i, (s, e, first) in enumerate(chunk):
        ids[i, : e - s] = tokens[s:e]
        mask[i, : e - s] = 1
        score[i, first: e - s] = True
    return ids, mask, score


def batch_nll(logits: torch.Tensor, ids: torch.Tensor, score: torch.Tensor) -> tuple[float, int]:
    """(summed next-token NLL, token count) over the scored positions."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    target = ids[:, 1:].to(logits.device)
    nll = -logp.gather(-1, target[..., None])[..., 0]  # (B, T-1)
    sel = score[:, 1:].to(logits.device)
    return float(nll[sel].double().sum()), int(sel.sum())


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seq_len: int = 128, stride: int | None = None, batch_size: int = 8,
               progress: bool = True, desc: str = "perplexity") -> dict:
    """Perplexity of ``model`` on the 1-D LongTensor ``tokens``; returns {perplexity, nll, tokens}."""
    windows = scoring_windows(tokens.numel(), seq_len, stride)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tok = 0.0, 0
    for b in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = windows[b: b + batch_size]
        ids, mask, score = window_batch(tokens, chunk)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        nll, count = batch_nll(logits, ids, score)
        total_nll += nll
        total_tok += count
    model.train(was_training)
    mean = total_nll / total_tok
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tok}
