"""Fixtures for the evaluation tests: a small BPE tokenizer and a tiny random Llama, no downloads."""

from __future__ import annotations

import pytest

EOS = "<|endoftext|>"


def build_tokenizer(vocab_size: int = 512, paragraphs: int = 400):
    """A byte-level BPE trained on the first ``paragraphs`` train paragraphs of builtin:pydoc."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gqaprune.io.data import load_units

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(load_units("builtin:pydoc", "train")[:paragraphs], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, model_max_length=1024
    )


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return build_tokenizer()


def build_tiny_llama(tokenizer, seed: int = 0):
    """tests/tiny.py's Llama with the tokenizer's vocabulary and special tokens (1 KV head, 2 layers)."""
    from tiny import tiny_model

    return tiny_model("llama", seed=seed, vocab_size=len(tokenizer), intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="session")
def tiny_llama(bpe_tokenizer):
    return build_tiny_llama(bpe_tokenizer)


@pytest.fixture
def task_cache(tmp_path, monkeypatch):
    """A private GQAPRUNE_CACHE so generated task folders never touch the user's cache."""
    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
