"""Preference pairs: JSONL and Parquet files with good and bad rows, the bad-row limit, the
best-against-worst recipe on Experience rows, and the builtin movie-review-preferences set."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_ray.data.preferences import (
    PreferencePair,
    load_preference_pairs,
    movie_review_preferences,
    pairs_from_experience,
    split_pairs,
)
from rlhf_ray.data.prompts import DataError, movie_review_openings, split_prompts
from rlhf_ray.types import experience_table

GOOD = {"prompt": "The film", "chosen": " was lovely.", "rejected": " was dull."}


def _write_jsonl(path, lines) -> None:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))


# --- JSONL -------------------------------------------------------------------------------------


def test_jsonl_good_rows(tmp_path):
    f = tmp_path / "prefs.jsonl"
    _write_jsonl(f, [GOOD, "   ", {**GOOD, "uid": "own-id", "extra": 3}])
    data = load_preference_pairs(f)
    assert data.pairs == [
        PreferencePair("prefs-1", "The film", " was lovely.", " was dull."),
        PreferencePair("own-id", "The film", " was lovely.", " was dull."),
    ]
    assert data.skipped == {} and data.bad_rows == []


def test_jsonl_bad_rows_name_file_line_and_field_and_are_skipped_within_the_limit(tmp_path):
    f = tmp_path / "prefs.jsonl"
    _write_jsonl(f, [
        GOOD,
        {"prompt": "p", "chosen": "a"},                      # 2: rejected missing
        {**GOOD, "chosen": 5},                               # 3: not a string
        {**GOOD, "prompt": "   "},                           # 4: empty
        {**GOOD, "rejected": None},                          # 5: null
        {**GOOD, "rejected": GOOD["chosen"]},                # 6: same text
        "{not json",                                         # 7: unreadable
        '["a", "list"]',                                     # 8: not an object
        GOOD,
    ])
    data = load_preference_pairs(f, max_bad_rows=7)
    assert [p.uid for p in data.pairs] == ["prefs-1", "prefs-9"]
    assert data.skipped == {
        "missing field": 2, "not a string": 1, "empty field": 1, "chosen equals rejected": 1,
        "unreadable line": 2,
    }
    assert data.bad_rows == [
        f"{f}:2: field 'rejected' is missing",
        f"{f}:3: field 'chosen' is not a string (int)",
        f"{f}:4: field 'prompt' is empty",
        f"{f}:5: field 'rejected' is null",
        f"{f}:6: fields 'chosen' and 'rejected' are the same text",
        f"{f}:7: invalid JSON: Expecting property name enclosed in double quotes",
        f"{f}:8: expected a JSON object, got list",
    ]


def test_more_bad_rows_than_the_limit_raise_naming_the_file_and_the_first_bad_rows(tmp_path):
    f = tmp_path / "prefs.jsonl"
    _write_jsonl(f, [GOOD, {**GOOD, "chosen": ""}, GOOD, {"prompt": "p"}])
    with pytest.raises(DataError) as e:
        load_preference_pairs(f, max_bad_rows=1)
    message = str(e.value)
    assert message.startswith(f"{f}: 2 malformed preference rows, more than max_bad_rows=1")
    assert "prefs.jsonl:2: field 'chosen' is empty" in message
    assert "prefs.jsonl:4: field 'chosen' is missing" in message
    # The default limit is 0: one bad row is enough.
    _write_jsonl(f, [GOOD, {**GOOD, "prompt": 1}])
    with pytest.raises(DataError, match=r"prefs.jsonl:2: field 'prompt' is not a string"):
        load_preference_pairs(f)
    assert len(load_preference_pairs(f, max_bad_rows=1).pairs) == 1
    with pytest.raises(ValueError, match="max_bad_rows"):
        load_preference_pairs(f, max_bad_rows=-1)


def test_files_without_a_valid_pair_or_of_other_types_are_errors(tmp_path):
    f = tmp_path / "prefs.jsonl"
    _write_jsonl(f, [{**GOOD, "chosen": " "}])
    with pytest.raises(DataError, match="no valid preference rows"):
        load_preference_pairs(f, max_bad_rows=5)
    with pytest.raises(DataError, match="cannot open"):
        load_preference_pairs(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="unsupported preference file type"):
        load_preference_pairs(tmp_path / "prefs.csv")


# --- Parquet -----------------------------------------------------------------------------------


def test_parquet_good_and_bad_rows(tmp_path):
    f = tmp_path / "prefs.parquet"
    pq.write_table(pa.table({
        "prompt": ["The film", "The plot", None, "The cast"],
        "chosen": [" was lovely.", "", " a", " shone."],
        "rejected": [" was dull.", " sagged.", " b", " was flat."],
    }), f)
    data = load_preference_pairs(f, max_bad_rows=2)
    assert [(p.uid, p.prompt) for p in data.pairs] == [("prefs-0", "The film"),
                                                        ("prefs-3", "The cast")]
    assert data.bad_rows == [f"{f}: row 1: field 'chosen' is empty",
                             f"{f}: row 2: field 'prompt' is null"]
    with pytest.raises(DataError, match=r"prefs.parquet: 2 malformed .*row 1: field 'chosen'"):
        load_preference_pairs(f, max_bad_rows=1)

    pq.write_table(pa.table({"prompt": ["p"], "chosen": [1], "rejected": [2], "uid": ["u"]}), f)
    with pytest.raises(DataError, match=r"row 0: field 'chosen' is not a string \(int\)"):
        load_preference_pairs(f)
    pq.write_table(pa.table({"prompt": ["p"], "chosen": ["a"]}), f)
    with pytest.raises(DataError, match="neither preference columns"):
        load_preference_pairs(f)
    f.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_preference_pairs(f)


# --- Experience rows ---------------------------------------------------------------------------


def _experience(groups: dict[str, list[tuple[str, float]]], prompt: str = "Tell me") -> pa.Table:
    rows = []
    for group_id, samples in groups.items():
        for k, (text, reward) in enumerate(samples):
            rows.append({
                "uid": f"{group_id}/{k}/0", "prompt_uid": group_id, "group_id": group_id,
                "prompt_text": f"{prompt} {group_id}", "response_text": text,
                "prompt_ids": [1, 2], "response_ids": [3, 4], "behavior_logprobs": [-1.0, -1.0],
                "ref_logprobs": [-1.0, -1.0], "reward": reward, "group_advantage": 0.0,
                "finish_reason": "stop", "policy_version": 0, "source": "online",
            })
    return experience_table(rows)


def test_experience_recipe_pairs_best_against_worst_and_skips_ties_and_singletons(tmp_path):
    table = _experience({
        "g1": [(" middling", 0.2), (" best", 0.9), (" worst", -0.5), (" also low", -0.1)],
        "tie": [(" a", 0.5), (" b", 0.5), (" c", 0.5)],
        "alone": [(" only", 1.0)],
        "g2": [(" low", 0.0), (" high", 1.0), (" first high", 1.0)],
        "empty": [("", 1.0), (" text", 0.0)],
    })
    data = pairs_from_experience(table)
    assert data.pairs == [
        PreferencePair("g1", "Tell me g1", " best", " worst"),
        # of equal best rewards the first in table order wins
        PreferencePair("g2", "Tell me g2", " high", " low"),
    ]
    assert data.skipped == {"tied rewards": 1, "fewer than 2 rows": 1, "empty text": 1}

    f = tmp_path / "export.parquet"
    pq.write_table(table, f)
    assert load_preference_pairs(f).pairs == data.pairs
    pq.write_table(_experience({"tie": [(" a", 0.5), (" b", 0.5)]}), f)
    with pytest.raises(DataError, match="no group yields a preference pair"):
        load_preference_pairs(f)
    pq.write_table(table.drop_columns(["reward"]), f)
    with pytest.raises(DataError, match=r"export.parquet: not an Experience table"):
        load_preference_pairs(f)


# --- builtin set -------------------------------------------------------------------------------


def test_movie_review_preferences_builtin():
    train, held = movie_review_preferences(opening_words=4, eval_fraction=0.2)
    assert len(train) > 1000 and len(held) > 100
    for pair in train + held:
        assert pair.prompt.strip() and pair.chosen.strip() and pair.rejected.strip()
        assert pair.chosen != pair.rejected
        assert len(pair.prompt.split()) == 4
        assert pair.chosen.startswith(" ") and pair.rejected.startswith(" ")
    assert len({p.uid for p in train + held}) == len(train) + len(held)
    assert (train, held) == movie_review_preferences(opening_words=4, eval_fraction=0.2)

    # The sentences of the two sides are disjoint, prompts and responses alike.
    def sentences(pairs):
        return {uid for p in pairs for uid in p.uid.split(":")}

    assert not sentences(train) & sentences(held)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    # Aligned with movie-review-openings at the same fraction: no sentence of its held-out
    # split reaches a training pair, and every held-out prompt is one of its held-out prompts.
    records = movie_review_openings(4)
    open_train, open_held = split_prompts(records, 0.2)
    assert not sentences(train) & {r.uid for r in open_held}
    assert {p.prompt for p in held} <= {r.text for r in open_held}
    assert not {p.prompt for p in train} & {r.text for r in open_held}
    # Positive prompt, its own continuation chosen, a negative one rejected.
    label = {r.uid: r.label for r in records}
    text = {r.uid: r.text for r in records}
    for pair in train[:50] + held[:50]:
        prompt_uid, other_uid = pair.uid.split(":")
        assert (label[prompt_uid], label[other_uid]) == ("pos", "neg")
        assert text[prompt_uid] == pair.prompt


def test_movie_review_preferences_options():
    train, held = movie_review_preferences(rejected_per_prompt=3)
    prompts = {p.prompt for p in train}
    assert len(train) == 3 * len(prompts)
    assert (train, held) == movie_review_preferences(rejected_per_prompt=3)
    both, _ = movie_review_preferences(negative_prompts=True, rejected_per_prompt=3)
    reverse = [p for p in both if p.prompt not in prompts]
    assert len(reverse) > 0 and len(both) == len(train) + len(reverse)
    with pytest.raises(DataError, match="both must be non-empty"):
        movie_review_preferences(eval_fraction=0.0)


def test_split_pairs_keeps_each_prompt_on_one_side():
    pairs = [PreferencePair(f"u{i}", f"prompt {i % 40}", " a", " b") for i in range(200)]
    train, held = split_pairs(pairs, 0.25)
    assert len(train) + len(held) == 200
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert (train, held) == split_pairs(pairs, 0.25)
