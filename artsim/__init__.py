"""artsim: find related artworks across museum collections, as a distributed batch job on Ray."""

__version__ = "0.1.0"
