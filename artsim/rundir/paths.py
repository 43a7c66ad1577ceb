"""Where each dataset lives inside the run directory (``run.root``)."""
from __future__ import annotations

from artsim.storage import join


class RunPaths:
    """Where each stage's output lives inside the run directory (``run.root``) (docs/DESIGN.md, "Data in the run directory")."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")

    @property
    def config(self) -> str:
        return join(self.root, "config.yaml")

    @property
    def records(self) -> str:
        return join(self.root, "records")

    @property
    def ingest_report(self) -> str:
        return join(self.root, "records", "_report.json")

    @property
    def images(self) -> str:
        return join(self.root, "images")

    @property
    def images_report(self) -> str:
        return join(self.root, "images", "_report.json")

    def embeddings(self, model_key: str) -> str:
        return join(self.root, "embeddings", model_key)

    @property
    def triplets(self) -> str:
        return join(self.root, "triplets")

    def model(self, name: str) -> str:
        return join(self.root, "models", name)

    def model_export(self, name: str) -> str:
        return join(self.root, "models", name, "export")

    def index(self, name: str) -> str:
        return join(self.root, "index", name)

    def links(self, name: str) -> str:
        return join(self.root, "links", name)

    def report(self, name: str) -> str:
        return join(self.root, "reports", name)

    @property
    def summaries(self) -> str:
        return join(self.root, "summaries")
