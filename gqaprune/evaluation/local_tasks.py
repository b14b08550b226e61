"""The lm-eval tasks shipped with gqaprune, built offline from ``builtin:pydoc``.

Two tasks, both made deterministically from the *validation* split of
``builtin:pydoc`` (see :mod:`gqaprune.io.data`), so that they never overlap the
text the builtin models (and calibration) use. pydoc repeats passages across
topics, so validation paragraphs whose text also occurs in the train split are
left out (:func:`heldout_units`), as are MC items whose true continuation
occurs there.

``gqaprune_pydoc_rolling``
    ``loglikelihood_rolling`` over the first :data:`ROLLING_DOCS` held-out
    validation paragraphs of at least :data:`ROLLING_MIN_CHARS` characters, raw text as
    the corpus has it. Metrics: ``word_perplexity``, ``byte_perplexity``,
    ``bits_per_byte``.

``gqaprune_pydoc_mc``
    ``multiple_choice`` "which passage does this continue" task. Prose
    paragraphs (whitespace collapsed to single spaces) are cut at word
    boundaries into a context of ~80-150 characters and the true continuation
    that follows it (:data:`MC_CONT_MIN`-:data:`MC_CONT_MAX` characters);
    consecutive items of one paragraph use consecutive, non-overlapping
    continuations. Each item shows the *continuation* once and offers four
    candidate *contexts*: the true one and three contexts of items from other
    paragraphs, of about the same length (within :data:`MC_CTX_TOLERANCE`
    characters where the pool allows). The model picks the context under which
    the continuation is most likely (lm-eval's multiple-input form, as in
    Winogrande: ``doc_to_text`` is the answer index, ``doc_to_choice`` the
    contexts, ``doc_to_target`` the continuation).

    Why not one context and four continuations: the log-likelihood of four
    *different* continuations is dominated by how common each string is on its
    own, not by the context, so a small trained model scores near chance on it
    (measured with ``builtin:tiny-llama``: acc 0.27). Scoring the *same*
    continuation under four contexts cancels that term exactly: a random-init
    model is at chance and a trained one well above it. Metric: ``acc``
    (chance 0.25). ``acc_norm`` is not listed: in the multiple-input form
    lm-eval normalises by the length of the contexts, which means nothing
    here. Answer positions are shuffled; everything is seeded
    (:data:`MC_SEED`).

The data (JSONL) and task YAMLs (``dataset_path: json`` with absolute
``data_files``, and a ``cache_dir`` inside the folder so that ``datasets``
keeps its Arrow copy there rather than in the user's HF cache) are written to ``$GQAPRUNE_CACHE/lm_eval_tasks/<key>/`` where
``<key>`` hashes the generator version, its settings and the validation and
train text (so another Python's pydoc text gets its own folder). The folder is built in a
temporary directory and moved into place with ``os.replace``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

GENERATOR_VERSION = 3

SOURCE = "builtin:pydoc"
SPLIT = "validation"

ROLLING_TASK = "gqaprune_pydoc_rolling"
MC_TASK = "gqaprune_pydoc_mc"
LOCAL_TASKS: tuple[str, ...] = (ROLLING_TASK, MC_TASK)

ROLLING_DOCS = 60
ROLLING_MIN_CHARS = 150

MC_ITEMS = 200
MC_SEED = 1234
MC_PREFIX_MIN = 80  # the first item of a paragraph needs at least this much context
MC_PREFIX_MAX = 150  # later items keep the last <= 150 characters as context
MC_CONT_MIN = 60
MC_CONT_MAX = 80
MC_CTX_TOLERANCE = 5  # distractor contexts within this many characters of the true context's length
MC_NUM_CHOICES = 4
MC_PROSE_RATIO = 0.75  # letters and spaces / characters; drops tables and code
MC_MIN_PARAGRAPH = 80

_SETTINGS = {
    "generator_version": GENERATOR_VERSION,
    "source": SOURCE,
    "split": SPLIT,
    "exclude_train_overlap": True,
    "rolling": {"docs": ROLLING_DOCS, "min_chars": ROLLING_MIN_CHARS},
    "mc": {
        "items": MC_ITEMS,
        "seed": MC_SEED,
        "prefix": [MC_PREFIX_MIN, MC_PREFIX_MAX],
        "continuation": [MC_CONT_MIN, MC_CONT_MAX],
        "choices": MC_NUM_CHOICES,
        "format": "contexts",
        "context_tolerance": MC_CTX_TOLERANCE,
        "prose_ratio": MC_PROSE_RATIO,
        "min_paragraph": MC_MIN_PARAGRAPH,
    },
}


def _cache_root() -> Path:
    env = os.environ.get("GQAPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gqaprune"


def _norm(text: str) -> str:
    return " ".join(text.split())


def _source() -> tuple[list[str], list[str]]:
    """(validation units, train units) of the source."""
    from gqaprune.io.data import load_units

    return load_units(SOURCE, SPLIT), load_units(SOURCE, "train")


def heldout_units(units: list[str], train: list[str]) -> list[str]:
    """The validation paragraphs whose text does not also occur in the train split.

    ``pydoc_data.topics`` repeats passages between topics, so about a third of
    the validation paragraphs appear verbatim in train paragraphs; a model
    trained on train would have memorised them. They are left out of both tasks.
    """
    train_text = "\n".join(_norm(t) for t in train)
    return [u for u in units if _norm(u) not in train_text]


def tasks_key(units: list[str] | None = None, train: list[str] | None = None) -> str:
    """12 hex digits naming the task folder: generator version, settings, validation and train text."""
    if units is None or train is None:
        units, train = _source()
    h = hashlib.sha256(json.dumps(_SETTINGS, sort_keys=True).encode())
    h.update(hashlib.sha256("\n\n".join(units).encode()).digest())
    h.update(hashlib.sha256("\n\n".join(train).encode()).digest())
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------- data

def rolling_docs(units: list[str], train: list[str] = ()) -> list[dict]:
    """The rolling-perplexity documents: the first ROLLING_DOCS held-out paragraphs that are long enough."""
    docs = [u for u in heldout_units(units, list(train)) if len(u) >= ROLLING_MIN_CHARS][:ROLLING_DOCS]
    return [{"id": i, "text": t} for i, t in enumerate(docs)]


def _prose(u: str) -> bool:
    return sum(c.isalpha() or c == " " for c in u) / len(u) >= MC_PROSE_RATIO


def _words(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def _items_of(text: str, rng: random.Random) -> list[tuple[str, str]]:
    """(prefix, continuation) pairs cut from one collapsed paragraph at word boundaries.

    Each continuation aims at a seeded length in [MC_CONT_MIN + 2, MC_CONT_MAX - 2]
    so that distractors can match its length from both sides.
    """
    words = _words(text)
    out = []
    k = next((i for i in range(1, len(words)) if words[i - 1][1] >= MC_PREFIX_MIN), None)
    while k is not None and k < len(words):
        end_prefix = words[k - 1][1]
        j = next((i for i in range(k) if end_prefix - words[i][0] <= MC_PREFIX_MAX), k)
        if j >= k:  # one word longer than the context window: skip it
            k += 1
            continue
        target = rng.randint(MC_CONT_MIN + 2, MC_CONT_MAX - 2)
        m = _closest_end(words, k, target)
        if m is None:
            if words[-1][1] - words[k][0] < MC_CONT_MIN:
                break  # not enough text left
            k += 1  # an overlong word
            continue
        out.append((text[words[j][0]:end_prefix], text[words[k][0]:words[m][1]]))
        k = m + 1
    return out


def _closest_end(words: list[tuple[int, int]], k: int, target: int) -> int | None:
    """The last word index m >= k making the span [k..m] MC_CONT_MIN..MC_CONT_MAX chars, closest to target."""
    best = None
    for m in range(k, len(words)):
        n = words[m][1] - words[k][0]
        if n > MC_CONT_MAX:
            break
        if n >= MC_CONT_MIN and (best is None or abs(n - target) < abs(best[1] - target)):
            best = (m, n)
    return None if best is None else best[0]


def mc_docs(units: list[str], train: list[str] = ()) -> list[dict]:
    """The multiple-choice items (deterministic for given units).

    Each item: ``contexts`` (four), ``continuation`` and ``label`` (index of
    the true context). Only held-out paragraphs (:func:`heldout_units`) are
    used, and items whose continuation still occurs in the train text are
    dropped. ``paragraph`` is the index of the item's paragraph in ``units``.
    """
    train_text = "\n".join(_norm(t) for t in train)
    paras = [(i, _norm(u)) for i, u in enumerate(units) if _norm(u) not in train_text]
    paras = [(i, t) for i, t in paras if len(t) >= MC_MIN_PARAGRAPH and _prose(t)]
    rng = random.Random(MC_SEED)
    candidates = [(i, prefix, cont) for i, t in paras for prefix, cont in _items_of(t, rng)
                  if cont not in train_text]
    # distractor contexts are the contexts of all candidate items: the same kind of
    # text, cut the same way (some start at a paragraph's beginning, most mid-paragraph)
    pool = sorted({(i, prefix) for i, prefix, _ in candidates}, key=lambda x: (len(x[1]), x[0], x[1]))
    if len(candidates) > MC_ITEMS:
        keep = sorted(rng.sample(range(len(candidates)), MC_ITEMS))
        candidates = [candidates[k] for k in keep]
    texts = dict(paras)
    all_text = "\n".join(t for _, t in paras)
    docs = []
    for n, (i, prefix, cont) in enumerate(candidates):
        contexts = [prefix] + _distractor_contexts(rng, pool, i, prefix, cont, texts[i], all_text)
        order = list(range(MC_NUM_CHOICES))
        rng.shuffle(order)
        docs.append({"id": n, "paragraph": i, "contexts": [contexts[o] for o in order],
                     "continuation": cont, "label": order.index(0)})
    return docs


def _distractor_contexts(rng: random.Random, pool: list[tuple[int, str]], own: int, prefix: str,
                         cont: str, own_text: str, all_text: str) -> list[str]:
    """MC_NUM_CHOICES - 1 contexts from other paragraphs, as close to ``prefix``'s length as the pool allows.

    A context whose text also occurs in the item's own paragraph, or which some
    paragraph continues with ``cont`` (repeated passages), is never used.
    """
    others = [(abs(len(p) - len(prefix)), p) for i, p in pool
              if i != own and p not in own_text and f"{p} {cont}" not in all_text]
    others.sort(key=lambda x: x[0])
    near = [p for d, p in others if d <= MC_CTX_TOLERANCE]
    if len(near) < MC_NUM_CHOICES - 1:
        near = [p for _, p in others[: 4 * (MC_NUM_CHOICES - 1)]]
    picked: list[str] = []
    while len(picked) < MC_NUM_CHOICES - 1:
        p = near[rng.randrange(len(near))]
        if p not in picked:
            picked.append(p)
    return picked


# --------------------------------------------------------------------------- files

def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records)


def _rolling_yaml(data: Path) -> str:
    return f"""\
# Generated by gqaprune.evaluation.local_tasks (generator version {GENERATOR_VERSION}); do not edit.
task: {ROLLING_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
  cache_dir: {json.dumps(str(data.parent / "hf_datasets_cache"))}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: {GENERATOR_VERSION}.0
"""


def _mc_yaml(data: Path) -> str:
    return f"""\
# Generated by gqaprune.evaluation.local_tasks (generator version {GENERATOR_VERSION}); do not edit.
task: {MC_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
  cache_dir: {json.dumps(str(data.parent / "hf_datasets_cache"))}
output_type: multiple_choice
test_split: test
# multiple-input form: the answer index, the candidate contexts, the one continuation
doc_to_text: label
doc_to_choice: contexts
doc_to_target: continuation
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: {GENERATOR_VERSION}.0
"""


def task_files(final: Path, units: list[str] | None = None, train: list[str] | None = None) -> dict[str, str]:
    """File name -> text of every file of the task folder that lives at ``final``."""
    if units is None or train is None:
        units, train = _source()
    rolling, mc = final / f"{ROLLING_TASK}.jsonl", final / f"{MC_TASK}.jsonl"
    rdocs, mdocs = rolling_docs(units, train), mc_docs(units, train)
    meta = {"settings": _SETTINGS, "key": tasks_key(units, train), "tasks": list(LOCAL_TASKS),
            "counts": {ROLLING_TASK: len(rdocs), MC_TASK: len(mdocs)}}
    return {
        rolling.name: _jsonl(rdocs),
        mc.name: _jsonl(mdocs),
        f"{ROLLING_TASK}.yaml": _rolling_yaml(rolling),
        f"{MC_TASK}.yaml": _mc_yaml(mc),
        "gqaprune_tasks.json": json.dumps(meta, sort_keys=True, indent=2) + "\n",
    }


def _complete(folder: Path) -> bool:
    return (folder / "gqaprune_tasks.json").is_file() and all(
        (folder / f"{t}{ext}").is_file() for t in LOCAL_TASKS for ext in (".yaml", ".jsonl"))


def task_dir() -> Path:
    """The folder holding the shipped tasks' YAML and data (generated on first use)."""
    units, train = _source()
    root = _cache_root() / "lm_eval_tasks"
    final = root / tasks_key(units, train)
    if _complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        for name, text in task_files(final, units, train).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if final.exists() and not _complete(final):
            shutil.rmtree(final, ignore_errors=True)  # damaged by hand; rebuild it
        try:
            os.replace(tmp, final)
        except OSError:
            # another process put a complete folder there first (os.replace never
            # overwrites a non-empty directory); theirs has the same bytes
            if not _complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
