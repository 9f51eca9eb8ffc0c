"""The project's docs hold together: every relative link of the README and docs/ reaches a file of the repository
and, with an anchor, one of its headings; the README stays a front page; and no file points at documents that are
not in the repository."""

from __future__ import annotations

import re
import subprocess

import pytest

from config.settings import PROJECT_ROOT

PAGES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_relative_link_reaches_a_file_and_heading(page):
    prose = re.sub(r"`[^`\n]*`", "", page.read_text())  # a link written out in `code` is an example, not a link
    for target in LINK.findall(prose):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: no heading #{anchor} in {linked.name}"


def test_the_readme_is_a_front_page():
    text = (PROJECT_ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "## Contents" in text
    assert "make demo" in text and "make test" in text


def test_no_file_cites_a_document_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    outside = re.compile(r"CONTRACT\.md|WECOM_AIBOT_PROTOCOL\.md|DIFY_API\.md|\.\./shared|shared[/]docs")
    text_files = {".py", ".md", ".toml", ".yaml", ".yml", ".txt", ".env", ".sh", ".cfg", ""}
    citing = [
        name
        for name in tracked.stdout.split()
        if (PROJECT_ROOT / name).suffix in text_files
        and (PROJECT_ROOT / name).is_file()
        and name != "tests/test_docs.py"
        and outside.search((PROJECT_ROOT / name).read_text(errors="replace"))
    ]
    assert citing == []


DOCS = [*PAGES, PROJECT_ROOT / "BENCHMARKS.md", PROJECT_ROOT / "FAULTS.md"]
REPO_PATH = re.compile(r"`((?:services|web|demo|tests|bench|docs|k8s|config|utils|cli|\.ci)/[^`\s<>{}*…]*)`")
# A path the code's docstrings and comments name, backticked or not.
CODE_PATH = re.compile(r"\b((?:services|web|demo|tests|bench|docs|config|utils|cli)/[\w/]+\.(?:py|md|toml|lua|html))\b")


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_code_fences_are_closed(page):
    """An unclosed ``` turns the rest of a page into code (operations.md lost three sections so)."""
    fences = re.findall(r"^\s*```", page.read_text(), re.M)
    assert len(fences) % 2 == 0, f"{page.name}: {len(fences)} code fences, one is never closed"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_path_a_page_names_exists(page):
    """A backticked path of the repository (`services/forms/`, `tests/x.py::test_y`) names a file or folder that
    is there, and a test it names is in that file."""
    for named in REPO_PATH.findall(page.read_text()):
        path, _, test = named.rstrip(".,:;)").partition("::")
        path = re.sub(r":\d+(-\d+)?$", "", path)  # file:line
        assert (PROJECT_ROOT / path).exists(), f"{page.name} names {path}, which does not exist"
        if test:
            assert f"def {test}(" in (PROJECT_ROOT / path).read_text(), f"{page.name}: no {test} in {path}"


def test_the_code_layout_names_every_module_of_services():
    """docs/development.md's tree of the code names every package and module of services/ and web/."""
    text = (PROJECT_ROOT / "docs" / "development.md").read_text()
    layout = text[text.index("## The code") :]
    roots = (PROJECT_ROOT / "services", PROJECT_ROOT / "web")
    modules = [p for root in roots for p in root.rglob("*.py") if p.name != "__init__.py"]
    packages = [p for root in roots for p in root.rglob("*") if p.is_dir() and p.name != "__pycache__"]
    missing = [str(p.relative_to(PROJECT_ROOT)) for p in modules if p.name not in layout]
    missing += [str(p.relative_to(PROJECT_ROOT)) for p in packages if f"{p.name}/" not in layout]
    assert missing == [], f"docs/development.md's layout does not name: {missing}"


def test_every_path_the_code_names_exists():
    """A file the production code's docstrings and comments point a reader to is there (a module that moved or was
    merged left such pointers behind)."""
    sources = [
        PROJECT_ROOT / "app.py",
        *[p for d in ("services", "web", "config", "utils", "cli") for p in (PROJECT_ROOT / d).rglob("*.py")],
    ]
    missing = sorted(
        f"{source.relative_to(PROJECT_ROOT)} names {named}"
        for source in sources
        for named in set(CODE_PATH.findall(source.read_text()))
        if not (PROJECT_ROOT / named).exists()
    )
    assert missing == []
