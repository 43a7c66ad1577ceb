"""The embed stage end to end on a real local Ray (and moto S3), compared with a direct single-process model call."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from artsim.config import EmbedConfig, config_from_dict
from artsim.embed.stage import run_embed
from artsim.models.embedder import build_embedder
from artsim.rundir.names import model_key
from artsim.embed.ray_embed import EmbeddingWriter, EmbedWorker, describe_bottleneck
from artsim.models.preprocess import preprocess_batch
from artsim.errors import ArtsimError, ConfigError
from artsim.runtime import RunContext
from artsim.rundir.schema import IMAGES_SCHEMA
from artsim.storage import Storage
from tests.conftest import MET_SAMPLE

SIZE = 64  # px; resnet18 at 64 px keeps the Ray runs to seconds


def image_rows(n_ok: int, corrupt: int = 1) -> list[dict]:
    """images/ rows as the download stage writes them: real Met JPEGs, failed downloads, and corrupt bytes."""
    rows = []
    for path in sorted((MET_SAMPLE / "images").glob("*.jpg"))[:n_ok]:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
        rows.append({"object_id": f"met:{path.stem[4:]}", "status": "ok", "http_status": 200, "error": None,
                     "url_final": f"http://example.org/{path.name}", "width": width, "height": height,
                     "sha256": None, "image": data})
    for i, status in enumerate(["not_found", "timeout", "blocked_address"]):
        rows.append({"object_id": f"met:missing{i}", "status": status, "http_status": 404 if i == 0 else None,
                     "error": status, "url_final": None, "width": None, "height": None, "sha256": None,
                     "image": None})
    for i in range(corrupt):  # "ok" per the download stage, but the bytes are not an image: a status, no crash
        rows.append({"object_id": f"met:corrupt{i}", "status": "ok", "http_status": 200, "error": None,
                     "url_final": None, "width": 1, "height": 1, "sha256": None, "image": b"\xff\xd8 not a jpeg"})
    return rows


def make_ctx(root: str, s3_endpoint: str | None = None, **embed) -> RunContext:
    tree = {"run": {"root": root}, "embed": {"model": "resnet18", "image_size": SIZE, "batch_size": 8} | embed}
    if s3_endpoint:
        tree["storage"] = {"s3_endpoint_url": s3_endpoint}
    return RunContext(config_from_dict(tree))


def write_images(ctx: RunContext, rows: list[dict]) -> None:
    ctx.storage.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), ctx.paths.images, rows_per_file=13)


def reference_vectors(ctx: RunContext, rows: list[dict]) -> dict[str, np.ndarray]:
    """A direct, single-process call of the same model: what the pipeline must reproduce."""
    embedder = build_embedder(ctx.config.embed, ctx.storage)
    ok = [r for r in rows if r["status"] == "ok" and not r["object_id"].startswith("met:corrupt")]
    vectors = embedder.embed_pil([r["image"] for r in ok])
    return {r["object_id"]: v for r, v in zip(ok, vectors)}


def check_output(ctx: RunContext, rows: list[dict], summary: dict, atol: float) -> None:
    key = model_key(ctx.config.embed)
    out = ctx.paths.embeddings(key)
    assert summary["output"] == out and ctx.storage.is_complete(out)
    table = ctx.storage.read_table(out)
    expected = reference_vectors(ctx, rows)
    ids = table.column("object_id").to_pylist()
    assert sorted(ids) == sorted(expected)  # every ok image once; failed downloads and corrupt bytes skipped
    assert set(table.column("model").to_pylist()) == {key}
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=max(atol, 1e-5))
    for oid, vec in zip(ids, vectors):
        np.testing.assert_allclose(vec, expected[oid], atol=atol)
    info = ctx.storage.read_json(f"{out}/_model.json")
    assert info["output_dim"] == table.schema.field("embedding").type.list_size == len(vectors[0])
    assert info["weights_id"] == build_embedder(ctx.config.embed, ctx.storage).weights_id
    # What serving does with _model.json (via the index manifest): rebuild the model and embed a query image.
    rebuilt = build_embedder(EmbedConfig(model=info["backbone"], weights=info["weights"], seed=info["seed"]),
                             ctx.storage, image_size=None if info["spec"]["head"] else info["image_size"])
    assert rebuilt.weights_id == info["weights_id"]
    np.testing.assert_allclose(rebuilt.embed_pil([rows[0]["image"]])[0], expected[rows[0]["object_id"]], atol=1e-5)
    report = ctx.storage.read_json(f"{out}/_report.json")
    assert report["decode_errors"] == 1 and report["failures"][0]["object_id"] == "met:corrupt0"
    assert summary["embedded"] == len(expected) and summary["skipped_not_ok"] == 3 and summary["images_per_s"] > 0


def test_embed_local_two_actors_matches_direct_call(ray_session, tmp_path):
    ctx = make_ctx(str(tmp_path / "run"), num_actors=2, torch_threads=1)
    rows = image_rows(30)
    write_images(ctx, rows)
    summary = run_embed(ctx)
    check_output(ctx, rows, summary, atol=1e-5)
    assert "bounded by" in summary["bottleneck"]


def test_embed_s3_round_trip_float16(ray_session, s3_endpoint):
    ctx = make_ctx("s3://artsim-test/embed-test/run", s3_endpoint, dtype="float16", torch_threads=1)
    rows = image_rows(12)
    write_images(ctx, rows)
    summary = run_embed(ctx)
    table = ctx.storage.read_table(summary["output"])
    assert table.schema.field("embedding").type.value_type == pa.float16()
    check_output(ctx, rows, summary, atol=2e-3)  # float16 storage: ~3 significant digits


def test_embed_with_a_trained_artifact(ray_session, tmp_path):
    """The train -> embed hand-off: an exported artifact (backbone + head) as embed.weights."""
    import dataclasses

    import torch

    from artsim.models.artifact import save_artifact
    from artsim.models.heads import build_head

    ctx = make_ctx(str(tmp_path / "run"), torch_threads=1)
    base = build_embedder(ctx.config.embed, ctx.storage)
    head_dict = {"type": "linear", "in_dim": base.spec.feature_dim, "out_dim": 16}
    torch.manual_seed(0)
    head = build_head(head_dict)
    uri = ctx.paths.model_export("sim")
    save_artifact(ctx.storage, uri, dataclasses.replace(base.spec, head=head_dict, output_dim=16),
                  head_state=head.state_dict())
    ctx = make_ctx(str(tmp_path / "run"), torch_threads=1, weights=uri, image_size=None)
    rows = image_rows(6)
    write_images(ctx, rows)
    summary = run_embed(ctx)
    assert summary["model_key"] == "resnet18-sim" and summary["dim"] == 16
    check_output(ctx, rows, summary, atol=1e-5)


def part_files(ctx: RunContext) -> dict[str, float]:
    out = ctx.storage.list(ctx.paths.embeddings(model_key(ctx.config.embed)))
    root = Path(ctx.paths.embeddings(model_key(ctx.config.embed)))
    return {n: (root / n).stat().st_mtime_ns for n in out if n.startswith("part-")}


def test_rerun_keeps_committed_vectors_and_embeds_only_new_images(ray_session, tmp_path):
    ctx = make_ctx(str(tmp_path / "run"), torch_threads=1)
    write_images(ctx, image_rows(5))
    first = run_embed(ctx)
    assert first["embedded_this_run"] == 5 and first["already_embedded"] == 0
    before = part_files(ctx)
    again = run_embed(ctx)  # nothing new: nothing embedded, nothing rewritten, still complete
    assert again["embedded_this_run"] == 0 and again["embedded"] == 5 and part_files(ctx) == before
    rows = image_rows(9)  # the download added images (same images/ file, more rows)
    write_images(ctx, rows)
    grown = run_embed(ctx)
    assert grown["already_embedded"] == 5 and grown["embedded_this_run"] == 4 and grown["decode_errors"] == 1
    after = part_files(ctx)
    assert all(after.get(name) == mtime for name, mtime in before.items())  # committed parts untouched
    check_output(ctx, rows, grown, atol=1e-5)
    write_images(ctx, image_rows(3))  # images/ rebuilt smaller: vectors of images that are gone go too
    shrunk = run_embed(ctx)
    assert sorted(ctx.storage.read_table(shrunk["output"]).column("object_id").to_pylist()) == sorted(
        reference_vectors(ctx, image_rows(3)))
    (tmp_path / "run" / "images" / "_SUCCESS").unlink()
    with pytest.raises(ArtsimError, match="incomplete output"):
        run_embed(ctx)


def test_a_changed_model_starts_over_instead_of_mixing_vectors(ray_session, tmp_path):
    ctx = make_ctx(str(tmp_path / "run"), torch_threads=1)
    rows = image_rows(6)
    write_images(ctx, rows)
    run_embed(ctx)
    # Same directory name (resnet18), other vectors: another image size, then another stored dtype.
    for change, field in [({"image_size": 96}, "image_size"), ({"image_size": 96, "dtype": "float16"}, "dtype")]:
        ctx = make_ctx(str(tmp_path / "run"), torch_threads=1, **change)
        summary = run_embed(ctx)
        assert summary["already_embedded"] == 0 and summary["embedded_this_run"] == 6
        assert field in summary["started_over"]
        check_output(ctx, rows, summary, atol=2e-3)


def test_killed_embed_resumes_where_it_stopped(ray_session, tmp_path):
    """SIGKILL the driver of a real `artsim embed` (its own local Ray) once some parts are committed; the next run
    embeds only the rest, leaves the committed parts as they are, and ends with every ok image exactly once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    root = tmp_path / "run"
    embed = {"model": "resnet18", "image_size": SIZE, "batch_size": 2, "rows_per_file": 2, "torch_threads": 1}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"run": {"root": str(root)}, "ray": {"address": "local"}, "embed": embed}))
    ctx = RunContext(config_from_dict({"run": {"root": str(root)}, "embed": embed}))
    rows = image_rows(60)
    write_images(ctx, rows)
    out = root / "embeddings" / "resnet18"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, not the tests' one
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-m", "artsim.cli", "embed", "-c", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while len(list(out.glob("part-*.parquet"))) < 3:
            assert proc.poll() is None, "the embed finished before it could be killed"
            assert time.monotonic() < deadline, "no part file committed within 10 minutes"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # the driver
        proc.wait(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the local Ray it started (same session)
        except ProcessLookupError:
            pass
    assert not (out / "_SUCCESS").exists() and not (out / "_model.json").exists()
    assert (out / "_in_progress.json").exists()
    committed = part_files(ctx)
    done = ctx.storage.read_table(str(out), require_complete=False).num_rows
    assert 0 < done < 60
    summary = run_embed(ctx)
    assert summary["already_embedded"] == done and summary["embedded_this_run"] == 60 - done
    after = part_files(ctx)
    assert all(after.get(name) == mtime for name, mtime in committed.items())
    check_output(ctx, rows, summary, atol=1e-5)  # every ok image exactly once, the same vectors


def test_impossible_resources_fail_instead_of_hanging(ray_session, tmp_path):
    ctx = make_ctx(str(tmp_path / "run"), num_gpus=1)
    write_images(ctx, image_rows(2))
    with pytest.raises(ConfigError, match="embed.num_gpus"):
        run_embed(ctx)
    ctx = make_ctx(str(tmp_path / "run"), num_actors=8)
    with pytest.raises(ConfigError, match="embed.num_actors"):
        run_embed(ctx)


# -- the plain pieces, without Ray ---------------------------------------------------------------------------------


def test_worker_and_writer_without_ray(tmp_path):
    ctx = make_ctx(str(tmp_path / "run"), dtype="float32", torch_threads=1)
    rows = image_rows(4)
    batch = preprocess_batch({"object_id": np.array([r["object_id"] for r in rows], dtype=object),
                              "image": np.array([r["image"] for r in rows], dtype=object)}, SIZE, SIZE)
    assert batch["pixels"].shape == (len(rows), SIZE, SIZE, 3)
    errors = list(batch["error"])
    assert errors[:4] == ["", "", "", ""] and all(errors[4:])  # None bytes and corrupt bytes get a message
    with pytest.raises(ArtsimError, match="expected sha-of-other-weights"):  # replicas refuse other weights
        EmbedWorker(ctx.config.embed, ctx.config.storage, "sha-of-other-weights", torch_threads=1)
    worker = EmbedWorker(ctx.config.embed, ctx.config.storage, "random-init-seed-0", torch_threads=1)
    out = worker(batch)
    assert out["embedding"].shape == (len(rows), 512) and not out["embedding"][4:].any()

    writer = EmbeddingWriter(Storage(), str(tmp_path / "emb"), "resnet18", 512, "float32", rows_per_file=3)
    writer.add(out["object_id"], out["embedding"], out["error"])
    writer.close()
    assert writer.written == 4 and writer.failed == 4 and len(writer.files) == 2  # 3 + 1 rows
    table = Storage().read_table(str(tmp_path / "emb"), require_complete=False)
    assert table.num_rows == 4


def test_describe_bottleneck():
    verdict, numbers = describe_bottleneck(wall_s=10, model_s=19, prep_s=2, num_actors=2)
    assert verdict.startswith("bounded by the model") and numbers["model_busy_fraction"] == 0.95
    verdict, _ = describe_bottleneck(wall_s=10, model_s=3, prep_s=9, num_actors=1)
    assert verdict.startswith("bounded by preprocessing")
    verdict, _ = describe_bottleneck(wall_s=10, model_s=1, prep_s=1, num_actors=1)
    assert verdict.startswith("bounded by reading")


def test_cli_embed_runs_and_bad_input_exits_2(ray_session, tmp_path, capsys):
    import yaml

    from artsim.cli import main

    root = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"run": {"root": str(root)},
                                      "embed": {"model": "resnet18", "image_size": SIZE, "torch_threads": 1}}))
    write_images(make_ctx(str(root)), image_rows(6))
    assert main(["embed", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "bounded by" in out
    assert (root / "embeddings" / "resnet18" / "_SUCCESS").exists()
    assert (root / "summaries" / "embed.json").exists()

    assert main(["embed", "-c", str(config), "--set", "embed.model=resnet5000"]) == 2
    assert "embed.model" in capsys.readouterr().err
    assert main(["embed", "-c", str(config), "--set", f"embed.weights={tmp_path}/no/such/export"]) == 2
    assert "not a model artifact" in capsys.readouterr().err
    assert main(["embed", "-c", str(config), "--set", "embed.batch_size=0"]) == 2
    assert "embed.batch_size" in capsys.readouterr().err
