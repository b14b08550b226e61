"""Speed of the product: a ~300M-parameter Llama-shaped model, original vs pruned, on this CPU.

Prunes half the KV groups and 25% of the MLP channels (uniform, aligned to 64, head counts
LlamaConfig accepts), then measures in one run prefill tokens/s and greedy decode tokens/s of
both models (median of several runs, threads fixed), and compares the measured speedups with
the ideal ratios: FLOPs/token for prefill, weight bytes for decode.

    python -m benchmarks.speed
"""

from __future__ import annotations

import platform
import time

import torch
import transformers as tf

from benchmarks.common import context, median_time, table, write_result
from gqaprune.recipe import HeadPruneStage, NeuronPruneStage
from gqaprune.stages.head_prune import HeadPrune
from gqaprune.stages.neuron_prune import NeuronPrune

THREADS = 2
PREFILL = (1, 512)  # batch, tokens
DECODE_PROMPT, DECODE_NEW = 16, 32


def build():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                         intermediate_size=2816, num_hidden_layers=24, vocab_size=32000, tie_word_embeddings=False,
                         max_position_embeddings=2048)
    cfg.architectures = ["LlamaForCausalLM"]
    return tf.LlamaForCausalLM(cfg).eval()


def measure(model) -> dict:
    ids = torch.randint(0, 32000, PREFILL, generator=torch.Generator().manual_seed(1))
    prompt = ids[:, :DECODE_PROMPT]

    def prefill():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def decode():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=DECODE_NEW, min_new_tokens=DECODE_NEW, do_sample=False,
                           pad_token_id=0)

    t_prefill = median_time(prefill, repeats=5)
    t_decode = median_time(decode, repeats=5)
    with torch.no_grad():  # decode time without the prompt's prefill
        t_prompt = median_time(lambda: model(input_ids=prompt, use_cache=True), repeats=5)
    return {"prefill_tok_s": PREFILL[0] * PREFILL[1] / t_prefill,
            "decode_tok_s": DECODE_NEW / max(t_decode - t_prompt, 1e-9)}


def matmul_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


def main():
    torch.set_num_threads(THREADS)
    model = build()
    params0, mm0 = sum(p.numel() for p in model.parameters()), matmul_params(model)
    base = measure(model)
    calib = torch.randint(0, 32000, (4, 64), generator=torch.Generator().manual_seed(2))
    t = time.perf_counter()
    head = {"type": "head_prune", "unit": "group", "prune_ratio": 0.5, "score": "magnitude", "reconstruct": "none"}
    HeadPrune(HeadPruneStage(**head)).apply(context(model, calib, head))
    neur = {"type": "neuron_prune", "prune_ratio": 0.25, "score": "magnitude", "align": 64, "reconstruct": "none"}
    NeuronPrune(NeuronPruneStage(**neur)).apply(context(model, calib, neur))
    prune_s = time.perf_counter() - t
    params1, mm1 = sum(p.numel() for p in model.parameters()), matmul_params(model)
    pruned = measure(model)
    # ideal: prefill scales with matmul FLOPs (attention score FLOPs over 512 tokens included below),
    # decode with the bytes of weights read per token (matmul weights + the embedding row, negligible)
    attn_flops = lambda heads: 2 * 2 * 24 * heads * 64 * PREFILL[1] / 2  # QK^T and AV, causal half, per token
    fl0, fl1 = 2 * mm0 + attn_flops(16), 2 * mm1 + attn_flops(8)
    ideal_prefill, ideal_decode = fl0 / fl1, mm0 / mm1
    sp_prefill = pruned["prefill_tok_s"] / base["prefill_tok_s"]
    sp_decode = pruned["decode_tok_s"] / base["decode_tok_s"]
    rows = [
        ["parameters", f"{params0:,}", f"{params1:,}", f"x{params0 / params1:.3f}", "", ""],
        ["prefill tokens/s (1x512)", base["prefill_tok_s"], pruned["prefill_tok_s"], f"x{sp_prefill:.3f}",
         f"x{ideal_prefill:.3f} (FLOPs)", f"{sp_prefill / ideal_prefill:.2f}"],
        ["greedy decode tokens/s", base["decode_tok_s"], pruned["decode_tok_s"], f"x{sp_decode:.3f}",
         f"x{ideal_decode:.3f} (weight bytes)", f"{sp_decode / ideal_decode:.2f}"],
    ]
    md = (f"## Speed: original vs pruned (~300M Llama shape, CPU)\n\n"
          f"`python -m benchmarks.speed` — random-init Llama (24 layers, hidden 1024, 16 Q / 4 KV heads, head_dim 64, "
          f"MLP 2816, vocab 32000), half the KV groups (16/4 -> 8/2 heads) and 25% of MLP channels (2816 -> 2112) "
          f"removed, uniform. fp32, {THREADS} threads, median of 5 runs, {platform.processor() or platform.machine()}; "
          f"pruning took {prune_s:.1f}s.\n\n"
          + table(["", "original", "pruned", "speedup", "ideal", "measured / ideal"], rows))
    write_result("speed", md)


if __name__ == "__main__":
    main()
