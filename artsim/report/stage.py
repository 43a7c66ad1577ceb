"""The `report` stage: one offline HTML page per run (reports/<name>/index.html) for curators and engineers.

It reads what the other stages wrote (records/, images/, embeddings/, links/) and shows: counts per stage, download
outcomes, a 2-D map of the collection (PCA of the embeddings; thumbnails placed at their coordinates), clusters
(k-means) with their members, and neighbour sheets (a work and its nearest works in other collections). Everything
is embedded (thumbnails as data URIs, plots as PNG), so the page opens offline and can be mailed around.

Runs of any size: the driver never holds a whole input. What is read, and how (streamed counts, a deterministic
per-collection sample of at most ``report.max_works`` works, the strongest links by a bounded top-N), lives in
artsim/report/inputs.py; this module computes the sections and renders the page.
"""
from __future__ import annotations

import base64
import html
import io
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from artsim.console import say
from artsim.report.html import card as _card
from artsim.rundir.names import collection_of
from artsim.report.inputs import (count_and_select_records, filtered_rows, read_json_or_none, read_sample_vectors,
                                  report_links_uri, report_sample, strongest_links, thumbnails)
from artsim.storage import join

_MAX_MAP_POINTS = 600  # thumbnails on the map
_MAX_SHEETS = 12  # neighbour sheets
_MAX_CLUSTER_MEMBERS = 10
_MAX_VOCABULARY_ROWS = 24  # works listed in the vocabulary section (only these are text-encoded)


def run_report(ctx) -> dict:
    start = time.perf_counter()
    storage, paths = ctx.storage, ctx.paths
    cfg = ctx.config.report
    images_report = read_json_or_none(storage, paths.images_report)
    ingest_report = read_json_or_none(storage, paths.ingest_report)

    embeddings_uri, sample = report_sample(ctx, cfg.max_works)
    vector_ids, vectors = read_sample_vectors(ctx.storage, sample) if sample.rows is not None else ([], None)
    links_uri = report_links_uri(ctx)
    sheet_ids = strongest_links(storage, links_uri, _MAX_SHEETS) if links_uri else []
    sheet_links = filtered_rows(storage, links_uri, set(sheet_ids)) if sheet_ids else None

    # one pass over records/: counts per collection (whole run) + the rows of the works the page shows
    wanted = set(vector_ids) | set(sheet_ids)
    if sheet_links is not None:
        wanted |= set(sheet_links.column("neighbor_id").to_pylist())
    records_read = count_and_select_records(storage, paths.records, wanted)
    meta = {r["object_id"]: r for r in records_read.rows.to_pylist()}

    has_vectors = vectors is not None and len(vector_ids) >= 3
    sampled = set(vector_ids)
    curate_records = records_read.rows.filter(pc.is_in(records_read.rows["object_id"],
                                                       value_set=pa.array(sorted(sampled), pa.string())))
    # walks start from the sheets' works; those left out of the sample are replaced by sampled works
    walk_candidates = [i for i in sheet_ids if i in sampled]
    if len(walk_candidates) < len(sheet_ids) or not sheet_ids:
        first = set(walk_candidates)
        walk_candidates += [i for i in vector_ids if i not in first]
    curated = _curate(cfg, curate_records, vectors, vector_ids, walk_candidates, meta) if has_vectors else {}

    # Thumbnails only for the works shown (streamed), so the page stays small for any collection size.
    shown = set(vector_ids[:_MAX_MAP_POINTS]) | set(sheet_ids) | curated.get("shown", set())
    if sheet_links is not None:
        shown |= set(sheet_links.column("neighbor_id").to_pylist())
    thumbs = thumbnails(storage, paths.images, shown) if storage.exists(paths.images) else {}

    sections = [_overview_section(ctx, records_read, images_report, ingest_report, embeddings_uri, links_uri,
                                  sample, vector_ids, meta)]
    if images_report:
        sections.append(_download_section(images_report))
    training = read_json_or_none(storage, join(paths.model(ctx.config.train.name), "history.json"))
    if isinstance(training, dict) and isinstance(training.get("validation"), dict):
        sections.append(_training_section(training))
    if has_vectors:
        sections.append(_map_section(vectors, vector_ids, meta, thumbs))
        sections.append(_cluster_section(vectors, vector_ids, meta, thumbs))
    if sheet_ids:
        sections.append(_sheets_section(sheet_links, sheet_ids, meta, thumbs))
    sections += _curated_html(curated, meta, thumbs)

    page = _PAGE.format(title=html.escape(f"artsim report — {paths.root}"), body="\n".join(sections),
                        generated=time.strftime("%Y-%m-%d %H:%M:%S"))
    out = join(paths.report(ctx.config.report.name), "index.html")
    storage.write_text(out, page)
    seconds = time.perf_counter() - start
    say(f"report: {out} ({len(page) / 1e6:.1f} MB, {seconds:.1f} s; {len(vector_ids)} of {sample.total} embedded "
        f"works{' (sample)' if sample.is_sample else ''})")
    return {"report_uri": out, "bytes": len(page), "seconds": round(seconds, 2), "works": sample.total,
            "sampled_works": len(vector_ids), "sampled": sample.is_sample}


def _curate(cfg, records, vectors, vector_ids, walk_candidates, meta) -> dict:
    """Suggested tags, vocabulary concepts and latent walks (artsim.curate), as the report config asks, plus the
    set of works they show (for thumbnails)."""
    from artsim.curate import classify_vocabulary, evaluate_tag_recommendation, latent_walk, recommend_tags

    out: dict = {"shown": set()}
    has_tags = any(records.column("subjects").to_pylist()) or any(records.column("concepts").to_pylist())
    if cfg.suggest_tags and has_tags:
        out["tags"] = recommend_tags(records, vectors, vector_ids, k=10, min_support=2)
        out["tags_evaluation"] = evaluate_tag_recommendation(records, vectors, vector_ids, k=5)
        best_first = sorted(out["tags"], key=lambda r: -max((t["score"] for t in r["tags"]), default=0.0))
        for rec in best_first[:_MAX_SHEETS]:  # the ones tag_recommendations_html shows
            out["shown"] |= {rec["object_id"]} | {e["object_id"] for t in rec["tags"] for e in t["evidence"]}
    if cfg.classify_vocabulary:
        from artsim.curate import known_concepts
        from artsim.curate.common import records_by_id

        # Only the works the section lists are classified (the text model costs ~5 ms a work on a CPU); every
        # sampled work's known concepts still vote in the image signal, so those rows come out as if all were run.
        listed = list(records_by_id(records).values())[:_MAX_VOCABULARY_ROWS]
        out["vocabulary"] = classify_vocabulary(listed, vectors=vectors, vector_ids=vector_ids,
                                                known=known_concepts(records))
        out["shown"] |= {c["object_id"] for c in out["vocabulary"][:_MAX_VOCABULARY_ROWS]}
    out["walks"] = [latent_walk(vectors, vector_ids, a, b, steps=8)
                    for a, b in walk_endpoints(walk_candidates, meta, cfg.latent_walks)]
    out["shown"] |= {step["object_id"] for walk in out["walks"] for step in walk}
    return out


def _curated_html(curated: dict, meta: dict, thumbs: dict) -> list[str]:
    from artsim.report.html import tag_recommendations_html, vocabulary_html, walk_html

    out = []
    if "tags" in curated:
        out.append(tag_recommendations_html(curated["tags"], meta, thumbs, evaluation=curated["tags_evaluation"]))
    if "vocabulary" in curated:
        out.append(vocabulary_html(curated["vocabulary"], meta, thumbs))
    out += [walk_html(walk, meta, thumbs) for walk in curated.get("walks", [])]
    return out


def walk_endpoints(candidates: list[str], meta: dict, n: int) -> list[tuple[str, str]]:
    """Up to n (start, end) pairs of works from different collections (the walk crosses museums)."""
    pairs = []
    for i, a in enumerate(candidates):
        for b in reversed(candidates[i + 1:]):
            if len(pairs) >= n:
                return pairs
            if meta.get(a, {}).get("collection") != meta.get(b, {}).get("collection"):
                pairs.append((a, b))
                break
    return pairs


# -- sections -------------------------------------------------------------------------------------------------------

def _overview_section(ctx, records_read, images_report, ingest_report, embeddings_uri, links_uri, sample,
                      vector_ids, meta) -> str:
    n_sampled = len(vector_ids)
    sampled_by_collection: dict = {}
    for object_id in vector_ids if sample.is_sample else []:
        name = collection_of(object_id, (meta.get(object_id) or {}).get("collection"))
        sampled_by_collection[name] = sampled_by_collection.get(name, 0) + 1
    extra_head = "<th>in the sample</th>" if sample.is_sample else ""
    rows = ""
    for name, count in sorted(records_read.by_collection.items(), key=lambda item: str(item[0])):
        extra = f"<td>{sampled_by_collection.get(name, 0)}</td>" if sample.is_sample else ""
        rows += f"<tr><td>{html.escape(str(name))}</td><td>{count}</td>{extra}</tr>"
    ok = (images_report or {}).get("by_status", {}).get("ok")
    embedded = f" ({sample.total} works)" if embeddings_uri else ""
    items = [f"<li>run directory: <code>{html.escape(ctx.paths.root)}</code></li>",
             f"<li>records: {records_read.total}</li>",
             f"<li>images downloaded (ok): {ok if ok is not None else 'n/a'}</li>",
             f"<li>embeddings: {_where(embeddings_uri, 'embed')}{embedded}</li>",
             f"<li>links: {_where(links_uri, 'links')}</li>"]
    note = ""
    if sample.is_sample:
        note = (f"<p class='sample'><b>Map, clusters, suggested tags, vocabulary and latent walks are computed on a "
                f"sample: {n_sampled:,} of {sample.total:,} works, sampled per collection</b> (deterministic: the "
                f"works with the smallest hash of their object id in each collection; report.max_works = "
                f"{ctx.config.report.max_works:,}). Counts above and the neighbour sheets cover the whole run.</p>")
    ingest = ""
    if ingest_report:
        ingest = f"<details><summary>ingest report</summary><pre>{html.escape(json.dumps(ingest_report, indent=2))}</pre></details>"
    return (f"<h2>Overview</h2><ul>{''.join(items)}</ul>{note}"
            f"<table><tr><th>collection</th><th>records</th>{extra_head}</tr>{rows}</table>{ingest}")


def _where(uri, stage: str) -> str:
    return f"<code>{html.escape(uri)}</code>" if uri else f"none yet (run the {stage} stage)"


def _training_section(summary: dict) -> str:
    """Start / best / last validation scores of the train stage (models/<name>/history.json) and which was
    exported: a reader sees at once whether training helped on creators it never saw."""
    v = summary["validation"]
    rows = ""
    for name in ("start", "best", "last"):
        row = v.get(name) or {}
        cells = [name, row.get("epoch")] + [row.get(key) for key in sorted(row) if key.startswith("val_")]
        rows += "<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in cells) + "</tr>"
    heads = sorted(k for k in (v.get("start") or {}) if k.startswith("val_"))
    header = "".join(f"<th>{html.escape(h)}</th>" for h in ["", "epoch"] + heads)
    return (f"<h2>Training ({html.escape(str(summary.get('mode')))} mode, {html.escape(str(summary.get('head')))} "
            f"head)</h2><p>Validation on held-out {html.escape(str(v.get('split')))}s, never trained on. "
            f"{html.escape(str(summary.get('verdict', '')))}.</p><table>{header}{rows}</table>")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value == value else "-"
    return "-" if value is None else str(value)


def _download_section(report: dict) -> str:
    by_status = report.get("by_status", {})
    png = _bar_chart(by_status, "images by download status") if by_status else ""
    hosts = report.get("by_host") or report.get("hosts") or {}
    host_rows = ""
    if isinstance(hosts, dict):
        for host, counts in list(hosts.items())[:20]:
            host_rows += f"<tr><td>{html.escape(str(host))}</td><td>{html.escape(json.dumps(counts))}</td></tr>"
    return (f"<h2>Download</h2>{_img(png)}"
            f"<table><tr><th>host</th><th>counts</th></tr>{host_rows}</table>"
            f"<details><summary>full download report</summary><pre>{html.escape(json.dumps(report, indent=2))}"
            f"</pre></details>")


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    centred = vectors - vectors.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def _map_section(vectors, ids, meta, thumbs) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = pca_2d(vectors)
    collections = [meta.get(i, {}).get("collection") or "?" for i in ids]
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    for name in sorted(set(collections)):
        sel = [j for j, c in enumerate(collections) if c == name]
        ax.scatter(xy[sel, 0], xy[sel, 1], s=14, label=name, alpha=0.8)
    ax.set_title("collection map (PCA of image embeddings)")
    ax.legend(loc="best", fontsize=8)
    png = _fig_png(fig)
    # thumbnail map: absolutely positioned images in a square
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    tiles = []
    for j, object_id in enumerate(ids[:_MAX_MAP_POINTS]):
        if object_id not in thumbs:
            continue
        x, y = (xy[j] - lo) / span
        m = meta.get(object_id, {})
        tip = html.escape(f"{object_id} — {m.get('title')} — {m.get('creator') or ''}")
        tiles.append(f'<img class="tile" title="{tip}" src="{thumbs[object_id]}" '
                     f'style="left:{x * 92:.2f}%;top:{(1 - y) * 92:.2f}%">')
    return (f"<h2>Map</h2><p>Works close together look alike to the model. Hover a thumbnail for its record.</p>"
            f"{_img(png)}<div class='map'>{''.join(tiles)}</div>")


def _cluster_section(vectors, ids, meta, thumbs) -> str:
    import faiss

    k = int(max(2, min(12, round(np.sqrt(len(ids) / 2)))))
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=20, seed=1, spherical=True)
    kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
    _, assign = kmeans.index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    blocks = []
    for c in range(k):
        members = [ids[j] for j in np.flatnonzero(assign[:, 0] == c)]
        if not members:
            continue
        types = _top_values([meta.get(m, {}).get("object_type") for m in members])
        cells = "".join(_card(m, meta, thumbs) for m in members[:_MAX_CLUSTER_MEMBERS])
        blocks.append(f"<h3>cluster {c + 1}: {len(members)} works · {html.escape(types)}</h3>"
                      f"<div class='row'>{cells}</div>")
    return f"<h2>Clusters (k-means, k={k})</h2>{''.join(blocks)}"


def _sheets_section(links: pa.Table, sheet_ids, meta, thumbs) -> str:
    blocks = []
    for object_id in sheet_ids:
        rows = links.filter(pc.equal(links["object_id"], object_id))
        rows = rows.take(pc.sort_indices(rows, sort_keys=[("rank", "ascending")])).to_pylist()
        cells = "".join(_card(r["neighbor_id"], meta, thumbs, f"#{r['rank']} · {r['score']:.3f}") for r in rows[:8])
        blocks.append(f"<div class='sheet'><div class='row'>{_card(object_id, meta, thumbs, 'query')}"
                      f"<div class='arrow'>→</div>{cells}</div></div>")
    return ("<h2>Neighbour sheets</h2><p>Each row: a work and its nearest works in other collections "
            "(from links/).</p>" + "".join(blocks))


def _top_values(values, n: int = 3) -> str:
    from collections import Counter

    counts = Counter(v for v in values if v)
    return ", ".join(f"{v} ({c})" for v, c in counts.most_common(n)) or "—"


def _bar_chart(counts: dict, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.8), dpi=110)
    names = list(counts)
    ax.barh(names, [counts[n] for n in names])
    ax.set_title(title)
    for y, n in enumerate(names):
        ax.text(counts[n], y, f" {counts[n]}", va="center", fontsize=8)
    fig.tight_layout()
    return _fig_png(fig)


def _fig_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _img(png: bytes) -> str:
    return f"<img class='plot' src='data:image/png;base64,{base64.b64encode(png).decode()}'>" if png else ""


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; }}
.plot {{ max-width: 100%; }}
.map {{ position: relative; width: 100%; height: 800px; border: 1px solid #ddd; margin: 1em 0; }}
.tile {{ position: absolute; width: 48px; }} .tile:hover {{ width: 160px; z-index: 10; }}
.row {{ display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }}
.card {{ width: 110px; font-size: 11px; }} .card img {{ max-width: 100px; max-height: 100px; }}
.noimg {{ width: 96px; height: 96px; background: #eee; }} .arrow {{ font-size: 32px; align-self: center; }}
.sheet {{ border-bottom: 1px solid #eee; padding: 8px 0; }}
</style></head><body>
<h1>artsim report</h1>
{body}
<p style="color:#888">generated {generated} by artsim</p>
</body></html>
"""
