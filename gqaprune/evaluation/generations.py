"""Greedy continuations of a few fixed prompts, and how repetitive they are.

Perplexity averages over every token; a pruned model can keep a fair perplexity and still fall into loops
when it writes. The card shows what the model writes before and after, and report.json records the share of
repeated 4-grams in what it wrote (rep-4 of Welleck et al., 2019: 1 - distinct 4-grams / all 4-grams, 0 when
no 4-gram repeats, close to 1 for a loop on one token).
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from gqaprune.io.checkpoint import _quiet_transformers

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "The three primary colors are",
    "To sort a list in Python, you can",
    "Once upon a time, in a small village,",
)
MAX_NEW_TOKENS = 40
NGRAM = 4


def repeated_ngram_share(token_ids: list[int], n: int = NGRAM) -> float:
    """1 - distinct n-grams / all n-grams of ``token_ids`` (0.0 when there are fewer than ``n`` tokens).
    ``k`` copies of one token give 1 - 1/(k - n + 1)."""
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts, max_new_tokens: int = MAX_NEW_TOKENS, progress: bool = False,
                         desc: str = "generations") -> dict:
    """Greedy continuation of each prompt (one at a time: no padding to get wrong). Returns the texts, the
    generated token ids' repeated 4-gram share per prompt, and its mean over prompts."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    # our own settings, not the model's generation_config (sampling, max_length, ... would change the texts)
    greedy = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=eos,
                              eos_token_id=eos)
    texts, shares = [], []
    for prompt in tqdm(prompts, desc=desc, file=sys.stderr, disable=not progress, leave=False, dynamic_ncols=True):
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)  # (1, prompt_len)
        with _quiet_transformers():  # no "max_new_tokens and max_length both set" line per prompt
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=greedy)
        new = out[0, ids.shape[1]:].tolist()  # (<= max_new_tokens,): stops after end-of-text
        assert len(new) <= max_new_tokens, (len(new), max_new_tokens)
        if new and new[-1] == eos:
            new = new[:-1]
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
        shares.append(repeated_ngram_share(new))
    model.train(was_training)
    return {"texts": texts, "repeated_4gram_share": sum(shares) / len(shares) if shares else 0.0,
            "repeated_4gram_share_per_prompt": shares}


def prompts_of(eval_cfg) -> tuple[str, ...]:
    """The recipe's ``eval.prompts``, or the default prompts when it gives none (``[]``: no generations)."""
    return DEFAULT_PROMPTS if eval_cfg.prompts is None else tuple(eval_cfg.prompts)


def generations_report(eval_cfg, before: dict, after: dict) -> dict | None:
    """``report["generations"]``: the prompts and, per side, the continuations and their repeated 4-gram share,
    moved out of the ``before``/``after`` eval dicts (which keep only scores)."""
    if "generations" not in before or "generations" not in after:
        return None
    report = {"prompts": list(prompts_of(eval_cfg)), "max_new_tokens": MAX_NEW_TOKENS, "ngram": NGRAM,
              "before": before.pop("generations"), "after": after.pop("generations")}
    for side, ev in (("before", before), ("after", after)):
        ev["repeated_4gram_share"] = report[side]["repeated_4gram_share"]  # the score stays beside perplexity
    return report
