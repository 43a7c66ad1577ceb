"""The stage registry: name -> function(ctx, **options) -> summary dict. Imports are lazy so that
`artsim ingest` does not pay for importing torch."""
from __future__ import annotations

import importlib
from typing import Callable

from artsim.config import STAGES

_ENTRYPOINTS = {
    "ingest": "artsim.ingest:run_ingest",
    "download": "artsim.download:run_download",
    "embed": "artsim.embed:run_embed",
    "mine": "artsim.similarity.mine:run_mine",
    "train": "artsim.similarity.train:run_train",
    "index": "artsim.index:run_index",
    "links": "artsim.links:run_links",
    "report": "artsim.report:run_report",
}
assert set(_ENTRYPOINTS) == set(STAGES)


def stage_function(name: str) -> Callable:
    module, func = _ENTRYPOINTS[name].split(":")
    return getattr(importlib.import_module(module), func)
