"""Preference pairs for offline preference learning (DPO, IPO): files, a replay-buffer recipe and
a builtin set.

A pair is one prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response.
Sources:

- JSONL (``.jsonl``): one object per line with string fields ``prompt``, ``chosen`` and
  ``rejected`` (non-empty, chosen != rejected); an optional ``uid``; other keys are ignored and
  blank lines skipped.
- Parquet (``.parquet``) with the same columns (``uid`` optional).
- An Experience Parquet export of a run's replay buffer (``rlhf-ray buffer export``, columns
  ``EXPERIENCE_SCHEMA``): ``pairs_from_experience`` pairs the best-rewarded response of each
  group against the worst one.
- ``movie-review-preferences``: built from the gensim wheel's labelled movie-review sentences,
  with a fixed train/held-out split (see ``movie_review_preferences``).

Malformed rows (unreadable line, a missing, null, non-string or empty field, chosen equal to
rejected) are skipped and counted, up to ``max_bad_rows``; one more and loading raises
``DataError`` naming the file and the first bad rows, before anything trains. JSONL rows are
named ``file:line`` (from 1), Parquet rows ``file: row i`` (from 0, as the prompt reader does).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from rlhf_ray.data.prompts import (
    DataError,
    gensim_data_file,
    is_held_out,
    movie_review_openings,
    parse_jsonl_line,
    split_by_hash,
)

PAIR_FIELDS = ("prompt", "chosen", "rejected")
MOVIE_REVIEW_PREFERENCES = "movie-review-preferences"
BUILTIN_PREFERENCE_SETS = (MOVIE_REVIEW_PREFERENCES,)

# How many bad rows the error message quotes.
_QUOTED_BAD_ROWS = 5


@dataclass(frozen=True)
class PreferencePair:
    uid: str
    prompt: str
    chosen: str
    rejected: str


@dataclass
class PreferenceData:
    """Loaded pairs, what was skipped by reason, and one message per skipped malformed row.

    ``skipped`` counts rows for files; for ``pairs_from_experience`` it counts groups.
    """

    pairs: list[PreferencePair]
    skipped: dict[str, int] = field(default_factory=dict)
    bad_rows: list[str] = field(default_factory=list)


class _BadRows:
    """Collects the malformed rows of one file and enforces the limit."""

    def __init__(self, path: Path, max_bad_rows: int) -> None:
        if max_bad_rows < 0:
            raise ValueError(f"max_bad_rows must be >= 0, got {max_bad_rows}")
        self.path = path
        self.limit = max_bad_rows
        self.reasons: Counter[str] = Counter()
        self.messages: list[str] = []

    def add(self, reason: str, message: str) -> None:
        self.reasons[reason] += 1
        self.messages.append(message)

    def check(self, n_valid: int, what: str = "preference") -> None:
        """DataError when there were too many bad rows, or no valid row at all."""
        if len(self.messages) > self.limit:
            first = "; ".join(self.messages[:_QUOTED_BAD_ROWS])
            raise DataError(
                f"{self.path}: {len(self.messages)} malformed {what} rows, more than "
                f"max_bad_rows={self.limit}; the first: {first}"
            )
        if not n_valid:
            raise DataError(f"{self.path}: no valid {what} rows")

    def finish(self, pairs: list[PreferencePair]) -> PreferenceData:
        """The loaded data; DataError when there were too many bad rows or no pair at all."""
        self.check(len(pairs))
        return PreferenceData(pairs, dict(self.reasons), self.messages)


def _check_pair(values: dict, where: str) -> tuple[str, str] | None:
    """``(reason, message)`` for the first problem of a row's pair fields, None when it is fine."""
    for name in PAIR_FIELDS:
        if name not in values:
            return "missing field", f"{where}: field {name!r} is missing"
        value = values[name]
        if value is None:
            return "missing field", f"{where}: field {name!r} is null"
        if not isinstance(value, str):
            kind = type(value).__name__
            return "not a string", f"{where}: field {name!r} is not a string ({kind})"
        if not value.strip():
            return "empty field", f"{where}: field {name!r} is empty"
    if values["chosen"] == values["rejected"]:
        message = f"{where}: fields 'chosen' and 'rejected' are the same text"
        return "chosen equals rejected", message
    return None


def _pair(uid: object, values: dict) -> PreferencePair:
    return PreferencePair(str(uid), values["prompt"], values["chosen"], values["rejected"])


def jsonl_rows(path: Path, bad: _BadRows):
    """Yields ``(where, default_uid, obj)`` for each non-blank line of a JSONL file (``where``
    is ``file:line``, the default uid ``<file stem>-<line>``); an unreadable line is added to
    ``bad`` and skipped."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or e})") from None
    with f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = parse_jsonl_line(raw, where)
            except DataError as e:
                bad.add("unreadable line", str(e))
                continue
            yield where, f"{path.stem}-{line_no}", obj


def read_preference_jsonl(path: Path | str, *, max_bad_rows: int = 0) -> PreferenceData:
    """Pairs from a JSONL file; a pair without ``uid`` gets ``<file stem>-<line>``.

    Raises:
        DataError: the file is missing or unreadable, has more than ``max_bad_rows`` malformed
            rows, or holds no valid pair.
    """
    path = Path(path)
    bad = _BadRows(path, max_bad_rows)
    pairs = []
    for where, default_uid, obj in jsonl_rows(path, bad):
        problem = _check_pair(obj, where)
        if problem is not None:
            bad.add(*problem)
            continue
        pairs.append(_pair(obj.get("uid", default_uid), obj))
    return bad.finish(pairs)


def _read_parquet_table(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def preference_pairs_from_table(
    table: pa.Table, path: Path | str, *, max_bad_rows: int = 0
) -> PreferenceData:
    """Pairs from a table with ``prompt``, ``chosen``, ``rejected`` (and optionally ``uid``)
    columns; ``path`` names the rows in messages, and a pair without ``uid`` gets
    ``<file stem>-<row>``."""
    path = Path(path)
    missing = [c for c in PAIR_FIELDS if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: column(s) {missing} missing (columns: {table.column_names})")
    columns = {c: table.column(c).to_pylist() for c in PAIR_FIELDS}
    uids = table.column("uid").to_pylist() if "uid" in table.column_names else None
    bad = _BadRows(path, max_bad_rows)
    pairs = []
    for i in range(table.num_rows):
        values = {c: columns[c][i] for c in PAIR_FIELDS}
        problem = _check_pair(values, f"{path}: row {i}")
        if problem is not None:
            bad.add(*problem)
            continue
        uid = uids[i] if uids is not None and uids[i] is not None else f"{path.stem}-{i}"
        pairs.append(_pair(uid, values))
    return bad.finish(pairs)


def pairs_from_experience(table: pa.Table) -> PreferenceData:
    """One pair per group of Experience rows: the best-rewarded response against the worst.

    Rows are grouped by ``group_id`` (the samples of one prompt); the pair's prompt is the
    group's ``prompt_text`` and its responses are ``response_text`` (decoded without special
    tokens), its uid the ``group_id``. Of several rows sharing the best (or worst) reward the
    first in table order is taken. Skipped, counted by group in ``skipped``:
    ``"fewer than 2 rows"``, ``"tied rewards"`` (best == worst), ``"prompt differs within
    group"``, ``"empty text"`` (the prompt or either picked response is empty) and ``"same
    response text"``. Limit: a group whose best or worst response is empty is skipped rather than
    paired with the next one, and the middle rows of a group are not used.

    Args:
        table: Experience rows (``EXPERIENCE_SCHEMA``; checked with
            ``validate_experience_table``).

    Raises:
        DataError: the table is not an Experience table.
    """
    from rlhf_ray.replay.shard import validate_experience_table

    try:
        table = validate_experience_table(table)
    except ValueError as e:
        raise DataError(f"not an Experience table: {e}") from None
    group_ids = table.column("group_id").to_pylist()
    prompts = table.column("prompt_text").to_pylist()
    responses = table.column("response_text").to_pylist()
    rewards = table.column("reward").to_pylist()
    groups: dict[str, list[int]] = {}
    for i, group_id in enumerate(group_ids):
        groups.setdefault(group_id, []).append(i)

    skipped: Counter[str] = Counter()
    pairs = []
    for group_id, rows in groups.items():
        if len(rows) < 2:
            skipped["fewer than 2 rows"] += 1
            continue
        best = max(rows, key=lambda i: rewards[i])
        worst = min(rows, key=lambda i: rewards[i])
        prompt = prompts[best] or ""
        chosen, rejected = responses[best] or "", responses[worst] or ""
        if rewards[best] == rewards[worst]:
            skipped["tied rewards"] += 1
        elif len({prompts[i] for i in rows}) > 1:
            skipped["prompt differs within group"] += 1
        elif not (prompt.strip() and chosen.strip() and rejected.strip()):
            skipped["empty text"] += 1
        elif chosen == rejected:
            skipped["same response text"] += 1
        else:
            pairs.append(PreferencePair(str(group_id), prompt, chosen, rejected))
    return PreferenceData(pairs, dict(skipped))


def load_preference_pairs(path: Path | str, *, max_bad_rows: int = 0) -> PreferenceData:
    """Pairs from a ``.jsonl`` or ``.parquet`` file (suffix in any case).

    A Parquet file with ``prompt``/``chosen``/``rejected`` columns is read as pairs; one with the
    Experience columns goes through ``read_experience_parquet`` and ``pairs_from_experience``
    (whose skipped groups are counted, not limited: they are not malformed).

    Raises:
        DataError: an unsupported or unreadable file, more than ``max_bad_rows`` malformed rows,
            or no pair at all.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_preference_jsonl(path, max_bad_rows=max_bad_rows)
    if suffix != ".parquet":
        raise DataError(f"{path}: unsupported preference file type (use .jsonl or .parquet)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    table = _read_parquet_table(path)
    if set(PAIR_FIELDS) <= set(table.column_names):
        return preference_pairs_from_table(table, path, max_bad_rows=max_bad_rows)
    if "group_id" in table.column_names and "response_text" in table.column_names:
        try:
            data = pairs_from_experience(table)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
        if not data.pairs:
            raise DataError(f"{path}: no group yields a preference pair (skipped: {data.skipped})")
        return data
    raise DataError(
        f"{path}: neither preference columns {list(PAIR_FIELDS)} nor an Experience table "
        f"(columns: {table.column_names})"
    )


def split_pairs(
    pairs: list[PreferencePair], fraction: float
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """A fixed ``(train, held_out)`` split by a stable hash of each pair's prompt text, so all
    pairs of one prompt fall on the same side.

    Raises:
        DataError: one side would be empty.
    """
    return split_by_hash(pairs, lambda p: p.prompt, fraction, "offline.eval_fraction",
                         "preference pairs")


def movie_review_preferences(
    opening_words: int = 4,
    eval_fraction: float = 0.2,
    *,
    rejected_per_prompt: int | None = None,
    negative_prompts: bool = False,
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """The builtin ``movie-review-preferences`` set as ``(train, held_out)`` pairs.

    From the sentences of ``movie-review-openings`` (same file, same de-duplicated openings,
    same uids). The prompt is the first ``opening_words`` words of a positive sentence, chosen
    is the rest of that sentence and rejected the rest of a negative sentence; a sentence with
    nothing after its opening is left out. Responses start with a space, so ``prompt + chosen``
    is the original sentence (with single spaces). Each prompt is paired with every negative
    continuation of its side of the split, or with ``rejected_per_prompt`` of them drawn with a
    fixed seed per prompt. Uids are ``<prompt sentence uid>:<other sentence uid>``.

    The preference is "positive beats negative", the direction of the default ``vader`` reward.
    Caveat: the rejected continuation belongs to another sentence and does not follow the
    prompt, so chosen differs from rejected in coherence as well as sentiment; a model can rank
    these pairs by coherence alone, and preference accuracy on them overstates how much it
    learned about sentiment. Also, all prompts open positive sentences.
    ``negative_prompts=True`` adds the reverse pairing: the opening of a negative sentence, a
    positive continuation (of another sentence) as chosen and its own continuation as rejected.
    Coherence then favours chosen in half the pairs and rejected in the other half, leaving
    sentiment the only consistent signal, at the price of training towards continuations that do
    not follow their prompt.

    Split: a pair is held out exactly when its prompt's sentence is held out of
    ``movie-review-openings`` at the same ``eval_fraction`` (the same uid hash), and both of a
    pair's sentences come from the same side. So with the same ``data.eval_fraction`` no
    sentence of the prompt set's held-out split appears in a training pair (as prompt or
    response), and the train and held-out pairs share no sentence.

    Raises:
        DataError: a side of the split would be empty.
    """
    if rejected_per_prompt is not None and rejected_per_prompt < 1:
        raise ValueError(f"rejected_per_prompt must be >= 1 or None, got {rejected_per_prompt}")
    lines = gensim_data_file("pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines()
    # Same numbering as movie_review_openings: line i is the sentence of uid mr-{i:04d}.
    words_by_uid = {f"mr-{i:04d}": line.partition(" ")[2].split() for i, line in enumerate(lines)}
    sides: dict[bool, dict[str, list[tuple[str, str, str]]]] = {
        False: {"pos": [], "neg": []}, True: {"pos": [], "neg": []}
    }
    for record in movie_review_openings(opening_words):
        words = words_by_uid[record.uid]
        if " ".join(words[:opening_words]) != record.text:
            raise RuntimeError(f"{record.uid}: opening does not match its sentence")
        rest = words[opening_words:]
        if rest and record.label in ("pos", "neg"):
            held = is_held_out(record.uid, eval_fraction)
            sides[held][record.label].append((record.uid, record.text, " " + " ".join(rest)))

    def pairs_for(held: bool) -> list[PreferencePair]:
        side = sides[held]
        out = []
        directions = [("pos", "neg")] + ([("neg", "pos")] if negative_prompts else [])
        for prompt_label, other_label in directions:
            for uid, prompt, own in side[prompt_label]:
                others = side[other_label]
                if rejected_per_prompt is not None and rejected_per_prompt < len(others):
                    picked = random.Random(uid).sample(range(len(others)), rejected_per_prompt)
                    others = [others[i] for i in sorted(picked)]
                for other_uid, _, continuation in others:
                    chosen, rejected = (own, continuation) if prompt_label == "pos" else (
                        continuation, own)
                    out.append(PreferencePair(f"{uid}:{other_uid}", prompt, chosen, rejected))
        return out

    train, held_out = pairs_for(False), pairs_for(True)
    if not train or not held_out:
        raise DataError(
            f"eval fraction {eval_fraction} leaves {len(train)} training and {len(held_out)} "
            f"held-out {MOVIE_REVIEW_PREFERENCES} pairs; both must be non-empty"
        )
    return train, held_out
