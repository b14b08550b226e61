"""Builtin tiny models: ``builtin:tiny-llama``, ``builtin:tiny-qwen2``, ``builtin:tiny-phi3``.

Small decoder LMs of exactly those architectures (GQA 4:1: 8 query heads, 2 KV
heads, head_dim 64, hidden 384, MLP 1024, 4 layers), trained deterministically
on the ``builtin:pydoc`` train split the first time they are asked for, then
cached under :func:`cache_dir` in a folder keyed by a hash of the full training
recipe (architecture, tokenizer settings, training settings, corpus hash, code
version), so a changed recipe retrains into a new folder.

Each folder is a normal HF folder (``config.json``, ``model.safetensors``,
``generation_config.json``, tokenizer files) that stock
``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained`` load, plus
``builtin_info.json`` (recipe, training seconds, held-out and unigram
perplexity). The byte-level BPE tokenizer is shared by the three models and is
cached too.

Writes are atomic (build in a temp folder inside the cache, ``os.replace`` into
place) and guarded by an ``fcntl.flock`` lock file, so two processes never
train the same model at once and nobody sees a half-written folder.

``python -m gqaprune.builtin.tiny warm`` trains (or finds) all three and
prints their training seconds and perplexities.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from gqaprune.errors import InputError

CODE_VERSION = 1  # bump when training code changes in a way that changes the weights

BUILTIN_MODELS: tuple[str, ...] = ("builtin:tiny-llama", "builtin:tiny-qwen2", "builtin:tiny-phi3")

CORPUS_SOURCE = "builtin:pydoc"
EOS_TOKEN = "<|endoftext|>"

# Qwen2's pre-tokenizer split (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX)
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

TOKENIZER_SETTINGS: dict = {
    "kind": "byte_level_bpe",
    "vocab_size": 2048,  # including the special token; a multiple of 64
    "min_frequency": 2,
    "special_tokens": [EOS_TOKEN],  # id 0; bos = eos = pad
    # The Qwen2 pipeline (NFC, Qwen2 split regex, byte level without its own regex): AutoTokenizer
    # rebuilds exactly this pipeline for model_type qwen2 whatever tokenizer.json says, so using it
    # for all three keeps the tokenizer identical in every builtin folder.
    "normalizer": "NFC",
    "pre_tokenizer": "qwen2_split_regex+byte_level",
    "add_prefix_space": False,
    "source": CORPUS_SOURCE,
    "split": "train",
    "model_max_length": 512,
}

_SHAPE: dict = {
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.02,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "attention_dropout": 0.0,
    "use_cache": True,
}

ARCH_CONFIGS: dict[str, dict] = {
    "builtin:tiny-llama": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **_SHAPE,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "builtin:tiny-qwen2": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],  # q/k/v carry biases in Qwen2 by construction
        **_SHAPE,
        "use_sliding_window": False,
    },
    "builtin:tiny-phi3": {
        "model_type": "phi3",
        "architectures": ["Phi3ForCausalLM"],  # fused qkv_proj and gate_up_proj
        **_SHAPE,
        "original_max_position_embeddings": 512,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
    },
}

TRAIN_SETTINGS: dict = {
    "steps": 160,  # ~2.5-3.5 min on 2 idle CPU cores; reaches ~0.25x the unigram perplexity
    "batch_size": 16,
    "seq_len": 128,
    "lr": 2e-3,
    "warmup_steps": 20,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "betas": [0.9, 0.95],
    "grad_clip": 1.0,
    "seed": 0,
    "eval_seq_len": 128,
}


# --------------------------------------------------------------------------- cache

def cache_dir() -> Path:
    """``$GQAPRUNE_CACHE`` or ``~/.cache/gqaprune``."""
    env = os.environ.get("GQAPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gqaprune"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_corpus_sha_memo: dict[str, str] = {}


def _corpus_sha(split: str = "train") -> str:
    if split not in _corpus_sha_memo:
        from gqaprune.io.data import load_text

        _corpus_sha_memo[split] = hashlib.sha256(load_text(CORPUS_SOURCE, split).encode()).hexdigest()
    return _corpus_sha_memo[split]


def tokenizer_recipe(settings: dict | None = None) -> dict:
    """Everything the tokenizer depends on (its cache key is a hash of this)."""
    return {
        "code_version": CODE_VERSION,
        "tokenizer": dict(settings or TOKENIZER_SETTINGS),
        "corpus_sha256": _corpus_sha("train"),
    }


def model_recipe(name: str) -> dict:
    """The full training recipe of builtin ``name`` (its cache key is a hash of this)."""
    _check_name(name)
    return {
        "code_version": CODE_VERSION,
        "name": name,
        "config": copy.deepcopy(ARCH_CONFIGS[name]),
        "tokenizer": tokenizer_recipe(),
        "train": copy.deepcopy(TRAIN_SETTINGS),
        "corpus_sha256": _corpus_sha("train"),
    }


def recipe_key(recipe: dict) -> str:
    """12 hex digits identifying a recipe."""
    return _digest(recipe)[:12]


def builtin_folder(name: str, recipe: dict | None = None) -> Path:
    """Where builtin ``name`` trained with ``recipe`` (default: the current one) lives in the cache."""
    _check_name(name)
    recipe = model_recipe(name) if recipe is None else recipe
    return cache_dir() / f"{name.split(':', 1)[1]}-{recipe_key(recipe)}"


def _check_name(name: str) -> None:
    if name not in BUILTIN_MODELS:
        raise InputError(f"unknown builtin model '{name}'; valid builtin models: {', '.join(BUILTIN_MODELS)}")


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_temps(final: Path) -> None:
    """Delete temp folders left by killed builders: ours (we hold its lock) and any whose lock is free."""
    for stale in final.parent.glob(".tmp-*"):
        owner = stale.name[len(".tmp-"):].rsplit("-", 1)[0]
        if owner == final.name:
            shutil.rmtree(stale, ignore_errors=True)
            continue
        lock = final.parent / f".{owner}.lock"
        try:
            with open(lock, "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its builder is alive
                try:
                    shutil.rmtree(stale, ignore_errors=True)
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
        except OSError:
            pass


def _build_atomically(final: Path, build, progress: bool) -> Path:
    """Return ``final``; if missing, run ``build(tmp_dir)`` under a lock and move it into place."""
    if (final / "config.json").exists() or (final / "tokenizer.json").exists():
        return final
    with _locked(final.parent / f".{final.name}.lock"):
        if final.exists():  # someone else finished it while we waited
            return final
        _remove_stale_temps(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            build(tmp, progress)
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a shared cache must be readable
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tokenizer

def train_tokenizer(settings: dict | None = None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on the builtin corpus (deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gqaprune.io.data import load_units

    s = dict(settings or TOKENIZER_SETTINGS)
    if s.get("normalizer") != "NFC" or s.get("pre_tokenizer") != "qwen2_split_regex+byte_level":
        raise InputError("builtin tokenizer: only normalizer NFC with pre_tokenizer qwen2_split_regex+byte_level is supported")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=s["add_prefix_space"], use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=s["vocab_size"],
        min_frequency=s["min_frequency"],
        special_tokens=list(s["special_tokens"]),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(load_units(s["source"], s["split"]), trainer=trainer)
    eos = s["special_tokens"][0]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=eos,
        eos_token=eos,
        pad_token=eos,
        unk_token=None,
        model_max_length=s["model_max_length"],
        clean_up_tokenization_spaces=False,
    )


def tokenizer_folder() -> Path:
    return cache_dir() / f"tokenizer-{recipe_key(tokenizer_recipe())}"


def resolve_tokenizer(progress: bool = True) -> Path:
    """The cached shared tokenizer folder (trained on first use)."""

    def build(tmp: Path, progress: bool) -> None:
        _log("gqaprune: training the builtin byte-level BPE tokenizer", progress)
        train_tokenizer().save_pretrained(str(tmp))
        (tmp / "builtin_info.json").write_text(json.dumps({"recipe": tokenizer_recipe()}, indent=2, sort_keys=True))

    return _build_atomically(tokenizer_folder(), build, progress)


def load_builtin_tokenizer(progress: bool = True):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_tokenizer(progress)))


# --------------------------------------------------------------------------- metrics

def unigram_perplexity(tokenizer, source: str = CORPUS_SOURCE) -> float:
    """Perplexity on ``source``'s validation tokens of a unigram model fitted (add-one) on its train tokens."""
    from gqaprune.io.data import token_stream

    train = token_stream(tokenizer, source, "train").tolist()
    val = token_stream(tokenizer, source, "validation").tolist()
    vocab = len(tokenizer)
    counts = Counter(train)
    denom = len(train) + vocab
    nll = -sum(math.log((counts.get(t, 0) + 1) / denom) for t in val)
    return math.exp(nll / len(val))


def heldout_perplexity(model, tokenizer, source: str = CORPUS_SOURCE, split: str = "validation",
                       seq_len: int = 128, batch_size: int = 16) -> float:
    """Perplexity over non-overlapping ``seq_len`` windows of the split's token stream (tail included)."""
    import torch

    from gqaprune.io.data import token_stream

    stream = token_stream(tokenizer, source, split)
    windows = [stream[i : i + seq_len] for i in range(0, stream.numel() - 1, seq_len)]
    windows = [w for w in windows if w.numel() >= 2]
    was_training = model.training
    model.eval()
    total_nll, total_n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            for w in ([torch.stack(chunk)] if len({c.numel() for c in chunk}) == 1 else [c[None] for c in chunk]):
                logits = model(input_ids=w).logits.float()  # (b, t, vocab)
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1), reduction="sum"
                )
                total_nll += loss.item()
                total_n += w[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_nll / total_n)


# --------------------------------------------------------------------------- models

def build_config(name: str, tokenizer):
    """The transformers config of builtin ``name`` for ``tokenizer``."""
    from transformers import AutoConfig

    _check_name(name)
    d = copy.deepcopy(ARCH_CONFIGS[name])
    model_type = d.pop("model_type")
    eos = tokenizer.eos_token_id
    d.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=eos)
    cfg = AutoConfig.for_model(model_type, **d)
    cfg.head_dim = d["head_dim"]  # explicit even where the config class derives it from hidden/heads
    return cfg


def _lr_at(step: int, t: dict) -> float:
    if step < t["warmup_steps"]:
        return t["lr"] * (step + 1) / t["warmup_steps"]
    frac = (step - t["warmup_steps"]) / max(1, t["steps"] - t["warmup_steps"])
    return t["lr"] * (t["min_lr_ratio"] + (1 - t["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * frac)))


def train_model(name: str, tokenizer, train: dict | None = None, progress: bool = True, config=None):
    """Train builtin ``name`` from scratch (or, for benchmarks, a model of ``config`` the same way);
    returns ``(model, wall_seconds)``."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from gqaprune.io.data import token_stream

    t = dict(train or TRAIN_SETTINGS)
    cfg = config if config is not None else build_config(name, tokenizer)
    torch.manual_seed(t["seed"])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.train()

    stream = token_stream(tokenizer, CORPUS_SOURCE, "train")
    seq, bs = t["seq_len"], t["batch_size"]
    gen = torch.Generator().manual_seed(t["seed"])

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t["lr"], betas=tuple(t["betas"]),
    )
    start = time.perf_counter()
    bar = tqdm(range(t["steps"]), desc=f"training {name}", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, t)
        starts = torch.randint(0, stream.numel() - seq - 1, (bs,), generator=gen)
        batch = torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])  # (bs, seq+1)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        if step % 10 == 0 or step == t["steps"] - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model, time.perf_counter() - start


def resolve_builtin(name: str, progress: bool = True) -> Path:
    """The cached HF folder of builtin ``name``, training it (and the tokenizer) on first use."""
    _check_name(name)
    final = builtin_folder(name)
    if (final / "config.json").exists():
        return final

    def build(tmp: Path, progress: bool) -> None:
        import torch
        from transformers import AutoTokenizer, GenerationConfig

        tok_dir = resolve_tokenizer(progress)
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        _log(f"gqaprune: training {name} on {CORPUS_SOURCE} (first use, a few minutes; cached in {final})", progress)
        cpu0 = time.process_time()
        model, seconds = train_model(name, tokenizer, progress=progress)
        cpu_seconds = time.process_time() - cpu0
        ppl = heldout_perplexity(model, tokenizer, seq_len=TRAIN_SETTINGS["eval_seq_len"])
        uni = unigram_perplexity(tokenizer)
        _log(f"gqaprune: {name}: {seconds:.0f}s, held-out ppl {ppl:.2f}, unigram ppl {uni:.2f}", progress)
        model.config.architectures = list(ARCH_CONFIGS[name]["architectures"])
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, max_length=ARCH_CONFIGS[name]["max_position_embeddings"],
        )
        model.to(torch.float32).save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        n_params = sum(p.numel() for p in model.parameters())
        info = {
            "name": name, "recipe": model_recipe(name), "train_seconds": round(seconds, 2),
            "train_cpu_seconds": round(cpu_seconds, 2),
            "heldout_ppl": ppl, "unigram_ppl": uni, "num_parameters": n_params,
            "eval": {"source": CORPUS_SOURCE, "split": "validation", "seq_len": TRAIN_SETTINGS["eval_seq_len"],
                     "validation_sha256": _corpus_sha("validation")},
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        }
        (tmp / "builtin_info.json").write_text(json.dumps(info, indent=2, sort_keys=True))

    return _build_atomically(final, build, progress)


def builtin_info(name: str, progress: bool = True) -> dict:
    """``builtin_info.json`` of builtin ``name`` (trains it on first use)."""
    return json.loads((resolve_builtin(name, progress) / "builtin_info.json").read_text())


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["warm"] or len(argv) > 2:
        print("usage: python -m gqaprune.builtin.tiny warm [NAME]", file=sys.stderr)
        return 2
    names = BUILTIN_MODELS if len(argv) == 1 else (argv[1],)
    try:
        for name in names:
            folder = resolve_builtin(name)
            info = json.loads((folder / "builtin_info.json").read_text())
            print(
                f"{name}: train_seconds={info['train_seconds']:.1f} heldout_ppl={info['heldout_ppl']:.2f} "
                f"unigram_ppl={info['unigram_ppl']:.2f} params={info['num_parameters']} folder={folder}",
                flush=True,
            )
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
