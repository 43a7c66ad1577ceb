"""The download stage: records/ -> images/ (+ images/_report.json). Entry point: ``artsim.download.stage.run_download``.

Modules: ``safety`` (URL/address checks, pinned connections), ``politeness`` (host caps, backoff, circuit breaker,
robots), ``fetch`` (one record -> FetchResult), ``resize`` (sniff/decode/resize/encode), ``shards`` (plan, commit,
resume), ``report``, and ``ray_job`` (the thin Ray layer). See docs/download.md.
"""
