from __future__ import annotations

from collections import Counter

import pytest

from cscompile.data.prompts import FAMILIES, load_prompts
from cscompile.errors import UserError


def test_shipped_set_has_five_families_of_at_least_eight():
    prompts = load_prompts()
    counts = Counter(p.family for p in prompts)
    assert set(counts) == set(FAMILIES)
    assert min(counts.values()) >= 8
    assert len({p.id for p in prompts}) == len(prompts)
    for p in prompts:
        if p.family == "retrieval":
            assert p.answer and p.answer in p.messages[-1]["content"]
            assert len(p.messages[-1]["content"]) > 4000


def test_family_filter_and_unknown_family():
    assert {p.family for p in load_prompts(families=["math"])} == {"math"}
    with pytest.raises(UserError, match="prompt families"):
        load_prompts(families=["poetry"])


def test_user_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\n")
    assert [p.messages[0]["content"] for p in load_prompts(txt)] == ["first", "second"]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(UserError, match="line 2 | invalid JSON"):
        load_prompts(bad)
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(UserError, match="'messages', 'prompt' or 'text'"):
        load_prompts(bad)
    with pytest.raises(UserError, match="no file"):
        load_prompts(tmp_path / "missing.jsonl")
