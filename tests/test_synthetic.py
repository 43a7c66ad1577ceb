"""The synthetic collection generator: deterministic, factor-driven images, any size."""
from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from artsim.errors import ArtsimError
from artsim.rundir.schema import RECORD_FIELDS, records_table
from artsim.testing.synthetic import (
    CSV_COLUMNS, TABLE_MAPPING, SyntheticSpec, creator_palette, object_type_aspect, render_image, synthetic_records,
    write_synthetic_collection,
)


def _digest_dir(path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_same_seed_gives_same_bytes_and_other_seed_differs(tmp_path):
    spec = SyntheticSpec(n=24, seed=7, image_size=96)
    a = write_synthetic_collection(tmp_path / "a", spec).parent
    b = write_synthetic_collection(tmp_path / "b", spec).parent
    digests_a = _digest_dir(a)
    assert len(digests_a) == 25  # 24 images + records.csv
    assert digests_a == _digest_dir(b)
    c = write_synthetic_collection(tmp_path / "c", SyntheticSpec(n=24, seed=8, image_size=96)).parent
    differing = [k for k, v in _digest_dir(c).items() if digests_a.get(k) != v]
    assert len(differing) >= 20


def test_records_are_canonical_and_expose_factors():
    spec = SyntheticSpec(n=200, seed=1, n_creators=5, n_subjects=4, n_object_types=3, n_collections=3)
    records = synthetic_records(spec)
    assert len(records) == 200
    records_table(records)  # matches RECORDS_SCHEMA exactly (raises otherwise)
    assert all(set(r) == set(RECORD_FIELDS) for r in records)
    assert len({r["object_id"] for r in records}) == 200
    for r in records:
        assert r["object_id"] == f"{r['collection']}:{r['local_id']}"
        assert r["license"] == "CC0"
        assert r["subjects"][0].startswith("motif:")
        assert r["concepts"][0].startswith("http://vocab.getty.edu/page/aat/")
        assert r["date_begin"] <= r["date_end"]
    assert {r["collection"] for r in records} == {"synth_a", "synth_b", "synth_c"}
    assert {r["creator"] for r in records} == {f"Creator {i}" for i in range(5)}
    assert {r["subjects"][0] for r in records} == {"motif:circle", "motif:square", "motif:triangle", "motif:cross"}
    assert {r["object_type"] for r in records} == {"painting", "print", "drawing"}
    # One concept per subject, so concepts and subjects agree one to one.
    assert len({(r["subjects"][0], r["concepts"][0]) for r in records}) == 4
    # No factor value is starved: each appears in at least half its fair share.
    for key, n in (("creator", 5), ("object_type", 3)):
        counts = Counter(r[key] for r in records)
        assert min(counts.values()) >= 200 / n / 2, counts


@pytest.mark.parametrize("n", [0, 1, 3, 37])
def test_any_n_works_and_records_are_stable_as_n_grows(n):
    spec = SyntheticSpec(n=n, seed=3, n_creators=20, n_subjects=14, n_object_types=9, n_collections=1)
    records = synthetic_records(spec)
    assert len(records) == n
    bigger = synthetic_records(SyntheticSpec(n=n + 5, seed=3, n_creators=20, n_subjects=14, n_object_types=9,
                                             n_collections=1))
    assert bigger[:n] == records
    for r in records:  # generated factor names (beyond the named lists) render too
        img = render_image(r, spec, 40)
        assert max(img.size) == 40


def test_image_size_and_aspect_follow_object_type(tmp_path):
    spec = SyntheticSpec(n=60, seed=2, image_size=120, n_object_types=6)
    csv_path = write_synthetic_collection(tmp_path, spec, image_size=200)
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text("utf-8"))))
    assert len(rows) == 60
    assert {row["object_type"] for row in rows} == {"painting", "print", "drawing", "photograph", "textile",
                                                    "manuscript"}
    aspects = {}
    for row in rows:
        with Image.open(tmp_path / row["image_file"]) as img:
            assert img.format == "JPEG"
            w, h = img.size
        assert max(w, h) == 200  # image_size argument overrides the spec
        expected = object_type_aspect(row["object_type"])
        assert abs(w / h - expected) < 0.02, (row["object_type"], w, h)
        aspects.setdefault(row["object_type"], set()).add((w, h))
    assert all(len(sizes) == 1 for sizes in aspects.values())  # one format per type
    assert len({next(iter(s)) for s in aspects.values()}) == 6  # and every type a different one
    assert aspects["painting"] == {(200, 150)} and aspects["print"] == {(150, 200)}
    assert aspects["drawing"] == {(200, 200)}


def test_csv_columns_and_list_fields(tmp_path):
    spec = SyntheticSpec(n=10, seed=4)
    csv_path = write_synthetic_collection(tmp_path, spec)
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text("utf-8"))))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    records = synthetic_records(spec)
    for row, rec in zip(rows, records):
        assert row["subjects"].split("|") == rec["subjects"]
        assert row["creator"] == rec["creator"]
        assert (tmp_path / row["image_file"]).is_file()
    assert set(TABLE_MAPPING) <= set(RECORD_FIELDS)


def _thumbnail_features(records, spec):
    feats = []
    for r in records:
        img = render_image(r, spec, 64).resize((8, 8), Image.BILINEAR)
        feats.append(np.asarray(img, np.float32).ravel() / 255.0)
    return np.stack(feats)


def _nearest_centroid_accuracy(train_x, train_y, test_x, test_y) -> float:
    labels = sorted(set(train_y))
    centroids = np.stack([train_x[np.array(train_y) == lab].mean(axis=0) for lab in labels])
    d = ((test_x[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    predicted = [labels[i] for i in d.argmin(axis=1)]
    return float(np.mean([p == t for p, t in zip(predicted, test_y)]))


def test_creator_is_visibly_separable_on_8x8_thumbnails():
    spec = SyntheticSpec(n=320, seed=5, n_creators=8)
    records = synthetic_records(spec)
    x = _thumbnail_features(records, spec)
    y = [r["creator"] for r in records]
    acc = _nearest_centroid_accuracy(x[:160], y[:160], x[160:], y[160:])
    assert acc >= 0.85, acc  # chance is 1/8 (measured: 0.925)
    # The metadata alone (shuffled labels) must not score: the signal is in the pixels.
    rng = np.random.default_rng(0)
    shuffled = list(rng.permutation(y[:160]))
    assert _nearest_centroid_accuracy(x[:160], shuffled, x[160:], y[160:]) < 0.4


def test_subject_is_visibly_separable_within_a_creator():
    # The motif is drawn in the creator's accent colour: within one creator, the accent-colour mask tells
    # motifs apart far better than chance (1/6).
    spec = SyntheticSpec(n=600, seed=6, n_creators=2, n_subjects=6, n_object_types=1)
    records = [r for r in synthetic_records(spec) if r["creator"] == "Creator 0"]
    accent = np.array(creator_palette(0, spec.n_creators, spec.seed)[3], np.float32)
    feats = []
    for r in records:
        # Shape descriptor: the accent-colour mask cropped to its bounding box (undoes position/scale jitter).
        a = np.asarray(render_image(r, spec, 96), np.float32)
        mask = np.linalg.norm(a - accent, axis=2) < 60
        rows, cols = np.nonzero(mask)
        crop = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        small = Image.fromarray(crop.astype(np.uint8) * 255).resize((12, 12), Image.BILINEAR)
        feats.append(np.asarray(small, np.float32).ravel() / 255.0)
    x = np.stack(feats)
    y = [r["subjects"][0] for r in records]
    half = len(records) // 2
    acc = _nearest_centroid_accuracy(x[:half], y[:half], x[half:], y[half:])
    assert acc >= 0.6, acc


def test_bad_spec_is_a_clear_error():
    with pytest.raises(ArtsimError, match="n_creators"):
        SyntheticSpec(n=5, n_creators=0)
    with pytest.raises(ArtsimError, match="not a synthetic factor value"):
        render_image({"creator": "Rembrandt", "subjects": ["motif:circle"], "object_type": "painting",
                      "object_id": "x:1"}, SyntheticSpec(n=1))
    with pytest.raises(ArtsimError, match="motif"):
        render_image({"creator": "Creator 1", "subjects": ["circle"], "object_type": "painting",
                      "object_id": "x:1"}, SyntheticSpec(n=1))


def test_command_line(tmp_path, capsys):
    from artsim.testing.synthetic import main

    assert main([str(tmp_path / "s"), "--n", "5", "--image-size", "32", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "wrote 5 records" in out and "kind: table" in out
    assert len(list((tmp_path / "s" / "images").glob("*.jpg"))) == 5
    assert main([str(tmp_path / "t"), "--n", "5", "--n-creators", "0"]) == 2
    assert "n_creators" in capsys.readouterr().err
