"""docs/recipes.md: every citation in the repository points to one of its sections, none to a missing file."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "docs" / "recipes.md"
# What users of the repository read: the library, the configs, the benchmarks, the entry points, the docs.
CITING = ["src", "configs", "bench", "rounds", "docs", "README.md"]
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".toml", ".txt", ".cfg"}
CITATION = re.compile(r"docs/recipes\.md(?:#([\w-]+))?")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def heading_anchors(markdown: str) -> set[str]:
    """Anchors of every ATX heading outside code fences; repeated ones get -1, -2, ... as on GitHub."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if match:
            base = github_anchor(match.group(1))
            anchors.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
    return anchors


def citing_files() -> list[Path]:
    files = []
    for name in CITING:
        path = REPO / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        files += [p for p in candidates if p.is_file() and p.suffix in TEXT_SUFFIXES
                  and not any(part.endswith(".egg-info") or part == "__pycache__" for part in p.parts)]
    return files


def test_github_anchor_rule():
    assert github_anchor("Supervised training (1st place 2025)") == "supervised-training-1st-place-2025"
    assert github_anchor("The BirdCLEF+ 2025 task") == "the-birdclef-2025-task"
    assert heading_anchors("# A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1"}


def test_every_recipes_citation_names_an_existing_section():
    anchors = heading_anchors(RECIPES.read_text(encoding="utf-8"))
    cited = {}
    for path in citing_files():
        for match in CITATION.finditer(path.read_text(encoding="utf-8", errors="replace")):
            cited.setdefault(match.group(1), []).append(str(path.relative_to(REPO)))
    assert cited, "nothing cites docs/recipes.md"
    broken = {anchor: where for anchor, where in cited.items() if anchor is not None and anchor not in anchors}
    assert not broken, f"citations of docs/recipes.md sections that do not exist: {broken}"


def test_no_file_cites_the_missing_recipes_file():
    # The recipes once lived in a RECIPES.md outside the repository; users only have docs/recipes.md.
    citing = [str(p.relative_to(REPO)) for p in citing_files()
              if "RECIPES.md" in p.read_text(encoding="utf-8", errors="replace")]
    assert not citing, f"cite docs/recipes.md instead of RECIPES.md in {citing}"


def test_readme_points_to_the_recipes():
    assert "docs/recipes.md" in (REPO / "README.md").read_text(encoding="utf-8")
