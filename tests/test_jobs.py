"""`python jobs/STAGE.py -c CONFIG` (what `ray job submit --working-dir .` runs) behaves like `artsim STAGE`."""
import subprocess
import sys

import pyarrow.parquet as pq

from conftest import REPO


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd)


def test_job_entrypoint_runs_a_stage_from_the_working_dir(tmp_path):
    proc = _run([str(REPO / "jobs" / "ingest.py"), "-c", str(REPO / "configs" / "demo.yaml"),
                 "--set", f"run.root={tmp_path / 'run'}",
                 "--set", f"sources.0.path={REPO / 'data/met_sample/met_api_objects.json'}",
                 "--set", f"sources.1.path={REPO / 'data/met_sample/met_2013_scrape.csv'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert pq.read_table(tmp_path / "run" / "records").num_rows == 80
    # the effective config (after --set) is recorded in the run directory
    assert f"root: {tmp_path / 'run'}" in (tmp_path / "run" / "config.yaml").read_text()


def test_job_entrypoint_bad_key_exits_2_with_one_line(tmp_path):
    proc = _run([str(REPO / "jobs" / "embed.py"), "-c", str(REPO / "configs" / "demo.yaml"),
                 "--set", "embed.batchsize=8"], cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("artsim: error: embed.batchsize: unknown key")
