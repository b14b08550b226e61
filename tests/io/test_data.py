"""Text sources: the fixed split has no overlap and is documented behaviour."""

import json

import pytest

from gqaprune.io.data import calibration_windows, load_units
from gqaprune.errors import InputError


def test_pydoc_split_is_disjoint_and_covers_the_text():
    train = load_units("builtin:pydoc", "train")
    val = load_units("builtin:pydoc", "validation")
    assert len(val) > 100 and len(train) > 9 * 100
    assert not {u.strip() for u in val} & {u.strip() for u in train}
    assert set(train) | set(val) <= set(load_units("builtin:pydoc", "all"))


def test_txt_and_jsonl_split_by_rule(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n".join(f"paragraph {i}" for i in range(20)))
    assert load_units(str(txt), "validation") == ["paragraph 9", "paragraph 19"]
    assert len(load_units(str(txt), "train")) == 18
    js = tmp_path / "a.jsonl"
    js.write_text("\n".join(json.dumps({"body": f"r{i}"}) for i in range(10)))
    assert load_units(str(js), "validation", field="body") == ["r9"]
    with pytest.raises(InputError, match="no field 'text'"):
        load_units(str(js), "train")


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_units(str(tmp_path / "nope.txt"))
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(InputError, match="has no text"):
        load_units(str(empty))


def test_calibration_windows_are_seeded():
    from tiny import builtin_tokenizer

    tok = builtin_tokenizer()
    a = calibration_windows(tok, "builtin:pydoc", "train", 4, 32, seed=0)
    b = calibration_windows(tok, "builtin:pydoc", "train", 4, 32, seed=0)
    c = calibration_windows(tok, "builtin:pydoc", "train", 4, 32, seed=1)
    assert a.shape == (4, 32) and (a == b).all() and not (a == c).all()
