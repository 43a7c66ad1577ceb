"""HTML sections for the report page (artsim/report/stage.py's CSS classes: row, card, cap, noimg, arrow, sheet).

Every value that comes from records is escaped; links are only emitted for http(s) URLs (a record's landing URL is
untrusted input: ``javascript:`` must not become a clickable link), thumbnails only when they are data URIs.
"""
from __future__ import annotations

import html
from typing import Optional

_MAX_WORKS = 12


def card(object_id: str, meta: dict, thumbs: dict, caption: Optional[str] = None) -> str:
    """One work as a thumbnail with id, title and creator (same markup as the report's neighbour sheets)."""
    m = meta.get(object_id) or {}
    thumb = thumbs.get(object_id)
    img = (f"<img src='{html.escape(thumb)}'>" if isinstance(thumb, str) and thumb.startswith("data:image/")
           else "<div class='noimg'></div>")
    title = html.escape(str(m.get("title") or "")[:60])
    creator = html.escape(str(m.get("creator") or "")[:40])
    name = html.escape(str(object_id))
    link = m.get("landing_url")
    if isinstance(link, str) and link.lower().startswith(("http://", "https://")):
        name = f"<a href='{html.escape(link)}'>{name}</a>"
    cap = f"<b>{html.escape(caption)}</b><br>" if caption else ""
    return f"<div class='card'>{img}<div class='cap'>{cap}{name}<br>{title}<br><i>{creator}</i></div></div>"


def metrics_table(metrics: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in metrics.items() if not isinstance(v, dict))
    return f"<table>{rows}</table>"


def tag_recommendations_html(recommendations: list[dict], meta: dict, thumbs: dict,
                             evaluation: Optional[dict] = None, max_works: int = _MAX_WORKS,
                             signals_evaluation: Optional[dict] = None) -> str:
    """Section "Suggested tags": per work, its missing tags with score, support and the neighbours that carry them.

    Works whose best suggestion is strongest come first.
    """
    ordered = sorted(recommendations, key=lambda r: -max((t["score"] for t in r["tags"]), default=0.0))
    blocks = []
    for rec in ordered[:max_works]:
        items = []
        for tag in rec["tags"]:
            who = ", ".join(f"{html.escape(str(e['object_id']))} ({e['score']:.2f})" for e in tag["evidence"])
            words = ", ".join(f"“{html.escape(str(w['word']))}” ({w['score']:.2f})" for w in tag.get("words") or [])
            signals = ""
            if tag.get("text") is not None or tag.get("visual") is not None:
                signals = (f" <small>(visual {_num(tag.get('visual'))}, text {_num(tag.get('text'))}; "
                           f"{html.escape(str(tag.get('signal')))})</small>")
            evidence = []
            if tag["evidence"]:
                evidence.append(f"{tag['support']} neighbours: {who}")
            if words:
                evidence.append(f"words: {words}")
            items.append(f"<li><b>{html.escape(str(tag['tag']))}</b> <small>({html.escape(tag['kind'])})</small> "
                         f"score {tag['score']:.2f}{signals} · {' · '.join(evidence)}</li>")
        evidence_ids = []
        for tag in rec["tags"]:
            evidence_ids += [e["object_id"] for e in tag["evidence"] if e["object_id"] not in evidence_ids]
        cells = "".join(card(o, meta, thumbs) for o in evidence_ids[:6])
        blocks.append(f"<div class='sheet'><div class='row'>{card(rec['object_id'], meta, thumbs, 'work')}"
                      f"<div><ul>{''.join(items)}</ul><div class='row'>{cells}</div></div></div></div>")
    evaluation_html = ""
    if evaluation:
        evaluation_html = ("<details><summary>held-out evaluation (one known tag hidden per work)</summary>"
                           f"{metrics_table(evaluation)}</details>")
    if signals_evaluation:
        e, at = signals_evaluation, signals_evaluation["at"]
        rows = [[name, e[name][f"precision_at_{at}"], e[name][f"recall_at_{at}"]]
                for name in ("visual", "text", "ensemble", "popularity") if name in e]
        evaluation_html = (f"<h3>How good are these? (held out)</h3><p>{e['hide']:.0%} of the known "
                           f"{html.escape(e['kind'])} tags were hidden ({e['hidden_tags']} on "
                           f"{e['works_evaluated']} works; {e['recoverable']:.0%} still visible on some other work); "
                           f"each signal ranked the tags a work lacks.</p>"
                           + _table(["signal", f"precision@{at}", f"recall@{at}"], rows, "tag-eval")
                           + evaluation_html)
    return ("<h2>Suggested tags</h2><p>Subjects and concepts that a work lacks, from two signals: its nearest "
            "visual neighbours (similarity-weighted share of neighbours carrying the tag; evidence: those "
            "neighbours) and the text similarity of the tag's label to the work's title, type, medium, culture and "
            "description (offline sentence model; evidence: the closest words), mixed into one score.</p>"
            + evaluation_html + "".join(blocks))


def vocabulary_html(classified: list[dict], meta: dict, thumbs: dict, max_works: int = 24,
                    title: str = "Vocabulary (Europeana categories)") -> str:
    """Section: a table of works with their top concepts, score, and the signal (text / image) behind each."""
    rows = []
    for item in classified[:max_works]:
        concepts = "<br>".join(
            f"<b>{html.escape(c['concept'])}</b> {c['score']:.2f} <small>({html.escape(c['signal'])}; text "
            f"{_num(c['text'])}, image {_num(c['image'])})</small>" for c in item["concepts"])
        known = html.escape(", ".join(item.get("known") or [])) or "—"
        rows.append(f"<tr><td>{card(item['object_id'], meta, thumbs)}</td><td>{known}</td><td>{concepts}</td></tr>")
    return (f"<h2>{html.escape(title)}</h2><p>text = metadata text vs concept label (offline sentence model); "
            "image = vote of visually nearest works whose concept is known.</p>"
            f"<table><tr><th>work</th><th>known</th><th>suggested concepts</th></tr>{''.join(rows)}</table>")


def walk_html(path: list[dict], meta: dict, thumbs: dict, title: Optional[str] = None) -> str:
    """Section: the walk as a row of cards, each captioned with its step and cosines to the two ends."""
    if not path:
        return ""
    cells = []
    for i, step in enumerate(path):
        caption = f"{i}: →A {step['to_start']:.2f} →B {step['to_end']:.2f}"
        cells.append(card(step["object_id"], meta, thumbs, caption))
    heading = title or f"Latent walk: {path[0]['object_id']} → {path[-1]['object_id']}"
    return (f"<h2>{html.escape(heading)}</h2><div class='sheet'><div class='row'>"
            + "<div class='arrow'>→</div>".join(cells) + "</div></div>")


def _num(value) -> str:
    return "—" if value is None else f"{value:.2f}"


# -- download, audit, interactive map, printable neighbour sheets ---------------------------------------------------

def _cell(value) -> str:
    return f"<td>{html.escape(str(value))}</td>"


def _table(head: list[str], rows: list[list], cls: str = "") -> str:
    """A real table: header cells, one row per item, every value escaped (never a JSON blob in a cell)."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(v if isinstance(v, _Raw) else _cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table class='{cls}'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


class _Raw(str):
    """Markup already built (and escaped) here: put into a table cell as is."""


def host_status_table(by_host: dict, max_hosts: int = 20) -> str:
    """Download outcomes per host as a table: host, total, then one column per status that occurs."""
    rows = [(str(h), c) for h, c in by_host.items() if isinstance(c, dict)]
    rows.sort(key=lambda x: (-sum(v for v in x[1].values() if isinstance(v, (int, float))), x[0]))
    statuses = sorted({s for _, c in rows for s in c}, key=lambda s: (s != "ok", s))
    body = [[h, sum(v for v in c.values() if isinstance(v, (int, float)))] + [c.get(s, 0) for s in statuses]
            for h, c in rows[:max_hosts]]
    note = f"<p>{len(rows) - max_hosts} more hosts in the full report below.</p>" if len(rows) > max_hosts else ""
    return _table(["host", "total", *statuses], body, "hosts") + note


def _pct(share: float) -> _Raw:
    hue = int(120 * max(0.0, min(1.0, share)))
    return _Raw(f"<td style='background:hsl({hue},70%,85%)'>{share:.0%}</td>")


def _pair_html(pair: dict, meta: dict, thumbs: dict, caption: str) -> str:
    where = "across collections" if pair["across_collections"] else "same collection"
    return (f"<div class='pair'><div class='row'>{card(pair['a'], meta, thumbs)}{card(pair['b'], meta, thumbs)}"
            f"</div><small>{html.escape(caption)} · {where}</small></div>")


def audit_html(audit: dict, meta: dict, thumbs: dict) -> str:
    """Section "Data-quality audit" (the same numbers as audit.json)."""
    parts = ["<h2>Data-quality audit</h2><p>Everything below is also in <code>audit.json</code> beside this page. "
             "Counts cover the whole run; near-duplicate images are looked for among a stable per-collection sample "
             "of the images (the numbers say how many).</p>"]
    collections = audit.get("collections") or {}
    if collections:
        fields = list(next(iter(collections.values()))["fields"])
        rows = [[c, v["records"]] + [_pct(v["fields"][f]["share"]) for f in fields] for c, v in collections.items()]
        parts.append("<h3>Completeness per collection</h3><p>Share of records with each field filled in.</p>"
                     "<div class='wide'>" + _table(["collection", "records", *fields], rows, "completeness")
                     + "</div>")
        lic_rows = [[c, lic, n] for c, v in collections.items() for lic, n in v["licences"].items()]
        parts.append("<h3>Licences</h3>" + _table(["collection", "licence", "records"], lic_rows, "licences"))
    duplicates = audit.get("duplicates") or {}
    if duplicates:
        rows = []
        for what, d in duplicates.items():
            for ex in d["examples"]:
                works = ", ".join(w["object_id"] for w in ex["works"])
                rows.append([what, ex["value"], ex["rows"], works])
        summary = "; ".join(f"{what}: {d['groups']} values on {d['rows_in_groups']} records"
                            for what, d in duplicates.items())
        parts.append(f"<h3>Duplicate records</h3><p>{html.escape(summary)}</p>"
                     + (_table(["same", "value", "records", "works"], rows, "duplicates") if rows else ""))
    for key, title, caption in (("near_duplicate_images", "Near-duplicate images (perceptual hash)",
                                 "pHash {phash_distance} · dHash {dhash_distance} bits"),
                                ("near_duplicate_embeddings", "Near-duplicate images (embedding)",
                                 "centred cosine {centred_cosine}")):
        found = audit.get(key)
        if not found:
            continue
        n_what = found.get("images_hashed", found.get("works_compared"))
        head = (f"<h3>{title}</h3><p>{found['pairs_found']} pairs among {n_what} images "
                f"({found['across_collections']} across collections)"
                + (f"; {found['undecodable']} images could not be decoded" if found.get("undecodable") else "")
                + ".</p>")
        pairs = "".join(_pair_html(p, meta, thumbs, caption.format(**p)) for p in found["pairs"])
        parts.append(head + f"<div class='row pairs'>{pairs}</div>")
    variants = audit.get("variants") or {}
    for kind, title in (("creator", "Variant spellings: creators"), ("term", "Variant spellings: subject terms")):
        groups = variants.get(kind) or []
        rows = [[g["key"], g["preferred"], "; ".join(f"{s['value']} ({s['records']})" for s in g["spellings"]),
                 g["records"]] for g in groups]
        parts.append(f"<h3>{title}</h3>" + (_table(["normalised form", "most used", "spellings (records)",
                                                     "records"], rows, "variants") if rows else "<p>none found</p>"))
    links = audit.get("image_links")
    if links:
        t = links["totals"]
        rows = [[h["host"], h["total"], h["ok"], h["broken"], h["blocked"], h["opted_out"], h["other"]]
                for h in links["hosts"]]
        parts.append(f"<h3>Image links by host</h3><p>{t.get('total', 0)} links: {t.get('ok', 0)} ok, "
                     f"{t.get('broken', 0)} broken, {t.get('blocked', 0)} blocked, {t.get('opted_out', 0)} opted out "
                     f"({links['hosts_total']} hosts).</p>"
                     + _table(["host", "total", "ok", "broken", "blocked", "opted out", "other"], rows, "links"))
    return "".join(parts)


MAP_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf")


def _script_json(value) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' can close the element or start markup."""
    import json

    return (json.dumps(value, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))


def map_html(xy, ids: list, meta: dict, thumbs: dict) -> str:
    """Section "Map": an inline SVG scatter (one circle per work, coloured by collection) with a panel that shows
    the hovered / clicked work's thumbnail, title, creator and collection, and a collection filter. No external
    asset: the data sits in a JSON script element, the behaviour in a small inline script."""
    import numpy as np

    xy = np.asarray(xy, dtype=float)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    pos = (xy - lo) / span
    collections = sorted({str((meta.get(i) or {}).get("collection") or "?") for i in ids})
    colour = {c: MAP_COLOURS[n % len(MAP_COLOURS)] for n, c in enumerate(collections)}
    points, circles = [], []
    for j, object_id in enumerate(ids):
        m = meta.get(object_id) or {}
        coll = str(m.get("collection") or "?")
        thumb = thumbs.get(object_id)
        points.append({"id": object_id, "title": m.get("title") or "", "creator": m.get("creator") or "",
                       "collection": coll, "thumb": thumb if isinstance(thumb, str) and thumb.startswith(
                           "data:image/") else None})
        x, y = 20 + pos[j, 0] * 960, 20 + (1 - pos[j, 1]) * 660
        circles.append(f"<circle class='pt' data-i='{j}' data-c='{html.escape(coll)}' cx='{x:.1f}' cy='{y:.1f}' "
                       f"r='6' fill='{colour[coll]}'><title>{html.escape(str(m.get('title') or object_id))}"
                       f"</title></circle>")
    options = "".join(f"<option value='{html.escape(c)}'>{html.escape(c)}</option>" for c in collections)
    legend = "".join(f"<span class='key'><svg width='12' height='12'><circle cx='6' cy='6' r='5' "
                     f"fill='{colour[c]}'/></svg> {html.escape(c)}</span>" for c in collections)
    return (f"<h2>Map</h2><p>PCA of the image embeddings: works close together look alike to the model. Hover or "
            f"click a point for its record; filter by collection.</p>"
            f"<div class='mapctl'><label>collection <select id='map-filter'><option value=''>all</option>{options}"
            f"</select></label> <span id='map-count'>{len(ids)} works</span> {legend}</div>"
            f"<div class='mapwrap'><svg id='map' viewBox='0 0 1000 700' xmlns='http://www.w3.org/2000/svg'>"
            f"{''.join(circles)}</svg><div id='map-info' class='mapinfo'><i>hover or click a point</i></div></div>"
            f"<script type='application/json' id='map-data'>{_script_json(points)}</script>"
            f"<script>{_MAP_JS}</script>")


_MAP_JS = """
(function () {
  var points = JSON.parse(document.getElementById('map-data').textContent);
  var svg = document.getElementById('map'), info = document.getElementById('map-info');
  var filter = document.getElementById('map-filter'), count = document.getElementById('map-count');
  var pinned = null;
  function line(cls, text) { var d = document.createElement('div'); d.className = cls; d.textContent = text; return d; }
  function show(el) {
    var p = points[+el.getAttribute('data-i')];
    info.textContent = '';
    if (p.thumb && p.thumb.indexOf('data:image/') === 0) {
      var img = document.createElement('img'); img.src = p.thumb; img.alt = p.title; info.appendChild(img);
    } else { info.appendChild(line('noimg', '')); }
    info.appendChild(line('info-title', p.title || '(untitled)'));
    info.appendChild(line('info-creator', p.creator || '(creator unknown)'));
    info.appendChild(line('info-collection', p.collection));
    info.appendChild(line('info-id', p.id));
  }
  svg.addEventListener('mouseover', function (e) { if (e.target.classList.contains('pt') && !pinned) show(e.target); });
  svg.addEventListener('click', function (e) {
    if (!e.target.classList.contains('pt')) return;
    if (pinned) pinned.classList.remove('pinned');
    pinned = e.target; pinned.classList.add('pinned'); show(pinned);
  });
  filter.addEventListener('change', function () {
    var shown = 0;
    svg.querySelectorAll('.pt').forEach(function (c) {
      var on = !filter.value || c.getAttribute('data-c') === filter.value;
      c.style.display = on ? '' : 'none'; shown += on ? 1 : 0;
    });
    count.textContent = shown + ' works';
  });
})();
"""


def sheet_html(sheet: dict, meta: dict, thumbs: dict, per_row: int = 6) -> str:
    """One neighbour sheet (one printed page): the chosen work (or a cluster's members), its nearest and its
    farthest works in other collections, each captioned with its cosine."""
    query = "".join(card(o, meta, thumbs, "work" if i == 0 and sheet["kind"] == "work" else None)
                    for i, o in enumerate(sheet["query"][:per_row]))
    nearest = "".join(card(n["object_id"], meta, thumbs, f"#{r} · {n['score']:.3f}")
                      for r, n in enumerate(sheet["nearest"][:per_row], 1))
    farthest = "".join(card(n["object_id"], meta, thumbs, f"{n['score']:.3f}")
                       for n in sheet["farthest"][:per_row])
    return (f"<div class='sheet-page'><h3>{html.escape(sheet['title'])}</h3><div class='row'>{query}</div>"
            f"<h4>nearest in other collections <small>({html.escape(sheet['nearest_from'])})</small></h4>"
            f"<div class='row'>{nearest or '<i>none</i>'}</div>"
            f"<h4>farthest in other collections <small>({html.escape(sheet['farthest_from'])})</small></h4>"
            f"<div class='row'>{farthest or '<i>none</i>'}</div></div>")


PRINT_CSS = """
@page { size: A4 landscape; margin: 10mm; }
@media print {
  .sheet-page { break-after: page; page-break-after: always; break-inside: avoid; page-break-inside: avoid; }
  .sheet-page:last-of-type { break-after: auto; page-break-after: auto; }
  body { margin: 0; }
}
"""
