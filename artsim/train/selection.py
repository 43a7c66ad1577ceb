"""Which epoch is exported: validation on held-out creators decides (plain Python, no torch, no Ray).

Every epoch (epoch 0 = the start: with the residual head, the pretrained model) is measured on held-out creators:
``val_recall@k`` (the mined criteria together), ``val_creator_recall@k`` (the other held-out works of the same
creator) and ``val_recall@k[<kind>]`` per kind of criterion ("shared subject", "shared object type", "similar
text", ...). ``train.select_by`` says which of them count:

- ``every_metric`` (default): all of them, and an epoch where *any* of them is below the start's value can never be
  exported. A blended score lets a gain in one (object type) pay for a loss in another (same creator); on real Met
  works that trade did not survive the move to unseen creators (issue 10). Among the epochs that lose nothing, the
  highest mean wins; if none gains, the start is exported.
- ``criteria_and_creator``: the mean of the two recalls (no per-metric floor).
- ``criteria``: the mined criteria's recall alone.

An epoch is the best only when its score is strictly higher than every earlier one's: on ties the earlier epoch
(ultimately the start) stays.
"""
from __future__ import annotations

from typing import Optional

SELECT_BY = ("every_metric", "criteria_and_creator", "criteria")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and value == value


def selection_metrics(metrics: dict, k: int, select_by: str = "every_metric") -> dict:
    """The validation metrics of one epoch that ``select_by`` counts (name -> value; missing / NaN left out)."""
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {SELECT_BY}, got {select_by!r}")
    names = [f"val_recall@{k}"]
    if select_by != "criteria":
        names.append(f"val_creator_recall@{k}")
    if select_by == "every_metric":
        prefix = f"val_recall@{k}["
        names += sorted(n for n in metrics if n.startswith(prefix) and n.endswith("]"))
    return {n: float(metrics[n]) for n in names if _number(metrics.get(n))}


def validation_score(metrics: dict, k: int, select_by: str = "every_metric") -> Optional[float]:
    """The mean of the counted metrics; None when there is no validation set."""
    values = list(selection_metrics(metrics, k, select_by).values())
    return sum(values) / len(values) if values else None


def worse_than_start(metrics: dict, start: dict, k: int, select_by: str = "every_metric") -> list[str]:
    """The counted metrics that this epoch has below the start's (empty unless ``select_by`` is every_metric)."""
    if select_by != "every_metric":
        return []
    now, then = selection_metrics(metrics, k, select_by), selection_metrics(start, k, select_by)
    return [n for n, v in then.items() if n in now and now[n] < v - 1e-9]


def is_new_best(metrics: dict, start: Optional[dict], best_score: Optional[float], k: int,
                select_by: str = "every_metric") -> bool:
    """Does this epoch replace the best so far? Without any validation set (no score now and none before) every
    epoch does, so the last one is exported."""
    score = validation_score(metrics, k, select_by)
    if score is None:
        return best_score is None
    if start is not None and worse_than_start(metrics, start, k, select_by):
        return False
    return best_score is None or score > best_score + 1e-9
