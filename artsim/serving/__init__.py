"""Searching an index/<name>/ directory from any URI: the Python API for downstream services.

``from artsim.serving import ShardedIndex`` (docs/DESIGN.md, "Python API for downstream services"). Modules:
:mod:`~artsim.serving.sharded_index` (open, verify, search), :mod:`~artsim.serving.shards` (shard files and their
checksums), :mod:`~artsim.serving.filters` (the ``where`` syntax), :mod:`~artsim.serving.topk` (merging top-k).
"""
from artsim.serving.filters import parse_where
from artsim.serving.sharded_index import ShardedIndex, read_index_ids

__all__ = ["ShardedIndex", "parse_where", "read_index_ids"]
