"""The train stage: triplets/ + embeddings or images -> models/<name>/. Entry point: ``artsim.train.stage.run_train``.

:mod:`~artsim.train.losses`, :mod:`~artsim.train.evaluate`, :mod:`~artsim.train.models`, :mod:`~artsim.train.data`
are plain torch/numpy; :mod:`~artsim.train.ray_train` is the thin Ray Train layer.
"""
