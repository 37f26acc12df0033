"""The docs say what the code does where the code can tell: the estimator table is printed from
``algo.ESTIMATORS``, the README's first screen stays short and maps every docs page, and the
links between pages resolve."""

import re
from pathlib import Path

from rlhf_dist.algo.estimators import markdown_table

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_the_estimator_table_in_the_docs_is_the_algo_table():
    page = (DOCS / "algorithms.md").read_text()
    shown = page.split("<!-- estimators:begin -->\n")[1].split("<!-- estimators:end -->")[0]
    assert shown == markdown_table()


def test_the_readme_is_a_first_screen_that_maps_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert "make run" in readme and "make test" in readme
    for page in DOCS.glob("*.md"):
        assert f"docs/{page.name}" in readme, page.name


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_links_between_pages_resolve():
    broken = []
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
