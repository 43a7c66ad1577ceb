"""Latent walks: a path of works from work A to work B through the embedding space.

The great circle from A's vector to B's is sampled at ``steps`` evenly spaced points (spherical interpolation,
slerp: every point is a unit vector, unlike a straight line which cuts through the sphere and lands near nothing);
at each point the nearest work not yet on the path is taken. The path starts at A and ends at B, with no repeats.
"""
from __future__ import annotations

import numpy as np

from artsim.curate.common import checked_vectors
from artsim.errors import ArtsimError


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Point at fraction ``t`` of the great circle from unit vector a to unit vector b (unit length)."""
    dot = float(np.clip(np.dot(a, b), -1.0, 1.0))
    omega = np.arccos(dot)
    if omega < 1e-6:  # (nearly) the same direction: linear interpolation is exact enough
        point = (1 - t) * a + t * b
    elif np.pi - omega < 1e-6:
        # antipodal: every great circle joins them; pick a deterministic one through an orthogonal direction
        ortho = np.zeros_like(a)
        ortho[int(np.argmin(np.abs(a)))] = 1.0
        ortho -= np.dot(ortho, a) * a
        ortho /= np.linalg.norm(ortho)
        point = np.cos(np.pi * t) * a + np.sin(np.pi * t) * ortho
    else:
        point = (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)
    return (point / np.linalg.norm(point)).astype(np.float32)


def latent_walk(vectors, vector_ids, start_id: str, end_id: str, steps: int = 8) -> list[dict]:
    """Works on the way from ``start_id`` to ``end_id``: ``steps`` intermediate works between the two ends.

    Returns ``[{"object_id", "t", "score", "to_start", "to_end"}, ...]``: ``t`` the position on the great circle
    (0 = A, 1 = B), ``score`` the cosine of the work to the interpolated point, ``to_start`` / ``to_end`` its cosine
    to A and B. Fewer intermediate works are returned when the collection has fewer than ``steps`` others.
    """
    import faiss

    matrix, ids = checked_vectors(vectors, vector_ids)
    if not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ArtsimError(f"walk.steps: must be a non-negative integer, got {steps!r}")
    row = {object_id: r for r, object_id in enumerate(ids)}
    for name, object_id in (("start", start_id), ("end", end_id)):
        if object_id not in row:
            raise ArtsimError(f"walk: {name} work {object_id!r} has no embedding")
    if start_id == end_id:
        raise ArtsimError("walk: start and end are the same work")
    a, b = matrix[row[start_id]], matrix[row[end_id]]
    index = faiss.IndexFlatIP(matrix.shape[1])
    index.add(matrix)
    used = {row[start_id], row[end_id]}
    n_mid = int(min(steps, len(ids) - 2))
    path = [_step(start_id, 0.0, 1.0, a, a, b)]
    for s in range(1, n_mid + 1):
        t = s / (n_mid + 1)
        point = slerp(a, b, t)
        # the top len(used)+1 hits always include at least one unused work
        sims, hits = index.search(point[None, :], min(len(ids), len(used) + 1))
        pick = next(int(h) for h in hits[0] if h >= 0 and int(h) not in used)
        used.add(pick)
        path.append(_step(ids[pick], t, float(matrix[pick] @ point), matrix[pick], a, b))
    path.append(_step(end_id, 1.0, 1.0, b, a, b))
    return path


def _step(object_id: str, t: float, score: float, vec: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict:
    return {"object_id": object_id, "t": round(float(t), 4), "score": round(float(score), 4),
            "to_start": round(float(vec @ a), 4), "to_end": round(float(vec @ b), 4)}
