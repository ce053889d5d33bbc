"""The documentation a newcomer reads: every relative link resolves, every *.md the code cites exists in the
repository, the README stays a first screen (<= 250 lines), and its Python snippet runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("harvest", "train", "analyze", "bench", "tests", "scripts")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITED_MD = re.compile(r"\b([A-Za-z_][A-Za-z0-9_-]*\.md)\b")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for line in md.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: p.name)
def test_every_relative_link_resolves(md):
    broken = []
    for target in LINK.findall(md.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    assert not broken, f"{md.name}: links that do not resolve: {broken}"


def test_every_markdown_file_the_code_cites_is_in_the_repository():
    present = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts and ".git" not in p.parts}
    missing = {}
    for folder in CODE_DIRS:
        for src in (ROOT / folder).rglob("*"):
            if src.suffix not in {".py", ".sh"} or ".venv" in src.parts:
                continue
            for cited in CITED_MD.findall(src.read_text(errors="replace")):
                name = Path(cited).name
                if name not in present and name not in {"compare.md"}:  # compare.md: an output `analyze compare` writes
                    missing.setdefault(name, []).append(str(src.relative_to(ROOT)))
    assert not missing, f"the code cites files that are not in the repository: {missing}"


def test_no_citation_of_notes_outside_the_repository():
    pattern = re.compile(r"INTERFACES|shared/docs|\bstorage\.md|\bpitfalls\.md|\bpeers\.md")
    hits = [
        str(src.relative_to(ROOT))
        for folder in CODE_DIRS
        for src in (ROOT / folder).rglob("*.py")
        if src.name != "test_docs.py" and pattern.search(src.read_text())
    ]
    assert not hits, f"these files cite notes a reader of the repository cannot open: {hits}"


def test_readme_is_a_first_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"
    text = "\n".join(lines)
    for must in ("scripts/quickstart.sh", "scripts/test.sh", "## Python API", "## Citation", "LICENSE"):
        assert must in text, must


def test_the_readme_python_snippet_runs(neox_dir, tmp_path):
    """The README's Python API block, with the paths replaced by a tiny cache and run: a newcomer's first
    five lines must work as printed."""
    from helpers import harvest_and_train

    cache, run = harvest_and_train(tmp_path, neox_dir)
    text = (ROOT / "README.md").read_text()
    snippet = text.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    snippet = snippet.replace('"caches/quickstart"', repr(str(cache)))
    snippet = snippet.replace('"runs/quickstart/quickstart-mlsae-x8-k32"', repr(str(run)))
    snippet = snippet.replace("layer=5", "layer=1")
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    n = scope["x"].shape[0]
    assert scope["top"].values.shape == (n, scope["sae"].cfg.k)
    assert scope["x_hat"].shape == scope["x"].shape
    assert scope["chunk"].acts.shape[0] == len(scope["cache"].layers)
