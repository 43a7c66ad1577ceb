"""The links stage: index/<name>/ -> links/<name>/. Entry point: ``artsim.links.stage.run_links``."""
