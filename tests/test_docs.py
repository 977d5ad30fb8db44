"""The docs describe this repository and nothing outside it: every doc a file cites exists (and
every ``docs/design.md §n`` a section of it), nothing points at notes that are not in the repo,
and README's layout table and docs/layout.md's import table match the architecture test's table
(``ALLOWED``) and the package tree, file by file.

Each check is also run on a small synthetic repo where it must fail, so a green run means the docs
agree, not that the checker cannot see.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from test_architecture import ALLOWED, PACKAGE, REPO

TEXT_SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".cfg", ".txt", ""}
# Notes that live outside the repository, and ways of citing them.
OUTSIDE = re.compile(r"DESIGN §|\bDESIGN\.md|\bLAYOUT\.md|\.\./shared\b|\bASSETS\.md|"
                     r"\bREFERENCES\.md|\bSTYLE\.md")
DOC_PATH = re.compile(r"\bdocs/[\w./-]+\.md\b")
DESIGN_SECTION = re.compile(r"docs/design\.md §(\d+)")
# Results and records are data written by scripts, not prose.
SKIP = ("bench/results/",)


def text_files(root: Path) -> list[Path]:
    """The repository's tracked text files (all files under ``root`` when it is not a git work
    tree, as in the synthetic tests)."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root,
                             check=True, capture_output=True, text=True).stdout.split()
        paths = [root / p for p in out]
    except subprocess.CalledProcessError:
        paths = [p for p in root.rglob("*") if p.is_file()]
    return [p for p in paths if p.is_file() and p.suffix in TEXT_SUFFIXES
            and not p.relative_to(root).as_posix().startswith(SKIP)]


def reference_problems(root: Path) -> list[str]:
    """Citations of notes outside the repo, of docs that do not exist, and of design sections
    that docs/design.md does not have."""
    design = root / "docs" / "design.md"
    text = design.read_text() if design.exists() else ""
    sections = set(re.findall(r"^## (\d+)\.", text, re.M))
    problems = []
    for path in text_files(root):
        if path.name == Path(__file__).name:
            continue  # this file names the patterns it looks for
        rel = path.relative_to(root)
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                problems.append(f"{rel}:{n}: cites a note outside the repository: {line.strip()}")
            problems += [f"{rel}:{n}: cites {doc}, which does not exist"
                         for doc in DOC_PATH.findall(line) if not (root / doc).exists()]
            problems += [f"{rel}:{n}: cites docs/design.md §{s}, which has no section {s}"
                         for s in DESIGN_SECTION.findall(line) if s not in sections]
    return problems


def floors(allowed: dict[str, set[str]]) -> dict[str, int]:
    """A unit's floor: 0 when it may import nothing of ours, else one above the highest floor it
    may import."""
    memo: dict[str, int] = {}

    def floor(unit: str) -> int:
        if unit not in memo:
            memo[unit] = 1 + max((floor(u) for u in allowed[unit]), default=-1)
        return memo[unit]

    return {unit: floor(unit) for unit in allowed}


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start: end if end >= 0 else len(text)]


def layout_table(readme: str) -> list[tuple[str, list[str], list[str]]]:
    """(floor, paths, files named in the description) for each row of README's layout table."""
    rows = []
    for line in _section(readme, "## Layout of the repository").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not line.startswith("|") or set(cells[0]) <= {"-"}:
            continue
        if cells[0] in ("floor",):
            continue
        names = re.findall(r"`([^`]+)`", cells[1])
        files = [f for f in re.findall(r"`([\w/]+\.py)`", cells[2])]
        rows.append((cells[0], names, files))
    return rows


def layout_problems(root: Path, allowed: dict[str, set[str]]) -> list[str]:
    """README's layout table against ``allowed`` (each unit's floor) and the package tree (each
    module named in its unit's row)."""
    expected = floors(allowed)
    rows = layout_table((root / "README.md").read_text())
    named: dict[str, set[str]] = {}
    problems = []
    for floor, paths, files in rows:
        units = []
        for p in paths:
            p = p if p.startswith(PACKAGE) else f"{PACKAGE}/{p}"
            if not p.startswith(f"{PACKAGE}/"):
                continue
            unit = p[len(PACKAGE) + 1:].split("/")[0].removesuffix(".py")
            units.append(unit)
            named.setdefault(unit, set()).update(files)
            if unit in expected and floor != str(expected[unit]):
                problems.append(f"README layout: {unit} is on floor {expected[unit]} by the "
                                f"architecture test's table, but the row says {floor!r}")
    package = root / PACKAGE
    for unit in allowed:
        if unit not in named:
            problems.append(f"README layout: no row for riemann_zero/{unit}")
            continue
        folder = package / unit
        if folder.is_dir():
            on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*.py")
                       if p.name not in ("__init__.py", "__main__.py")}
            missing = sorted(on_disk - named[unit])
            problems += [f"README layout: riemann_zero/{unit}/{m} is not named in its row"
                         for m in missing]
            problems += [f"README layout: riemann_zero/{unit}/{m} is named but does not exist"
                         for m in sorted(named[unit] - on_disk)]
    return problems


def import_table_problems(root: Path, allowed: dict[str, set[str]]) -> list[str]:
    """docs/layout.md's "who imports whom" table against ``allowed``, row by row."""
    text = _section((root / "docs" / "layout.md").read_text(), "## Who may import whom")
    table = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            unit = cells[0].strip("`")
            deps = set(re.findall(r"`([\w]+)`", cells[1]))
            table[unit] = deps
    problems = [f"docs/layout.md: no row for {u}" for u in sorted(set(allowed) - set(table))]
    problems += [f"docs/layout.md: row {u} is not a unit of the architecture test"
                 for u in sorted(set(table) - set(allowed))]
    problems += [f"docs/layout.md: {u} may import {sorted(allowed[u])}, the row says "
                 f"{sorted(table[u])}" for u in sorted(set(table) & set(allowed))
                 if table[u] != allowed[u]]
    return problems


# ------------------------------------------------------------------------------ the real repo
def test_docs_cite_only_what_the_repo_has():
    problems = reference_problems(REPO)
    assert not problems, "\n".join(problems)


def test_readme_layout_table_matches_the_architecture_and_the_tree():
    problems = layout_problems(REPO, ALLOWED)
    assert not problems, "\n".join(problems)


def test_layout_doc_import_table_matches_the_architecture():
    problems = import_table_problems(REPO, ALLOWED)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------- the checkers on synthetic repos
def _repo(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


DESIGN = "# d\n\n## 1. One\n\n## 2. Two\n"


@pytest.mark.parametrize(("text", "needle"), [
    ("see DESIGN §2\n", "outside the repository"),
    ("see ../shared/notes\n", "outside the repository"),
    ("floors in LAYOUT.md\n", "outside the repository"),
    ("see docs/missing.md\n", "docs/missing.md, which does not exist"),
    ("see docs/design.md §7\n", "has no section 7"),
])
def test_reference_checker_flags(tmp_path, text, needle):
    root = _repo(tmp_path, {"docs/design.md": DESIGN, "a.py": text})
    problems = reference_problems(root)
    assert len(problems) == 1 and needle in problems[0], problems


def test_reference_checker_accepts_real_citations(tmp_path):
    root = _repo(tmp_path, {"docs/design.md": DESIGN, "a.md": "see docs/design.md §2\n"})
    assert reference_problems(root) == []


def test_floors_follow_the_longest_chain():
    assert floors({"io": set(), "a": {"io"}, "b": {"a", "io"}, "c": {"io"}}) == {
        "io": 0, "a": 1, "b": 2, "c": 1}


README = """# x

## Layout of the repository

| floor | path | what |
|---|---|---|
| 0 | `riemann_zero/io.py` | files |
| 1 | `riemann_zero/optim/` | `base.py` (the base), `adamw.py` |
| | `tests/` | the tests |

## Tests
"""


def _pkg(tmp_path: Path, readme: str) -> Path:
    return _repo(tmp_path, {"README.md": readme, f"{PACKAGE}/io.py": "",
                            f"{PACKAGE}/optim/__init__.py": "",
                            f"{PACKAGE}/optim/base.py": "", f"{PACKAGE}/optim/adamw.py": ""})


def test_layout_checker_accepts_a_matching_table(tmp_path):
    assert layout_problems(_pkg(tmp_path, README), {"io": set(), "optim": {"io"}}) == []


@pytest.mark.parametrize(("readme", "allowed", "needle"), [
    (README.replace(", `adamw.py`", ""), {"io": set(), "optim": {"io"}},
     "optim/adamw.py is not named"),
    (README.replace("| 1 |", "| 2 |"), {"io": set(), "optim": {"io"}}, "on floor 1"),
    (README, {"io": set(), "optim": {"io"}, "hf": {"optim"}}, "no row for riemann_zero/hf"),
    (README.replace("`adamw.py`", "`adamw.py`, `gone.py`"), {"io": set(), "optim": {"io"}},
     "gone.py is named but does not exist"),
])
def test_layout_checker_flags(tmp_path, readme, allowed, needle):
    problems = layout_problems(_pkg(tmp_path, readme), allowed)
    assert any(needle in p for p in problems), problems


def test_import_table_checker(tmp_path):
    doc = ("# l\n\n## Who may import whom\n| unit | may import |\n|---|---|\n"
           "| `io` | nothing of ours |\n| `optim` | `io` |\n")
    root = _repo(tmp_path, {"docs/layout.md": doc})
    assert import_table_problems(root, {"io": set(), "optim": {"io"}}) == []
    assert import_table_problems(root, {"io": set(), "optim": {"io", "x"}}) != []
    assert import_table_problems(root, {"io": set()}) != []
