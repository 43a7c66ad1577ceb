"""The download stage: records/ -> images/ (+ images/_report.json). Entry point: ``artsim.download.stage.run_download``.

Modules: ``safety`` (URL/address checks, pinned connections), ``politeness`` (host caps, backoff, circuit breaker),
``robots`` (robots.txt per RFC 9309), ``fetch`` (one record -> FetchResult), ``resize`` (sniff/filter/decode/resize/
encode), ``shards`` (plan, commit, resume), ``report``, and ``ray_job`` (the thin Ray layer). ``artsim.export``
writes the result in webdataset / img2dataset layouts. See docs/download.md.
"""
