"""Index benchmark: artsim's index stage vs autofaiss on the same vectors, and conditional queries vs filtered
brute force (MosAIC's speed test).

    .venv/bin/python benchmarks/bench_index.py --n 1000000 --dim 256            # everything
    .venv/bin/python benchmarks/bench_index.py --n 200000 --skip-autofaiss      # artsim only

autofaiss runs in its own virtual environment (never in the project's requirements):
    python3.11 -m venv benchmarks/.venv-autofaiss
    benchmarks/.venv-autofaiss/bin/pip install autofaiss==2.18.0 pyarrow==17.0.0   # its numpy 1.x needs pyarrow < 18

Steps (each build runs in its own process, whose process tree's memory is sampled from /proc: the sum of PSS, so
pages shared between Ray workers and the object store are counted once):
1. prepare: N clustered unit vectors (+ 1000 fresh queries and their exact top-10), written as .npy for autofaiss
   and as an artsim run directory (embeddings/bench/ Parquet + records/ whose date_begin is uniform in 0..99999, so
   ``date_begin < X`` selects exactly X/100000 of the works);
2. artsim: `run_index` on a local Ray (2 CPUs); then recall@10 and queries/s of the served index;
3. autofaiss: `build_index` with the same memory budget and metric, with its recommended search parameters;
4. conditional: for subsets of 0.1%, 1%, 10% and 50%, one query at a time through `ShardedIndex.search(where=...)`
   vs numpy brute force over the filtered vectors, with recall@10 of the index's filtered answers against the
   exact filtered answers. The brute force caches its filtered subset once per filter (as artsim caches its
   subset; both cold costs are shown). Where artsim takes the IVF path, its whole recall / time curve is measured
   (nprobe doubled up to every list probed, or until three doublings gain nothing) and the speed-up is also quoted
   at the first point reaching --match-recall (0.99) or, where that is out of reach because the SQ8 codes cap what
   any search of them finds, the curve's best recall less --match-tolerance (0.01).

Generated data and results go to benchmarks/out/ (ignored by git).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
FRACTIONS = (0.001, 0.01, 0.1, 0.5)
DATE_SPAN = 100_000


# -- measuring ----------------------------------------------------------------------------------------------------
def _tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], timeout: float) -> tuple[dict, float]:
    """Run ``cmd``; return (its last stdout line as JSON, peak PSS of its process tree in GiB)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, cwd=REPO)
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], sum(_pss_bytes(p) for p in _tree_pids(proc.pid)))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        stop.set()
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed with exit status {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), peak[0] / 1024 ** 3


# -- step 1 ------------------------------------------------------------------------------------------------------
def prepare(data: str, n: int, dim: int, seed: int) -> None:
    from artsim.config import config_from_dict
    from artsim.testing.index_data import clustered_vectors, embeddings_table
    from artsim.serving.topk import exact_topk
    from artsim.runtime import RunContext
    from artsim.rundir.schema import empty_record, records_table

    marker = os.path.join(data, f"ready-{n}-{dim}-{seed}")
    if os.path.exists(marker):
        print(f"prepare: reusing {data}", flush=True)
        return
    os.makedirs(data, exist_ok=True)
    t = time.perf_counter()
    all_vectors = clustered_vectors(n + 1000, dim, n_clusters=max(100, n // 1000), spread=0.6, seed=seed)
    vectors, queries = all_vectors[:n], np.ascontiguousarray(all_vectors[n:])
    np.save(os.path.join(data, "vectors.npy"), vectors)
    np.save(os.path.join(data, "queries.npy"), queries)
    _, truth = exact_topk(queries, vectors, np.arange(n), 10)
    np.save(os.path.join(data, "truth_ids.npy"), truth)
    date_begin = np.random.default_rng(seed + 1).integers(0, DATE_SPAN, n).astype(np.int32)
    np.save(os.path.join(data, "date_begin.npy"), date_begin)
    object_ids = [f"c{i % 4}:{i}" for i in range(n)]
    ctx = RunContext(config_from_dict({"run": {"root": os.path.join(data, "run")}}))
    ctx.storage.write_table(embeddings_table(object_ids, vectors, "bench"), ctx.paths.embeddings("bench"),
                            rows_per_file=250_000)
    rows = []
    for i, object_id in enumerate(object_ids):
        r = empty_record()
        r.update(object_id=object_id, collection=object_id.split(":")[0], date_begin=int(date_begin[i]))
        rows.append(r)
    ctx.storage.write_table(records_table(rows), ctx.paths.records)
    open(marker, "w").close()
    print(f"prepare: {n} x {dim} vectors, queries and truth in {time.perf_counter() - t:.0f} s", flush=True)


# -- step 2 (own process) -----------------------------------------------------------------------------------------
def artsim_build(data: str, budget_gb: float, mode: str, shards: int) -> None:
    import ray

    from artsim.config import config_from_dict
    from artsim.index.stage import run_index
    from artsim.runtime import RunContext
    from artsim.serving import ShardedIndex

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    index_cfg = {"embeddings": "bench", "name": "bench", "num_shards": shards, "memory_budget_gb": budget_gb,
                 "facets": ["collection"], "metadata": ["date_begin"]}
    if mode == "ivf":
        index_cfg["exact_max_vectors"] = 1  # the >1M production path, whatever N is
    ctx = RunContext(config_from_dict({"run": {"root": os.path.join(data, "run")}, "index": index_cfg}))
    t = time.perf_counter()
    summary = run_index(ctx)
    build_seconds = time.perf_counter() - t
    ray.shutdown()
    index = ShardedIndex.open(summary["index_uri"])
    queries = np.load(os.path.join(data, "queries.npy"))
    truth = np.load(os.path.join(data, "truth_ids.npy"))
    index.search_arrays(queries[:10], 10)
    t0 = time.perf_counter()
    _, found = index.search_arrays(queries, 10)
    batch_seconds = time.perf_counter() - t0
    singles = []
    for q in queries[:200]:
        t1 = time.perf_counter()
        index.search_arrays(q[None, :], 10)
        singles.append(time.perf_counter() - t1)
    from artsim.serving.topk import recall_at_k

    m = index.manifest
    print(json.dumps({"tool": "artsim", "index_key": m["factory"], "index_param": m["search_params"],
                      "build_seconds": round(build_seconds, 1), "stage_seconds": m["build"],
                      "recall_at_10": round(recall_at_k(found, truth, 10), 4),
                      "tuned_recall_at_10": m["recall_at_10"],
                      "qps_batch": round(len(queries) / batch_seconds, 1),
                      "p50_ms_single": round(1000 * float(np.median(singles)), 3),
                      "index_bytes": sum(s["bytes"] for s in m["shards"]), "shards": len(m["shards"])}))


# -- step 4 (own process) -----------------------------------------------------------------------------------------
def conditional(data: str, n_queries: int, match_recall: float = 0.99, match_tolerance: float = 0.01) -> None:
    """Filtered queries, artsim vs brute force, on equal terms: the brute force caches its subset (mask, ids and a
    contiguous copy of the vectors) once per filter, as artsim caches its subset, and both cold costs are reported;
    artsim is measured at its tuned parameters and again with nprobe raised until its recall@10 reaches
    ``match_recall`` (brute force is exact), so the speed-up is also quoted at (nearly) the same recall."""
    from artsim.serving.topk import recall_at_k
    from artsim.serving import ShardedIndex

    index = ShardedIndex.open(os.path.join(data, "run", "index", "bench"))
    vectors = np.load(os.path.join(data, "vectors.npy"))
    date_begin = np.load(os.path.join(data, "date_begin.npy"))
    queries = np.load(os.path.join(data, "queries.npy"))[:n_queries]
    ids = np.arange(len(vectors))  # artsim assigned ids 0..N-1 in input order on a fresh build
    tuned = dict(index.params)

    def run_artsim(where):
        found, times = [], []
        for q in queries:
            t1 = time.perf_counter()
            _, hit = index.search_arrays(q[None, :], 10, where=where)
            times.append(time.perf_counter() - t1)
            found.append(hit[0])
        return np.array(found), float(np.mean(times))

    results = []
    for fraction in FRACTIONS:
        limit = int(fraction * DATE_SPAN)
        where = {"date_begin": {"<": limit}}
        index.params = dict(tuned)
        index._subsets.clear()  # cold: the first query pays for evaluating the filter
        t0 = time.perf_counter()
        index.search_arrays(queries[:1], 10, where=where)
        cold_ms = 1000 * (time.perf_counter() - t0)
        found, t_index = run_artsim(where)

        t0 = time.perf_counter()  # the baseline's cold cost: filter, gather once (what artsim's cache does)
        mask = date_begin < limit
        sub_ids = ids[mask]
        sub_vectors = np.ascontiguousarray(vectors[mask])
        brute_cold_ms = 1000 * (time.perf_counter() - t0)
        truth, t_brute = [], []
        for q in queries:
            t1 = time.perf_counter()
            scores = sub_vectors @ q
            top = np.argpartition(-scores, 9)[:10]
            truth.append(sub_ids[top[np.argsort(-scores[top])]])
            t_brute.append(time.perf_counter() - t1)
        truth = np.array(truth)
        brute = float(np.mean(t_brute))
        recall = recall_at_k(found, truth, 10)
        subset = index._subset(where)
        path = "exact subset" if subset.vectors is not None else "IDSelector + raised nprobe"
        matched = {"nprobe": tuned.get("nprobe"), "recall_at_10": recall, "ms": t_index}
        ladder = [dict(matched, effective_nprobe=index._filtered_params(subset.fraction).get("nprobe"))] \
            if subset.vectors is None and "nprobe" in tuned else []
        if subset.vectors is None and "nprobe" in tuned:
            # the whole recall / time curve of the filtered IVF search, up to every list probed (where SQ8 codes,
            # not nprobe, cap the recall): the speed-up at "the same recall" is read off it
            nprobe = int(tuned["nprobe"])
            while nprobe < index.shards.nlist:
                nprobe = min(index.shards.nlist, nprobe * 2)
                index.params = dict(tuned, nprobe=nprobe)
                f2, t2 = run_artsim(where)
                ladder.append({"nprobe": nprobe, "effective_nprobe": index._filtered_params(subset.fraction)["nprobe"],
                               "recall_at_10": recall_at_k(f2, truth, 10), "ms": t2})
                if index._filtered_params(subset.fraction)["nprobe"] >= index.shards.nlist:
                    break
                if len(ladder) > 3 and ladder[-1]["recall_at_10"] <= ladder[-4]["recall_at_10"]:
                    break  # three doublings without a gain: the codes' plateau
            # "the same recall": match_recall, or what this index's codes can reach at all (exact brute force is
            # 1.0; SQ8 codes cap every search of them), less a tolerance of ``match_tolerance``
            target = min(match_recall, max(p["recall_at_10"] for p in ladder) - match_tolerance)
            reaching = [p for p in ladder if p["recall_at_10"] >= target]
            matched = reaching[0] if reaching else max(ladder, key=lambda p: (p["recall_at_10"], -p["ms"]))
        results.append({
            "fraction": fraction, "subset_size": int(mask.sum()), "path": path,
            "index_ms": round(1000 * t_index, 3), "index_cold_ms": round(cold_ms, 1),
            "brute_force_ms": round(1000 * brute, 3), "brute_force_cold_ms": round(brute_cold_ms, 1),
            "speedup": round(brute / t_index, 1), "recall_at_10": round(recall, 4),
            "matched_nprobe": matched["nprobe"], "matched_recall_at_10": round(matched["recall_at_10"], 4),
            "matched_index_ms": round(1000 * matched["ms"], 3),
            "matched_speedup": round(brute / matched["ms"], 1),
            "ladder": [{"nprobe": p["nprobe"], "effective_nprobe": p["effective_nprobe"],
                        "recall_at_10": round(p["recall_at_10"], 4), "ms": round(1000 * p["ms"], 3),
                        "speedup": round(brute / p["ms"], 1)} for p in ladder]})
    index.params = tuned
    print(json.dumps({"conditional": results, "match_recall": match_recall, "match_tolerance": match_tolerance}))


# -- orchestration ------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", nargs="?", default="all", choices=["all", "artsim-build", "conditional"])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--budget-gb", type=float, default=4.0)
    p.add_argument("--mode", choices=["ivf", "auto"], default="ivf",
                   help="ivf: force the IVF path (what N > 1M gets); auto: artsim's own choice for this N")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--queries", type=int, default=100, help="queries per subset in the conditional test")
    p.add_argument("--match-recall", type=float, default=0.99,
                   help="conditional test: also measure artsim at the nprobe reaching this recall@10")
    p.add_argument("--match-tolerance", type=float, default=0.01,
                   help="conditional test: where --match-recall is out of reach, match the best recall less this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "out", "index"))
    p.add_argument("--skip-autofaiss", action="store_true")
    p.add_argument("--data", default=None, help="(internal) prepared data directory")
    args = p.parse_args()
    data = args.data or os.path.join(args.out, f"data-{args.n}x{args.dim}")
    if args.step == "artsim-build":
        return artsim_build(data, args.budget_gb, args.mode, args.shards)
    if args.step == "conditional":
        return conditional(data, args.queries, args.match_recall, args.match_tolerance)

    prepare(data, args.n, args.dim, args.seed)
    me = [sys.executable, os.path.abspath(__file__), "--data", data]
    import shutil

    shutil.rmtree(os.path.join(data, "run", "index"), ignore_errors=True)  # fresh ids: 0..N-1 in input order
    print("artsim: building ...", flush=True)
    ours, ours_mem = run_measured(me + ["artsim-build", "--budget-gb", str(args.budget_gb), "--mode", args.mode,
                                        "--shards", str(args.shards)], timeout=3 * 3600)
    ours["peak_pss_gib"] = round(ours_mem, 2)
    report = {"n": args.n, "dim": args.dim, "budget_gb": args.budget_gb, "cpus": os.cpu_count(), "artsim": ours}
    venv = os.path.join(REPO, "benchmarks", ".venv-autofaiss", "bin", "python")
    if not args.skip_autofaiss:
        if not os.path.exists(venv):
            raise SystemExit(f"{venv} missing; see this file's docstring, or pass --skip-autofaiss")
        print("autofaiss: building ...", flush=True)
        theirs, theirs_mem = run_measured([venv, os.path.join(REPO, "benchmarks", "index_autofaiss_build.py"), data,
                                           os.path.join(data, "autofaiss"), str(args.budget_gb)], timeout=3 * 3600)
        theirs["peak_pss_gib"] = round(theirs_mem, 2)
        report["autofaiss"] = theirs
    print("conditional queries ...", flush=True)
    cond, _ = run_measured(me + ["conditional", "--queries", str(args.queries), "--match-recall",
                                 str(args.match_recall), "--match-tolerance", str(args.match_tolerance)],
                           timeout=3600)
    report.update(cond)
    os.makedirs(args.out, exist_ok=True)
    out_file = os.path.join(args.out, f"results-{args.n}x{args.dim}-{args.mode}.json")
    with open(out_file, "w") as f:
        json.dump(report, f, indent=2)
    print_report(report)
    print(f"results: {out_file}")


def print_report(r: dict) -> None:
    from artsim.console import table

    print(f"\n{r['n']} x {r['dim']} vectors, memory budget {r['budget_gb']} GiB, {r['cpus']} CPUs")
    tools = [t for t in ("artsim", "autofaiss") if t in r]
    table(["tool", "index", "params", "build s", "peak GiB", "recall@10", "queries/s (batch)", "p50 ms (1 query)",
           "index MB"],
          [[t, r[t]["index_key"], r[t]["index_param"], r[t]["build_seconds"], r[t]["peak_pss_gib"],
            r[t]["recall_at_10"], r[t]["qps_batch"], r[t]["p50_ms_single"], round(r[t]["index_bytes"] / 1e6)]
           for t in tools])
    if len(tools) == 2:
        a, b = r["artsim"], r["autofaiss"]
        print(f"ratios artsim/autofaiss: build time {a['build_seconds'] / b['build_seconds']:.2f}x, peak memory "
              f"{a['peak_pss_gib'] / max(b['peak_pss_gib'], 1e-9):.2f}x, recall@10 "
              f"{a['recall_at_10'] / max(b['recall_at_10'], 1e-9):.3f}x, queries/s "
              f"{a['qps_batch'] / b['qps_batch']:.2f}x, single-query p50 {a['p50_ms_single'] / b['p50_ms_single']:.2f}x")
    table(["subset", "works", "artsim path", "artsim ms", "cold ms", "brute force ms (cached subset)",
           "brute cold ms", "speedup", "recall@10", "nprobe at matched recall", "recall", "ms", "speedup"],
          [[f"{c['fraction'] * 100:g}%", c["subset_size"], c["path"], c["index_ms"], c["index_cold_ms"],
            c["brute_force_ms"], c["brute_force_cold_ms"], f"{c['speedup']}x", c["recall_at_10"],
            c["matched_nprobe"], c["matched_recall_at_10"], c["matched_index_ms"], f"{c['matched_speedup']}x"]
           for c in r["conditional"]])
    for c in r["conditional"]:
        if c.get("ladder"):
            print(f"{c['fraction'] * 100:g}% subset, filtered IVF search, recall@10 / ms / speed-up vs the cached brute "
                  "force by base nprobe (effective nprobe): " + "; ".join(
                      f"{p['nprobe']} ({p['effective_nprobe']}): {p['recall_at_10']} / {p['ms']} / {p['speedup']}x"
                      for p in c["ladder"]))


if __name__ == "__main__":
    main()
