"""The README and the documentation site hold together: the two set-up commands are where .ci/run finds them, every
page of docs/ is in mkdocs.yml's nav (and every nav entry exists), the README's links resolve (files and anchors;
`mkdocs build --strict` checks the links inside docs/ in CI), and nothing points at a document outside the
repository."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.runtime import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"

pytestmark = pytest.mark.skipif(not (ROOT / "mkdocs.yml").is_file(), reason="mkdocs.yml is not here (an sdist): run "
                                "from a checkout")


def test_exactly_two_setup_commands_marked_for_ci():
    text = README.read_text()
    marked = re.findall(r"<!-- (main-command|test-command):[^\n]*\n```bash\n([^\n]+)\n```", text)
    assert [m[0] for m in marked] == ["main-command", "test-command"]
    main, test = (m[1] for m in marked)
    assert main.endswith("blipfast bench") and "pytest" in test
    assert main.split("&&")[0] == test.split("&&")[0]  # one install prefix: either command sets the machine up


def test_readme_is_a_front_page():
    assert len(README.read_text().splitlines()) <= 200


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_pages(value)]
    return []


def test_every_page_is_in_the_nav_once():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs" and config["theme"]["name"] == "material"
    nav = _nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), f"a page is in the nav twice: {nav}"
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(nav) == pages, f"nav {sorted(nav)} != docs/ {pages}"


def slug(heading: str) -> str:
    """The anchor of a heading as Python-Markdown's toc (MkDocs) and GitHub make it, for the plain headings these
    pages use: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[-\s]+", "-", text).strip("-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_slugs_as_mkdocs_makes_them():
    assert slug("Stage-1 attention masks") == "stage-1-attention-masks"
    assert slug("qformer_attention") == "qformer_attention"
    assert slug("BLIP (v1) and CapFilt") == "blip-v1-and-capfilt"
    assert slug("Captioning and VQA: blipfast caption, blipfast vqa") == "captioning-and-vqa-blipfast-caption-blipfast-vqa"


def test_readme_links_resolve():
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = [link for link in links if not re.match(r"https?://", link)]
    assert local, "the README links to the docs"
    for link in local:
        target, _, anchor = link.partition("#")
        path = (ROOT / target).resolve()
        assert path.is_file() and ROOT in path.parents, f"README.md links to {link!r}: no such file in the repository"
        if anchor:
            assert anchor in anchors(path), f"README.md links to {link!r}: no heading with that anchor"


def test_no_reference_to_documents_outside_the_repository():
    """Every Markdown file a page names (a link or a mention such as `docs/x.md`) is a file of the repository, and
    no link climbs out of it."""
    for path in [README, ROOT / "mkdocs.yml", *DOCS.glob("*.md")]:
        text = path.read_text()
        for name in set(re.findall(r"[\w./-]*\w\.md\b", text)):
            found = [(base / name).resolve() for base in (path.parent, ROOT, DOCS) if (base / name).is_file()]
            assert any(ROOT in f.parents for f in found), \
                f"{path.relative_to(ROOT)} names {name!r}, which is not a file of the repository"
        for link in re.findall(r"\]\(([^)\s#]+)", text):
            if not re.match(r"https?://", link):
                assert ROOT in (path.parent / link).resolve().parents, f"{path.relative_to(ROOT)} links outside: {link}"


def test_links_between_the_pages_resolve():
    """Every link of a docs/ page to a page or an anchor (its own or another page's) exists: what `mkdocs build
    --strict` checks in CI's docs stage, caught here already (a renamed heading broke an anchor once)."""
    bad = []
    for page in sorted(DOCS.glob("*.md")):
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", link):
                continue
            target, _, anchor = link.partition("#")
            path = page if not target else (page.parent / target).resolve()
            if not target.endswith(".md") and target:
                continue  # images and other files: mkdocs checks them
            if not path.is_file():
                bad.append(f"{page.name}: {link} (no such page)")
            elif anchor and anchor not in anchors(path):
                bad.append(f"{page.name}: {link} (no such heading)")
    assert not bad, bad
