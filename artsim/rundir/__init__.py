"""The run directory: what each dataset is called, where it lives, its schema, and how it is read.

Torch-free and Ray-free: every stage, the report and the serving code use this package to agree on the data they
pass to each other (docs/DESIGN.md, "Data in the run directory").

- :mod:`artsim.rundir.paths` — ``RunPaths``: where each dataset lives under ``run.root``.
- :mod:`artsim.rundir.schema` — records/ and images/ schemas, download statuses.
- :mod:`artsim.rundir.index_manifest` — index/<name>/manifest.json.
"""
