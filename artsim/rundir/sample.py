"""The one stable per-collection sample of a run-directory dataset, used wherever a stage cannot afford every work
(the mining pool, the report's map/clusters/tags). The same data, budget and seed give the same rows in any stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from artsim.rundir.names import collections_of

MIN_PER_COLLECTION = 100  # a sampled collection keeps at least this many works (all of them when it has fewer)
ID_BATCH_ROWS = 65_536  # rows per Arrow batch while streaming object ids and collections

_FNV_OFFSET, _FNV_PRIME, _MASK64 = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1


def _splitmix64_finish(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: FNV-1a's low bits are weak, and the pool compares whole 64-bit values."""
    z = z.copy()
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def stable_hashes(object_ids, seed: int) -> np.ndarray:
    """uint64 hash of each object id salted with ``seed``: FNV-1a 64 over the seed's 8 little-endian bytes then the
    id's UTF-8 bytes, then the splitmix64 finaliser. Unlike ``hash()`` it is the same in every process and on every
    machine. Vectorised over an Arrow string array (a list of str works too); ids must not be null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = object_ids if isinstance(object_ids, (pa.Array, pa.ChunkedArray)) else pa.array(object_ids, pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = pc.cast(arr, pa.large_string())
    if arr.null_count:
        raise ValueError("stable_hashes: object ids must not be null")
    n = len(arr)
    h0 = _FNV_OFFSET
    for byte in (seed & _MASK64).to_bytes(8, "little"):
        h0 = ((h0 ^ byte) * _FNV_PRIME) & _MASK64
    if n == 0:
        return np.zeros(0, np.uint64)
    buffers = arr.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64)[arr.offset:arr.offset + n + 1]
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")  # longest first: position j touches a prefix of this order
    starts, descending = offsets[:-1][order], lengths[order]
    h = np.full(n, h0, dtype=np.uint64)
    prime = np.uint64(_FNV_PRIME)
    with np.errstate(over="ignore"):
        for j in range(int(descending[0])):
            k = int(np.searchsorted(-descending, -j, side="left"))  # ids longer than j bytes
            h[:k] = (h[:k] ^ data[starts[:k] + j].astype(np.uint64)) * prime
        out = np.empty(n, dtype=np.uint64)
        out[order] = _splitmix64_finish(h)
    return out


def allocate(counts: dict, budget: int, min_per_collection: int = MIN_PER_COLLECTION) -> dict:
    """How many works of each collection go into a sample of at most ``budget`` (everything when it fits).

    Each collection keeps min(its size, a floor) — the floor is ``min_per_collection``, shrunk to
    budget / collections when there are many — so a small museum is not drowned by a big one; the rest is shared in
    proportion to what each has left (largest remainders, ties by name). Never more than a collection has; sums to
    ``budget``."""
    total = sum(counts.values())
    if total <= budget:
        return dict(counts)
    floor = min(min_per_collection, budget // len(counts))
    base = {c: min(n, floor) for c, n in counts.items()}
    rest = budget - sum(base.values())
    capacity = {c: counts[c] - base[c] for c in counts}
    room = sum(capacity.values())  # > rest, since total > budget
    extra = {c: rest * capacity[c] // room for c in counts}
    remainder = {c: rest * capacity[c] % room for c in counts}
    for c in sorted(counts, key=lambda c: (-remainder[c], str(c)))[:rest - sum(extra.values())]:
        extra[c] += 1  # a remainder > 0 means extra < capacity, so one more never exceeds a collection's size
    return {c: base[c] + extra[c] for c in counts}


def stream_batches(storage, files: list[str], columns: Sequence[str], batch_rows: int = 4_096):
    """(first global row, batch) over every file in order, only the ``columns`` each file has."""
    first = 0
    for file_uri in files:
        for batch in storage.iter_batches(file_uri, list(columns), batch_rows):
            yield first, batch
            first += batch.num_rows


def _ids_and_collections(batch):
    """(valid mask, object ids, collections) of a batch: rows with a non-empty object_id; the collection is the
    ``collection`` column where the files have one and it is set, else the object_id prefix (``collections_of``)."""
    names = batch.schema.names
    ids = batch.column(names.index("object_id"))
    valid = pc.fill_null(pc.not_equal(ids, ""), False)
    ids = pc.filter(ids, valid)
    given = pc.filter(batch.column(names.index("collection")), valid) if "collection" in names else None
    return valid.to_numpy(zero_copy_only=False), ids, pa.array(collections_of(ids, given), pa.string())


@dataclass
class SampleRows:
    """Which rows of a dataset a sample takes: ``rows`` (sorted global row numbers over the files in order), out of
    ``total`` rows with an object_id; ``counts`` per collection over the whole dataset; ``quotas`` per collection
    when ``sampled``."""
    total: int
    rows: np.ndarray
    counts: dict = field(default_factory=dict)
    quotas: dict = field(default_factory=dict)
    sampled: bool = False


def count_collections(storage, files: list[str]) -> tuple[dict, int]:
    """(rows with an object_id per collection, rows in the files), streamed."""
    counts: dict[str, int] = {}
    rows = 0
    for first, batch in stream_batches(storage, files, ("object_id", "collection"), ID_BATCH_ROWS):
        _, _, collections = _ids_and_collections(batch)
        for item in pc.value_counts(collections).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
        rows = first + batch.num_rows
    return counts, rows


def sample_rows(storage, files: list[str], budget: int, seed: int) -> SampleRows:
    """The one stable sample of a dataset (records/ or embeddings/), reading only object_id and collection.

    At most ``budget`` rows with an object_id: all of them when they fit; else, per collection (``allocate``), the
    rows with the smallest ``stable_hashes(object_id, seed)`` — a uniform random sample that is the same for the
    same data and seed however the files are split, in any process. Two streamed passes (count, then pick); memory
    about ``budget`` (hash, row) pairs whatever the dataset's size."""
    counts, _ = count_collections(storage, files)
    total = sum(counts.values())
    if total <= budget:
        rows = []
        for first, batch in stream_batches(storage, files, ("object_id",), ID_BATCH_ROWS):
            valid = pc.fill_null(pc.not_equal(batch.column(0), ""), False).to_numpy(zero_copy_only=False)
            rows.append(first + np.flatnonzero(valid))
        return SampleRows(total, np.concatenate(rows) if rows else np.zeros(0, np.int64), counts)
    quotas = allocate(counts, budget)
    return SampleRows(total, _pick_rows(storage, files, quotas, seed), counts, quotas, True)


def _pick_rows(storage, files: list[str], quotas: dict[str, int], seed: int) -> np.ndarray:
    """Global rows of the sample (sorted): per collection, the quota's smallest (hash, row)."""
    names = sorted(quotas)
    value_set = pa.array(names, pa.string())
    quota = np.array([quotas[c] for c in names], dtype=np.int64)
    cutoff = np.full(len(names), np.iinfo(np.uint64).max, dtype=np.uint64)  # hashes above cannot get in
    kept = (np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.int64))  # code, hash, row
    pending: list = []
    pending_rows = 0

    def trim(parts):
        code = np.concatenate([p[0] for p in parts])
        hashes = np.concatenate([p[1] for p in parts])
        rows = np.concatenate([p[2] for p in parts])
        order = np.lexsort((rows, hashes, code))
        code, hashes, rows = code[order], hashes[order], rows[order]
        group_start = np.searchsorted(code, np.arange(len(names)))
        keep = (np.arange(len(code)) - group_start[code]) < quota[code]
        code, hashes, rows = code[keep], hashes[keep], rows[keep]
        full = (np.bincount(code, minlength=len(names)) >= quota) & (quota > 0)
        last = np.searchsorted(code, np.arange(len(names)), side="right") - 1
        cutoff[full] = hashes[last[full]]
        return code, hashes, rows

    for first, batch in stream_batches(storage, files, ("object_id", "collection"), ID_BATCH_ROWS):
        valid, ids, collections = _ids_and_collections(batch)
        if len(ids) == 0:
            continue
        code = pc.index_in(collections, value_set=value_set).to_numpy(zero_copy_only=False).astype(np.int64)
        hashes = stable_hashes(ids, seed)
        rows = first + np.flatnonzero(valid)
        near = hashes <= cutoff[code]
        pending.append((code[near], hashes[near], rows[near]))
        pending_rows += int(near.sum())
        if pending_rows > max(int(quota.sum()), ID_BATCH_ROWS):
            kept = trim([kept, *pending])
            pending, pending_rows = [], 0
    kept = trim([kept, *pending])
    return np.sort(kept[2])
