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
                             evaluation: Optional[dict] = None, max_works: int = _MAX_WORKS) -> str:
    """Section "Suggested tags": per work, its missing tags with score, support and the neighbours that carry them.

    Works whose best suggestion is strongest come first.
    """
    ordered = sorted(recommendations, key=lambda r: -max((t["score"] for t in r["tags"]), default=0.0))
    blocks = []
    for rec in ordered[:max_works]:
        items = []
        for tag in rec["tags"]:
            who = ", ".join(f"{html.escape(str(e['object_id']))} ({e['score']:.2f})" for e in tag["evidence"])
            items.append(f"<li><b>{html.escape(str(tag['tag']))}</b> <small>({html.escape(tag['kind'])})</small> "
                         f"score {tag['score']:.2f} · {tag['support']} neighbours: {who}</li>")
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
    return ("<h2>Suggested tags</h2><p>Subjects and concepts that a work's nearest visual neighbours carry but it "
            "lacks; score = similarity-weighted share of neighbours carrying the tag.</p>"
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
