"""Learning what curators call similar: mine triplets from metadata (``mine``), train an embedding on them
(``train``).

- :mod:`artsim.similarity.corpus` — records as arrays and inverted indexes for fast sampling.
- :mod:`artsim.similarity.strategies` — one plain function per mining strategy.
- :mod:`artsim.similarity.text` — metadata text and the offline sentence model for the ``text`` strategy.
- :mod:`artsim.similarity.mine` — ``run_mine(ctx)``: quotas, de-duplication, report, ``triplets/``.
- :mod:`artsim.similarity.losses`, :mod:`artsim.similarity.evaluate`, :mod:`artsim.similarity.models` — the
  triplet loss, recall@k and the trainable models, all plain torch/numpy.
- :mod:`artsim.similarity.ray_train` — the thin Ray Train layer; :mod:`artsim.similarity.train` —
  ``run_train(ctx)``.
"""
