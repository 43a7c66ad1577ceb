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
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from artsim.console import say
from artsim.errors import ArtsimError
from artsim.report.html import PRINT_CSS, audit_html, host_status_table, map_html, sheet_html
from artsim.report.html import card as _card
from artsim.rundir.names import collection_of
from artsim.report.inputs import (count_and_select_records, filtered_rows, read_json_or_none, read_sample_vectors,
                                  read_vectors_for_ids, report_links_uri, report_sample, strongest_links, thumbnails)
from artsim.storage import join

_MAX_MAP_POINTS = 600  # works on the map with a thumbnail (hover / click shows it)
_MAX_MAP_DOTS = 3_000  # points on the interactive map
_MAX_TAG_EVALUATION = 300  # works in the report's held-out tag evaluation (text-encoded: ~5 ms each on a CPU)
_MAX_SHEETS = 12  # neighbour sheets
_MAX_CLUSTER_MEMBERS = 10
_MAX_VOCABULARY_ROWS = 24  # works listed in the vocabulary section (only these are text-encoded)


def run_report(ctx) -> dict:
    start = time.perf_counter()
    storage, paths = ctx.storage, ctx.paths
    cfg = ctx.config.report
    images_report = read_json_or_none(storage, paths.images_report)
    ingest_report = read_json_or_none(storage, paths.ingest_report)

    audit = None
    if cfg.audit:  # first, before the report holds anything else: the peaks of the two do not add up
        from artsim.report.audit import audit_records_and_images

        audit = audit_records_and_images(storage, paths, cfg.max_works)

    embeddings_uri, sample = report_sample(ctx, cfg.max_works)
    vector_ids, vectors = read_sample_vectors(ctx.storage, sample) if sample.rows is not None else ([], None)
    has_vectors = vectors is not None and len(vector_ids) >= 3
    chosen_works = [s for s in cfg.sheets if not s.startswith("cluster:")]
    chosen_clusters = [int(s[len("cluster:"):]) for s in cfg.sheets if s.startswith("cluster:")]
    # the pool for sheets and walks: the sample plus the chosen works (read on their own when not sampled)
    pool_ids, pool = _pool_with(storage, embeddings_uri, vector_ids, vectors, chosen_works + list(cfg.walk))

    links_uri = report_links_uri(ctx)
    if chosen_works:
        sheet_ids = chosen_works
    else:
        sheet_ids = strongest_links(storage, links_uri, _MAX_SHEETS) if links_uri else []
    sheet_links = filtered_rows(storage, links_uri, set(sheet_ids)) if (sheet_ids and links_uri) else None

    # one pass over records/: counts per collection (whole run) + the rows of the works the page shows
    wanted = set(pool_ids) | set(sheet_ids)
    if sheet_links is not None:
        wanted |= set(sheet_links.column("neighbor_id").to_pylist())
    records_read = count_and_select_records(storage, paths.records, wanted)
    meta = {r["object_id"]: r for r in records_read.rows.to_pylist()}

    sampled = set(vector_ids)
    curate_records = records_read.rows.filter(pc.is_in(records_read.rows["object_id"],
                                                       value_set=pa.array(sorted(sampled), pa.string())))
    # walks start from the sheets' works; those left out of the sample are replaced by sampled works
    walk_candidates = [i for i in sheet_ids if i in sampled]
    if len(walk_candidates) < len(sheet_ids) or not sheet_ids:
        first = set(walk_candidates)
        walk_candidates += [i for i in vector_ids if i not in first]
    curated = _curate(cfg, curate_records, vectors, vector_ids, walk_candidates, meta) if has_vectors else {}
    if cfg.walk:
        if pool is None:
            raise ArtsimError("report.walk: the run has no embeddings yet (run the embed stage)")
        curated.setdefault("walks", []).insert(0, latent_walk_between(pool, pool_ids, *cfg.walk))
        curated.setdefault("shown", set()).update(step["object_id"] for step in curated["walks"][0])

    clusters = _clusters(vectors, vector_ids) if has_vectors else None
    sheets = []
    if sheet_ids or chosen_clusters:  # without vectors a sheet has its links' nearest works only
        sheets = _sheets(sheet_ids, chosen_clusters, clusters, pool, pool_ids, sheet_links, meta)

    if audit is not None:
        from artsim.report.audit import audit_shown_ids, embedding_pairs

        audit["near_duplicate_embeddings"] = embedding_pairs(vector_ids, vectors) if has_vectors else None
        storage.write_json(join(paths.report(cfg.name), "audit.json"), audit)

    # Thumbnails only for the works shown (streamed), so the page stays small for any collection size.
    shown = set(vector_ids[:_MAX_MAP_POINTS]) | set(sheet_ids) | curated.get("shown", set())
    if sheet_links is not None:
        shown |= set(sheet_links.column("neighbor_id").to_pylist())
    for sheet in sheets:
        shown |= set(sheet["query"][:6]) | {n["object_id"] for n in sheet["nearest"][:6] + sheet["farthest"][:6]}
    if clusters is not None:
        shown |= {m for members in clusters["members"] for m in members[:_MAX_CLUSTER_MEMBERS]}
    if audit:
        shown |= audit_shown_ids(audit)
    thumbs = thumbnails(storage, paths.images, shown) if storage.exists(paths.images) else {}

    sections = [_overview_section(ctx, records_read, images_report, ingest_report, embeddings_uri, links_uri,
                                  sample, vector_ids, meta)]
    if images_report:
        sections.append(_download_section(images_report))
    training = read_json_or_none(storage, join(paths.model(ctx.config.train.name), "history.json"))
    if isinstance(training, dict) and isinstance(training.get("validation"), dict):
        sections.append(_training_section(training))
    if audit:
        sections.append(audit_html(audit, meta, thumbs))
    if has_vectors:
        sections.append(map_html(pca_2d(vectors[:_MAX_MAP_DOTS]), vector_ids[:_MAX_MAP_DOTS], meta, thumbs))
        sections.append(_cluster_section(clusters, meta, thumbs))
    if sheets:
        sections.append(_sheets_section(sheets, meta, thumbs, sample.is_sample))
    sections += _curated_html(curated, meta, thumbs)

    title = html.escape(f"artsim report — {paths.root}")
    page = _PAGE.format(title=title, body="\n".join(sections), generated=time.strftime("%Y-%m-%d %H:%M:%S"),
                        print_css=PRINT_CSS)
    out = join(paths.report(cfg.name), "index.html")
    storage.write_text(out, page)
    sheets_uri = None
    if sheets:
        sheets_uri = join(paths.report(cfg.name), "sheets.html")
        body = "<div class='sheets'>" + "".join(sheet_html(sh, meta, thumbs) for sh in sheets) + "</div>"
        storage.write_text(sheets_uri, _PAGE.format(title=html.escape(f"neighbour sheets — {paths.root}"),
                                                    body=body, generated=time.strftime("%Y-%m-%d %H:%M:%S"),
                                                    print_css=PRINT_CSS))
    seconds = time.perf_counter() - start
    say(f"report: {out} ({len(page) / 1e6:.1f} MB, {seconds:.1f} s; {len(vector_ids)} of {sample.total} embedded "
        f"works{' (sample)' if sample.is_sample else ''})")
    if audit:
        say(_audit_summary(audit))
    return {"report_uri": out, "bytes": len(page), "seconds": round(seconds, 2), "works": sample.total,
            "sampled_works": len(vector_ids), "sampled": sample.is_sample, "sheets_uri": sheets_uri,
            "sheets": len(sheets), "audit_uri": join(paths.report(cfg.name), "audit.json") if audit else None}


def _audit_summary(audit: dict) -> str:
    dup = audit.get("duplicates") or {}
    near = audit.get("near_duplicate_images") or {}
    links = (audit.get("image_links") or {}).get("totals") or {}
    variants = audit.get("variants") or {}
    return (f"audit: {audit.get('records', 0)} records; duplicate ids {dup.get('object_id', {}).get('groups', 0)}, "
            f"shared image URLs {dup.get('image_url', {}).get('groups', 0)}; near-duplicate image pairs "
            f"{near.get('pairs_found', 0)} of {near.get('images_hashed', 0)} hashed; variant creator spellings "
            f"{len(variants.get('creator') or [])} groups, terms {len(variants.get('term') or [])}; image links "
            f"broken {links.get('broken', 0)}, blocked {links.get('blocked', 0)}, opted out {links.get('opted_out', 0)}")


def _pool_with(storage, embeddings_uri, vector_ids, vectors, extra_ids):
    """(ids, vectors): the sample plus the given works' own vectors; a given work without one is an error."""
    missing = {i for i in extra_ids if i not in set(vector_ids)}
    if not missing:
        return list(vector_ids), vectors
    if embeddings_uri is None:
        raise ArtsimError(f"report: {sorted(missing)[0]!r} was chosen (report.sheets / report.walk) but the run "
                          f"has no embeddings yet (run the embed stage)")
    found = read_vectors_for_ids(storage, embeddings_uri, missing)
    absent = sorted(missing - set(found))
    if absent:
        raise ArtsimError(f"report: chosen work(s) {', '.join(map(repr, absent))} have no embedding in "
                          f"{embeddings_uri} (check report.sheets / report.walk / --walk)")
    ids = list(vector_ids) + sorted(found)
    extra = np.stack([found[i] for i in sorted(found)])
    return ids, extra if vectors is None else np.vstack([vectors, extra])


def latent_walk_between(pool, pool_ids, start_id, end_id) -> list[dict]:
    from artsim.curate import latent_walk

    return latent_walk(pool, pool_ids, start_id, end_id, steps=8)


def _clusters(vectors, ids) -> dict:
    import faiss

    k = int(max(2, min(12, round(np.sqrt(len(ids) / 2)))))
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=20, seed=1, spherical=True)
    kmeans.train(matrix)
    sims, assign = kmeans.index.search(matrix, 1)
    members = []
    for c in range(k):
        rows = np.flatnonzero(assign[:, 0] == c)
        rows = rows[np.argsort(-sims[rows, 0], kind="stable")]  # closest to the centroid first
        members.append([ids[j] for j in rows])
    return {"k": k, "members": members, "centroids": np.asarray(kmeans.centroids, dtype=np.float32)}


def _sheets(sheet_ids, chosen_clusters, clusters, pool, pool_ids, links, meta) -> list[dict]:
    """Neighbour sheets: for each work its nearest works in other collections (links/ when the work has links:
    the whole run; else the pool) and its farthest (the pool); for each chosen cluster the same around its
    centroid, "other collections" meaning other than the cluster's most common one."""
    row_of = {o: r for r, o in enumerate(pool_ids)}
    colls = np.array([collection_of(o, (meta.get(o) or {}).get("collection")) for o in pool_ids], dtype=object)
    sheets = []
    for object_id in sheet_ids:
        coll = collection_of(object_id, (meta.get(object_id) or {}).get("collection"))
        nearest, nearest_from = [], "sample"
        if links is not None:
            rows = links.filter(pc.equal(links["object_id"], object_id))
            rows = rows.take(pc.sort_indices(rows, sort_keys=[("rank", "ascending")])).to_pylist()
            nearest = [{"object_id": r["neighbor_id"], "score": float(r["score"])} for r in rows]
            nearest_from = "links/, the whole run"
        farthest = []
        if pool is not None and object_id in row_of:
            near, far = _extremes(pool[row_of[object_id]], pool, pool_ids, colls != coll)
            nearest = nearest or near
            farthest = far
        if not nearest and not farthest:
            continue
        m = meta.get(object_id) or {}
        sheets.append({"kind": "work", "title": f"{object_id} — {m.get('title') or ''}", "query": [object_id],
                       "nearest": nearest, "farthest": farthest, "nearest_from": nearest_from,
                       "farthest_from": "exact, over the report's works"})
    for number in chosen_clusters:
        if clusters is None or not 1 <= number <= clusters["k"] or not clusters["members"][number - 1]:
            raise ArtsimError(f"report.sheets: cluster:{number} does not exist (the report has clusters 1.."
                              f"{clusters['k'] if clusters else 0}; empty ones are not listed)")
        members = clusters["members"][number - 1]
        main = Counter(collection_of(o, (meta.get(o) or {}).get("collection")) for o in members).most_common(1)[0][0]
        centroid = clusters["centroids"][number - 1]
        centroid = centroid / max(float(np.linalg.norm(centroid)), 1e-12)
        others = (colls != main) & ~np.isin(np.array(pool_ids, dtype=object), members)
        near, far = _extremes(centroid, pool, pool_ids, others)
        sheets.append({"kind": "cluster", "title": f"cluster {number}: {len(members)} works, mostly {main}",
                       "query": members, "nearest": near, "farthest": far,
                       "nearest_from": f"to the cluster's centre, outside {main}",
                       "farthest_from": f"from the cluster's centre, outside {main}"})
    return sheets


def _extremes(query, pool, pool_ids, mask, n: int = 8):
    scores = pool @ query
    candidates = np.flatnonzero(mask)
    if not len(candidates):
        return [], []
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    near = [{"object_id": pool_ids[j], "score": float(scores[j])} for j in order[:n]]
    far = [{"object_id": pool_ids[j], "score": float(scores[j])} for j in order[::-1][:n]]
    return near, far


def _curate(cfg, records, vectors, vector_ids, walk_candidates, meta) -> dict:
    """Suggested tags, vocabulary concepts and latent walks (artsim.curate), as the report config asks, plus the
    set of works they show (for thumbnails)."""
    from artsim.curate import classify_vocabulary, evaluate_tag_signals, latent_walk, recommend_tags
    from artsim.errors import ArtsimError as _Error

    out: dict = {"shown": set()}
    has_tags = any(records.column("subjects").to_pylist()) or any(records.column("concepts").to_pylist())
    encoder = None
    if (cfg.suggest_tags and has_tags and cfg.tag_text_weight > 0) or cfg.classify_vocabulary:
        from artsim.text import load_sentence_encoder

        encoder = load_sentence_encoder()
    if cfg.suggest_tags and has_tags:
        visual = recommend_tags(records, vectors, vector_ids, k=10, min_support=2)
        best_first = sorted(visual, key=lambda r: -max((t["score"] for t in r["tags"]), default=0.0))
        listed = [r["object_id"] for r in best_first[:_MAX_SHEETS]]
        if encoder is not None and cfg.tag_text_weight > 0:
            # the text model costs ~5 ms a work on a CPU: the ensemble is computed for the works listed
            out["tags"] = recommend_tags(records, vectors, vector_ids, k=10, min_support=2, text_encoder=encoder,
                                         text_weight=cfg.tag_text_weight, only=set(listed))
        else:
            out["tags"] = [r for r in visual if r["object_id"] in set(listed)]
        try:
            out["tags_evaluation"] = evaluate_tag_signals(
                records, vectors, vector_ids, text_encoder=encoder if cfg.tag_text_weight > 0 else None,
                text_weight=cfg.tag_text_weight, kind=None, max_works=_MAX_TAG_EVALUATION)
        except _Error:  # nothing to hide (e.g. every work has a single tag and none was drawn)
            out["tags_evaluation"] = None
        for rec in out["tags"]:
            out["shown"] |= {rec["object_id"]} | {e["object_id"] for t in rec["tags"] for e in t["evidence"]}
    if cfg.classify_vocabulary:
        from artsim.curate import known_concepts
        from artsim.curate.common import records_by_id

        # Only the works the section lists are classified (the text model costs ~5 ms a work on a CPU); every
        # sampled work's known concepts still vote in the image signal, so those rows come out as if all were run.
        listed = list(records_by_id(records).values())[:_MAX_VOCABULARY_ROWS]
        out["vocabulary"] = classify_vocabulary(listed, text_encoder=encoder, vectors=vectors,
                                                vector_ids=vector_ids, known=known_concepts(records))
        out["shown"] |= {c["object_id"] for c in out["vocabulary"][:_MAX_VOCABULARY_ROWS]}
    out["walks"] = [latent_walk(vectors, vector_ids, a, b, steps=8)
                    for a, b in walk_endpoints(walk_candidates, meta, cfg.latent_walks)]
    out["shown"] |= {step["object_id"] for walk in out["walks"] for step in walk}
    return out


def _curated_html(curated: dict, meta: dict, thumbs: dict) -> list[str]:
    from artsim.report.html import tag_recommendations_html, vocabulary_html, walk_html

    out = []
    if "tags" in curated:
        out.append(tag_recommendations_html(curated["tags"], meta, thumbs,
                                            signals_evaluation=curated.get("tags_evaluation")))
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
    table = host_status_table(hosts) if isinstance(hosts, dict) and hosts else ""
    return (f"<h2>Download</h2>{_img(png)}{table}"
            f"<details><summary>full download report</summary><pre>{html.escape(json.dumps(report, indent=2))}"
            f"</pre></details>")


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    centred = vectors - vectors.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def _cluster_section(clusters: dict, meta, thumbs) -> str:
    blocks = []
    for c, members in enumerate(clusters["members"]):
        if not members:
            continue
        types = _top_values([meta.get(m, {}).get("object_type") for m in members])
        cells = "".join(_card(m, meta, thumbs) for m in members[:_MAX_CLUSTER_MEMBERS])
        blocks.append(f"<h3>cluster {c + 1}: {len(members)} works · {html.escape(types)}</h3>"
                      f"<div class='row'>{cells}</div>")
    return (f"<h2>Clusters (k-means, k={clusters['k']})</h2><p>Members closest to the cluster's centre first. A "
            f"neighbour sheet for a cluster: <code>report.sheets: [\"cluster:N\"]</code>.</p>{''.join(blocks)}")


def _sheets_section(sheets: list, meta, thumbs, is_sample: bool) -> str:
    where = " (farthest works: among the report's sample)" if is_sample else ""
    return ("<h2>Neighbour sheets</h2><p>Each sheet: a work (or a cluster) with its nearest and its farthest works "
            f"in other collections{where}. <a href='sheets.html'>Printable sheets</a>: one page per sheet.</p>"
            "<div class='sheets'>" + "".join(sheet_html(sh, meta, thumbs) for sh in sheets) + "</div>")


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
thead th {{ background: #f4f4f4; }}
.mapwrap {{ display: flex; gap: 12px; align-items: flex-start; }}
#map {{ width: 75%; border: 1px solid #ddd; background: #fcfcfc; }}
#map .pt {{ cursor: pointer; stroke: #fff; stroke-width: 1; }} #map .pt:hover, #map .pt.pinned {{ stroke: #000;
  stroke-width: 2.5; }}
.mapinfo {{ width: 22%; min-height: 200px; font-size: 13px; border: 1px solid #eee; padding: 8px; }}
.mapinfo img {{ max-width: 100%; }} .info-title {{ font-weight: bold; }} .info-id {{ color: #888; }}
.mapctl {{ margin: 0.5em 0; }} .key {{ margin-left: 1em; font-size: 12px; }}
.pair {{ border: 1px solid #eee; padding: 4px; }} .wide {{ overflow-x: auto; max-width: 100%; }}
table.completeness {{ font-size: 12px; }}
.sheet-page {{ border-bottom: 1px solid #ddd; padding: 8px 0; }} h4 {{ margin: 6px 0 2px; }}
{print_css}
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
