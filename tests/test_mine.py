"""The mine stage: every strategy's rules, quotas and de-duplication, the report, and the stage on real storage."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from artsim.config import MineConfig, config_from_dict
from artsim.errors import ArtsimError, ConfigError
from artsim.runtime import RunContext
from artsim.rundir.schema import empty_record, records_table
from artsim.mine.corpus import corpus_from_records, normalise_term
from artsim.mine.stage import MiningInputs, allocate, mine_triplets, parse_annotations_csv, run_mine
from artsim.mine.strategies import (
    mine_annotations, mine_hard_negatives, mine_same_creator, mine_shared_terms, mine_text,
    negative_without_term,
)
from artsim.testing.synthetic import SyntheticSpec, synthetic_records


def record(oid, subjects=(), concepts=(), creator=None, object_type=None, medium=None, title=None, **extra):
    r = empty_record()
    r.update(object_id=oid, collection=oid.split(":")[0], local_id=oid.split(":")[1], subjects=list(subjects),
             concepts=list(concepts), creator=creator, object_type=object_type, medium=medium, title=title, **extra)
    return r


@pytest.fixture(scope="module")
def synth_corpus():
    return corpus_from_records(synthetic_records(SyntheticSpec(n=300, seed=1, n_creators=6, n_subjects=5)))


def terms_of(corpus, i, field):
    return {corpus.terms[t].key for t in corpus.object_terms[i] if corpus.terms[t].field == field}


FIELD_OF_REASON = {"subject": "subjects", "concept": "concepts", "object type": "object_type", "medium": "medium"}


def check_shared_term_triplet(corpus, index, t):
    """The positive carries the term named in the reason, the anchor too, the negative does not."""
    assert t.reason.startswith("shared ")
    kind, label = t.reason[len("shared "):].split(": ", 1)
    label = label.split("; hard negative")[0]
    field = FIELD_OF_REASON[kind]
    key = normalise_term(label)
    a, p, n = index[t.anchor_id], index[t.positive_id], index[t.negative_id]
    assert len({a, p, n}) == 3
    assert key in terms_of(corpus, a, field) and key in terms_of(corpus, p, field)
    assert key not in terms_of(corpus, n, field), f"negative shares the positive criterion: {t}"


def test_shared_terms_rules_hold(synth_corpus):
    rng = np.random.default_rng(0)
    triplets = mine_shared_terms(synth_corpus, 2000, rng)
    assert len(triplets) == 2000
    assert len({t.key for t in triplets}) == 2000
    index = synth_corpus.index_of()
    for t in triplets:
        check_shared_term_triplet(synth_corpus, index, t)
    fields = Counter(t.reason.split(":")[0] for t in triplets)
    assert {"shared subject", "shared concept", "shared object type", "shared medium"} <= set(fields)


def test_shared_terms_prefers_negatives_without_any_common_term_of_the_field():
    # a1 and a2 share "horse"; a1 also shows "rider", like 20 of the 21 objects without a horse. A negative for
    # "horse" should avoid "rider" too: the one object with neither is preferred far beyond its 1-in-21 share.
    recs = [record("c:a1", ["horse", "rider"]), record("c:a2", ["horse"]), record("c:clean", ["ship"])]
    recs += [record(f"c:r{i}", ["rider", "ship"]) for i in range(20)]
    corpus = corpus_from_records(recs, ["subjects"])
    horse = next(i for i, t in enumerate(corpus.terms) if t.key == "horse")
    rng = np.random.default_rng(1)
    negatives = [negative_without_term(corpus, 0, horse, rng) for _ in range(200)]
    assert all(corpus.object_ids[n] not in ("c:a1", "c:a2") for n in negatives)  # the rule: never
    assert negatives.count(2) / len(negatives) > 0.6  # the preference: c:clean (index 2)


def test_terms_are_normalised_and_field_selection_is_respected():
    recs = [record("c:1", ["Horses "], object_type="Painting"), record("c:2", ["horses"], object_type="painting"),
            record("c:3", ["ships"], object_type="print"), record("c:4", ["boats"], object_type="print")]
    corpus = corpus_from_records(recs, ["subjects"])
    triplets = mine_shared_terms(corpus, 50, np.random.default_rng(0))
    assert triplets and {t.reason for t in triplets} == {"shared subject: Horses"}
    assert {(t.anchor_id, t.positive_id) for t in triplets} <= {("c:1", "c:2"), ("c:2", "c:1")}


def test_same_creator_rules_and_unknown_creators():
    recs = [record(f"c:{i}", creator=c) for i, c in enumerate(
        ["Rembrandt", "rembrandt ", "Vermeer", "Vermeer", "Unknown", "Unknown", "anonymous", None, "Hals"])]
    corpus = corpus_from_records(recs)
    triplets = mine_same_creator(corpus, 500, np.random.default_rng(0))
    creators = {r["object_id"]: (r["creator"] or "").strip().lower() for r in recs}
    assert triplets
    for t in triplets:
        assert creators[t.anchor_id] == creators[t.positive_id]
        assert creators[t.anchor_id] not in ("unknown", "anonymous", "")  # "Unknown" is nobody in particular
        assert creators[t.negative_id] not in ("unknown", "anonymous", "", creators[t.anchor_id])
    # 4 anchor/positive pairs, negatives from the 2 other known creators' 3 works: small, and exhausted cleanly
    assert len(triplets) == len({t.key for t in triplets}) <= 4 * 3
    assert {t.reason for t in triplets} == {"same creator: Rembrandt", "same creator: Vermeer"}


@pytest.fixture(scope="module")
def text_encoder():
    from artsim.text import load_sentence_encoder

    return load_sentence_encoder()


def test_text_strategy_with_the_offline_sentence_model(text_encoder):
    titles = ["A horse and rider", "Horseman on a galloping horse", "Portrait of a horse in a stable",
              "Cavalry horses at rest", "Sailing ship in a storm", "Fishing boats in the harbour",
              "Ships at sea under full sail", "Vase of flowers", "Still life with tulips and roses",
              "Bouquet of flowers in a glass"]
    recs = [record(f"c:{i}", title=t) for i, t in enumerate(titles)]
    corpus = corpus_from_records(recs)
    vectors = text_encoder(corpus.texts)
    assert vectors.shape == (10, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    triplets = mine_text(corpus, 100, np.random.default_rng(0), vectors, neighbours=3, min_similarity=0.3)
    assert len(triplets) >= 10
    index = corpus.index_of()
    theme = {i: (0 if i < 4 else 1 if i < 7 else 2) for i in range(10)}
    same_theme_positives = 0
    for t in triplets:
        a, p, n = index[t.anchor_id], index[t.positive_id], index[t.negative_id]
        assert len({a, p, n}) == 3
        assert float(vectors[a] @ vectors[p]) >= 0.3
        assert float(vectors[a] @ vectors[n]) < 0.3  # the negative is not text-near
        assert t.reason.startswith('similar text: "') and "cosine" in t.reason
        same_theme_positives += theme[a] == theme[p]
        assert theme[a] != theme[n]
    # The model, not chance, decides: positives are almost always from the same theme.
    assert same_theme_positives / len(triplets) > 0.8


def test_annotations_csv_and_rules():
    recs = [record(f"c:{i}") for i in range(12)]
    corpus = corpus_from_records(recs)
    text = ("Anchor,Similar,Dissimilar\n"
            "c:0,c:1|c:2,c:3\n"  # grid: two picked, one rejected -> 2 curated triplets
            "c:4,c:5,\n"  # no negative -> random ones, never c:5 (annotated similar)
            "c:6,c:404,c:7\n"  # unknown id -> skipped and counted
            ",c:1,\n")  # no anchor -> ignored
    rows = parse_annotations_csv(text)
    assert [(r.anchor, r.similar, r.dissimilar) for r in rows] == [
        ("c:0", ["c:1", "c:2"], ["c:3"]), ("c:4", ["c:5"], []), ("c:6", ["c:404"], ["c:7"])]
    triplets, issues = mine_annotations(corpus, rows, 10, np.random.default_rng(0))
    curated = [t.key for t in triplets if t.reason == "curator annotation"]
    assert sorted(curated) == [("c:0", "c:1", "c:3"), ("c:0", "c:2", "c:3")]
    randoms = [t for t in triplets if t.reason == "curator annotation (random negative)"]
    assert len(triplets) == 10 and len(randoms) == 8
    assert all(t.anchor_id == "c:4" and t.positive_id == "c:5" and t.negative_id not in ("c:4", "c:5")
               for t in randoms)
    assert issues["unknown_ids"] == 1 and issues["unknown_examples"] == ["c:404"]
    with pytest.raises(ConfigError, match="'similar' column"):
        parse_annotations_csv("anchor,other\nc:1,c:2\n")


def test_curated_triplets_are_kept_beyond_the_quota():
    corpus = corpus_from_records([record(f"c:{i}") for i in range(6)])
    rows = parse_annotations_csv("anchor,similar,dissimilar\nc:0,c:1|c:2,c:3|c:4|c:5\n")
    triplets, _ = mine_annotations(corpus, rows, 2, np.random.default_rng(0))
    assert len(triplets) == 6  # all 2 x 3 curated triplets, though the quota was 2


def test_hard_negatives_come_from_image_neighbours_and_obey_the_criterion(synth_corpus):
    # Image vectors that follow the creator, not the subject: the nearest images of an anchor are by its creator
    # and mostly show other subjects, which is exactly what a hard negative for "shared subject" is.
    rng = np.random.default_rng(0)
    creators = sorted(synth_corpus.creator_members)
    centres = rng.normal(size=(len(creators), 16))
    vectors = np.stack([centres[creators.index(c)] + 0.1 * rng.normal(size=16) for c in synth_corpus.creators])
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    objects = np.arange(synth_corpus.size)
    triplets = mine_hard_negatives(synth_corpus, 500, np.random.default_rng(1), vectors, objects, k=10,
                                   fields=["subjects"])
    assert len(triplets) == 500
    index = synth_corpus.index_of()
    nearest = (vectors @ vectors.T)
    for t in triplets:
        check_shared_term_triplet(synth_corpus, index, t)
        a, n = index[t.anchor_id], index[t.negative_id]
        rank = int((nearest[a] > nearest[a, n]).sum())  # 1 = the nearest other image (the anchor itself is 0)
        assert rank <= 10
        assert synth_corpus.creators[a] == synth_corpus.creators[n]  # hard: same look, different subject
        assert "hard negative (image cosine" in t.reason


def test_allocate_splits_exactly_by_weight():
    assert allocate(10, {"a": 1, "b": 1, "c": 1}) in ({"a": 4, "b": 3, "c": 3}, {"a": 3, "b": 4, "c": 3},
                                                      {"a": 3, "b": 3, "c": 4})
    assert allocate(10_000, {"a": 3, "b": 1, "z": 0}) == {"a": 7500, "b": 2500, "z": 0}


def test_mine_triplets_meets_the_quota_with_weights_and_no_duplicates(synth_corpus):
    cfg = MineConfig(num_triplets=3000, strategies={"shared_terms": 3, "same_creator": 1})
    result = mine_triplets(synth_corpus, cfg)
    assert len(result.triplets) == 3000 and len({t.key for t in result.triplets}) == 3000
    counts = Counter(t.strategy for t in result.triplets)
    assert counts == {"shared_terms": 2250, "same_creator": 750}
    rep = result.report
    assert rep["complete"] and rep["mined"] == 3000
    assert rep["strategies"]["same_creator"] == {"weight": 1.0, "quota": 750, "mined": 750, "status": "ok"}
    # deterministic in the seed
    again = mine_triplets(synth_corpus, cfg)
    assert [t.key for t in again.triplets] == [t.key for t in result.triplets]


def test_small_collection_mines_what_exists_and_says_so():
    recs = [record("c:1", ["horse"], creator="A"), record("c:2", ["horse"], creator="A"),
            record("c:3", ["ship"], creator="B"), record("c:4", ["ship"], creator="B"), record("c:5", ["tree"])]
    cfg = MineConfig(num_triplets=10_000, strategies={"shared_terms": 1, "same_creator": 1, "text": 1})
    result = mine_triplets(corpus_from_records(recs), cfg)
    rep = result.report
    assert not rep["complete"] and 0 < rep["mined"] < 100 and "mined what exists" in rep["note"]
    assert rep["strategies"]["text"]["status"].startswith("skipped: no text vectors")
    assert rep["strategies"]["shared_terms"]["status"] == "exhausted"
    assert len({t.key for t in result.triplets}) == len(result.triplets)


def test_exhausted_strategy_is_covered_by_the_others(synth_corpus):
    # same_creator alone could give far more than 10; but a corpus with 2 creators' pairs cannot: shared terms
    # must fill the gap.
    recs = [record("c:1", creator="A"), record("c:2", creator="A"), record("c:3", creator="B")]
    recs += [record(f"c:x{i}", [f"s{i % 5}"]) for i in range(60)]
    cfg = MineConfig(num_triplets=1000, strategies={"shared_terms": 1, "same_creator": 1})
    result = mine_triplets(corpus_from_records(recs), cfg)
    rep = result.report
    assert rep["strategies"]["same_creator"]["status"] == "exhausted"
    assert rep["strategies"]["same_creator"]["mined"] == 2  # (1,2,3) and (2,1,3)
    assert rep["mined"] == 1000 and rep["strategies"]["shared_terms"]["mined"] == 998


def test_same_collection_keeps_triplets_inside_one_collection(synth_corpus):
    cfg = MineConfig(num_triplets=1000, strategies={"shared_terms": 1, "same_creator": 1}, same_collection=True)
    result = mine_triplets(synth_corpus, cfg)
    assert len(result.triplets) == 1000
    for t in result.triplets:
        assert len({x.split(":")[0] for x in t.key}) == 1
    mixed = mine_triplets(synth_corpus, MineConfig(num_triplets=1000, strategies={"shared_terms": 1}))
    assert any(len({x.split(":")[0] for x in t.key}) > 1 for t in mixed.triplets)  # the constraint did something


def test_config_rejects_unknown_strategies_and_fields():
    with pytest.raises(ConfigError, match="mine.strategies.colour"):
        config_from_dict({"mine": {"strategies": {"colour": 1}}})
    with pytest.raises(ConfigError, match="mine.term_fields.0"):
        config_from_dict({"mine": {"term_fields": ["creator"]}})
    with pytest.raises(ConfigError, match="mine.strategies"):
        config_from_dict({"mine": {"strategies": {"text": 0}}})


def _ctx(root, **mine):
    return RunContext(config_from_dict({"run": {"root": str(root)}, "mine": mine}))


def test_run_mine_writes_triplets_and_report(tmp_path, capsys):
    recs = synthetic_records(SyntheticSpec(n=120, seed=3))
    ctx = _ctx(tmp_path, num_triplets=500, strategies={"shared_terms": 1, "text": 1, "hard_negatives": 1},
               annotations=str(tmp_path / "ann.csv"))
    (tmp_path / "ann.csv").write_text("anchor,similar\n")  # annotations are configured but not weighted: unused
    ctx.storage.write_table(records_table(recs), ctx.paths.records)
    summary = run_mine(ctx)
    assert summary["triplets"] == 500 and summary["complete"]
    tab = ctx.storage.read_table(ctx.paths.triplets)
    assert tab.num_rows == 500
    assert tab.column_names == ["anchor_id", "positive_id", "negative_id", "reason", "strategy"]
    report = json.loads((tmp_path / "triplets" / "_report.json").read_text())
    assert report["strategies"]["hard_negatives"]["status"].startswith("skipped: no image embeddings")
    assert report["strategies"]["text"]["mined"] == 250 and report["strategies"]["shared_terms"]["mined"] == 250
    out = capsys.readouterr().out
    assert "strategy" in out and "hard_negatives" in out and "wrote 500 triplets" in out


def test_run_mine_on_s3_with_annotations_and_hard_negatives(s3_endpoint):
    import pyarrow as pa

    root = f"s3://artsim-test/mine-{np.random.default_rng().integers(1 << 30)}"
    ctx = RunContext(config_from_dict({
        "run": {"root": root}, "storage": {"s3_endpoint_url": s3_endpoint},
        "embed": {"model": "resnet18"},
        "mine": {"num_triplets": 300, "annotations": f"{root}/ann.csv",
                 "strategies": {"annotations": 1, "hard_negatives": 2}}}))
    recs = synthetic_records(SyntheticSpec(n=80, seed=4))
    ctx.storage.write_table(records_table(recs), ctx.paths.records)
    ids = [r["object_id"] for r in recs]
    # one curated triplet, and one pair without a negative: at most 78 random negatives exist for it
    ctx.storage.write_text(f"{root}/ann.csv", f"anchor,similar,dissimilar\n{ids[0]},{ids[1]},{ids[2]}\n"
                                              f"{ids[3]},{ids[9]},\nmet:404,{ids[1]},\n")
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(80, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    from artsim.rundir.names import model_key

    emb = pa.table({"object_id": [r["object_id"] for r in recs],
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 8),
                    "model": ["resnet18"] * 80})
    ctx.storage.write_table(emb, ctx.paths.embeddings(model_key(ctx.config.embed)))
    summary = run_mine(ctx)
    assert summary["triplets"] == 300
    tab = ctx.storage.read_table(ctx.paths.triplets).to_pylist()
    strategies = Counter(r["strategy"] for r in tab)
    # annotations ran dry at 1 + 78; hard negatives made up the difference
    assert strategies["annotations"] == 79 and strategies["hard_negatives"] == 221
    assert (ids[0], ids[1], ids[2]) in {
        (r["anchor_id"], r["positive_id"], r["negative_id"]) for r in tab if r["reason"] == "curator annotation"}
    report = ctx.storage.read_json(f"{ctx.paths.triplets}/_report.json")
    assert report["complete"] and report["issues"]["annotations"]["unknown_examples"] == ["met:404"]


def test_run_mine_bad_inputs_are_clear_errors(tmp_path):
    ctx = _ctx(tmp_path, annotations=str(tmp_path / "missing.csv"), strategies={"annotations": 1})
    with pytest.raises(ArtsimError, match="records"):
        run_mine(ctx)  # no records/ yet
    ctx.storage.write_table(records_table([record(f"c:{i}") for i in range(5)]), ctx.paths.records)
    with pytest.raises(ConfigError, match="mine.annotations: .*missing.csv: file not found"):
        run_mine(ctx)


def test_cli_bad_mine_config_exits_2(tmp_path, capsys):
    from artsim.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{root: {tmp_path}}}\n")
    assert main(["mine", "-c", str(cfg), "--set", "mine.strategies={colour: 1}"]) == 2
    assert "mine.strategies.colour: unknown strategy" in capsys.readouterr().err
    assert main(["train", "-c", str(cfg), "--set", "train.margin=3"]) == 2
    assert "train.margin" in capsys.readouterr().err


def test_same_collection_annotations_are_split_and_counted_once():
    recs = [record(f"a:{i}") for i in range(6)] + [record(f"b:{i}") for i in range(6)]
    rows = parse_annotations_csv("anchor,similar,dissimilar\na:0,a:1|b:1,a:2\nb:0,b:1,a:3\nx:9,a:1,\n")
    cfg = MineConfig(num_triplets=20, strategies={"annotations": 1}, same_collection=True)
    result = mine_triplets(corpus_from_records(recs), cfg, MiningInputs(annotations=rows))
    for t in result.triplets:
        assert len({x.split(":")[0] for x in t.key}) == 1
    assert ("a:0", "a:1", "a:2") in {t.key for t in result.triplets}
    issues = result.report["issues"]["annotations"]
    assert issues["unknown_ids"] == 1 and issues["cross_collection_ids"] == 2  # b:1 for a:0, a:3 for b:0


# -- the mining pool: a bounded, deterministic, stratified sample of a large records/ -------------------------------

def _write_records(ctx, recs, files=3):
    from artsim.storage import join

    tab = records_table(recs)
    per = -(-tab.num_rows // files)
    with ctx.storage.atomic_dir(ctx.paths.records) as staging:
        for i in range(files):
            ctx.storage.write_parquet_file(tab.slice(i * per, per), join(staging, f"part-{i:05d}.parquet"))


def _uneven_records(n):
    """n records in 3 collections of very different size (a: ~90%, b: ~10%, c: 7 works)."""
    recs = synthetic_records(SyntheticSpec(n=n, seed=11, n_collections=2, n_subjects=8))
    for i, r in enumerate(recs[:7]):
        r.update(object_id=f"c:{i}", collection="c")
    for r in recs[7:]:
        big = r["collection"] == "synth_a" or int(r["local_id"]) % 4  # fewer b's than a's
        r.update(collection="a" if big else "b", object_id=f"{'a' if big else 'b'}:{r['local_id']}")
    return recs


def test_pool_is_deterministic_stratified_and_adds_annotated_objects(tmp_path):
    from artsim.mine.corpus import read_pool

    recs = _uneven_records(3_000)
    sizes = Counter(r["collection"] for r in recs)
    ctx = _ctx(tmp_path)
    _write_records(ctx, recs)
    annotated = {recs[-1]["object_id"], recs[-2]["object_id"], "zzz:404"}
    corpus, info = read_pool(ctx.storage, ctx.paths.records, 600, seed=5, always=annotated)
    assert info.sampled and info.records == 3_000 and info.line == f"pool: {corpus.size} of 3000 records " \
                                                                    "(sampled per collection)"
    in_pool = set(corpus.object_ids)
    plain, plain_info = read_pool(ctx.storage, ctx.paths.records, 600, seed=5)
    sampled = set(plain.object_ids)
    assert len(sampled) == 600 and plain_info.annotated_added == 0
    # annotated objects join whatever their hash (unknown ids are ignored); the sample itself does not change
    assert in_pool == sampled | {recs[-1]["object_id"], recs[-2]["object_id"]}
    assert corpus.size == 600 + info.annotated_added and info.annotated_added == len(in_pool - sampled)
    per_collection = Counter(o.split(":")[0] for o in sampled)
    assert per_collection == info.quotas and per_collection["c"] == 7  # every collection; the tiny one whole
    assert per_collection["a"] > 3 * per_collection["b"] and sizes["a"] > 6 * sizes["b"]  # larger keeps more
    # only the pool's rows were read beyond ids and collections
    assert info.rows_read == corpus.size
    # deterministic in the seed, whatever the file layout; another seed picks another pool
    _write_records(ctx, list(reversed(recs)), files=5)
    again, _ = read_pool(ctx.storage, ctx.paths.records, 600, seed=5, always=annotated)
    assert set(again.object_ids) == in_pool
    other, other_info = read_pool(ctx.storage, ctx.paths.records, 600, seed=6, always=annotated)
    assert set(other.object_ids) != in_pool and other.size == 600 + other_info.annotated_added
    # the pool is the quota's smallest salted hashes of each collection
    from artsim.rundir.sample import stable_hashes

    a_ids = sorted((r["object_id"] for r in recs if r["collection"] == "a"))
    ranked = np.array(a_ids)[np.argsort(stable_hashes(a_ids, 5), kind="stable")]
    assert set(ranked[:info.quotas["a"]]) == {o for o in sampled if o.startswith("a:")}


def test_pool_below_max_objects_is_every_record(tmp_path):
    from artsim.mine.corpus import read_pool

    recs = _uneven_records(500)
    ctx = _ctx(tmp_path)
    _write_records(ctx, recs)
    corpus, info = read_pool(ctx.storage, ctx.paths.records, 500, seed=0)
    assert not info.sampled and corpus.object_ids == [r["object_id"] for r in recs]  # same order as before
    assert info.line == "pool: 500 of 500 records (all of them)"
    assert corpus.texts == corpus_from_records(recs).texts


def test_run_mine_on_a_large_records_mines_only_inside_the_pool(tmp_path, capsys):
    recs = _uneven_records(4_000)
    ids = [r["object_id"] for r in recs]
    outside = ids[-1]  # annotated below: kept even if the sample leaves it out
    ctx = _ctx(tmp_path, num_triplets=1_500, max_objects=400, same_collection=True,
               strategies={"shared_terms": 2, "same_creator": 1, "annotations": 1},
               annotations=str(tmp_path / "ann.csv"))
    (tmp_path / "ann.csv").write_text(f"anchor,similar,dissimilar\n{outside},{ids[-5]},{ids[-9]}\n")
    _write_records(ctx, recs)
    summary = run_mine(ctx)
    pool = summary["pool"]
    assert pool["sampled"] and pool["records"] == 4_000 and pool["rows_read"] == pool["objects"] <= 403
    from artsim.mine.corpus import read_pool

    corpus, _ = read_pool(ctx.storage, ctx.paths.records, 400, seed=0, always={outside, ids[-5], ids[-9]})
    in_pool = set(corpus.object_ids)
    tab = ctx.storage.read_table(ctx.paths.triplets).to_pylist()
    assert len(tab) >= 1_500
    assert all({t["anchor_id"], t["positive_id"], t["negative_id"]} <= in_pool for t in tab)
    assert (outside, ids[-5], ids[-9]) in {(t["anchor_id"], t["positive_id"], t["negative_id"]) for t in tab}
    assert {t["anchor_id"].split(":")[0] for t in tab} == {"a", "b", "c"}  # every collection mined
    assert all(len({x.split(":")[0] for x in (t["anchor_id"], t["positive_id"], t["negative_id"])}) == 1
               for t in tab)
    report = json.loads((tmp_path / "triplets" / "_report.json").read_text())
    assert report["pool"]["line"] == f"pool: {pool['objects']} of 4000 records (sampled per collection)"
    assert f"pool: {pool['objects']} of 4000 records (sampled per collection)" in capsys.readouterr().out


MEMORY_CHILD = r"""
import json, os, sys, tracemalloc
import pyarrow as pa
from artsim.config import config_from_dict
from artsim.runtime import RunContext
root, mode = sys.argv[1:3]
ctx = RunContext(config_from_dict({"run": {"root": root}, "mine": {
    "num_triplets": 2000, "max_objects": 1000, "strategies": {"shared_terms": 1}}}))
from artsim.mine.stage import run_mine
if mode == "run_mine":
    run_mine(ctx)  # warm-up: the modules the stage imports lazily are not what is measured
proxy = pa.proxy_memory_pool(pa.default_memory_pool())
pa.set_memory_pool(proxy)  # counts what Arrow allocates from here on (Parquet reads included)
tracemalloc.start()  # numpy reports its buffers to tracemalloc; Python objects are traced anyway
if mode == "run_mine":
    out = run_mine(ctx)["pool"]["objects"]
else:  # the whole table as Python dicts, as the mine stage read records/ before the pool
    out = len(ctx.storage.read_table(ctx.paths.records).to_pylist())
print("RESULT " + json.dumps({"objects": out, "traced_peak": tracemalloc.get_traced_memory()[1],
                              "arrow_peak": proxy.max_memory()}), flush=True)
os._exit(0)  # skip teardown: Arrow buffers may outlive the proxy pool
"""


def test_mine_driver_memory_follows_the_pool_not_records(tmp_path):
    import os
    import subprocess
    import sys

    import pyarrow as pa

    from artsim.rundir.schema import RECORDS_SCHEMA
    from artsim.storage import join

    n, files = 80_000, 4
    rng = np.random.default_rng(0)
    ctx = _ctx(tmp_path)
    per = n // files
    with ctx.storage.atomic_dir(ctx.paths.records) as staging:
        for f in range(files):
            lo = f * per
            cols = {"object_id": pa.array([f"{'ab'[i % 2]}:{i}" for i in range(lo, lo + per)]),
                    "collection": pa.array(["ab"[i % 2] for i in range(lo, lo + per)]),
                    "title": pa.array([f"Work {i}" for i in range(lo, lo + per)]),
                    "subjects": pa.array([[f"s{int(x)}"] for x in rng.integers(0, 50, per)]),
                    # a long description per work: 80,000 x 1 kB = 80 MB of text that the pool never holds
                    "description": pa.array(["lorem ipsum dolor sit amet " * 37] * per)}
            tab = pa.table([cols[fl.name] if fl.name in cols else pa.nulls(per, fl.type) for fl in RECORDS_SCHEMA],
                           schema=RECORDS_SCHEMA)
            ctx.storage.write_parquet_file(tab, join(staging, f"part-{f:05d}.parquet"))
    text_bytes = n * len("lorem ipsum dolor sit amet " * 37)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def peaks(mode):
        proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path), mode], capture_output=True,
                              text=True, env=dict(os.environ, PYTHONPATH=repo), cwd=repo, timeout=600)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(lines[-1][len("RESULT "):])

    pooled = peaks("run_mine")
    assert pooled["objects"] == 1000
    cap = text_bytes // 4
    assert pooled["traced_peak"] < cap and pooled["arrow_peak"] < cap, pooled
    whole = peaks("whole_table")  # the same measure sees the descriptions when they are all read
    assert whole["objects"] == n and whole["traced_peak"] > text_bytes, whole
    print(f"driver peaks, MiB: pool numpy/Python {pooled['traced_peak'] / 2**20:.1f}, Arrow "
          f"{pooled['arrow_peak'] / 2**20:.1f}; whole table {whole['traced_peak'] / 2**20:.1f}, "
          f"{whole['arrow_peak'] / 2**20:.1f}; descriptions {text_bytes / 2**20:.1f}")


def test_embedding_batches_stream_only_the_kept_rows_normalised(tmp_path):
    import pyarrow as pa

    from artsim.rundir.embeddings import iter_embedding_batches, load_embedding_matrix
    from artsim.storage import Storage

    storage = Storage()
    uri = str(tmp_path / "emb")
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(1000, 8)).astype(np.float16)
    ids = [f"c:{i}" for i in range(1000)]
    table = pa.table({"object_id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 8)})
    storage.write_table(table, uri, rows_per_file=300)  # 4 files: batches cross file boundaries
    keep = {f"c:{i}" for i in range(0, 1000, 7)}
    batches = list(iter_embedding_batches(storage, uri, keep=keep, batch_rows=64))
    assert all(len(b_ids) <= 64 for b_ids, _ in batches)
    got_ids = [i for b_ids, _ in batches for i in b_ids]
    assert got_ids == sorted(keep, key=lambda o: int(o.split(":")[1]))  # file order, only the kept rows
    got = np.concatenate([m for _, m in batches])
    want = vectors[[int(o.split(":")[1]) for o in got_ids]].astype(np.float32)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    all_ids, matrix = load_embedding_matrix(storage, uri)
    assert all_ids == ids and matrix.shape == (1000, 8)

    bad = table.set_column(1, "embedding", pa.FixedSizeListArray.from_arrays(
        pa.array(np.where(np.arange(8000) == 4100, np.nan, vectors.ravel().astype(np.float32))), 8))
    storage.write_table(bad, str(tmp_path / "bad"))
    # the run directory's one rule (artsim.rundir.embeddings): a row with a NaN is skipped, as the index skips it
    bad_ids, bad_matrix = load_embedding_matrix(storage, str(tmp_path / "bad"))
    assert bad_ids == ids[:512] + ids[513:] and np.isfinite(bad_matrix).all()
