"""The docs describe this repository and nothing outside it: every doc a file cites exists (and
every ``docs/design.md §n`` a section of it), nothing points at notes that are not in the repo,
and README's layout table and docs/layout.md's import table match the architecture test's table
(``ALLOWED``) and the package tree, file by file.

The user docs (README, BENCHMARKS, launch/ and eval/ READMEs) name only paths, recipe files,
recipe keys (``python -m riemann_zero.train --help``) and modules that exist, README's optimizer
list is the registry's, and every BENCHMARKS table is its committed JSON rendered by the formatter
of the script named beside it; the prose figures a reader relies on are formatted from the same
files.

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
# The team's notes kept beside the repository (spelt in parts, so that this file does not cite
# them itself): their file names, a section of the design notes, and their folder.
NOTE_NAMES = ("DESIGN", "LAYOUT", "ASSETS", "REFERENCES", "STYLE")
NOTES_DIR = "../" + "shared"
OUTSIDE = re.compile("|".join([re.escape(NOTE_NAMES[0] + " §"), re.escape(NOTES_DIR) + r"\b",
                               *(rf"\b{n}\.md" for n in NOTE_NAMES)]))
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
    (f"see {NOTE_NAMES[0]} §2\n", "outside the repository"),
    (f"see {NOTES_DIR}/notes\n", "outside the repository"),
    (f"floors in {NOTE_NAMES[1]}.md\n", "outside the repository"),
    (f"read {NOTE_NAMES[0]}.md\n", "outside the repository"),
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


# ================================================= names the docs use: paths, modules, keys
# The docs a user reads first; every path, module, recipe file and recipe key they name exists.
USER_DOCS = ("README.md", "BENCHMARKS.md", "launch/README.md", "eval/README.md")
REPO_DIRS = ("riemann_zero", "recipes", "bench", "eval", "launch", "tests", "examples", "docs")
REPO_PATH = re.compile(r"(?<![\w./~$-])((?:" + "|".join(REPO_DIRS)
                       + r")/[\w./{},\[\]*-]*[\w*\]}/])")
RECIPE_FILE = re.compile(r"(?<![\w./{},\[\]*-])([\w{},\[\]*]+\.yaml)\b")
PLACEHOLDER = re.compile(r"(^|/)[A-Z][A-Z_]*(\.\w+)?/?$")  # recipes/NEW.yaml, runs/NAME
# Folders the docs name on purpose although they are not committed (run outputs).
NOT_COMMITTED = ("bench/results/convergence/runs/", "bench/results/tensorion/runs/",
                 "bench/results/merge/runs/", "bench/results/merge/work/")
FILE_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".json", ".jsonl", ".png", ".sh", ".txt", ".pt",
                 ".safetensors", ".toml")
SECTIONS = ("model", "lora", "adapter", "init", "data", "optimizer", "schedule", "train",
            "eval_after", "logging", "memory", "deepspeed")
DOTTED_KEY = re.compile(r"(?<![\w./-])((?:" + "|".join(SECTIONS) + r")\.[a-z_][\w.]*)")
# Keys below these are not the recipe schema's: DeepSpeed's own config, and the optimizer's
# constructor options (validated against the registry row at preflight).
OPEN_KEYS = ("deepspeed.", "optimizer.options.", "adapter.config.")
COMMAND = re.compile(r"python -m riemann_zero\.train|launch/run\.sh")
OVERRIDE = re.compile(r"(?<![\w.-])([a-z_][\w.]*)=\S")
QUALIFIED = re.compile(r"(?<![\w./])((?:riemann_zero|rz)\.[A-Za-z_][\w.]*\w)")
PYTHON_M = re.compile(r"python -m ([\w.]+)")
MD_LINK = re.compile(r"\[([^\]\n]*)\]\(([^)\s]*)\)")


def expand(pattern: str) -> list[str]:
    """``a_{x,y}[_z].yaml`` -> the four names it stands for (braces: one of, brackets:
    optional)."""
    m = re.search(r"\{([^{}]*)\}|\[([^\[\]]*)\]", pattern)
    if not m:
        return [pattern]
    options = m.group(1).split(",") if m.group(1) is not None else ["", m.group(2)]
    return [n for o in options for n in expand(pattern[:m.start()] + o + pattern[m.end():])]


def _code_spans(text: str) -> list[str]:
    """Inline code spans and the lines of fenced code blocks."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    inline = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    return inline + [line for b in blocks for line in b.splitlines()]


def path_problems(root: Path, docs: tuple[str, ...] = USER_DOCS) -> list[str]:
    """Repository paths (``bench/merge.py``, ``recipes/llama3_*_adapter.yaml``,
    ``smollm2_{math,code}.yaml``) that match nothing in the tree."""
    problems = []
    for doc in docs:
        # A Markdown link [label](target) names its target (and maybe its label) as paths.
        text = MD_LINK.sub(r"\1 \2", (root / doc).read_text())
        names = set(REPO_PATH.findall(text))
        names |= {f"recipes/{n}" for n in RECIPE_FILE.findall(text) if "/" not in n}
        for name in sorted(names):
            name = name.rstrip(".,;:")
            if (name.startswith(NOT_COMMITTED) or PLACEHOLDER.search(name)
                    or re.search(r"--out\s+" + re.escape(name), text)):
                continue  # a run output, a placeholder, or where a command is told to write
            for one in expand(name):
                if not (list(root.glob(one)) if "*" in one else (root / one).exists()):
                    problems.append(f"{doc}: names {one}, which does not exist")
    return problems


def recipe_key_problems(root: Path, keys: set[str], docs: tuple[str, ...] = USER_DOCS
                        ) -> list[str]:
    """Recipe keys the docs name (``section.key`` in code, ``key=value`` after a driver command)
    that the recipe schema (``keys``: every dotted leaf key) does not have."""
    sections = {k.split(".")[0] for k in keys}
    problems = []
    for doc in docs:
        for span in _code_spans((root / doc).read_text()):
            found = {k for k in DOTTED_KEY.findall(span) if not k.endswith(FILE_SUFFIXES)}
            if COMMAND.search(span):
                found |= {k for k in OVERRIDE.findall(span.split(".yaml", 1)[-1])
                          if len(k) > 1}  # `k=v`: the placeholder of any override
            for key in sorted(found):
                key = key.rstrip(".")
                if key.startswith(OPEN_KEYS) or key in keys or key in sections:
                    continue
                problems.append(f"{doc}: recipe key {key!r} is not in the recipe schema")
    return problems


def _resolve(name: str, package: str = "riemann_zero") -> bool:
    """Whether ``riemann_zero.a.b`` (or ``rz.a``) is an importable module or an attribute of
    one."""
    import importlib

    parts = name.removeprefix("rz.").removeprefix(f"{package}.").split(".")
    parts = [package] + [p for p in parts if p]
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def module_problems(root: Path, docs: tuple[str, ...] = USER_DOCS,
                    package: str = "riemann_zero") -> list[str]:
    """``python -m X`` modules and ``riemann_zero.…`` / ``rz.…`` names that do not resolve."""
    import importlib.util

    problems = []
    for doc in docs:
        text = (root / doc).read_text()
        for mod in sorted(set(PYTHON_M.findall(text)) - {"pytest"}):
            if importlib.util.find_spec(mod) is None:
                problems.append(f"{doc}: python -m {mod}: no such module")
        names = {n.rstrip(".") for span in _code_spans(text) for n in QUALIFIED.findall(span)}
        for name in sorted(names):
            if name.endswith(FILE_SUFFIXES) or name.split(".")[0] not in (package, "rz"):
                continue
            if not _resolve(name, package):
                problems.append(f"{doc}: {name} does not resolve to a module or attribute")
    return problems


def optimizer_list_problems(readme: str, names: set[str]) -> list[str]:
    """README's list of ``optimizer.name`` values against the registry's rows."""
    m = re.search(r"Optimizers \(`optimizer\.name`\) are the rows of `([^`]+)`:(.*?);", readme,
                  re.S)
    if not m:
        return ["README: no 'Optimizers (`optimizer.name`) are the rows of …' paragraph"]
    listed = set(re.findall(r"`(\w+)`", m.group(2)))
    problems = [f"README lists optimizer {n!r}, which the registry does not have"
                for n in sorted(listed - names)]
    problems += [f"README's optimizer list lacks {n!r}, a row of the registry"
                 for n in sorted(names - listed)]
    return problems


@pytest.fixture(scope="module")
def recipe_keys() -> set[str]:
    """Every key that ``python -m riemann_zero.train --help`` lists (the recipe schema)."""
    import sys

    out = subprocess.run([sys.executable, "-m", PACKAGE + ".train", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=300).stdout
    return set(re.findall(r"^  ([a-z_][\w.]*)\s{2,}", out, re.M))


def test_docs_name_only_paths_that_exist():
    problems = path_problems(REPO)
    assert not problems, "\n".join(problems)


def test_docs_name_only_recipe_keys_of_the_schema(recipe_keys):
    assert {"optimizer.lr", "eval_after.suite", "smoke"} <= recipe_keys  # the parse worked
    problems = recipe_key_problems(REPO, recipe_keys)
    assert not problems, "\n".join(problems)


def test_docs_name_only_modules_that_exist():
    problems = module_problems(REPO)
    assert not problems, "\n".join(problems)


def test_readme_optimizer_list_is_the_registry():
    from riemann_zero.optim.registry import OPTIMIZERS

    problems = optimizer_list_problems((REPO / "README.md").read_text(), set(OPTIMIZERS))
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------- those checkers on synthetic docs
def test_expand_braces_and_optional_parts():
    assert expand("a_{x,y}[_z].yaml") == ["a_x.yaml", "a_x_z.yaml", "a_y.yaml", "a_y_z.yaml"]


@pytest.mark.parametrize(("text", "needle"), [
    ("run `bench/gone.py`\n", "bench/gone.py"),
    ("| `smollm2_{a,b}.yaml` | x |\n", "recipes/smollm2_b.yaml"),
    ("see recipes/llama9_*.yaml\n", "recipes/llama9_*.yaml"),
    ("see [the kit](bench/gpu/gone.md)\n", "bench/gpu/gone.md"),
])
def test_path_checker_flags(tmp_path, text, needle):
    root = _repo(tmp_path, {"README.md": text, "bench/merge.py": "", "recipes/smollm2_a.yaml": "",
                            "recipes/llama3_x.yaml": ""})
    problems = path_problems(root, ("README.md",))
    assert len(problems) == 1 and needle in problems[0], problems


def test_path_checker_accepts_what_exists(tmp_path):
    text = ("`bench/merge.py`, `recipes/llama3_*.yaml`, `smollm2_{a}[_b].yaml`, run outputs in "
            "bench/results/convergence/runs/NAME, `x --out bench/results/new.json`, "
            "`recipes/smollm2_{a}_b.yaml`, `recipes/NEW.yaml`, [bench/merge.py](bench/merge.py)\n")
    root = _repo(tmp_path, {"README.md": text, "bench/merge.py": "", "recipes/llama3_x.yaml": "",
                            "recipes/smollm2_a.yaml": "", "recipes/smollm2_a_b.yaml": ""})
    assert path_problems(root, ("README.md",)) == []


@pytest.mark.parametrize(("text", "needle"), [
    ("set `optimizer.lrr=1e-3`\n", "'optimizer.lrr'"),
    ("```\npython -m riemann_zero.train r.yaml smokey=true\n```\n", "'smokey'"),
    ("`train.max_step: 3`\n", "'train.max_step'"),
])
def test_recipe_key_checker_flags(tmp_path, text, needle):
    root = _repo(tmp_path, {"README.md": text})
    keys = {"optimizer.lr", "smoke", "train.max_steps", "output_dir"}
    problems = recipe_key_problems(root, keys, ("README.md",))
    assert len(problems) == 1 and needle in problems[0], problems


def test_recipe_key_checker_accepts_schema_keys(tmp_path):
    text = ("`optimizer.lr=1e-3`, `deepspeed.zero_optimization.stage=2`, "
            "`optimizer.options.ortho=svd`, `riemann_zero/train/memory.py`, `train`\n"
            "```\npython -m riemann_zero.train r.yaml smoke=true output_dir=/tmp/x\n```\n")
    root = _repo(tmp_path, {"README.md": text})
    keys = {"optimizer.lr", "smoke", "output_dir", "train.max_steps", "deepspeed"}
    assert recipe_key_problems(root, keys, ("README.md",)) == []


def test_module_checker(tmp_path):
    good = "`python -m json.tool`, `rz.Riemannion`, `riemann_zero.fsdp_placement`\n"
    root = _repo(tmp_path, {"README.md": good})
    assert module_problems(root, ("README.md",)) == []
    for bad, needle in (("`python -m no_such_module_here`\n", "no such module"),
                        ("`rz.NoSuchOptimizer`\n", "rz.NoSuchOptimizer"),
                        ("`riemann_zero.sharding.nothing.step_bytes`\n", "does not resolve")):
        (root / "README.md").write_text(bad)
        problems = module_problems(root, ("README.md",))
        assert len(problems) == 1 and needle in problems[0], (bad, problems)


def test_optimizer_list_checker():
    text = "Optimizers (`optimizer.name`) are the rows of `reg.py`: `a`, `b`; each row says"
    assert optimizer_list_problems(text, {"a", "b"}) == []
    assert "lacks 'c'" in optimizer_list_problems(text, {"a", "b", "c"})[0]
    assert "lists optimizer 'b'" in optimizer_list_problems(text, {"a"})[0]
    assert optimizer_list_problems("no list here", {"a"}) != []


# ======================================= figures: what the benchmark scripts wrote, as quoted
# Each table of BENCHMARKS.md is re-rendered from its committed JSON by the formatter of the
# script named beside it, and must appear verbatim; the figures the prose leans on are formatted
# from the same files. A rerun that changes a JSON without its doc fails here.
BENCH = REPO / "bench"
RESULTS = BENCH / "results"


def _bench(name: str):
    """A module of bench/ (they import each other by plain name)."""
    import importlib
    import sys

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _json(rel: str):
    import json

    return json.loads((RESULTS / rel).read_text())


def block_problems(doc: str, source: str, rendered: str) -> list[str]:
    """Each blank-line-separated block of ``rendered`` must appear in ``doc`` as it is; for a
    block that does not, the lines of it that the doc lacks."""
    problems = []
    for block in (b.strip() for b in rendered.split("\n\n")):
        if block and block not in doc:
            lines = set(doc.splitlines())
            missing = [ln for ln in block.splitlines() if ln not in lines] or [
                "(every line is there, but not as one block)"]
            problems.append(f"{source}: the doc differs from the rendered table:\n  "
                            + "\n  ".join(missing))
    return problems


def figure_problems(docs: dict[str, str], figures: list[tuple[str, str]]) -> list[str]:
    """Each ``(doc, text)``: ``text`` (formatted from a JSON) appears in that doc, line breaks and
    indentation aside."""
    flat = {name: " ".join(text.split()) for name, text in docs.items()}
    return [f"{doc}: expected {text!r} (from the committed results)"
            for doc, text in figures if " ".join(text.split()) not in flat[doc]]


def rendered_tables() -> dict[str, str]:
    """Every BENCHMARKS.md table, rendered from its JSON by its script's own formatter."""
    from argparse import Namespace

    overhead, conv = _bench("overhead"), _bench("convergence_report")
    tensorion, memory, comm, merge = (_bench(n) for n in ("tensorion", "memory", "comm",
                                                          "merge"))
    res, mem, merged = _json("convergence/convergence.json"), _json("memory.json"), \
        _json("merge/merge.json")
    return {
        "bench/overhead.py, overhead.json": overhead.markdown(_json("overhead.json")),
        "bench/convergence_report.py, convergence.json": conv.table(Namespace(**res["args"]),
                                                                    res),
        "bench/tensorion.py, tensorion.json": tensorion.tables(_json("tensorion/tensorion.json")),
        "bench/memory.py, memory.json": memory.table(mem["runs"], mem["base_mib"],
                                                     mem["import_floor_mib"]),
        "bench/comm.py, comm.json": comm.computed_table(_json("comm.json")["computed"]),
        "bench/comm.py --measure, comm.json": comm.measured_table(_json("comm.json")["measured"]),
        "bench/merge.py, merge.json": "\n".join(merge.table(merged["rows"],
                                                            merge.model_names())),
    }


def _fmt_range(values: list[float], spec: str) -> str:
    return f"{format(min(values), spec)}–{format(max(values), spec)}"


def quoted_figures() -> list[tuple[str, str]]:
    """The prose figures a reader relies on, each formatted from the committed results."""
    import glob
    import json

    conv, scale = _json("convergence/convergence.json"), _json("merge/scale.json")
    merged, tens, comm = _json("merge/merge.json"), _json("tensorion/tensorion.json"), \
        _json("comm.json")
    rl, aw = conv["methods"]["riemannion+loi"], conv["methods"]["adamw"]
    early = sum(x["ratio"] for x in rl["to_adamw_90"]) / len(rl["to_adamw_90"])
    seed0 = {m: dict(zip(conv["methods"][m]["curves"][0]["eval_steps"],
                         conv["methods"][m]["curves"][0]["eval_loss"])) for m in ("riemannion+loi",
                                                                                   "adamw")}
    drop = {m: c[80] - c[100] for m, c in seed0.items()}
    walls = [json.loads(Path(f).read_text())["run"].get("wall_time_s")
             for f in glob.glob(str(RESULTS / "convergence/records/*.train.json"))]
    walls = [w for w in walls if w]
    starts = [s["curve"][0]["eval_loss"] for m in tens["moe"].values() for s in m["seeds"]]
    conv_runs = sum(len(m["grid"]) + sum(s["seed"] != 0 for s in m["seeds"])
                    for m in tens["conv"].values())
    gaps = merged["lora_delta_gap_vs_cat"]["lora fixed_rank"]
    at8 = next(r for r in comm["computed"] if (r["r"], r["world"]) == (16, 8))
    zero8 = sorted(100 * at8["optimizer_bytes"][k] / at8["engine_bytes"] for k in ("zero3",
                                                                                   "zero12"))
    return [
        ("README.md", f"({rl['eval_loss'][0]:.4f} against {aw['eval_loss'][0]:.4f})"),
        ("README.md", f"it needs {early:.1f}× AdamW's steps for the early drop"),
        ("README.md", f"under ZeRO are {zero8[0]:.0f}–{zero8[1]:.0f} % of the engine's own "
                      f"adapter traffic at world 8"),
        ("BENCHMARKS.md", f"touches its own final level "
                          f"({aw['to_adamw_final'][2]['target']:.4f})"),
        ("BENCHMARKS.md", f"({drop['riemannion+loi']:.3f} for Riemannion + LOI, "
                          f"{drop['adamw']:.4f} for AdamW)"),
        ("BENCHMARKS.md", f"the {len(walls)} records that keep their wall time"),
        ("BENCHMARKS.md", f"say {_fmt_range(walls, ',.0f')} s"),
        ("BENCHMARKS.md", f"starts at {_fmt_range(starts, '.3f')} (step 0 of every seed)"),
        ("BENCHMARKS.md", f"# {conv_runs} runs"),
        ("BENCHMARKS.md", f"`fixed_rank` {gaps['mean']:.3f} / {gaps['max']:.3f}"),
        ("BENCHMARKS.md", f"write the result): {scale['fixed_rank_seconds_224']:.1f} s"),
        ("BENCHMARKS.md", f"on one decoder layer (7 modules): "
                          f"{scale['peft_svd_seconds_per_layer']:,.0f} s"),
        ("BENCHMARKS.md", f"extrapolated to 32 layers ≈ "
                          f"{round(scale['peft_svd_seconds_224_extrapolated'], -3):,.0f} s"),
    ]


def test_benchmark_tables_are_their_json_rendered():
    doc = (REPO / "BENCHMARKS.md").read_text()
    problems = [p for source, text in rendered_tables().items()
                for p in block_problems(doc, source, text)]
    assert not problems, "\n".join(problems)


def test_quoted_figures_are_the_committed_results():
    docs = {name: (REPO / name).read_text() for name in ("README.md", "BENCHMARKS.md")}
    problems = figure_problems(docs, quoted_figures())
    assert not problems, "\n".join(problems)


def test_convergence_json_is_what_the_report_makes_of_the_records():
    """convergence.json (which the tables are rendered from) is what
    ``bench/convergence_report.py`` computes from the committed records, number for number."""
    import json
    from argparse import Namespace

    res = _json("convergence/convergence.json")
    args = Namespace(**{**res["args"], "out": str(RESULTS / "convergence")})
    again = json.loads(json.dumps(_bench("convergence_report").summarise(args)))
    assert {k: again[k] for k in again} == {k: res[k] for k in again}


def test_derived_json_fields_are_recomputed_from_their_rows():
    """tensorion.json's summary from its per-seed results; comm.json's computed rows from the
    shape model (worlds 8 and 64; 1024 takes most of a minute)."""
    tens = _json("tensorion/tensorion.json")
    assert _bench("tensorion").summary(tens) == tens["summary"]
    comm = _bench("comm")
    rows = [r for r in _json("comm.json")["computed"] if r["world"] in (8, 64)]
    assert rows == comm.computed_rows(worlds=(8, 64))


# ------------------------------------------------------- those checkers on synthetic docs
TABLE = "| a | b |\n|---|---|\n| 1 | 2.50 |\n\n| c |\n|---|\n| 3 |"


def test_block_checker():
    doc = "intro\n\n| a | b |\n|---|---|\n| 1 | 2.50 |\n\ntext\n\n| c |\n|---|\n| 3 |\n"
    assert block_problems(doc, "x", TABLE) == []
    problems = block_problems(doc.replace("2.50", "2.5"), "x", TABLE)
    assert len(problems) == 1 and "| 1 | 2.50 |" in problems[0]
    shuffled = "| a | b |\n|---|---|\nmore\n| 1 | 2.50 |\n\n| c |\n|---|\n| 3 |\n"
    assert "not as one block" in block_problems(shuffled, "x", TABLE)[0]


def test_figure_checker():
    docs = {"R.md": "ties on held-out loss\n  (0.1683 against 0.1682) and"}
    assert figure_problems(docs, [("R.md", "(0.1683 against 0.1682)")]) == []
    assert figure_problems(docs, [("R.md", "(0.1683 against 0.1681)")]) != []
