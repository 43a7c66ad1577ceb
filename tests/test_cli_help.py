"""The command line a cluster user meets first: `artsim --help` lists every command with one line; each stage's
--help names the config sections it reads and what it writes."""
from __future__ import annotations

import subprocess
import sys

import pytest

from artsim.cli import COMMANDS, STAGE_IO
from artsim.config import STAGES, Config
from conftest import REPO


def artsim(*args):
    return subprocess.run([sys.executable, "-m", "artsim.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_top_level_help_lists_every_command_once():
    proc = artsim("--help")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    for command in [*STAGES, "pipeline", "plan", "query", "serve", "demo"]:
        rows = [line for line in lines if line.split()[:1] == [command]]
        assert len(rows) == 1 and len(rows[0].split()) > 3, (command, proc.stdout)


def test_no_arguments_prints_help_and_exits_2():
    proc = artsim()
    assert proc.returncode == 2 and "commands:" in proc.stderr


@pytest.mark.parametrize("stage", [*STAGES, "pipeline"])
def test_stage_help_names_sections_read_and_outputs(stage):
    proc = artsim(stage, "--help")
    assert proc.returncode == 0
    reads = [line for line in proc.stdout.splitlines() if line.startswith("reads config sections:")]
    writes = [line for line in proc.stdout.splitlines() if line.startswith("writes under run.root:")]
    assert reads and writes, proc.stdout
    sections = {s.strip() for s in reads[0].split(":", 1)[1].split(",")}
    known = {f.name for f in Config.__dataclass_fields__.values()}
    named = {s for s in sections if s in known}
    assert {"run", "storage"} <= named
    if stage != "pipeline":
        assert stage in named or stage == "ingest"  # ingest reads `sources`
        assert sections <= known, sections - known
    assert COMMANDS[stage] in proc.stdout


def test_every_stage_has_help_entries():
    assert set(STAGES) <= set(STAGE_IO) and set(STAGES) <= set(COMMANDS)


def test_plan_help_says_it_writes_nothing():
    proc = artsim("plan", "--help")
    assert proc.returncode == 0 and "writes nothing" in proc.stdout
