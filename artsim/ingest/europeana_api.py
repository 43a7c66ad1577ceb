"""Harvesting the Europeana Search API (``kind: europeana_api``): cursor paging, retries, resume after a kill.

Each partition (one more ``qf`` per entry of ``partitions``, or the whole result set) is one cursor, harvested by
one ingest task: ``cursor=*`` then each response's ``nextCursor`` until a page without one (or without items, or
``max_records``). Every page is saved under ``<run.root>/_harvest/sources.N/partition-PPPP/page-NNNNNN.json.gz``
(the response's items, as the API sent them) and then ``state.json`` (the next cursor, pages so far, the API's
``totalResults``) is rewritten — both atomically. A harvest that is killed resumes from the saved cursor; pages
already saved are not asked for again. A state whose query differs from the config's (``digest``) is started over.
Once harvested, the saved pages are parsed with the ``europeana_json`` parser (artsim/ingest/europeana.py).

Requests: the API key comes from the environment variable the config names (``api_key_env``) and never appears
in a message or a saved file; 429, 5xx, timeouts and connection errors are retried with exponential backoff and
full jitter (``Retry-After`` honoured up to ``backoff_max_s``); any other 4xx stops the harvest with the API's
error message.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Iterator, Optional

from artsim.errors import ArtsimError, ConfigError
from artsim.ingest.common import BadRow
from artsim.storage import Storage, join

RETRY_STATUSES = (429, 500, 502, 503, 504)
USER_AGENT = "artsim/0.1 (Europeana harvest)"


def query_params(source, partition: Optional[str]) -> list[tuple[str, str]]:
    """The Search API parameters of one partition (without the key and the cursor)."""
    params = dict(source.query)
    params.setdefault("query", "*")
    params.setdefault("reusability", "open")
    params["rows"] = str(source.page_size)
    pairs = sorted(params.items())
    pairs += [("qf", f) for f in source.filters]
    if partition:
        pairs.append(("qf", partition))
    return pairs


def state_digest(source, partition: Optional[str]) -> str:
    text = json.dumps([source.path, query_params(source, partition), source.max_records])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare_harvest(storage: Storage, source, key: str, run_root: str) -> dict:
    """Driver side, before any task: the key must be set (a missing one is a config error naming the variable)."""
    name = source.api_key_env
    api_key = os.environ.get(name, "")
    if not api_key.strip():
        raise ConfigError(f"{key}.api_key_env", f"environment variable {name} is not set: export the Europeana "
                                                f"API key (https://pro.europeana.eu/page/get-api) as {name}")
    return {"api_key": api_key, "partitions": list(source.partitions) or [None],
            "state_uri": join(run_root, "_harvest", key)}


class Harvester:
    """One partition's cursor walk; ``fetch_page`` is the only network access."""

    def __init__(self, storage: Storage, source, key: str, partition_index: int, partition: Optional[str],
                 api_key: str, state_uri: str, sleep=time.sleep):
        self.storage, self.source, self.key = storage, source, key
        self.partition = partition
        self.api_key = api_key
        self.dir = join(state_uri, f"partition-{partition_index:04d}")
        self.digest = state_digest(source, partition)
        self.sleep = sleep
        self.requests = 0
        self.retried = 0

    # -- state -----------------------------------------------------------------------------------------------------
    def load_state(self) -> dict:
        uri = join(self.dir, "state.json")
        fresh = {"digest": self.digest, "cursor": "*", "pages": 0, "items": 0, "done": False, "total_results": None}
        if not self.storage.exists(uri):
            return fresh
        state = self.storage.read_json(uri)
        if not isinstance(state, dict) or state.get("digest") != self.digest:
            self.storage.delete(self.dir)  # another query: its pages are not this one's
            return fresh
        return state

    def page_uri(self, n: int) -> str:
        return join(self.dir, f"page-{n:06d}.json.gz")

    # -- network ---------------------------------------------------------------------------------------------------
    def _url(self, cursor: str) -> str:
        params = query_params(self.source, self.partition) + [("cursor", cursor), ("wskey", self.api_key)]
        return f"{self.source.path}?{urllib.parse.urlencode(params)}"

    def fetch_page(self, cursor: str) -> dict:
        last = ""
        for attempt in range(self.source.retries):
            self.requests += 1
            wait: Optional[float] = None
            try:
                request = urllib.request.Request(self._url(cursor), headers={"User-Agent": USER_AGENT,
                                                                              "Accept": "application/json"})
                with urllib.request.urlopen(request, timeout=self.source.timeout_s) as response:
                    body = response.read()
                data = json.loads(body)
                if not isinstance(data, dict):
                    raise ArtsimError(f"{self.key}: the Search API answered {type(data).__name__}, not an object")
                if data.get("success") is False:
                    raise ArtsimError(f"{self.key}: the Search API refused the query: {data.get('error')}")
                return data
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRY_STATUSES:
                    raise ArtsimError(f"{self.key}: the Search API answered HTTP {exc.code}: "
                                      f"{_api_error(exc)}") from None
                last = f"HTTP {exc.code}"
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                if retry_after and retry_after.strip().isdigit():
                    wait = float(retry_after)
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as exc:
                last = type(exc).__name__ + (f" ({exc.reason})" if isinstance(exc, urllib.error.URLError) else "")
            if attempt + 1 < self.source.retries:
                self.retried += 1
                backoff = random.uniform(0, min(self.source.backoff_max_s, self.source.backoff_base_s * 2 ** attempt))
                self.sleep(min(self.source.backoff_max_s, max(backoff, wait or 0.0)))
        raise ArtsimError(f"{self.key}: the Search API failed {self.source.retries} times in a row ({last}); "
                          f"the harvest resumes from the saved cursor when ingest runs again")

    # -- the walk --------------------------------------------------------------------------------------------------
    def harvest(self) -> dict:
        state = self.load_state()
        while not state["done"]:
            data = self.fetch_page(state["cursor"])
            items = data.get("items") if isinstance(data.get("items"), list) else []
            body = json.dumps({"items": items, "totalResults": data.get("totalResults")}).encode()
            self.storage.write_bytes(self.page_uri(state["pages"]), gzip.compress(body, 6))
            cursor = data.get("nextCursor")
            state = {**state, "pages": state["pages"] + 1, "items": state["items"] + len(items),
                     "cursor": cursor if isinstance(cursor, str) and cursor else None,
                     "total_results": data.get("totalResults", state["total_results"])}
            limit = self.source.max_records
            state["done"] = state["cursor"] is None or not items or (limit is not None and state["items"] >= limit)
            self.storage.write_json(join(self.dir, "state.json"), state)  # after the page: a page is never lost
        return state

    def saved_items(self, pages: int) -> Iterator[tuple[str, Any]]:
        for n in range(pages):
            data = json.loads(gzip.decompress(self.storage.read_bytes(self.page_uri(n))))
            for i, item in enumerate(data.get("items") or []):
                yield f"page {n} items[{i}]", item


def _api_error(exc: urllib.error.HTTPError) -> str:
    try:
        data = json.loads(exc.read(65536))
        return str(data.get("error") or data)[:300]
    except Exception:
        return exc.reason or ""


def harvest_items(storage: Storage, source, key: str, partition_index: int, api_context: dict
                  ) -> Iterator[dict | BadRow]:
    """Harvest (or resume) one partition, then every saved item as a record (options applied)."""
    from artsim.ingest.europeana import parse_europeana
    from artsim.ingest.stage import _apply_options

    source_index = int(key.split(".")[1])
    ctx = api_context["sources"][source_index]
    harvester = Harvester(storage, source, key, partition_index, ctx["partitions"][partition_index], ctx["api_key"],
                          ctx["state_uri"])
    state = harvester.harvest()
    api_context.setdefault("stats", {})[(source_index, partition_index)] = {
        "pages": state["pages"], "total_results": state["total_results"], "requests": harvester.requests}
    chunk: list = []
    for _, item in harvester.saved_items(state["pages"]):
        chunk.append(item)
        if len(chunk) >= 1000:
            yield from _records(parse_europeana(chunk, source.collection), source, _apply_options)
            chunk = []
    if chunk:
        yield from _records(parse_europeana(chunk, source.collection), source, _apply_options)


def _records(items, source, apply_options) -> Iterator[dict | BadRow]:
    for item in items:
        if isinstance(item, dict):
            item["source"] = "europeana_api"
            apply_options(item, source, source.path)
        yield item


__all__ = ["prepare_harvest", "harvest_items", "Harvester", "query_params"]
