"""images/: one committed Parquet file per download shard (``shard-<...>.parquet``, docs/download.md). The download
stage writes them; export and anything else that reads images/ lists them here."""
from __future__ import annotations

SHARD_PREFIX = "shard-"


def shard_files(storage, images_uri: str) -> list[str]:
    """Names of the committed shard files of images/ (temporaries and markers are not shards)."""
    return [n for n in storage.list(images_uri) if n.startswith(SHARD_PREFIX) and n.endswith(".parquet")]
