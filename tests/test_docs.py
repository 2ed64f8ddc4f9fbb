"""The documentation stays true: every relative link resolves, and the Python API page runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
EXTERNAL = ("http://", "https://", "mailto:")


def pages() -> list[Path]:
    """README.md and every Markdown page of the manual."""
    return [REPO_ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (README is read there)."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def mkdocs_slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension gives a heading (the manual is built with mkdocs)."""
    text = unicodedata.normalize("NFKD", re.sub(r"[`*]", "", heading)).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    """The anchors a page's headings get where the page is rendered."""
    slug = github_slug if page.name == "README.md" and page.parent == REPO_ROOT else mkdocs_slug
    return {slug(h) for h in HEADING.findall(FENCE.sub("", page.read_text()))}


def broken_links(page: Path) -> list[str]:
    """`page: target (why)` for every relative link of `page` whose file or heading does not exist."""
    broken = []
    for match in LINK.finditer(INLINE_CODE.sub("", FENCE.sub("", page.read_text()))):
        target = match.group(1) or match.group(2)
        if target.startswith(EXTERNAL):
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(REPO_ROOT)}: {target}"
        if not resolved.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{where} (no heading with anchor #{anchor})")
    return broken


def test_every_relative_link_in_readme_and_docs_resolves() -> None:
    broken = [line for page in pages() for line in broken_links(page)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_check_sees_a_missing_file_and_a_missing_heading(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "REPO_ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# Real heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#real-heading) [gone](missing.md) [bad](other.md#nope) `[code](x.md)`\n"
                    "```\n[fenced](fenced.md)\n```\n[web](https://example.org/x)\n")
    assert broken_links(page) == ["page.md: missing.md (no such file)",
                                  "page.md: other.md#nope (no heading with anchor #nope)"]


def test_slugs_follow_each_renderer() -> None:
    assert github_slug("Quick start: two commands") == mkdocs_slug("Quick start: two commands") == "quick-start-two-commands"
    assert github_slug("I want to ...") == "i-want-to-" and mkdocs_slug("I want to ...") == "i-want-to"


@pytest.mark.slow
def test_the_python_api_page_runs_as_written(tmp_path: Path) -> None:
    blocks = re.findall(r"^```python\n(.*?)^```", (DOCS / "api.md").read_text(), re.S | re.M)
    assert len(blocks) >= 5
    script = tmp_path / "api_page.py"
    script.write_text("\n".join(blocks))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "runs" / "api" / "run" / "metrics.json").is_file()
