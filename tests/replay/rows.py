"""Builds small, fully populated Experience tables for the replay tests."""

from __future__ import annotations

import pyarrow as pa

from rlhf_ray.types import EXPERIENCE_SCHEMA, experience_table


def _default(type_: pa.DataType) -> object:
    """A neutral value for a column this helper does not know yet (the schema grows)."""
    if pa.types.is_list(type_):
        return []
    if pa.types.is_string(type_):
        return ""
    if pa.types.is_floating(type_):
        return 0.0
    if pa.types.is_integer(type_):
        return 0
    raise TypeError(f"no default for column type {type_}")


def make_rows(
    n: int, *, version: int = 0, start: int = 0, inserted_at: float | None = None
) -> pa.Table:
    """``n`` Experience rows with uids ``p{i}/0/{version}`` for i in ``start..start+n-1``.

    Every column carries a plausible value that differs between rows, so roundtrip tests can
    compare whole rows.
    """
    rows = []
    for i in range(start, start + n):
        t = 1 + i % 4  # response length
        row = {
            "uid": f"p{i}/0/{version}",
            "prompt_uid": f"p{i}",
            "group_id": f"p{i}",
            "prompt_text": f"prompt number {i}",
            "response_text": f"response {i} at v{version}",
            "prompt_ids": [i % 50 + 1, 7, 9],
            "response_ids": [100 + k + i % 10 for k in range(t)],
            "behavior_logprobs": [-0.25 * (k + 1) for k in range(t)],
            "ref_logprobs": [-0.5 * (k + 1) for k in range(t)],
            "reward": float(i % 7) / 7.0,
            "group_advantage": float(i % 3) - 1.0,
            "finish_reason": "stop" if i % 3 else "length",
            "policy_version": version,
            "source": "online",
            "times_sampled": 0,
            "priority": 1.0 + i % 5,
        }
        if inserted_at is not None:
            row["inserted_at"] = inserted_at + i
        for field in EXPERIENCE_SCHEMA:
            if field.name not in row and field.name != "inserted_at":
                row[field.name] = _default(field.type)
        rows.append(row)
    return experience_table(rows)
