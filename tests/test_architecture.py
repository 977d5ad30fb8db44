"""The package is built in floors (docs/layout.md): imports only go downward, no module imports
the package root, nobody imports another file's ``_private`` names, the import graph has no
circle, and eval/, bench/, launch/ use only the public API and the few modules meant for them;
bench/'s scripts do not import each other in a circle. Engines and parameter layouts are objects:
no code outside ``sharding/layouts.py`` and ``train/engines*`` switches on their names. No function
of the package is over 100 lines.

Plain ``ast`` over the source files: function-local imports count like top-level ones (that is
where circles used to hide). The checker is tested on small synthetic trees first, so a green
run means the rules hold, not that the checker cannot see.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "riemann_zero"

# Who may import whom, by unit (a top-level module or subpackage of riemann_zero).
ALLOWED: dict[str, set[str]] = {
    "io": set(),
    "linalg": set(),
    "progress": set(),
    "assets": {"io", "progress"},
    "manifold": {"linalg"},
    "sharding": {"linalg", "io"},
    "data": {"assets", "io", "progress"},
    "adapters": {"linalg", "io", "progress", "manifold", "sharding"},
    "optim": {"linalg", "io", "progress", "manifold", "sharding", "adapters"},
    "train": {"linalg", "io", "progress", "assets", "manifold", "sharding", "data", "adapters",
              "optim"},
    "hf": {"linalg", "io", "progress", "assets", "manifold", "sharding", "data", "adapters",
           "optim", "train"},
    "merge": {"io", "adapters"},  # F4: the `python -m riemann_zero.merge` command line
}
# Third-party packages a unit must not import: geometry is pure torch; sharding knows no PEFT.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "linalg": ("torch.optim", "torch.distributed", "peft", "transformers", "deepspeed"),
    "manifold": ("torch.optim", "torch.distributed", "peft", "transformers", "deepspeed"),
    "sharding": ("peft", "transformers"),
}
# Modules that must import nothing of the package (the dense oracle the tests trust).
STANDALONE = {"riemann_zero.manifold.reference"}
# What eval/, bench/ and launch/ may import besides the public API (``riemann_zero`` itself).
OUTSIDE_ALLOWED = {"riemann_zero", "riemann_zero.data.prompts", "riemann_zero.assets",
                   "riemann_zero.io", "riemann_zero.progress", "riemann_zero.sharding.accounting",
                   "riemann_zero.train.cli", "riemann_zero.manifold.reference"}


# Engine and parameter-layout names: only their own objects may switch on them.
ENGINE_NAMES = {"local", "ddp", "zero12", "zero3", "fsdp2", "deepspeed"}
ENGINE_HOMES = ("riemann_zero/sharding/layouts.py", "riemann_zero/train/engines")
MAX_FUNCTION_LINES = 100


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of every module of the package under ``root``."""
    return {_module_name(root, p): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source: str, module: str, is_pkg: bool, known: set[str]
               ) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import in ``source``.

    ``from a import b`` yields module ``a.b`` when that is a module of ours, else (``a``, ``b``).
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_pkg, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in known
                             else (target, alias.name, node.lineno))
    return found


def private_attribute_uses(source: str, module_aliases: set[str]) -> list[tuple[str, int]]:
    """``alias._name`` uses where ``alias`` names one of our imported modules."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            hits.append((f"{node.value.id}.{node.attr}", node.lineno))
    return hits


def _aliases(source: str, module: str, is_pkg: bool, known: set[str]) -> set[str]:
    """Local names bound to modules of ours (``import a.b as x``, ``from a import b``)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.asname and a.name in known}
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_pkg, node)
            names |= {a.asname or a.name for a in node.names if f"{target}.{a.name}" in known}
    return names


def unit_of(module: str) -> str:
    """``riemann_zero.manifold.span`` → ``manifold``; the package root → ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(root: Path) -> list[str]:
    """Every broken rule in the package under ``root``, one line each."""
    mods = package_modules(root)
    known = set(mods)
    problems, graph = [], {m: set() for m in mods}
    for mod, path in mods.items():
        src, is_pkg = path.read_text(), path.name == "__init__.py"
        where = path.relative_to(root)
        for target, name, line in imports_of(src, mod, is_pkg, known):
            full = f"{target}.{name}" if name else target
            banned = [b for b in FORBIDDEN.get(unit_of(mod), ()) if full == b
                      or full.startswith(b + ".") or target == b]
            if banned:
                problems.append(f"{where}:{line}: {unit_of(mod)} may not import {banned[0]}")
            if not target.startswith(PACKAGE):
                continue
            if target == PACKAGE and mod != PACKAGE:
                problems.append(f"{where}:{line}: imports the package root ({name or target}); "
                                f"import the module that defines it")
                continue
            if name.startswith("_") and not name.startswith("__"):
                problems.append(f"{where}:{line}: imports private {target}.{name}")
            if target not in known:
                continue
            graph[mod].add(target)
            if mod in STANDALONE:
                problems.append(f"{where}:{line}: {mod} must import nothing of the package")
            src_unit, dst_unit = unit_of(mod), unit_of(target)
            if src_unit and dst_unit != src_unit and dst_unit not in ALLOWED.get(src_unit, set()):
                problems.append(f"{where}:{line}: {src_unit} may not import {dst_unit} ({target})")
        for use, line in private_attribute_uses(src, _aliases(src, mod, is_pkg, known)):
            problems.append(f"{where}:{line}: uses private {use} of another module")
    problems += [f"import circle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative circle per strongly connected component with more than one module
    (or a module importing itself)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def outside_violations(root: Path, dirs: tuple[str, ...] = ("eval", "bench", "launch")
                       ) -> list[str]:
    """Imports of package internals from eval/, bench/, launch/ (launch/run.sh is Python too)."""
    known = set(package_modules(root))
    problems = []
    for d in dirs:
        for path in sorted((root / d).rglob("*")):
            if path.suffix not in (".py", ".sh"):
                continue
            src = path.read_text()
            for target, name, line in imports_of(src, _module_name(root, path), False, known):
                if not target.startswith(PACKAGE):
                    continue
                private = name.startswith("_") and not name.startswith("__")
                if target not in OUTSIDE_ALLOWED or private:
                    problems.append(f"{path.relative_to(root)}:{line}: imports {target}"
                                    f"{'.' + name if name else ''}; use the public API")
    return problems


def _names_in(node: ast.AST) -> set[str]:
    """The engine names among the string constants of ``node`` (a constant or a literal
    tuple/list/set of them)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {i.value for i in items if isinstance(i, ast.Constant) and i.value in ENGINE_NAMES}


def engine_switches(source: str) -> list[tuple[str, int]]:
    """(name, line) for every switch on an engine or layout name: ``x == "zero3"``,
    ``x in ("local", ...)``, ``{"fsdp2": ...}[x]`` and ``case "deepspeed":``."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        found: set[str] = set()
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                found |= _names_in(side)
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict):
            found = {k.value for k in node.value.keys
                     if isinstance(k, ast.Constant) and k.value in ENGINE_NAMES}
        elif isinstance(node, ast.MatchValue):
            found = _names_in(node.value)
        hits += [(name, node.lineno) for name in sorted(found)]
    return hits


def switch_violations(root: Path) -> list[str]:
    """Engine/layout name switches outside the layout objects and the engine classes."""
    problems = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(ENGINE_HOMES):
            continue
        problems += [f"{rel}:{line}: switches on the engine/layout name {name!r}; ask the "
                     f"layout object (sharding/layouts.py) or the engine class (train/engines)"
                     for name, line in engine_switches(path.read_text())]
    return problems


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions of the package longer than ``limit`` lines (decorators excluded)."""
    problems = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    problems.append(f"{path.relative_to(root)}:{node.lineno}: {node.name} is "
                                    f"{length} lines (at most {limit}); split it into phases")
    return problems


def bench_circles(root: Path) -> list[str]:
    """Import circles among bench/'s scripts (they import their siblings by bare name)."""
    scripts = {p.stem: p for p in (root / "bench").rglob("*.py")}
    graph = {name: set() for name in scripts}
    for name, path in scripts.items():
        for target, _, _ in imports_of(path.read_text(), name, False, set(scripts)):
            head = target.split(".")[0]
            if head in scripts:
                graph[name].add(head)
    return [f"bench import circle: {' -> '.join(c)}" for c in cycles(graph)]


# ------------------------------------------------------------------------------ the real tree
def test_package_has_floors_and_no_circles():
    problems = violations(REPO)
    assert not problems, "\n".join(problems)


def test_eval_bench_launch_use_the_public_api():
    problems = outside_violations(REPO)
    assert not problems, "\n".join(problems)


def test_every_unit_is_known():
    """A new subpackage must get a row in ALLOWED (and a floor in docs/layout.md)."""
    units = {unit_of(m) for m in package_modules(REPO)} - {""}
    assert units <= set(ALLOWED), sorted(units - set(ALLOWED))


def test_no_engine_name_switch_outside_layouts_and_engines():
    problems = switch_violations(REPO)
    assert not problems, "\n".join(problems)


def test_no_function_over_100_lines():
    problems = long_functions(REPO)
    assert not problems, "\n".join(problems)


def test_bench_scripts_import_no_circle():
    problems = bench_circles(REPO)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------- the checker on synthetic trees
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in {p.parent for p in (tmp_path / PACKAGE).rglob("*.py")}:
        (folder / "__init__.py").touch()
    return tmp_path


CLEAN = {"linalg.py": "X = 1\n", "manifold/span.py": "from riemann_zero.linalg import X\n",
         "optim/base.py": "from riemann_zero.manifold import span\n"}


@pytest.mark.parametrize(("files", "needle"), [
    ({"linalg.py": "from riemann_zero.optim import base\n"}, "linalg may not import optim"),
    ({"manifold/span.py": "import riemann_zero.sharding.comm\n",
      "sharding/comm.py": "Y = 2\n"}, "manifold may not import sharding"),
    ({"manifold/span.py": "from riemann_zero.linalg import _hidden\n"}, "imports private"),
    ({"optim/base.py": "from riemann_zero.manifold import span\nspan._gram(1)\n"},
     "uses private span._gram"),
    ({"optim/base.py": "def f():\n    import riemann_zero as rz\n"}, "imports the package root"),
    ({"manifold/span.py": "import torch.distributed as dist\n"},
     "manifold may not import torch.distributed"),
    ({"sharding/comm.py": "def f():\n    from peft import LoraConfig\n"},
     "sharding may not import peft"),
    ({"optim/a.py": "def f():\n    from riemann_zero.optim import b\n",
      "optim/b.py": "from riemann_zero.optim.a import f\n"}, "import circle"),
    ({"manifold/span.py": "from .. import linalg\nfrom . import reference\n",
      "manifold/reference.py": "from riemann_zero.manifold import span\n"}, "import circle"),
])
def test_checker_flags_each_broken_rule(tmp_path, files, needle):
    root = _tree(tmp_path, {**CLEAN, **files})
    assert any(needle in p for p in violations(root)), violations(root)


def test_checker_accepts_a_clean_tree(tmp_path):
    assert violations(_tree(tmp_path, CLEAN)) == []


def test_checker_flags_internals_used_from_bench(tmp_path):
    root = _tree(tmp_path, CLEAN)
    (root / "bench").mkdir()
    (root / "bench" / "b.py").write_text("from riemann_zero.manifold.span import X\n"
                                         "from riemann_zero import Riemannion\n")
    problems = outside_violations(root, ("bench",))
    assert len(problems) == 1 and "riemann_zero.manifold.span" in problems[0], problems


@pytest.mark.parametrize(("source", "name"), [
    ('if kind == "zero3":\n    pass\n', "zero3"),
    ('ok = engine != "fsdp2"\n', "fsdp2"),
    ('if layout in ("local", "x"):\n    pass\n', "local"),
    ('how = {"zero12": 1, "other": 2}[kind]\n', "zero12"),
    ('match engine:\n    case "deepspeed":\n        pass\n', "deepspeed"),
])
def test_checker_flags_each_engine_switch(source, name):
    assert [n for n, _ in engine_switches(source)] == [name]


def test_checker_accepts_engine_names_that_are_not_switches():
    # A recipe's choice list, a lookup key and a logger name are data, not switches.
    source = ('ENGINES = ("deepspeed", "fsdp2")\nx = cfg.get("deepspeed")\n'
              'for n in ("deepspeed", "transformers"):\n    pass\nif e in ENGINES:\n    pass\n')
    assert engine_switches(source) == []


def test_checker_exempts_the_layout_and_engine_homes(tmp_path):
    root = _tree(tmp_path, {"sharding/layouts.py": 'A = 1 if k == "zero3" else 2\n',
                            "train/engines/ds.py": 'B = e == "deepspeed"\n',
                            "train/loop.py": 'C = e == "deepspeed"\n'})
    problems = switch_violations(root)
    assert len(problems) == 1 and "train/loop.py:1" in problems[0], problems


def test_checker_flags_a_long_function(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    root = _tree(tmp_path, {"optim/a.py": f"def short():\n    pass\n\n\ndef long():\n{body}"})
    problems = long_functions(root)
    assert len(problems) == 1 and "long is 101 lines" in problems[0], problems


def test_checker_flags_a_bench_circle(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "a.py").write_text("from b import f\n")
    (tmp_path / "bench" / "b.py").write_text("def f():\n    from a import g\n")
    (tmp_path / "bench" / "c.py").write_text("import a\n")
    assert bench_circles(tmp_path) == ["bench import circle: a -> b -> a"]
