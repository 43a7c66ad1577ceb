"""The embed stage: images/ -> embeddings/<model_key>/. Entry point: ``artsim.embed.stage.run_embed``."""
