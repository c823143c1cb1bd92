"""Scored samples for token-level offline RL (IQL, CQL): files, replay-buffer exports and a
builtin set.

A scored sample is one prompt, one response and the response's scalar reward. Sources:

- JSONL (``.jsonl``): one object per line with string fields ``prompt`` and ``response``
  (non-empty) and a finite number ``reward``; optional ``uid`` and ``finish_reason``
  (``"stop"`` or ``"length"``; ``"length"`` marks a response that was cut, whose value is
  bootstrapped instead of ending the episode). A line with ``chosen``/``rejected`` instead of
  ``response`` is a preference pair and gives two samples, reward 1 for chosen and 0 for
  rejected. Other keys are ignored and blank lines skipped.
- Parquet (``.parquet``) with the same columns, or with ``prompt``/``chosen``/``rejected``.
- An Experience Parquet export of a run's replay buffer (``rlhf-ray buffer export``): each row
  is a sample with its ``prompt_text``, ``response_text``, ``reward`` (before KL shaping) and
  ``finish_reason``; uid the row's uid.
- ``movie-review-samples``: the gensim wheel's labelled movie-review sentences, scored by the
  default task's reward (see ``movie_review_samples``).

Responses are text and are tokenized again by the trainer, with the run's tokenizer (so an
export from a run of another model still reads; the exact token ids it stored are not used).
Malformed rows are skipped and counted, up to ``max_bad_rows``; one more raises ``DataError``
naming the file and the first bad rows, before anything trains (see ``data.preferences``).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from rlhf_ray.data.preferences import (
    PAIR_FIELDS,
    _BadRows,
    _check_pair,
    _read_parquet_table,
    jsonl_rows,
)
from rlhf_ray.data.prompts import (
    DataError,
    gensim_data_file,
    is_held_out,
    movie_review_openings,
    split_by_hash,
)

MOVIE_REVIEW_SAMPLES = "movie-review-samples"
BUILTIN_SAMPLE_SETS = (MOVIE_REVIEW_SAMPLES,)
SAMPLE_FIELDS = ("prompt", "response", "reward")
# Largest |reward| accepted: the squared TD errors are float32 (max ~3.4e38).
MAX_ABS_REWARD = 1e15


@dataclass(frozen=True)
class ScoredSample:
    uid: str
    prompt: str
    response: str
    reward: float
    truncated: bool = False  # cut at a token budget rather than ended (finish_reason "length")


@dataclass
class ScoredData:
    samples: list[ScoredSample]
    skipped: dict[str, int] = field(default_factory=dict)
    bad_rows: list[str] = field(default_factory=list)


def _check_sample(values: dict, where: str) -> tuple[str, str] | None:
    """``(reason, message)`` for the first problem of a scored row, None when it is fine."""
    for name in ("prompt", "response"):
        value = values.get(name)
        if value is None:
            return "missing field", f"{where}: field {name!r} is missing or null"
        if not isinstance(value, str):
            return "not a string", (f"{where}: field {name!r} is not a string "
                                    f"({type(value).__name__})")
        if not value.strip():
            return "empty field", f"{where}: field {name!r} is empty"
    reward = values.get("reward")
    if reward is None:
        return "missing field", f"{where}: field 'reward' is missing or null"
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        return "bad reward", f"{where}: field 'reward' is not a number ({reward!r})"
    try:
        finite = math.isfinite(float(reward))
    except OverflowError:
        finite = False
    if not finite:
        return "bad reward", f"{where}: field 'reward' is not finite ({reward!r})"
    if abs(float(reward)) > MAX_ABS_REWARD:
        return "bad reward", (f"{where}: field 'reward' is {reward!r}, beyond +-{MAX_ABS_REWARD:g} "
                              "(its square would overflow the float32 value losses)")
    finish = values.get("finish_reason")
    if finish is not None and finish not in ("stop", "length"):
        return "bad finish_reason", (f"{where}: field 'finish_reason' is {finish!r} "
                                     "(use 'stop' or 'length')")
    return None


def _rows_to_samples(rows, path: Path, bad: _BadRows) -> list[ScoredSample]:
    """``rows`` yields ``(where, default_uid, values)``; pairs become two samples."""
    samples = []
    for where, default_uid, values in rows:
        uid = values.get("uid")
        uid = default_uid if uid is None else str(uid)
        if "response" not in values and ("chosen" in values or "rejected" in values):
            problem = _check_pair(values, where)
            if problem is not None:
                bad.add(*problem)
                continue
            samples.append(ScoredSample(f"{uid}-chosen", values["prompt"], values["chosen"], 1.0))
            samples.append(ScoredSample(f"{uid}-rejected", values["prompt"], values["rejected"],
                                        0.0))
            continue
        problem = _check_sample(values, where)
        if problem is not None:
            bad.add(*problem)
            continue
        samples.append(ScoredSample(uid, values["prompt"], values["response"],
                                    float(values["reward"]),
                                    values.get("finish_reason") == "length"))
    bad.check(len(samples), "scored")
    return samples


def _table_rows(table: pa.Table, path: Path, columns: tuple[str, ...]):
    present = [c for c in (*columns, "uid", "finish_reason") if c in table.column_names]
    data = {c: table.column(c).to_pylist() for c in present}
    for i in range(table.num_rows):
        yield f"{path}: row {i}", f"{path.stem}-{i}", {c: data[c][i] for c in present}


def experience_samples(table: pa.Table, path: Path | str = "experience") -> list[ScoredSample]:
    """One sample per Experience row (``prompt_text``, ``response_text``, ``reward``,
    ``finish_reason``; uid the row's uid). Rows with an empty prompt or response text are
    dropped (an empty generation is a valid row online, but there is no token to learn from).

    Raises:
        DataError: the table is not an Experience table, or no row is left.
    """
    from rlhf_ray.replay.shard import validate_experience_table

    try:
        table = validate_experience_table(table)
    except ValueError as e:
        raise DataError(f"{path}: not an Experience table: {e}") from None
    columns = {c: table.column(c).to_pylist()
               for c in ("uid", "prompt_text", "response_text", "reward", "finish_reason")}
    samples = [
        ScoredSample(str(uid), prompt, response, float(reward), finish == "length")
        for uid, prompt, response, reward, finish in zip(*columns.values())
        if (prompt or "").strip() and (response or "").strip()
    ]
    if not samples:
        raise DataError(f"{path}: no Experience row has both prompt and response text")
    return samples


def load_scored_samples(path: Path | str, *, max_bad_rows: int = 0) -> ScoredData:
    """Scored samples from a ``.jsonl`` or ``.parquet`` file (suffix in any case).

    Raises:
        DataError: an unsupported or unreadable file, missing columns, more than
            ``max_bad_rows`` malformed rows, or no sample at all.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    bad = _BadRows(path, max_bad_rows)
    if suffix == ".jsonl":
        samples = _rows_to_samples(jsonl_rows(path, bad), path, bad)
        return ScoredData(samples, dict(bad.reasons), bad.messages)
    if suffix != ".parquet":
        raise DataError(f"{path}: unsupported scored-sample file type (use .jsonl or .parquet)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    table = _read_parquet_table(path)
    names = set(table.column_names)
    if "group_id" in names and "response_text" in names:
        return ScoredData(experience_samples(table, path))
    for columns in (SAMPLE_FIELDS, PAIR_FIELDS):
        if set(columns) <= names:
            samples = _rows_to_samples(_table_rows(table, path, columns), path, bad)
            return ScoredData(samples, dict(bad.reasons), bad.messages)
    raise DataError(
        f"{path}: needs columns {list(SAMPLE_FIELDS)}, or {list(PAIR_FIELDS)}, or an Experience "
        f"table (columns: {table.column_names})"
    )


def split_samples(
    samples: list[ScoredSample], fraction: float
) -> tuple[list[ScoredSample], list[ScoredSample]]:
    """A fixed ``(train, held_out)`` split by a stable hash of each sample's prompt text, so all
    samples of one prompt fall on the same side."""
    return split_by_hash(samples, lambda s: s.prompt, fraction, "offline.eval_fraction",
                         "scored samples")


def movie_review_samples(
    opening_words: int = 4,
    eval_fraction: float = 0.2,
    *,
    samples_per_prompt: int = 8,
    reward: str = "vader",
) -> tuple[list[ScoredSample], list[ScoredSample]]:
    """The builtin ``movie-review-samples`` set as ``(train, held_out)`` samples.

    From the sentences of ``movie-review-openings`` (same file, openings and uids): for each
    opening (positive or negative sentence), its own continuation and ``samples_per_prompt - 1``
    continuations of other sentences of the same split side, drawn with a fixed seed per
    prompt; every sample is scored by the builtin reward ``reward`` (the default task's
    ``vader``, computed here). Responses start with a space, so prompt + own continuation
    is the original sentence. Uids are ``<prompt sentence uid>:<response sentence uid>``.

    Split: a sample is held out exactly when its prompt's sentence is held out of
    ``movie-review-openings`` at the same ``eval_fraction``, and its response comes from the
    same side, so training samples contain no held-out sentence.

    Caveat: a borrowed continuation does not follow its prompt; the data mixes coherent
    sentences with incoherent ones whose reward still only reflects sentiment.

    Raises:
        DataError: a side of the split would be empty.
    """
    from rlhf_ray.scoring.rewards import BUILTIN_REWARDS

    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    if reward not in BUILTIN_REWARDS:
        raise ValueError(f"{MOVIE_REVIEW_SAMPLES} is scored by a builtin reward "
                         f"({', '.join(BUILTIN_REWARDS)}), not {reward!r}")
    score = BUILTIN_REWARDS[reward]()
    lines = gensim_data_file("pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines()
    words_by_uid = {f"mr-{i:04d}": line.partition(" ")[2].split() for i, line in enumerate(lines)}
    sides: dict[bool, list[tuple[str, str, str]]] = {False: [], True: []}
    for record in movie_review_openings(opening_words):
        rest = words_by_uid[record.uid][opening_words:]
        if rest:
            sides[is_held_out(record.uid, eval_fraction)].append(
                (record.uid, record.text, " " + " ".join(rest)))

    def samples_for(held: bool) -> list[ScoredSample]:
        side = sides[held]
        out = []
        for k, (uid, prompt, own) in enumerate(side):
            others = [j for j in range(len(side)) if j != k]
            picked = random.Random(uid).sample(others, min(samples_per_prompt - 1, len(others)))
            for j in [k, *sorted(picked)]:
                other_uid, _, response = side[j]
                out.append(ScoredSample(f"{uid}:{other_uid}", prompt, response,
                                        float(score(prompt, response))))
        return out

    train, held_out = samples_for(False), samples_for(True)
    if not train or not held_out:
        raise DataError(
            f"eval fraction {eval_fraction} leaves {len(train)} training and {len(held_out)} "
            f"held-out {MOVIE_REVIEW_SAMPLES} samples; both must be non-empty"
        )
    return train, held_out


def summarize(samples: list[ScoredSample]) -> dict[str, float]:
    """Count, reward mean/min/max and the truncated share, for logs and run metadata."""
    rewards = [s.reward for s in samples]
    counts = Counter(s.truncated for s in samples)
    return {"samples": len(samples), "reward_mean": sum(rewards) / len(rewards),
            "reward_min": min(rewards), "reward_max": max(rewards),
            "truncated_frac": counts[True] / len(samples)}
