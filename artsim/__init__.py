"""artsim: find related artworks across museum collections, as a distributed batch job on Ray."""
import logging as _logging

# faiss announces at INFO which CPU build it loads (and that the AVX512 ones are missing) in every process that
# imports it: the driver and each Ray worker. Users would read that wall of lines in every stage's log; warnings and
# errors still come through. Set here, because every process that runs artsim code imports this package first.
_logging.getLogger("faiss.loader").setLevel(_logging.WARNING)

__version__ = "0.1.0"
