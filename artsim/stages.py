"""The stage registry: name -> function(ctx, **options) -> summary dict. Imports are lazy so that
`artsim ingest` does not pay for importing torch."""
from __future__ import annotations

import importlib
from typing import Callable

from artsim.config import STAGES

_ENTRYPOINTS = {
    "ingest": "artsim.ingest.stage:run_ingest",
    "download": "artsim.download.stage:run_download",
    "embed": "artsim.embed.stage:run_embed",
    "mine": "artsim.mine.stage:run_mine",
    "train": "artsim.train.stage:run_train",
    "index": "artsim.index.stage:run_index",
    "links": "artsim.links.stage:run_links",
    "report": "artsim.report.stage:run_report",
}
assert set(_ENTRYPOINTS) == set(STAGES)


def stage_function(name: str) -> Callable:
    module, func = _ENTRYPOINTS[name].split(":")
    return getattr(importlib.import_module(module), func)
