"""The README documents every config key (it is generated from artsim/config.py: `python -m artsim.config_doc`)."""
from artsim.config_doc import config_keys, config_reference_markdown
from conftest import REPO


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = [key for key, _, _ in config_keys() if f"`{key}`" not in readme]
    assert not missing, f"README lacks these config keys (paste `python -m artsim.config_doc`): {missing}"


def test_every_config_key_has_a_meaning():
    undocumented = [line.split("`")[1] for line in config_reference_markdown().splitlines()
                    if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not undocumented, f"add a comment beside these fields in artsim/config.py: {undocumented}"
