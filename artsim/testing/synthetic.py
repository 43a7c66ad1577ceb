"""Deterministic synthetic art collections whose images depend visibly on hidden factors.

Each record has three hidden factors, all exposed in its metadata so that tests and benchmarks can check whether
the pipeline recovers them:

- **creator** (``record["creator"]``, e.g. ``"Creator 3"``): a colour palette and a brushwork texture (stroke
  angle, length and width). Creators' hues are spread evenly around the colour wheel, so mean colour alone
  separates them; the stroke angle separates them again for colour-blind features.
- **subject** (``record["subjects"][0]``, e.g. ``"motif:circle"``): the shape of the central motif.
- **object type** (``record["object_type"]``, e.g. ``"print"``): the format — aspect ratio plus a paper margin,
  frame or mount.

Everything else (motif position, scale, rotation, stroke placement, slight colour shifts) is random jitter seeded by
the object's id, so the same spec always gives the same records and the same JPEG bytes, and the image of one object
does not change when ``n`` grows.

Rendering is done at a modest base resolution (up to 384 px) with PIL's C drawing primitives and then resized, which
keeps 2,000 images of 1,500 px well under a minute on two cores (see ``write_synthetic_collection``).
"""
from __future__ import annotations

import colorsys
import csv
import hashlib
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from artsim.errors import ArtsimError
from artsim.rundir.schema import empty_record

# Named factor values; counts beyond these lists get generated names ("motif:polygon13", "object_type_7").
MOTIFS = ("circle", "square", "triangle", "cross", "star", "ring", "diamond", "crescent", "hexagon", "bars")
OBJECT_TYPES = ("painting", "print", "drawing", "photograph", "textile", "manuscript")
# width / height of each object type; generated types continue the sequence (never equal to an earlier one).
_ASPECTS = {"painting": 4 / 3, "print": 3 / 4, "drawing": 1.0, "photograph": 3 / 2, "textile": 0.55,
            "manuscript": 0.68}
_MEDIA = {"painting": "Oil on canvas", "print": "Etching and engraving", "drawing": "Pen and ink on paper",
          "photograph": "Albumen silver print", "textile": "Silk and wool tapestry", "manuscript": "Tempera on vellum"}
_CULTURES = ("Dutch", "French", "Italian", "Japanese", "Danish", "Austrian", "Spanish", "Flemish")
# Concept URIs in the shape of Getty AAT page URIs. The numbers are in a block that artsim reserves for synthetic
# terms (39999xxxx does not exist in AAT), so they can never be mistaken for real vocabulary links.
_AAT_BASE = "http://vocab.getty.edu/page/aat/39999"
BASE_RENDER_SIZE = 384  # longest side at which images are drawn before resizing


@dataclass
class SyntheticSpec:
    n: int
    seed: int = 0
    image_size: int = 128  # longest side of written images, in pixels
    n_creators: int = 8
    n_subjects: int = 6
    n_object_types: int = 3
    n_collections: int = 2
    jpeg_quality: int = 90

    def __post_init__(self):
        checks = [("n", self.n >= 0), ("image_size", self.image_size >= 8), ("n_creators", self.n_creators >= 1),
                  ("n_subjects", self.n_subjects >= 1), ("n_object_types", self.n_object_types >= 1),
                  ("n_collections", 1 <= self.n_collections <= 26),
                  ("jpeg_quality", 1 <= self.jpeg_quality <= 100)]
        for name, ok in checks:
            if not ok:
                raise ArtsimError(f"SyntheticSpec.{name}: invalid value {getattr(self, name)!r}")


# ---------------------------------------------------------------------------------------------------------------
# Factor vocabularies


def motif_name(index: int) -> str:
    return MOTIFS[index] if index < len(MOTIFS) else f"polygon{index - len(MOTIFS) + 5}"


def object_type_name(index: int) -> str:
    return OBJECT_TYPES[index] if index < len(OBJECT_TYPES) else f"object_type_{index}"


def collection_name(index: int) -> str:
    return f"synth_{chr(ord('a') + index)}"


def object_type_aspect(name: str) -> float:
    """Width / height of an object type's images."""
    if name in _ASPECTS:
        return _ASPECTS[name]
    index = _index_after(name, "object_type_")
    # Generated types alternate landscape / portrait with growing elongation so no two types share an aspect.
    k = index - len(OBJECT_TYPES) + 1
    ratio = 1.0 + 0.2 * k + 0.05
    return ratio if k % 2 else 1.0 / ratio


def concept_uri(motif: str) -> str:
    index = _motif_index(motif)
    return f"{_AAT_BASE}{index:04d}"


def _motif_index(motif: str) -> int:
    if motif in MOTIFS:
        return MOTIFS.index(motif)
    return _index_after(motif, "polygon") - 5 + len(MOTIFS)


def _creator_index(creator: str) -> int:
    return _index_after(creator, "Creator ")


def _index_after(value: str, prefix: str) -> int:
    if not isinstance(value, str) or not value.startswith(prefix) or not value[len(prefix):].isdigit():
        raise ArtsimError(f"not a synthetic factor value: {value!r} (expected {prefix}<number>)")
    return int(value[len(prefix):])


def _stable_seed(*parts) -> int:
    """A seed from strings/ints that is the same in every process (Python's hash() is salted per process)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


# ---------------------------------------------------------------------------------------------------------------
# Records


def synthetic_records(spec: SyntheticSpec) -> list[dict]:
    """Canonical record dicts (every ``artsim.rundir.schema`` field) for ``spec.n`` objects, deterministic in ``spec``."""
    records = []
    for i in range(spec.n):
        # One generator per object (seeded by seed and position): record i is the same whatever n is.
        rng = np.random.default_rng(_stable_seed("record", spec.seed, i))
        creator_idx = int(rng.integers(spec.n_creators))
        motif_idx = int(rng.integers(spec.n_subjects))
        type_idx = int(rng.integers(spec.n_object_types))
        collection = collection_name(int(rng.integers(spec.n_collections)))
        local_id = f"{i:06d}"
        motif = motif_name(motif_idx)
        object_type = object_type_name(type_idx)
        # A creator works in one culture over a ~40-year career, so dates and cultures also carry the creator.
        career_start = 1450 + 37 * creator_idx
        begin = career_start + int(rng.integers(0, 40))
        end = begin + int(rng.integers(0, 3))
        record = empty_record()
        record.update(
            object_id=f"{collection}:{local_id}",
            collection=collection,
            local_id=local_id,
            title=f"{motif.capitalize()} {object_type} no. {i}",
            creator=f"Creator {creator_idx}",
            date=str(begin) if end == begin else f"{begin}–{end}",
            date_begin=begin,
            date_end=end,
            culture=_CULTURES[creator_idx % len(_CULTURES)],
            medium=_MEDIA.get(object_type, "Mixed media"),
            object_type=object_type,
            subjects=[f"motif:{motif}"],
            concepts=[concept_uri(motif)],
            license="CC0",
            description=f"Synthetic {object_type} showing a {motif} in the manner of Creator {creator_idx}.",
            source="synthetic",
        )
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------------------
# Images


def creator_palette(creator_idx: int, n_creators: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """Four RGB colours: ground, ground shade, stroke, motif accent. Hues are evenly spaced over creators."""
    offset = (_stable_seed("palette", seed) % 1000) / 1000.0
    hue = (offset + creator_idx / n_creators) % 1.0
    # Alternate lightness between neighbouring creators so that close hues still differ in brightness.
    light = 0.55 if creator_idx % 2 == 0 else 0.40

    def rgb(h, l, s):
        r, g, b = colorsys.hls_to_rgb(h % 1.0, l, s)
        return int(r * 255), int(g * 255), int(b * 255)

    return [rgb(hue, light, 0.65), rgb(hue + 0.04, light - 0.15, 0.6), rgb(hue - 0.05, light + 0.15, 0.7),
            rgb(hue + 0.5, 0.5, 0.8)]


def creator_brushwork(creator_idx: int, n_creators: int) -> tuple[float, float, float]:
    """(stroke angle in degrees, stroke length and width as fractions of the longest side)."""
    angle = 180.0 * creator_idx / n_creators
    length = (0.06, 0.12, 0.20)[creator_idx % 3]
    width = (0.006, 0.014)[(creator_idx // 3) % 2]
    return angle, length, width


def image_dimensions(object_type: str, size: int) -> tuple[int, int]:
    aspect = object_type_aspect(object_type)
    if aspect >= 1:
        return size, max(1, round(size / aspect))
    return max(1, round(size * aspect)), size


def render_image(record: dict, spec: SyntheticSpec, size: Optional[int] = None) -> Image.Image:
    """Draw the image of a synthetic record; ``size`` (default ``spec.image_size``) is the longest side."""
    size = int(size or spec.image_size)
    creator_idx = _creator_index(record["creator"])
    subject = record["subjects"][0] if record.get("subjects") else ""
    if not subject.startswith("motif:"):
        raise ArtsimError(f"not a synthetic factor value: subjects[0] = {subject!r} (expected motif:<name>)")
    motif = subject[len("motif:"):]
    _motif_index(motif)  # unknown motif names are an error, not a silent default shape
    object_type = record["object_type"]
    rng = np.random.default_rng(_stable_seed("image", spec.seed, record["object_id"]))

    base = min(size, BASE_RENDER_SIZE)
    w, h = image_dimensions(object_type, base)
    palette = creator_palette(creator_idx, spec.n_creators, spec.seed)
    # Per-object colour jitter small enough that creators' clusters stay apart.
    shift = rng.normal(0, 6, size=3)
    palette = [tuple(int(np.clip(c + s, 0, 255)) for c, s in zip(col, shift)) for col in palette]

    # Ground: a vertical gradient between the palette's first two colours.
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    top, bottom = np.array(palette[0], np.float32), np.array(palette[1], np.float32)
    ground = np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3))
    img = Image.fromarray(ground.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)

    _brushwork(draw, rng, creator_idx, spec.n_creators, w, h, palette)
    _motif(draw, rng, motif, w, h, palette[3])
    img = _format(img, object_type)
    if size != base:
        img = img.resize(image_dimensions(object_type, size), Image.BILINEAR)
    return img


def _brushwork(draw, rng, creator_idx, n_creators, w, h, palette):
    angle, length_frac, width_frac = creator_brushwork(creator_idx, n_creators)
    longest = max(w, h)
    length = length_frac * longest
    width = max(1, round(width_frac * longest))
    n_strokes = int(w * h / (length * width * 1.5)) + 20  # cover the ground about once
    xs = rng.uniform(-0.1 * w, 1.1 * w, n_strokes)
    ys = rng.uniform(-0.1 * h, 1.1 * h, n_strokes)
    angles = np.deg2rad(angle + rng.normal(0, 8, n_strokes))
    lengths = length * rng.uniform(0.6, 1.4, n_strokes)
    colour_choice = rng.integers(0, 3, n_strokes)
    for x, y, a, l, c in zip(xs, ys, angles, lengths, colour_choice):
        dx, dy = math.cos(a) * l / 2, math.sin(a) * l / 2
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=palette[c], width=width)


def _motif(draw, rng, motif, w, h, colour):
    short = min(w, h)
    radius = short * rng.uniform(0.22, 0.32)
    cx = w / 2 + rng.uniform(-0.12, 0.12) * w
    cy = h / 2 + rng.uniform(-0.12, 0.12) * h
    rot = rng.uniform(-0.25, 0.25)  # radians; small so that a square stays a square, not a diamond

    def polygon(k, r=radius, phase=0.0, star_inner=None):
        points = []
        for j in range(k * (2 if star_inner else 1)):
            if star_inner:
                rr = r if j % 2 == 0 else r * star_inner
                theta = rot + phase + math.pi * j / k
            else:
                rr = r
                theta = rot + phase + 2 * math.pi * j / k
            points.append((cx + rr * math.cos(theta), cy + rr * math.sin(theta)))
        return points

    if motif == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif motif == "ring":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=colour,
                     width=max(2, int(radius * 0.3)))
    elif motif == "square":
        draw.polygon(polygon(4, radius * 1.2, math.pi / 4), fill=colour)
    elif motif == "diamond":
        draw.polygon([(cx, cy - radius * 1.2), (cx + radius * 0.7, cy), (cx, cy + radius * 1.2),
                      (cx - radius * 0.7, cy)], fill=colour)
    elif motif == "triangle":
        draw.polygon(polygon(3, radius * 1.2, -math.pi / 2), fill=colour)
    elif motif == "star":
        draw.polygon(polygon(5, radius * 1.2, -math.pi / 2, star_inner=0.4), fill=colour)
    elif motif == "hexagon":
        draw.polygon(polygon(6), fill=colour)
    elif motif == "cross":
        arm = radius * 0.35
        draw.rectangle([cx - radius, cy - arm, cx + radius, cy + arm], fill=colour)
        draw.rectangle([cx - arm, cy - radius, cx + arm, cy + radius], fill=colour)
    elif motif == "crescent":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
        # Cut the crescent with the ground's average: an ellipse in a neutral tone offset to one side.
        off = radius * 0.45
        draw.ellipse([cx - radius + off, cy - radius - off * 0.3, cx + radius + off, cy + radius - off * 0.3],
                     fill=(235, 230, 215))
    elif motif == "bars":
        bar = radius * 0.25
        for k in (-2, 0, 2):
            draw.rectangle([cx + k * bar - bar / 2, cy - radius, cx + k * bar + bar / 2, cy + radius], fill=colour)
    else:  # generated motifs: regular polygons with 5+ sides, drawn as outlines to differ from the hexagon
        sides = _motif_index(motif) - len(MOTIFS) + 5
        draw.polygon(polygon(sides), outline=colour, width=max(2, int(radius * 0.2)))


def _format(img: Image.Image, object_type: str) -> Image.Image:
    """Object-type dressing on top of the aspect ratio: frame, paper margin, mount."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    edge = max(2, round(0.05 * min(w, h)))
    if object_type == "painting":  # a dark gilt frame
        draw.rectangle([0, 0, w - 1, h - 1], outline=(92, 70, 30), width=edge)
    elif object_type in ("print", "drawing", "manuscript"):  # paper margin around the image
        paper = {"print": (242, 238, 226), "drawing": (230, 220, 190), "manuscript": (220, 205, 170)}[object_type]
        draw.rectangle([0, 0, w - 1, h - 1], outline=paper, width=edge * 2)
        if object_type == "print":  # the plate mark
            draw.rectangle([edge, edge, w - 1 - edge, h - 1 - edge], outline=(120, 115, 105), width=1)
    elif object_type == "photograph":  # a white mount
        draw.rectangle([0, 0, w - 1, h - 1], outline=(250, 250, 250), width=edge)
    return img


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    # optimize=False keeps encoding fast and the bytes deterministic for a given libjpeg.
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Writing a collection

CSV_COLUMNS = ("local_id", "collection", "title", "creator", "date", "date_begin", "date_end", "culture", "medium",
               "object_type", "subjects", "concepts", "license", "description", "image_file")

# The `kind: table` mapping that reads records.csv back (canonical field <- CSV column).
TABLE_MAPPING = {c: c for c in CSV_COLUMNS if c != "image_file"}


def write_synthetic_collection(out_dir, spec: SyntheticSpec, image_size: Optional[int] = None,
                               workers: Optional[int] = None) -> Path:
    """Write ``out_dir/records.csv`` and ``out_dir/images/<local_id>.jpg``; return the CSV path.

    The CSV reads back with ``kind: table`` and ``mapping: artsim.testing.synthetic.TABLE_MAPPING`` (list fields are
    ``|``-joined; ``image_file`` is relative to ``out_dir``). Images are rendered on a thread pool: PIL releases
    the GIL while drawing, resizing and encoding, so threads use every core without pickling anything.
    """
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    size = int(image_size or spec.image_size)
    records = synthetic_records(spec)

    def write_one(record: dict) -> None:
        data = encode_jpeg(render_image(record, spec, size), spec.jpeg_quality)
        _write_atomic(images_dir / f"{record['local_id']}.jpg", data)

    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) * 2)) as pool:
        for _ in pool.map(write_one, records):
            pass

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in records:
        row = dict(r, image_file=f"images/{r['local_id']}.jpg")
        writer.writerow(["|".join(row[c]) if isinstance(row[c], list) else ("" if row[c] is None else row[c])
                         for c in CSV_COLUMNS])
    csv_path = out / "records.csv"
    # The CSV is written last, so a collection whose CSV exists has all of its images.
    _write_atomic(csv_path, buf.getvalue().encode("utf-8"))
    return csv_path


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{id(data)}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m artsim.testing.synthetic OUT_DIR --n 2000 [--image-size 384] [--seed 0] ...``: write a collection and
    print the source entry that ingests it."""
    import argparse
    import sys
    import time

    p = argparse.ArgumentParser(prog="python -m artsim.testing.synthetic", description=main.__doc__)
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, required=True)
    defaults = SyntheticSpec(n=0)
    for name in ("seed", "image_size", "n_creators", "n_subjects", "n_object_types", "n_collections",
                 "jpeg_quality"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    args = p.parse_args(argv)
    try:
        spec = SyntheticSpec(n=args.n, seed=args.seed, image_size=args.image_size, n_creators=args.n_creators,
                             n_subjects=args.n_subjects, n_object_types=args.n_object_types,
                             n_collections=args.n_collections, jpeg_quality=args.jpeg_quality)
    except ArtsimError as exc:
        print(f"artsim: error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    csv_path = write_synthetic_collection(args.out_dir, spec)
    seconds = time.perf_counter() - start
    print(f"[artsim] wrote {spec.n} records and images ({spec.image_size} px) to {csv_path.parent} in {seconds:.1f}s "
          f"({spec.n / max(seconds, 1e-9):.0f} images/s)")
    print("[artsim] ingest it with this source entry:")
    # No mapping needed: the CSV's columns are named like the canonical fields (see TABLE_MAPPING).
    print(f"  - kind: table\n    path: {csv_path.resolve()}\n    collection: synth\n"
          f"    image_url_template: \"file://{{source_dir}}/images/{{local_id}}.jpg\"")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
