"""The report stage: the run directory -> reports/<name>/index.html. Entry point: ``artsim.report.stage.run_report``.

:mod:`~artsim.report.inputs` reads the run directory (streamed counts, a sample, strongest links, thumbnails);
:mod:`~artsim.report.stage` computes and renders with :mod:`artsim.curate`; :mod:`~artsim.report.html` holds the
HTML fragments.
"""
