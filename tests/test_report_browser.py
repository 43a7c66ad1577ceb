"""The report in a real browser: Debian's headless Chromium driven by Playwright (PyPI; the system browser, never a
downloaded one). Offline, no console errors, not blank, the interactive map works, tables are tables, and the
neighbour sheets print one page each."""
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from artsim.report.stage import run_report
from test_report import _run_dir

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is missing: `make install-dev` installs it (apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        yield b
        b.close()


def _open(browser, path: Path):
    """A page on ``path`` that records every request that is not the file itself, and every console error."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    outside, errors = [], []
    url = path.resolve().as_uri()

    def route(r):
        if r.request.url == url:
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: outside.append(r.url) if r.url != url else None)
    page.goto(url, wait_until="load")
    return page, outside, errors


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    ctx, recs = _run_dir(tmp_path_factory.mktemp("browser"))
    ctx.storage.write_json(ctx.paths.images_report, {
        "by_status": {"ok": 12, "not_found": 1},
        "by_host": {"images.metmuseum.org": {"ok": 12}, "collections.example.org": {"ok": 80, "not_found": 1}}})
    ctx.config.report.sheets = [recs[0]["object_id"], recs[3]["object_id"], "cluster:1"]
    ctx.config.report.walk = [recs[1]["object_id"], recs[10]["object_id"]]
    summary = run_report(ctx)
    return ctx, recs, summary


def test_report_opens_offline_without_errors_and_is_not_blank(browser, report):
    from PIL import Image

    ctx, recs, summary = report
    page, outside, errors = _open(browser, Path(summary["report_uri"]))
    assert outside == [], f"the report requested something outside the file: {outside}"
    assert errors == [], f"console errors: {errors}"
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB"))
    assert shot.shape[0] > 2000  # the whole page, not an empty viewport
    assert shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 1000  # thumbnails, plots, text
    # every embedded thumbnail decoded (a broken data URI has naturalWidth 0)
    broken = page.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0).length")
    assert broken == 0
    page.close()


def test_map_hover_click_and_collection_filter(browser, report):
    ctx, recs, summary = report
    page, outside, errors = _open(browser, Path(summary["report_uri"]))
    meta = {r["object_id"]: r for r in recs}
    points = json.loads(page.locator("#map-data").text_content())
    assert sorted(p["id"] for p in points) == sorted(meta)
    dots = page.locator("#map .pt")
    assert dots.count() == 12

    for j in (0, 5):  # hover shows that work's thumbnail, title, creator and collection
        dots.nth(j).hover()
        work = meta[points[int(dots.nth(j).get_attribute("data-i"))]["id"]]
        assert page.locator("#map-info .info-title").text_content() == work["title"]
        assert page.locator("#map-info .info-creator").text_content() == work["creator"]
        assert page.locator("#map-info .info-collection").text_content() == work["collection"]
        assert page.locator("#map-info .info-id").text_content() == work["object_id"]
        src = page.locator("#map-info img").get_attribute("src")
        assert src.startswith("data:image/jpeg;base64,")
        assert page.evaluate("document.querySelector('#map-info img').naturalWidth") > 0

    dots.nth(7).click()  # click pins a work: moving over another point no longer changes the panel
    pinned = meta[points[int(dots.nth(7).get_attribute("data-i"))]["id"]]
    dots.nth(2).hover()
    assert page.locator("#map-info .info-title").text_content() == pinned["title"]

    page.select_option("#map-filter", "a")
    visible = [dots.nth(j).get_attribute("data-c") for j in range(12) if dots.nth(j).is_visible()]
    assert visible == ["a"] * sum(r["collection"] == "a" for r in recs)
    assert page.locator("#map-count").text_content() == f"{len(visible)} works"
    page.select_option("#map-filter", "")
    assert sum(dots.nth(j).is_visible() for j in range(12)) == 12
    assert outside == [] and errors == []
    page.close()


def test_tables_render_as_tables(browser, report):
    ctx, recs, summary = report
    page, outside, errors = _open(browser, Path(summary["report_uri"]))
    hosts = page.locator("table.hosts")
    assert hosts.evaluate("t => getComputedStyle(t).display") == "table"
    head = hosts.locator("thead th").all_text_contents()
    assert head[:2] == ["host", "total"] and "ok" in head and "not_found" in head
    rows = [r.locator("td").all_text_contents() for r in hosts.locator("tbody tr").all()]
    assert rows[0][:3] == ["collections.example.org", "81", "80"]  # most links first; numbers, not {"ok": 80}
    # no cell of any table holds a JSON blob, and every table lays out as rows and cells
    cells = page.locator("td").all_text_contents()
    assert cells and not [c for c in cells if re.search(r"[{}]|\": ", c)]
    displays = page.evaluate("Array.from(document.querySelectorAll('table')).map(t => "
                             "[getComputedStyle(t).display, t.rows.length])")
    assert all(d == "table" and n >= 1 for d, n in displays) and len(displays) >= 6
    for cls in ("completeness", "licences", "tag-eval"):
        assert page.locator(f"table.{cls} tbody tr").count() >= 1
    page.close()


def test_neighbour_sheets_print_one_page_each(browser, report):
    ctx, recs, summary = report
    assert summary["sheets"] == 3
    page, outside, errors = _open(browser, Path(summary["sheets_uri"]))
    assert outside == [] and errors == []
    assert page.locator(".sheet-page").count() == 3
    pdf = page.pdf(format="A4", landscape=True, print_background=True)
    pages = len(re.findall(rb"/Type\s*/Page(?!s)", pdf))
    assert pages == 3, f"{pages} printed pages for 3 sheets"
    page.close()
