"""Data and scoring for the conditional retrieval benchmarks (benchmarks/bench_conditional.py), as MosAIC
evaluated its system: "this item, in that font / that style".

- fonts: find the font files installed on this machine (:func:`find_fonts`), keep one file per distinct look
  (Latin letters and digits all present, no symbol fonts, no two files that render the same glyphs), and render
  each character in each font (:func:`render_glyph`) the same way: cap height and baseline at fixed fractions of
  the canvas, so a model sees the letter's shape, not a font's metrics.
- styles: :data:`STYLES` are deterministic PIL transforms (colour, texture, blur, posterise, edges...), applied to
  the same content (:func:`apply_style`).
- split: :func:`split_groups` puts whole groups (font families, styles) on one side, so nothing tested is trained on.
- scoring: :func:`conditional_hits` scores ranked answers of conditional queries: top-1 and recall@k where each
  query has exactly one right answer (the same content under the target condition).

Plain PIL/numpy: no torch, no Ray.
"""
from __future__ import annotations

import hashlib
import os
import string
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

CHARACTERS = string.ascii_uppercase + string.ascii_lowercase + string.digits  # 62
FONT_DIRS = ("/usr/share/fonts", "/usr/share/texmf/fonts/opentype", "/usr/local/share/fonts",
             os.path.expanduser("~/.fonts"), os.path.expanduser("~/.local/share/fonts"))
FONT_SUFFIXES = (".ttf", ".otf")
# Fonts whose Latin code points hold pictures or Greek, not letters: a "letter" in them is something else.
SYMBOL_NAME_PARTS = ("symbol", "dingbat", "d050000l", "emoji", "math", "music", "ornament", "cmex", "cmsy")
_MISSING = "\U0010FFFD"  # a private-use code point no text font maps: what a missing glyph looks like

# Where a glyph sits on its square canvas (fractions of the side): the cap height ("H") of every font is scaled
# to CAP_HEIGHT and the baseline is at BASELINE; wide glyphs are shrunk to fit within MARGIN of the edges. The
# embed preprocessing centre-crops image_size / (image_size + 32) of the side (0.75 at 96 px), so glyphs stay
# inside the crop.
CAP_HEIGHT = 0.42
BASELINE = 0.68
MARGIN = 0.14


@dataclass(frozen=True)
class FontFace:
    path: str
    family: str
    style: str

    @property
    def name(self) -> str:
        return f"{self.family} {self.style}".strip()

    @property
    def design(self) -> str:
        return design_of(self.family)


# Families that are clones or derivatives of one design (metric clones, forks, renamed releases): a train/test
# split by family alone would test on near-copies of training fonts. Matched on the family name's start.
DESIGN_CLONES = (
    (("Liberation", "Arimo", "Tinos", "Cousine"), "Liberation/Croscore"),
    # URW's base 35 (Nimbus, C059, P052, Z003, URW Bookman/Gothic) and its derivatives GNU FreeFont and TeX Gyre
    (("Nimbus", "C059", "P052", "Z003", "URW", "Free", "TeX Gyre", "TeXGyre"), "URW base35 and derivatives"),
    (("Noto", "Open Sans", "Droid"), "Noto/Open Sans"),
    (("DejaVu", "Bitstream Vera"), "DejaVu"),
    (("Linux ", "Libertin", "Biolinum"), "Linux Libertine/Biolinum"),
    (("Roboto",), "Roboto"),
)


def design_of(family: str) -> str:
    """The design group of a font family (DESIGN_CLONES, else the family itself without width words)."""
    for prefixes, design in DESIGN_CLONES:
        if family.startswith(prefixes):
            return design
    for word in (" Condensed", " Narrow", " Display", " Mono"):
        family = family.replace(word, "")
    return family


def find_font_files(dirs: Iterable[str] = FONT_DIRS) -> list[str]:
    out = []
    for d in dirs:
        for root, _, files in os.walk(d):
            out.extend(os.path.join(root, f) for f in files if f.lower().endswith(FONT_SUFFIXES))
    return sorted(set(out))


def _load(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size=size, layout_engine=ImageFont.Layout.BASIC)


def _glyph_mask(font, char: str) -> Optional[bytes]:
    mask = font.getmask(char)
    return None if mask.getbbox() is None else bytes(mask)


def covers(font, chars: str = CHARACTERS) -> bool:
    """Every character has its own visible glyph (not the font's missing-glyph box, not blank)."""
    missing = _glyph_mask(font, _MISSING)
    for c in chars:
        m = _glyph_mask(font, c)
        if m is None or m == missing:
            return False
    return True


@dataclass
class FontScan:
    fonts: list  # FontFace, one per distinct look, sorted by name
    skipped: dict  # reason -> list of paths

    def describe(self) -> str:
        families = sorted({f.family for f in self.fonts})
        lines = [f"{len(self.fonts)} fonts in {len(families)} families: " + ", ".join(families)]
        for reason, paths in sorted(self.skipped.items()):
            lines.append(f"skipped {len(paths)} ({reason})")
        return "\n".join(lines)


def find_fonts(paths: Optional[Sequence[str]] = None, chars: str = CHARACTERS) -> FontScan:
    """The usable fonts among ``paths`` (default: every .ttf/.otf under :data:`FONT_DIRS`), one per distinct
    (family, style) and per distinct rendering of ``chars``; the rest listed in ``skipped`` with why."""
    paths = find_font_files() if paths is None else list(paths)
    kept: dict = {}
    seen_names, seen_looks = set(), set()
    skipped: dict = {}
    for path in sorted(paths):
        try:
            font = _load(path, 48)
            family, style = font.getname()
        except (OSError, ValueError) as exc:
            skipped.setdefault(f"unreadable: {type(exc).__name__}", []).append(path)
            continue
        family, style = (family or os.path.basename(path)).strip(), (style or "").strip()
        lowered = f"{family} {style} {os.path.basename(path)}".lower()
        if any(part in lowered for part in SYMBOL_NAME_PARTS):
            skipped.setdefault("symbol font", []).append(path)
            continue
        if not covers(font, chars):
            skipped.setdefault("lacks some of the characters", []).append(path)
            continue
        if (family.lower(), style.lower()) in seen_names:
            skipped.setdefault("same family and style as another file", []).append(path)
            continue
        look = hashlib.sha256(b"".join(bytes(font.getmask(c)) for c in chars)).digest()
        if look in seen_looks:
            skipped.setdefault("renders exactly like another font", []).append(path)
            continue
        seen_names.add((family.lower(), style.lower()))
        seen_looks.add(look)
        kept[path] = FontFace(path, family, style)
    fonts = sorted(kept.values(), key=lambda f: (f.name, f.path))
    return FontScan(fonts, skipped)


def render_glyph(font_path: Optional[str], char: str, size: int = 128):
    """``char`` in the font at ``font_path`` (None: PIL's built-in font) as a ``size`` x ``size`` RGB image, black
    on white, the font's cap height scaled to CAP_HEIGHT of the side and its baseline at BASELINE."""
    from PIL import Image, ImageDraw, ImageFont

    probe = 100
    font = _load(font_path, probe) if font_path else ImageFont.load_default(size=probe)
    cap = -font.getbbox("H", anchor="ls")[1]
    pt = max(4, int(round(probe * CAP_HEIGHT * size / max(cap, 1))))
    font = _load(font_path, pt) if font_path else ImageFont.load_default(size=pt)
    left, top, right, bottom = font.getbbox(char, anchor="ls")
    usable = size * (1 - 2 * MARGIN)
    scale = min(1.0, usable / max(right - left, 1), usable / max(bottom - top, 1))
    if scale < 1.0:  # a glyph wider or taller than the canvas allows: shrink it (rare: W, @ in wide fonts)
        pt = max(4, int(pt * scale))
        font = _load(font_path, pt) if font_path else ImageFont.load_default(size=pt)
        left, top, right, bottom = font.getbbox(char, anchor="ls")
    baseline = size * BASELINE
    if baseline + bottom > size * (1 - MARGIN):  # deep descenders: lift the glyph
        baseline = size * (1 - MARGIN) - bottom
    if baseline + top < size * MARGIN:
        baseline = size * MARGIN - top
    image = Image.new("RGB", (size, size), "white")
    x = (size - (right - left)) / 2 - left
    ImageDraw.Draw(image).text((x, baseline), char, font=font, fill="black", anchor="ls")
    return image


# -- styles --------------------------------------------------------------------------------------------------------
def _texture(size: tuple, seed: int, scale: int) -> np.ndarray:
    """A smooth random field in 0..1 (noise upsampled from a coarse grid), deterministic per seed."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.random((max(2, size[1] // scale), max(2, size[0] // scale)))
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _tint(img, dark: tuple, light: tuple):
    from PIL import ImageOps

    return ImageOps.colorize(ImageOps.grayscale(img), dark, light)


def _canvas(img):
    """Coarse canvas weave multiplied in."""
    arr = np.asarray(img, dtype=np.float32)
    h, w = arr.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    weave = 0.85 + 0.15 * (np.sin(xx * 1.3) * np.sin(yy * 1.3) > 0)
    return _from(arr * weave[..., None])


def _paper(img):
    """Blotchy paper texture blended in."""
    tex = _texture(img.size, 7, 8)[..., None]
    arr = np.asarray(img, dtype=np.float32)
    return _from(arr * (0.6 + 0.4 * tex) + 60 * (1 - tex))


def _noise(img):
    rng = np.random.default_rng(11)
    arr = np.asarray(img, dtype=np.float32)
    return _from(arr + rng.normal(0, 40, arr.shape))


def _from(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _pixelate(img):
    from PIL import Image

    w, h = img.size
    return img.resize((max(1, w // 10), max(1, h // 10)), Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.NEAREST)


def _halftone(img):
    return img.convert("L").convert("1").convert("RGB") if img.mode != "1" else img.convert("RGB")


def _style_table() -> dict:
    from PIL import ImageEnhance, ImageFilter, ImageOps

    return {
        "grayscale": lambda im: ImageOps.grayscale(im).convert("RGB"),
        "invert": lambda im: ImageOps.invert(im),
        "sepia": lambda im: _tint(im, (60, 30, 10), (250, 230, 190)),
        "blue_tint": lambda im: _tint(im, (10, 20, 90), (200, 230, 255)),
        "red_on_yellow": lambda im: _tint(im, (160, 0, 0), (255, 240, 120)),
        "channel_swap": lambda im: _from(np.asarray(im)[..., ::-1]),
        "posterize": lambda im: ImageOps.posterize(im, 2),
        "solarize": lambda im: ImageOps.solarize(im, 100),
        "blur": lambda im: im.filter(ImageFilter.GaussianBlur(radius=max(1, im.size[0] // 60))),
        "edges": lambda im: ImageOps.invert(im.convert("L").filter(ImageFilter.FIND_EDGES)).convert("RGB"),
        "emboss": lambda im: im.filter(ImageFilter.EMBOSS),
        "contour": lambda im: im.filter(ImageFilter.CONTOUR),
        "oil": lambda im: im.filter(ImageFilter.ModeFilter(7)),
        "pixelate": _pixelate,
        "halftone": _halftone,
        "noise": _noise,
        "canvas": _canvas,
        "paper": _paper,
        "high_contrast": lambda im: ImageEnhance.Contrast(im).enhance(3.0),
        "washed_out": lambda im: ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(1.4)).enhance(0.4),
    }


STYLES = tuple(sorted(("grayscale", "invert", "sepia", "blue_tint", "red_on_yellow", "channel_swap", "posterize",
                       "solarize", "blur", "edges", "emboss", "contour", "oil", "pixelate", "halftone", "noise",
                       "canvas", "paper", "high_contrast", "washed_out")))
_STYLES: dict = {}


def apply_style(image, style: str):
    """``image`` (PIL) under ``style`` (one of :data:`STYLES`): an RGB image of the same size."""
    if not _STYLES:
        _STYLES.update(_style_table())
    if style not in _STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    return _STYLES[style](image.convert("RGB")).convert("RGB")


def content_crops(image, n: int = 5, fraction: float = 0.6):
    """Up to ``n`` square crops of ``image`` (the centre, then the four corners), each ``fraction`` of the shorter
    side: several contents from one picture."""
    w, h = image.size
    side = int(min(w, h) * fraction)
    boxes = [((w - side) // 2, (h - side) // 2), (0, 0), (w - side, 0), (0, h - side), (w - side, h - side)]
    return [image.crop((x, y, x + side, y + side)) for x, y in boxes[:n]]


# -- split and scoring -------------------------------------------------------------------------------------------
def stable_rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\x1f{key}".encode("utf-8")).digest()


def split_groups(groups: Sequence[str], test_fraction: float, seed: int = 0,
                 min_test_items: int = 0) -> tuple[set, set]:
    """(train groups, test groups): whole groups (``groups`` holds one entry per item, repeated per group member)
    in stable-hash order go to test until ``test_fraction`` of the items (and at least ``min_test_items``) are
    there; at least one group stays on each side."""
    sizes: dict = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    order = sorted(sizes, key=lambda g: stable_rank(seed, g))
    if len(order) < 2:
        raise ValueError(f"need at least two groups to split, got {len(order)}")
    target = max(test_fraction * len(groups), min_test_items)
    test, count = set(), 0
    for g in order[:-1]:
        if count >= target:
            break
        test.add(g)
        count += sizes[g]
    return set(order) - test, test


def conditional_hits(ranked: Sequence[Sequence], answers: Sequence, k: int = 5) -> dict:
    """Scores of conditional queries with one right answer each: ``ranked[q]`` is what the search returned for
    query q (best first), ``answers[q]`` the right item. top-1: the answer is first; recall@k: it is in the first
    k (with one right answer, recall@k is the hit rate at k)."""
    if len(ranked) != len(answers):
        raise ValueError(f"{len(ranked)} ranked lists for {len(answers)} answers")
    n = len(answers)
    if n == 0:
        return {"queries": 0, "top1": float("nan"), f"recall@{k}": float("nan")}
    top1 = sum(1 for r, a in zip(ranked, answers) if len(r) and r[0] == a)
    at_k = sum(1 for r, a in zip(ranked, answers) if a in list(r)[:k])
    return {"queries": n, "top1": top1 / n, f"recall@{k}": at_k / n}


def pick_targets(n_sources: int, conditions: Sequence[str], source_condition: Callable[[int], str],
                 seed: int = 0) -> list[str]:
    """For each query i, a target condition different from its own (``source_condition(i)``), uniformly at random
    with a fixed seed."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_sources):
        own = source_condition(i)
        others = [c for c in conditions if c != own]
        out.append(others[int(rng.integers(0, len(others)))])
    return out
