"""Text sources and their fixed train/validation split, and calibration windows.

Sources: ``builtin:pydoc`` (the English text of Python's ``pydoc_data.topics``),
a ``.txt`` file, a ``.jsonl`` file (field ``text`` unless ``field`` says
otherwise) or a dataset saved on local disk with ``datasets.save_to_disk``.

The split is fixed and documented (README, "Text sources"):
- text sources (``builtin:pydoc``, ``.txt``) are cut into paragraphs at blank
  lines; paragraph ``i`` (0-based, in file order; pydoc topics in sorted key
  order) belongs to ``validation`` when ``i % 10 == 9``, else to ``train``;
- record sources (``.jsonl``, saved datasets) use the same rule on record
  index, unless a saved ``DatasetDict`` has its own ``train``/``validation``
  splits, which are then used as they are.
A validation unit that also occurs word for word among the train units is left out of
``validation`` (pydoc topics repeat passages). ``all`` is every paragraph or record. The two
splits never share a unit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gqaprune.errors import InputError

SPLITS = ("train", "validation", "all")
VALIDATION_EVERY = 10  # unit i is validation when i % 10 == 9


def _take_split(units: list[str], split: str) -> list[str]:
    if split == "all":
        return units
    train = [u for i, u in enumerate(units) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    if split == "train":
        return train
    # a validation unit repeated word for word in train would be scored on training text: leave it out
    seen = {u.strip() for u in train}
    return [u for i, u in enumerate(units) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 and u.strip() not in seen]


def _paragraphs(text: str) -> list[str]:
    paras = [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n")]
    return [p for p in paras if p.strip()]


def _pydoc_text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def load_units(source: str, split: str = "train", field: str = "text") -> list[str]:
    """The paragraphs or records of ``source`` that belong to ``split``."""
    if split not in SPLITS:
        raise InputError(f"split '{split}' is not one of {', '.join(SPLITS)}")
    if source == "builtin:pydoc":
        return _take_split(_paragraphs(_pydoc_text()), split)
    if source.startswith("builtin:"):
        raise InputError(f"unknown builtin text source '{source}'; the builtin one is builtin:pydoc")
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"text source '{source}' does not exist (expected builtin:pydoc, a .txt, a .jsonl or a saved dataset folder)")
    try:
        if path.is_dir():
            return _dataset_units(path, split, field)
        if path.suffix == ".jsonl":
            records = []
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{source}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or field not in rec:
                    raise InputError(f"{source}:{lineno}: record has no field '{field}' (set `field:` to the text field)")
                records.append(str(rec[field]))
            units = _take_split(records, split)
        else:
            units = _take_split(_paragraphs(path.read_text(encoding="utf-8")), split)
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read text source '{source}': {e}") from None
    if not units:
        raise InputError(f"text source '{source}' has no text in split '{split}'")
    return units


def _dataset_units(path: Path, split: str, field: str) -> list[str]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise InputError("reading a saved dataset needs the 'datasets' package") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds
        raise InputError(f"'{path}' is not a dataset saved with save_to_disk: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split in ds:
            return [str(x) for x in ds[split][field]]
        if split == "all":
            return [str(x) for name in sorted(ds) for x in ds[name][field]]
        if len(ds) != 1:
            raise InputError(f"dataset '{path}' has splits {sorted(ds)}, none named '{split}'")
        ds = ds[next(iter(ds))]
    if field not in ds.column_names:
        raise InputError(f"dataset '{path}' has no column '{field}' (columns: {ds.column_names})")
    return _take_split([str(x) for x in ds[field]], split)


def load_text(source: str, split: str = "train", field: str = "text") -> str:
    """The text of ``source``'s ``split`` as one string, units joined by blank lines."""
    return "\n\n".join(load_units(source, split, field))


def token_stream(tokenizer, source: str, split: str, field: str = "text") -> torch.Tensor:
    """All tokens of a split as one 1-D LongTensor (units tokenized and joined with EOS)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for unit in load_units(source, split, field):
        ids.extend(tokenizer(unit, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokenizer, source: str, split: str, samples: int, seq_len: int, seed: int,
                        field: str = "text") -> torch.Tensor:
    """``samples`` seeded token windows of ``seq_len`` tokens: (samples, seq_len)."""
    stream = token_stream(tokenizer, source, split, field)
    if stream.numel() < seq_len + 1:
        raise InputError(
            f"calibration source '{source}' ({split}) has {stream.numel()} tokens, fewer than one window of seq_len={seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (samples,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])  # (samples, seq_len)
