"""The index stage: embeddings/<model_key>/ -> index/<name>/. Entry point: ``artsim.index.stage.run_index``."""
