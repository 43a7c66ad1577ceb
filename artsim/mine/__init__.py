"""The mine stage: records/ (+ embeddings) -> triplets/. Entry point: ``artsim.mine.stage.run_mine``.

:mod:`~artsim.mine.corpus` (records as arrays and inverted indexes; the mining pool), :mod:`~artsim.mine.strategies`
(one plain function per strategy), :mod:`~artsim.mine.stage` (quotas, de-duplication, report, triplets/).
"""
