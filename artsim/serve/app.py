"""The HTTP JSON API of ``artsim serve`` (docs/DESIGN.md, "HTTP API for downstream services"), on FastAPI.

Routes are thin: parse and check the request (:mod:`artsim.serve.queries`), take a lease on the index version that
is current (:class:`artsim.serve.registry.IndexSlot`), call :class:`artsim.serving.ShardedIndex`, answer JSON.
Blocking work (FAISS, model inference) runs in the server's thread pool without any global lock; FAISS releases
the GIL while it searches, so concurrent requests use every core.

Errors: a bad request gets 4xx with ``{"error": "..."}`` (unknown index or id 404; bad ``where``, ``k``, vector or
text 400; oversized upload 413; not an image 415). A 5xx would be a bug in artsim, logged with its traceback.
"""
from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from typing import Any, Optional

import anyio.to_thread
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from artsim.errors import ArtsimError
from artsim.serving.filters import parse_where
from artsim.serve.queries import BadRequest, Limits, check_image, check_k, parse_json_query
from artsim.serve.registry import IndexRegistry, IndexSlot

log = logging.getLogger("artsim.serve")

WHERE_HELP = ("filter on a facet column, as `artsim query --where` (repeatable): FIELD=VALUE, FIELD=a|b, "
              "FIELD!=VALUE, FIELD>=N, FIELD<N, FIELD=N..M")


def json_response(payload: Any, status: int = 200) -> Response:
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False, default=_json_default, separators=(",", ":"))
    return Response(body.encode("utf-8"), status_code=status, media_type="application/json")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def error(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


def create_app(registry: IndexRegistry, limits: Optional[Limits] = None, threads: Optional[int] = None) -> FastAPI:
    """The API over ``registry``; its reload poller runs while the app runs. ``threads``: size of the worker
    thread pool that searches and embeds (default: anyio's 40)."""
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if threads:
            anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        registry.start()
        yield
        registry.stop()

    app = FastAPI(title="artsim", version="1", lifespan=lifespan,
                  description="Neighbours of artworks from artsim indexes (see docs/serve.md).")
    app.state.registry = registry
    app.state.limits = limits

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest):
        return error(exc.status, exc.message)

    @app.exception_handler(ArtsimError)
    async def _artsim_error(request: Request, exc: ArtsimError):
        return error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "path", "body"))
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return error(400, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # never for bad input: that is a BadRequest / ArtsimError
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error(500, f"internal error in artsim ({type(exc).__name__}); see the server log")

    def slot_of(name: str) -> IndexSlot:
        slot = registry.slot(name)
        if slot is None:
            raise BadRequest(404, f"no index named {name!r}; this server has: {', '.join(sorted(registry.slots))}")
        return slot

    def where_of(clauses: list[str]) -> dict:
        try:
            return parse_where(clauses)
        except ArtsimError as exc:
            raise BadRequest(400, str(exc).replace("--where", "where")) from None

    def known(index, object_id: str) -> None:
        if not index.contains(object_id):
            raise BadRequest(404, f"object_id {object_id!r} is not in index {index.name!r}")

    @app.get("/health", summary="Served indexes: names, versions, vector counts, models")
    def health():
        return json_response({"status": "ok", "indexes": registry.status()})

    @app.get("/v1/{index}/neighbors", summary="Neighbours of an indexed work")
    def neighbors_of_id(index: str, id: str = Query(..., description="object_id of an indexed work"),
                        k: int = Query(10, description="number of hits"),
                        where: list[str] = Query([], description=WHERE_HELP),
                        farthest: bool = Query(False, description="least similar works instead")):
        check_k(k, limits)
        conditions = where_of(where)
        with slot_of(index).lease() as (ix, _):
            known(ix, id)
            search = ix.farthest_ids if farthest else ix.search_ids
            return json_response({"results": search([id], k, where=conditions)[0]})

    @app.post("/v1/{index}/neighbors", summary="Neighbours of an uploaded image, a vector or a text",
              description='Body: an image (Content-Type: image/*), or JSON {"vector": [...]} or, for a CLIP '
                          'model, {"text": "..."}.')
    async def neighbors_of_query(request: Request, index: str, k: int = Query(10), where: list[str] = Query([]),
                                 farthest: bool = Query(False)):
        check_k(k, limits)
        conditions = where_of(where)
        slot = slot_of(index)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype.startswith("image/"):
            data = await read_body(request, limits.max_upload_bytes, "image")
            check_image(data, limits)
            kind, query = "image", data
        elif ctype in ("application/json", "") or ctype.endswith("+json"):
            raw = await read_body(request, limits.max_json_bytes, "JSON body")
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise BadRequest(400, f"the body is not valid JSON: {exc}") from None
            kind, query = None, body
        else:
            raise BadRequest(415, f"Content-Type {ctype!r}: send image/* or application/json")

        def run():
            with slot.lease() as (ix, _):
                nonlocal kind, query
                if kind is None:
                    kind, query = parse_json_query(query, ix.dim, limits)
                if kind == "image":
                    vectors = ix.embed_image_bytes([query], "the uploaded image")
                elif kind == "text":
                    vectors = ix.embed_texts([query])
                else:
                    vectors = query
                search = ix.farthest if farthest else ix.search
                return search(vectors, k, where=conditions)[0]

        return json_response({"results": await run_in_threadpool(run)})

    @app.get("/v1/{index}/objects/{object_id:path}", summary="Stored metadata of an indexed work")
    def get_object(index: str, object_id: str):
        with slot_of(index).lease() as (ix, _):
            known(ix, object_id)
            return json_response({"results": [ix.metadata(object_id)]})

    @app.get("/v1/{index}/tags", summary="Suggested tags with the neighbours behind each (as the report)")
    def get_tags(index: str, id: str = Query(..., description="object_id of an indexed work"),
                 text_weight: float = Query(0.0, ge=0.0, le=1.0, description=(
                     "weight of the text signal (tag label vs the work's metadata; loads the offline sentence "
                     "model on first use); 0: neighbours only, as the report's visual signal"))):
        from artsim.serve.tags import suggest_tags

        with slot_of(index).lease() as (ix, cache):
            known(ix, id)
            return json_response({"object_id": id, "results": suggest_tags(ix, cache, id, text_weight=text_weight)})

    return app


async def read_body(request: Request, cap: int, what: str) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``cap`` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest(400, f"bad Content-Length {declared!r}") from None
        if size > cap:
            raise BadRequest(413, f"{what} of {size} bytes is over the {cap}-byte limit")
    buf = bytearray()
    async for chunk in request.stream():
        buf.extend(chunk)
        if len(buf) > cap:
            raise BadRequest(413, f"{what} is over the {cap}-byte limit")
    return bytes(buf)
