"""Tiny random models of every supported family, built from config objects (no downloads)."""

from __future__ import annotations

import torch
import transformers as tf

FAMILIES = ("llama", "mistral", "qwen2", "phi3", "phi", "qwen3", "gemma3")

_COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(family: str, **overrides):
    kw = dict(_COMMON, **overrides)
    if family == "llama":
        return tf.LlamaConfig(**kw, tie_word_embeddings=False)
    if family == "mistral":
        return tf.MistralConfig(**kw, sliding_window=None, tie_word_embeddings=False)
    if family == "qwen2":
        return tf.Qwen2Config(**kw, tie_word_embeddings=False)
    if family == "phi3":
        return tf.Phi3Config(**kw, pad_token_id=0, tie_word_embeddings=False)
    if family == "phi":
        return tf.PhiConfig(**kw, tie_word_embeddings=False)
    if family == "qwen3":
        return tf.Qwen3Config(**kw, tie_word_embeddings=False)
    if family == "gemma3":
        # sliding window 4 < the 12-token test inputs, so a layer that lost its sliding/global type would change
        # the logits; tied embeddings as in the released Gemma 3 models
        n = kw["num_hidden_layers"]
        kw.setdefault("layer_types", ["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(n)])
        return tf.Gemma3TextConfig(**kw, sliding_window=4, pad_token_id=0, tie_word_embeddings=True)
    raise ValueError(family)


_CLASSES = {
    "llama": tf.LlamaForCausalLM,
    "mistral": tf.MistralForCausalLM,
    "qwen2": tf.Qwen2ForCausalLM,
    "phi3": tf.Phi3ForCausalLM,
    "phi": tf.PhiForCausalLM,
    "qwen3": tf.Qwen3ForCausalLM,
    "gemma3": tf.Gemma3ForCausalLM,
}


def tiny_model(family: str, seed: int = 0, attn_implementation: str = "eager", **overrides):
    """A random-init model in fp32, eval mode; biases randomised so that bias handling is tested."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = attn_implementation
    cls = _CLASSES[family]
    config.architectures = [cls.__name__]
    model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name and p.dim() == 1:
                p.uniform_(0.5, 1.5)  # non-trivial norm weights
    return model.eval()


def tiny_inputs(vocab_size: int = 96, batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=gen)


def builtin_tokenizer():
    """The package's BPE tokenizer (trained on the pydoc train split in seconds, then cached)."""
    from gqaprune.builtin.tiny import load_builtin_tokenizer

    tok = load_builtin_tokenizer(progress=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def save_tiny(family: str, folder, seed: int = 0, **overrides):
    """A tiny random model of ``family`` with the builtin tokenizer, saved as a normal HF folder."""
    tok = builtin_tokenizer()
    overrides.setdefault("vocab_size", len(tok))
    model = tiny_model(family, seed=seed, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **overrides)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return model, tok


RUN_EVAL = "eval: {perplexity: {max_tokens: 600, seq_len: 64}, lm_eval: {tasks: []}}\n"


def write_recipe(folder, model, stages: str, *, out="out", calibration="{samples: 8, seq_len: 32, batch_size: 4}",
                 eval_block=RUN_EVAL, runtime="", extra="", name="recipe.yaml"):
    """A small recipe file in ``folder`` (fast calibration and evaluation); ``stages`` is YAML list text."""
    from pathlib import Path

    r = Path(folder) / name
    r.write_text(f"model: {model}\n{runtime}calibration: {calibration}\n{eval_block}"
                 f"output: {Path(folder) / out}\n{extra}stages:\n{stages}")
    return r
