"""Prompt datasets, the fixed train/held-out split, and the cursor that deals prompts out.

Builtin sets need no network:
- `movie-review-openings`: the labelled movie-review sentences that the gensim wheel ships
  (`gensim/test/test_data/pang_lee_polarity.cor`, latin-1, 200 sentences, half negative); each
  prompt is the first `data.opening_words` words of one sentence, to be continued.
- `tiny-counting`: short synthetic prompts for the tiny test preset.
Files: `.jsonl` (one object per line, text under `data.prompt_field`), `.txt` (one prompt per
line) or `.parquet` (a `data.prompt_field` column).

The held-out split is by a stable hash of each prompt's uid, so it never changes between runs.
The cursor serves each training prompt once per pass, in a seeded order; a served prompt's uid is
`<prompt uid>#<pass>`, so the same prompt sampled in two passes never collides in the buffer.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from rlhf_ray.config import DataConfig
from rlhf_ray.types import Prompt


class DataError(ValueError):
    """Bad input data; the message names the file, line and field."""


@dataclass(frozen=True)
class PromptRecord:
    uid: str
    text: str
    label: str = ""


def gensim_data_file(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the builtin prompt sets need the gensim package")
    path = Path(spec.origin).parent / "test" / "test_data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed gensim package")
    return path


def movie_review_openings(words: int) -> list[PromptRecord]:
    path = gensim_data_file("pang_lee_polarity.cor")
    records, seen = [], set()
    for i, line in enumerate(path.read_text(encoding="latin-1").splitlines()):
        label, _, text = line.partition(" ")
        opening = " ".join(text.split()[:words])
        if not opening or opening in seen:
            continue
        seen.add(opening)
        records.append(PromptRecord(f"mr-{i:04d}", opening, label.replace("__label__", "")))
    return records


def tiny_counting(n: int = 48) -> list[PromptRecord]:
    names = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    return [
        PromptRecord(f"tc-{i:03d}", f"Count {names[i % 8]} {names[(i * 3) % 8]} and")
        for i in range(n)
    ]


def parse_jsonl_line(raw: bytes, where: str) -> dict:
    """The JSON object on one raw line; a line that is not UTF-8, not JSON or not an object
    raises DataError starting with ``where``."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 ({e.reason})") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e.msg}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def iter_jsonl_objects(path: Path):
    """Yields ``(line_no, where, obj)`` for each non-blank line of a JSONL file, where ``where``
    is ``"file:line"``; a line that is not UTF-8, not JSON or not an object raises DataError."""
    with Path(path).open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            yield line_no, where, parse_jsonl_line(raw, where)


def _read_jsonl(path: Path, field: str) -> list[PromptRecord]:
    records = []
    for line_no, where, obj in iter_jsonl_objects(path):
        if field not in obj:
            raise DataError(f"{where}: field {field!r} is missing")
        text = obj[field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {field!r} is not a string")
        uid = str(obj.get("uid", f"{path.stem}-{line_no}"))
        records.append(PromptRecord(uid, text))
    return records


def _read_txt(path: Path) -> list[PromptRecord]:
    raw = path.read_bytes()
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line_no = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line_no}: not valid UTF-8 ({e.reason})") from None
    return [PromptRecord(f"{path.stem}-{i}", t) for i, t in enumerate(lines, 1) if t.strip()]


def _read_parquet(path: Path, field: str) -> list[PromptRecord]:
    import pyarrow.parquet as pq

    import pyarrow as pa

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    if field not in table.column_names:
        raise DataError(f"{path}: column {field!r} is missing (columns: {table.column_names})")
    uids = table.column("uid").to_pylist() if "uid" in table.column_names else None
    records = []
    for i, text in enumerate(table.column(field).to_pylist()):
        if not isinstance(text, str):
            raise DataError(f"{path}: row {i}: field {field!r} is not a string")
        records.append(PromptRecord(str(uids[i]) if uids else f"{path.stem}-{i}", text))
    return records


def load_prompts(cfg: DataConfig) -> list[PromptRecord]:
    if cfg.prompts == "movie-review-openings":
        records = movie_review_openings(cfg.opening_words)
    elif cfg.prompts == "tiny-counting":
        records = tiny_counting()
    else:
        path = Path(cfg.prompts)
        if not path.is_file():
            raise DataError(
                f"data.prompts={cfg.prompts!r}: not a builtin (movie-review-openings, "
                "tiny-counting) and no such file"
            )
        readers = {".jsonl": lambda: _read_jsonl(path, cfg.prompt_field),
                   ".txt": lambda: _read_txt(path),
                   ".parquet": lambda: _read_parquet(path, cfg.prompt_field)}
        if path.suffix not in readers:
            raise DataError(f"{path}: unsupported prompt file type (use .jsonl, .txt, .parquet)")
        records = readers[path.suffix]()
    # Empty or whitespace-only prompts are skipped in every format (nothing to continue).
    records = [r for r in records if r.text.strip()]
    if not records:
        raise DataError(f"data.prompts={cfg.prompts!r}: no non-empty prompts")
    return records


def is_held_out(uid: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "little")
    return (h % 10_000) < fraction * 10_000


def split_by_hash(items: list, key, fraction: float, setting: str, what: str):
    """``(train, held_out)``: an item is held out when the stable hash of ``key(item)`` says so.

    Raises:
        DataError: one side would be empty (the message names ``setting`` and ``what``).
    """
    train = [it for it in items if not is_held_out(key(it), fraction)]
    held_out = [it for it in items if is_held_out(key(it), fraction)]
    if not train or not held_out:
        raise DataError(
            f"{setting}={fraction} leaves {len(train)} training and {len(held_out)} "
            f"held-out {what}; both must be non-empty"
        )
    return train, held_out


def split_prompts(records: list[PromptRecord], fraction: float):
    return split_by_hash(records, lambda r: r.uid, fraction, "data.eval_fraction", "prompts")


class PromptCursor:
    """Deals training prompts out, each once per pass, in a seeded order per pass."""

    def __init__(self, records: list[PromptRecord], seed: int, source: str = "online"):
        self.records = records
        self.seed = seed
        self.source = source
        self.pass_idx = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, pass_idx: int) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(f"{self.seed}/{pass_idx}").shuffle(order)
        return order

    def take(self, n: int) -> list[Prompt]:
        out = []
        for _ in range(n):
            if self.position == len(self._order):
                self.pass_idx, self.position = self.pass_idx + 1, 0
                self._order = self._permutation(self.pass_idx)
            rec = self.records[self._order[self.position]]
            self.position += 1
            out.append(Prompt(uid=f"{rec.uid}#{self.pass_idx}", text=rec.text, source=self.source))
        return out

    def state_dict(self) -> dict:
        return {"pass_idx": self.pass_idx, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.pass_idx, self.position = state["seed"], state["pass_idx"], state["position"]
        self._order = self._permutation(self.pass_idx)
