"""Hostile and careless input, tried as an attacker and a hurried user would (issue 15).

Every case runs the real CLI as a subprocess and asserts what the README's Security section promises: the exit
status (2 for bad input, 1 only for a bug), a message of exactly one line naming the key or file, no raw control
character on the terminal, a peak memory bound for the process (its own max RSS, from wait4) and no hang (a
deadline on the process).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import re
import sys
import socket
import subprocess
import threading
import typing
from pathlib import Path

import pytest
import yaml

from artsim.config import Config, config_from_dict
from artsim.config_doc import config_keys
from artsim.errors import ConfigError
from conftest import REPO

ARTSIM = REPO / ".venv" / "bin" / "artsim"
MEMORY_BOUND_MB = 1024  # peak RSS of one CLI process (Python + pyarrow + yaml is ~150-250 MB)
ADDRESS_SPACE_CAP = 64 << 30  # hard backstop so that a regression fails the test instead of the machine (virtual:
# ingest starts Ray, whose processes reserve far more address space than they touch; RSS is what is bounded)
INFO_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO ")
HOSTILE = "A\x1b[2J\x1b]0;PWNED\x07\u202eevil\x9b31m"  # clear screen, set the title, bidi override, 8-bit CSI


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    max_rss_mb: float


# Peak RSS is measured by a small launcher process, not by this (large) pytest process: Linux carries a process's
# high-water RSS across exec, so a child forked from a 1 GB test runner would report 1 GB before running a line.
_LAUNCHER = """
import os, resource, subprocess, sys
cap, report = int(sys.argv[1]), sys.argv[2]
def limit():
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
proc = subprocess.Popen(sys.argv[3:], preexec_fn=limit)
_, status, usage = os.wait4(proc.pid, 0)
with open(report, "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def artsim(*args: str, cwd: Path, timeout: float = 240, env: dict | None = None) -> Result:
    """Run ``artsim ARGS``; wait for it at most ``timeout`` seconds (then kill it and fail)."""
    out_path, err_path, rss_path = cwd / ".stdout", cwd / ".stderr", cwd / ".maxrss"
    rss_path.unlink(missing_ok=True)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(ADDRESS_SPACE_CAP), str(rss_path),
                                 str(ARTSIM), *args], cwd=cwd, stdout=out, stderr=err, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        pytest.fail(f"artsim {' '.join(args)} still running after {timeout} s")
    max_rss_kb = float(rss_path.read_text()) if rss_path.exists() else float("nan")
    return Result(proc.returncode, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"),
                  max_rss_kb / 1024)


def assert_user_error(result: Result, *needles: str) -> str:
    """Exit 2, one line on stderr naming what is wrong, nothing raw from the data, memory bounded."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    # INFO log lines (timestamped) are progress, not the error; everything else on stderr is the message
    lines = [ln for ln in result.stderr.strip().splitlines() if not INFO_LOG.match(ln)]
    assert len(lines) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert_terminal_safe(result)
    return lines[0]


def assert_terminal_safe(result: Result) -> None:
    for stream in (result.stdout, result.stderr):
        raw = re.findall("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]", stream)
        assert not raw, f"raw control characters reached the terminal: {raw[:5]}"
    assert result.max_rss_mb < MEMORY_BOUND_MB, f"peak RSS {result.max_rss_mb:.0f} MB"


def write_config(tmp_path: Path, sources: list[dict] | None = None, text: str | None = None, **sections) -> Path:
    path = tmp_path / "config.yaml"
    if text is not None:
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return path
    tree = {"run": {"root": str(tmp_path / "run")}, "sources": sources or [], **sections}
    path.write_text(yaml.safe_dump(tree))
    return path


def csv_source(path: Path, **extra) -> dict:
    return {"kind": "table", "path": str(path), "collection": "c", **extra}


# -- 1. every config number has a sane range -------------------------------------------------------------------


@pytest.mark.parametrize("assignment, key, allowed", [
    ("download.image_size=16000", "download.image_size", "at most 8192"),
    ("download.image_size=99999999999999999999999", "download.image_size", "at most 8192"),
    ("download.timeout_s=.nan", "download.timeout_s", "at most 3600, got nan"),
    ("download.per_host_requests_per_second=.inf", "download.per_host_requests_per_second", "got inf"),
    ("download.fetch_threads=100000000", "download.fetch_threads", "at most 256"),
    ("links.k=1000000000", "links.k", "at most 10000"),
    ("embed.batch_size=-5", "embed.batch_size", "at least 1"),
    ("ingest.read_timeout_s=0", "ingest.read_timeout_s", "above 0"),
])
def test_out_of_range_config_values_exit_2_naming_key_and_range(tmp_path, assignment, key, allowed):
    config = write_config(tmp_path, [csv_source(tmp_path / "x.csv")])
    result = artsim("ingest", "-c", str(config), "--set", assignment, cwd=tmp_path)
    assert_user_error(result, f"{key}: must be", allowed)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _number_type(tp):
    """int or float for a numeric config type (also inside Optional, list and dict), else None."""
    if tp in (int, float):
        return tp
    for arg in typing.get_args(tp):
        found = _number_type(arg)
        if found is not None:
            return found
    return None


def test_every_config_number_has_a_range_and_refuses_nan_inf_and_past_its_ends():
    base_source = {"kind": "table", "path": "x.csv", "collection": "c"}
    checked = 0
    for key, cls, f in config_keys():
        tp = typing.get_type_hints(cls)[f.name]
        number = _number_type(tp)
        if number is None:
            continue
        allowed = getattr(cls, "RANGES", {}).get(f.name)
        assert allowed is not None, f"{key} has no allowed range (add it to {cls.__name__}.RANGES)"
        section = key.split(".")[0]

        def refused(value):
            if typing.get_origin(tp) is list:
                value = [value]
            elif typing.get_origin(tp) is dict:
                value = {"text": value}
            tree = {"sources": [base_source], section: {f.name: value}}
            if section == "sources":
                tree = {"sources": [{**base_source, f.name: value}]}
            with pytest.raises(ConfigError) as err:
                config_from_dict(tree)
            message = str(err.value)
            assert message.startswith(key.replace(".N.", ".0.")) and allowed.describe() in message, message
            return message

        refused(number(allowed.high * 10 + 1))
        refused(number(allowed.low - 1) if not allowed.low_open else number(allowed.low))
        if number is float:
            for bad in (math.nan, math.inf, -math.inf):
                refused(bad)
        checked += 1
    assert checked > 60  # every section's numbers were seen


def test_small_images_are_never_enlarged():
    import io

    from PIL import Image

    from artsim.download.resize import process_image

    buf = io.BytesIO()
    Image.new("RGB", (200, 150), (120, 30, 200)).save(buf, "JPEG")
    out = process_image(buf.getvalue(), 8192, 10**8)
    assert (out.width, out.height) == (200, 150)
    assert len(out.data) < 4 * len(buf.getvalue())
    reduced = process_image(buf.getvalue(), 100, 10**8)
    assert (reduced.width, reduced.height) == (100, 75)


# -- 2. nothing from the data reaches the terminal raw -------------------------------------------------------------


@pytest.mark.parametrize("source, key", [
    ({"kind": "met_csv"}, "sources.0.path"),
    ({"kind": "table", "mapping": {"title": "nope"}}, "sources.0.mapping.title"),
])
def test_ingest_errors_quoting_a_hostile_csv_header_are_escaped(tmp_path, source, key):
    (tmp_path / "h.csv").write_text(f"id,{HOSTILE},b\n1,2,3\n")
    config = write_config(tmp_path, [{"path": str(tmp_path / "h.csv"), "collection": "met", **source}])
    line = assert_user_error(artsim("ingest", "-c", str(config), cwd=tmp_path), key, "h.csv")
    assert "\\x1b[2J\\x1b]0;PWNED\\x07\\u202eevil\\x9b31m" in line  # shown, escaped


def test_ingest_progress_and_summary_escape_hostile_rows_and_random_bytes(tmp_path):
    rows = "id,title,image_url\n" + f"1,{HOSTILE},http://x/1.jpg\n" + f"2,{HOSTILE}\n"  # row 2: a bad row
    (tmp_path / "t.csv").write_text(rows)
    (tmp_path / "noise.csv").write_bytes(b"id,title\n" + bytes(range(256)) * 64 + b"\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / f"{HOSTILE}.csv").write_text("id,title\n1,a,extra\n")  # the file name is printed
    config = write_config(tmp_path, [csv_source(tmp_path / "t.csv"), csv_source(tmp_path / "noise.csv"),
                                     csv_source(tmp_path / "dir")])
    result = artsim("ingest", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unparsable" in result.stdout
    assert_terminal_safe(result)


@pytest.fixture(scope="module")
def hostile_index(tmp_path_factory, ray_session):
    from artsim.index.stage import run_index
    from artsim.runtime import RunContext
    from artsim.testing.index_data import clustered_vectors, object_ids_for, records_for, write_run

    root = tmp_path_factory.mktemp("hostile-index")
    ids = object_ids_for(60)
    records = records_for(ids)
    titles = [HOSTILE + f" {i}" for i in range(len(ids))]
    records = records.set_column(records.schema.get_field_index("title"), "title",
                                 __import__("pyarrow").array(titles))
    ctx = RunContext(config_from_dict({"run": {"root": str(root)}, "index": {"embeddings": "test-model"}}))
    write_run(ctx.storage, ctx.paths, ids, clustered_vectors(len(ids), 8, n_clusters=3, seed=2), records=records)
    return run_index(ctx)["index_uri"]


def test_query_table_escapes_hostile_titles_and_json_stays_exact(tmp_path, hostile_index):
    table = artsim("query", "--index", hostile_index, "--id", "met:0", "-k", "3", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert_terminal_safe(table)
    assert "\\x1b[2J\\x1b]0;PWNED\\x07" in table.stdout
    as_json = artsim("query", "--index", hostile_index, "--id", "met:0", "-k", "3", "--json", cwd=tmp_path)
    assert as_json.returncode == 0
    assert_terminal_safe(as_json)
    hits = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert len(hits) == 3 and all(h["title"].startswith(HOSTILE) for h in hits)  # exactly the stored value


# -- 3. sources are read within limits -----------------------------------------------------------------------------


def test_source_symlinked_to_dev_zero_is_refused(tmp_path):
    (tmp_path / "zero.csv").symlink_to("/dev/zero")
    config = write_config(tmp_path, [csv_source(tmp_path / "zero.csv")])
    assert_user_error(artsim("ingest", "-c", str(config), cwd=tmp_path, timeout=240),
                      "sources.0.path", "zero.csv", "character device, not a regular file")


def test_fifo_source_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "pipe.csv")
    config = write_config(tmp_path, [csv_source(tmp_path / "pipe.csv")])
    assert_user_error(artsim("ingest", "-c", str(config), cwd=tmp_path, timeout=240),
                      "sources.0.path", "pipe.csv", "FIFO")


def test_directory_source_skips_nothing_silently_a_fifo_inside_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.csv").write_text("id,title\n1,x\n")
    os.mkfifo(tmp_path / "src" / "b.csv")
    config = write_config(tmp_path, [csv_source(tmp_path / "src")])
    assert_user_error(artsim("ingest", "-c", str(config), cwd=tmp_path, timeout=240), "b.csv", "FIFO")


def test_overlong_rows_and_fields_are_counted_unparsable_in_bounded_memory(tmp_path):
    with open(tmp_path / "long.csv", "w") as f:  # a 100 MB line with no newline, between two good rows
        f.write("id,title\n1,first\n2,")
        chunk = "x" * (1 << 20)
        for _ in range(100):
            f.write(chunk)
        f.write("\n3,third\n4," + "y" * 5000 + "\n")
    (tmp_path / "long.jsonl").write_text('{"id": "11"}\n{"id": "12", "t": "' + "z" * 100_000 + '"}\n{"id": "13"}\n')
    config = write_config(tmp_path, [csv_source(tmp_path / "long.csv"), csv_source(tmp_path / "long.jsonl")],
                          ingest={"max_row_chars": 50_000, "max_field_chars": 1000})
    result = artsim("ingest", "-c", str(config), cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_terminal_safe(result)
    report = json.loads((tmp_path / "run" / "records" / "_report.json").read_text())
    csv_stats, jsonl_stats = report["sources"]
    assert (csv_stats["records_written"], csv_stats["unparsable_rows"]) == (2, 2)  # rows 1, 3 kept
    assert (jsonl_stats["records_written"], jsonl_stats["unparsable_rows"]) == (2, 1)
    assert any("max_row_chars" in e for e in csv_stats["unparsable_examples"])
    assert any("field" in e for e in csv_stats["unparsable_examples"])


def test_gzip_bomb_source_stops_at_the_byte_cap(tmp_path):
    with gzip.open(tmp_path / "bomb.csv.gz", "wb", compresslevel=9) as f:
        f.write(b"id,title\n")
        line = b"1,aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n" * 20_000
        for _ in range(200):  # 200 MB of CSV in ~0.2 MB
            f.write(line)
    config = write_config(tmp_path, [csv_source(tmp_path / "bomb.csv.gz")],
                          ingest={"max_source_bytes": 20_000_000})
    assert_user_error(artsim("ingest", "-c", str(config), cwd=tmp_path, timeout=240),
                      "sources.0.path", "bomb.csv.gz", "ingest.max_source_bytes")


def test_json_document_over_the_document_cap_is_refused(tmp_path):
    (tmp_path / "objects.json").write_text(json.dumps([{"objectID": i, "title": "t" * 100} for i in range(20_000)]))
    config = write_config(tmp_path, [{"kind": "met_api_json", "path": str(tmp_path / "objects.json"),
                                      "collection": "met"}], ingest={"max_document_bytes": 1_000_000})
    assert_user_error(artsim("ingest", "-c", str(config), cwd=tmp_path), "sources.0.path", "objects.json",
                      "ingest.max_document_bytes")


def test_a_stalled_read_is_cut_by_the_deadline():
    """The deadline guard itself, on a pipe whose writer never writes (a hung mount or S3 stream behaves so)."""
    import time

    from artsim.errors import ArtsimError
    from artsim.ingest.readers import _Deadline, _GuardedRaw

    read_end, write_end = os.pipe()
    raw = os.fdopen(read_end, "rb", buffering=0)
    guarded = _GuardedRaw(raw, _Deadline(0.5, "sources.0.path: s3://b/k.csv"))
    start = time.monotonic()
    with pytest.raises(ArtsimError, match=r"^sources.0.path: s3://b/k.csv: a read stalled for more than 0.5 s"):
        guarded.read(10)
    assert time.monotonic() - start < 5
    os.write(write_end, b"x")  # release the abandoned reader thread
    os.close(write_end)


class _StallingS3(threading.Thread):
    """A loopback 'S3' that answers HEAD and listings, then sends a GET's headers and stops sending."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, buf = buf.split(b"\r\n\r\n", 1)
            request_line = head.split(b"\r\n")[0].decode()
            method, target = request_line.split(" ")[:2]
            common = "Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT\r\nETag: \"abc\"\r\n"
            if method == "HEAD":
                conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n{common}\r\n".encode())
            elif "list-type=2" in target or "prefix=" in target:
                body = ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>b</Name><KeyCount>0'
                        '</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated></ListBucketResult>')
                conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nContent-Type: application/xml"
                             f"\r\n\r\n{body}".encode())
            else:  # the object's body: headers, a few bytes, then silence
                conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n{common}\r\nid,title\n1,".encode())
                self.held.append(conn)
                return

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_a_stalled_s3_source_ends_with_one_line_at_the_deadline(tmp_path):
    server = _StallingS3()
    server.start()
    try:
        config = write_config(tmp_path, [csv_source("s3://bucket/stall.csv")],
                              storage={"s3_endpoint_url": f"http://127.0.0.1:{server.port}"},
                              ingest={"read_timeout_s": 3})
        result = artsim("ingest", "-c", str(config), cwd=tmp_path, timeout=90,
                        env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"})
    finally:
        server.close()
    assert_user_error(result, "sources.0.path", "s3://bucket/stall.csv", "stalled", "ingest.read_timeout_s")


# -- 4. every user error is one line and exit 2 ------------------------------------------------------------------


def test_run_root_that_is_a_file_or_cannot_be_created(tmp_path):
    (tmp_path / "x.csv").write_text("id,title\n1,a\n")
    (tmp_path / "a_file").write_text("")
    config = write_config(tmp_path, [csv_source(tmp_path / "x.csv")])
    assert_user_error(artsim("ingest", "-c", str(config), "--set", f"run.root={tmp_path / 'a_file'}", cwd=tmp_path),
                      "run.root", "a_file", "not a directory")
    assert_user_error(artsim("ingest", "-c", str(config), "--set", f"run.root={tmp_path / 'a_file' / 'run'}",
                             cwd=tmp_path), "run.root", "cannot create directory")


@pytest.mark.parametrize("content, needles", [
    (b"run:\n  root: \"\xff\xfe\"\n", ["config.yaml", "not UTF-8", "line 2"]),
    (b"run:\n  root: [a\n  b: c\n", ["config.yaml", "not valid YAML", "line 3, column 4"]),
    (b"a: b\n  c: d\n", ["config.yaml", "line 2, column 4"]),
    (b"[" * 100_000 + b"]" * 100_000, ["config.yaml", "not valid YAML"]),
    # 'billion laughs': aliases nest 9 deep (10^9 strings if expanded); refused without expanding
    (("a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))
      + "index: {facets: *i}\n").encode(), ["unknown key"]),
    (b"download: {image_size: .nan}\n", ["download.image_size", "expected an integer"]),
    (b"- a\n- b\n", ["config.yaml", "top level must be a mapping"]),
])
def test_bad_config_files_are_one_line(tmp_path, content, needles):
    config = write_config(tmp_path, text=content)
    assert_user_error(artsim("ingest", "-c", str(config), cwd=tmp_path, timeout=240), *needles)


@pytest.mark.parametrize("args, needles", [
    (["ingest", "-c", "{dir}"], ["is a directory, not a config file"]),
    (["ingest", "-c", "{dir}/missing.yaml"], ["missing.yaml", "config file not found"]),
    (["ingest", "-c", "{config}", "--set", "download.image_size=[1,"], ["download.image_size", "line 1, column"]),
    (["ingest", "-c", "{config}", "--set", "nonsense"], ["--set expects key.path=value"]),
    (["ingest", "-c", "{config}", "--set", "download.image_size=big"], ["download.image_size", "integer"]),
    (["ingest"], ["-c/--config", "required"]),
    (["ingest", "-c", "{config}", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["frobnicate"], ["unknown command"]),
    (["query", "--index", "{dir}", "--image", "{dir}"], ["--image", "is a directory, not an image file"]),
    (["query", "--index", "{dir}", "--image", "{dir}/fifo"], ["--image", "not a regular file"]),
    (["query", "--index", "{dir}", "--image", "{dir}/none.jpg"], ["--image", "none.jpg", "No such file"]),
    (["query", "--index", "{dir}", "--id", "x", "-k", "many"], ["-k", "invalid int value"]),
    (["serve", "--index", "{dir}", "--port", "99999"], ["--port", "99999"]),
    (["serve", "--index", "{dir}", "--port", "x"], ["--port", "invalid int value"]),
])
def test_cli_user_errors_are_one_line_exit_2(tmp_path, args, needles):
    config = write_config(tmp_path, [csv_source(tmp_path / "x.csv")])
    os.mkfifo(tmp_path / "fifo")
    args = [a.format(dir=tmp_path, config=config) for a in args]
    assert_user_error(artsim(*args, cwd=tmp_path, timeout=60), *needles)


def test_a_bug_exits_1_with_one_line_and_the_traceback_in_a_file(tmp_path):
    """run_command around code that fails in a way no user input explains (here: a ZeroDivisionError)."""
    result = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c",
                             "import sys; from artsim.command import run_command; sys.exit(run_command(lambda: 1 / 0))"],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO),
                                                                             "TMPDIR": str(tmp_path)})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error" in lines[0] and "ZeroDivisionError" in lines[0], result.stderr
    path = Path(re.search(r"full traceback in (\S+\.txt)", lines[0]).group(1))
    assert path.parent == tmp_path and "Traceback (most recent call last)" in path.read_text()
