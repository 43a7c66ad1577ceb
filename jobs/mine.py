"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/mine.py -c CONFIG [--set key=value ...]`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working dir, if not installed

from artsim.cli import stage_main  # noqa: E402

sys.exit(stage_main("mine", sys.argv[1:]))
