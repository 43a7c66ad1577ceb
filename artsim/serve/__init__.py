"""`artsim serve`: the indexes over HTTP for downstream services (docs/DESIGN.md, "HTTP API for downstream services").

- :mod:`artsim.serve.registry` — the served indexes, leases of in-flight requests, hot reload from S3;
- :mod:`artsim.serve.queries` — checks on what clients send (uploads, vectors, texts, k);
- :mod:`artsim.serve.tags` — tag suggestions for one work through :func:`artsim.curate.recommend_tags`;
- :mod:`artsim.serve.app` — the FastAPI routes;
- :mod:`artsim.serve.cli` — ``artsim serve`` (uvicorn).

See docs/serve.md.
"""
