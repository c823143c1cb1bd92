"""Versioned publishing of LoRA tensors through the Ray object store.

The `WeightStore` is a small named actor. A publish is a transaction: `begin` opens it, the
learner sends each piece (a group of adapter tensors) with `put_piece`, which the store `ray.put`s
itself so that it owns the object (the pieces outlive a learner that dies), and `commit` bumps
the version once. A publish that fails midway is
aborted and leaves the version unchanged. The store keeps only the newest `keep` versions; older
ones are dropped, and with the last reference gone Ray frees their objects, so the object store
does not grow over a long run. Generators only ever load the newest version.
"""

from __future__ import annotations

import time

import ray
import torch


class WeightStore:
    def __init__(self, keep: int = 1):
        self.keep = max(1, keep)
        self._version = 0
        self._versions: dict[int, dict] = {}  # version -> {"pieces": [ref], "meta": {...}}
        self._open: dict[int, dict] = {}  # publish id -> pieces being uploaded
        self._next_publish = 0
        self.failed_publishes = 0

    def begin(self) -> int:
        self._next_publish += 1
        self._open[self._next_publish] = {"pieces": [], "started": time.time()}
        return self._next_publish

    def put_piece(self, publish_id: int, piece: dict) -> None:
        if publish_id not in self._open:
            raise KeyError(f"publish {publish_id} is not open")
        self._open[publish_id]["pieces"].append(ray.put(piece))

    def commit(self, publish_id: int, num_pieces: int, meta: dict | None = None,
               version: int | None = None) -> int:
        """Makes the pieces the next version, or ``version`` when given (a resumed run
        republishes its checkpoint's version; it must be newer than the current one)."""
        pending = self._open.pop(publish_id, None)
        if pending is None:
            raise KeyError(f"publish {publish_id} is not open")
        if len(pending["pieces"]) != num_pieces:
            self.failed_publishes += 1
            raise ValueError(
                f"publish {publish_id}: {len(pending['pieces'])} of {num_pieces} pieces arrived"
            )
        if version is not None and version <= self._version:
            self.failed_publishes += 1
            raise ValueError(f"publish {publish_id}: version {version} is not newer than "
                             f"{self._version}")
        self._version = self._version + 1 if version is None else int(version)
        self._versions[self._version] = {"pieces": pending["pieces"], "meta": meta or {}}
        for old in sorted(self._versions)[: -self.keep]:
            del self._versions[old]
        return self._version

    def abort(self, publish_id: int) -> None:
        if self._open.pop(publish_id, None) is not None:
            self.failed_publishes += 1

    def version(self) -> int:
        return self._version

    def latest(self, have_version: int = -1):
        """(version, [piece refs], meta) of the newest version, or None if not newer."""
        if self._version == 0 or self._version <= have_version:
            return None
        entry = self._versions[self._version]
        return self._version, entry["pieces"], entry["meta"]

    def stats(self) -> dict:
        return {
            "weights/version": self._version,
            "weights/versions_held": len(self._versions),
            "weights/failed_publishes": self.failed_publishes,
            "weights/open_publishes": len(self._open),
        }


def split_pieces(state: dict[str, torch.Tensor], max_piece_bytes: int) -> list[dict]:
    """Groups tensors into pieces of at most ~max_piece_bytes (one tensor may exceed it alone)."""
    pieces, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_piece_bytes:
            pieces.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    if current:
        pieces.append(current)
    return pieces


def publish(store, state: dict[str, torch.Tensor], *, max_piece_bytes: int = 8 << 20,
            meta: dict | None = None, version: int | None = None,
            _fail_after_pieces: int | None = None) -> int:
    """Publishes `state` as one new version (the next one, or `version`); returns it. On any
    failure the version is unchanged.

    `_fail_after_pieces` injects a failure after that many pieces (tests only).
    """
    publish_id = ray.get(store.begin.remote())
    pieces = split_pieces(state, max_piece_bytes)
    try:
        for i, piece in enumerate(pieces):
            if _fail_after_pieces is not None and i >= _fail_after_pieces:
                raise RuntimeError(f"injected failure after {i} pieces")
            ray.get(store.put_piece.remote(publish_id, piece))
        return ray.get(store.commit.remote(publish_id, len(pieces), meta, version))
    except BaseException:
        ray.get(store.abort.remote(publish_id))
        raise


def fetch_if_newer(store, have_version: int):
    """(version, state) of the newest published adapter if newer than `have_version`."""
    found = ray.get(store.latest.remote(have_version))
    if found is None:
        return None
    version, refs, _meta = found
    state: dict[str, torch.Tensor] = {}
    for piece in ray.get(list(refs)):
        state.update(piece)
    return version, state


def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
