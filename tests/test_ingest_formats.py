"""Format parsers on real museum files (and realistic fixtures where no real file exists). Plain functions, no Ray."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from artsim.config import SourceConfig
from artsim.errors import ConfigError
from artsim.ingest.stage import ingest_sources, read_source
from artsim.ingest.common import BadRow
from artsim.ingest.europeana import parse_europeana
from artsim.ingest.iiif import parse_iiif
from artsim.ingest.met_api import parse_met_api
from artsim.ingest.smk import parse_smk
from artsim.rundir.schema import RECORD_FIELDS, records_table
from artsim.storage import Storage

REPO = Path(__file__).resolve().parent.parent
MET_SAMPLE = REPO / "data" / "met_sample"
FORMATS = REPO / "data" / "formats"  # real files shipped with the repo (data/README.md)
FIXTURES = REPO / "tests" / "fixtures" / "ingest"



def _read(kind: str, path, collection: str = "c", **options) -> tuple[dict[str, dict], list[BadRow]]:
    source = SourceConfig(kind=kind, path=str(path), collection=collection, **options)
    records, bad = {}, []
    for _, item in read_source(Storage(), source, "sources.0"):
        if isinstance(item, BadRow):
            bad.append(item)
        else:
            assert set(item) == set(RECORD_FIELDS)
            records.setdefault(item["local_id"], item)
    records_table(list(records.values()))  # every record fits RECORDS_SCHEMA
    return records, bad


# -- Met Collection API JSON -----------------------------------------------------------------------------------


def test_met_api_real_objects():
    records, bad = _read("met_api_json", MET_SAMPLE / "met_api_objects.json", "met")
    assert len(records) == 40 and bad == []
    socrates = records["436105"]
    assert socrates["object_id"] == "met:436105"
    assert socrates["title"] == "The Death of Socrates"
    assert socrates["creator"] == "Jacques Louis David"
    assert socrates["subjects"] == ["Lyres", "Socrates", "Men"]
    assert socrates["date"] == "1787" and (socrates["date_begin"], socrates["date_end"]) == (1787, 1787)
    assert socrates["license"] == "CC0"
    assert socrates["landing_url"] == "https://www.metmuseum.org/art/collection/search/436105"
    assert socrates["image_url"].startswith("https://images.metmuseum.org/CRDImages/") and "web-large" in \
        socrates["image_url"]  # primaryImageSmall preferred
    horse = records["39901"]
    assert horse["title"] == "Night-Shining White" and horse["creator"] == "Han Gan"
    assert horse["culture"] == "China" and horse["object_type"] == "Handscroll"
    assert horse["date"] == "ca. 750" and (horse["date_begin"], horse["date_end"]) == (740, 760)
    assert horse["concepts"] == ["http://vocab.getty.edu/page/aat/300250148", "https://www.wikidata.org/wiki/Q726"]
    assert records["435600"]["culture"] is None  # "" in the API becomes null


@pytest.mark.parametrize("shape", ["list", "single", "objects", "jsonl"])
def test_met_api_accepts_every_documented_shape(tmp_path, shape):
    objects = json.loads((MET_SAMPLE / "met_api_objects.json").read_text("utf-8"))[:3]
    path = tmp_path / "met.json"
    if shape == "list":
        path.write_text(json.dumps(objects))
    elif shape == "single":
        path.write_text(json.dumps(objects[0]))
    elif shape == "objects":
        path.write_text(json.dumps({"total": 3, "objects": objects}))
    else:
        path = tmp_path / "met.jsonl"
        path.write_text("\n".join(json.dumps(o) for o in objects) + "\n{broken\n")
    records, bad = _read("met_api_json", path)
    expected = 1 if shape == "single" else 3
    assert sorted(records) == sorted(str(o["objectID"]) for o in objects[:expected])
    assert len(bad) == (1 if shape == "jsonl" else 0)


def test_met_api_bad_items_are_rows_not_crashes():
    data = [{"objectID": 1, "title": "ok", "isPublicDomain": False, "objectBeginDate": 0, "objectEndDate": 0,
             "objectDate": ""}, {"title": "no id"}, 42]
    out = list(parse_met_api(data, "met"))
    assert out[0]["license"] is None and out[0]["date_begin"] is None  # 0/0 means "no date"
    assert [type(x) for x in out[1:]] == [BadRow, BadRow]
    assert "objectID" in out[1].reason and "int" in out[2].reason


# -- Met Open Access CSV -----------------------------------------------------------------------------------------


def test_met_csv_fixture():
    records, bad = _read("met_csv", FIXTURES / "MetObjects_sample.csv", "met")
    assert len(records) == 13
    assert [b.reason for b in bad] == ["empty 'Object ID'", "7 fields, the header has 54"]
    album = records["36131"]
    assert album["title"] == "Landscapes with poems" and album["creator"] == "Gong Xian"
    assert album["image_url"] is None  # MetObjects.csv has no image URLs
    assert album["subjects"] == ["Poetry", "Landscapes"]
    assert album["concepts"] == ["http://vocab.getty.edu/page/aat/300055931", "http://vocab.getty.edu/page/aat/300132294",
                                 "https://www.wikidata.org/wiki/Q482", "https://www.wikidata.org/wiki/Q191163"]
    assert album["license"] == "CC0" and album["date_begin"] == 1688
    assert album["landing_url"] == "https://www.metmuseum.org/art/collection/search/36131"
    # Quoted commas survive (the medium has none, the title of 436105 neither; check a credit-line-free field):
    assert records["39901"]["date"] == "ca. 750"
    multi = records["990001"]
    assert multi["creator"] == "Hendrick Goltzius"  # first constituent with the Artist role
    assert multi["concepts"][0] == "http://vocab.getty.edu/page/aat/300375708" and "" not in multi["concepts"]


def test_met_csv_image_url_template_points_at_a_mirror():
    records, _ = _read("met_csv", FIXTURES / "MetObjects_sample.csv", "met",
                       image_url_template="http://127.0.0.1:8000/met_{local_id}.jpg")
    assert records["36131"]["image_url"] == "http://127.0.0.1:8000/met_36131.jpg"


# -- SMK ---------------------------------------------------------------------------------------------------------


def test_smk_real_search_response_and_object():
    records, bad = _read("smk_json", FORMATS / "smk" / "smk_search_response.json", "smk")
    assert len(records) == 10 and bad == []
    petzl = records["KKSgb6349"]
    assert petzl["title"] == "Portræt af maleren Joseph Petzl"
    assert petzl["creator"] == "Bendz, Wilhelm"
    assert petzl["date"] == "1832" and petzl["date_begin"] == 1832
    assert petzl["subjects"] == ["Petzl, Joseph"]
    assert petzl["object_type"] == "tegning"
    assert petzl["license"] == "CC0"
    assert petzl["iiif_service"] == "https://iip.smk.dk/iiif/jp2/pc4-07-09-04_-_011.tif.reconstructed.tif.jp2"
    assert petzl["image_url"].endswith("/full/!1600,/0/default.jpg")
    assert petzl["landing_url"] == "https://open.smk.dk/artwork/image/KKSgb6349"
    assert records["KKS9610"]["creator"] == "Dahl, Balzer"  # first of two creators, whitespace stripped
    assert (records["KKSgb4085"]["date_begin"], records["KKSgb4085"]["date_end"]) == (1798, 1801)

    kms1, _ = _read("smk_json", FORMATS / "smk" / "smk_object_KMS1.json", "smk")
    painting = kms1["KMS1"]
    assert painting["title"] == "Titanernes fald"
    assert painting["creator"] == "Cornelisz. van Haarlem, Cornelis"
    assert painting["object_type"] == "maleri" and painting["medium"] == "Olie på lærred"
    assert (painting["date_begin"], painting["date_end"]) == (1588, 1590)
    assert painting["description"].startswith("Den faldende i billedets midte")  # JSON-in-a-string decoded


def test_smk_tolerates_missing_and_wrong_fields():
    out = list(parse_smk({"items": [{"object_number": "X1", "titles": "not a list", "production": [None]},
                                    {"titles": []}]}, "smk"))
    assert out[0]["local_id"] == "X1" and out[0]["title"] is None and out[0]["creator"] is None
    assert isinstance(out[1], BadRow) and "object_number" in out[1].reason


# -- Europeana ---------------------------------------------------------------------------------------------------


def test_europeana_fixture():
    records, bad = _read("europeana_json", FIXTURES / "europeana_search_response.json", "europeana")
    assert len(records) == 6 and len(bad) == 1
    painting = records["2020903/KMSst85"]
    assert painting["object_id"] == "europeana:2020903/KMSst85"
    assert painting["image_url"] == "http://cspic.smk.dk/globus/31524867/img0100.jpg"
    assert painting["concepts"] == ["http://data.europeana.eu/concept/base/47"]
    assert painting["subjects"] == ["Painting"]
    assert painting["license"] == "PDM"
    assert painting["landing_url"] == "https://www.europeana.eu/item/2020903/KMSst85"  # tracking query dropped
    assert records["916110/smm_vm_photo_7_254"]["creator"] == "Auguste Rodin"  # agent URIs are not names
    assert records["916110/smm_vm_photo_7_254"]["license"] == "CC-BY-4.0"
    assert records["9200387/BibliographicResource_3000117281482"]["license"] == "InC"
    postcard = records["09403/o_gm_3566_CHO"]
    assert postcard["image_url"].startswith("https://api.europeana.eu/thumbnail/v2/url.json?uri=")  # edmPreview
    assert records["91668/GSM_objekt_1252515"]["image_url"] is None


def test_europeana_ids_match_the_real_harvest():
    import csv

    with open(FORMATS / "europeana" / "crowdheritage_dataset.csv", encoding="utf-8") as f:
        real = {row["ID"].strip("/"): row["URL"] for row in csv.DictReader(f)}
    records, _ = _read("europeana_json", FIXTURES / "europeana_search_response.json", "europeana")
    for local_id, record in records.items():
        assert local_id in real
        if record["image_url"] and "thumbnail" not in record["image_url"]:
            assert record["image_url"] == real[local_id]


def test_europeana_language_maps():
    item = {"id": "/1/a", "dcTitleLangAware": {"de": ["Bild"], "en": ["Picture"]},
            "dcCreatorLangAware": {"def": ["http://data.europeana.eu/agent/1", "Anna"]},
            "dcTypeLangAware": {"en": ["Painting"]}, "rights": ["http://creativecommons.org/publicdomain/zero/1.0/"]}
    (record,) = parse_europeana({"items": [item]}, "eu")
    assert record["title"] == "Picture" and record["creator"] == "Anna" and record["object_type"] == "Painting"
    assert record["license"] == "CC0" and record["local_id"] == "1/a"


# -- IIIF --------------------------------------------------------------------------------------------------------


def test_iiif_v2_manifest():
    records, bad = _read("iiif_manifest", FIXTURES / "iiif_v2_manifest.json", "smk")
    assert bad == []
    r = records["KMS1"]
    assert r["iiif_service"] == "https://iip.smk.dk/iiif/jp2/KMS1.tif.reconstructed.tif.jp2"
    assert r["image_url"] == "https://iip.smk.dk/iiif/jp2/KMS1.tif.reconstructed.tif.jp2/full/full/0/default.jpg"
    assert r["title"] == "The Fall of the Titans"  # English value of a multilingual v2 value
    assert r["creator"] == "Cornelisz. van Haarlem, Cornelis"  # HTML stripped
    assert (r["date_begin"], r["date_end"]) == (1588, 1590)
    assert r["license"] == "CC0" and r["landing_url"] == "https://open.smk.dk/artwork/image/KMS1"


def test_iiif_v3_manifest():
    records, bad = _read("iiif_manifest", FIXTURES / "iiif_v3_manifest.json", "smk")
    assert bad == []
    r = records["KKS16350"]
    assert r["iiif_service"] == "https://iip.smk.dk/iiif/jp2/kks16350_1.tif.reconstructed.tif.jp2"
    assert r["image_url"].endswith("/full/max/0/default.jpg")
    assert r["title"] == "Bønder kører tang" and r["creator"] == "Locher, Carl"
    assert r["object_type"] == "dybtryk" and r["medium"] == "Stregætsning, akvatinte og roulette"
    assert r["date_begin"] == 1885 and r["license"] == "CC0"
    assert r["landing_url"] == "https://open.smk.dk/artwork/image/KKS16350"


def test_iiif_collection_embedded_and_referenced_manifests():
    v3 = json.loads((FIXTURES / "iiif_v3_manifest.json").read_text("utf-8"))
    collection = {"@context": "http://iiif.io/api/presentation/2/context.json", "@type": "sc:Collection",
                  "manifests": [json.loads((FIXTURES / "iiif_v2_manifest.json").read_text("utf-8")),
                                {"@id": "https://example.org/iiif/other/manifest", "@type": "sc:Manifest"}]}
    out = list(parse_iiif([collection, v3, {"@id": "https://example.org/iiif/obj42/manifest", "@type": "sc:Manifest"},
                           {"@type": "sc:Manifest", "label": "no id"}], "c"))
    records = [o for o in out if isinstance(o, dict)]
    bad = [o for o in out if isinstance(o, BadRow)]
    assert [r["local_id"] for r in records] == ["KMS1", "KKS16350", "obj42"]
    assert records[2]["image_url"] is None  # a manifest without canvases: kept, no image
    assert len(bad) == 2 and "without embedding it" in bad[0].reason and "no identifier" in bad[1].reason


def test_iiif_id_from_manifest_url_when_no_identifier():
    v2 = json.loads((FIXTURES / "iiif_v2_manifest.json").read_text("utf-8"))
    v2["metadata"] = [m for m in v2["metadata"] if m["label"] != "Object number"]
    (record,) = parse_iiif(v2, "smk")
    assert record["local_id"] == "kms1"  # from ?id=kms1


# -- tables --------------------------------------------------------------------------------------------------------

MET_2013_MAPPING = {"local_id": "object_id", "creator": "artist", "subjects": "what_terms",
                    "image_url": "image_url_2013", "landing_url": "object_url_now"}


def test_table_met_2013_scrape_csv():
    records, bad = _read("table", MET_SAMPLE / "met_2013_scrape.csv", "met", mapping=MET_2013_MAPPING,
                         license="CC0")
    assert len(records) == 40 and bad == []
    r = records["12600"]
    assert r["title"] == "Francis Brinley" and r["creator"] == "John Smibert"  # "title" column used by name
    assert r["subjects"] == ["Paintings", "Canvas", "Oil paintings"]
    assert r["date"] == "1729" and r["date_begin"] == 1729 and r["medium"] == "Oil on canvas"
    assert r["image_url"] == "http://images.metmuseum.org/CRDImages/ap/original/DT53.jpg"
    assert r["license"] == "CC0"  # the source's default licence
    assert records["16858"]["date_begin"] == 1840  # "ca. 1840"


def test_table_mosaic_csv():
    records, _ = _read("table", FORMATS / "mosaic" / "metadata_smol.csv", "mosaic",
                       mapping={"title": "Title", "creator": "Artist", "image_url": "Image_Url",
                                "culture": "Culture", "object_type": "Classification", "landing_url": "Museum_Page"})
    assert len(records) == 24
    r = records["381947"]  # "id" column used as local_id without a mapping entry
    assert r["title"] == "The Flagellation of Christ" and r["creator"] == "Bernardo Cavallino"
    assert r["culture"] == "italian" and r["object_type"] == "drawings"
    assert r["image_url"] == "https://images.metmuseum.org/CRDImages/dp/original/DP809065.jpg"
    assert records["26196"]["creator"] is None  # empty cell


def test_table_wienmuseum_gzip_csv():
    records, bad = _read("table", FORMATS / "wienmuseum" / "wm_1000_samples.csv.gz", "wien",
                         mapping={"creator": "artistsProducers", "date": "dates", "image_url": "multimedia_default",
                                  "license": "multimedia_caption", "landing_url": "url"})
    assert len(records) == 996 and bad == []
    r = records["2056623"]
    assert r["creator"] == "Elisabeth Laube"
    assert r["subjects"] == ["Kalender, Almanach", "Weihnachten (nicht-liturgisches Feiern)"]  # " | " split
    assert r["license"] == "CC-BY-4.0"  # "CC BY 4.0, Foto: ..." normalised
    assert records["1902639"]["license"] == "CC0"
    licences = {x["license"] for x in records.values()}
    assert licences == {"CC-BY-4.0", "CC0"}
    assert r["date_begin"] == 2020


def test_table_parquet_and_jsonl(tmp_path):
    rows = [{"key": 1, "name": "A", "artist": "X", "tags": ["t1", "t2"], "url": "http://h/1.jpg"},
            {"key": 2, "name": "B", "artist": None, "tags": [], "url": None},
            {"key": None, "name": "C", "artist": "Z", "tags": [], "url": "http://h/3.jpg"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n[1, 2]\n")
    mapping = {"local_id": "key", "title": "name", "creator": "artist", "subjects": "tags", "image_url": "url"}
    for name, n_bad in (("t.parquet", 1), ("t.jsonl", 2)):
        records, bad = _read("table", tmp_path / name, "t", mapping=mapping)
        assert sorted(records) == ["1", "2"], name  # integer ids lose nothing, no ".0"
        assert records["1"]["subjects"] == ["t1", "t2"] and records["1"]["creator"] == "X"
        assert records["2"]["image_url"] is None
        assert len(bad) == n_bad, (name, bad)


def test_table_mapping_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^sources\.0\.mapping\.creator: column 'painter' does not exist"):
        _read("table", MET_SAMPLE / "met_2013_scrape.csv", "m", mapping={"local_id": "object_id",
                                                                          "creator": "painter"})
    with pytest.raises(ConfigError, match=r"^sources\.0\.mapping\.colour: not a canonical field"):
        _read("table", MET_SAMPLE / "met_2013_scrape.csv", "m", mapping={"local_id": "object_id", "colour": "x"})
    (tmp_path / "noid.csv").write_text("name,artist\nA,B\n")
    with pytest.raises(ConfigError, match=r"^sources\.0\.mapping\.local_id: required"):
        _read("table", tmp_path / "noid.csv", "m")


def test_csv_with_bad_rows(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b'\xef\xbb\xbfid,title\n1,"quoted, comma\nand newline"\n2,x,extra\n\n,no id\n3,\xff\xfe broken utf8\n')
    records, bad = _read("table", path, "b")
    assert records["1"]["title"] == "quoted, comma\nand newline"
    assert records["3"]["title"].endswith("broken utf8")  # undecodable bytes replaced, row kept
    assert [b.reason for b in bad] == ["3 fields, the header has 2", "empty id column 'id'"]


def test_image_url_template_quotes_values_and_offers_source_dir(tmp_path):
    (tmp_path / "t.csv").write_text("id,title\nKKSgb6775/3,a\n7,b\n")
    records, _ = _read("table", tmp_path / "t.csv", "s", image_url_template="file://{source_dir}/img/{local_id}.jpg")
    assert records["KKSgb6775/3"]["image_url"] == f"file://{tmp_path}/img/KKSgb6775%2F3.jpg"
    with pytest.raises(ConfigError, match=r"^sources\.0\.image_url_template: unknown field \{colour\}"):
        _read("table", tmp_path / "t.csv", "s", image_url_template="http://h/{colour}.jpg")
    with pytest.raises(ConfigError, match="unknown field"):  # no attribute access through format strings
        _read("table", tmp_path / "t.csv", "s", image_url_template="http://h/{local_id.__class__}")


def test_synthetic_collection_reads_back_as_a_table(tmp_path):
    from artsim.testing.synthetic import TABLE_MAPPING, SyntheticSpec, synthetic_records, write_synthetic_collection

    spec = SyntheticSpec(n=30, seed=9, n_collections=3)
    csv_path = write_synthetic_collection(tmp_path, spec)
    source = SourceConfig(kind="table", path=str(csv_path), collection="synth", mapping=TABLE_MAPPING,
                          image_url_template="file://{source_dir}/images/{local_id}.jpg")
    table, stats, total, _ = ingest_sources(Storage(), [source])
    got = {r["object_id"]: r for r in table.to_pylist()}
    expected = synthetic_records(spec)
    assert total.records_written == 30 and total.unparsable_rows == 0
    # The columns are named like the canonical fields, so no mapping gives the same table.
    same, _, _, _ = ingest_sources(Storage(), [SourceConfig(
        kind="table", path=str(csv_path), collection="synth",
        image_url_template="file://{source_dir}/images/{local_id}.jpg")])
    assert same.equals(table)
    for rec in expected:
        row = got[rec["object_id"]]  # per-row collection column kept: synth_a/b/c
        for key in ("creator", "subjects", "concepts", "object_type", "date_begin", "date_end", "license", "title"):
            assert row[key] == rec[key], key
        assert Path(row["image_url"][len("file://"):]).is_file()


def test_hostile_inputs_are_contained(tmp_path):
    from artsim.errors import ArtsimError

    (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000)  # recursion bomb
    with pytest.raises(ArtsimError, match="not valid JSON"):
        _read("smk_json", tmp_path / "deep.json")
    # A cell beyond the csv module's field limit is one bad row; the rows after it are still read.
    (tmp_path / "big.csv").write_text("id,title\n1," + "x" * 300_000 + "\n2,ok\n")
    records, bad = _read("table", tmp_path / "big.csv")
    assert list(records) == ["2"] and "field larger than field limit" in bad[0].reason
    # Control characters in ids are dropped; absurd years are not years.
    (tmp_path / "odd.csv").write_text("id,date\n\"a\x07b\",99999999\n")
    records, _ = _read("table", tmp_path / "odd.csv")
    assert records["ab"]["date_begin"] is None and records["ab"]["date"] == "99999999"
