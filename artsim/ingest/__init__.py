"""The ingest stage: sources -> records/. Entry point: ``artsim.ingest.stage.run_ingest``. One module per format."""
