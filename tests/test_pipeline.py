"""End to end on the embedded Met sample: ingest → download → embed → mine → train → index → links → report on a
real local Ray, with the images served from a loopback HTTP server; once on local disk and once with the run
directory on S3."""
import json
import subprocess
import sys

import pyarrow.compute as pc
import pytest

from artsim.config import load_config
from artsim.pipeline import run_pipeline
from artsim.runtime import RunContext
from conftest import REPO


def _ctx(root, image_base, extra=()):
    overrides = [f"run.root={root}", "embed.model=resnet18", "embed.weights=null", "embed.batch_size=16",
                 "index.embeddings=resnet18-similarity", "train.epochs=2",
                 f"sources.0.image_url_template={image_base}/met_{{local_id}}.jpg",
                 f"sources.1.image_url_template={image_base}/met_{{local_id}}.jpg", *extra]
    return RunContext(load_config(REPO / "configs" / "demo.yaml", overrides))


def _check_run(ctx, result):
    storage, paths = ctx.storage, ctx.paths
    records = storage.read_table(paths.records)
    assert records.num_rows == 80
    assert set(records.column("collection").to_pylist()) == {"met", "met2013"}
    images = storage.read_table(paths.images, columns=["object_id", "status"])
    assert sorted(images.column("object_id").to_pylist()) == sorted(records.column("object_id").to_pylist())
    assert images.column("status").to_pylist().count("ok") == 80
    index_uri = result["stages"]["index"]["index_uri"]
    manifest = json.loads(storage.read_text(index_uri.rstrip("/") + "/manifest.json"))
    # the index holds the trained model's vectors (train, head mode, projected the collection); the default head
    # is residual, so they keep the backbone's dimension
    from artsim.models.artifact import load_artifact

    export_spec = load_artifact(storage, result["stages"]["train"]["export"])[0]
    assert export_spec.head["type"] == "residual" and export_spec.output_dim == export_spec.feature_dim
    assert manifest["ntotal"] == 80 and manifest["dim"] == export_spec.output_dim
    links = storage.read_table(result["stages"]["links"].get("links_uri") or paths.links(index_uri.rstrip("/").rsplit("/", 1)[-1]))
    # every object is linked to k works of the *other* collection
    assert links.num_rows == 80 * ctx.config.links.k
    assert links.filter(pc.equal(links["neighbor_collection"], "met")).num_rows == 40 * ctx.config.links.k
    assert storage.exists(result["stages"]["report"]["report_uri"])
    return index_uri


def test_pipeline_local(ray_session, met_image_server, tmp_path):
    ctx = _ctx(str(tmp_path / "run"), met_image_server)
    result = run_pipeline(ctx)
    index_uri = _check_run(ctx, result)
    proc = subprocess.run([sys.executable, "-m", "artsim.cli", "query", "--index", index_uri, "--id", "met:435888",
                           "-k", "10", "--json"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    hits = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(hits) == 10 and [h["rank"] for h in hits] == list(range(1, 11))
    assert all({"object_id", "score", "rank"} <= set(h) for h in hits)
    assert "met:435888" not in [h["object_id"] for h in hits]


@pytest.mark.slow
def test_pipeline_on_s3(ray_session, met_image_server, s3_endpoint):
    ctx = _ctx("s3://artsim-test/e2e-run", met_image_server, [f"storage.s3_endpoint_url={s3_endpoint}"])
    _check_run(ctx, run_pipeline(ctx))
