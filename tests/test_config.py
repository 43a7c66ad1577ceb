import subprocess
import sys

import pytest

from artsim.config import config_from_dict, load_config
from artsim.errors import ConfigError

BASE = {"sources": [{"kind": "table", "path": "x.csv", "collection": "met"}]}


def test_defaults_and_types():
    cfg = config_from_dict(BASE)
    assert cfg.download.image_size == 384
    assert cfg.sources[0].kind == "table"
    assert cfg.index.facets == ["collection", "creator", "culture", "object_type"]


@pytest.mark.parametrize("tree,message", [
    ({"download": {"per_host_connections": "four"}},
     "download.per_host_connections: expected an integer, got 'four'"),
    ({"downlaod": {}}, "downlaod: unknown key"),
    ({"download": {"imagesize": 3}}, "download.imagesize: unknown key"),
    ({"download": {"image_size": 4}}, "download.image_size: must be at least 16"),
    ({"sources": [{"kind": "csv", "path": "a", "collection": "c"}]}, "sources.0.kind: expected one of"),
    ({"sources": [{"kind": "table", "collection": "c"}]}, "sources.0.path: required key is missing"),
    ({"download": {"allow_private_addresses": "yes"}}, "download.allow_private_addresses: expected true or false"),
    ({"embed": {"dtype": "int8"}}, "embed.dtype: expected one of float16, float32"),
])
def test_bad_values_name_their_path(tree, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({**BASE, **tree})
    assert str(err.value).startswith(message)


def test_set_overrides_are_typed_and_checked():
    cfg = config_from_dict(BASE, ["download.image_size=256", "sources.0.collection=smk", "index.facets=[a, b]",
                                  "ray.address=auto"])
    assert cfg.download.image_size == 256 and cfg.sources[0].collection == "smk"
    assert cfg.index.facets == ["a", "b"] and cfg.ray.address == "auto"
    with pytest.raises(ConfigError, match="^download.image_size: expected an integer"):
        config_from_dict(BASE, ["download.image_size=big"])
    with pytest.raises(ConfigError, match="^sources.3: index 3 out of range"):
        config_from_dict(BASE, ["sources.3.path=x"])


def test_cli_misspelled_key_exits_2_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {root: %s}\ndownload:\n  per_host_conections: 4\n" % (tmp_path / "run"))
    proc = subprocess.run([sys.executable, "-m", "artsim.cli", "ingest", "-c", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "download.per_host_conections: unknown key" in lines[0]


def test_cli_missing_config_file_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "artsim.cli", "ingest", "-c", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "config file not found" in proc.stderr


def test_load_config_roundtrip(tmp_path):
    cfg = config_from_dict(BASE, ["train.epochs=3"])
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p) == cfg


def test_exponent_floats_that_yaml_1_1_reads_as_strings_are_numbers(tmp_path):
    """PyYAML reads `3e-4` (no dot) as a string; a float key takes it as the number everyone means, in a file and in
    --set, while a real string is still refused with the key's path."""
    from artsim.config import apply_override, load_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  learning_rate: 3e-4\n")
    assert load_config(str(cfg_file)).train.learning_rate == pytest.approx(3e-4)
    tree: dict = {}
    apply_override(tree, "train.margin=1E-1")
    assert config_from_dict(tree).train.margin == pytest.approx(0.1)
    with pytest.raises(ConfigError, match=r"^train\.learning_rate: expected a number"):
        config_from_dict({"train": {"learning_rate": "3e-4x"}})
