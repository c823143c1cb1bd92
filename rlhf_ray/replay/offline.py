"""Offline data: rows loaded from files at start into the replay buffer's offline table.

The learner mixes `replay.offline_fraction` of each batch from the offline table (no staleness
limit, no reuse limit, no rate limit). `replay.offline_files` lists builtin sets
(`movie-review-samples`, `movie-review-preferences`: their training side, see
`builtin_records`) and files of two formats:

Experience Parquet (`.parquet`)
    Rows with exactly `EXPERIENCE_SCHEMA` (e.g. written by `rlhf-ray buffer export`). They are
    checked with `validate_experience_table` and loaded as stored: `source`, `policy_version`,
    rewards, advantages, log-probs and priorities are kept; only `times_sampled` is reset to 0.
    Assumption: their `behavior_logprobs` are those of the policy that generated them, which
    the learner's importance weights then account for like any stale online row.

Scored or preference JSONL (`.jsonl`)
    One JSON object per line, either `{"prompt": str, "response": str, "reward": number}` with
    `reward` optional (absent or null: the configured `scorer.reward` scores the response), or a
    preference pair `{"prompt": str, "chosen": str, "rejected": str}`, which becomes two rows of
    one group with rewards 1 (chosen) and 0 (rejected), so the group baseline gives the chosen
    response a positive and the rejected one a negative advantage. Other keys are ignored and
    blank lines skipped. The whole file is checked before anything is built,
    and a bad line (invalid JSON or UTF-8, a missing or empty `prompt`/`response`, a reward that
    is not a finite number) raises `DataError` naming `file:line` and the field, so nothing of a
    bad file is inserted. The records then go to a `RewardScorer` actor
    (`RewardScorer.score_records`), which builds the rows with the reference model:

    * the prompt is tokenized as the generator does (special tokens added, the
      `data.max_prompt_tokens` / `data.prompt_overflow` rule), the response without special
      tokens, cut to `generator.max_new_tokens`;
    * assumption: an offline response counts as drawn from the reference policy, so
      `behavior_logprobs = ref_logprobs` (its importance weight starts at exp(policy - ref));
      `policy_version` is 0 and `source` is `"offline"`;
    * assumption: a response that fits ends the episode like an online one that stopped: the
      EOS token is appended and `finish_reason` is `"stop"`; a response cut at
      `generator.max_new_tokens` gets `"length"`;
    * the rows of one prompt (same text, same file) share a group; with `grpo`/`rloo` a group of
      >= 2 responses gets the same group-relative advantage as `score()` computes online, and a
      prompt with a single response gets its reward minus the mean reward of all
      single-response rows of that file (0 if it is the only one); `gae` gives 0 throughout;
    * `priority = |group_advantage|`;
    * uids are stable: a hash of the resolved file path and line number, so loading the same file
      again (a restart, a retried insert) stores nothing twice.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pyarrow as pa

from rlhf_ray.config import Config, ConfigError
from rlhf_ray.data.prompts import DataError, iter_jsonl_objects
from rlhf_ray.types import EXPERIENCE_SCHEMA

SUFFIXES = (".parquet", ".jsonl")
BUILTIN_SETS = ("movie-review-samples", "movie-review-preferences")


def offline_uid(path: Path | str, line_no: int) -> str:
    """The stable uid of the row built from line `line_no` of the JSONL file `path`."""
    key = f"{Path(path).resolve()}:{line_no}".encode()
    return "offline-" + hashlib.blake2b(key, digest_size=10).hexdigest()


def check_offline_files(cfg: Config, *, contents: bool = True) -> None:
    """Every `replay.offline_files` entry is a builtin set or an existing file with a supported
    suffix (any case) and, with `contents`, readable rows: a file that is bad or holds no row is
    an error here, in the driver, before any actor starts (the files are read again when
    loaded)."""
    for f in cfg.replay.offline_files:
        if f in BUILTIN_SETS:
            continue
        path = Path(f).expanduser()
        suffix = path.suffix.lower()
        if suffix not in SUFFIXES:
            raise ConfigError(
                f"replay.offline_files: {f}: unsupported file type {path.suffix or '(none)'!r} "
                f"(use {', '.join(SUFFIXES)})"
            )
        if path.is_dir():
            raise ConfigError(f"replay.offline_files: {f}: is a directory, not a file")
        if not path.is_file():
            raise ConfigError(f"replay.offline_files: {f}: no such file")
        if contents:
            rows = (read_experience_parquet(path).num_rows if suffix == ".parquet"
                    else len(read_scored_jsonl(path)))
            if rows == 0:
                raise DataError(f"{path}: holds no rows (replay.offline_files)")


def read_experience_parquet(path: Path | str) -> pa.Table:
    """Experience rows from a Parquet file, validated, with `times_sampled` reset to 0."""
    import pyarrow.parquet as pq

    from rlhf_ray.replay.shard import validate_experience_table

    path = Path(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    try:
        table = validate_experience_table(table)
    except ValueError as e:
        raise DataError(f"{path}: not an Experience table: {e}") from None
    index = table.schema.get_field_index("times_sampled")
    zeros = pa.array([0] * table.num_rows, type=pa.int64())
    return table.set_column(index, EXPERIENCE_SCHEMA.field("times_sampled"), zeros)


def read_scored_jsonl(path: Path | str) -> list[dict]:
    """The records of a scored JSONL file, checked line by line, ready for `score_records`.

    Each record holds `uid`, `prompt`, `response`, `reward` (float or None), `where`
    (`file:line`) and `dataset` (the resolved path, which keys the prompt groups).

    Raises:
        DataError: naming `file:line` and the field of the first bad line.
    """
    path = Path(path)
    dataset = str(path.resolve())
    records = []
    for line_no, where, obj in iter_jsonl_objects(path):
        pair = "chosen" in obj or "rejected" in obj
        if pair and "response" in obj:
            raise DataError(f"{where}: give either 'response' or 'chosen'/'rejected', not both")
        for name in ("prompt", "chosen", "rejected") if pair else ("prompt", "response"):
            if name not in obj:
                raise DataError(f"{where}: field {name!r} is missing")
            if not isinstance(obj[name], str):
                raise DataError(
                    f"{where}: field {name!r} is not a string ({type(obj[name]).__name__})"
                )
            if not obj[name].strip():
                raise DataError(f"{where}: field {name!r} is empty")
        if pair:
            if obj.get("reward") is not None:
                raise DataError(f"{where}: field 'reward' is not used with a preference pair")
            if obj["chosen"] == obj["rejected"]:
                raise DataError(f"{where}: fields 'chosen' and 'rejected' are the same text")
            for name, reward in (("chosen", 1.0), ("rejected", 0.0)):
                records.append({
                    "uid": offline_uid(path, line_no) + f"-{name}", "prompt": obj["prompt"],
                    "response": obj[name], "reward": reward, "where": f"{where} ({name})",
                    "dataset": dataset, "pair": f"{line_no}",
                })
            continue
        reward = obj.get("reward")
        if reward is not None:
            if isinstance(reward, bool) or not isinstance(reward, (int, float)):
                raise DataError(f"{where}: field 'reward' is not a number: {reward!r}")
            try:
                reward = float(reward)
            except OverflowError:
                raise DataError(f"{where}: field 'reward' is too large for a float") from None
            if not math.isfinite(reward):
                raise DataError(f"{where}: field 'reward' is not finite: {obj['reward']!r}")
        records.append({
            "uid": offline_uid(path, line_no), "prompt": obj["prompt"],
            "response": obj["response"], "reward": reward, "where": where,
            "dataset": dataset,
        })
    return records


def builtin_records(cfg: Config, name: str) -> list[dict]:
    """The training side of a builtin offline set as records for `score_records`:
    `movie-review-samples` with its rewards (the builtin reward, `scorer.reward`), or
    `movie-review-preferences` as pairs (chosen 1, rejected 0, as for a JSONL pair). The
    held-out side is left out, so evaluation prompts stay unseen."""
    from rlhf_ray.data.preferences import movie_review_preferences
    from rlhf_ray.data.scored import movie_review_samples

    off, dataset = cfg.offline, f"builtin:{name}"
    if name == "movie-review-samples":
        train, _ = movie_review_samples(cfg.data.opening_words, cfg.data.eval_fraction,
                                        samples_per_prompt=off.samples_per_prompt,
                                        reward=cfg.scorer.reward)
        return [{"uid": f"{dataset}:{s.uid}", "prompt": s.prompt, "response": s.response,
                 "reward": s.reward, "where": f"{dataset} {s.uid}", "dataset": dataset}
                for s in train]
    train, _ = movie_review_preferences(cfg.data.opening_words, cfg.data.eval_fraction,
                                        rejected_per_prompt=off.rejected_per_prompt,
                                        negative_prompts=off.negative_prompts)
    return [{"uid": f"{dataset}:{p.uid}-{side}", "prompt": p.prompt, "response": text,
             "reward": reward, "where": f"{dataset} {p.uid} ({side})", "dataset": dataset,
             "pair": p.uid}
            for p in train for side, text, reward in (("chosen", p.chosen, 1.0),
                                                       ("rejected", p.rejected, 0.0))]


def _score(scorer, records: list[dict]) -> pa.Table:
    method = scorer.score_records
    if hasattr(method, "remote"):  # a Ray actor handle
        import ray

        return ray.get(method.remote(records))
    return method(records)  # an in-process RewardScorer


def load_offline_rows(cfg: Config, scorer) -> pa.Table:
    """All `replay.offline_files` as one Experience table (files in the order given).

    Args:
        cfg: the run config.
        scorer: a `RewardScorer` actor handle (or an in-process `RewardScorer`) that builds the
            rows of JSONL files; unused when every file is Parquet.

    Raises:
        ConfigError: a file is missing or of an unsupported type.
        DataError: a file's contents are bad (naming the file, and line and field for JSONL).
    """
    check_offline_files(cfg, contents=False)
    tables = []
    for f in cfg.replay.offline_files:
        if f in BUILTIN_SETS:
            tables.append(_score(scorer, builtin_records(cfg, f)))
            continue
        path = Path(f).expanduser()
        if path.suffix.lower() == ".parquet":
            tables.append(read_experience_parquet(path))
        else:
            records = read_scored_jsonl(path)
            if records:
                tables.append(_score(scorer, records))
    if not tables:
        return EXPERIENCE_SCHEMA.empty_table()
    return pa.concat_tables(tables)
