"""artsim.testing.conditional: the data and scoring of benchmarks/bench_conditional.py, with fonts every machine
has (PIL's built-in font, matplotlib's bundled DejaVu)."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from artsim.testing import conditional as cond


def _mpl_font(name: str) -> str:
    import matplotlib

    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", name)
    if not os.path.exists(path):
        pytest.fail(f"matplotlib ships {name}; not found at {path}")
    return path


def _ink_box(image: Image.Image):
    dark = np.asarray(image.convert("L")) < 128
    ys, xs = np.nonzero(dark)
    return xs.min(), ys.min(), xs.max(), ys.max()


@pytest.mark.parametrize("font", [None, "DejaVuSans.ttf", "DejaVuSerif-Bold.ttf"])
def test_glyphs_are_drawn_inside_the_crop_at_a_common_scale(font):
    path = _mpl_font(font) if font else None
    size = 96
    glyphs = {c: cond.render_glyph(path, c, size) for c in "HWgjo0"}
    for c, img in glyphs.items():
        assert img.size == (size, size) and img.mode == "RGB"
        x0, y0, x1, y1 = _ink_box(img)
        # inside the centre crop the embed preprocessing keeps (image_size / (image_size + 32) of the side)
        lo, hi = size * 16 / 128, size * (1 - 16 / 128)
        assert lo <= x0 and x1 <= hi and lo <= y0 and y1 <= hi, (c, (x0, y0, x1, y1))
    _, top, _, bottom = _ink_box(glyphs["H"])
    cap = bottom - top + 1
    assert abs(cap - cond.CAP_HEIGHT * size) <= 3  # every font's cap height is scaled to the same size
    assert abs(bottom + 1 - cond.BASELINE * size) <= 2
    assert _ink_box(glyphs["g"])[3] > bottom  # descenders stay below the baseline: 'g' is not a shifted 'o'
    assert not np.array_equal(np.asarray(glyphs["o"]), np.asarray(glyphs["0"]))


def test_find_fonts_keeps_one_file_per_look_and_says_why_others_are_skipped(tmp_path):
    sans, bold = _mpl_font("DejaVuSans.ttf"), _mpl_font("DejaVuSans-Bold.ttf")
    copy = tmp_path / "copy-of-sans.ttf"
    shutil.copy(sans, copy)
    (tmp_path / "broken.ttf").write_bytes(b"not a font")
    scan = cond.find_fonts([sans, bold, str(copy), _mpl_font("cmex10.ttf"), _mpl_font("DejaVuSansDisplay.ttf"),
                            str(tmp_path / "broken.ttf")])
    names = sorted(f.name for f in scan.fonts)
    assert names == ["DejaVu Sans Bold", "DejaVu Sans Book"]
    skipped = {r: sorted(os.path.basename(p) for p in ps) for r, ps in scan.skipped.items()}
    assert skipped["lacks some of the characters"] == ["DejaVuSansDisplay.ttf"]
    assert skipped["symbol font"] == ["cmex10.ttf"]  # maps Latin code points to math delimiters
    assert any("broken.ttf" in ps for r, ps in skipped.items() if r.startswith("unreadable"))
    assert sum(len(ps) for ps in skipped.values()) == 4  # the copy is skipped too (same family and style)
    assert "2 fonts in 1 families" in scan.describe()


def test_clones_share_a_design_group():
    assert cond.design_of("Arimo") == cond.design_of("Liberation Sans") == cond.design_of("Cousine")
    assert cond.design_of("TeX Gyre Heros") == cond.design_of("Nimbus Sans") == cond.design_of("FreeSans")
    assert cond.design_of("Roboto Condensed") == cond.design_of("Roboto")
    assert cond.design_of("Lato") != cond.design_of("Cantarell")


def test_every_style_changes_the_image_and_keeps_its_size():
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).resize((96, 80))
    base = Image.blend(base, cond.render_glyph(None, "A", 96).resize((96, 80)), 0.5)
    for style in cond.STYLES:
        out = cond.apply_style(base, style)
        assert out.size == base.size and out.mode == "RGB", style
        assert not np.array_equal(np.asarray(out), np.asarray(base)), style
        assert np.array_equal(np.asarray(out), np.asarray(cond.apply_style(base, style))), style  # deterministic
    with pytest.raises(ValueError, match="unknown style"):
        cond.apply_style(base, "cubism")
    crops = cond.content_crops(base, 5, 0.6)
    assert len(crops) == 5 and all(c.size == (48, 48) for c in crops)


def test_split_keeps_groups_whole_and_respects_the_minimum():
    groups = [f"g{i % 7}" for i in range(70)]
    train, test = cond.split_groups(groups, 0.3, seed=1)
    assert train and test and not (train & test) and train | test == set(groups)
    assert sum(g in test for g in groups) >= 21
    train2, test2 = cond.split_groups(groups, 0.0, seed=1, min_test_items=45)
    assert sum(g in test2 for g in groups) >= 45 and train2
    assert cond.split_groups(groups, 0.3, seed=1) == (train, test)  # deterministic
    with pytest.raises(ValueError):
        cond.split_groups(["only"], 0.5)


def test_conditional_hits_and_targets():
    ranked = [["a", "b"], ["x", "c", "d", "e", "f", "g"], ["h"], []]
    scores = cond.conditional_hits(ranked, ["a", "c", "z", "q"], k=5)
    assert scores == {"queries": 4, "top1": 0.25, "recall@5": 0.5}
    assert cond.conditional_hits([["x", "y", "z", "w", "v", "c"]], ["c"], k=5)["recall@5"] == 0.0
    with pytest.raises(ValueError):
        cond.conditional_hits([["a"]], ["a", "b"])
    own = ["f1", "f2", "f3"] * 10
    targets = cond.pick_targets(len(own), ["f1", "f2", "f3"], lambda i: own[i], seed=3)
    assert all(t != o for t, o in zip(targets, own)) and set(targets) == {"f1", "f2", "f3"}
