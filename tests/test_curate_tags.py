"""Tag recommendations: held-out recall on the synthetic collection (embeddings built from its hidden factors),
evidence that is true, and clear errors for bad input."""
import numpy as np
import pytest

from artsim.curate import evaluate_tag_recommendation, recommend_tags
from artsim.report.html import tag_recommendations_html
from artsim.curate.tags import work_tags
from artsim.errors import ArtsimError
from artsim.testing.synthetic import SyntheticSpec, _creator_index, _motif_index, synthetic_records


def factor_vectors(records, spec, motif_weight=1.0, creator_weight=1.0, noise=0.5, seed=0):
    """Stand-in image embeddings: a direction per motif and per creator plus Gaussian noise, L2-normalised."""
    rng = np.random.default_rng(seed)
    motifs, creators = rng.normal(size=(spec.n_subjects, 64)), rng.normal(size=(spec.n_creators, 64))
    rows = [motif_weight * motifs[_motif_index(r["subjects"][0][len("motif:"):])]
            + creator_weight * creators[_creator_index(r["creator"])] + noise * rng.normal(size=64) for r in records]
    v = np.stack(rows)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def synthetic():
    spec = SyntheticSpec(n=400, n_subjects=8)
    records = synthetic_records(spec)
    return spec, records, [r["object_id"] for r in records]


def test_motif_aware_embedding_recovers_held_out_subjects_far_above_popularity(synthetic):
    spec, records, ids = synthetic
    m = evaluate_tag_recommendation(records, factor_vectors(records, spec), ids, kind="subject")
    assert m["works_evaluated"] == 400 and m["recoverable"] == 1.0
    assert m["recall_at_5"] >= 0.95
    assert m["recall_at_5"] > m["popularity_recall_at_5"] + 0.3


def test_motif_blind_embedding_is_no_better_than_popularity(synthetic):
    # the same evaluation with an embedding that only sees the creator: the metric must not flatter it
    spec, records, ids = synthetic
    m = evaluate_tag_recommendation(records, factor_vectors(records, spec, motif_weight=0.0), ids, kind="subject")
    assert m["recall_at_5"] < m["popularity_recall_at_5"] + 0.1
    assert m["recall_at_5"] < 0.6


def test_recommendations_are_missing_tags_with_true_evidence(synthetic):
    spec, records, ids = synthetic
    # drop the concept URI of every 3rd work: its neighbours should suggest it back
    records = [dict(r, concepts=[]) if i % 3 == 0 else r for i, r in enumerate(records)]
    by_id = {r["object_id"]: r for r in records}
    recs = recommend_tags(records, factor_vectors(records, spec), ids, k=10, min_support=3, top=3)
    assert recs
    restored = 0
    for rec in recs:
        own = work_tags(by_id[rec["object_id"]])
        scores = [t["score"] for t in rec["tags"]]
        assert scores == sorted(scores, reverse=True) and len(scores) <= 3
        for tag in rec["tags"]:
            assert (tag["kind"], tag["key"]) not in own
            assert tag["support"] >= 3 and 0 < tag["score"] <= 1
            for e in tag["evidence"]:
                assert (tag["kind"], tag["key"]) in work_tags(by_id[e["object_id"]])
                assert e["object_id"] != rec["object_id"] and e["title"] == by_id[e["object_id"]]["title"]
        original = synthetic[1][ids.index(rec["object_id"])]["concepts"][0]
        restored += ids.index(rec["object_id"]) % 3 == 0 and rec["tags"][0]["key"] == original
    assert restored >= 0.9 * len(range(0, 400, 3))


def test_min_support_filters_rare_votes(synthetic):
    spec, records, ids = synthetic
    v = factor_vectors(records, spec, noise=3.0)  # noisy: neighbours disagree
    loose = recommend_tags(records, v, ids, k=5, min_support=1, top=50)
    strict = recommend_tags(records, v, ids, k=5, min_support=4, top=50)
    assert sum(len(r["tags"]) for r in strict) < sum(len(r["tags"]) for r in loose)
    assert all(t["support"] >= 4 for r in strict for t in r["tags"])


def test_bad_input_is_a_clear_error(synthetic):
    spec, records, ids = synthetic
    v = factor_vectors(records, spec)
    with pytest.raises(ArtsimError, match="rows but"):
        recommend_tags(records, v, ids[:-1])
    bad = v.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ArtsimError, match="NaN"):
        recommend_tags(records, bad, ids)
    with pytest.raises(ArtsimError, match="k"):
        recommend_tags(records, v, ids, k=0)
    with pytest.raises(ArtsimError, match="kind"):
        evaluate_tag_recommendation(records, v, ids, kind="creator")


def test_html_escapes_record_text_and_drops_script_links():
    records = [{"object_id": f"x:{i}", "title": "<script>alert(1)</script>", "subjects": ["<b>tag</b>"],
                "landing_url": "javascript:alert(1)"} for i in range(4)]
    records[0]["subjects"] = []
    v = np.array([[1, 0], [0.99, 0.1], [0.98, 0.2], [0.97, 0.25]], np.float32)
    recs = recommend_tags(records, v, [r["object_id"] for r in records], k=3, min_support=2)
    page = tag_recommendations_html(recs, {r["object_id"]: r for r in records}, {})
    assert "&lt;b&gt;tag&lt;/b&gt;" in page and "&lt;script&gt;" in page
    assert "<script>" not in page and "javascript:" not in page
