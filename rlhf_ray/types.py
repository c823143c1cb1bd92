"""The typed records that travel between roles.

prompt -> ``PromptBatch`` -> Generator -> ``RolloutBatch`` -> RewardScorer -> ``Experience``
(an Arrow table with ``EXPERIENCE_SCHEMA``) -> ReplayShard -> Learner.

Token sequences are stored unpadded; padding exists only inside one forward pass.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import pyarrow as pa

FINISH_REASONS = ("stop", "length")

# One row per sampled response. The column names are the contract between roles.
EXPERIENCE_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),  # prompt_uid/sample_idx/policy_version
        ("prompt_uid", pa.string()),
        ("group_id", pa.string()),  # the n samples of one prompt share it
        ("prompt_text", pa.string()),
        ("response_text", pa.string()),  # decoded without special tokens
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("behavior_logprobs", pa.list_(pa.float32())),  # [T] of the distribution sampled from
        ("ref_logprobs", pa.list_(pa.float32())),  # [T] frozen reference
        ("reward", pa.float32()),  # sequence score before KL shaping
        # Group-relative advantage of `reward` among the group's scored samples (grpo/rloo),
        # set by the scorer when the group is complete; 0 for gae, which recomputes values.
        ("group_advantage", pa.float32()),
        ("finish_reason", pa.string()),  # "stop" | "length"
        ("policy_version", pa.int64()),  # version held when the request was admitted
        ("source", pa.string()),  # "online" | "offline:<dataset>" | "augmented:<method>"
        ("times_sampled", pa.int64()),
        ("priority", pa.float64()),
        ("inserted_at", pa.float64()),  # unix seconds
    ]
)
EXPERIENCE_COLUMNS = tuple(EXPERIENCE_SCHEMA.names)


def make_uid(prompt_uid: str, sample_idx: int, policy_version: int) -> str:
    return f"{prompt_uid}/{sample_idx}/{policy_version}"


@dataclass
class Prompt:
    """One prompt to sample from. ``uid`` is stable across runs (the data cursor keys on it)."""

    uid: str
    text: str
    source: str = "online"


@dataclass
class PromptBatch:
    prompts: list[Prompt]
    n_samples: int = 1  # responses per prompt (a group)
    # the driver's number for this request: the generator derives its sampling seed from it,
    # so a retried or resumed request samples the same; None: the generator's own count
    request_idx: int | None = None


@dataclass
class Rollout:
    """One sampled response, before scoring."""

    uid: str
    prompt_uid: str
    group_id: str
    prompt_text: str
    response_text: str
    prompt_ids: list[int]
    response_ids: list[int]
    behavior_logprobs: list[float]  # [T], log-probs of the processed (sampled) distribution
    finish_reason: str
    policy_version: int
    source: str = "online"


@dataclass
class RolloutBatch:
    rollouts: list[Rollout]
    generator_id: int = 0
    # Counters for the metrics: prompts truncated or dropped for length, timing, tokens.
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class ScoreReport:
    """What a scorer returns to the driver after inserting a batch (the rows go to the buffer)."""

    inserted: int
    quarantined: int
    stats: dict[str, float] = field(default_factory=dict)
    quarantine: list[dict] = field(default_factory=list)  # prompt_uid, uid, reason


def experience_table(rows: list[dict]) -> pa.Table:
    """Builds a validated Experience table from row dicts, filling replay bookkeeping."""
    now = time.time()
    filled = []
    for i, row in enumerate(rows):
        row = dict(row)
        row.setdefault("times_sampled", 0)
        row.setdefault("priority", 1.0)
        row.setdefault("inserted_at", now)
        missing = [c for c in EXPERIENCE_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"experience row {i}: missing field(s) {missing}")
        validate_row(row, where=f"experience row {i}")
        filled.append(row)
    return pa.Table.from_pylist(filled, schema=EXPERIENCE_SCHEMA)


def validate_row(row: dict, where: str = "row") -> None:
    """Checks the invariants of one Experience row; raises ValueError naming the field."""
    n = len(row["response_ids"])
    for name in ("behavior_logprobs", "ref_logprobs"):
        if len(row[name]) != n:
            raise ValueError(
                f"{where} (uid {row.get('uid')}): field {name!r} has {len(row[name])} entries, "
                f"response_ids has {n}"
            )
    if row["finish_reason"] not in FINISH_REASONS:
        raise ValueError(
            f"{where} (uid {row.get('uid')}): field 'finish_reason' is {row['finish_reason']!r}, "
            f"expected one of {FINISH_REASONS}"
        )
    reward = row["reward"]
    if not isinstance(reward, (int, float)) or reward != reward or abs(reward) == float("inf"):
        raise ValueError(f"{where} (uid {row.get('uid')}): field 'reward' is not finite: {reward!r}")


def rollout_to_row(
    r: Rollout, *, reward: float, ref_logprobs: list[float], group_advantage: float = 0.0,
    priority: float = 1.0,
) -> dict:
    row = dataclasses.asdict(r)
    row["priority"] = float(priority)
    row["reward"] = float(reward)
    row["group_advantage"] = float(group_advantage)
    row["ref_logprobs"] = list(ref_logprobs)
    return row
