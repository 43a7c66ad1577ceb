import os

import pyarrow as pa
import pytest

from artsim.config import StorageConfig
from artsim.errors import ArtsimError
from artsim.storage import SUCCESS, Storage, join


def _roundtrip(storage: Storage, root: str):
    table = pa.table({"object_id": ["a:1", "a:2", "a:3"], "x": [1, 2, 3]})
    storage.write_table(table, join(root, "records"), rows_per_file=2)
    assert storage.is_complete(join(root, "records"))
    assert len(storage.parquet_files(join(root, "records"))) == 2
    back = storage.read_table(join(root, "records"))
    assert sorted(back.column("object_id").to_pylist()) == ["a:1", "a:2", "a:3"]
    storage.write_json(join(root, "m.json"), {"k": 1})
    assert storage.read_json(join(root, "m.json")) == {"k": 1}
    # rewriting replaces the old version entirely
    storage.write_table(table.slice(0, 1), join(root, "records"))
    assert storage.read_table(join(root, "records")).num_rows == 1


def test_local_roundtrip(tmp_path):
    _roundtrip(Storage(), str(tmp_path))
    _roundtrip(Storage(), "file://" + str(tmp_path / "f"))
    # no temporary names left behind
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]


def test_s3_roundtrip(s3_endpoint):
    _roundtrip(Storage(StorageConfig(s3_endpoint_url=s3_endpoint)), "s3://artsim-test/storage-test")


def test_failed_write_leaves_previous_version_and_no_partial(tmp_path):
    storage = Storage()
    target = str(tmp_path / "out")
    storage.write_table(pa.table({"a": [1]}), target)
    with pytest.raises(RuntimeError):
        with storage.atomic_dir(target) as staging:
            storage.write_parquet_file(pa.table({"a": [2, 3]}), join(staging, "part-0.parquet"))
            raise RuntimeError("crash mid-write")
    assert storage.read_table(target).column("a").to_pylist() == [1]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_incomplete_directory_is_refused(tmp_path):
    storage = Storage()
    target = str(tmp_path / "out")
    storage.write_table(pa.table({"a": [1]}), target)
    os.remove(os.path.join(target, SUCCESS))
    with pytest.raises(ArtsimError, match="incomplete output"):
        storage.read_table(target)
    with pytest.raises(ArtsimError, match="not found"):
        storage.read_table(str(tmp_path / "missing"))
