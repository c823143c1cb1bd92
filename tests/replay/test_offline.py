"""Offline data: Experience Parquet and scored JSONL files into the offline table, end to end."""

from __future__ import annotations

import json
import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.data.prompts import DataError
from rlhf_ray.replay.offline import check_offline_files, load_offline_rows, offline_uid
from rlhf_ray.scoring.rewards import letter_e_reward
from tests.conftest import tiny_config
from tests.replay.rows import make_rows

SQRT2 = math.sqrt(2.0)


def write_jsonl(path, objs) -> str:
    lines = [o if isinstance(o, str) else json.dumps(o) for o in objs]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def offline_cfg(*files: str, overrides=()):
    return tiny_config(f"replay.offline_files=[{','.join(files)}]", *overrides)


class NoScorer:
    """Fails the test if the loader ever hands records to a scorer."""

    def __init__(self):
        self.calls = 0

    def score_records(self, records):
        self.calls += 1
        raise AssertionError("records of a bad file reached the scorer")


@pytest.fixture(scope="module")
def scorer(ray_cluster):
    """A real RewardScorer actor on the tiny model (0 CPUs: the end-to-end run needs them)."""
    from rlhf_ray.scoring.scorer import RewardScorer

    actor = ray_cluster.remote(RewardScorer).options(num_cpus=0).remote(tiny_config())
    ray_cluster.get(actor.__ray_ready__.remote())
    yield actor
    ray_cluster.kill(actor)


def by_response(table: pa.Table) -> dict[str, dict]:
    return {row["response_text"]: row for row in table.to_pylist()}


# -- Parquet ----------------------------------------------------------------------------------


def test_parquet_roundtrip_keeps_rows_and_source_and_resets_times_sampled(tmp_path):
    rows = make_rows(6, version=3)
    rows = rows.set_column(rows.schema.get_field_index("source"), "source",
                           pa.array(["offline:old-run"] * 3 + ["online"] * 3))
    rows = rows.set_column(rows.schema.get_field_index("times_sampled"), "times_sampled",
                           pa.array([2, 0, 1, 5, 1, 1], type=pa.int64()))
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(rows.slice(0, 4), first)
    pq.write_table(rows.slice(4), second)

    loaded = load_offline_rows(offline_cfg(str(first), str(second)), NoScorer())

    assert loaded.schema.equals(rows.schema)
    assert loaded.column("times_sampled").to_pylist() == [0] * 6
    assert loaded.column("source").to_pylist() == rows.column("source").to_pylist()
    assert loaded.column("policy_version").to_pylist() == [3] * 6
    keep = [c for c in rows.column_names if c != "times_sampled"]
    assert loaded.select(keep).to_pylist() == rows.select(keep).to_pylist()


def test_parquet_that_is_not_an_experience_table_names_the_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    pq.write_table(make_rows(2).drop_columns(["ref_logprobs"]), bad)
    where = re.escape(str(bad))
    with pytest.raises(DataError, match=rf"{where}: not an Experience table.*ref_logprobs"):
        load_offline_rows(offline_cfg(str(bad)), NoScorer())
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("not parquet")
    with pytest.raises(DataError, match=rf"{re.escape(str(garbage))}: not a readable Parquet file"):
        load_offline_rows(offline_cfg(str(garbage)), NoScorer())


# -- JSONL through a real scorer actor ---------------------------------------------------------


def test_jsonl_with_rewards_gets_group_and_single_response_advantages(tmp_path, scorer):
    path = write_jsonl(tmp_path / "scored.jsonl", [
        {"prompt": "Count one two and", "response": "a1", "reward": 1.0},
        {"prompt": "Count four five and", "response": "b1", "reward": 0},
        {"prompt": "Solo C", "response": "c1", "reward": 2.0},
        "",  # blank lines are skipped
        {"prompt": "Count one two and", "response": "a2", "reward": 3},
        {"prompt": "Count four five and", "response": "b2", "reward": 0.0},
        {"prompt": "Solo D", "response": "d1", "reward": 4.0, "extra": "ignored"},
        {"prompt": "Count four five and", "response": "b3", "reward": 3.0},
        {"prompt": "Solo E", "response": "e1", "reward": 6.0},
    ])
    table = load_offline_rows(offline_cfg(path), scorer)
    rows = by_response(table)
    assert table.num_rows == 8

    expected = {  # grpo with normalize_std (the tiny preset): (r - mean) / population std
        "a1": -1.0, "a2": 1.0,
        "b1": -1 / SQRT2, "b2": -1 / SQRT2, "b3": 2 / SQRT2,
        "c1": -2.0, "d1": 0.0, "e1": 2.0,  # single responses: reward - mean(2, 4, 6)
    }
    for text, adv in expected.items():
        assert rows[text]["group_advantage"] == pytest.approx(adv, abs=1e-5), text
        assert rows[text]["priority"] == pytest.approx(abs(adv), abs=1e-5), text
    assert rows["a2"]["reward"] == 3.0 and rows["b1"]["reward"] == 0.0
    assert rows["a1"]["group_id"] == rows["a2"]["group_id"] == rows["a1"]["prompt_uid"]
    assert len({rows[t]["group_id"] for t in expected}) == 5
    assert set(table.column("source").to_pylist()) == {"offline"}
    assert set(table.column("policy_version").to_pylist()) == {0}
    assert set(table.column("times_sampled").to_pylist()) == {0}

    # uids: one per line, stable across loads (idempotent inserts), independent of the spelling
    assert rows["a1"]["uid"] == offline_uid(tmp_path / "scored.jsonl", 1)
    assert rows["a2"]["uid"] == offline_uid(tmp_path / "." / "scored.jsonl", 5)
    assert len(set(table.column("uid").to_pylist())) == 8
    again = load_offline_rows(offline_cfg(path), scorer)
    assert again.column("uid").to_pylist() == table.column("uid").to_pylist()


def test_preference_pairs_become_groups_of_two_with_opposite_advantages(tmp_path, scorer):
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "Count one two and", "chosen": "three", "rejected": "zebra"},
        {"prompt": "Count one two and", "chosen": "three four", "rejected": "xyz"},
        {"prompt": "Count one two and", "response": "loose", "reward": 0.5},
    ])
    rows = by_response(load_offline_rows(offline_cfg(path), scorer))
    assert len(rows) == 5
    for chosen, rejected in (("three", "zebra"), ("three four", "xyz")):
        c, r = rows[chosen], rows[rejected]
        assert (c["reward"], r["reward"]) == (1.0, 0.0)
        assert c["group_id"] == r["group_id"]
        # grpo with normalize_std over a group of 2: +1 and -1
        assert c["group_advantage"] == pytest.approx(1.0, abs=1e-5)
        assert r["group_advantage"] == pytest.approx(-1.0, abs=1e-5)
    assert rows["three"]["group_id"] != rows["three four"]["group_id"]
    assert rows["loose"]["group_id"] not in (rows["three"]["group_id"], rows["xyz"]["group_id"])


@pytest.mark.parametrize("obj,message", [
    ({"prompt": "p", "chosen": "a"}, "field 'rejected' is missing"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "are the same text"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "response": "c"}, "not both"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "reward": 1}, "not used with a preference"),
])
def test_bad_preference_pair_names_file_and_line(tmp_path, obj, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r"}, obj])
    scorer = NoScorer()
    with pytest.raises(DataError, match=rf"bad\.jsonl:2.*{message}"):
        load_offline_rows(offline_cfg(path), scorer)
    assert scorer.calls == 0


def test_jsonl_without_rewards_is_scored_tokenized_and_given_reference_logprobs(tmp_path, scorer):
    from rlhf_ray.models.loading import load_tokenizer

    long_prompt = " ".join(f"word{i}" for i in range(80))  # more than data.max_prompt_tokens
    long_response = "e " * 30  # more than generator.max_new_tokens
    path = write_jsonl(tmp_path / "unscored.jsonl", [
        {"prompt": "Count one two and", "response": "eeee"},  # letter-e 1.0
        {"prompt": "Count one two and", "response": "ab"},  # 0.0
        {"prompt": "Solo one", "response": "ee", "reward": None},  # 1.0
        {"prompt": "Solo two", "response": "aa"},  # 0.0
        {"prompt": "Solo three", "response": "abcd", "reward": 0.25},  # given
        {"prompt": long_prompt, "response": long_response},
    ])
    cfg = offline_cfg(path)
    table = load_offline_rows(cfg, scorer)
    rows = by_response(table)
    assert table.num_rows == 6
    for text in ("eeee", "ab", "ee", "aa"):
        assert rows[text]["reward"] == pytest.approx(letter_e_reward("", text)), text
    assert rows["abcd"]["reward"] == 0.25  # a given reward is kept, not rescored
    singles = {"ee": 1.0, "aa": 0.0, "abcd": 0.25, rows_key(rows, long_response): 1.0}
    mean = sum(singles.values()) / len(singles)
    for text, reward in singles.items():
        assert rows[text]["group_advantage"] == pytest.approx(reward - mean, abs=1e-5), text
    assert rows["eeee"]["group_advantage"] == pytest.approx(1.0, abs=1e-5)
    assert rows["ab"]["group_advantage"] == pytest.approx(-1.0, abs=1e-5)

    tok = load_tokenizer(cfg.model)
    eos = tok.eos_token_id
    for row in table.to_pylist():
        n = len(row["response_ids"])
        assert len(row["ref_logprobs"]) == n == len(row["behavior_logprobs"])
        assert row["behavior_logprobs"] == row["ref_logprobs"]
        assert all(math.isfinite(x) and x < 0 for x in row["ref_logprobs"])
    short = rows["eeee"]
    assert short["prompt_ids"] == tok("Count one two and", add_special_tokens=True)["input_ids"]
    assert short["response_ids"] == tok("eeee", add_special_tokens=False)["input_ids"] + [eos]
    assert short["finish_reason"] == "stop"
    cut = rows[rows_key(rows, long_response)]
    limit, max_new = cfg.data.max_prompt_tokens, cfg.generator.max_new_tokens
    assert cut["prompt_ids"] == tok(long_prompt, add_special_tokens=True)["input_ids"][-limit:]
    response_ids = tok(long_response, add_special_tokens=False)["input_ids"]
    assert cut["response_ids"] == response_ids[:max_new]
    assert cut["finish_reason"] == "length"
    # sampling at temperature 1 under the reference: different responses, different log-probs
    assert rows["ee"]["ref_logprobs"] != rows["aa"]["ref_logprobs"]


def rows_key(rows: dict, original: str) -> str:
    """The stored (decoded, possibly truncated) response text of the row made from `original`."""
    (key,) = [k for k in rows if k and original.startswith(k.rstrip())]
    return key


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("line, field", [
    ('{"prompt": "p", "response": ', "invalid JSON"),
    ('["prompt", "response"]', "expected a JSON object"),
    ('{"response": "r"}', "'prompt' is missing"),
    ('{"prompt": "p"}', "'response' is missing"),
    ('{"prompt": "  ", "response": "r"}', "'prompt' is empty"),
    ('{"prompt": "p", "response": ""}', "'response' is empty"),
    ('{"prompt": 3, "response": "r"}', "'prompt' is not a string"),
    ('{"prompt": "p", "response": "r", "reward": NaN}', "'reward' is not finite"),
    ('{"prompt": "p", "response": "r", "reward": -Infinity}', "'reward' is not finite"),
    ('{"prompt": "p", "response": "r", "reward": "high"}', "'reward' is not a number"),
    ('{"prompt": "p", "response": "r", "reward": true}', "'reward' is not a number"),
])
def test_bad_jsonl_line_names_file_line_and_field_and_inserts_nothing(tmp_path, line, field):
    good = {"prompt": "p", "response": "r", "reward": 1.0}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", line, good])
    no_scorer = NoScorer()
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:3: .*{field}"):
        load_offline_rows(offline_cfg(path), no_scorer)
    assert no_scorer.calls == 0


def test_missing_file_and_unsupported_suffix_are_config_errors(tmp_path):
    good = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "p", "response": "r"}])
    missing = str(tmp_path / "nope.jsonl")
    key = "replay.offline_files: "
    with pytest.raises(ConfigError, match=rf"{key}{re.escape(missing)}: no such file"):
        check_offline_files(offline_cfg(good, missing))
    with pytest.raises(ConfigError, match=rf"{key}{re.escape(missing)}"):
        load_offline_rows(offline_cfg(good, missing), NoScorer())
    csv = tmp_path / "rows.csv"
    csv.write_text("prompt,response\n")
    with pytest.raises(ConfigError, match=rf"{key}{re.escape(str(csv))}: unsupported file type"):
        check_offline_files(offline_cfg(str(csv)))
    check_offline_files(offline_cfg(good))  # a good list passes


# -- end to end --------------------------------------------------------------------------------


def test_sync_run_mixes_offline_rows_into_each_batch(ray_cluster, tmp_path):
    from rlhf_ray.driver import train
    from rlhf_ray.metrics import read_metrics

    path = write_jsonl(tmp_path / "offline.jsonl", [
        {"prompt": f"Count {w} and", "response": r, **({"reward": i / 4} if i % 2 else {})}
        for i, (w, r) in enumerate([(w, r) for w in ("one", "two", "three", "four", "five")
                                    for r in ("ee e", "seven")])
    ])
    cfg = load_config(preset="tiny", overrides=[
        f"run.output_dir={tmp_path / 'runs'}", "run.name=r", "run.sync=true", "run.steps=2",
        "run.plots=false", "learner.batch_size=32",
        f"replay.offline_files=[{path}]", "replay.offline_fraction=0.25",
    ])
    records = read_metrics(train(cfg))
    assert [r["step"] for r in records] == [1, 2]
    assert [r["replay/offline_rows"] for r in records] == [8, 8]
    assert all(r["learner/rows"] == 32 for r in records)
    assert records[-1]["weights/version"] == 2
