"""What can drift in the docs: citations of docs/recipes.md, and README.md against the commands, config keys and defaults."""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from birdrounds.cli import COMMANDS
from birdrounds.config import compose, config_dir

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


# ---------------------------------------------------------------- README.md against the code and the config
# The README names commands, config keys and their defaults; these tests fail when one of them drifts.
# Conventions the README follows so they can be checked: config keys in backticks (`group.key`,
# `key=value`, `key: value`); quoted defaults in tables with a "key" and a "default" column, composed with
# no overrides unless an `<!-- docs-config: OVERRIDES -->` line sits just above the table.

README = REPO / "README.md"
FENCE_RE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN_RE = re.compile(r"`([^`\n]+)`")
DOTTED_RE = re.compile(r"^\+?([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)(\.\*)?$")
ASSIGN_RE = re.compile(r"^(\+?)([a-z_][a-z0-9_.]*)(=|: )(.*)$")
CONFIG_MARK_RE = re.compile(r"<!--\s*docs-config:(.*?)-->")
# `model.pt`, `train.csv`: file names that look like dotted keys.
FILE_SUFFIXES = {"csv", "json", "md", "npy", "ogg", "onnx", "parquet", "png", "pt", "py", "toml", "txt", "yaml"}


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def configs(readme) -> dict[str, dict]:
    """The plain, unresolved config for every override set README's tables name ('' = the defaults)."""
    sets = {""} | {m.group(1).strip() for m in CONFIG_MARK_RE.finditer(readme)}
    return {s: OmegaConf.to_container(compose(s.split()), resolve=False) for s in sets}


def code_lines(text: str) -> list[str]:
    """Every line of a fenced code block, and every inline code span outside them."""
    fenced = [line for block in FENCE_RE.findall(text) for line in block.splitlines()]
    return fenced + SPAN_RE.findall(FENCE_RE.sub("", text))


def lookup(plain: dict, dotted: str):
    """The value at `dotted` in a plain config; KeyError when a part is missing."""
    node = plain
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def key_exists(configs: dict[str, dict], dotted: str) -> bool:
    """True when some composed config README refers to has this key."""
    for plain in configs.values():
        try:
            lookup(plain, dotted)
            return True
        except KeyError:
            pass
    return False


def assignment_problem(configs: dict[str, dict], text: str) -> str | None:
    """Why an override `key=value` (or `key: value`) names nothing real, or None when it does."""
    match = ASSIGN_RE.match(text)
    if match is None:
        return None
    plus, key, sep, value = match.groups()
    if plus or "<" in value:  # `+key=value` adds a key the config does not have; `<name>` is a placeholder
        return None
    if "." in key:
        return None if key_exists(configs, key) else f"{text!r}: no config key {key}"
    if sep == "=" and (config_dir() / key).is_dir():  # a config group: `data=birdclef2025`
        options = sorted(p.stem for p in (config_dir() / key).glob("*.yaml"))
        return None if value.strip("'\"") in options else f"{text!r}: {key} has the options {options}"
    return None if key_exists(configs, key) else f"{text!r}: no top-level config key {key}"


def command_overrides(line: str) -> list[str]:
    """The Hydra overrides of a `python rounds/run.py ...` or `birdrounds <cmd> ...` line."""
    line = line.split(" #")[0]
    try:
        tokens = shlex.split(line)
    except ValueError:
        tokens = line.split()
    for i, token in enumerate(tokens):
        if token.endswith("rounds/run.py") or (token == "birdrounds" and i + 1 < len(tokens)):
            start = i + 1 if token.endswith("run.py") else i + 2
            if "--config-dir" in tokens[start:]:  # options of the user's own folder: nothing to check them against
                return []
            return [t for t in tokens[start:] if "=" in t and not t.startswith("-")]
    return []


def test_readme_commands_exist(readme):
    lines = code_lines(readme)
    named = {m.group(1) for line in lines for m in re.finditer(r"(?:^|\s)birdrounds\s+([a-z][\w-]*)", line)}
    assert named, "README names no birdrounds command"
    known = {"run", *COMMANDS}  # `birdrounds run` hands its command line to Hydra (cli.run_rounds)
    assert named <= known, f"README names birdrounds commands that do not exist: {named - known}"
    scripts = {m.group(1) for line in lines for m in re.finditer(r"python\s+((?:rounds|bench)/[\w/]+\.py)", line)}
    assert "rounds/run.py" in scripts
    missing = sorted(s for s in scripts if not (REPO / s).is_file())
    assert not missing, f"README runs scripts that do not exist: {missing}"
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
    made = {m.group(1) for line in lines for m in re.finditer(r"(?:^|\s)make\s+([\w-]+)", line)}
    assert made <= targets, f"README runs make targets that do not exist: {made - targets}"


def test_readme_set_up_comes_first(readme):
    # The first two commands are the set-up: the main job on the synthetic default, then the tests
    # (CI runs the test command README gives).
    first_block = FENCE_RE.search(readme).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.split("#")[0].strip()]
    assert commands[:2] == ["make demo", "make test"]


def test_readme_overrides_name_real_keys(readme, configs):
    overrides = [o for line in code_lines(readme) for o in command_overrides(line)]
    assert len(overrides) > 10
    problems = [p for p in (assignment_problem(configs, o) for o in overrides) if p]
    assert not problems, "README commands with overrides the config does not have:\n" + "\n".join(problems)


def test_readme_config_keys_exist(readme, configs):
    top = set().union(*(plain.keys() for plain in configs.values()))
    problems, checked = [], 0
    for span in SPAN_RE.findall(FENCE_RE.sub("", readme)):
        dotted = DOTTED_RE.match(span)
        if dotted and dotted.group(1).split(".")[-1] in FILE_SUFFIXES:
            continue
        if dotted and dotted.group(1).split(".")[0] in top:
            checked += 1
            if not key_exists(configs, dotted.group(1)):
                problems.append(f"`{span}`: no such config key")
        elif ASSIGN_RE.match(span) and " " not in span.split("=")[0].split(": ")[0]:
            checked += 1
            problem = assignment_problem(configs, span)
            if problem:
                problems.append(problem)
    assert checked > 30, f"only {checked} config keys found in README"
    assert not problems, "README names config keys that do not exist:\n" + "\n".join(problems)


def default_tables(readme: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """(override set, [(key, quoted default)]) for every README table with "key" and "default" columns."""
    tables, lines = [], readme.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip().lower() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or "key" not in cells or "default" not in cells:
            continue
        marks = [CONFIG_MARK_RE.search(lines[j]) for j in range(max(0, i - 3), i)]
        overrides = next((m.group(1).strip() for m in reversed(marks) if m), "")
        rows = []
        for row in lines[i + 2:]:
            if not row.startswith("|"):
                break
            values = [c.strip() for c in row.strip().strip("|").split("|")]
            key, default = values[cells.index("key")], values[cells.index("default")]
            if key.startswith("`") and default.startswith("`"):
                rows.append((key.strip("`"), default.split("`")[1]))
        tables.append((overrides, rows))
    return tables


def test_readme_defaults_match_the_config(readme, configs):
    tables = default_tables(readme)
    assert sum(len(rows) for _, rows in tables) > 20
    wrong = []
    for overrides, rows in tables:
        for key, quoted in rows:
            try:
                actual = lookup(configs[overrides], key)
            except KeyError:
                wrong.append(f"{key}: not in the config{f' with {overrides}' if overrides else ''}")
                continue
            if yaml.safe_load(quoted) != actual:
                wrong.append(f"{key}: README says {quoted!r}, the config{f' with {overrides}' if overrides else ''} "
                             f"has {actual!r}")
    assert not wrong, "README's defaults differ from the config:\n" + "\n".join(wrong)


def test_readme_defaults_in_prose_match_the_config(readme, configs):
    # "`key` (`value`)" in running text quotes a default too: some composed config README refers to has it.
    quoted = re.findall(r"`([a-z_][a-z0-9_.]*)` \((?:default )?`([^`]+)`\)", FENCE_RE.sub("", readme))
    top = set().union(*(plain.keys() for plain in configs.values()))
    quoted = [(k, v) for k, v in quoted if k.split(".")[0] in top and k.split(".")[-1] not in FILE_SUFFIXES]
    assert quoted
    wrong = []
    for key, value in quoted:
        found = []
        for plain in configs.values():
            try:
                found.append(lookup(plain, key))
            except KeyError:
                pass
        if yaml.safe_load(value) not in found:
            wrong.append(f"{key}: README says {value!r}, the config has {found or 'no such key'}")
    assert not wrong, "README's defaults differ from the config:\n" + "\n".join(wrong)


def test_readme_requirements_match_pyproject(readme):
    # The Python range and the torch/torchaudio specifiers README gives are pyproject's (regex: tomllib is 3.11+).
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    python = re.search(r'^requires-python\s*=\s*"([^"]+)"', pyproject, re.M).group(1)
    assert f"`{python}`" in readme, f"README should give the Python range {python}"
    for package in ("torch", "torchaudio"):
        spec = re.search(rf'^\s*"{package}\s*([^"]*)"', pyproject, re.M).group(1).strip()
        assert f"{package} `{spec}`" in readme, f"README should give {package} `{spec}` as pyproject does"


def test_readme_names_what_the_export_folder_needs_to_run():
    """The packages `infer.py` and the modules copied beside it into export/ import, and the ones its decoding and
    default engine use (onnxruntime where a session is made, scipy to resample), are the ones README's export
    paragraph names; openvino (an opt-in engine) and threadpoolctl (a no-op without it) are optional."""
    import ast
    import sys

    from birdrounds.export import INFER_FILES

    siblings = {Path(name).stem for name in INFER_FILES}
    imported = set()
    for name in INFER_FILES:
        for node in ast.walk(ast.parse((REPO / "src" / "birdrounds" / name).read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in siblings | {"birdrounds"}}
    optional = {"openvino", "threadpoolctl"}
    paragraph = next(p for p in README.read_text().split("\n\n") if "`export/` is self-contained" in p)
    named = {m for m in third_party if m in paragraph}
    assert third_party - optional <= named, f"README's export paragraph misses {sorted(third_party - optional - named)}"
    assert third_party - optional == {"numpy", "soundfile", "onnxruntime", "scipy"}  # a new import: name it there


def test_readme_code_lists_it_names_exist(readme):
    """README names the code's lists (e.g. the keys kept out of the config hash: `rounds.NON_RESULT_KEYS`,
    `config.LEGACY`) instead of copying them, so it cannot go stale: each name must exist in birdrounds."""
    import importlib

    named = set(re.findall(r"`([a-z_]+)\.([A-Z][A-Z0-9_]+)`", readme))
    assert {("rounds", "NON_RESULT_KEYS"), ("config", "LEGACY")} <= named
    for module, name in sorted(named):
        assert hasattr(importlib.import_module(f"birdrounds.{module}"), name), f"README names {module}.{name}"
