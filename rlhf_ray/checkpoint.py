"""Run checkpoints: everything a run needs to continue from a learner step.

Layout under the run directory::

    checkpoints/
      step-00000010/          one checkpoint, complete or absent
        learner/              PPOTrainer.save + Learner.save (adapter, value head, optimizer,
                              scheduler, KL controller, versions, RNG states)
        driver.json           the driver's state: step, prompt cursor, request numbers per
                              generator, counters, the sample accounting
      step-00000020/
      LATEST                  the newest complete checkpoint's folder name

and in every replay shard directory ``checkpoints/step-<N>/`` (see ``replay/storage.py``): the
buffer as it was at the same step.

Writing is atomic: the folder is filled as ``checkpoints/.tmp-step-<N>`` and renamed, then
``LATEST`` is replaced (write to a temporary file, ``os.replace``). A crash at any point leaves
the previous checkpoint complete and ``LATEST`` naming it (or naming nothing yet); leftover
temporary folders are ignored and removed by the next write. The newest
``run.keep_checkpoints`` checkpoints are kept.

A checkpoint is taken between learner steps with nothing in flight (the asynchronous loop
lets its requests finish first), so the buffer, the cursor and the counters agree.

Restoring (``restore_replay``) makes every shard's checkpoint its current state. Rows the
buffer received after the checkpoint are set aside, not deleted (``set-aside/`` in each shard
directory): they came from prompts the restored cursor deals out again, or from weights the
resumed run never had.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

ROOT = "checkpoints"
LATEST = "LATEST"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def tag(step: int) -> str:
    return f"step-{step:08d}"


def root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / ROOT


def committed_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps of complete checkpoints (their driver.json exists), ascending."""
    base = root(run_dir)
    if not base.is_dir():
        return []
    steps = []
    for p in base.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "driver.json").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest(run_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """``(step, folder)`` of the checkpoint ``LATEST`` names, or None before the first one.

    A ``LATEST`` that names a folder that is not complete (it cannot be, unless edited by hand)
    falls back to the newest complete checkpoint.
    """
    base = root(run_dir)
    pointer = base / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        m = _STEP_DIR.match(name)
        if m and (base / name / "driver.json").is_file():
            return int(m.group(1)), base / name
    steps = committed_steps(run_dir)
    return (steps[-1], base / tag(steps[-1])) if steps else None


def begin(run_dir: str | os.PathLike, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of ``step``."""
    base = root(run_dir)
    base.mkdir(parents=True, exist_ok=True)
    for p in base.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    tmp = base / f".tmp-{tag(step)}"
    tmp.mkdir()
    return tmp


def commit(run_dir: str | os.PathLike, step: int, tmp: Path, driver_state: dict,
           keep: int) -> Path:
    """Writes driver.json into ``tmp``, renames it into place, points ``LATEST`` at it and
    deletes checkpoints beyond the newest ``keep``."""
    base = root(run_dir)
    (tmp / "driver.json").write_text(json.dumps(driver_state, indent=1))
    final = base / tag(step)
    if final.exists():  # the same step again after a rollback: the new state wins
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = base / f".tmp-{LATEST}"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, base / LATEST)
    for old in committed_steps(run_dir)[:-max(1, keep)]:
        shutil.rmtree(base / tag(old), ignore_errors=True)
    return final


def shard_tags_to_keep(run_dir: str | os.PathLike, keep: int) -> list[str]:
    """The shard checkpoints a new checkpoint must not delete: the newest ``keep - 1`` run
    checkpoints and the one ``LATEST`` names (still the restore point until the new one
    commits)."""
    steps = committed_steps(run_dir)
    keep_steps = set(steps[-(keep - 1):]) if keep > 1 else set()
    current = latest(run_dir)
    if current is not None:
        keep_steps.add(current[0])
    return [tag(s) for s in sorted(keep_steps)]


def read_driver_state(folder: Path) -> dict:
    return json.loads((folder / "driver.json").read_text())


def restore_replay(run_dir: str | os.PathLike, step: int | None) -> dict[str, int]:
    """Makes every durable shard of the run hold its checkpoint of ``step`` (None: empty, a run
    restarted before its first checkpoint). No shard may be live. Returns, per table, the rows
    set aside (inserted after the checkpoint)."""
    from rlhf_ray.replay import storage

    replay = Path(run_dir) / "replay"
    if not replay.is_dir():
        return {}
    out = {}
    for table, shard_dirs in storage.find_tables(run_dir).items():
        out[table] = sum(
            storage.restore_checkpoint(d, tag(step) if step is not None else None)["rows_after"]
            for d in shard_dirs
        )
    return out


def truncate_metrics(run_dir: str | os.PathLike, step: int) -> int:
    """Drops the metrics.jsonl rows after ``step`` (they are written again by the resumed run);
    returns how many were dropped. TensorBoard's event files keep them: it shows both."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a crash: it is redone with its step
            continue
        if record.get("step", step + 1) <= step:
            kept.append(line)
    tmp = path.with_name(".tmp-metrics.jsonl")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)
