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


# -- the text signal and the ensemble (real offline sentence model) ------------------------------------------------

from artsim.curate import evaluate_tag_signals  # noqa: E402


@pytest.fixture(scope="module")
def encoder():
    from artsim.text import load_sentence_encoder

    return load_sentence_encoder()


def _themed_records():
    """Works whose titles say what they show; tags are the themes; image vectors carry no theme (random)."""
    themes = {"Horses": ["Two horses grazing", "A horse and rider", "Cavalry horses at rest", "Horse race"],
              "Ships": ["Ships in a harbour", "A sailing ship in a storm", "Fishing boats at sea", "Naval battle"],
              "Flowers": ["Still life with roses", "Tulips in a vase", "A bouquet of flowers", "Lilies"]}
    records = []
    for theme, titles in themes.items():
        for i, title in enumerate(titles):
            records.append({"object_id": f"t:{theme}{i}", "title": title, "medium": "Oil on canvas",
                            "subjects": [theme]})
    return records


def test_text_signal_suggests_the_tag_the_title_names_with_its_words(encoder):
    records = _themed_records()
    records.append({"object_id": "t:new", "title": "Horsemen crossing a river", "subjects": []})
    ids = [r["object_id"] for r in records]
    vectors = np.random.default_rng(0).normal(size=(len(ids), 32)).astype(np.float32)
    out = recommend_tags(records, vectors, ids, k=5, min_support=2, text_encoder=encoder, text_weight=1.0,
                         only={"t:new"})
    assert [r["object_id"] for r in out] == ["t:new"]
    best = out[0]["tags"][0]
    assert best["tag"] == "Horses" and best["signal"] == "text" and best["text"] > 0
    assert best["words"] and best["words"][0]["word"] == "horsemen"
    # the work's own tags are never suggested, and its tags are not part of the text it is compared with
    tagged = recommend_tags(records, vectors, ids, k=5, min_support=2, text_encoder=encoder, only={"t:Ships0"})
    assert all(t["tag"] != "Ships" for r in tagged for t in r["tags"])


def test_ensemble_keeps_visual_evidence_and_text_words(encoder, synthetic):
    spec, records, ids = synthetic
    records = [dict(r, concepts=[]) for r in records]
    out = recommend_tags(records, factor_vectors(records, spec), ids, k=10, min_support=3, text_encoder=encoder,
                         text_weight=0.5, only=set(ids[:20]))
    assert 0 < len(out) <= 20
    for rec in out:
        for tag in rec["tags"]:
            assert tag["visual"] is not None or tag["text"] is not None
            expected = 0.5 * (tag["text"] or 0) + 0.5 * (tag["visual"] or 0)
            assert abs(tag["score"] - expected) < 1e-3
            assert (tag["evidence"] != []) == (tag["visual"] is not None)


def test_signal_evaluation_hides_tags_and_ranks_signals_honestly(encoder, synthetic):
    spec, records, ids = synthetic
    records = [dict(r, concepts=[]) for r in records]
    good = evaluate_tag_signals(records, factor_vectors(records, spec), ids, text_encoder=encoder, hide=0.5,
                                max_works=120)
    assert good["works_evaluated"] == 120 and set(good) >= {"visual", "text", "ensemble", "popularity"}
    for name in ("visual", "text", "ensemble", "popularity"):
        assert 0 <= good[name]["precision_at_5"] <= 1 and 0 <= good[name]["recall_at_5"] <= 1
    # synthetic titles do not name the motif: text is no help; a motif-aware embedding is
    assert good["visual"]["recall_at_5"] > good["popularity"]["recall_at_5"] + 0.3
    blind = evaluate_tag_signals(records, factor_vectors(records, spec, motif_weight=0.0), ids, hide=0.5,
                                 max_works=120)
    assert blind["visual"]["recall_at_5"] < good["visual"]["recall_at_5"] - 0.3
    assert "text" not in blind  # no encoder: no text signal claimed

    themed = _themed_records()
    tids = [r["object_id"] for r in themed]
    rand = np.random.default_rng(0).normal(size=(len(tids), 32)).astype(np.float32)
    m = evaluate_tag_signals(themed, rand, tids, text_encoder=encoder, hide=0.3, seed=1)
    assert m["text"]["recall_at_5"] >= 0.99  # the titles name the theme
    with pytest.raises(ArtsimError, match="hide"):
        evaluate_tag_signals(themed, rand, tids, hide=1.0)
