"""Builtin prompt sets, files with bad rows, the fixed split and the cursor."""

import pytest

from rlhf_ray.config import DataConfig
from rlhf_ray.data.prompts import DataError, PromptCursor, load_prompts, split_prompts


def test_movie_review_openings_come_from_the_gensim_wheel():
    records = load_prompts(DataConfig(opening_words=4))
    assert len(records) > 150
    assert all(1 <= len(r.text.split()) <= 4 for r in records)
    assert {r.label for r in records} == {"pos", "neg"}
    train, held = split_prompts(records, 0.2)
    again_train, again_held = split_prompts(load_prompts(DataConfig(opening_words=4)), 0.2)
    assert [r.uid for r in held] == [r.uid for r in again_held]
    assert not {r.uid for r in train} & {r.uid for r in held}
    assert 0.1 < len(held) / len(records) < 0.3


def test_jsonl_errors_name_file_line_and_field(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'prompt' is missing"):
        load_prompts(DataConfig(prompts=str(f)))
    f.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: invalid JSON"):
        load_prompts(DataConfig(prompts=str(f)))
    f.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: not valid UTF-8"):
        load_prompts(DataConfig(prompts=str(f)))
    f.write_text('{"prompt": 5}\n')
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'prompt' is not a string"):
        load_prompts(DataConfig(prompts=str(f)))


def test_cursor_serves_each_prompt_once_per_pass_with_pass_tagged_uids():
    records = load_prompts(DataConfig(prompts="tiny-counting"))[:5]
    cursor = PromptCursor(records, seed=3)
    first = cursor.take(5)
    assert sorted(p.uid for p in first) == sorted(f"{r.uid}#0" for r in records)
    second = cursor.take(5)
    assert all(p.uid.endswith("#1") for p in second)
    state = cursor.state_dict()
    resumed = PromptCursor(records, seed=0)
    resumed.load_state_dict(state)
    assert [p.uid for p in resumed.take(7)] == [p.uid for p in cursor.take(7)]


def test_empty_prompts_are_skipped_in_every_format_and_all_empty_is_an_error(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "  "}\n{"prompt": "real one"}\n{"prompt": ""}\n')
    assert [r.text for r in load_prompts(DataConfig(prompts=str(f)))] == ["real one"]
    f.write_text('{"prompt": "  "}\n')
    with pytest.raises(DataError, match="no non-empty prompts"):
        load_prompts(DataConfig(prompts=str(f)))
    bad = tmp_path / "p.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_prompts(DataConfig(prompts=str(bad)))
