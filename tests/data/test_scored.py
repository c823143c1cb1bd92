"""Scored samples for IQL/CQL: JSONL and Parquet files with good and bad rows, pairs read as two
samples, Experience exports, the bad-row limit and the builtin movie-review-samples set."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_ray.data.prompts import DataError, movie_review_openings, split_prompts
from rlhf_ray.data.scored import (
    ScoredSample,
    load_scored_samples,
    movie_review_samples,
    split_samples,
)
from tests.data.test_preferences import _experience, _write_jsonl

GOOD = {"prompt": "The film", "response": " was lovely.", "reward": 0.8}


def test_jsonl_samples_pairs_and_finish_reason(tmp_path):
    f = tmp_path / "scored.jsonl"
    _write_jsonl(f, [
        GOOD,
        "",
        {**GOOD, "uid": "mine", "reward": -1, "finish_reason": "length"},
        {"prompt": "The film", "chosen": " was great.", "rejected": " was bad."},
    ])
    data = load_scored_samples(f)
    assert data.samples == [
        ScoredSample("scored-1", "The film", " was lovely.", 0.8),
        ScoredSample("mine", "The film", " was lovely.", -1.0, truncated=True),
        ScoredSample("scored-4-chosen", "The film", " was great.", 1.0),
        ScoredSample("scored-4-rejected", "The film", " was bad.", 0.0),
    ]
    assert data.skipped == {} and data.bad_rows == []


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "reward": 1.0}, "field 'response' is missing"),
    ({**GOOD, "response": "  "}, "field 'response' is empty"),
    ({**GOOD, "prompt": 3}, "field 'prompt' is not a string (int)"),
    ({**GOOD, "reward": None}, "field 'reward' is missing or null"),
    ({**GOOD, "reward": "high"}, "field 'reward' is not a number ('high')"),
    ({**GOOD, "reward": True}, "field 'reward' is not a number (True)"),
    ('{"prompt": "p", "response": "r", "reward": NaN}', "field 'reward' is not finite"),
    ('{"prompt": "p", "response": "r", "reward": 1e999}', "field 'reward' is not finite"),
    ({**GOOD, "reward": -1e300}, "field 'reward' is -1e+300, beyond +-1e+15"),
    ({**GOOD, "finish_reason": "eos"}, "field 'finish_reason' is 'eos'"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' are the same"),
    ("{not json", "invalid JSON"),
])
def test_bad_rows_are_named_by_file_line_and_field_and_skipped_within_the_limit(
        tmp_path, row, message):
    f = tmp_path / "scored.jsonl"
    _write_jsonl(f, [GOOD, row, GOOD])
    data = load_scored_samples(f, max_bad_rows=1)
    assert [s.uid for s in data.samples] == ["scored-1", "scored-3"]
    assert len(data.bad_rows) == 1 and data.bad_rows[0].startswith(f"{f}:2: ")
    assert message in data.bad_rows[0]
    with pytest.raises(DataError, match=r"scored.jsonl: 1 malformed scored rows, more than "
                                        r"max_bad_rows=0; the first: .*scored.jsonl:2: "):
        load_scored_samples(f)


def test_parquet_samples_pairs_and_missing_columns(tmp_path):
    f = tmp_path / "scored.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": [" x", None],
                             "reward": [1.0, 2.0]}), f)
    with pytest.raises(DataError, match=r"scored.parquet: row 1: field 'response' is missing"):
        load_scored_samples(f)
    data = load_scored_samples(f, max_bad_rows=1)
    assert data.samples == [ScoredSample("scored-0", "a", " x", 1.0)]
    pq.write_table(pa.table({"prompt": ["a"], "chosen": [" y"], "rejected": [" n"],
                             "uid": ["u"]}), f)
    assert [(s.uid, s.reward) for s in load_scored_samples(f).samples] == [
        ("u-chosen", 1.0), ("u-rejected", 0.0)]
    pq.write_table(pa.table({"prompt": ["a"], "text": ["b"]}), f)
    with pytest.raises(DataError, match=r"needs columns \['prompt', 'response', 'reward'\]"):
        load_scored_samples(f)
    with pytest.raises(DataError, match="unsupported scored-sample file type"):
        load_scored_samples(tmp_path / "scored.csv")
    with pytest.raises(DataError, match="no such file"):
        load_scored_samples(tmp_path / "missing.parquet")


def test_experience_export_gives_one_sample_per_row_with_text(tmp_path):
    table = _experience({"g1": [(" good", 0.9), (" bad", -0.5), ("", 1.0)]})
    table = table.set_column(table.schema.get_field_index("finish_reason"), "finish_reason",
                             pa.array(["stop", "length", "stop"]))
    f = tmp_path / "export.parquet"
    pq.write_table(table, f)
    assert load_scored_samples(f).samples == [
        ScoredSample("g1/0/0", "Tell me g1", " good", pytest.approx(0.9), False),
        ScoredSample("g1/1/0", "Tell me g1", " bad", -0.5, True),
    ]
    pq.write_table(_experience({"g": [("", 1.0)]}), f)
    with pytest.raises(DataError, match="no Experience row has both prompt and response text"):
        load_scored_samples(f)


def test_movie_review_samples_builtin_scores_with_vader_and_keeps_the_prompt_split():
    train, held_out = movie_review_samples(samples_per_prompt=4)
    openings = movie_review_openings(4)
    train_prompts, held_prompts = split_prompts(openings, 0.2)
    held_uids = {r.uid for r in held_prompts}
    for sample in train:
        prompt_uid, response_uid = sample.uid.split(":")
        assert prompt_uid not in held_uids and response_uid not in held_uids
    for sample in held_out:
        assert set(sample.uid.split(":")) <= held_uids
    # each prompt: its own continuation first, then 3 others
    own = [s for s in train if s.uid.split(":")[0] == s.uid.split(":")[1]]
    assert len(train) == 4 * len(own) and len(own) > 100
    from rlhf_ray.scoring.rewards import vader_reward

    vader = vader_reward()
    assert all(s.reward == pytest.approx(vader(s.prompt, s.response)) for s in train[:40])
    assert len({s.reward for s in train}) > 50  # a real spread of rewards, both signs
    assert min(s.reward for s in train) < -0.5 < 0.5 < max(s.reward for s in train)
    assert movie_review_samples(samples_per_prompt=4) == (train, held_out)  # deterministic


def test_split_samples_keeps_each_prompt_on_one_side():
    samples = [ScoredSample(f"{p}-{k}", f"prompt {p}", f" r{k}", float(k))
               for p in range(40) for k in range(3)]
    train, held = split_samples(samples, 0.25)
    assert not {s.prompt for s in train} & {s.prompt for s in held}
    assert len(train) + len(held) == len(samples) and held
    with pytest.raises(DataError, match="offline.eval_fraction=0.0"):
        split_samples(samples, 0.0)
