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


def test_files_named_in_docs_and_docstrings_exist():
    """Every repository path that the code's docstrings/comments or the docs cite exists (STAGE placeholders
    aside): a moved module must not leave readers looking for a file that is gone."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    pattern = re.compile(r"(?<![\w/.])((?:artsim|docs|benchmarks|tests|configs|jobs)/[\w./-]+\.(?:py|md|yaml|json))")
    sources = [*root.glob("artsim/**/*.py"), *root.glob("artsim/**/*.md"), *root.glob("docs/*.md"),
               root / "README.md"]
    missing = sorted({(str(p.relative_to(root)), m.group(1)) for p in sources for m in pattern.finditer(p.read_text())
                      if "STAGE" not in m.group(1) and not (root / m.group(1)).exists()})
    assert not missing, missing
